"""Operations: a day in the life of the daily retrain, bad input, failures, the schedule and the sensors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import duckdb
import pandas as pd
import pytest
from dagster import (
    AssetKey,
    DagsterInstance,
    DagsterInvalidConfigError,
    build_run_status_sensor_context,
    build_schedule_context,
    build_sensor_context,
    materialize,
)

from modeling.data.synthetic import SyntheticMarketConfig, generate_synthetic_market
from pipeline.assets import ALL_ASSETS
from pipeline.checks import ALL_CHECKS
from pipeline.resources import build_resources
from pipeline.schedules import ON_DEMAND_ASSETS, build_automation, daily_retrain_job, new_files
from pipeline.settings import Settings
from tests.test_pipeline import SMALL_RUN

CHAIN = [a for a in ALL_ASSETS if a.key.to_user_string() not in ON_DEMAND_ASSETS]
RUN_CONFIG = {"ops": {k: v for k, v in SMALL_RUN["ops"].items() if k != "raw_market_data"}}
COLUMNS = ["date", "symbol", "open", "high", "low", "close", "volume", "sector"]


def _snapshot(data_dir: Path) -> dict[str, str]:
    """A content hash of every table and Parquet output (row order ignored)."""
    con = duckdb.connect(str(data_dir / "warehouse.duckdb"), read_only=True)
    out = {}
    try:
        for table in (
            "raw_market_data",
            "raw_market_data_rejects",
            "universe",
            "features",
            "predictions",
            "prediction_performance",
        ):
            frame = con.execute(f"SELECT * FROM {table} ORDER BY ALL").df()
            out[table] = hashlib.sha256(
                pd.util.hash_pandas_object(frame, index=False).values.tobytes()
            ).hexdigest()
    finally:
        con.close()
    for name in ("training_set", "prompt_corpus"):
        frame = pd.read_parquet(data_dir / f"{name}.parquet").sort_values(["date", "symbol", "split"])
        out[name] = hashlib.sha256(
            pd.util.hash_pandas_object(frame, index=False).values.tobytes()
        ).hexdigest()
    return out


def _aliases(settings: Settings) -> dict[str, str | None]:
    from modeling import mlflow_registry

    mlflow_registry.configure(settings.mlflow_tracking_uri, "return-regressor")
    return {
        alias: mlflow_registry.alias_version("return-regressor", alias)
        for alias in ("champion", "challenger")
    }


def _run(settings: Settings, instance: DagsterInstance):
    result = materialize(
        CHAIN + ALL_CHECKS,
        resources=build_resources(settings),
        run_config=RUN_CONFIG,
        instance=instance,
        raise_on_error=False,
    )
    failures = [
        str(e.event_specific_data.error) for e in result.all_events if e.event_type_value == "STEP_FAILURE"
    ]
    assert result.success, failures
    return {
        e.asset_key.to_user_string(): e.materialization.metadata
        for e in result.get_asset_materialization_events()
    }


def test_a_day_in_the_life_of_the_daily_retrain(tmp_path: Path) -> None:
    market = generate_synthetic_market(SyntheticMarketConfig(n_symbols=90, n_years=1.2, seed=5)).frame
    dates = sorted(market["date"].unique())
    source = tmp_path / "market"
    source.mkdir()
    market[market["date"] < dates[-1]][COLUMNS].to_csv(source / "history.csv", index=False)
    settings = Settings.from_env({"DATA_DIR": str(tmp_path / "data"), "MARKET_DATA_PATH": str(source)})
    instance = DagsterInstance.ephemeral()

    first = _run(settings, instance)
    live_1 = pd.Timestamp(dates[-2])
    assert first["predictions"]["live_dates"].value == [str(live_1.date())]
    assert first["regressor"]["retrained"].value is True

    market[market["date"] == dates[-1]][COLUMNS].to_csv(
        source / "day_new.csv", index=False
    )  # day N+1 arrives
    second = _run(settings, instance)
    live_2 = pd.Timestamp(dates[-1])
    assert second["predictions"]["live_dates"].value == [str(live_2.date())]
    assert second["regressor"]["retrained"].value is True  # new data: a new version was trained
    con = duckdb.connect(str(settings.warehouse_path), read_only=True)
    by_date = dict(con.execute("SELECT date, count(*) FROM predictions GROUP BY date").fetchall())
    dupes = con.execute(
        "SELECT count(*) FROM (SELECT date, symbol FROM predictions GROUP BY ALL HAVING count(*) > 1)"
    )
    assert dupes.fetchone()[0] == 0
    raw_dupes = con.execute(
        "SELECT count(*) FROM (SELECT date, symbol FROM raw_market_data GROUP BY ALL HAVING count(*) > 1)"
    )
    assert raw_dupes.fetchone()[0] == 0
    assert set(by_date) == {live_1, live_2}  # yesterday's forecasts stay as the live track record
    # day N's forecasts now have their realised return (h = 1): one row, over every name scored that day
    realised = con.execute("SELECT date, model_version, n_names, rank_ic FROM prediction_performance").df()
    served = con.execute(
        "SELECT any_value(model_version), count(*) FROM predictions WHERE date = ?", [live_1]
    ).fetchone()
    joined = con.execute(
        "SELECT p.prediction, f.fwd_ret FROM predictions p JOIN features f USING (date, symbol) "
        "WHERE date = ?",
        [live_1],
    ).df()
    assert first["prediction_performance"]["dagster/row_count"].value == 0  # nothing realised on day N
    assert second["prediction_performance"]["new_dates"].value == 1
    assert list(realised["date"]) == [live_1] and realised["model_version"][0] == served[0]
    assert realised["n_names"][0] == served[1] == len(joined)
    assert realised["rank_ic"][0] == pytest.approx(joined.rank().corr().iloc[0, 1], abs=1e-12)
    con.close()
    training = pd.read_parquet(settings.data_dir / "training_set.parquet", columns=["date", "split", "label"])
    yesterday = training[training["date"] == live_1]
    assert len(yesterday) and (yesterday["split"] != "live").all() and yesterday["label"].notna().all()
    assert set(training.loc[training["split"] == "live", "date"]) == {live_2}

    before, aliases = _snapshot(settings.data_dir), _aliases(settings)
    third = _run(settings, instance)  # no new file: nothing changes
    assert third["regressor"]["retrained"].value is False
    assert third["base_model"]["rebuilt"].value is False
    assert third["prediction_performance"]["new_dates"].value == 0
    assert _snapshot(settings.data_dir) == before
    assert _aliases(settings) == aliases and aliases["champion"] is not None


def test_an_input_without_data_rows_fails_and_keeps_the_previous_tables(tmp_path: Path) -> None:
    market = generate_synthetic_market(SyntheticMarketConfig(n_symbols=20, n_years=0.5, seed=2)).frame
    good = tmp_path / "good.csv"
    market[COLUMNS].to_csv(good, index=False)
    data = str(tmp_path / "data")
    raw = next(a for a in ALL_ASSETS if a.key == AssetKey("raw_market_data"))
    assert materialize(
        [raw], resources=build_resources(Settings.from_env({"DATA_DIR": data, "MARKET_DATA_PATH": str(good)}))
    ).success
    header_only = tmp_path / "header.csv"
    header_only.write_text(",".join(COLUMNS) + "\n")
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    (empty_dir / "notes.txt").write_text("not market data")
    for bad, message in ((header_only, "no data rows"), (empty_dir, "no CSV or Parquet files")):
        settings = Settings.from_env({"DATA_DIR": data, "MARKET_DATA_PATH": str(bad)})
        result = materialize([raw], resources=build_resources(settings), raise_on_error=False)
        assert not result.success
        error = next(
            e for e in result.all_events if e.event_type_value == "STEP_FAILURE"
        ).event_specific_data.error
        assert message in str(error)
        con = duckdb.connect(str(settings.warehouse_path), read_only=True)
        assert con.execute("SELECT count(*) FROM raw_market_data").fetchone()[0] == len(market)
        con.close()


def test_a_failing_training_child_fails_the_asset_with_its_error_and_leaves_everything_else(
    tmp_path: Path,
) -> None:
    settings = Settings.from_env({"DATA_DIR": str(tmp_path / "data")})
    instance = DagsterInstance.ephemeral()
    serving = (AssetKey("regressor"), AssetKey("predictions"), AssetKey("prediction_performance"))
    upstream = [a for a in CHAIN if a.key not in serving]
    config = {"ops": {k: v for k, v in SMALL_RUN["ops"].items() if k != "regressor"}}
    assert materialize(
        upstream, resources=build_resources(settings), run_config=config, instance=instance
    ).success
    before = _snapshot_files(settings.data_dir)
    regressor = next(a for a in ALL_ASSETS if a.key == AssetKey("regressor"))
    broken = {
        "ops": {"regressor": {"config": {**SMALL_RUN["ops"]["regressor"]["config"], "quantization": "4bit"}}}
    }
    result = materialize(
        [regressor],
        resources=build_resources(settings),
        run_config=broken,
        instance=instance,
        raise_on_error=False,
    )
    assert not result.success
    failure = next(
        e for e in result.all_events if e.event_type_value == "STEP_FAILURE"
    ).event_specific_data.error
    text = str(failure)
    assert "the training process failed" in text and "needs a CUDA GPU" in text  # the child's own error
    assert _snapshot_files(settings.data_dir) == before  # earlier outputs untouched and readable
    from modeling import mlflow_registry

    mlflow_registry.configure(settings.mlflow_tracking_uri, "return-regressor")
    assert mlflow_registry.find_version("return-regressor", "run_id", "x") is None
    assert mlflow_registry.alias_version("return-regressor", "champion") is None  # registry untouched


def _snapshot_files(data_dir: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in (
            data_dir / "training_set.parquet",
            data_dir / "prompt_corpus.parquet",
            data_dir / "warehouse.duckdb",
        )
    }


def test_schedule_and_sensors(tmp_path: Path) -> None:
    source = tmp_path / "market"
    source.mkdir()
    settings = Settings.from_env(
        {
            "DATA_DIR": str(tmp_path / "data"),
            "MARKET_DATA_PATH": str(source),
            "DAILY_RETRAIN_CRON": "0 18 * * 1-5",
        }
    )
    (schedule,), (sensor, failure_sensor, decay_sensor, dead_sensor) = build_automation(settings)
    assert dead_sensor.name == "free_dead_runs"
    assert decay_sensor.name == "retrain_on_decay" and decay_sensor.job_name == daily_retrain_job.name
    assert schedule.cron_schedule == "0 18 * * 1-5" and schedule.execution_timezone == "America/New_York"
    assert schedule.job_name == daily_retrain_job.name
    request = schedule.evaluate_tick(
        build_schedule_context(scheduled_execution_time=pd.Timestamp("2026-11-24 18:00"))
    )
    assert len(request.run_requests) == 1  # the job carries the warehouse=writer tag itself

    (source / "day1.csv").write_text("date,symbol,open,high,low,close,volume\n")
    seen = sensor.evaluate_tick(build_sensor_context())  # first sight: maybe still being written
    assert not seen.run_requests
    first = sensor.evaluate_tick(build_sensor_context(cursor=seen.cursor))  # unchanged for one interval
    assert len(first.run_requests) == 1 and first.run_requests[0].tags["new_files"] == "day1.csv"
    quiet = sensor.evaluate_tick(build_sensor_context(cursor=first.cursor))
    assert not quiet.run_requests
    (source / "day2.csv").write_text("date,symbol,open,high,low,close,volume\n")
    changed, cursor = new_files(source, first.cursor)
    assert changed == []
    changed, _ = new_files(source, cursor)
    assert changed == ["day2.csv"]

    instance = DagsterInstance.ephemeral()
    failing = materialize(
        [next(a for a in ALL_ASSETS if a.key == AssetKey("raw_market_data"))],
        resources=build_resources(settings),
        instance=instance,
        raise_on_error=False,
    )
    assert not failing.success  # header-only files: no data rows
    failure_event = next(e for e in failing.all_events if e.event_type_value == "PIPELINE_FAILURE")
    context = build_run_status_sensor_context(
        sensor_name="log_run_failure",
        dagster_instance=instance,
        dagster_run=failing.dagster_run,
        dagster_event=failure_event,
    ).for_run_failure()
    failure_sensor(context)  # a run-status sensor is invocable with its context, as the daemon calls it
    logged = [
        json.loads(line) for line in (settings.data_dir / "run_failures.jsonl").read_text().splitlines()
    ]
    assert logged[-1]["run_id"] == failing.run_id


@pytest.mark.parametrize("name", ["full_pipeline", "daily_retrain"])
def test_jobs_leave_out_the_search(name: str, monkeypatch, tmp_path) -> None:
    import importlib

    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    import pipeline.definitions

    defs = importlib.reload(pipeline.definitions).defs
    job = defs.get_job_def(name)
    keys = {k.to_user_string() for k in job.asset_layer.selected_asset_keys}
    assert "hyperparameters" not in keys and "backtest" not in keys
    assert {"raw_market_data", "regressor", "predictions", "prediction_performance"} <= keys
    assert job.tags["warehouse"] == "writer"


def test_every_automated_run_takes_the_deployments_run_config(monkeypatch, tmp_path: Path) -> None:
    """DAILY_RETRAIN_CONFIG: the schedule, the new-file sensor and the decay sensor (which adds
    force_retrain) all launch with it, so a gpu deployment's daily retrain is not a cpu-profile run; a
    config the job does not accept fails when the code loads."""
    import importlib

    from pipeline.schedules import forced_retrain_config

    source = tmp_path / "market"
    source.mkdir()
    config_file = tmp_path / "daily.yaml"
    config_file.write_text(  # (an unquoted date stays text, as `dagster job execute -c` reads it)
        "ops:\n  regressor:\n    config:\n      profile: gpu\n      gate_k: 2.0\n"
        "  training_set:\n    config:\n      validation_start: 2020-01-02\n"
    )
    env = {"DATA_DIR": str(tmp_path / "data"), "MARKET_DATA_PATH": str(source)}
    settings = Settings.from_env({**env, "DAILY_RETRAIN_CONFIG": str(config_file)})
    wanted = {
        "ops": {
            "regressor": {"config": {"profile": "gpu", "gate_k": 2.0}},
            "training_set": {"config": {"validation_start": "2020-01-02"}},
        }
    }
    assert settings.retrain_run_config == wanted
    (schedule,), (sensor, *_) = build_automation(settings)
    tick = schedule.evaluate_tick(build_schedule_context(scheduled_execution_time=pd.Timestamp("2026-11-24")))
    assert tick.run_requests[0].run_config == wanted
    (source / "day1.csv").write_text("date,symbol,open,high,low,close,volume\n")
    seen = sensor.evaluate_tick(build_sensor_context())
    assert sensor.evaluate_tick(build_sensor_context(cursor=seen.cursor)).run_requests[0].run_config == wanted
    forced = forced_retrain_config(settings.retrain_run_config)
    assert forced["ops"]["regressor"] == {"config": {"profile": "gpu", "gate_k": 2.0, "force_retrain": True}}
    assert forced["ops"]["training_set"] == wanted["ops"]["training_set"]
    assert settings.retrain_run_config == wanted  # merged into a copy
    # the definitions load with it, and refuse a config the job does not take
    monkeypatch.setenv("DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("DAILY_RETRAIN_CONFIG", str(config_file))
    import pipeline.definitions

    importlib.reload(pipeline.definitions)
    config_file.write_text("ops:\n  regressor:\n    config:\n      profil: gpu\n")
    with pytest.raises(DagsterInvalidConfigError, match="profil"):
        importlib.reload(pipeline.definitions)
    monkeypatch.delenv("DAILY_RETRAIN_CONFIG")
    # so does a BASE_MODEL that names no model: when the code loads, not after the data preparation
    monkeypatch.setenv("BASE_MODEL", str(tmp_path / "typo" / "Meta-Llama-3-8B-Instruct"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        importlib.reload(pipeline.definitions)
    monkeypatch.delenv("BASE_MODEL")
    importlib.reload(pipeline.definitions)  # leave the module as the other tests expect it
    # a missing file and a file without a mapping are refused with the variable's name
    with pytest.raises(ValueError, match="DAILY_RETRAIN_CONFIG names .* not a file"):
        Settings.from_env({**env, "DAILY_RETRAIN_CONFIG": str(tmp_path / "missing.yaml")})
    config_file.write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="must hold a run config mapping"):
        Settings.from_env({**env, "DAILY_RETRAIN_CONFIG": str(config_file)})
