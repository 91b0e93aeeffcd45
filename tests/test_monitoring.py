"""Live monitoring: realised performance of served forecasts, the decay rule, the retrain-on-decay sensor."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest
from dagster import DagsterInstance, build_sensor_context, materialize
from scipy.stats import spearmanr

from modeling.data.predictions import rank_predictions, rows_to_publish, write_predictions
from modeling.metrics import newey_west_se
from modeling.monitoring import (
    PERFORMANCE_COLUMNS,
    DecayRule,
    daily_performance,
    decay_floor,
    decay_verdict,
    performance_table,
    realised_forecasts,
    window_mean_se,
    with_rolling_means,
    write_performance,
)
from pipeline.assets.prediction_performance import prediction_performance
from pipeline.checks import champion_still_works
from pipeline.resources import build_resources
from pipeline.schedules import FORCED_RETRAIN_CONFIG, build_automation, decay_retrain_decision
from pipeline.settings import Settings

RET = np.array([2, -1, 0, 1, -3, 4, 0, 3, -2, 6]) / 128  # mean 1/128 exactly: name 3 sits on it


def _one_date() -> tuple[pd.DataFrame, pd.DataFrame]:
    day = pd.Timestamp("2024-01-02")
    symbols = [f"S{i}" for i in range(10)]
    predictions = pd.DataFrame(
        {"date": day, "symbol": symbols, "prediction": np.arange(1.0, 11.0), "model_version": "3"}
    )
    outcomes = pd.DataFrame({"date": day, "symbol": symbols, "fwd_ret": RET})
    return predictions, outcomes


def test_daily_performance_against_a_hand_computation() -> None:
    predictions, outcomes = _one_date()
    row = daily_performance(realised_forecasts(predictions, outcomes)).iloc[0]
    assert row["model_version"] == "3" and row["n_names"] == 10
    assert row["ic"] == pytest.approx(np.corrcoef(np.arange(1, 11), RET)[0, 1], abs=1e-12)
    assert row["rank_ic"] == pytest.approx(spearmanr(np.arange(1, 11), RET).statistic, abs=1e-12)
    # top decile = the highest forecast (6/128), bottom = the lowest (2/128)
    assert row["decile_spread"] == pytest.approx(4 / 128, abs=1e-15)
    # forecast sides: 5 below, 5 above the mean 5.5; return sides vs 1/128: name 3 sits on it (left out);
    # hits: names 1, 2, 4 (below/below), 5, 7, 9 (above/above); misses: 0, 6, 8 -> 6 of 9
    assert row["hit_rate"] == pytest.approx(6 / 9, abs=1e-15)


def test_unrealised_rows_are_left_out_and_duplicates_refused() -> None:
    predictions, outcomes = _one_date()
    outcomes.loc[0, "fwd_ret"] = np.nan  # not known yet
    realised = realised_forecasts(predictions, outcomes.drop(index=1))  # and one without an outcome row
    assert len(realised) == 8 and set(realised["symbol"]) == {f"S{i}" for i in range(2, 10)}
    with pytest.raises(ValueError, match="duplicate"):
        realised_forecasts(pd.concat([predictions, predictions.head(1)]), outcomes)
    assert daily_performance(realised.iloc[:0]).empty


def test_rolling_means_cover_the_last_20_and_60_dates() -> None:
    rng = np.random.default_rng(0)
    n = 25
    daily = pd.DataFrame(
        {
            "date": pd.bdate_range("2024-01-01", periods=n)[::-1],  # any order in, date order out
            "model_version": "1",
            "n_names": 50,
            "ic": rng.normal(size=n),
            "rank_ic": rng.normal(size=n),
            "decile_spread": rng.normal(size=n),
            "hit_rate": rng.uniform(size=n),
        }
    )
    daily.loc[3, "rank_ic"] = np.nan  # a date without a RankIC is skipped inside its windows
    out = with_rolling_means(daily)
    assert out["date"].is_monotonic_increasing
    ordered = daily.sort_values("date")["rank_ic"].to_numpy()
    assert out["rank_ic_mean_20"].iloc[-1] == pytest.approx(np.nanmean(ordered[-20:]), abs=1e-12)
    assert out["rank_ic_mean_60"].iloc[-1] == pytest.approx(np.nanmean(ordered), abs=1e-12)
    assert out["rank_ic_mean_20"].iloc[0] == pytest.approx(ordered[0])
    # the dates with a RankIC in each window (the NaN date sits at position 21 in date order)
    assert list(out["n_dates_20"].iloc[[0, 19, 24]]) == [1, 20, 19]
    assert out["n_dates_60"].iloc[-1] == 24
    # the SE of each window's mean RankIC, by hand: std (ddof 1) / sqrt(n) over its defined dates at h = 1
    last20 = ordered[-20:][np.isfinite(ordered[-20:])]
    assert out["rank_ic_se_20"].iloc[-1] == pytest.approx(np.std(last20, ddof=1) / np.sqrt(19), rel=1e-12)
    assert np.isnan(out["rank_ic_se_20"].iloc[0])  # one date: no spread to take
    at_h5 = with_rolling_means(daily, horizon=5)["rank_ic_se_60"].iloc[-1]
    assert at_h5 >= out["rank_ic_se_60"].iloc[-1] * np.sqrt(5) - 1e-12  # overlapping labels: wider


def test_writing_the_same_table_twice_changes_nothing(tmp_path: Path) -> None:
    predictions, outcomes = _one_date()
    table = performance_table(predictions, outcomes)
    assert list(table.columns) == list(PERFORMANCE_COLUMNS)
    con = duckdb.connect(str(tmp_path / "w.duckdb"))
    assert write_performance(con, table) == {"dates": 1, "new_dates": 1, "changed_dates": 0}
    first = con.execute("SELECT * FROM prediction_performance").df()
    assert write_performance(con, table) == {"dates": 1, "new_dates": 0, "changed_dates": 0}
    pd.testing.assert_frame_equal(con.execute("SELECT * FROM prediction_performance").df(), first)
    revised = performance_table(predictions, outcomes.assign(fwd_ret=RET[::-1]))  # a revised return
    assert write_performance(con, revised)["changed_dates"] == 1
    assert con.execute("SELECT count(*) FROM prediction_performance").fetchone()[0] == 1
    # a table written by the earlier version (no rank_ic_se columns) is recreated with them in the write
    con.execute("ALTER TABLE prediction_performance DROP COLUMN rank_ic_se_20")
    assert write_performance(con, table) == {"dates": 1, "new_dates": 0, "changed_dates": 1}
    assert list(con.execute("SELECT * FROM prediction_performance").df().columns) == list(PERFORMANCE_COLUMNS)


def test_the_decay_floor_and_verdict() -> None:
    assert decay_floor(0.05, 0.01) == (0.0, "zero")  # val - 2 SE = 0.03 > 0: the lower one is 0
    floor, rule = decay_floor(0.01, 0.01)
    assert rule == "validation - 2 SE" and floor == pytest.approx(-0.01)
    assert decay_floor(0.05, 0.01, configured=0.02) == (0.02, "configured")
    assert decay_floor(float("nan"), float("nan")) == (0.0, "zero")  # no validation score: floor 0

    dates = pd.bdate_range("2024-01-01", periods=30)
    perf = pd.DataFrame({"date": dates, "model_version": ["1"] * 10 + ["2"] * 20, "rank_ic": 0.0})
    perf.loc[:9, "rank_ic"] = -0.5  # the old champion's bad days do not count against v2
    perf.loc[10:, "rank_ic"] = np.linspace(-0.03, 0.01, 20)  # mean -0.01
    ok = decay_verdict(perf, "2", 0.01, 0.01)
    assert ok.n_dates == 20 and ok.realised_rank_ic == pytest.approx(-0.01) and ok.passed  # -0.01 >= -0.01
    bad = decay_verdict(perf, "2", 0.05, 0.01)
    assert not bad.passed and bad.floor == 0.0 and "< floor" in bad.reason
    young = decay_verdict(perf, "2", 0.05, 0.01, DecayRule(window=25))
    assert young.passed and young.n_dates == 20 and "25 are needed" in young.reason
    assert not decay_verdict(perf, "2", 0.05, 0.01, DecayRule(window=25, min_dates=20)).passed
    assert decay_verdict(perf, "9", 0.05, 0.01).n_dates == 0  # a new champion has no record yet
    with pytest.raises(ValueError, match="min_dates"):
        DecayRule(window=5, min_dates=6)


def test_the_decay_floor_counts_the_noise_of_the_realised_window() -> None:
    """20 realised dates are noisier than 179 validation dates: the floor is validation - 2 SE of the
    difference of the two means, so a champion whose noisy window sits within that is not flagged."""
    assert decay_floor(0.01, 0.005) == (0.0, "zero")  # the validation SE alone: floor 0
    floor, rule = decay_floor(0.01, 0.005, window_se=0.02)
    assert rule == "validation - 2 SE" and floor == pytest.approx(0.01 - 2 * np.sqrt(0.005**2 + 0.02**2))
    assert decay_floor(0.01, 0.005, window_se=float("nan")) == (0.0, "zero")  # one date: no window SE

    daily = -0.012 + 0.1 * (-1.0) ** np.arange(20)  # mean -0.012, swinging +-0.1 day to day
    perf = pd.DataFrame(
        {"date": pd.bdate_range("2024-01-01", periods=20), "model_version": "2", "rank_ic": daily}
    )
    verdict = decay_verdict(perf, "2", 0.01, 0.005)
    window_se = np.std(daily, ddof=1) / np.sqrt(20)
    assert verdict.realised_rank_ic_se == pytest.approx(window_se)
    assert verdict.floor == pytest.approx(0.01 - 2 * np.hypot(0.005, window_se))
    assert verdict.passed and verdict.realised_rank_ic == pytest.approx(-0.012)
    calm = perf.assign(rank_ic=-0.012 + 0.001 * (-1.0) ** np.arange(20))  # the same mean, a precise one
    assert not decay_verdict(perf.iloc[:0], "2", 0.01, 0.005).n_dates
    assert not decay_verdict(calm, "2", 0.01, 0.005).passed
    # with a horizon of 5: Newey-West with lag 4, but never below the classic SE x sqrt(5), which 20
    # overlapping dates would otherwise understate
    lagged = decay_verdict(perf, "2", 0.01, 0.005, DecayRule(horizon=5))
    expected = max(newey_west_se(daily, 4), np.std(daily, ddof=1) / np.sqrt(20) * np.sqrt(5))
    assert lagged.realised_rank_ic_se == pytest.approx(expected)
    assert lagged.realised_rank_ic_se > newey_west_se(daily, 4)  # the alternating series: lag 4 shrinks it
    trending = np.linspace(-0.05, 0.05, 20)  # strongly autocorrelated: Newey-West is the larger one
    assert window_mean_se(trending, 5) == pytest.approx(
        max(newey_west_se(trending, 4), np.std(trending, ddof=1) / np.sqrt(20) * np.sqrt(5))
    )
    assert window_mean_se(trending, 1) == pytest.approx(np.std(trending, ddof=1) / np.sqrt(20))


def test_retrain_decision_acts_once_per_evaluation_and_once_per_cooldown() -> None:
    day = 86400.0
    first = decay_retrain_decision(7, True, None, now=1000.0, cooldown_s=day)
    assert first.request
    again = decay_retrain_decision(7, True, first.cursor, now=1060.0, cooldown_s=day)
    assert not again.request and "no new evaluation" in again.reason
    cooling = decay_retrain_decision(8, True, first.cursor, now=1000.0 + day / 2, cooldown_s=day)
    assert not cooling.request and "cooldown" in cooling.reason
    assert json.loads(cooling.cursor)["evaluated_us"] == 8
    passed = decay_retrain_decision(9, False, cooling.cursor, now=1000.0 + day + 1, cooldown_s=day)
    assert not passed.request
    later = decay_retrain_decision(10, True, passed.cursor, now=1000.0 + day + 1, cooldown_s=day)
    assert later.request  # the cooldown is over
    assert not decay_retrain_decision(None, False, None, now=0.0, cooldown_s=day).request
    assert decay_retrain_decision(3, True, "not json", now=0.0, cooldown_s=day).request
    # a cursor of the earlier code kept the check record's id: the evaluation it saw is not acted on again
    # after the upgrade (its time in microseconds is far above any record id), a newer record is
    legacy = json.dumps({"check_id": 5, "requested_at": 0.0})
    upgraded = decay_retrain_decision(
        1_700_000_000_000_000, True, legacy, now=day * 3, cooldown_s=day, record_id=5
    )
    assert not upgraded.request and "no new evaluation" in upgraded.reason
    assert json.loads(upgraded.cursor)["evaluated_us"] == 1_700_000_000_000_000  # migrated
    newer = decay_retrain_decision(
        1_700_000_000_000_001, True, legacy, now=day * 3, cooldown_s=day, record_id=6
    )
    assert newer.request


def _register_champion(tracking_uri: str, tmp_path: Path, val: float, se: float) -> str:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    client.create_registered_model("return-regressor")
    source = tmp_path / "model_files"
    source.mkdir()
    version = client.create_model_version(
        "return-regressor", str(source), tags={"val_rank_ic": str(val), "val_rank_ic_se": str(se)}
    ).version
    client.set_registered_model_alias("return-regressor", "champion", version)
    return str(version)


def test_an_older_live_date_keeps_the_forecast_served_on_it() -> None:
    """With a 3-day horizon the live rows span 3 dates. The next day's run (a new champion) writes only
    its new date; a re-run the same day re-scores that newest date; an older date missing from the table
    (never served) is filled in."""
    con = duckdb.connect()
    days = pd.bdate_range("2024-01-01", periods=5)

    def run(dates: pd.DatetimeIndex, version: str) -> None:
        rows = pd.DataFrame([(d, s) for d in dates for s in ("A", "B", "C")], columns=["date", "symbol"])
        table = rank_predictions(rows.assign(prediction=np.arange(len(rows), dtype=float)), version)
        write_predictions(con, rows_to_publish(con, table))

    def served() -> dict[str, str]:
        table = con.execute("SELECT DISTINCT date, model_version FROM predictions ORDER BY date").df()
        assert not table["date"].duplicated().any()  # one version per date
        return {str(d.date()): v for d, v in zip(table["date"], table["model_version"], strict=True)}

    run(days[1:4], "1")
    run(days[2:5], "2")  # the next day, a new champion
    assert served() == {"2024-01-02": "1", "2024-01-03": "1", "2024-01-04": "1", "2024-01-05": "2"}
    run(days[2:5], "3")  # the same day again after another promotion: the newest date is re-scored
    assert served()["2024-01-05"] == "3" and served()["2024-01-04"] == "1"
    run(days[0:5], "3")  # a date before the table's first: never served, so written
    assert served()["2024-01-01"] == "3" and served()["2024-01-02"] == "1"
    assert con.execute("SELECT count(*) FROM predictions").fetchone()[0] == 5 * 3
    # revised inputs changed an older date's live universe: that date is scored again, whole
    rows = pd.DataFrame([(d, s) for d in days[2:5] for s in ("A", "B", "C")], columns=["date", "symbol"])
    rows.loc[len(rows)] = (days[2], "D")
    table = rank_predictions(rows.assign(prediction=np.arange(len(rows), dtype=float)), "4")
    write_predictions(con, rows_to_publish(con, table))
    assert served()["2024-01-03"] == "4" and served()["2024-01-04"] == "1" and served()["2024-01-05"] == "4"
    assert con.execute("SELECT count(*) FROM predictions WHERE date = '2024-01-03'").fetchone()[0] == 4


def _serve(
    con: duckdb.DuckDBPyConnection, dates: pd.DatetimeIndex, version: str, sign: float, seed: int
) -> None:
    """Forecasts of `version` on `dates` and the returns that followed: sign +1 = they rank the returns
    well, -1 = the returns came out in the reverse order (a planted decay)."""
    rng = np.random.default_rng(seed)
    symbols = [f"S{i:02d}" for i in range(40)]
    rows = pd.DataFrame([(d, s) for d in dates for s in symbols], columns=["date", "symbol"])
    rows["prediction"] = rng.normal(size=len(rows))
    write_predictions(con, rank_predictions(rows, version))
    outcomes = rows.assign(fwd_ret=0.01 * (sign * rows["prediction"] + 0.5 * rng.normal(size=len(rows))))
    con.execute(
        "CREATE TABLE IF NOT EXISTS features "
        "(date TIMESTAMP, symbol VARCHAR, fwd_ret DOUBLE, fwd_horizon INTEGER)"
    )
    con.register("_o", outcomes[["date", "symbol", "fwd_ret"]])
    con.execute("INSERT INTO features SELECT *, 1 FROM _o")
    con.unregister("_o")


def test_a_planted_decay_trips_the_check_and_requests_one_retrain_within_the_cooldown(tmp_path: Path) -> None:
    settings = Settings.from_env({"DATA_DIR": str(tmp_path / "data")})
    version = _register_champion(settings.mlflow_tracking_uri, tmp_path, val=0.05, se=0.01)
    resources = build_resources(settings)
    instance = DagsterInstance.ephemeral()
    sensor = next(s for s in build_automation(settings)[1] if s.name == "retrain_on_decay")

    def run() -> tuple[dict, bool, str | None]:
        result = materialize(
            [prediction_performance, champion_still_works], resources=resources, instance=instance
        )
        assert result.success
        meta = result.get_asset_materialization_events()[0].materialization.metadata
        check = result.get_asset_check_evaluations()[0]
        return {k: v.value for k, v in meta.items()}, check.passed, check.metadata["reason"].value

    dates = pd.bdate_range("2024-01-01", periods=45)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(str(settings.warehouse_path))
    _serve(con, dates[:25], version, sign=1.0, seed=1)
    con.close()
    meta, passed, reason = run()
    assert meta["dagster/row_count"] == 25 and meta["new_dates"] == 25
    assert meta["rank_ic_mean_20"] > 0.5 and passed, reason
    cursor = sensor(build_sensor_context(instance=instance)).cursor  # a passing check requests nothing

    con = duckdb.connect(str(settings.warehouse_path))
    _serve(con, dates[25:], version, sign=-1.0, seed=2)  # 20 new days: the returns turned against it
    con.close()
    meta, passed, reason = run()
    assert meta["new_dates"] == 20 and meta["changed_dates"] == 0 and meta["rank_ic_mean_20"] < -0.5
    assert not passed and "< floor 0.0000 (zero)" in reason

    first = sensor(build_sensor_context(instance=instance, cursor=cursor))
    assert len(first.run_requests) == 1
    assert first.run_requests[0].run_config == FORCED_RETRAIN_CONFIG
    assert first.run_requests[0].tags["trigger"] == "champion_decay"

    before = duckdb.connect(str(settings.warehouse_path), read_only=True)
    table = before.execute("SELECT * FROM prediction_performance ORDER BY date").df()
    before.close()
    meta, passed, _ = run()  # the same day again: nothing new, nothing duplicated, still failing
    assert meta["new_dates"] == 0 and meta["changed_dates"] == 0 and meta["dagster/row_count"] == 45
    after = duckdb.connect(str(settings.warehouse_path), read_only=True)
    pd.testing.assert_frame_equal(
        after.execute("SELECT * FROM prediction_performance ORDER BY date").df(), table
    )
    after.close()
    assert not passed
    second = sensor(build_sensor_context(instance=instance, cursor=first.cursor))
    assert not second.run_requests and "cooldown" in second.skip_reason.skip_message


def test_a_run_queued_after_a_failed_decay_check_does_not_hide_it(tmp_path: Path) -> None:
    """Dagster plans a check record when a run is created, queued or not. The sensor acts on the newest
    *evaluated* record: a run waiting behind the failed one (a new file arrived) must not hide it."""
    from dagster import (
        AssetCheckResult,
        AssetCheckSeverity,
        Definitions,
        asset,
        asset_check,
        define_asset_job,
    )
    from dagster._core.execution.api import create_execution_plan

    @asset(name="prediction_performance")
    def performance():
        return 1

    @asset_check(asset="prediction_performance", name="champion_still_works")
    def still_works():
        return AssetCheckResult(passed=False, severity=AssetCheckSeverity.WARN)

    defs = Definitions(
        assets=[performance], asset_checks=[still_works], jobs=[define_asset_job("daily_retrain")]
    )
    job = defs.resolve_job_def("daily_retrain")
    instance = DagsterInstance.ephemeral()
    sensor = next(
        s
        for s in build_automation(Settings.from_env({"DATA_DIR": str(tmp_path)}))[1]
        if s.name == "retrain_on_decay"
    )
    assert "not been evaluated" in sensor(build_sensor_context(instance=instance)).skip_reason.skip_message
    assert materialize([performance, still_works], instance=instance).success  # evaluated: failed
    instance.create_run_for_job(job_def=job, execution_plan=create_execution_plan(job))  # queued behind it
    history = instance.event_log_storage.get_asset_check_execution_history(still_works.check_key, limit=5)
    assert [r.status.value for r in history] == ["PLANNED", "FAILED"]
    tick = sensor(build_sensor_context(instance=instance))
    assert len(tick.run_requests) == 1 and tick.run_requests[0].run_config == FORCED_RETRAIN_CONFIG
    # the same evaluation is acted on once
    again = sensor(build_sensor_context(instance=instance, cursor=tick.cursor))
    assert not again.run_requests and "no new evaluation" in again.skip_reason.skip_message
