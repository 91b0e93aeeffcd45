"""Fault-injection run of the daily job: nothing is lost, nothing is duplicated.

    python bench/bench_faults.py --days 4 --kills 6 --seed 0 [--workdir bench/out/faults]

Two passes over the same N simulated days, each in its own DATA_DIR and DAGSTER_HOME (a `dagster.yaml`
with `concurrency.pools.default_limit: 1`, as `make dev` writes):

1. `fault_free`: day k runs the `daily_retrain` job once, in a fresh process, on the history file plus
   the daily files 1..k (MARKET_DATA_PATH is a directory; each daily file also re-sends three rows of
   the day before with revised volumes, and one bad row that is quarantined). Its day durations and the
   lifetime of the training process are measured.
2. `faults`: the same days; a seeded plan (`kill_plan`) SIGKILLs attempts in one of four ways:
   - `run`: the run process alone, after a random delay within the fault-free day's duration (its
     Pipes children, `accelerate launch` and the trainer, are left running as orphans);
   - `run_tree`: the run process and all its children (the process group: a crashed container);
   - `child`: the training process (`python -m modeling.run_job`), a random time after it started;
   - `hook`: `REGRESSOR_FAULT_POINT=point:n` (the trainer SIGKILLs itself at `step`, `checkpoint_write`,
     `checkpoint_rename` or `eval`; every trainer of that attempt inherits it).
   A day is rerun (a new run of the job, same DATA_DIR) until an attempt succeeds. The attempts of a
   day take its planned faults in order (a rerun may be killed again: kills during recovery), then run
   without faults. Faults planned for a day that succeeded anyway (the training step's own retry policy
   recovers from a killed trainer) move to the next day. `--plan` replaces the seeded plan.

Then every table, the Parquet outputs and the registry of the two passes are compared (see `compare`).

A setup step, identical in both passes and never faulted, materialises the chain up to `base_model` on
the history file and writes `DATA_DIR/hyperparameters.json` with `checkpoint_every_steps: 3` (the one
documented way to override that setting; the cpu profile checkpoints every 250 steps and these runs
train 12), so that a killed trainer resumes from a checkpoint and the checkpoint fault points exist.

The operator's part: a SIGKILLed run keeps the concurrency-pool slot its step had claimed (nothing
marks the run finished: the default run launcher has no run-worker health check), so the retry's step
waits on "Step blocked by limit for pool ..." forever. When the retry's log shows that, the script
does what an operator does: marks the dead run failed (`instance.report_run_failed`) and frees its slots
(`instance.event_log_storage.free_concurrency_slots_for_run`), and records it.

Outputs under the workdir: `market_files/` (all files), `market/` (what the runs see), `<pass>/data`,
`<pass>/dagster_home`, `<pass>/logs/dayK-attemptA.log`, `attempts.jsonl`, `result.json`, `section.md`.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _path in (ROOT, ROOT / "bench"):  # the project, and bench/_common.py
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

REGISTRY_NAME = "return-regressor"
KINDS = ("run", "run_tree", "child", "hook")
HOOK_POINTS = ("step", "checkpoint_write", "checkpoint_rename", "eval")
SETUP_ASSETS = ("raw_market_data", "universe", "features", "training_set", "base_model")
CHECKPOINT_EVERY = 3
DUCKDB_TABLES = (
    "raw_market_data",
    "raw_market_data_rejects",
    "raw_market_data_revisions",
    "universe",
    "features",
    "feature_definitions",
    "predictions",
)
PARQUET_FILES = ("training_set", "prompt_corpus")
TIME_COLUMNS = {"raw_market_data_revisions": ("revised_at",)}
"""Columns that legitimately differ between two loads of the same files (the load time)."""
PREDICTION_TOLERANCE = 1e-6
HISTORY_MTIME = 1_700_000_000
"""Fixed modification times (history, then one day later per daily file): the newest-file-wins order
of the ingest is the same in both passes."""

RUN_CONFIG = {
    # tests/test_pipeline.py SMALL_RUN (the market comes from MARKET_DATA_PATH instead)
    "ops": {
        "universe": {"config": {"top_n": 40}},
        "base_model": {
            "config": {
                "vocab_size": 600,
                "tokenizer_rows": 1500,
                "hidden_size": 32,
                "intermediate_size": 64,
                "pretrain_rows": 64,
                "pretrain_epochs": 6,
                "pretrain_learning_rate": 0.01,
                "pretrain_batch_size": 16,
                "pretrain_eval_rows": 16,
            }
        },
        "regressor": {
            "config": {
                "max_train_samples": 192,
                "batch_size": 16,
                "eval_every_steps": 6,
                "eval_max_dates": 3,
                "final_eval_max_dates": 4,
                # the cpu profile's 240 s budget makes the learning rate follow the wall clock when a
                # step is slow (a loaded machine); a budget that never binds keeps both passes on steps
                "time_budget_s": 1_000_000.0,
            }
        },
    }
}
TRAIN_STEPS = 192 // 16
HOOK_HITS = {
    # how often a fresh trainer reaches each point with RUN_CONFIG: 12 steps, an evaluation every 6
    # steps, a checkpoint every 3 (none at the last step)
    "step": TRAIN_STEPS,
    "eval": TRAIN_STEPS // 6,
    "checkpoint_write": (TRAIN_STEPS - 1) // CHECKPOINT_EVERY,
    "checkpoint_rename": (TRAIN_STEPS - 1) // CHECKPOINT_EVERY,
}


# --- the kill plan ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Fault:
    kind: str
    """One of KINDS."""
    u: float
    """Where in the window the kill falls: run kinds, the fault-free day duration; child, the trainer's
    fault-free lifetime."""
    point: str = ""
    """hook: the fault point."""
    n: int = 0
    """hook: the n-th time a trainer reaches it."""

    def env(self) -> dict[str, str]:
        return {"REGRESSOR_FAULT_POINT": f"{self.point}:{self.n}"} if self.kind == "hook" else {}

    def label(self) -> str:
        return f"hook {self.point}:{self.n}" if self.kind == "hook" else f"{self.kind} @ {self.u:.2f}"


def kill_plan(seed: int, days: int, kills: int) -> list[list[Fault]]:
    """`kills` faults spread over `days` days (seeded): the kinds in a shuffled cycle (every kind once
    before any twice), days drawn uniformly; within a day in drawing order."""
    if days < 1 or kills < 0:
        raise ValueError(f"need days >= 1 and kills >= 0, got {days}, {kills}")
    rng = random.Random(seed)
    plan: list[list[Fault]] = [[] for _ in range(days)]
    cycle: list[str] = []
    for _ in range(kills):
        if not cycle:
            cycle = list(KINDS)
            rng.shuffle(cycle)
        kind = cycle.pop()
        day = rng.randrange(days)
        u = round(rng.uniform(0.05, 0.95), 3)
        if kind == "hook":
            point = rng.choice(HOOK_POINTS)
            plan[day].append(Fault(kind, u, point, rng.randint(1, HOOK_HITS[point])))
        else:
            plan[day].append(Fault(kind, u))
    return plan


def parse_plan(text: str, days: int) -> list[list[Fault]]:
    """An explicit plan (to reproduce one scenario): `DAY:KIND@U` (KIND run, run_tree or child) or
    `DAY:hook:POINT:N`, comma-separated, e.g. `3:run@0.33,4:hook:step:5`."""
    plan: list[list[Fault]] = [[] for _ in range(days)]
    for item in filter(None, (part.strip() for part in text.split(","))):
        day, _, rest = item.partition(":")
        if rest.startswith("hook:"):
            _, point, n = rest.split(":")
            if point not in HOOK_POINTS:
                raise ValueError(f"unknown fault point {point!r}; one of {HOOK_POINTS}")
            fault = Fault("hook", 0.0, point, int(n))
        else:
            kind, _, u = rest.partition("@")
            if kind not in KINDS or kind == "hook" or not 0.0 <= float(u) <= 1.0:
                raise ValueError(
                    f"bad fault {item!r}: DAY:KIND@U with KIND run, run_tree or child, U in [0, 1]"
                )
            fault = Fault(kind, float(u))
        if not 1 <= int(day) <= days:
            raise ValueError(f"day {day} of {item!r} is outside 1..{days}")
        plan[int(day) - 1].append(fault)
    return plan


# --- digests and comparisons -----------------------------------------------------------------------------
def frame_digest(frame, exclude: tuple[str, ...] = ()) -> dict:
    """Row count and an order-independent content hash (exact bits of every value) of a DataFrame,
    without the `exclude` columns."""
    import numpy as np
    import pandas as pd

    columns = sorted(c for c in frame.columns if c not in exclude)
    data = frame[columns].copy()
    for column in columns:  # unhashable cells (lists, dicts) by their text
        if data[column].dtype == object and data[column].map(lambda v: isinstance(v, list | dict)).any():
            data[column] = data[column].map(lambda v: json.dumps(v, sort_keys=True, default=str))
    row_hashes = (
        pd.util.hash_pandas_object(data, index=False).to_numpy()
        if len(data)
        else np.array([], dtype="uint64")
    )
    digest = hashlib.sha256("|".join(f"{c}:{data[c].dtype}" for c in columns).encode())
    digest.update(np.sort(row_hashes).tobytes())
    return {"rows": len(data), "sha": digest.hexdigest()[:16], "excluded": list(exclude)}


def compare_digests(reference: dict[str, dict], other: dict[str, dict]) -> list[str]:
    """One line per table whose row count or hash differs, or that exists in one pass only."""
    problems = []
    for name in sorted(set(reference) | set(other)):
        a, b = reference.get(name), other.get(name)
        if a is None or b is None:
            problems.append(f"{name}: only in {'faults' if a is None else 'fault_free'}")
        elif (a["rows"], a["sha"]) != (b["rows"], b["sha"]):
            problems.append(f"{name}: {a['rows']} rows {a['sha']} vs {b['rows']} rows {b['sha']}")
    return problems


def compare_predictions(reference, other, tolerance: float = PREDICTION_TOLERANCE) -> dict:
    """(date, symbol) keys: duplicates in `other`, missing / extra against `reference`; on the common
    keys the largest |prediction difference| and the rows whose rank, decile or model_version differ."""
    import numpy as np

    keys = ["date", "symbol"]
    duplicated = int(other.duplicated(keys).sum())
    merged = reference.merge(other, on=keys, how="outer", suffixes=("_a", "_b"), indicator=True)
    both = merged[merged["_merge"] == "both"]
    diff = (both["prediction_a"] - both["prediction_b"]).abs().to_numpy(float)
    max_diff = float(np.nanmax(diff)) if len(diff) else 0.0
    other_columns = [c for c in ("rank", "decile", "model_version") if f"{c}_a" in both]
    changed = {c: int((both[f"{c}_a"] != both[f"{c}_b"]).sum()) for c in other_columns}
    result = {
        "rows_fault_free": len(reference),
        "rows_faults": len(other),
        "duplicated": duplicated,
        "missing": int((merged["_merge"] == "left_only").sum()),
        "extra": int((merged["_merge"] == "right_only").sum()),
        "max_abs_diff": max_diff,
        "changed": changed,
    }
    result["ok"] = (
        duplicated == 0
        and result["missing"] == 0
        and result["extra"] == 0
        and max_diff <= tolerance
        and not any(changed.values())
    )
    return result


def registry_state(db: Path, name: str = REGISTRY_NAME) -> dict:
    """The registered versions (with their tags) and the aliases of `name`, read from MLflow's SQLite
    store directly."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        versions = {
            str(v): {"status": status}
            for v, status in con.execute(
                "SELECT version, status FROM model_versions WHERE name = ? ORDER BY version", (name,)
            )
        }
        for version, key, value in con.execute(
            "SELECT version, key, value FROM model_version_tags WHERE name = ?", (name,)
        ):
            versions.setdefault(str(version), {})[key] = value
        aliases = {
            alias: str(version)
            for alias, version in con.execute(
                "SELECT alias, version FROM registered_model_aliases WHERE name = ?", (name,)
            )
        }
    finally:
        con.close()
    return {"versions": versions, "aliases": aliases}


