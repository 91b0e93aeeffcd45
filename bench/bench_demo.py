"""Benchmark: `make demo` end to end on a fresh DATA_DIR, with each stage's time from the run's event log.

    python bench/bench_demo.py            # runs `make demo DATA_DIR=bench/out/demo_data`

The virtual environment is assumed installed (the install step is timed separately by `make test` /
CI); everything else, from the synthetic market to the predictions, is in the wall time.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

from _common import OUT, ROOT, machine, save_json, write_section

COMMAND = "python bench/bench_demo.py"


def main() -> None:
    data = OUT / "demo_data"
    shutil.rmtree(data, ignore_errors=True)
    env = {**os.environ, "DATA_DIR": str(data), "DAGSTER_HOME": str(data / "dagster_home")}
    env.pop("MARKET_DATA_PATH", None)
    env.pop("BASE_MODEL", None)
    started = time.perf_counter()
    done = subprocess.run(
        ["make", "demo", f"DATA_DIR={data}"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(done.stdout[-3000:] + done.stderr[-3000:])

    os.environ["DAGSTER_HOME"] = str(data / "dagster_home")
    from dagster import DagsterEventType, DagsterInstance

    instance = DagsterInstance.get()
    run = instance.get_runs(limit=1)[0]
    # asset steps are the ones that materialised something; every other step ran checks
    starts, steps, asset_steps, n_checks = {}, {}, set(), 0
    for record in instance.all_logs(run.run_id):
        event = record.dagster_event
        if event is None:
            continue
        if event.event_type == DagsterEventType.STEP_START:
            starts[event.step_key] = record.timestamp
        elif event.event_type == DagsterEventType.STEP_SUCCESS:
            steps[event.step_key] = record.timestamp - starts[event.step_key]
        elif event.event_type == DagsterEventType.ASSET_MATERIALIZATION:
            asset_steps.add(event.step_key)
        elif event.event_type == DagsterEventType.ASSET_CHECK_EVALUATION:
            n_checks += 1
    assets = {k: v for k, v in steps.items() if k in asset_steps}
    checks = sum(v for k, v in steps.items() if k not in assets)
    save_json("demo", {"wall_s": wall, "steps": steps, "machine": machine()})
    lines = ["| stage | seconds |", "|---|---:|"]
    lines += [f"| {name} | {seconds:.1f} |" for name, seconds in assets.items()]
    lines += [
        f"| {n_checks} asset checks | {checks:.1f} |",
        f"| **`make demo` wall (no install)** | **{wall:.0f}** |",
    ]
    m = machine()
    write_section(
        "demo",
        f"""## `make demo` (issue 9)

Command: `{COMMAND}` (= `make demo` on a fresh DATA_DIR, virtual environment already installed). Machine: {m["cores"]} cores ({m["cpu"]}). Default market (1000 symbols x 5 years), embedded backbone pretrained on 8,000 train prompts, `cpu` training profile (24,000 sampled train rows, LoRA in the last decoder layer), final comparison on every validation and test date, champion predictions for the live date.

{chr(10).join(lines)}

The install (`pip install -e .` with a warm package cache) adds about 1.5 minutes on a fresh clone.
""",
    )
    print(assets, wall)


if __name__ == "__main__":
    main()
