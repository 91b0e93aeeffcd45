"""The Dagster instance this project runs on: `dagster.yaml` in one place, and SQLite storage whose pool
claims are atomic across processes.

Why a storage subclass: the pools (`warehouse`, `training`, limit 1) are only as good as the slot claim,
and Dagster's SQL claim is a sequence of separate statements (is a slot unassigned? queue the step;
pick a free slot row; take it). On PostgreSQL `SELECT ... FOR UPDATE SKIP LOCKED` makes the last two one
step; SQLite ignores it, so two run processes that claim at the same moment can both take the one slot
(measured: 17 of 40 simultaneous claims by two processes succeeded twice; tests/test_instance.py).
`SerialisedSqliteEventLogStorage` runs every claim and every release under one exclusive file lock
next to the event logs, which makes each of them atomic for every process on the machine (SQLite's own
scope: the database is a local file).
"""

from __future__ import annotations

import fcntl
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dagster._core.storage.event_log import SqliteEventLogStorage

POOL_LOCK_FILE = "pool_claims.lock"
MODULE = "pipeline.instance"  # not __name__, which is "__main__" under `python -m`


class SerialisedSqliteEventLogStorage(SqliteEventLogStorage):
    """Dagster's SQLite event log storage with pool-slot claims and releases serialised across processes."""

    @classmethod
    def from_config_value(cls, inst_data, config_value) -> SerialisedSqliteEventLogStorage:
        return cls(inst_data=inst_data, **config_value)

    @contextmanager
    def _claims_locked(self) -> Iterator[None]:
        with open(Path(self._base_dir) / POOL_LOCK_FILE, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)  # released when the handle closes, also if we die
            yield

    def claim_concurrency_slot(self, concurrency_key, run_id, step_key, priority=None):
        with self._claims_locked():
            return super().claim_concurrency_slot(concurrency_key, run_id, step_key, priority)

    def free_concurrency_slot_for_step(self, run_id, step_key) -> None:
        with self._claims_locked():
            super().free_concurrency_slot_for_step(run_id, step_key)

    def free_concurrency_slots_for_run(self, run_id) -> None:
        with self._claims_locked():
            super().free_concurrency_slots_for_run(run_id)

    def initialize_concurrency_limit_to_default(self, concurrency_key) -> bool:
        with self._claims_locked():
            return super().initialize_concurrency_limit_to_default(concurrency_key)

    def set_concurrency_slots(self, concurrency_key, num) -> None:
        with self._claims_locked():
            super().set_concurrency_slots(concurrency_key, num)

    def delete_concurrency_limit(self, concurrency_key) -> None:
        with self._claims_locked():
            super().delete_concurrency_limit(concurrency_key)


def dagster_yaml(home: Path, *, pool_limit: int = 1, warehouse_run_limit: int | None = 1) -> str:
    """The instance configuration: no telemetry; SQLite storage under `home` in Dagster's default layout
    (history/, history/runs/, schedules/) with the serialised event log; every pool `pool_limit` steps
    at a time; runs tagged `warehouse` queue `warehouse_run_limit` at a time (None: no run limit)."""
    home = Path(home).resolve()
    runs = ""
    if warehouse_run_limit is not None:
        limit = f"      - key: warehouse\n        limit: {warehouse_run_limit}\n"
        runs = "  runs:\n    tag_concurrency_limits:\n" + limit
    return (
        "telemetry:\n  enabled: false\n"
        "run_storage:\n  module: dagster._core.storage.runs\n  class: SqliteRunStorage\n"
        f"  config:\n    base_dir: {home / 'history'}\n"
        f"event_log_storage:\n  module: {MODULE}\n  class: {SerialisedSqliteEventLogStorage.__name__}\n"
        f"  config:\n    base_dir: {home / 'history' / 'runs'}\n"
        "schedule_storage:\n  module: dagster._core.storage.schedules\n  class: SqliteScheduleStorage\n"
        f"  config:\n    base_dir: {home / 'schedules'}\n"
        f"concurrency:\n{runs}  pools:\n    default_limit: {pool_limit}\n"
    )


def write_dagster_yaml(home: Path, **options) -> Path:
    """Write `home/dagster.yaml` (creating `home`) and return its path."""
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    path = home / "dagster.yaml"
    path.write_text(dagster_yaml(home, **options))
    return path


if __name__ == "__main__":  # `python -m pipeline.instance DAGSTER_HOME` (the Makefile)
    print(write_dagster_yaml(Path(sys.argv[1])))
