"""The `backtest` asset end to end on a small market: a real kill after the first window, resume, nothing
recomputed on a re-run, the forecasts stored and analysed, the MLflow run, and the refusals of a period
that is not out of sample."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import duckdb
import pandas as pd
import pytest
from dagster import AssetKey, DagsterInstance, materialize

from pipeline.assets import ALL_ASSETS
from pipeline.resources import build_resources
from pipeline.settings import Settings
from tests.test_pipeline import SMALL_RUN

UPSTREAM = ("raw_market_data", "universe", "features", "training_set", "base_model", "prompt_corpus")
BACKTEST_CONFIG = {
    "step": 12,
    "val_dates": 5,
    "topk": 8,
    "n_drop": 2,
    "max_train_samples": 96,
    "batch_size": 16,
    "eval_every_steps": 0,
    "eval_max_dates": 2,
}
MODELS = ("llm", "ridge", "lightgbm", "mlp_features")

_KILLED_SCRIPT = """
import json, sys
from dagster import DagsterInstance, materialize
from pipeline.assets import ALL_ASSETS
from pipeline.resources import build_resources
from pipeline.settings import Settings

backtest = next(a for a in ALL_ASSETS if a.key.to_user_string() == "backtest")
materialize([backtest], resources=build_resources(Settings.from_env()),
            run_config={"ops": {"backtest": {"config": json.loads(sys.argv[1])}}},
            instance=DagsterInstance.ephemeral())
