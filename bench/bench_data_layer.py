"""Benchmark: raw_market_data -> universe -> features, DuckDB path vs the pandas reference of the tests.

Workloads: synthetic markets of N symbols x Y years, every symbol listed all the time so that the
row count is exactly N x 252 Y (500 x 10 = 1.26M rows, 3000 x 10 = 7.56M rows). The market is
written once to Parquet (the realistic input of `raw_market_data`); each path then runs in a fresh
process so that its peak RSS is its own.

    python bench/bench_data_layer.py                      # both workloads, updates BENCHMARKS.md
    python bench/bench_data_layer.py --workloads 500x10   # one workload
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from _common import OUT, machine, peak_rss_gib, save_json, write_section

COMMAND = "python bench/bench_data_layer.py"


def _market_path(n_symbols: int, years: float) -> Path:
    return OUT / f"market_{n_symbols}x{years:g}y.parquet"


def stage_generate(n_symbols: int, years: float) -> dict:
    from modeling.data.synthetic import SyntheticMarketConfig, generate_synthetic_market

    start = time.perf_counter()
    market = generate_synthetic_market(
        SyntheticMarketConfig(
            n_symbols=n_symbols, n_years=years, seed=7, late_listing_share=0.0, delisting_share=0.0
        )
    )
    seconds = time.perf_counter() - start
    path = _market_path(n_symbols, years)
    path.parent.mkdir(parents=True, exist_ok=True)
    market.frame.to_parquet(path)
    return {
        "rows": len(market.frame),
        "generate_s": seconds,
        "oracle_ic_universe": market.oracle["oracle_ic_universe"],
    }


def _timed_stages(stages: list[tuple[str, object]], rows_in: int) -> dict:
    """Run (name, fn) in order; fn returns its output row count. Wall time and peak RSS per stage."""
    out: dict = {}
    for name, fn in stages:
        start = time.perf_counter()
        rows_out = fn()
        out[name] = {
            "s": time.perf_counter() - start,
            "rows_in": rows_in,
            "rows_out": int(rows_out),
            "peak_rss_gib": peak_rss_gib(),
        }
    return out


def stage_duckdb(path: Path, threads: int | None = None) -> dict:
    """ingest -> universe -> features into an on-disk warehouse, as the assets do.

    `threads` caps DuckDB's worker threads (default: one per core), for the per-core comparison.
    """
    import duckdb

    from modeling.data.features import LabelSpec, build_features
    from modeling.data.ingest import ingest_market_data
    from modeling.data.universe import UniverseSpec, build_universe

    db = OUT / "bench_warehouse.duckdb"
    db.unlink(missing_ok=True)
    con = duckdb.connect(str(db), config={"threads": threads} if threads else {})
    out = _timed_stages(
        [
            ("ingest", lambda: ingest_market_data(con, sources=[path]).n_accepted),
            ("universe", lambda: build_universe(con, UniverseSpec())),
            ("features", lambda: build_features(con, LabelSpec())),
        ],
        rows_in=pq_rows(path),
    )
    con.close()
    db.unlink(missing_ok=True)
    return out


def stage_pandas(path: Path) -> dict:
    """The reference implementation of the tests (in memory, nothing persisted)."""
    import pandas as pd

    from tests.pandas_reference import reference_features, reference_universe

    frames: dict = {}

    def read() -> int:
        frames["raw"] = pd.read_parquet(path)
        return len(frames["raw"])

    def universe() -> int:
        frames["universe"] = reference_universe(frames["raw"])
        return len(frames["universe"])

    return _timed_stages(
        [
            ("read", read),
            ("universe", universe),
            ("features", lambda: len(reference_features(frames["raw"], frames["universe"]))),
        ],
        rows_in=pq_rows(path),
    )


def pq_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.read_metadata(path).num_rows


def _in_subprocess(*args: str) -> dict:
    result = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"bench stage {args} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _markdown(results: dict) -> str:
    lines = [
        "## Data layer: ingest -> universe -> features (issue 2)",
        "",
        f"Command: `{COMMAND}`. Machine: {results['machine']['cores']} cores ({results['machine']['cpu']}), "
        f"{results['machine']['memory']}. DuckDB uses all cores; input is one Parquet file of a synthetic "
        "market with every symbol listed the whole period. Peak RSS is the process peak after the stage "
        "(each path runs in a fresh process). rows/s = input rows / wall time. DuckDB times include writing "
        "each table to the on-disk warehouse; the pandas reference keeps its frames in memory.",
        "",
        "| workload | rows | path | ingest s | universe s | features s | total s | rows/s (total) | peak RSS GiB |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for w in results["workloads"]:
        d, p = w["duckdb"], w.get("pandas")
        total = d["ingest"]["s"] + d["universe"]["s"] + d["features"]["s"]
        lines.append(
            f"| {w['name']} | {w['rows']:,} | DuckDB | {d['ingest']['s']:.2f} | {d['universe']['s']:.2f} | "
            f"{d['features']['s']:.2f} | {total:.2f} | {w['rows'] / total:,.0f} | "
            f"{d['features']['peak_rss_gib']:.2f} |"
        )
        if p:
            ptotal = p["universe"]["s"] + p["features"]["s"]
            lines.append(
                f"| {w['name']} | {w['rows']:,} | pandas reference | read {p['read']['s']:.2f} | "
                f"{p['universe']['s']:.2f} | {p['features']['s']:.2f} | {ptotal:.2f} (+read) | "
                f"{w['rows'] / ptotal:,.0f} | {p['features']['peak_rss_gib']:.2f} |"
            )
    lines += [
        "",
        "Speed-up of DuckDB over the pandas reference (pandas time / DuckDB time; the reference "
        "has no ingestion step, so the ratio covers universe + features):",
        "",
        "| workload | universe | features | universe + features |",
        "|---|---:|---:|---:|",
    ]
    for w in results["workloads"]:
        if w.get("pandas"):
            d, p = w["duckdb"], w["pandas"]
            lines.append(
                f"| {w['name']} | {p['universe']['s'] / d['universe']['s']:.1f}x | "
                f"{p['features']['s'] / d['features']['s']:.1f}x | "
                f"{(p['universe']['s'] + p['features']['s']) / (d['universe']['s'] + d['features']['s']):.1f}x |"
            )
    single = [w for w in results["workloads"] if w.get("duckdb_1_thread") and w.get("pandas")]
    if single:
        lines += [
            "",
            "Per core: pandas runs on one core, DuckDB on all of them. The same DuckDB path capped at one "
            "thread (`threads=1`), against the same pandas times:",
            "",
            "| workload | DuckDB 1 thread universe s | features s | universe + features s | "
            "speed-up over pandas | DuckDB scaling 1 -> "
            f"{results['machine']['cores']} threads |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for w in single:
            d1, d, p = w["duckdb_1_thread"], w["duckdb"], w["pandas"]
            t1 = d1["universe"]["s"] + d1["features"]["s"]
            tn = d["universe"]["s"] + d["features"]["s"]
            tp = p["universe"]["s"] + p["features"]["s"]
            lines.append(
                f"| {w['name']} | {d1['universe']['s']:.2f} | {d1['features']['s']:.2f} | {t1:.2f} | "
                f"{tp / t1:.1f}x | {t1 / tn:.1f}x |"
            )
    big = max(results["workloads"], key=lambda w: w["rows"])
    d = big["duckdb"]
    total = sum(d[k]["s"] for k in ("ingest", "universe", "features"))
    peak = max(d[k]["peak_rss_gib"] for k in ("ingest", "universe", "features"))
    lines += [
        "",
        f"Targets (largest workload, {big['rows']:,} rows):",
        "",
        "| target | measured | met |",
        "|---|---:|---|",
    ]
    if big.get("pandas"):
        p = big["pandas"]
        ratio = (p["universe"]["s"] + p["features"]["s"]) / (d["universe"]["s"] + d["features"]["s"])
        lines.append(
            f"| DuckDB >= 10x faster than pandas | {ratio:.1f}x | {'yes' if ratio >= 10 else 'no'} |"
        )
    lines.append(
        f"| all three assets <= 60 s on 2 cores | {total:.1f} s | {'yes' if total <= 60 else 'no'} |"
    )
    lines.append(f"| peak memory < 8 GiB | {peak:.2f} GiB | {'yes' if peak < 8 else 'no'} |")
    lines += [
        "",
        "Synthetic market generation (not part of the pipeline timing): "
        + ", ".join(f"{w['name']}: {w['generate_s']:.1f} s" for w in results["workloads"])
        + ".",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workloads", default="500x10,3000x10", help="comma-separated NxYEARS")
    parser.add_argument("--skip-pandas", action="store_true")
    parser.add_argument("--stage", choices=["generate", "duckdb", "pandas"], help=argparse.SUPPRESS)
    parser.add_argument("--arg", action="append", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.stage == "generate":
        print(json.dumps(stage_generate(int(args.arg[0]), float(args.arg[1]))))
        return
    if args.stage == "duckdb":
        threads = int(args.arg[1]) if len(args.arg) > 1 else None
        print(json.dumps(stage_duckdb(Path(args.arg[0]), threads)))
        return
    if args.stage == "pandas":
        print(json.dumps(stage_pandas(Path(args.arg[0]))))
        return

    results = {"machine": machine(), "workloads": []}
    for spec in args.workloads.split(","):
        n_symbols, years = spec.lower().split("x")
        gen = _in_subprocess("--stage", "generate", "--arg", n_symbols, "--arg", years)
        path = _market_path(int(n_symbols), float(years))
        entry = {
            "name": f"{n_symbols} symbols x {years} y",
            **gen,
            "duckdb": _in_subprocess("--stage", "duckdb", "--arg", str(path)),
        }
        if not args.skip_pandas:
            entry["pandas"] = _in_subprocess("--stage", "pandas", "--arg", str(path))
            # pandas runs on one core; DuckDB capped at one thread gives the per-core comparison
            entry["duckdb_1_thread"] = _in_subprocess("--stage", "duckdb", "--arg", str(path), "--arg", "1")
        results["workloads"].append(entry)
        print(json.dumps(entry, indent=1))
    save_json("data_layer", results)
    write_section("data_layer", _markdown(results))


if __name__ == "__main__":
    main()