def duplicate_inputs(versions: dict[str, dict]) -> dict[str, list[str]]:
    """inputs_sha -> the versions that share it (only those registered more than once)."""
    by_sha: dict[str, list[str]] = {}
    for version, tags in sorted(versions.items(), key=lambda kv: int(kv[0])):
        by_sha.setdefault(tags.get("inputs_sha", ""), []).append(version)
    return {sha: vs for sha, vs in by_sha.items() if len(vs) > 1}


def compare_registries(reference: dict, other: dict) -> list[str]:
    """The registry conditions: no two versions of identical inputs, as many versions as without faults,
    the same champion, every version gated. (`inputs_sha` itself differs between the two passes: the
    corpus file it hashes records the base model's path, which is under each pass's DATA_DIR.)"""
    problems = []
    for sha, versions in duplicate_inputs(other["versions"]).items():
        problems.append(f"inputs_sha {sha[:12]} registered {len(versions)} times: versions {versions}")
    if len(reference["versions"]) != len(other["versions"]):
        problems.append(f"{len(other['versions'])} versions, fault-free {len(reference['versions'])}")
    champion_a, champion_b = reference["aliases"].get("champion"), other["aliases"].get("champion")
    if champion_a != champion_b:
        problems.append(f"champion v{champion_b}, fault-free v{champion_a}")
    ungated = [v for v, t in other["versions"].items() if t.get("gate") != "done"]
    if ungated:
        problems.append(f"versions without gate=done: {ungated}")
    return problems


