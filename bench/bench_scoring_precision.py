"""Benchmark: scoring throughput in fp32 against bf16 autocast on the CPU (a route for issue 13's target of
scoring at 3x the training rate), and what bf16 does to the forecasts.

    python bench/bench_scoring_precision.py     # after `make demo` (the demo's champion, 12 validation dates)

The demo's trained regressor scores the same tokenised validation rows through `modeling.inference`
(length-grouped batches of 32, no gradient, merged adapters, the last-layer shortcut) twice in each
precision, alternating, so the machine's drift hits both alike. Reported: rows per second, the largest
absolute forecast difference, their correlation and the RankIC of each on the same rows.
"""

from __future__ import annotations

import json
import time

import numpy as np
from _common import OUT, machine, write_section

COMMAND = "python bench/bench_scoring_precision.py"


def main() -> None:
    import torch

    from modeling.backbones.common import load_tokenizer
    from modeling.data.corpus import tokenise_rows
    from modeling.evaluation import split_rows
    from modeling.inference import predict_ids
    from modeling.metrics import rank_ic
    from modeling.model import load_regressor

    data = OUT / "demo_data"
    model_dir = sorted(data.glob("runs/regressor/*/*/model"))[-1]
    info = json.loads((model_dir / "regressor.json").read_text())
    tokenizer = load_tokenizer(info["base_model"]["path"])
    model = load_regressor(model_dir)
    rows = tokenise_rows(split_rows(data / "prompt_corpus.parquet", "validation", 12), tokenizer)
    predict_ids(model, tokenizer, rows.ids[:300], 32)  # warm-up
    rates: dict[str, list[float]] = {"fp32": [], "bf16": []}
    preds: dict[str, np.ndarray] = {}
    for mode in ("fp32", "bf16", "fp32", "bf16"):
        context = torch.autocast("cpu", dtype=torch.bfloat16) if mode == "bf16" else torch.no_grad()
        started = time.perf_counter()
        with context:
            preds[mode] = predict_ids(model, tokenizer, rows.ids, 32)
        rates[mode].append(len(rows.ids) / (time.perf_counter() - started))
    ric = {m: rank_ic(rows.frame.assign(prediction=p, label=rows.label)) for m, p in preds.items()}
    diff = float(np.abs(preds["bf16"] - preds["fp32"]).max())
    corr = float(np.corrcoef(preds["bf16"], preds["fp32"])[0, 1])
    facts = machine()
    speed = np.mean(rates["bf16"]) / np.mean(rates["fp32"])
    # the training rate of the run that trained this model (its train loop, periodic evaluations excluded)
    train_rate = json.loads((model_dir.parent / "train_report.json").read_text())["samples_per_s"]
    write_section(
        "scoring_precision",
        f"""## Scoring in bf16 on the CPU (issue 13 route)

Command: `{COMMAND}` after `make demo`. Machine: {facts["cores"]} cores ({facts["cpu"]}, torch CPU capability
{torch.backends.cpu.get_cpu_capability()}). The demo's champion scores {len(rows.ids):,} validation rows (12 dates) through
`modeling.inference`, batches of 32, alternating precisions.

| precision | rows/s (two runs) | RankIC on these rows |
|---|---:|---:|
| fp32 (the default) | {rates["fp32"][0]:.0f}, {rates["fp32"][1]:.0f} | {ric["fp32"]:.5f} |
| bf16 autocast | {rates["bf16"][0]:.0f}, {rates["bf16"][1]:.0f} | {ric["bf16"]:.5f} |

bf16 scores {speed:.2f}x faster here; forecasts differ by at most {diff:.4f} (forecast units) and correlate
{corr:.6f} with fp32. With training at {train_rate:.0f} samples/s (this model's run) this would put scoring at
{np.mean(rates["bf16"]) / train_rate:.1f}x training, against {np.mean(rates["fp32"]) / train_rate:.1f}x in fp32. Not the default: it needs a
CPU with native bf16 (AVX512-BF16 / AMX; elsewhere bf16 is emulated and slower), and the gate's check that
the registered pyfunc reproduces the judged forecasts (to 1e-4) would have to allow bf16's batch-shape
differences.
""",
    )
    print(json.dumps({"rates": rates, "rank_ic": ric, "max_abs_diff": diff, "corr": corr}))


if __name__ == "__main__":
    main()
