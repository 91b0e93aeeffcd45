"""A run whose process is SIGKILLed keeps its pool slot until `free_dead_runs` fails it (real kill)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from modeling.processes import process_alive, process_start_ticks

ROOT = Path(__file__).resolve().parents[1]

_KILLED_RUN = """
import os, signal
from dagster import DagsterInstance, asset, materialize
from pipeline.resources import WAREHOUSE_POOL, StorageResource, build_resources
from pipeline.settings import Settings

@asset(pool=WAREHOUSE_POOL)
def doomed(storage: StorageResource) -> None:
    os.kill(os.getpid(), signal.SIGKILL)  # the run process dies inside a pooled step

materialize([doomed], resources=build_resources(Settings.from_env()), instance=DagsterInstance.get())
"""


def test_process_alive_sees_death_zombies_and_reused_ids() -> None:
    assert process_alive(os.getpid(), process_start_ticks(os.getpid()))
    assert not process_alive(os.getpid(), (process_start_ticks(os.getpid()) or 0) + 1)  # another process
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while process_alive(child.pid) and time.monotonic() < deadline:  # exits, stays a zombie until reaped
        time.sleep(0.05)
    assert not process_alive(child.pid)
    child.wait()
    assert not process_alive(child.pid)


def test_a_killed_run_is_failed_and_its_pool_slot_freed(tmp_path: Path) -> None:
    from dagster import DagsterInstance, DagsterRunStatus, build_sensor_context

    from pipeline.instance import write_dagster_yaml
    from pipeline.run_workers import PID_TAG
    from pipeline.schedules import build_automation
    from pipeline.settings import Settings

    home = tmp_path / "home"
    home.mkdir()
    write_dagster_yaml(home)  # the instance `make` writes
    env = {**os.environ, "DAGSTER_HOME": str(home), "DATA_DIR": str(tmp_path / "data")}
    os.environ["DAGSTER_HOME"] = str(home)
    try:
        instance = DagsterInstance.get()
        instance.get_runs(limit=1)  # create the stores before another process opens them
        instance.event_log_storage.get_concurrency_info("warehouse")
        done = subprocess.run([sys.executable, "-c", _KILLED_RUN], env=env, cwd=ROOT, capture_output=True)
        assert done.returncode == -9, done.stderr[-2000:]
        (run,) = instance.get_runs()
        assert run.status == DagsterRunStatus.STARTED and run.tags[PID_TAG]  # what the launcher leaves
        assert instance.event_log_storage.get_concurrency_info("warehouse").claimed_slots  # the held slot

        sensor = next(s for s in build_automation(Settings.from_env(env))[1] if s.name == "free_dead_runs")
        result = sensor(build_sensor_context(instance=instance))
        assert "1 dead run" in result.skip_message
        assert instance.get_run_by_id(run.run_id).status == DagsterRunStatus.FAILURE
        assert not instance.event_log_storage.get_concurrency_info("warehouse").claimed_slots
        assert "no dead run" in sensor(build_sensor_context(instance=instance)).skip_message
    finally:
        os.environ.pop("DAGSTER_HOME", None)


def test_tags_inherited_from_a_dead_parent_run_do_not_kill_its_re_execution() -> None:
    """A re-executed run starts with its parent's tags (Dagster copies them): they name the parent's dead
    process. Until this run's own worker tags it, it is not reported dead; once tagged, it is, if its
    process dies. A worker whose id equals the inherited one still writes its own tags."""
    import socket

    from dagster import DagsterInstance, DagsterRun, DagsterRunStatus

    from pipeline.run_workers import HOST_TAG, PID_TAG, RUN_TAG, START_TAG, dead_runs, record_run_worker

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # a process id that is gone
    with DagsterInstance.ephemeral() as instance:
        parent_tags = {
            PID_TAG: str(child.pid),
            START_TAG: "1",
            HOST_TAG: socket.gethostname(),
            RUN_TAG: "the-parent-run",
        }
        retry = instance.add_run(
            DagsterRun(
                job_name="daily_retrain",
                run_id="retry-run",
                status=DagsterRunStatus.STARTED,
                tags=parent_tags,
            )
        )
        assert dead_runs(instance) == []  # inherited tags: not this run's process
        instance.add_run_tags(retry.run_id, {RUN_TAG: retry.run_id})  # tagged for itself, process gone
        assert [r.run_id for r in dead_runs(instance)] == ["retry-run"]
        # this process records itself over inherited tags that happen to carry its own id
        instance.add_run_tags(
            retry.run_id, {PID_TAG: str(os.getpid()), START_TAG: "1", RUN_TAG: "the-parent-run"}
        )
        record_run_worker(instance, instance.get_run_by_id(retry.run_id))
        tags = instance.get_run_by_id(retry.run_id).tags
        assert tags[RUN_TAG] == "retry-run" and tags[START_TAG] == str(process_start_ticks(os.getpid()))
        assert dead_runs(instance) == []  # alive
