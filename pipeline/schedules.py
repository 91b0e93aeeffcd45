"""The daily retrain: one asset job over the chain, its schedule, a sensor on new market data files,
and a run-failure sensor.

Each run ingests every file again (the tables are replaced in one transaction, so re-reading is
idempotent), rebuilds downstream, retrains only when its inputs changed (the `regressor` asset skips
when a registered version was trained on identical inputs), promotes only through the champion gate,
and writes the live predictions. The search (`hyperparameters`) is on demand, not in this job.

DuckDB takes one writer per file: the job runs in one process (in-process executor) and carries the
tag `warehouse=writer`, which the instance's run queue limits to one run at a time (the
`dagster.yaml` written by `make dev`/`make demo`); a run that still finds the file locked waits on it.

The sensor `new_market_data_file` reads complete files only. Every tick (at most once a minute) it
records the (size, mtime_ns) of each data file of the `MARKET_DATA_PATH` directory (the files
`modeling.data.ingest.discover_files` reads: `SUPPORTED_SUFFIXES`, directly inside). A file counts as
complete once its size and modification time are the same at two consecutive ticks, i.e. unchanged for
one sensor interval. Because a run ingests every file, a run is requested only when every data file is
complete and at least one of them is new or changed since the last run it requested (a re-sent or
revised file triggers again once it is stable); while any file is still changing, the tick skips and
says which. One run request covers all such files; its run key is a hash of the directory's
(name, size, mtime_ns) state, so Dagster does not launch the same state twice. A missing directory or
one without data files skips with a message. Writers that can, should still write to a temporary name
(for example `day.csv.part`, which is not a data file) and rename it when done.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from dagster import (
    AssetCheckKey,
    AssetKey,
    AssetSelection,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    RunFailureSensorContext,
    RunRequest,
    ScheduleDefinition,
    SensorDefinition,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    define_asset_job,
    run_failure_sensor,
    sensor,
)

from modeling.data.ingest import SUPPORTED_SUFFIXES, discover_files
from pipeline.settings import Settings

WAREHOUSE_TAG = {"warehouse": "writer"}
"""Runs that write the warehouse; the run queue admits one at a time (see dagster.yaml)."""

ON_DEMAND_ASSETS = ("hyperparameters", "backtest")
"""Assets no job materialises: the user asks for them (UI or CLI)."""

daily_retrain_job = define_asset_job(
    "daily_retrain",
    selection=AssetSelection.all() - AssetSelection.assets(*ON_DEMAND_ASSETS),
    description="Ingest -> universe -> features -> training set -> prompts -> retrain (when inputs changed) "
    "-> champion gate -> predictions -> realised performance of past predictions. Not the hyperparameter "
    "search.",
    tags=WAREHOUSE_TAG,
)


Signature = tuple[int, int]
"""(size in bytes, st_mtime_ns) of a data file."""

CURSOR_VERSION = 2


@dataclass(frozen=True)
class DirectoryScan:
    """One sensor tick's look at the market-data directory."""

    files: dict[str, Signature]
    """Every data file now, by name."""
    settling: list[str]
    """Files new or changed since the previous tick: possibly still being written."""
    ready: list[str]
    """Complete files not yet run in this version; empty while any file is settling."""
    cursor: str
    """The cursor after this tick (it records `ready` as run: request a run whenever `ready`)."""
    request_number: int = 0
    """Runs this cursor has requested, this tick's included."""

    @property
    def run_key(self) -> str:
        """The directory's state and the request's number: a cursor lost and started again asks for its
        first state under the same key (Dagster launches it once), while a state seen before and then left
        (a bad file replaced, and the good one restored with its old mtime) is a new request, so the
        warehouse does not keep the bad file's data."""
        state = json.dumps(sorted((name, *sig) for name, sig in self.files.items()))
        return f"{hashlib.sha256(state.encode()).hexdigest()[:16]}-{self.request_number}"


def _observe(market_data_path: Path) -> dict[str, Signature]:
    """(size, mtime_ns) of every data file (`discover_files`); {} when there is none or no directory."""
    try:
        paths = discover_files(market_data_path)
    except FileNotFoundError:  # a missing directory, or one without data files
        return {}
    files = {}
    for path in paths:
        try:
            stat = path.stat()
        except FileNotFoundError:  # removed (or renamed) since it was listed
            continue
        files[path.name] = (stat.st_size, stat.st_mtime_ns)
    return files


