"""Benchmark: scoring in this process against forked one-thread workers (`modeling.inference`), the
issue-13 lever for the demo's final comparison (208,590 rows), and whether the forecasts move.

    python bench/bench_scoring_workers.py [--dates 24] [--rounds 4]    # after `make demo` (DATA_DIR)

The demo's champion (the newest model under DATA_DIR/runs/regressor) scores the same tokenised
validation rows through `predict_ids` with `workers=1` (one process, every core as a torch thread) and
`workers=<cores>` (one forked process per core, one thread each), alternating, so the machine's drift
hits both alike. Reported: rows per second of each round, the ratio of the means, and the largest
forecast difference between the two paths.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
from _common import machine, write_section

COMMAND = "python bench/bench_scoring_workers.py"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dates", type=int, default=24, help="evenly spaced validation dates to score")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds of each path")
    args = parser.parse_args()

    from modeling.allocator import tune_malloc

    tune_malloc()  # as in the training process and the pyfunc
    import torch

    from modeling.backbones.common import load_tokenizer
    from modeling.data.corpus import tokenise_rows
    from modeling.evaluation import split_rows
    from modeling.inference import cpu_workers, length_batches, predict_ids
    from modeling.model import load_regressor

    data = Path(os.environ.get("DATA_DIR", "data")).resolve()
    model_dirs = sorted(data.glob("runs/regressor/*/*/model"), key=lambda p: p.stat().st_mtime)
    if not model_dirs:
        raise SystemExit(f"no trained regressor under {data}/runs/regressor: run `make demo` first")
    model_dir = model_dirs[-1]
    info = json.loads((model_dir / "regressor.json").read_text())
    tokenizer = load_tokenizer(info["base_model"]["path"])
    model = load_regressor(model_dir)
    rows = tokenise_rows(split_rows(data / "prompt_corpus.parquet", "validation", args.dates), tokenizer)
    forked = cpu_workers(len(length_batches([len(x) for x in rows.ids], 32)), "cpu")
    if forked < 2:
        raise SystemExit("one core (or too few batches): nothing to compare")
    predict_ids(model, tokenizer, rows.ids[:300], 32, workers=1)  # warm-up
    rates: dict[int, list[float]] = {1: [], forked: []}
    preds: dict[int, np.ndarray] = {}
    for _ in range(args.rounds):
        for workers in (1, forked):
            started = time.perf_counter()
            preds[workers] = predict_ids(model, tokenizer, rows.ids, 32, workers=workers)
            rates[workers].append(len(rows.ids) / (time.perf_counter() - started))
    diff = float(np.abs(preds[forked] - preds[1]).max())
    ratio = float(np.mean(rates[forked]) / np.mean(rates[1]))
    facts = machine()
    one = ", ".join(f"{r:.0f}" for r in rates[1])
    many = ", ".join(f"{r:.0f}" for r in rates[forked])
    write_section(
        "scoring_workers",
        f"""## Scoring on forked workers (issue 13 throughput)

Command: `{COMMAND} --dates {args.dates} --rounds {args.rounds}` after `make demo`. Machine: {facts["cores"]} cores ({facts["cpu"]}), fp32, torch {torch.__version__}. The demo's champion scores {len(rows.ids):,} validation rows ({args.dates} dates) through `modeling.inference.predict_ids`, batches of 32 by length, merged adapters, the last-layer shortcut; the two paths alternate, {args.rounds} rounds each.

| path | rows/s per round | mean |
|---|---|---:|
| this process, {torch.get_num_threads()} torch threads (`workers=1`) | {one} | {np.mean(rates[1]):.0f} |
| {forked} forked processes, one thread each (the default) | {many} | {np.mean(rates[forked]):.0f} |

Forked workers score **{ratio:.2f}x** the rows per second of one process here; the forecasts differ by at most {diff:.1e} (a thread count changes how a matrix product sums, not what it sums).
""",
    )
    print(json.dumps({"rates": rates, "ratio": ratio, "max_abs_diff": diff}))


if __name__ == "__main__":
    main()
