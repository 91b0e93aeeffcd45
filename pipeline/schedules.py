"""The daily retrain: one asset job over the chain, its schedule, a sensor on new market data files,
and a run-failure sensor.

Each run ingests every file again (the tables are replaced in one transaction, so re-reading is
idempotent), rebuilds downstream, retrains only when its inputs changed (the `regressor` asset skips
when a registered version was trained on identical inputs), promotes only through the champion gate,
and writes the live predictions. The search (`hyperparameters`) is on demand, not in this job.

DuckDB takes one writer per file: the job runs in one process (in-process executor) and carries the
tag `warehouse=writer`, which the instance's run queue limits to one run at a time (the
`dagster.yaml` written by `make dev`/`make demo`); a run that still finds the file locked waits on it.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path

from dagster import (
    AssetSelection,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    RunFailureSensorContext,
    RunRequest,
    ScheduleDefinition,
    SensorEvaluationContext,
    SkipReason,
    define_asset_job,
    run_failure_sensor,
    sensor,
)

from modeling.data.ingest import discover_files
from pipeline.settings import Settings

WAREHOUSE_TAG = {"warehouse": "writer"}
"""Runs that write the warehouse; the run queue admits one at a time (see dagster.yaml)."""

daily_retrain_job = define_asset_job(
    "daily_retrain",
    selection=AssetSelection.all() - AssetSelection.assets("hyperparameters"),
    description="Ingest -> universe -> features -> training set -> prompts -> retrain (when inputs changed) "
    "-> champion gate -> predictions. Not the hyperparameter search.",
    tags=WAREHOUSE_TAG,
)


def new_files(market_data_path: Path, cursor: str | None) -> tuple[list[str], str]:
    """Data files of the directory that are new or changed since `cursor`; the new cursor."""
    files = {p.name: p.stat().st_mtime_ns for p in discover_files(market_data_path)}
    seen = json.loads(cursor) if cursor else {}
    changed = sorted(name for name, mtime in files.items() if seen.get(name) != mtime)
    return changed, json.dumps(files, sort_keys=True)


def build_automation(settings: Settings) -> tuple[list, list]:
    """(schedules, sensors) for these settings."""
    schedule = ScheduleDefinition(
        name="daily_retrain_schedule",
        job=daily_retrain_job,
        cron_schedule=settings.retrain_cron,
        execution_timezone=settings.retrain_timezone,
        default_status=DefaultScheduleStatus.RUNNING,
        description=f"Daily retrain at '{settings.retrain_cron}' ({settings.retrain_timezone}).",
    )
    watched = settings.market_data_path

    @sensor(
        name="new_market_data_file",
        job=daily_retrain_job,
        minimum_interval_seconds=60,
        default_status=DefaultSensorStatus.RUNNING
        if watched and watched.is_dir()
        else DefaultSensorStatus.STOPPED,
        description="Requests a daily_retrain run when a new or changed file appears in MARKET_DATA_PATH.",
    )
    def new_market_data_file(context: SensorEvaluationContext):
        if watched is None or not watched.is_dir():
            return SkipReason("MARKET_DATA_PATH is not a directory: nothing to watch")
        changed, cursor = new_files(watched, context.cursor)
        if not changed:
            return SkipReason("no new market data file")
        context.update_cursor(cursor)
        run_key = hashlib.sha256(cursor.encode()).hexdigest()[:16]
        return RunRequest(
            run_key=run_key,
            tags={**WAREHOUSE_TAG, "trigger": "new_market_data", "new_files": ",".join(changed)[:200]},
        )

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

    return [schedule], [new_market_data_file, log_run_failure]