"""


def _asset(name: str):
    return next(a for a in ALL_ASSETS if a.key == AssetKey(name))


def _backtest(settings: Settings, config: dict, raise_on_error: bool = True):
    return materialize(
        [_asset("backtest")],
        resources=build_resources(settings),
        run_config={"ops": {"backtest": {"config": config}}},
        instance=DagsterInstance.ephemeral(),
        raise_on_error=raise_on_error,
    )


@pytest.fixture(scope="module")
def market(tmp_path_factory):
    data = tmp_path_factory.mktemp("backtest") / "data"
    settings = Settings.from_env({"DATA_DIR": str(data)})
    config = {"ops": {k: v for k, v in SMALL_RUN["ops"].items() if k in UPSTREAM}}
    assert materialize(
        [_asset(n) for n in UPSTREAM], resources=build_resources(settings), run_config=config
    ).success
    return settings


def test_a_killed_backtest_resumes_and_a_rerun_recomputes_nothing(market: Settings) -> None:
    import json

    env = {**os.environ, "DATA_DIR": str(market.data_dir), "BACKTEST_KILL_AFTER_WINDOW": "0"}
    killed = subprocess.run(
        [sys.executable, "-c", _KILLED_SCRIPT, json.dumps(BACKTEST_CONFIG)],
        env=env,
        cwd=Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]  # SIGKILL, right after window 0 was stored
    con = duckdb.connect(str(market.warehouse_path), read_only=True)
    stored = con.execute('SELECT run_id, "window" FROM backtest_windows').fetchall()
    con.close()
    assert [w for _, w in stored] == [0]

    result = _backtest(market, BACKTEST_CONFIG)
    meta = {
        k: v.value for k, v in result.get_asset_materialization_events()[0].materialization.metadata.items()
    }
    assert meta["run_id"] == stored[0][0]
    assert meta["windows_reused"] == [0] and meta["windows_trained"] and 0 not in meta["windows_trained"]
    n_windows = 1 + len(meta["windows_trained"])
    assert n_windows >= 3  # the resumed run launched several training processes, each its own Pipes session

    con = duckdb.connect(str(market.warehouse_path), read_only=True)
    rows = con.execute("SELECT * FROM backtest_predictions").df()
    windows = con.execute('SELECT "window" FROM backtest_windows ORDER BY 1').fetchall()
    universe = con.execute(
        "SELECT count(*) FROM features WHERE date BETWEEN ? AND ? AND fwd_ret IS NOT NULL",
        list(meta["date_range"].split(" .. ")),
    ).fetchone()[0]
    con.close()
    assert [w for (w,) in windows] == list(range(n_windows))
    assert set(rows["model"]) == set(MODELS)
    assert not rows.duplicated(["model", "date", "symbol"]).any()
    # every labelled universe row of the period is forecast by every model, each in one window
    assert len(rows) == len(MODELS) * universe
    per_date = rows.groupby("date")["window"].nunique()
    assert (per_date == 1).all()
    comparison = meta["comparison"]
    for model in MODELS:
        assert f"| {model} " in comparison
    assert set(meta["llm_vs_baselines"]) == {"ridge", "lightgbm", "mlp_features"}
    assert "before the period" in meta["backbone"]

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=market.mlflow_tracking_uri)
    run = client.get_run(meta["mlflow_run_id"])
    assert "llm/excess_return_with_cost.information_ratio" in run.data.metrics
    assert "llm/vs_ridge/rank_ic_se" in run.data.metrics
    children = client.search_runs(
        [run.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{run.info.run_id}'"
    )
    assert len(children) == n_windows
    # each window's training process reported its numbers back through Pipes
    for child in children:
        assert child.data.metrics["train_rows"] > 0 and child.data.metrics["score_rows_per_s"] > 0
        # and each model's RankIC of the window comes with its SE and its number of dates (step 12; a
        # model with a constant forecast on a date has no RankIC there, and no SE below 2 dates: NaN
        # metrics are not logged)
        window = child.data.metrics
        assert 2 <= window["llm/n_dates"] <= BACKTEST_CONFIG["step"] and window["llm/RankIC_se"] > 0
        for model in MODELS:
            assert (f"{model}/RankIC_se" in window) == (window[f"{model}/n_dates"] >= 2), model
    assert "± " in meta["rank_ic_by_month"] and " dates)" in meta["rank_ic_by_month"]

    again = _backtest(market, BACKTEST_CONFIG)
    meta2 = {
        k: v.value for k, v in again.get_asset_materialization_events()[0].materialization.metadata.items()
    }
    assert meta2["windows_trained"] == [] and meta2["mlflow_logged_now"] is False
    assert meta2["mlflow_run_id"] == meta["mlflow_run_id"] and meta2["comparison"] == comparison
    con = duckdb.connect(str(market.warehouse_path), read_only=True)
    assert con.execute("SELECT count(*) FROM backtest_predictions").fetchone()[0] == len(rows)
    con.close()


def test_a_period_inside_the_train_split_is_refused(market: Settings) -> None:
    """The label scale and the bucket model are fit on the whole train split: a window there would be
    judged with statistics of its own dates, whatever the backbone (the first validation date is the
    earliest start)."""
    splits = pd.read_parquet(market.data_dir / "training_set.parquet", columns=["date", "split"])
    train_dates = sorted(splits.loc[splits["split"] == "train", "date"].unique())
    start = str(pd.Timestamp(train_dates[-3]).date())
    result = _backtest(market, {**BACKTEST_CONFIG, "period_start": start}, raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert "before the validation split" in str(failure.event_specific_data.error)


def test_a_period_across_the_purge_or_into_live_dates_is_refused() -> None:
    """The dates purged between validation and test (and live dates) have no labelled rows, so no window
    forecasts them: a period holding one would skip it silently, its return lost to every book. Periods
    within one split are kept whole."""
    from pipeline.assets.backtest import BacktestConfig, _period

    calendar = pd.bdate_range("2022-01-03", periods=30)
    day = [str(d.date()) for d in calendar]
    splits = {"train": [day[0], day[9]], "validation": [day[11], day[19]], "test": [day[21], day[27]]}
    assert list(_period(calendar, splits, BacktestConfig())) == list(calendar[21:28])  # the test split
    inside = BacktestConfig(period_start=day[12], period_end=day[18])
    assert list(_period(calendar, splits, inside)) == list(calendar[12:19])
    for start, end, gaps in ((day[15], day[24], day[20]), (day[22], day[29], f"{day[28]}, {day[29]}")):
        with pytest.raises(ValueError, match=f"without labelled rows in the training set \\({gaps}\\)"):
            _period(calendar, splits, BacktestConfig(period_start=start, period_end=end))


def test_a_backbone_pretrained_into_the_period_is_refused(tmp_path: Path) -> None:
    """An embedded backbone kept from an earlier training set may have read prompts past today's train
    split: it must end before the period, and a publisher's backbone is not checked."""
    import json

    from modeling.backbones.common import EMBEDDED_MODEL_INFO_FILE
    from pipeline.assets.backtest import _refuse_leaky_backbone

    info = {"pretrain_train_dates": ["2020-01-02", "2021-06-30"]}
    (tmp_path / EMBEDDED_MODEL_INFO_FILE).write_text(json.dumps(info))
    with pytest.raises(ValueError, match="inside the backtest period"):
        _refuse_leaky_backbone("embedded", tmp_path, pd.Timestamp("2021-06-30"))
    note = _refuse_leaky_backbone("embedded", tmp_path, pd.Timestamp("2021-07-01"))
    assert "2021-06-30, before the period" in note
    assert "publisher" in _refuse_leaky_backbone("directory", tmp_path, pd.Timestamp("2021-01-01"))


