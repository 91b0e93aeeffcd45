"""Benchmark: the legend prompt layout against the inline one, trained and judged the same way (issue 13:
a more compact prompt is a throughput route, and must not cost forecast quality).

    python bench/bench_prompt_layout.py --legend-data DIR [--seeds 3]

DATA_DIR is `make demo`'s data (inline prompts); DIR is a DATA_DIR whose base_model and prompt_corpus
were built from the same training set with `prompt_layout` / `layout` = legend (so its backbone was
pretrained on legend prompts, the same 8,000 rows). For each seed, the cpu profile's recipe on its 24k
rows (the same rows in both: the draw does not depend on the prompt), scored on every validation and
test date: the learning curve's runs (`bench_regressor.curve_run`, shared through its cache). Reported:
each layout's RankIC, its paired difference to ridge on the same rows, legend − inline paired date by
date on the seeds' mean series, per seed, and the training and scoring time.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np
from _common import OUT, machine, write_section
from bench_regressor import _seed_mean, _stat_cell, curve_run

DATA = Path(os.environ.get("DATA_DIR", "data")).resolve()


def _frames(data: Path):
    import pandas as pd

    from modeling.evaluation import split_rows
    from modeling.feature_registry import FEATURE_NAMES

    features = pd.read_parquet(
        data / "training_set.parquet", columns=["date", "symbol", *FEATURE_NAMES, "fwd_ret"]
    ).drop_duplicates(["date", "symbol"])
    corpus = data / "prompt_corpus.parquet"
    frames = {
        s: split_rows(corpus, s, None).merge(features, on=["date", "symbol"], how="left")
        for s in ("validation", "test")
    }
    return features, frames


def main() -> None:
    from modeling.metrics import DailyMean, paired_series_difference
    from modeling.profiles import PROFILES

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--legend-data", required=True, help="a DATA_DIR built with the legend layout")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    size = PROFILES["cpu"].train.max_train_samples
    epochs = PROFILES["cpu"].train.epochs
    runs = {}
    for layout, data in (("inline", DATA), ("legend", Path(args.legend_data).resolve())):
        features, frames = _frames(data)
        base, corpus = data / "models" / "base_model", data / "prompt_corpus.parquet"
        runs[layout] = [
            curve_run(base, corpus, features, frames, size, seed, OUT / "curve", epochs=epochs)
            for seed in range(args.seeds)
        ]
    lines = []
    for layout, records in runs.items():
        cells = []
        for split in ("validation", "test"):
            llm = _seed_mean(records, split, "prediction")
            per_seed = [DailyMean.of(_seed_mean([r], split, "prediction")).mean for r in records]
            sd = f" (sd {np.std(per_seed, ddof=1):.4f})" if len(per_seed) > 1 else ""
            cells += [f"{_stat_cell(DailyMean.of(llm))}{sd}"]
            cells += [str(paired_series_difference(llm, _seed_mean(records, split, "ridge")))]
        train_s = np.mean([r["train_s"] for r in records])
        rate = np.mean([r["score_rows_per_s"]["validation"] for r in records])
        lines.append(f"| {layout} | {' | '.join(cells)} | {train_s:.0f} | {rate:.0f} |")
    cells = [
        str(
            paired_series_difference(
                _seed_mean(runs["legend"], split, "prediction"),
                _seed_mean(runs["inline"], split, "prediction"),
            )
        )
        for split in ("validation", "test")
    ]
    lines.append(f"| **legend − inline** (paired by date, seed means) | {cells[0]} | | {cells[1]} | | | |")
    per_seed = []
    for legend, inline in zip(runs["legend"], runs["inline"], strict=True):
        diffs = [
            paired_series_difference(
                _seed_mean([legend], s, "prediction"), _seed_mean([inline], s, "prediction")
            )
            for s in ("validation", "test")
        ]
        per_seed.append(f"seed {legend['seed']}: {diffs[0].delta:+.4f} / {diffs[1].delta:+.4f}")
    facts = machine()
    write_section(
        "prompt_layout",
        f"""## The legend prompt layout against the inline one (issue 13)

Command: `python bench/bench_prompt_layout.py --legend-data DIR --seeds {args.seeds}` after `make demo` (DATA_DIR) and a DATA_DIR built from the same training set with `base_model.prompt_layout` and `prompt_corpus.layout` = legend. Machine: {facts["cores"]} cores ({facts["cpu"]}). The cpu profile ({size:,} rows drawn per date, {epochs} passes, the per-date IC loss), seeds 0..{args.seeds - 1}, the same rows in both layouts, each on a backbone pretrained on its own layout; every validation and test date. Cells: mean daily RankIC ± Newey-West SE (dates) of the seeds' date-by-date mean; "− ridge" is the paired difference to ridge on the same rows (identical for both layouts). Legend batches take the shared-prefix forward (training and scoring), inline ones the plain forward.

| layout | validation | − ridge, validation | test | − ridge, test | training s (mean) | validation scoring rows/s |
|---|---:|---:|---:|---:|---:|---:|
{chr(10).join(lines)}

Per seed, legend − inline (validation / test): {"; ".join(per_seed)}.
""",
    )
    print("\n".join(lines))
    print("; ".join(per_seed))


if __name__ == "__main__":
    main()
