"""Benchmark: the shared-prefix forward (`modeling.shared_prefix`) against the plain one, on the inline
prompt and on the legend layout (issue 13: throughput is what buys the demo time and the final
comparison's dates).

    python bench/bench_shared_prefix.py --legend-data DIR     # after `make demo` (DATA_DIR) and a DATA_DIR
                                                              # whose base_model and prompt_corpus were
                                                              # built with the legend layout

Every (prompt, forward) pair runs on the same batches in alternating rounds, so the machine's drift hits
all alike:
- training: forward + backward + AdamW steps of the cpu profile's model on each DATA_DIR's backbone
  (batch 32, length-grouped real train prompts);
- scoring: a regressor trained on each DATA_DIR's prompts (the newest under its `runs/regressor` or
  `--*-model`) on the same validation rows through `predict_ids`, with the largest forecast difference
  between the two forwards.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from _common import machine, save_json, write_section

DATA = Path(os.environ.get("DATA_DIR", "data")).resolve()
FORWARDS = {"plain": 2.0, "shared prefix": 0.0}
"""Each forward's `MIN_SHARED_FRACTION` and `SCORING_MIN_SHARED_FRACTION`: no prefix reaches twice the
batch's width (plain); any prefix of `MIN_SHARED_PREFIX` tokens or more is shared, whatever its share."""
FRACTIONS = ("MIN_SHARED_FRACTION", "SCORING_MIN_SHARED_FRACTION")


@contextmanager
def _forward(name: str):
    """Both fractions (training's, scoring's) set for one forward, the module's own restored afterwards."""
    import modeling.shared_prefix as shared_prefix

    defaults = {f: getattr(shared_prefix, f) for f in FRACTIONS}
    for f in FRACTIONS:
        setattr(shared_prefix, f, FORWARDS[name])
    try:
        yield
    finally:
        for f, value in defaults.items():
            setattr(shared_prefix, f, value)


def _prefix_stats(batches) -> tuple[float, float, float]:
    """(mean tokens per row, mean shared prefix per batch, share of batches the default thresholds send
    to the shared-prefix forward) of padded batches."""
    from modeling.shared_prefix import shared_prefix_length

    tokens = np.mean([float(b["attention_mask"].sum(dim=1).float().mean()) for b in batches])
    shared = [shared_prefix_length(b["input_ids"], b["attention_mask"], min_fraction=0) for b in batches]
    taken = [
        shared_prefix_length(b["input_ids"], b["attention_mask"]) > 0  # the module's thresholds
        for b in batches
    ]
    return float(tokens), float(np.mean(shared)), float(np.mean(taken))


def _train_batches(data: Path, n_rows: int):
    from modeling.backbones.common import load_tokenizer
    from modeling.data.corpus import read_corpus_split, sample_rows, tokenise_rows
    from modeling.inference import length_batches, pad_batch

    tok = load_tokenizer(data / "models" / "base_model")
    rows = tokenise_rows(
        sample_rows(read_corpus_split(data / "prompt_corpus.parquet", "train"), n_rows, 0), tok
    )
    batches = [pad_batch(tok, [rows.ids[i] for i in b]) for b in length_batches(rows.n_tokens, 32)]
    return [b for b in batches if b["input_ids"].shape[0] == 32]


def bench_training(datas: dict[str, Path], n_rows: int, steps: int, rounds: int) -> dict:
    import torch

    from modeling.model import build_regressor
    from modeling.profiles import PROFILES

    setups = {}
    for prompt, data in datas.items():
        torch.manual_seed(0)
        model = build_regressor(data / "models" / "base_model", PROFILES["cpu"].regressor).train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        setups[prompt] = (model, optimizer, _train_batches(data, n_rows))

    def run(prompt: str, first: int) -> float:
        model, optimizer, batches = setups[prompt]
        chosen = [batches[(first + i) % len(batches)] for i in range(steps)]
        started = time.perf_counter()
        for batch in chosen:
            model(batch["input_ids"], batch["attention_mask"]).pow(2).mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return 32 * steps / (time.perf_counter() - started)

    for prompt in setups:  # warm-up
        run(prompt, 0)
    rates: dict = {p: {f: [] for f in FORWARDS} for p in setups}
    for r in range(rounds):
        for prompt in setups:
            for forward in FORWARDS:
                with _forward(forward):
                    rates[prompt][forward].append(run(prompt, 4 + r * steps))
    stats = {p: _prefix_stats(setups[p][2]) for p in setups}
    return {"rates": rates, "stats": stats}


