"""Benchmark: scoring throughput in fp32 against bf16 autocast and against int8 dynamic quantisation of
the Linear layers on the CPU (routes for issue 13's target of scoring at 3x the training rate), and what
each does to the forecasts.

    python bench/bench_scoring_precision.py                # after `make demo`: its model, 12 validation dates
    python bench/bench_scoring_precision.py --dates 30 --section scoring_int8

The demo's trained regressor (the newest under DATA_DIR/runs, else under bench/out/demo_data) scores the
same tokenised validation rows through `modeling.inference` (length-grouped batches of 32, no gradient,
merged adapters, the last-layer shortcut) twice in each precision, alternating, so the machine's drift hits
all alike. Reported: rows per second, the largest absolute forecast difference to fp32, the correlation,
the RankIC of each on the same rows and the paired daily RankIC difference to fp32.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import numpy as np
from _common import OUT, ROOT, machine, write_section

COMMAND = "python bench/bench_scoring_precision.py"


NOTES = {
    "bf16": """Not the default: bf16 needs a CPU with native bf16 (AVX512-BF16 / AMX; elsewhere it is emulated and
slower), and the gate's check that the registered pyfunc reproduces the judged forecasts (to 1e-4) would
have to allow bf16's batch-shape differences.""",
    "int8": """int8 is `torch.ao.quantization.quantize_dynamic` on every `nn.Linear` (weights int8 per tensor,
activations quantised per batch), which torch marks deprecated in favour of torchao. Not the default: the
forecasts are no longer the trained model's (see the correlation), the gate's check that the registered
pyfunc reproduces the judged forecasts (to 1e-4) would fail, and an 8B backbone on a GPU takes none of it.""",
}


def _data_dir() -> Path:
    """Where `make demo` wrote its model: DATA_DIR (default ./data), else bench_demo's copy."""
    data = Path(os.environ.get("DATA_DIR", ROOT / "data"))
    return data if any(data.glob("runs/regressor/*/*/model")) else OUT / "demo_data"


def _scorer(model, mode: str):
    """(model, context factory) that scores in `mode`."""
    import contextlib

    import torch

    if mode == "bf16":
        return model, lambda: torch.autocast("cpu", dtype=torch.bfloat16)
    if mode == "int8":
        quantised = torch.ao.quantization.quantize_dynamic(
            copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8
        )
        return quantised, contextlib.nullcontext
    return model, contextlib.nullcontext


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dates", type=int, default=12, help="evenly spaced validation dates")
    parser.add_argument("--modes", default="fp32,bf16", help="fp32 first, then any of bf16, int8")
    parser.add_argument("--section", default="scoring_precision", help="the BENCHMARKS.md section")
    args = parser.parse_args()
    modes = args.modes.split(",")
    if modes[0] != "fp32" or not set(modes) <= {"fp32", "bf16", "int8"}:
        raise SystemExit("--modes: fp32 first, then any of bf16, int8")

    import torch

    from modeling.backbones.common import load_tokenizer
    from modeling.data.corpus import tokenise_rows
    from modeling.evaluation import split_rows
    from modeling.inference import predict_ids
    from modeling.metrics import paired_difference, rank_ic_stats
    from modeling.model import load_regressor

    data = _data_dir()
    model_dir = sorted(data.glob("runs/regressor/*/*/model"), key=lambda p: p.stat().st_mtime)[-1]
    info = json.loads((model_dir / "regressor.json").read_text())
    tokenizer = load_tokenizer(info["base_model"]["path"])
    model = load_regressor(model_dir)
    rows = tokenise_rows(split_rows(data / "prompt_corpus.parquet", "validation", args.dates), tokenizer)
    scorers = {mode: _scorer(model, mode) for mode in modes}
    predict_ids(model, tokenizer, rows.ids[:300], 32)  # warm-up
    rates: dict[str, list[float]] = {m: [] for m in modes}
    preds: dict[str, np.ndarray] = {}
    for mode in modes * 2:
        net, context = scorers[mode]
        started = time.perf_counter()
        with context():
            preds[mode] = predict_ids(net, tokenizer, rows.ids, 32)
        rates[mode].append(len(rows.ids) / (time.perf_counter() - started))
    frame = rows.frame.assign(label=rows.label, **preds)
    ric = {m: rank_ic_stats(frame, m) for m in modes}
    facts = machine()
    train_rate = json.loads((model_dir.parent / "train_report.json").read_text())["samples_per_s"]
    lines, notes = [], []
    for mode in modes:
        diff = float(np.abs(preds[mode] - preds["fp32"]).max())
        corr = float(np.corrcoef(preds[mode], preds["fp32"])[0, 1])
        paired = "" if mode == "fp32" else str(paired_difference(frame, mode, "fp32"))
        lines.append(
            f"| {mode} | {rates[mode][0]:.0f}, {rates[mode][1]:.0f} | "
            f"{np.mean(rates[mode]) / np.mean(rates['fp32']):.2f}x | {np.mean(rates[mode]) / train_rate:.1f}x "
            f"| {ric[mode].mean:.5f} ± {ric[mode].se:.5f} | {paired} | {diff:.4f} | {corr:.6f} |"
        )
        if mode in NOTES:
            notes.append(NOTES[mode])
    table = "\n".join(lines)
    # the command as it ran: every flag that is not at its default
    flags = "".join(
        f" --{name} {getattr(args, name)}"
        for name in ("dates", "modes", "section")
        if getattr(args, name) != parser.get_default(name)
    )
    write_section(
        args.section,
        f"""## Scoring in {", ".join(modes[1:])} on the CPU (issue 13 route)

Command: `{COMMAND}{flags}` after `make demo`. Machine: {facts["cores"]} cores ({facts["cpu"]}, torch CPU capability
{torch.backends.cpu.get_cpu_capability()}). The demo's model scores {len(rows.ids):,} validation rows ({ric["fp32"].n_dates} dates) through `modeling.inference`, batches of 32, the modes alternating. "x training":
against the {train_rate:.0f} samples/s of the run that trained this model (its train loop).

| mode | rows/s (two runs) | x fp32 | x training | RankIC ± SE | − fp32, paired by date | max abs diff to fp32 | corr with fp32 |
|---|---:|---:|---:|---:|---:|---:|---:|
{table}

{chr(10).join(notes)}
""",
    )
    print(json.dumps({"rates": rates, "rank_ic": {m: r.mean for m, r in ric.items()}}))


if __name__ == "__main__":
    main()
