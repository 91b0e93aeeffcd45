"""The `new_market_data_file` sensor reads complete files only: real files, real sensor ticks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from dagster import DefaultSensorStatus, build_sensor_context

from pipeline.schedules import build_automation, new_files
from pipeline.settings import Settings

HEADER = "date,symbol,open,high,low,close,volume,sector\n"
ROW = "2026-01-02,AAA,1,2,0.5,1.5,100,Tech\n"
BASE_NS = 1_767_000_000_000_000_000  # a fixed mtime, so ticks never depend on the clock's resolution


def _sensor(tmp_path: Path, market: Path):
    settings = Settings.from_env({"DATA_DIR": str(tmp_path / "data"), "MARKET_DATA_PATH": str(market)})
    _, sensors = build_automation(settings)
    return next(s for s in sensors if s.name == "new_market_data_file")


def _write(path: Path, text: str, mtime_ns: int) -> None:
    path.write_text(text)
    os.utime(path, ns=(mtime_ns, mtime_ns))


class Ticks:
    """Evaluates the sensor tick after tick, carrying the cursor like the daemon does."""

    def __init__(self, sensor) -> None:
        self.sensor = sensor
        self.cursor: str | None = None
        self.run_keys: list[str] = []

    def __call__(self):
        result = self.sensor.evaluate_tick(build_sensor_context(cursor=self.cursor))
        if result.cursor is not None:
            json.loads(result.cursor)  # JSON-serialisable
            self.cursor = result.cursor
        self.run_keys += [r.run_key for r in result.run_requests or []]
        return result


def test_growing_file_triggers_one_run_once_stable(tmp_path: Path) -> None:
    market = tmp_path / "market"
    market.mkdir()
    tick = Ticks(_sensor(tmp_path, market))
    day = market / "day1.csv"

    _write(day, HEADER, BASE_NS)  # tick 1: the file appears
    first = tick()
    assert not first.run_requests and "day1.csv" in first.skip_message

    _write(day, HEADER + ROW, BASE_NS + 10**9)  # tick 2: it grew
    second = tick()
    assert not second.run_requests and "day1.csv" in second.skip_message

    third = tick()  # tick 3: unchanged for one interval
    assert len(third.run_requests) == 1
    request = third.run_requests[0]
    assert request.tags["new_files"] == "day1.csv"
    assert request.tags["trigger"] == "new_market_data" and request.tags["warehouse"] == "writer"
    assert request.run_key

    fourth = tick()  # tick 4: still unchanged
    assert not fourth.run_requests and fourth.skip_message
    assert tick.run_keys == [request.run_key]


def _one_file_that_ran(tmp_path: Path) -> tuple[Ticks, Path]:
    """A watched directory whose one file has settled and been requested: (the ticks, the file)."""
    market = tmp_path / "market"
    market.mkdir()
    tick = Ticks(_sensor(tmp_path, market))
    day = market / "day1.csv"
    _write(day, HEADER + ROW, BASE_NS)
    tick()
    assert len(tick().run_requests) == 1
    return tick, day


def test_revised_file_triggers_again_once_stable(tmp_path: Path) -> None:
    tick, day = _one_file_that_ran(tmp_path)

    _write(day, HEADER + ROW.replace("100", "200"), BASE_NS + 5 * 10**9)  # same size, new mtime: re-sent
    assert not tick().run_requests  # seen changed: it may still be being written
    again = tick()
    assert len(again.run_requests) == 1 and again.run_requests[0].tags["new_files"] == "day1.csv"
    assert not tick().run_requests
    assert len(tick.run_keys) == 2 and len(set(tick.run_keys)) == 2  # a new state: Dagster launches it


def test_stable_files_are_batched_and_wait_for_files_in_progress(tmp_path: Path) -> None:
    market = tmp_path / "market"
    market.mkdir()
    tick = Ticks(_sensor(tmp_path, market))
    _write(market / "a.csv", HEADER + ROW, BASE_NS)
    _write(market / "b.parquet", "not really parquet", BASE_NS)
    (market / "notes.txt").write_text("not a data file")
    (market / "c.csv.part").write_text(HEADER)  # a writer's temporary name: not a data file
    assert not tick().run_requests
    both = tick()
    assert len(both.run_requests) == 1 and both.run_requests[0].tags["new_files"] == "a.csv,b.parquet"

    # A new file is being written: a.csv and b.parquet are already run, and no run reads c.csv half-written.
    _write(market / "c.csv", HEADER, BASE_NS + 10**9)
    _write(market / "a.csv", HEADER + ROW + ROW, BASE_NS + 10**9)  # and a.csv is revised meanwhile
    assert not tick().run_requests
    _write(market / "c.csv", HEADER + ROW, BASE_NS + 2 * 10**9)
    waiting = tick()
    assert (
        not waiting.run_requests and "c.csv" in waiting.skip_message and "a.csv" not in waiting.skip_message
    )
    done = tick()
    assert len(done.run_requests) == 1 and done.run_requests[0].tags["new_files"] == "a.csv,c.csv"
    assert not tick().run_requests
    assert len(set(tick.run_keys)) == len(tick.run_keys) == 2


def test_run_key_is_the_directory_state(tmp_path: Path) -> None:
    """The same complete state gives the same run key (Dagster launches it once), even from a lost cursor."""
    market = tmp_path / "market"
    market.mkdir()
    sensor = _sensor(tmp_path, market)
    _write(market / "day1.csv", HEADER + ROW, BASE_NS)
    first, second = Ticks(sensor), Ticks(sensor)
    for ticks in (first, second):
        ticks()
        ticks()
    assert first.run_keys == second.run_keys and len(first.run_keys) == 1

    os.utime(market / "day1.csv", ns=(BASE_NS + 1, BASE_NS + 1))  # touched: a new state, a new key
    first()
    first()
    assert len(first.run_keys) == 2 and first.run_keys[0] != first.run_keys[1]


def test_a_restored_earlier_state_runs_again(tmp_path: Path) -> None:
    """A bad file replaces a good one and runs; the good one is restored with its old mtime (`cp -p`):
    the directory is back in a state it had, but the warehouse holds the bad file's data, so it runs
    again under a new key (Dagster drops a request whose key it has seen)."""
    tick, day = _one_file_that_ran(tmp_path)
    _write(day, HEADER + ROW.replace("100", "999"), BASE_NS + 10**9)  # the bad version
    tick()
    assert len(tick().run_requests) == 1
    _write(day, HEADER + ROW, BASE_NS)  # the good one back, old mtime and all
    tick()
    assert len(tick().run_requests) == 1
    assert len(tick.run_keys) == 3 and len(set(tick.run_keys)) == 3
    assert tick.run_keys[0].split("-")[0] == tick.run_keys[2].split("-")[0]  # the same directory state


def test_empty_directory_skips(tmp_path: Path) -> None:
    market = tmp_path / "market"
    market.mkdir()
    (market / "readme.txt").write_text("no data here")
    tick = Ticks(_sensor(tmp_path, market))
    result = tick()
    assert not result.run_requests and "no data files" in result.skip_message
    assert new_files(market, None)[0] == []


def test_missing_directory_skips_and_recovers(tmp_path: Path) -> None:
    market = tmp_path / "market"
    # a directory mounted after the code loads: the sensor runs from the start and skips until it appears
    assert _sensor(tmp_path, market).default_status == DefaultSensorStatus.RUNNING
    tick = Ticks(_sensor(tmp_path, market))
    result = tick()
    assert not result.run_requests and "does not exist" in result.skip_message
    assert new_files(market, None)[0] == []

    market.mkdir()
    _write(market / "day1.csv", HEADER + ROW, BASE_NS)
    assert not tick().run_requests
    assert len(tick().run_requests) == 1
    # a single file, or nothing set, has no directory to watch: stopped
    assert _sensor(tmp_path, market / "day1.csv").default_status == DefaultSensorStatus.STOPPED


def test_file_removed_between_ticks(tmp_path: Path) -> None:
    market = tmp_path / "market"
    market.mkdir()
    tick = Ticks(_sensor(tmp_path, market))
    _write(market / "a.csv", HEADER + ROW, BASE_NS)
    _write(market / "b.csv", HEADER + ROW, BASE_NS)
    tick()
    assert len(tick().run_requests) == 1
    (market / "b.csv").unlink()
    assert not tick().run_requests  # a removal alone requests nothing
    (market / "a.csv").unlink()
    assert "no data files" in tick().skip_message


@pytest.mark.parametrize("cursor", ["not json", "[1, 2]", '{"version": 2, "seen": 3, "ran": {"x": "y"}}'])
def test_unreadable_cursor_is_a_fresh_start(tmp_path: Path, cursor: str) -> None:
    market = tmp_path / "market"
    market.mkdir()
    _write(market / "day1.csv", HEADER + ROW, BASE_NS)
    tick = Ticks(_sensor(tmp_path, market))
    tick.cursor = cursor
    assert not tick().run_requests
    assert len(tick().run_requests) == 1


def test_first_version_cursor(tmp_path: Path) -> None:
    """{name: mtime_ns} (the cursor before this rule): unchanged files are not run again, others are."""
    market = tmp_path / "market"
    market.mkdir()
    _write(market / "old.csv", HEADER + ROW, BASE_NS)
    _write(market / "new.csv", HEADER + ROW, BASE_NS + 10**9)
    tick = Ticks(_sensor(tmp_path, market))
    tick.cursor = json.dumps({"old.csv": BASE_NS, "gone.csv": BASE_NS})
    assert not tick().run_requests  # new.csv: first seen
    result = tick()
    assert len(result.run_requests) == 1 and result.run_requests[0].tags["new_files"] == "new.csv"

    tick.cursor = json.dumps({"old.csv": BASE_NS, "new.csv": BASE_NS + 10**9})
    assert not tick().run_requests and not tick().run_requests  # both already run before the upgrade


def test_new_files_helper(tmp_path: Path) -> None:
    market = tmp_path / "market"
    market.mkdir()
    _write(market / "day1.csv", HEADER + ROW, BASE_NS)
    ready, cursor = new_files(market, None)
    assert ready == []
    ready, cursor = new_files(market, cursor)
    assert ready == ["day1.csv"]
    assert new_files(market, cursor)[0] == []