# --- the market ------------------------------------------------------------------------------------------
def write_market(directory: Path, days: int, n_symbols: int, years: float, seed: int) -> list[Path]:
    """The history file and one file per simulated day, written to `directory`; returns [history,
    day_01, ...] (`publish` copies them into the market directory day by day)."""
    import numpy as np

    from modeling.data.synthetic import SyntheticMarketConfig, generate_synthetic_market

    frame = generate_synthetic_market(
        SyntheticMarketConfig(n_symbols=n_symbols, n_years=years, seed=seed)
    ).frame
    frame = frame[["date", "symbol", "open", "high", "low", "close", "volume", "sector"]].copy()
    frame["date"] = frame["date"].dt.strftime("%Y-%m-%d")
    dates = sorted(frame["date"].unique())
    history_end = dates[-days - 1]
    staging = directory
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    paths = [staging / "history.csv"]
    frame[frame["date"] <= history_end].to_csv(paths[0], index=False)
    rng = np.random.default_rng(seed)
    for k in range(1, days + 1):
        today, yesterday = dates[-days - 1 + k], dates[-days - 2 + k]
        rows = frame[frame["date"] == today]
        # the vendor re-sends three of yesterday's rows with final volumes (revisions) ...
        resent = frame[frame["date"] == yesterday].sample(3, random_state=int(rng.integers(1 << 31))).copy()
        resent["volume"] = (resent["volume"] * 1.07).round()
        # ... and one broken row (quarantined as non_positive_price)
        bad = rows.head(1).assign(symbol="ZZBAD", close=-1.0)
        path = staging / f"day_{k:02d}.csv"
        paths.append(path)
        pd_concat([rows, resent, bad]).to_csv(path, index=False)
    return paths


def pd_concat(frames):
    import pandas as pd

    return pd.concat(frames, ignore_index=True)


def publish(path: Path, market_dir: Path, index: int) -> None:
    """Copy one file of the staging folder into the market directory with its fixed mtime."""
    target = market_dir / path.name
    tmp = market_dir / f".{path.name}.part"
    shutil.copyfile(path, tmp)
    stamp = HISTORY_MTIME + 86_400 * index
    os.utime(tmp, (stamp, stamp))
    os.replace(tmp, target)


# --- one attempt: a run of the job in a fresh process ----------------------------------------------------
WORKER = """
import json, sys
from dagster import DagsterInstance, materialize
spec = json.loads(open(sys.argv[1]).read())
instance = DagsterInstance.get()
if spec["mode"] == "setup":
    from pipeline.assets import ALL_ASSETS
    from pipeline.resources import build_resources
    from pipeline.settings import Settings
    assets = [a for a in ALL_ASSETS if a.key.to_user_string() in spec["assets"]]
    result = materialize(assets, resources=build_resources(Settings.from_env()),
                         run_config=spec["run_config"], instance=instance, raise_on_error=False)
else:
    from pipeline.definitions import defs
    job = defs.get_job_def("daily_retrain")
    result = job.execute_in_process(run_config=spec["run_config"], instance=instance, raise_on_error=False)
print("RUN_ID", result.run_id, "SUCCESS", result.success, flush=True)
sys.exit(0 if result.success else 1)
"""


def describe(process) -> str:
    """A short name of a process of the run's tree (the orphans left by a `run` kill)."""
    try:
        cmdline = process.cmdline()
    except Exception:  # gone meanwhile
        return "(gone)"
    text = " ".join(cmdline)
    if is_trainer(cmdline):
        return "trainer"
    for needle, name in (("accelerate", "accelerate launcher"), ("watch_orphans", "dagster watch_orphans")):
        if needle in text:
            return name
    return Path(cmdline[0]).name if cmdline else "?"