def test_the_search_asset_stores_its_study_and_writes_the_best_settings(market: Settings) -> None:
    """`hyperparameters` (on demand) end to end on the same small market: trials run, the best trial is
    re-scored on every validation date, hyperparameters.json is written, and a second run adds trials to
    the stored study."""
    import json

    def search(n_trials: int):
        config = {
            "n_trials": n_trials,
            "steps": [6],
            "batch_sizes": [8],
            "losses": ["mse", "huber"],  # (an ic trial's date groups of 16 need batches of 16 or more)
            "eval_every_steps": 3,
            "eval_max_dates": 2,
            "objective_dates": 2,
        }
        result = materialize(
            [_asset("hyperparameters")],
            resources=build_resources(market),
            run_config={"ops": {"hyperparameters": {"config": config}}},
            instance=DagsterInstance.ephemeral(),
        )
        event = result.get_asset_materialization_events()[0]
        return {k: v.value for k, v in event.materialization.metadata.items()}

    meta = search(2)
    best = json.loads((market.data_dir / "hyperparameters.json").read_text())
    frame = pd.read_parquet(market.data_dir / "training_set.parquet", columns=["date", "split", "label"])
    n_validation = frame[(frame["split"] == "validation") & frame["label"].notna()]["date"].nunique()
    assert meta["n_new_trials"] == 2 and best["n_trials_in_study"] == 2
    assert best["best_val_n_dates"] == n_validation > 2  # judged on 2 dates, re-scored on every one
    assert best["best_val_rank_ic_se"] > 0 and best["best_params"] == meta["best_params"]
    assert (best["best_params"]["max_steps"], best["best_params"]["batch_size"]) == (6, 8)  # the space given
    assert meta["trials"].count("\n") >= 3  # header, rule and a row per trial
    # the run trained on its own snapshot of the inputs, in the study of its (non-default) space
    assert list((market.data_dir / "runs" / "search").glob("*/inputs/prompt_corpus.parquet"))
    assert best["study"].startswith("regressor-search-") and best["study"] != "regressor-search"
    assert search(1)["n_trials_in_study"] == 3  # the study is stored: a new run adds to it


def test_windows_evaluate_only_at_the_end_when_evaluations_decide_nothing(monkeypatch) -> None:
    from dataclasses import replace

    from modeling.profiles import PROFILES
    from pipeline.assets.backtest import BacktestConfig, _profile_configs

    cpu = PROFILES["cpu"].train
    assert cpu.early_stopping_patience is None and not cpu.select_best and cpu.eval_every_steps > 0
    assert _profile_configs(BacktestConfig())[2].eval_every_steps == 0  # final weights, no early stop
    assert _profile_configs(BacktestConfig(eval_every_steps=100))[2].eval_every_steps == 100  # asked for
    # a profile whose evaluations pick the saved checkpoint or stop the run keeps its cadence
    for decides in ({"select_best": True}, {"early_stopping_patience": 3}):
        monkeypatch.setitem(
            PROFILES, "cpu", replace(PROFILES["cpu"], train=replace(cpu, eval_every_steps=375, **decides))
        )
        assert _profile_configs(BacktestConfig())[2].eval_every_steps == 375


def test_windows_train_on_the_profiles_processes_and_rows(monkeypatch) -> None:
    """A window launches its training as `regressor` does: the cpu profile one process, the gpu profile one
    per visible GPU on every train row, an explicit `num_processes` wins."""
    import importlib
    from types import SimpleNamespace

    from modeling.profiles import PROFILES

    asset = importlib.import_module("pipeline.assets.backtest")  # the module (the package exports the asset)
    launching = importlib.import_module("pipeline.training_process")

    monkeypatch.setattr(launching, "visible_gpus", lambda: 4)
    assert asset.BacktestConfig().processes(PROFILES["cpu"]) == 1
    gpu = asset.BacktestConfig(profile="gpu")
    train = asset._profile_configs(gpu)[2]
    assert train.max_train_samples is None  # every train row
    # one process per GPU, as many as the batch holds whole date groups for (32 rows: 2 groups of 16)
    assert gpu.processes(PROFILES["gpu"], train) == 2
    wider = replace(train, batch_size=128)
    assert gpu.processes(PROFILES["gpu"], wider) == 4
    assert gpu.processes(PROFILES["gpu"], replace(train, loss="mse", date_group_size=0)) == 4
    asked = asset.BacktestConfig(profile="gpu", num_processes=3)
    assert asked.processes(PROFILES["gpu"], train) == 3  # kept as asked
    monkeypatch.setattr(launching, "visible_gpus", lambda: 0)
    assert gpu.processes(PROFILES["gpu"], train) == 1  # no GPU here: one process

    calls = []

    def fake_run(context, client, job, processes, accelerate_config, what):
        calls.append((job, processes, accelerate_config, what))
        result = SimpleNamespace(metadata={"score_s": SimpleNamespace(value=1.5)})
        return SimpleNamespace(get_materialize_result=lambda: result), None

    monkeypatch.setattr(asset, "run_training_process", fake_run)
    assert asset._train_window(None, None, "job", 4, "multi_gpu.yaml") == {"score_s": 1.5}
    assert calls == [("job", 4, "multi_gpu.yaml", "window training")]
