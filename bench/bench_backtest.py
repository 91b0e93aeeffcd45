"""Benchmark: the walk-forward backtest (`backtest` asset) on the default market, every window and model.

    python bench/bench_backtest.py                    # cpu profile, on bench/out/demo_data (make demo's)
    python bench/bench_backtest.py --profile gpu      # the same command on a GPU machine: every train row

It materialises `backtest` in-process on a DATA_DIR that `make demo` (or `bench/bench_demo.py`) filled,
after the upstream assets; each window trains in its own process as in production. The comparison table
(model x RankIC, RankICIR, paired ΔRankIC vs ridge, annualized excess return with cost, IR, max drawdown,
turnover) and the time per window go to BENCHMARKS.md. The run's forecasts stay in the warehouse under
the run id: a second call with the same inputs recomputes nothing (and reports the stored windows' times).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from _common import OUT, machine, save_json, write_section

COMMAND = "python bench/bench_backtest.py"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", default=str(OUT / "demo_data"))
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--step", type=int, default=None, help="dates per window (None: the asset's default)")
    args = parser.parse_args()
    data = Path(args.data_dir).resolve()
    if not (data / "prompt_corpus.parquet").is_file():
        raise SystemExit(f"{data} has no prompt corpus: run `python bench/bench_demo.py` (make demo) first")
    os.environ["DATA_DIR"] = str(data)
    from dagster import AssetKey, DagsterInstance, materialize

    from pipeline.assets import ALL_ASSETS
    from pipeline.resources import build_resources
    from pipeline.settings import Settings

    backtest = next(a for a in ALL_ASSETS if a.key == AssetKey("backtest"))
    config = {"profile": args.profile, **({"step": args.step} if args.step else {})}
    started = time.perf_counter()
    result = materialize(
        [backtest],
        resources=build_resources(Settings.from_env()),
        run_config={"ops": {"backtest": {"config": config}}},
        instance=DagsterInstance.ephemeral(),
    )
    wall = time.perf_counter() - started
    meta = {
        k: v.value for k, v in result.get_asset_materialization_events()[0].materialization.metadata.items()
    }
    facts = machine()
    save_json(
        "backtest",
        {
            "wall_s": wall,
            "config": config,
            "machine": facts,
            **{
                k: meta[k]
                for k in (
                    "run_id",
                    "windows_trained",
                    "windows_reused",
                    "comparison",
                    "windows",
                    "llm_vs_baselines",
                    "date_range",
                    "backbone",
                    "mlflow_run_id",
                )
            },
        },
    )
    trained = meta["windows_trained"]
    timing = (
        f"This call trained {len(trained)} window(s) in {wall / 60:.1f} minutes (wall, the whole asset)."
        if trained
        else f"Every window was stored by an earlier call of the same run ({wall:.0f} s to re-analyse)."
    )
    write_section(
        f"backtest_{args.profile}",
        f"""## Walk-forward backtest, `{args.profile}` profile (issue 16)

Command: `{COMMAND}{" --profile " + args.profile if args.profile != "cpu" else ""}` after `make demo`. Machine: {facts["cores"]} cores ({facts["cpu"]}). Period {meta["date_range"]} (the test split), expanding windows of {config.get("step", 60)} dates, each purged by the horizon with the {20} dates before the purge for early stopping; every model trained per window on the same sampled rows, targets and weights ({args.profile} profile). {meta["backbone"]}. Portfolios: TopkDropout topk 50, n_drop 5, open 5 bp, close 15 bp, benchmark = the equal-weighted universe. RankIC and ICs on every date of the period; Δ vs ridge is the paired daily difference ± its standard error (Newey-West for h > 1), t beside it. Run id `{meta["run_id"]}`, MLflow run `{meta["mlflow_run_id"]}`.

{meta["comparison"]}

Per window (seconds; scoring = the LLM's out-of-sample forecasts through the fast inference path):

{meta["windows"]}

{timing}
""",
    )
    print(meta["comparison"])
    print(meta["windows"])
    print(json.dumps({"wall_s": round(wall, 1), "windows_trained": trained}))


if __name__ == "__main__":
    main()