def is_trainer(cmdline: list[str]) -> bool:
    """The training process itself (`python -m modeling.run_job --job ...`; `modeling.train` in earlier
    versions), not its `accelerate launch` parent."""
    launcher = any(Path(a).name == "accelerate" for a in cmdline[:2])
    module = any(a.startswith("modeling.") for a in cmdline)
    return module and "--job" in cmdline and not launcher


def trainer_phase(log_text: str) -> str:
    """What the newest trainer was doing, from its log lines since the last launch."""
    tail = log_text[log_text.rfind("launching:") :] if "launching:" in log_text else log_text
    phase = "starting (imports, data, model)"
    for line in tail.splitlines():
        if "resumed from step-" in line:
            phase = "training (resumed from a checkpoint)"
        elif "validation RankIC" in line and "step " in line:
            phase = "training (after a periodic evaluation)"
        elif "checkpoint step-" in line and "saved" in line:
            phase = "training (after a checkpoint)"
        elif "already complete" in line:
            phase = "after training (already complete)"
        elif "rows on" in line and "scored" in line:
            phase = "final comparison (scoring validation/test)"
        elif "champion gate" in line:
            phase = "after the champion gate"
    return phase


@dataclass
class Attempt:
    pass_name: str
    day: int
    attempt: int
    fault: str
    kind: str
    planned_delay_s: float | None = None
    killed_at_s: float | None = None
    killed_alive: bool | None = None
    """The target process was alive when the signal was sent (the kill landed before it ended)."""
    phase: str = ""
    returncode: int | None = None
    success: bool = False
    wall_s: float = 0.0
    run_id: str = ""
    run_status: str = ""
    trainers_launched: int = 0
    trainers_sigkilled: int = 0
    step_retries: int = 0
    trainer_start_s: float | None = None
    trainer_lifetime_s: float | None = None
    orphans: list[str] = field(default_factory=list)
    orphans_exit_s: float | None = None
    slots_left_by_dead_run: list[str] = field(default_factory=list)
    blocked_on_pool: list[str] = field(default_factory=list)
    freed_runs: list[str] = field(default_factory=list)
    hook_hit: bool | None = None
    timed_out: bool = False
    log: str = ""


