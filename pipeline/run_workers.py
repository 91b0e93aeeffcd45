"""Dead runs free their pool slots: every pooled step records which process runs it, and the sensor
`free_dead_runs` fails a started run whose process is gone (killed with SIGKILL, the machine rebooted).

Dagster's default run launcher has no health check for a run worker: a SIGKILLed run stays "started"
forever and keeps its slot in the `warehouse` or `training` pool (limit 1), so its retry, and every later
run of the pool, waits. The warehouse and storage resources, which every pooled step uses, tag the run
with the process they are set up in (id, start time, host, and the run they were written for: a
re-execution inherits its parent's tags) when a step starts;
the sensor looks at the started runs tagged on this host whose process is no longer alive, reports them
failed (`report_run_failed`, which also makes the run's retry policy apply) and frees their slots.
"""

from __future__ import annotations

import os
import socket

from dagster import DagsterInstance, DagsterRun, DagsterRunStatus, RunsFilter

from modeling.processes import process_alive, process_start_ticks

PID_TAG, START_TAG, HOST_TAG = "run_worker_pid", "run_worker_start", "run_worker_host"
RUN_TAG = "run_worker_run"
"""The run the process tags were written for: a re-executed run inherits its parent's tags (Dagster
copies them), and those name the parent's dead process, not this run's."""


def _worker_tags() -> dict[str, str]:
    pid = os.getpid()
    return {PID_TAG: str(pid), START_TAG: str(process_start_ticks(pid) or ""), HOST_TAG: socket.gethostname()}


def record_run_worker(instance: DagsterInstance | None, run: DagsterRun | None) -> None:
    """Tag `run` with the process executing it (this one), unless it already carries exactly that (an
    inherited tag set may name a process with this id that is not this one)."""
    if instance is None or run is None:
        return
    tags = {**_worker_tags(), RUN_TAG: run.run_id}
    if all(run.tags.get(key) == value for key, value in tags.items()):
        return
    instance.add_run_tags(run.run_id, tags)


def dead_runs(instance: DagsterInstance) -> list[DagsterRun]:
    """Started runs of this host whose recorded process is gone (tags written for the run itself only)."""
    host = socket.gethostname()
    dead = []
    for run in instance.get_runs(RunsFilter(statuses=[DagsterRunStatus.STARTED])):
        pid, start = run.tags.get(PID_TAG), run.tags.get(START_TAG)
        if not pid or run.tags.get(HOST_TAG) != host or run.tags.get(RUN_TAG) != run.run_id:
            continue
        if not process_alive(int(pid), int(start) if start else None):
            dead.append(run)
    return dead


def free_dead_run(instance: DagsterInstance, run: DagsterRun) -> None:
    instance.report_run_failed(run, message=f"the run process {run.tags.get(PID_TAG)} is gone (killed)")
    instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