def _signatures(value: object) -> dict[str, Signature]:
    """{name: (size, mtime_ns)} from a cursor's JSON; entries of another shape are dropped."""
    if not isinstance(value, dict):
        return {}
    return {
        name: (sig[0], sig[1])
        for name, sig in value.items()
        if isinstance(sig, list) and len(sig) == 2 and all(type(v) is int for v in sig)
    }


def _load_cursor(
    cursor: str | None, files: dict[str, Signature]
) -> tuple[dict[str, Signature], dict[str, Signature]]:
    """(seen at the previous tick, last requested run) from a cursor; both empty for none or garbage.

    The cursor of the first version, {name: mtime_ns} of the files of the last run, is read as both:
    a file whose mtime is unchanged since then counts as complete and already run (no rerun after an
    upgrade), any other file as new.
    """
    try:
        state = json.loads(cursor) if cursor else {}
    except ValueError:
        return {}, {}
    if not isinstance(state, dict):
        return {}, {}
    if state.get("version") == CURSOR_VERSION:
        return _signatures(state.get("seen")), _signatures(state.get("ran"))
    legacy = {
        name: sig for name, sig in files.items() if type(state.get(name)) is int and state[name] == sig[1]
    }
    return legacy, dict(legacy)


def scan_directory(market_data_path: Path, cursor: str | None) -> DirectoryScan:
    """Compare the directory with the previous tick's `cursor` (see the module docstring for the rule)."""
    files = _observe(market_data_path)
    seen, ran = _load_cursor(cursor, files)
    requests = _requests(cursor)
    settling = sorted(name for name, sig in files.items() if seen.get(name) != sig)
    ready = [] if settling else sorted(name for name, sig in files.items() if ran.get(name) != sig)
    # Forget files that are gone: one that comes back is new again (its run key dedups an identical state).
    ran = {name: sig for name, sig in ran.items() if name in files} | {name: files[name] for name in ready}
    requests += bool(ready)
    new_cursor = json.dumps(
        {
            "version": CURSOR_VERSION,
            "seen": {name: list(sig) for name, sig in files.items()},
            "ran": {name: list(sig) for name, sig in ran.items()},
            "requests": requests,
        },
        sort_keys=True,
    )
    return DirectoryScan(
        files=files, settling=settling, ready=ready, cursor=new_cursor, request_number=requests
    )


def _requests(cursor: str | None) -> int:
    """The runs a cursor has requested (0 for none, garbage or a cursor from before the count)."""
    try:
        state = json.loads(cursor) if cursor else {}
    except ValueError:
        return 0
    count = state.get("requests") if isinstance(state, dict) else None
    return count if type(count) is int and count >= 0 else 0


def new_files(market_data_path: Path, cursor: str | None) -> tuple[list[str], str]:
    """Complete data files that are new or changed since the last run `cursor` requested; the new cursor.

    Empty while any data file is still changing (see the module docstring); pass the new cursor to the
    next call whether or not a run is requested.
    """
    result = scan_directory(market_data_path, cursor)
    return result.ready, result.cursor


DECAY_CHECK = AssetCheckKey(AssetKey("prediction_performance"), "champion_still_works")
FORCED_RETRAIN_CONFIG = {"ops": {"regressor": {"config": {"force_retrain": True}}}}
"""The decay sensor's run config when DAILY_RETRAIN_CONFIG is unset (`forced_retrain_config({})`)."""


def forced_retrain_config(run_config: dict) -> dict:
    """`run_config` (DAILY_RETRAIN_CONFIG) with the regressor's `force_retrain` set, in a copy: the decay
    sensor's run trains with the deployment's settings, not the defaults."""
    config = copy.deepcopy(run_config)
    config.setdefault("ops", {}).setdefault("regressor", {}).setdefault("config", {})["force_retrain"] = True
    return config


DECAY_HISTORY = 20
"""Evaluated records of champion_still_works the decay sensor reads, newest planned first: runs queued
behind an evaluated one plan records too, so the newest evaluation is looked for among several."""


@dataclass(frozen=True)
class DecayDecision:
    request: bool
    reason: str
    cursor: str