class Harness:
    def __init__(self, workdir: Path, pass_name: str, timeout_s: float):
        self.pass_name = pass_name
        self.base = workdir / pass_name
        self.data = self.base / "data"
        self.home = self.base / "dagster_home"
        self.logs = self.base / "logs"
        self.market = workdir / "market"
        self.timeout_s = timeout_s
        self.known_runs: set[str] = set()
        self.orphans: list = []
        self._instance = None

    def reset(self) -> None:
        shutil.rmtree(self.base, ignore_errors=True)
        for path in (self.data, self.home, self.logs):
            path.mkdir(parents=True)
        from pipeline.instance import write_dagster_yaml

        write_dagster_yaml(self.home)  # the instance `make` writes
        # create the instance's SQLite stores here, before any run process opens them: two processes
        # creating them at once stamp the schema twice ("alembic_version has more than one head")
        self._instance = None
        self.instance.get_runs(limit=1)
        self.instance.event_log_storage.get_concurrency_info("warehouse")

    @property
    def instance(self):
        if self._instance is None:
            from dagster import DagsterInstance

            self._instance = DagsterInstance.from_config(str(self.home))
        return self._instance

    def env(self, extra: dict[str, str]) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("MLFLOW_TRACKING_URI", "BASE_MODEL", "REGRESSOR_FAULT_POINT", "DAGSTER_HOME")
        }
        env.update(
            DATA_DIR=str(self.data),
            DAGSTER_HOME=str(self.home),
            MARKET_DATA_PATH=str(self.market),
            PYTHONPATH=str(ROOT),
            **extra,
        )
        return env

    def new_run_id(self) -> str:
        runs = [r.run_id for r in self.instance.get_runs() if r.run_id not in self.known_runs]
        return runs[0] if runs else ""

    def run_events(self, run_id: str) -> list:
        """The run's Dagster events; none while its event store does not exist yet (the run process
        creates it: reading first would create it here, racing the run's own creation)."""
        if not (self.home / "history" / "runs" / f"{run_id}.db").exists():
            return []
        return [r for r in self.instance.all_logs(run_id) if r.dagster_event is not None]

    def step_in_flight(self, run_id: str, at: float) -> str:
        """The Dagster step the run was executing at time `at` (epoch seconds)."""
        if not run_id:
            return "startup (no run record yet)"
        open_steps: dict[str, float] = {}
        last_done = ""
        for record in self.run_events(run_id):
            event = record.dagster_event
            if record.timestamp > at:
                break
            kind = event.event_type_value
            if kind == "STEP_START" or kind == "STEP_RESTARTED":
                open_steps[event.step_key] = record.timestamp
            elif kind in ("STEP_SUCCESS", "STEP_FAILURE", "STEP_UP_FOR_RETRY"):
                open_steps.pop(event.step_key, None)
                last_done = event.step_key
        if open_steps:
            return ", ".join(open_steps)
        return f"between steps (after {last_done})" if last_done else "startup (before the first step)"

    def dead_run_claims(self, exclude: str | None) -> dict[str, list[str]]:
        """Pool slots (claimed or pending) held by runs other than `exclude`: {run_id: [pool/step ...]}."""
        storage = self.instance.event_log_storage
        held: dict[str, list[str]] = {}
        for pool in ("warehouse", "training"):
            info = storage.get_concurrency_info(pool)
            for slot in info.claimed_slots:
                if slot.run_id != exclude:
                    held.setdefault(slot.run_id, []).append(f"{pool}/{slot.step_key} (claimed)")
            for step in info.pending_steps:
                if step.run_id != exclude:
                    state = "assigned" if step.assigned_timestamp else "pending"
                    held.setdefault(step.run_id, []).append(f"{pool}/{step.step_key} ({state})")
        return held

    def free_dead_runs(self, exclude: str | None) -> list[str]:
        """What an operator does for runs whose process is gone: mark them failed, free their slots."""
        from dagster import DagsterRunStatus

        freed = []
        for run_id in self.dead_run_claims(exclude):
            run = self.instance.get_run_by_id(run_id)
            if run is not None and run.status in (DagsterRunStatus.STARTED, DagsterRunStatus.STARTING):
                self.instance.report_run_failed(run, message="run process killed (fault-injection bench)")
            self.instance.event_log_storage.free_concurrency_slots_for_run(run_id)
            freed.append(run_id)
        return freed

    def attempt(self, mode: str, day: int, number: int, fault: Fault | None, window: dict | None) -> Attempt:
        import psutil

        kind = fault.kind if fault else "none"
        rec = Attempt(self.pass_name, day, number, fault.label() if fault else "none", kind)
        spec = self.base / f"spec-{mode}.json"
        run_config = RUN_CONFIG
        if mode == "setup":
            run_config = {"ops": {k: v for k, v in RUN_CONFIG["ops"].items() if k in SETUP_ASSETS}}
        spec.write_text(json.dumps({"mode": mode, "assets": SETUP_ASSETS, "run_config": run_config}))
        log_path = self.logs / f"day{day}-attempt{number}.log"
        rec.log = str(log_path.relative_to(self.base.parent))
        kill_at = trainer_kill_delay = None
        if fault and fault.kind in ("run", "run_tree"):
            kill_at = fault.u * window["duration_s"]
            rec.planned_delay_s = round(kill_at, 2)
        elif fault and fault.kind == "child":
            trainer_kill_delay = fault.u * window["trainer_lifetime_s"]
            rec.planned_delay_s = round(trainer_kill_delay, 2)
        with open(log_path, "w") as log:
            started = time.time()
            proc = subprocess.Popen(
                [sys.executable, "-c", WORKER, str(spec)],
                cwd=ROOT,
                env=self.env(fault.env() if fault else {}),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: `run_tree` kills the group
            )
            trainers: dict[int, list[float]] = {}  # pid -> [first seen, last seen] (seconds)
            done_kill = False
            killed_wall = 0.0
            orphans: list[psutil.Process] = []
            next_operator_check = 0.0
            run_id = ""
            while proc.poll() is None:
                now = time.time() - started
                try:
                    tree = psutil.Process(proc.pid).children(recursive=True)
                except psutil.NoSuchProcess:
                    tree = []
                for child in tree:
                    try:
                        if is_trainer(child.cmdline()):
                            trainers.setdefault(child.pid, [now, now])[1] = now
                    except psutil.Error:
                        pass
                if kill_at is not None and not done_kill and now >= kill_at:
                    done_kill = True
                    rec.killed_at_s = round(now, 2)
                    rec.phase = self._phase(run_id or self.new_run_id(), log_path, trainers, tree)
                    rec.killed_alive = proc.poll() is None
                    if fault.kind == "run":
                        orphans = [p for p in tree if p.is_running()]
                        proc.send_signal(signal.SIGKILL)
                    else:
                        os.killpg(proc.pid, signal.SIGKILL)
                    killed_wall = time.time()
                if trainer_kill_delay is not None and not done_kill and trainers:
                    first_pid, (first_seen, _) = min(trainers.items(), key=lambda kv: kv[1][0])
                    if now >= first_seen + trainer_kill_delay:
                        done_kill = True
                        rec.killed_at_s = round(now, 2)
                        rec.phase = (
                            f"regressor: trainer {trainer_phase(log_path.read_text(errors='replace'))}"
                        )
                        try:
                            psutil.Process(first_pid).send_signal(signal.SIGKILL)
                            rec.killed_alive = True
                        except psutil.NoSuchProcess:
                            rec.killed_alive = False
                if now >= next_operator_check:
                    next_operator_check = now + 1.0
                    run_id = run_id or self.new_run_id()
                    self._operator(rec, log_path, run_id, now)
                if now > self.timeout_s and not rec.timed_out:
                    rec.timed_out = True
                    os.killpg(proc.pid, signal.SIGKILL)
                time.sleep(0.2)
            rec.returncode = proc.returncode
            rec.wall_s = round(time.time() - started, 2)
        if orphans:
            rec.orphans = [describe(p) for p in orphans]
        run_id = run_id or self.new_run_id()
        rec.run_id = run_id
        if run_id:
            self.known_runs.add(run_id)
            events = self.run_events(run_id)
            rec.step_retries = sum(r.dagster_event.event_type_value == "STEP_UP_FOR_RETRY" for r in events)
            rec.run_status = self.instance.get_run_by_id(run_id).status.value
            if rec.returncode is not None and rec.returncode < 0:
                rec.slots_left_by_dead_run = self.dead_run_claims(None).get(run_id, [])
        text = log_path.read_text(errors="replace")
        rec.trainers_launched = max(len(trainers), text.count("launching: "))
        rec.trainers_sigkilled = text.count("died with <Signals.SIGKILL")  # accelerate's error
        rec.success = rec.returncode == 0 and f"RUN_ID {run_id} SUCCESS True" in text
        if trainers:
            first = min(trainers.values())
            rec.trainer_start_s = round(first[0], 2)
            rec.trainer_lifetime_s = round(first[1] - first[0], 2)
        if fault and fault.kind == "hook":
            rec.hook_hit = rec.trainers_sigkilled > 0
            rec.killed_alive = rec.hook_hit
            rec.phase = f"regressor: trainer at fault point {fault.point} #{fault.n}" + (
                "" if rec.hook_hit else " (not reached)"
            )
        if fault and fault.kind == "child" and not done_kill:
            rec.killed_alive = False
            rec.phase = "no trainer was launched (nothing to kill)"
        # the next attempt waits for nothing; only the next day waits for the orphans (`run_pass`)
        if orphans:
            self.orphans += [(rec, p, killed_wall) for p in orphans]
        return rec

    def wait_orphans(self) -> None:
        """Wait for the orphans of killed runs; record when they exited (seconds after the kill)."""
        import psutil

        for rec, process, killed_wall in self.orphans:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.wait(timeout=self.timeout_s)
            rec.orphans_exit_s = max(rec.orphans_exit_s or 0.0, round(time.time() - killed_wall, 2))
        self.orphans = []

    def _phase(self, run_id: str, log_path: Path, trainers: dict, tree: list) -> str:
        step = self.step_in_flight(run_id, time.time())
        alive = [pid for pid in trainers if any(p.pid == pid for p in tree)]
        if alive:
            return f"{step}: trainer {trainer_phase(log_path.read_text(errors='replace'))}"
        return step

    def _operator(self, rec: Attempt, log_path: Path, run_id: str, now: float) -> None:
        """Free the slots of dead runs once this attempt's log says a step waits on a pool."""
        text = log_path.read_text(errors="replace")
        if "blocked by limit for pool" not in text:
            return
        held = self.dead_run_claims(run_id or None)
        if not held or not run_id:
            return
        pools = sorted({line.split("blocked by limit for pool ")[1].split()[0] for line in text.splitlines()
                        if "blocked by limit for pool " in line})  # fmt: skip
        claims = "; ".join(f"{c} of run {r[:8]}" for r, cs in held.items() for c in cs)
        rec.blocked_on_pool = [f"{pool} at {now:.0f} s ({claims})" for pool in pools]
        rec.freed_runs += self.free_dead_runs(run_id)


