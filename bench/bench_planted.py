"""Benchmark: how well the LLM regressor reads a planted signal out of its prompt (issue 16).

    python bench/bench_planted.py                             # the slow test's size and larger ones
    python bench/bench_planted.py --configs 200x128x3000x1e-3 # symbols x width x steps [x peak lr]
    python bench/bench_planted.py --configs 40x64x400 --aux-weight 0   # a route: prints its row only

The market is the slow test's (`tests/conftest.py::planted_prompt_market`): 100 dates, every feature noise
except `ret_5d`, and the label *is* `ret_5d` / 0.02, a number the prompt shows with 3 significant
digits. The last 40 dates are forecast out of sample in two walk-forward windows of 20 dates, through
the backtest's real path (window corpus -> `TrainJob` -> `train_regressor` -> `run_window`), with the
profiles' recipe (rank-gaussian targets, the feature probe) on a freshly initialised 2-layer embedded
Llama of the given width (no pretraining). The feature baselines are handed the number itself. The
table goes to BENCHMARKS.md: out-of-sample RankIC ± SE per model and the LLM's TopkDropout excess
return after cost, per configuration.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _common import machine, write_section

COMMAND = "python bench/bench_planted.py"
DEFAULT_CONFIGS = "40x64x400,200x64x2000x1e-3,200x128x1500,200x128x3000x1e-3"
"""The slow test's first configuration (40 names, width 64, 400 steps, lr 3e-3), the slow test's now (5x
the names, 2,000 steps at lr 1e-3), and a 128-wide backbone at 1,500 steps (lr 3e-3) and at 3,000 (lr
1e-3, the one that reads the number nearest 1)."""
DEFAULT_LR = 3e-3
"""The slow test's peak learning rate, for a configuration that names none."""


def run_config(
    n_symbols: int, hidden: int, steps: int, root: Path, lr: float = DEFAULT_LR, aux_weight: float = 1.0
) -> dict:
    """Train and forecast the two windows of one configuration; returns its analysis and timings."""
    from modeling.backtest import analyse
    from modeling.walk_forward import FEATURE_BASELINES, LLM_MODEL
    from tests.conftest import build_tiny_backbone, planted_prompt_market, planted_walk_forward

    base = build_tiny_backbone(root / "base_model", hidden_size=hidden)  # the slow test's, `hidden` wide
    frame = planted_prompt_market(n_symbols=n_symbols)
    run = planted_walk_forward(base, frame, root, steps, lr, aux_weight)
    models = [LLM_MODEL, *FEATURE_BASELINES]
    returns = frame[["date", "symbol"]].assign(ret=frame["fwd_ret"])
    analysis = analyse(run["oos"], frame[["date", "symbol", "label"]], returns, models, ["ridge"])
    return {"analysis": analysis, "models": models, "train_s": run["train_s"], "n_train": run["n_train"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--configs", default=DEFAULT_CONFIGS, help="comma-separated SYMBOLSxWIDTHxSTEPS[xLR] configurations"
    )
    parser.add_argument(
        "--aux-weight", type=float, default=1.0, help="weight of the feature probe (the profiles' 1.0)"
    )
    args = parser.parse_args()
    route = args.aux_weight != 1.0
    lines = [
        "| names | width | steps | peak lr | train rows (largest window) | LLM RankIC | ridge | LightGBM | feature MLP | "
        "LLM − ridge | LLM TopkDropout excess after cost (ann.) | LLM train s (both windows) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for config in args.configs.split(","):
        n_symbols, hidden, steps, *rest = config.lower().split("x")
        n_symbols, hidden, steps, lr = int(n_symbols), int(hidden), int(steps), float(*rest or [DEFAULT_LR])
        print(f"planted: {n_symbols} names, width {hidden}, {steps} steps, lr {lr:g}", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            run = run_config(n_symbols, hidden, steps, Path(tmp), lr, args.aux_weight)
        signal, portfolio = run["analysis"].signal, run["analysis"].portfolio
        cells = [f"{signal.loc[m, 'RankIC']:.3f} ± {signal.loc[m, 'RankIC_se']:.3f}" for m in run["models"]]
        llm = run["models"][0]
        d = run["analysis"].paired[llm]["ridge"]
        delta = f"Δ {d['delta']:+.3f} ± {d['se']:.3f} (t {d['t']:.1f})"
        excess = portfolio[llm]["excess_return_with_cost.annualized_return"]
        lines.append(
            f"| {n_symbols} | {hidden} | {steps} | {lr:g} | {run['n_train']:,} | {' | '.join(cells)} | {delta} | "
            f"{excess:.1%} | {run['train_s']:.0f} |"
        )
        print(lines[-1], flush=True)
    if route:  # a route off the profiles' probe weight: print its rows, keep the table of the defaults
        print(f"--aux-weight {args.aux_weight}: BENCHMARKS.md left as it is")
        return
    write_section(
        "planted_llm",
        f"""## The LLM reading a planted signal (issue 16)

Command: `{COMMAND}{"" if args.configs == DEFAULT_CONFIGS else f" --configs {args.configs}"}`. Machine: {machine()["cores"]} cores ({machine()["cpu"]}). The slow test's market (100 dates; the label *is* `ret_5d` / 0.02, a number the prompt shows with 3 significant digits; every other feature is noise) with the given number of names; the last 40 dates forecast out of sample in two walk-forward windows of 20 dates through the backtest's path, the profiles' recipe (rank-gaussian targets, the feature probe, LoRA r=8, batch 16, the peak lr of the row) on a fresh, unpretrained 2-layer embedded Llama of the given width. The baselines are handed the number. RankIC ± SE over the 40 dates; "LLM − ridge" is the paired daily difference.

{chr(10).join(lines)}
""",
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