def decay_retrain_decision(
    evaluated_us: int | None,
    failed: bool,
    cursor: str | None,
    now: float,
    cooldown_s: float,
    record_id: int | None = None,
) -> DecayDecision:
    """Should `retrain_on_decay` request a forced retrain for the latest `champion_still_works`
    evaluation (`evaluated_us`, its evaluation time in microseconds, which grows with the evaluation
    order; None = never evaluated)?

    Each evaluation is acted on once (the cursor keeps the last one seen, `evaluated_us`); a failed one
    requests a run unless a run was requested less than `cooldown_s` seconds before `now`. A cursor of
    the earlier code kept the check record's id instead (`check_id`): an evaluation whose `record_id` is
    not above it was seen already."""
    try:
        state = json.loads(cursor) if cursor else {}
    except ValueError:
        state = {}
    state = state if isinstance(state, dict) else {}
    last_seen, last_request = state.get("evaluated_us"), state.get("requested_at")
    if evaluated_us is None:
        return DecayDecision(False, "champion_still_works has not been evaluated yet", cursor or "")
    seen = json.dumps({"evaluated_us": evaluated_us, "requested_at": last_request})
    legacy = state.get("check_id")
    if last_seen is None and isinstance(legacy, int) and record_id is not None and record_id <= legacy:
        return DecayDecision(False, "no new evaluation of champion_still_works", seen)
    if isinstance(last_seen, int) and evaluated_us <= last_seen:
        return DecayDecision(False, "no new evaluation of champion_still_works", cursor or "")
    if not failed:
        return DecayDecision(False, "the champion still works", seen)
    if isinstance(last_request, (int, float)) and now - last_request < cooldown_s:
        wait_h = (cooldown_s - (now - last_request)) / 3600
        return DecayDecision(
            False,
            f"the champion decayed, but a retrain was requested within the cooldown "
            f"({cooldown_s / 3600:g} h; {wait_h:.1f} h left)",
            seen,
        )
    return DecayDecision(
        True,
        "the champion's realised RankIC fell below its floor: forced retrain",
        json.dumps({"evaluated_us": evaluated_us, "requested_at": now}),
    )


def _new_market_data_sensor(settings: Settings) -> SensorDefinition:
    """The sensor that requests a daily_retrain run when the market data directory has new, complete files."""
    watched = settings.market_data_path

    @sensor(
        name="new_market_data_file",
        job=daily_retrain_job,
        minimum_interval_seconds=60,
        # running for a directory, also one that is not there yet (mounted later: the sensor skips with a
        # message until it appears); stopped when there is nothing to watch (unset, or a single file)
        default_status=DefaultSensorStatus.RUNNING
        if watched is not None and not watched.is_file()
        else DefaultSensorStatus.STOPPED,
        description="Requests a daily_retrain run when a new or changed file in the MARKET_DATA_PATH "
        "directory is complete (size and mtime unchanged for one interval).",
    )
    def new_market_data_file(context: SensorEvaluationContext):
        if watched is None:
            return SkipReason("MARKET_DATA_PATH is not set: nothing to watch")
        if watched.is_file():
            return SkipReason(f"MARKET_DATA_PATH {watched} is a file, not a directory: nothing to watch")
        result = scan_directory(watched, context.cursor)  # a missing directory: no files
        if not result.files:
            reason = (
                f"MARKET_DATA_PATH {watched} does not exist"
                if not watched.exists()
                else f"no data files ({', '.join(SUPPORTED_SUFFIXES)}) in {watched}"
            )
            return SensorResult(skip_reason=reason, cursor=result.cursor)
        if result.settling:
            reason = (
                f"waiting for {len(result.settling)} file(s) to stop changing for one interval: "
                + ", ".join(result.settling)[:500]
            )
            return SensorResult(skip_reason=reason, cursor=result.cursor)
        if not result.ready:
            return SensorResult(skip_reason="no new or changed market data file", cursor=result.cursor)
        request = RunRequest(
            run_key=result.run_key,
            run_config=settings.retrain_run_config,
            tags={**WAREHOUSE_TAG, "trigger": "new_market_data", "new_files": ",".join(result.ready)[:200]},
        )
        return SensorResult(run_requests=[request], cursor=result.cursor)

    return new_market_data_file