# --- the passes ------------------------------------------------------------------------------------------
def run_pass(
    harness: Harness,
    files: list[Path],
    plan: list[list[Fault]] | None,
    windows: list[dict] | None,
    record,
) -> dict:
    """Setup, then every day until it succeeds; returns the per-day facts."""
    harness.reset()
    shutil.rmtree(harness.market, ignore_errors=True)
    harness.market.mkdir(parents=True)
    publish(files[0], harness.market, 0)
    setup = harness.attempt("setup", 0, 1, None, None)
    record(setup)
    if not setup.success or setup.timed_out:
        raise RuntimeError(f"setup failed, see {setup.log}")
    from modeling.backbones.common import model_fingerprint

    (harness.data / "hyperparameters.json").write_text(
        json.dumps(
            {
                "best_params": {"checkpoint_every_steps": CHECKPOINT_EVERY},
                "profile": "cpu",
                "base_model_fingerprint": model_fingerprint(harness.data / "models" / "base_model"),
                "note": "written by bench/bench_faults.py (not a search result)",
            }
        )
    )
    days, carried = [], []
    for day in range(1, len(files)):
        publish(files[day], harness.market, day)
        pending = carried + (list(plan[day - 1]) if plan else [])
        carried = []
        number, clean_failures, started = 0, 0, time.time()
        while True:
            number += 1
            fault = pending.pop(0) if pending else None
            rec = harness.attempt("day", day, number, fault, windows[day - 1] if windows else None)
            record(rec)
            if rec.timed_out:
                raise RuntimeError(
                    f"day {day} attempt {number} hung (killed after {harness.timeout_s:.0f} s): {rec.log}"
                )
            if rec.success:
                carried = pending
                break
            if fault is None:
                clean_failures += 1
                if clean_failures >= 2:
                    raise RuntimeError(f"day {day} failed twice without a fault, see {rec.log}")
        harness.wait_orphans()  # the next day starts once the orphans of killed runs are gone
        days.append({"day": day, "attempts": number, "wall_s": round(time.time() - started, 2),
                     "duration_s": rec.wall_s, "trainer_lifetime_s": rec.trainer_lifetime_s})  # fmt: skip
    return {"days": days, "not_applied": [f.label() for f in carried]}