def _newest_model(data: Path) -> Path:
    found = sorted(data.glob("runs/regressor/*/*/model"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit(f"no trained regressor under {data}/runs/regressor: pass its --*-model")
    return found[-1]


def bench_scoring(datas: dict[str, Path], models: dict[str, Path], n_dates: int, rounds: int) -> dict:
    from modeling.backbones.common import load_tokenizer
    from modeling.data.corpus import tokenise_rows
    from modeling.evaluation import split_rows
    from modeling.inference import length_batches, pad_batch, predict_ids
    from modeling.model import load_regressor

    setups = {}
    for prompt, data in datas.items():
        tok = load_tokenizer(data / "models" / "base_model")
        rows = tokenise_rows(split_rows(data / "prompt_corpus.parquet", "validation", n_dates), tok)
        setups[prompt] = (load_regressor(models[prompt]), tok, rows.ids)
        predict_ids(setups[prompt][0], tok, rows.ids[:300])  # warm-up
    rates: dict = {p: {f: [] for f in FORWARDS} for p in setups}
    preds: dict = {}
    for _ in range(rounds):
        for prompt, (model, tok, ids) in setups.items():
            for forward in FORWARDS:
                with _forward(forward):
                    started = time.perf_counter()
                    preds[(prompt, forward)] = predict_ids(model, tok, ids)
                    rates[prompt][forward].append(len(ids) / (time.perf_counter() - started))
    diff = {p: float(np.abs(preds[(p, "shared prefix")] - preds[(p, "plain")]).max()) for p in setups}
    stats = {
        p: _prefix_stats(
            [pad_batch(tok, [ids[i] for i in b]) for b in length_batches([len(x) for x in ids], 32)]
        )
        for p, (_, tok, ids) in setups.items()
    }
    rows = {p: len(ids) for p, (_, _, ids) in setups.items()}
    return {"rates": rates, "stats": stats, "max_abs_diff": diff, "rows": rows}


def _table(result: dict) -> list[str]:
    ref = np.mean(result["rates"]["inline"]["plain"])
    lines = []
    for prompt, forward in ((p, f) for p in result["rates"] for f in FORWARDS):
        runs = result["rates"][prompt][forward]
        tokens, shared, _ = result["stats"][prompt]
        lines.append(
            f"| {prompt} | {forward} | {tokens:.0f} | {shared:.0f} | {np.mean(runs):.0f} | "
            f"{np.mean(runs) / ref:.2f} | {', '.join(f'{r:.0f}' for r in runs)} |"
        )
    return lines


def _default_paths(stats: dict) -> str:
    """Which forward each prompt's batches take under the module's thresholds."""

    def path(taken: float) -> str:
        if taken in (0.0, 1.0):
            return "the shared-prefix forward" if taken else "the plain forward"
        return f"the shared-prefix forward in {taken:.0%} of their batches"

    return "; ".join(f"{prompt} prompts take {path(stat[2])}" for prompt, stat in stats.items())


def main() -> None:
    import modeling.shared_prefix as shared_prefix

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--legend-data", required=True, help="a DATA_DIR built with the legend layout")
    parser.add_argument("--inline-model", default="", help="a regressor trained on DATA_DIR's prompts")
    parser.add_argument("--legend-model", default="", help="a regressor trained on the legend prompts")
    parser.add_argument("--rows", type=int, default=4000, help="train rows the training steps draw from")
    parser.add_argument("--steps", type=int, default=30, help="training steps per setting and round")
    parser.add_argument("--eval-dates", type=int, default=12, help="validation dates scored per setting")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    datas = {"inline": DATA, "legend": Path(args.legend_data).resolve()}
    models = {
        "inline": Path(args.inline_model) if args.inline_model else _newest_model(DATA),
        "legend": Path(args.legend_model) if args.legend_model else _newest_model(datas["legend"]),
    }
    default = shared_prefix.MIN_SHARED_FRACTION
    train = bench_training(datas, args.rows, args.steps, args.rounds)
    score = bench_scoring(datas, models, args.eval_dates, args.rounds)
    save_json(
        "shared_prefix",
        {"training": train, "scoring": score},
    )
    facts = machine()
    header = (
        "| prompt | forward | tokens per row | shared prefix (tokens, batch mean) | rows/s | "
        "× inline plain | runs |\n|---|---|---:|---:|---:|---:|---|"
    )
    write_section(
        "shared_prefix",
        f"""## The shared-prefix forward and the legend prompt (issue 13 throughput)

Command: `python bench/bench_shared_prefix.py --legend-data DIR --rows {args.rows} --steps {args.steps} --eval-dates {args.eval_dates} --rounds {args.rounds}` after `make demo` (DATA_DIR) and a DATA_DIR whose base_model and prompt_corpus were built with `prompt_layout` / `layout` = legend. Machine: {facts["cores"]} cores ({facts["cpu"]}), fp32. Every setting on the same batches of 32, alternating, {args.rounds} rounds.

Training steps (forward + backward + AdamW of the cpu profile's model, {args.steps} steps per round):

{header}
{chr(10).join(_table(train))}

Scoring ({score["rows"]["inline"]:,} validation rows, {args.eval_dates} dates, `predict_ids`: merged adapters, the last-layer shortcut):

{header}
{chr(10).join(_table(score))}

The two forwards' forecasts differ by at most {score["max_abs_diff"]["inline"]:.1e} (inline) and {score["max_abs_diff"]["legend"]:.1e} (legend).
By default (`MIN_SHARED_PREFIX` = {shared_prefix.MIN_SHARED_PREFIX} tokens, `MIN_SHARED_FRACTION` = {default}) in training {_default_paths(train["stats"])}; scoring (`SCORING_MIN_SHARED_FRACTION` = {shared_prefix.SCORING_MIN_SHARED_FRACTION}) shares any prefix of that many tokens.
""",
    )
    print(json.dumps({"training": train, "scoring": score}, indent=1, default=str))


if __name__ == "__main__":
    main()