def _run_failure_sensor(settings: Settings) -> SensorDefinition:
    """The sensor that logs every failed run (and appends it to DATA_DIR/run_failures.jsonl)."""
    failures = settings.data_dir / "run_failures.jsonl"

    @run_failure_sensor(
        name="log_run_failure",
        default_status=DefaultSensorStatus.RUNNING,
        description="Logs every failed run with its run id (and appends it to DATA_DIR/run_failures.jsonl).",
    )
    def log_run_failure(context: RunFailureSensorContext):
        run = context.dagster_run
        message = context.failure_event.message or "failed"
        context.log.error(f"run {run.run_id} of job {run.job_name} failed: {message}")
        record = {
            "run_id": run.run_id,
            "job": run.job_name,
            "message": message,
            "logged_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        failures.parent.mkdir(parents=True, exist_ok=True)
        with failures.open("a") as f:
            f.write(json.dumps(record) + "\n")

    return log_run_failure


def _decay_retrain_sensor(settings: Settings) -> SensorDefinition:
    """The sensor that requests a forced retrain when the check champion_still_works fails."""
    cooldown_s = settings.decay_retrain_cooldown_hours * 3600

    @sensor(
        name="retrain_on_decay",
        job=daily_retrain_job,
        minimum_interval_seconds=60,
        default_status=DefaultSensorStatus.RUNNING,
        description="When the check champion_still_works fails (the serving champion's realised RankIC fell "
        "below its floor), requests a daily_retrain run with force_retrain, at most once per "
        f"{settings.decay_retrain_cooldown_hours:g} h (DECAY_RETRAIN_COOLDOWN_HOURS). The new model goes "
        "through the same champion gate.",
    )
    def retrain_on_decay(context: SensorEvaluationContext):
        from dagster._core.storage.asset_check_execution_record import AssetCheckExecutionRecordStatus

        # the newest *evaluated* record: a queued run plans its own record at creation, and the newest
        # record (planned, not evaluated) would hide an older run's failure
        finished = context.instance.event_log_storage.get_asset_check_execution_history(
            DECAY_CHECK,
            limit=DECAY_HISTORY,
            status={AssetCheckExecutionRecordStatus.SUCCEEDED, AssetCheckExecutionRecordStatus.FAILED},
        )
        record = max(finished, key=lambda r: r.event.timestamp, default=None)  # by evaluation order
        evaluated_us = int(record.event.timestamp * 1_000_000) if record is not None else None
        decision = decay_retrain_decision(
            evaluated_us,
            record is not None and record.status == AssetCheckExecutionRecordStatus.FAILED,
            context.cursor,
            time.time(),
            cooldown_s,
            record.id if record is not None else None,
        )
        if not decision.request:
            return SensorResult(skip_reason=decision.reason, cursor=decision.cursor)
        request = RunRequest(
            run_key=f"decay-retrain-{evaluated_us}",
            run_config=forced_retrain_config(settings.retrain_run_config),
            tags={**WAREHOUSE_TAG, "trigger": "champion_decay", "decay_check_run": record.run_id},
        )
        return SensorResult(run_requests=[request], cursor=decision.cursor)

    return retrain_on_decay


def _free_dead_runs_sensor() -> SensorDefinition:
    """The sensor that fails every started run whose process is gone and frees its pool slots."""

    @sensor(
        name="free_dead_runs",
        minimum_interval_seconds=60,
        default_status=DefaultSensorStatus.RUNNING,
        description="Fails every started run whose process is gone (SIGKILL, reboot) and frees its pool "
        "slots, so that its retry and later runs of the pool do not wait forever (see pipeline.run_workers).",
    )
    def free_dead_runs(context: SensorEvaluationContext):
        from pipeline.run_workers import dead_runs, free_dead_run

        dead = dead_runs(context.instance)
        for run in dead:
            free_dead_run(context.instance, run)
            context.log.warning(
                f"run {run.run_id} of {run.job_name}: its process is gone; failed, slots freed"
            )
        return SkipReason(f"{len(dead)} dead run(s) failed and freed" if dead else "no dead run")

    return free_dead_runs


def build_automation(settings: Settings) -> tuple[list, list]:
    """(schedules, sensors) for these settings."""
    schedule = ScheduleDefinition(
        name="daily_retrain_schedule",
        job=daily_retrain_job,
        cron_schedule=settings.retrain_cron,
        execution_timezone=settings.retrain_timezone,
        run_config=settings.retrain_run_config,
        default_status=DefaultScheduleStatus.RUNNING,
        description=f"Daily retrain at '{settings.retrain_cron}' ({settings.retrain_timezone}).",
    )
    sensors = [
        _new_market_data_sensor(settings),
        _run_failure_sensor(settings),
        _decay_retrain_sensor(settings),
        _free_dead_runs_sensor(),
    ]
    return [schedule], sensors