def snapshot(harness: Harness) -> dict:
    """Digests of every table and Parquet output, the predictions, and the registry of one pass."""
    import duckdb
    import pandas as pd
    import pyarrow.parquet as pq

    tables, extra_tables = {}, []
    with duckdb.connect(str(harness.data / "warehouse.duckdb"), read_only=True) as con:
        present = {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
        for name in sorted(present):
            frame = con.execute(f"SELECT * FROM {name}").df()
            tables[name] = frame_digest(frame, TIME_COLUMNS.get(name, ()))
            if name not in DUCKDB_TABLES:
                extra_tables.append(name)
        predictions = con.execute("SELECT * FROM predictions").df()
    parquet = {}
    for name in PARQUET_FILES:
        path = harness.data / f"{name}.parquet"
        parquet[f"{name}.parquet"] = frame_digest(pd.read_parquet(path))
        parquet[f"{name}.parquet"]["file_sha"] = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        # the key-value metadata, with this pass's DATA_DIR written as <DATA_DIR> (the corpus records the
        # base model's path); the Arrow schema blob embeds the same text in binary and is left out
        meta = pq.read_metadata(path).metadata or {}
        text = json.dumps(
            sorted((k.decode(), v.decode(errors="replace")) for k, v in meta.items() if k != b"ARROW:schema")
        ).replace(str(harness.data), "<DATA_DIR>")
        parquet[f"{name}.parquet"]["kv_sha"] = hashlib.sha256(text.encode()).hexdigest()[:16]
    return {
        "tables": tables,
        "extra_tables": extra_tables,
        "parquet": parquet,
        "predictions": predictions,
        "registry": registry_state(harness.data / "mlflow.db"),
    }


def compare(reference: dict, other: dict) -> dict:
    """Every pass condition; `mismatches` is the list of failures (empty = pass)."""
    mismatches = []
    tables_ref = {k: v for k, v in reference["tables"].items() if k != "predictions"}
    tables_other = {k: v for k, v in other["tables"].items() if k != "predictions"}
    mismatches += [f"table {p}" for p in compare_digests(tables_ref, tables_other)]
    data_ref = {k: {"rows": v["rows"], "sha": v["sha"]} for k, v in reference["parquet"].items()}
    data_other = {k: {"rows": v["rows"], "sha": v["sha"]} for k, v in other["parquet"].items()}
    mismatches += [f"parquet {p}" for p in compare_digests(data_ref, data_other)]
    for name, ref in reference["parquet"].items():
        if ref["kv_sha"] != other["parquet"].get(name, {}).get("kv_sha"):
            mismatches.append(f"parquet {name}: key-value metadata differs (DATA_DIR paths aside)")
    predictions = compare_predictions(reference["predictions"], other["predictions"])
    if not predictions["ok"]:
        mismatches.append(f"predictions {json.dumps(predictions)}")
    predictions["exact"] = reference["tables"]["predictions"] == other["tables"]["predictions"]
    mismatches += [f"registry {p}" for p in compare_registries(reference["registry"], other["registry"])]
    files_same = {
        k: reference["parquet"][k]["file_sha"] == other["parquet"][k]["file_sha"]
        for k in reference["parquet"]
    }
    return {"mismatches": mismatches, "predictions": predictions, "parquet_file_bytes_equal": files_same}


# --- report ----------------------------------------------------------------------------------------------
def orphan_text(attempt: dict) -> str:
    """The training processes a `run` kill left running, and when the last one exited."""
    names = sorted({o for o in attempt["orphans"] if o in ("trainer", "accelerate launcher")})
    if not names:
        return "-"
    return f"{' + '.join(names)} ({attempt['orphans_exit_s']:.0f} s)"


def section(result: dict) -> str:
    attempts = [a for a in result["attempts"] if a["pass_name"] == "faults" and a["day"] > 0]
    faulted = [a for a in attempts if a["kind"] != "none"]
    lines = [
        "## Fault-injection run of the daily job",
        "",
        f"Command: `{result['command']}`. Machine: {result['machine']}. "
        f"Market: {result['market']}. Each day runs the `daily_retrain` job (the chain without the search) "
        "in a fresh process on its own DAGSTER_HOME (`concurrency.pools.default_limit: 1`), with the "
        "SMALL_RUN config of tests/test_pipeline.py (12 training steps) and a training time budget that "
        "never binds. Setup (both passes, never faulted): the chain up to `base_model` on the history "
        f"file, then `hyperparameters.json` with `checkpoint_every_steps: {CHECKPOINT_EVERY}`.",
        "",
        f"**Result: {len(result['comparison']['mismatches'])} mismatches** over {result['days']} days, "
        f"{result['kills']} kills planned, {len(faulted)} applied, "
        f"{sum(bool(a['killed_alive']) for a in faulted)} landed (the target was alive when killed), "
        f"{len(attempts) - result['days']} retries of a day (new runs of the job) and "
        f"{sum(a['step_retries'] for a in attempts)} retries of the training step inside runs (its retry "
        "policy). Wall time "
        f"{result['wall_s'] / 60:.1f} min (fault-free pass {result['fault_free_wall_s'] / 60:.1f} min, "
        f"fault pass {result['faults_wall_s'] / 60:.1f} min).",
        "",
        "| day | attempt | fault | landed | phase at the kill | exit | trainers (SIGKILLed) | step retries "
        "| orphans left (gone after) | blocked on a pool (slots of dead runs) | wall s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for a in attempts:
        lines.append(
            f"| {a['day']} | {a['attempt']} | {a['fault']} | "
            f"{'-' if a['killed_alive'] is None else ('yes' if a['killed_alive'] else 'no')} | {a['phase'] or '-'} | "
            f"{a['returncode']} | {a['trainers_launched']} ({a['trainers_sigkilled']}) | {a['step_retries']} | "
            f"{orphan_text(a)} | {'; '.join(a['blocked_on_pool']) or '-'} | {a['wall_s']:.0f} |"
        )
    if result["not_applied"]:
        lines += [
            "",
            f"Planned but not applied (the last day succeeded first): {', '.join(result['not_applied'])}.",
        ]
    comparison = result["comparison"]
    lines += [
        "",
        "Comparison with the fault-free pass (row count, order-independent hash of every value):",
        "",
    ]
    lines += ["| output | rows | fault-free hash | faults hash | equal |", "|---|---|---|---|---|"]
    for group in ("tables", "parquet"):
        for name, ref in result["fault_free"][group].items():
            other = result["faults"][group].get(name, {})
            equal = (ref["rows"], ref["sha"]) == (other.get("rows"), other.get("sha"))
            excluded = f" (without {', '.join(ref['excluded'])})" if ref.get("excluded") else ""
            lines.append(
                f"| {name}{excluded} | {ref['rows']} | {ref['sha']} | {other.get('sha')} | {'yes' if equal else 'NO'} |"
            )
    pred = comparison["predictions"]
    ref_reg, reg = result["fault_free"]["registry"], result["faults"]["registry"]
    lines += [
        "",
        f"Predictions: {pred['rows_faults']} rows, {pred['duplicated']} duplicated (date, symbol), "
        f"{pred['missing']} missing, {pred['extra']} extra; max |difference| {pred['max_abs_diff']:.3g} "
        f"(tolerance {PREDICTION_TOLERANCE:g}; bit-identical: {'yes' if pred['exact'] else 'no'}). "
        f"Registry: {len(reg['versions'])} versions (fault-free {len(ref_reg['versions'])}), "
        f"{len(duplicate_inputs(reg['versions']))} duplicate `inputs_sha`, champion v{reg['aliases'].get('champion')} "
        f"(fault-free v{ref_reg['aliases'].get('champion')}).",
    ]
    if comparison["mismatches"]:
        lines += ["", "Mismatches:", ""] + [f"- {m}" for m in comparison["mismatches"]]
    return "\n".join(lines) + "\n"


def source_files() -> dict[str, str]:
    """{path: sha} of the code the runs execute (pipeline/, modeling/, configs/): both passes must run
    the same code."""
    return {
        str(path.relative_to(ROOT)): hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        for folder in ("pipeline", "modeling", "configs")
        for path in sorted((ROOT / folder).rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts
    }


def changed_files(before: dict[str, str], after: dict[str, str]) -> list[str]:
    return sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))


def as_dict(rec) -> dict:
    return rec if isinstance(rec, dict) else asdict(rec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--days", type=int, default=4)
    parser.add_argument("--kills", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench" / "out" / "faults")
    parser.add_argument("--symbols", type=int, default=90)
    parser.add_argument("--years", type=float, default=1.2)
    parser.add_argument("--market-seed", type=int, default=7)
    parser.add_argument(
        "--plan",
        default=None,
        help="An explicit plan instead of the seeded one, e.g. '3:run@0.33,4:hook:step:5'.",
    )
    parser.add_argument(
        "--timeout-s", type=float, default=1200.0, help="Per attempt (a hang fails the bench)."
    )
    parser.add_argument(
        "--reuse-fault-free", action="store_true", help="Keep the fault-free pass of an earlier run (dev)."
    )
    args = parser.parse_args(argv)
    from _common import machine

    started = time.time()
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    plan = parse_plan(args.plan, args.days) if args.plan else kill_plan(args.seed, args.days, args.kills)
    files = write_market(workdir / "market_files", args.days, args.symbols, args.years, args.market_seed)
    attempts_path = workdir / "attempts.jsonl"
    reference_path = workdir / "fault_free.json"
    attempts: list = []  # Attempt objects (updated until their day ends: orphans), or dicts of a reused pass

    def record(rec: Attempt) -> None:
        attempts.append(rec)
        attempts_path.write_text("".join(json.dumps(as_dict(a)) + "\n" for a in attempts))
        print(
            f"[{rec.pass_name}] day {rec.day} attempt {rec.attempt}: fault {rec.fault}, landed {rec.killed_alive}, "
            f"phase {rec.phase or '-'}, exit {rec.returncode}, {rec.wall_s:.0f} s"
            + (f", blocked {rec.blocked_on_pool}" if rec.blocked_on_pool else ""),
            flush=True,
        )

    print("kill plan:", [[f.label() for f in day] for day in plan], flush=True)
    code = {"start": source_files()}
    fault_free = Harness(workdir, "fault_free", args.timeout_s)
    if args.reuse_fault_free and reference_path.is_file():
        reference_run = json.loads(reference_path.read_text())
        attempts += reference_run["attempts"]
    else:
        t0 = time.time()
        facts = run_pass(fault_free, files, None, None, record)
        reference_run = {
            "facts": facts,
            "wall_s": time.time() - t0,
            "attempts": [as_dict(a) for a in attempts],
            "code": source_files(),
        }
        reference_path.write_text(json.dumps(reference_run, indent=1))
    windows = [
        {"duration_s": d["duration_s"], "trainer_lifetime_s": d["trainer_lifetime_s"] or 1.0}
        for d in reference_run["facts"]["days"]
    ]
    t0 = time.time()
    faults = Harness(workdir, "faults", args.timeout_s)
    code["after_fault_free"] = reference_run.setdefault("code", source_files())
    if not isinstance(code["after_fault_free"], dict):  # a reused pass of an older version of this script
        code["after_fault_free"] = {"<unknown: older fault-free pass>": str(code["after_fault_free"])}
    fault_facts = run_pass(faults, files, plan, windows, record)
    faults_wall = time.time() - t0
    code["end"] = source_files()
    reference, other = snapshot(fault_free), snapshot(faults)
    comparison = compare(reference, other)
    changed = sorted(
        set(changed_files(code["start"], code["after_fault_free"]))
        | set(changed_files(code["start"], code["end"]))
    )
    if changed:
        comparison["mismatches"].append(
            f"the code changed during the run (edited meanwhile): {', '.join(changed)}"
        )
    command = f"python bench/bench_faults.py --days {args.days} --kills {args.kills} --seed {args.seed}"
    if args.plan:
        command = f"python bench/bench_faults.py --days {args.days} --plan '{args.plan}'"
    m = machine()
    result = {
        "command": command,
        "machine": f"{m['cores']} cores ({m['cpu']}), {m['memory']}",
        "market": f"{args.symbols} symbols x {args.years} years (seed {args.market_seed}), history file + "
        f"{args.days} daily files",
        "days": args.days,
        "kills": sum(len(day) for day in plan),
        "seed": args.seed,
        "plan": [[asdict(f) for f in day] for day in plan],
        "not_applied": fault_facts["not_applied"],
        "attempts": [as_dict(a) for a in attempts],
        "fault_free": {k: v for k, v in reference.items() if k != "predictions"},
        "faults": {k: v for k, v in other.items() if k != "predictions"},
        "comparison": comparison,
        "code_changed": changed,
        "fault_free_wall_s": reference_run["wall_s"],
        "faults_wall_s": faults_wall,
        "wall_s": time.time() - started + (reference_run["wall_s"] if args.reuse_fault_free else 0.0),
    }
    attempts_path.write_text("".join(json.dumps(as_dict(a)) + "\n" for a in attempts))
    (workdir / "result.json").write_text(json.dumps(result, indent=1, default=str))
    text = section(result)
    (workdir / "section.md").write_text(text)
    print(text)
    return 0 if not comparison["mismatches"] else 1


if __name__ == "__main__":
    sys.exit(main())
