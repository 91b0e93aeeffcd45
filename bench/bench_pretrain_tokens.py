"""Benchmark: the embedded backbone's pretraining step with the loss on every token or on the number tokens
only (`PretrainSpec.loss_tokens`, issue 13 demo-time route). Run `make demo` first (DATA_DIR's training set
and backbone).

    python bench/bench_pretrain_tokens.py [--steps 24] [--rounds 3]

The pretraining's own prompts (the asset's default draw of train-split prompts, rendered as the asset
renders them) through the pretraining's step (`pretrain_causal_lm`'s forward, loss, clipping and AdamW)
on a fresh model of DATA_DIR's backbone config, the two losses interleaved round by round in one process:
the 2-core machine drifts by 20-30% within minutes, so only interleaved rates compare.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from _common import machine, save_json, write_section

DATA = Path(os.environ.get("DATA_DIR", "data")).resolve()


def step_rate(model, batches: list[dict], loss_fn) -> float:
    """Prompts/s of `len(batches)` pretraining steps (one warm-up step before the clock starts)."""
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    samples, started = 0, 0.0
    for i, batch in enumerate(batches):
        if i == 1:
            started, samples = time.perf_counter(), 0
        loss = loss_fn(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        samples += len(batch["input_ids"])
    return samples / (time.perf_counter() - started)


def main() -> None:
    import numpy as np
    import pandas as pd
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    from modeling.backbones.common import load_tokenizer
    from modeling.backbones.embedded.pretrain import (
        PretrainSpec,
        _lm_batch,
        number_targets,
        select_pretraining_rows,
        value_token_loss,
        value_vocabulary,
    )
    from modeling.data.parquet_io import read_parquet_metadata
    from modeling.inference import encode_prompts
    from modeling.prompt import PromptBuilder

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=24, help="timed steps of batch 32 per round and loss")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    base = DATA / "models" / "base_model"
    training_set = DATA / "training_set.parquet"
    if not (training_set.exists() and base.is_dir()):
        raise SystemExit(f"{training_set} or {base} is missing: run `make demo` first")
    facts = read_parquet_metadata(training_set)
    builder = PromptBuilder(horizon=int(facts["horizon"]), target=str(facts["label"]["kind"]))
    spec = PretrainSpec()
    train_rows, _ = select_pretraining_rows(pd.read_parquet(training_set), spec)
    tok = load_tokenizer(base)
    ids = encode_prompts(tok, builder.render_batch(train_rows, tok))
    order = np.random.default_rng(0).permutation(len(ids))
    size = spec.batch_size
    batches = [
        _lm_batch(tok, [ids[i] for i in order[s : s + size]]) for s in range(0, size * (args.steps + 1), size)
    ]
    vocabulary = value_vocabulary(tok)
    kept = [
        float(number_targets(b["labels"], vocabulary).sum() / (b["labels"][:, 1:] != -100).sum())
        for b in batches
    ]
    losses = {
        "all": lambda model, batch: model(**batch).loss,
        "values": lambda model, batch: value_token_loss(model, batch, vocabulary),
    }
    config = AutoConfig.from_pretrained(base)
    torch.manual_seed(0)
    models = {name: LlamaForCausalLM(config).to(torch.float32).train() for name in losses}
    rates: dict[str, list[float]] = {name: [] for name in losses}
    for _ in range(args.rounds):
        for name, fn in losses.items():
            rates[name].append(step_rate(models[name], batches, fn))
            print(f"{name}: {rates[name][-1]:.1f} prompts/s")
    m = machine()
    ratios = [v / a for v, a in zip(rates["values"], rates["all"], strict=True)]
    save_json("pretrain_tokens", {"rates": rates, "kept_share": float(np.mean(kept)), "machine": m})
    rows = "\n".join(f"| {name} | {' / '.join(f'{r:.1f}' for r in rates[name])} |" for name in losses)
    write_section(
        "pretrain_tokens",
        f"""## The pretraining step: the loss on every token or on the number tokens (issue 13 demo-time route)

Command: `python bench/bench_pretrain_tokens.py --steps {args.steps} --rounds {args.rounds}` after `make demo`. Machine: {m["cores"]} cores ({m["cpu"]}), fp32. The asset's pretraining prompts (batch {size}, {len(ids[0])}-token first prompt), a fresh model of DATA_DIR's backbone config, {args.steps} timed steps per round and loss (forward, loss, backward, clipping, AdamW), the two interleaved round by round. `values` runs the LM head and its softmax on the positions whose next token is part of a number: {np.mean(kept):.1%} of the predicted tokens.

| loss over | prompts/s, round by round |
|---|---:|
{rows}

`values` / `all`, round by round: {" / ".join(f"{r:.2f}x" for r in ratios)}.
""",
    )


if __name__ == "__main__":
    main()
