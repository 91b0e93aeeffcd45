"""The Dagster layer: the whole chain materialises in-process on a small synthetic market."""

import importlib
import json
import os
import shutil
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from dagster import AssetCheckSeverity, AssetKey, DagsterInstance, materialize

from modeling.backbones.common import load_backbone, load_tokenizer
from pipeline.assets import ALL_ASSETS
from pipeline.checks import (
    ALL_CHECKS,
    exactly_16_feature_columns,
    features_finite,
    first_feature_date_after_warmup,
    prompts_cover_training_set,
    prompts_fit_context,
    splits_are_purged,
    weights_are_normalised,
)
from pipeline.instance import write_dagster_yaml
from pipeline.resources import StorageResource, WarehouseResource, build_resources
from pipeline.schedules import ON_DEMAND_ASSETS
from pipeline.settings import Settings

SMALL_RUN = {
    "ops": {
        "raw_market_data": {"config": {"synthetic_n_symbols": 90, "synthetic_years": 1.2}},
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
            }
        },
    }
}
CHAIN = [a for a in ALL_ASSETS if a.key.to_user_string() not in ON_DEMAND_ASSETS]
WARNINGS = {"regressor_beats_baselines"}  # warning severity: a tiny model on a tiny market may not win
COMMON_METADATA = {"dagster/row_count", "date_range", "symbol_count", "preview"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("data")
    settings = Settings.from_env({"DATA_DIR": str(data_dir)})
    instance = DagsterInstance.ephemeral()
    result = materialize(
        CHAIN + ALL_CHECKS, resources=build_resources(settings), run_config=SMALL_RUN, instance=instance
    )
    return result, settings, instance


def test_chain_materialises_with_all_checks_passing(run):
    result, _, _ = run
    assert result.success
    checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    assert len(checks) == len(ALL_CHECKS), checks
    assert all(passed for name, passed in checks.items() if name not in WARNINGS), checks
    materialised = {e.asset_key for e in result.get_asset_materialization_events()}
    assert materialised == {AssetKey(a.key.path) for a in CHAIN}


def test_every_asset_has_group_kinds_description_and_metadata(run):
    result, _, _ = run
    groups = {}
    for asset in ALL_ASSETS:
        spec = next(iter(asset.specs))
        groups[spec.key.to_user_string()] = spec.group_name
        assert spec.kinds and spec.description and spec.code_version, asset.key
    assert groups == {
        "raw_market_data": "data",
        "universe": "data",
        "features": "features",
        "training_set": "training",
        "base_model": "training",
        "prompt_corpus": "training",
        "hyperparameters": "training",
        "regressor": "training",
        "predictions": "serving",
        "prediction_performance": "serving",
        "backtest": "evaluation",
    }
    for event in result.get_asset_materialization_events():
        keys = set(event.materialization.metadata)
        if event.asset_key not in (AssetKey("base_model"), AssetKey("regressor")):
            assert keys >= COMMON_METADATA, (event.asset_key, keys)
        assert event.materialization.metadata, event.asset_key


def test_outputs_are_real_tables_and_files(run):
    result, settings, _ = run
    con = duckdb.connect(str(settings.warehouse_path), read_only=True)
    counts = dict(con.execute("SELECT table_name, estimated_size FROM duckdb_tables()").fetchall())
    assert {"raw_market_data", "raw_market_data_rejects", "universe", "features"} <= set(counts)
    per_date = con.execute("SELECT max(n) FROM (SELECT count(*) n FROM universe GROUP BY date)").fetchone()[0]
    assert per_date == 40
    n_features = con.execute("SELECT count(*) FROM features").fetchone()[0]
    training = con.execute(
        "SELECT split, count(*) FROM training_set GROUP BY split"
    ).fetchall()  # DuckDB view
    assert {s for s, _ in training} == {"train", "validation", "test", "live"}
    prompts = pd.read_parquet(settings.data_dir / "prompt_corpus.parquet")
    assert list(prompts.columns) == ["date", "symbol", "split", "label", "weight", "prompt", "n_tokens"]
    assert len(prompts) == sum(n for _, n in training) <= n_features
    assert prompts["prompt"].str.startswith("<|begin_of_text|><|start_header_id|>system").all()
    assert (prompts["n_tokens"] > 100).all()
    meta = {e.asset_key: e.materialization.metadata for e in result.get_asset_materialization_events()}
    assert meta[AssetKey("prompt_corpus")]["mean_tokens_per_prompt"].value == pytest.approx(
        prompts["n_tokens"].mean(), abs=0.01
    )
    assert 0.0 < meta[AssetKey("raw_market_data")]["oracle_ic_universe"].value < 0.2
    assert (settings.data_dir / "reports" / "training_set_buckets.png").stat().st_size > 1000


def test_base_model_loads_through_from_pretrained(run):
    _, settings, _ = run
    path = settings.data_dir / "models" / "base_model"
    tokenizer = load_tokenizer(path)
    model = load_backbone(path)
    ids = tokenizer("Stock ABC", return_tensors="pt")
    assert model(**ids).last_hidden_state.shape == (1, ids["input_ids"].shape[1], 32)


def test_failed_ingest_keeps_the_previous_good_table(run, tmp_path):
    _, settings, _ = run
    bad = tmp_path / "bad.csv"
    bad.write_text("date,symbol,close\n20200101,AAA,1\n")
    broken = Settings.from_env({"DATA_DIR": str(settings.data_dir), "MARKET_DATA_PATH": str(bad)})
    con = duckdb.connect(str(settings.warehouse_path), read_only=True)
    before = con.execute("SELECT count(*), sum(close) FROM raw_market_data").fetchone()
    con.close()
    result = materialize([ALL_ASSETS[0]], resources=build_resources(broken), raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert "missing required column(s)" in str(failure.event_specific_data.error)
    con = duckdb.connect(str(settings.warehouse_path), read_only=True)
    assert con.execute("SELECT count(*), sum(close) FROM raw_market_data").fetchone() == before


def test_csv_market_data_path_is_ingested_with_its_rejects(tmp_path):
    rows = ["Date,Ticker,Open,High,Low,Close,Volume"]
    rows += [f"2021-01-{d:02d},AAA,10,11,9,10.5,100" for d in range(4, 9)]
    rows += ["2021-01-11,AAA,10,9,9,10.5,100"]  # high below open/close
    (tmp_path / "prices.csv").write_text("\n".join(rows) + "\n")
    settings = Settings.from_env({"DATA_DIR": str(tmp_path / "data"), "MARKET_DATA_PATH": str(tmp_path)})
    result = materialize([ALL_ASSETS[0], ALL_CHECKS[0]], resources=build_resources(settings))
    meta = result.get_asset_materialization_events()[0].materialization.metadata
    assert meta["rows_rejected"].value == 1
    assert meta["rejects_by_reason"].value["high_below_open_close"] == 1
    check = result.get_asset_check_evaluations()[0]
    assert not check.passed  # 1 of 6 rows rejected is above the 1% threshold
    assert check.metadata["reject_share"].value == pytest.approx(1 / 6)


def test_definitions_load_with_one_job(monkeypatch, tmp_path):
    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    import pipeline.definitions

    defs = importlib.reload(pipeline.definitions).defs
    assert defs.get_job_def("full_pipeline") is not None
    assert {k.to_user_string() for k in defs.resolve_all_asset_keys()} == {
        "raw_market_data",
        "universe",
        "features",
        "training_set",
        "base_model",
        "prompt_corpus",
        "hyperparameters",
        "regressor",
        "predictions",
        "prediction_performance",
        "backtest",
    }
    assert defs.get_job_def("daily_retrain") is not None
    assert defs.get_schedule_def("daily_retrain_schedule").execution_timezone == "America/New_York"
    assert Path(defs.resources["warehouse"].database) == tmp_path / "warehouse.duckdb"


def test_workspace_loads_in_the_dagster_cli(tmp_path):
    """`dagster dev -w workspace.yaml` loads the same code location: validate it with the CLI."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "DATA_DIR": str(tmp_path / "data"), "DAGSTER_HOME": str(tmp_path)}
    dagster = Path(sys.executable).parent / "dagster"
    result = subprocess.run(
        [str(dagster), "definitions", "validate", "-w", "workspace.yaml"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "All code locations passed validation" in result.stderr + result.stdout


def test_base_model_env_directory_is_used_as_is(tmp_path):
    """BASE_MODEL names a local checkpoint: the asset describes it, never rebuilds or copies it."""
    from modeling.backbones.embedded import TinyLlamaSpec, build_embedded_base_model
    from modeling.prompt import PromptBuilder, tokenizer_training_texts

    own = build_embedded_base_model(
        tmp_path / "my-llama",
        tokenizer_training_texts(PromptBuilder(), n_rows=300),
        TinyLlamaSpec(
            vocab_size=400, hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=1
        ),
    )
    stamps = {p.name: p.stat().st_mtime_ns for p in own.iterdir()}
    settings = Settings.from_env({"DATA_DIR": str(tmp_path / "data"), "BASE_MODEL": str(own)})
    base_model = next(a for a in ALL_ASSETS if a.key == AssetKey("base_model"))
    result = materialize([base_model], resources=build_resources(settings))
    meta = result.get_asset_materialization_events()[0].materialization.metadata
    assert meta["user_supplied"].value is True
    assert meta["path"].value == str(own)
    assert meta["description"].value["hidden_size"] == 16
    assert {p.name: p.stat().st_mtime_ns for p in own.iterdir()} == stamps
    assert not (tmp_path / "data" / "models" / "base_model").exists()


def test_checks_fail_on_broken_tables(run, tmp_path):
    """The checks are not vacuous: tampering with a copy of the warehouse makes them fail."""
    import shutil

    from dagster import build_asset_check_context

    from pipeline.checks import exactly_16_feature_columns, features_finite, universe_size_per_date
    from pipeline.resources import WarehouseResource

    _, settings, instance = run
    copy = tmp_path / "warehouse.duckdb"
    shutil.copy(settings.warehouse_path, copy)
    con = duckdb.connect(str(copy))
    con.execute("DELETE FROM universe WHERE rank = 7 AND date = (SELECT max(date) FROM universe)")
    con.execute("UPDATE features SET vol_20d = 'nan'::DOUBLE WHERE rowid = 3")
    con.execute("ALTER TABLE features ADD COLUMN extra_feature DOUBLE")
    con.close()
    warehouse = WarehouseResource(database=str(copy))
    assert not exactly_16_feature_columns(warehouse=warehouse).passed
    finite = features_finite(warehouse=warehouse)
    assert not finite.passed and finite.metadata["non_finite_by_feature"].value["vol_20d"] == 1
    context = build_asset_check_context(instance=instance)  # reads top_n = 40 from the last run
    assert universe_size_per_date(
        context, warehouse=WarehouseResource(database=str(settings.warehouse_path))
    ).passed
    universe = universe_size_per_date(context, warehouse=warehouse)
    assert not universe.passed and universe.metadata["dates_mismatched"].value == 1


def _copy_outputs(settings: Settings, tmp_path: Path) -> StorageResource:
    """A private copy of the run's Parquet outputs (the module's run stays untouched)."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ("training_set", "prompt_corpus"):
        shutil.copy(settings.data_dir / f"{name}.parquet", data / f"{name}.parquet")
    return StorageResource(data_dir=str(data))


def test_corpus_check_fails_on_a_stale_or_partial_corpus(run, tmp_path):
    _, settings, _ = run
    storage = _copy_outputs(settings, tmp_path)
    assert prompts_cover_training_set(storage=storage).passed
    path = storage.parquet_path("training_set")
    table = pq.read_table(path)
    frame = table.to_pandas()
    train = frame.index[frame["split"] == "train"]
    frame.loc[train[:3], "label"] += 0.5  # the training set was rebuilt with other labels ...
    frame = frame.drop(index=train[3:5])  # ... and two rows fewer
    pq.write_table(pa.Table.from_pandas(frame, schema=table.schema, preserve_index=False), path)
    result = prompts_cover_training_set(storage=storage)
    assert not result.passed
    counts = {k: v.value for k, v in result.metadata.items()}
    assert (counts["missing"], counts["extra"], counts["different"]) == (0, 2, 3)


def test_purge_check_fails_when_train_reaches_into_validation(run, tmp_path):
    _, settings, _ = run
    storage = _copy_outputs(settings, tmp_path)
    shutil.copy(settings.warehouse_path, tmp_path / "data" / "warehouse.duckdb")
    warehouse = WarehouseResource(database=str(tmp_path / "data" / "warehouse.duckdb"))
    assert splits_are_purged(storage=storage, warehouse=warehouse).passed
    path = storage.parquet_path("training_set")
    table = pq.read_table(path)
    frame = table.to_pandas()
    first_validation = frame.loc[frame["split"] == "validation", "date"].min()
    frame.loc[frame["date"] == first_validation, "split"] = "train"
    pq.write_table(pa.Table.from_pandas(frame, schema=table.schema, preserve_index=False), path)
    result = splits_are_purged(storage=storage, warehouse=warehouse)
    assert not result.passed
    assert result.metadata["gap_in_trading_days"].value["train->validation"] == 1


def test_weights_check_fails_on_unnormalised_train_weights(run, tmp_path):
    _, settings, _ = run
    storage = _copy_outputs(settings, tmp_path)
    path = storage.parquet_path("training_set")
    table = pq.read_table(path)
    frame = table.to_pandas()
    frame.loc[frame["split"] == "train", "weight"] *= 1.01
    pq.write_table(pa.Table.from_pandas(frame, schema=table.schema, preserve_index=False), path)
    result = weights_are_normalised(storage=storage)
    assert not result.passed and result.metadata["train_weight_mean"].value == pytest.approx(1.01)


def test_settings_defaults_follow_the_contract(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = Settings.from_env({})
    assert s.data_dir == (tmp_path / "data").resolve() and s.data_dir.is_absolute()
    assert s.mlflow_tracking_uri == f"sqlite:///{(tmp_path / 'data' / 'mlflow.db').resolve()}"
    assert s.market_data_path is None and s.base_model is None
    blank = Settings.from_env({"BASE_MODEL": "  ", "MARKET_DATA_PATH": "", "DATA_DIR": " "})
    assert blank.base_model is None and blank.market_data_path is None and blank.data_dir == s.data_dir
    own = Settings.from_env({"DATA_DIR": "x", "MLFLOW_TRACKING_URI": "http://mlflow:5000"})
    assert own.data_dir == tmp_path / "x" and own.mlflow_tracking_uri == "http://mlflow:5000"


def test_feature_checks_fail_on_a_corrupted_features_table(run, tmp_path):
    _, settings, _ = run
    db = tmp_path / "warehouse.duckdb"
    shutil.copy(settings.warehouse_path, db)
    warehouse = WarehouseResource(database=str(db))
    checks = (first_feature_date_after_warmup, features_finite, exactly_16_feature_columns)
    assert all(check(warehouse=warehouse).passed for check in checks)
    con = duckdb.connect(str(db))
    # a row inside some symbol's warm-up (its 10th bar), with a NaN feature, and a 17th column
    con.execute("""
        INSERT INTO features BY NAME
        SELECT r.date, r.symbol, 'nan'::DOUBLE AS ret_1d
        FROM (SELECT date, symbol, row_number() OVER (PARTITION BY symbol ORDER BY date) AS n
              FROM raw_market_data) r
        WHERE r.n = 10 AND r.symbol = (SELECT min(symbol) FROM features)
    """)
    con.execute("ALTER TABLE features ADD COLUMN extra_feature DOUBLE")
    con.close()
    early = first_feature_date_after_warmup(warehouse=warehouse)
    assert not early.passed and early.metadata["symbols_starting_inside_warmup"].value == 1
    finite = features_finite(warehouse=warehouse)
    assert not finite.passed and finite.metadata["non_finite_by_feature"].value["ret_1d"] == 1
    columns = exactly_16_feature_columns(warehouse=warehouse)
    assert not columns.passed and columns.metadata["n_feature_columns"].value == 17


def test_context_check_fails_when_a_prompt_exceeds_the_window(run, tmp_path):
    _, settings, _ = run
    storage = _copy_outputs(settings, tmp_path)
    shutil.copytree(settings.data_dir / "models", tmp_path / "data" / "models")
    assert prompts_fit_context(storage=storage).passed
    path = storage.parquet_path("prompt_corpus")
    table = pq.read_table(path)
    frame = table.to_pandas()
    frame.loc[0, "n_tokens"] = 10**6
    pq.write_table(pa.Table.from_pandas(frame, schema=table.schema, preserve_index=False), path)
    result = prompts_fit_context(storage=storage)
    assert not result.passed and result.metadata["longest_prompt_tokens"].value == 10**6


def test_pretraining_check_fails_when_the_loss_barely_moved(run, tmp_path):
    from modeling.backbones.common import EMBEDDED_MODEL_INFO_FILE
    from pipeline.checks import pretraining_lowered_lm_loss

    _, settings, _ = run
    storage = _copy_outputs(settings, tmp_path)
    shutil.copytree(settings.data_dir / "models", tmp_path / "data" / "models")
    result = pretraining_lowered_lm_loss(storage=storage)
    assert result.passed and result.metadata["ratio"].value < 0.5
    info_file = tmp_path / "data" / "models" / "base_model" / EMBEDDED_MODEL_INFO_FILE
    info = __import__("json").loads(info_file.read_text())
    info["pretraining"]["val_loss_after"] = 0.9 * info["pretraining"]["val_loss_before"]
    info_file.write_text(__import__("json").dumps(info))
    assert not pretraining_lowered_lm_loss(storage=storage).passed
    # a backbone pretrained on the number tokens only is judged on the loss it trained
    info["pretrain_spec"]["loss_tokens"] = "values"
    report = info["pretraining"]
    report["val_value_loss_after"] = 0.3 * report["val_value_loss_before"]
    info_file.write_text(__import__("json").dumps(info))
    result = pretraining_lowered_lm_loss(storage=storage)
    assert result.passed and result.metadata["ratio"].value == pytest.approx(0.3)
    report["val_value_loss_after"] = 0.9 * report["val_value_loss_before"]
    report["val_loss_after"] = 0.1 * report["val_loss_before"]
    info_file.write_text(__import__("json").dumps(info))
    assert not pretraining_lowered_lm_loss(storage=storage).passed


def test_prompt_check_warns_when_the_corpus_is_written_otherwise_than_the_pretraining(run, tmp_path):
    from modeling.backbones.common import EMBEDDED_MODEL_INFO_FILE
    from pipeline.checks import prompts_match_pretraining

    _, settings, _ = run
    storage = _copy_outputs(settings, tmp_path)
    shutil.copytree(settings.data_dir / "models", tmp_path / "data" / "models")
    result = prompts_match_pretraining(storage=storage)
    compared = set(result.metadata["compared"].value)
    assert result.passed and {"sig_digits", "number_format", "layout", "horizon"} <= compared
    info_file = tmp_path / "data" / "models" / "base_model" / EMBEDDED_MODEL_INFO_FILE
    info = json.loads(info_file.read_text())
    assert info["pretrain_prompt"]["sig_digits"] == 3  # recorded by the build
    info["pretrain_prompt"].update(sig_digits=2, number_format="percentile", layout="legend")
    info_file.write_text(json.dumps(info))
    result = prompts_match_pretraining(storage=storage)
    assert not result.passed and result.severity == AssetCheckSeverity.WARN
    differences = result.metadata["differences (pretrained on, corpus)"].value
    assert differences == {
        "sig_digits": [2, 3],
        "number_format": ["percentile", "value"],
        "layout": ["legend", "inline"],
    }


def test_regressor_reports_every_rankic_with_its_se_dates_and_paired_differences(run):
    result, settings, _ = run
    meta = {e.asset_key: e.materialization.metadata for e in result.get_asset_materialization_events()}
    regressor = meta[AssetKey("regressor")]
    assert (
        regressor["val_n_dates"].value == 4 and regressor["test_n_dates"].value == 4
    )  # final_eval_max_dates
    assert regressor["val_rank_ic_se"].value > 0 and regressor["test_rank_ic_se"].value > 0
    paired = regressor["paired"].value
    assert set(paired) == {"zero", "ridge", "lightgbm", "mlp_features"}
    for name, per_split in paired.items():
        for split in ("validation", "test"):
            d = per_split[split]
            assert d["n_dates"] == 4 and np.isfinite(d["delta"]) and d["se"] >= 0, (name, split)
    # against the zero forecast the difference is the regressor's own RankIC
    assert paired["zero"]["validation"]["delta"] == pytest.approx(regressor["val_rank_ic"].value)
    assert "± " in regressor["comparison"].value and "LLM − model" in regressor["comparison"].value
    check = next(
        e for e in result.get_asset_check_evaluations() if e.check_name == "regressor_beats_baselines"
    )
    for name in ("zero", "mlp_features"):
        text = check.metadata[f"vs_{name}"].value
        assert text.startswith("Δ RankIC ") and "(t " in text and "4 dates" in text
    import mlflow

    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    run_id = regressor["run_id"].value
    metrics = mlflow.tracking.MlflowClient().get_run(run_id).data.metrics
    assert metrics["val_rank_ic_se"] == pytest.approx(regressor["val_rank_ic_se"].value)
    assert metrics["val_n_dates"] == 4 and "paired/ridge/validation_delta" in metrics


def _table_digests(settings: Settings) -> dict[str, tuple[int, str]]:
    tables = ("raw_market_data", "universe", "features", "predictions")
    with duckdb.connect(str(settings.data_dir / "warehouse.duckdb"), read_only=True) as con:
        return {
            t: con.execute(
                "SELECT count(*), md5(string_agg(CAST(x AS VARCHAR), '|' ORDER BY CAST(x AS VARCHAR))) "
                f"FROM {t} x"
            ).fetchone()
            for t in tables
        }


_CHAIN_SCRIPT = """
import sys
from dagster import DagsterInstance, materialize
from pipeline.resources import build_resources
from pipeline.settings import Settings
from tests.test_pipeline import CHAIN, SMALL_RUN

result = materialize(CHAIN, resources=build_resources(Settings.from_env()), run_config=SMALL_RUN,
                     instance=DagsterInstance.get(), raise_on_error=False)
print("RUN_ID", result.run_id)
sys.exit(0 if result.success else 1)
"""


@pytest.mark.slow
def test_two_chains_started_at_once_leave_one_coherent_state(run, tmp_path):
    """Two materialisations of the whole chain started at once, each in its own process, on one instance
    whose pools allow one step at a time (the dagster.yaml that `make` writes): both succeed; no two
    steps of one pool overlap; the tables are what one run writes; the registry gains no version
    (identical inputs are trained once) and keeps its champion."""
    import subprocess
    import sys

    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline.resources import TRAINING_POOL, WAREHOUSE_POOL

    _, settings, _ = run
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    client = MlflowClient()
    versions_before = sorted(v.version for v in client.search_model_versions("name = 'return-regressor'"))
    champion_before = client.get_model_version_by_alias("return-regressor", "champion").version
    tables_before = _table_digests(settings)
    home = tmp_path / "home"
    home.mkdir()
    write_dagster_yaml(home)  # the instance `make` writes
    with DagsterInstance.from_config(str(home)):  # its storage exists before two processes open it
        pass
    root = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "DATA_DIR": str(settings.data_dir),
        "PYTHONPATH": str(root),
    }
    chains = [
        subprocess.Popen([sys.executable, "-c", _CHAIN_SCRIPT], cwd=root, env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for _ in range(2)
    ]  # fmt: skip
    outputs = [chain.communicate(timeout=1200)[0] for chain in chains]
    for chain, output in zip(chains, outputs, strict=True):
        assert chain.returncode == 0, output[-4000:]
    run_ids = [
        next(line.split()[1] for line in out.splitlines() if line.startswith("RUN_ID")) for out in outputs
    ]
    # no two steps of one pool ran at the same time
    pool_of = {a.key.to_user_string(): a.op.pool for a in CHAIN}
    assert set(pool_of.values()) == {WAREHOUSE_POOL, TRAINING_POOL}
    spans: dict[str, list[tuple[float, float]]] = {WAREHOUSE_POOL: [], TRAINING_POOL: []}
    with DagsterInstance.from_config(str(home)) as instance:
        for run_id in run_ids:
            starts = {}
            for record in instance.all_logs(run_id):
                event = record.dagster_event
                if event is None or event.step_key not in pool_of:
                    continue
                if event.event_type_value == "STEP_START":
                    starts[event.step_key] = record.timestamp
                elif event.event_type_value == "STEP_SUCCESS":
                    spans[pool_of[event.step_key]].append((starts[event.step_key], record.timestamp))
    for pool, intervals in spans.items():
        intervals.sort()
        assert len(intervals) == 2 * sum(p == pool for p in pool_of.values())
        assert all(a[1] <= b[0] for a, b in zip(intervals, intervals[1:], strict=False)), pool
    # the state is the state of one run
    assert _table_digests(settings) == tables_before
    versions = sorted(v.version for v in client.search_model_versions("name = 'return-regressor'"))
    assert versions == versions_before
    assert client.get_model_version_by_alias("return-regressor", "champion").version == champion_before


def test_predictions_refuse_features_computed_by_other_definitions(run, tmp_path, monkeypatch):
    """One feature's SQL changes and the features are recomputed (on a private copy of the warehouse):
    the champion, trained on the old definitions, refuses to score them and no forecast is written."""
    from dataclasses import replace

    import modeling.data.features as feature_sql
    from modeling.feature_registry import FEATURES
    from pipeline.assets import features, predictions, training_set

    _, settings, _ = run
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(settings.warehouse_path, data / "warehouse.duckdb")
    private = Settings.from_env({"DATA_DIR": str(data), "MLFLOW_TRACKING_URI": settings.mlflow_tracking_uri})
    changed = replace(FEATURES[1], sql="close / lag(close, 6) OVER w_sym - 1")
    monkeypatch.setattr(feature_sql, "FEATURES", (FEATURES[0], changed, *FEATURES[2:]))
    result = materialize(
        [features, training_set, predictions], resources=build_resources(private), raise_on_error=False
    )
    steps = {
        e.step_key: e.event_type_value for e in result.all_events if e.is_step_success or e.is_step_failure
    }
    assert steps == {
        "features": "STEP_SUCCESS",
        "training_set": "STEP_SUCCESS",
        "predictions": "STEP_FAILURE",
    }
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert "trained on features of definitions" in str(failure.event_specific_data.error)
    with duckdb.connect(str(data / "warehouse.duckdb"), read_only=True) as con:
        before = con.execute("SELECT count(*) FROM predictions").fetchone()[0]
        shas = con.execute("SELECT DISTINCT registry_sha FROM feature_definitions").fetchall()
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM predictions").fetchone()[0] == before  # nothing written
        assert con.execute("SELECT DISTINCT registry_sha FROM feature_definitions").fetchall() != shas


def test_the_regressor_refuses_an_embedded_backbone_pretrained_past_the_train_split(tmp_path):
    """The embedded backbone read the train split's prompts; a training set rebuilt with an earlier split
    makes some of them validation or test rows, so `regressor` refuses until `base_model` rebuilds
    (before, only `base_model` and the backtest checked it)."""
    import json

    from modeling.backbones.common import EMBEDDED_MODEL_INFO_FILE
    from pipeline.assets.regressor import _refuse_a_backbone_pretrained_past_the_train_split as refuse

    storage = build_resources(Settings.from_env({"DATA_DIR": str(tmp_path / "data")}))["storage"]
    base = tmp_path / "base"
    base.mkdir()
    info = {"pretrain_train_dates": ["2019-03-27", "2022-03-18"]}
    (base / EMBEDDED_MODEL_INFO_FILE).write_text(json.dumps(info))
    refuse(storage, base, {"splits": {"train": ["2019-03-27", "2022-03-18"]}})  # the same split: fine
    refuse(storage, base, {"splits": {"train": ["2019-03-27", "2022-06-30"]}})  # a later train end: fine
    with pytest.raises(ValueError, match=r"pretrained on prompts up to 2022-03-18, after .* \(2021-12-31\)"):
        refuse(storage, base, {"splits": {"train": ["2019-03-27", "2021-12-31"]}})
    refuse(storage, tmp_path / "no-info", {"splits": {"train": ["2019-03-27", "2021-12-31"]}})  # not ours


def test_a_retry_of_a_forced_retrain_finishes_its_own_version_instead_of_registering_a_copy(tmp_path):
    """`force_retrain` trains past a version of another run; a retry of the forced run (the same root run,
    the same directory) resumes the version its failed attempt registered (gate pending) or reports it
    (gate done): before, it registered a second copy and the first stayed pending for ever."""
    from pipeline.assets.regressor import reuse_existing_version

    own, other = tmp_path / "sha" / "run-b", tmp_path / "sha" / "run-a"
    earlier = {"run_dir": str(other), "gate": "done"}
    assert reuse_existing_version(None, {}, own, False) == (own, None)  # nothing trained on these inputs
    assert reuse_existing_version("3", earlier, own, False) == (other, "3")  # reuse: no retraining
    assert reuse_existing_version("3", earlier, own, True) == (own, None)  # forced: trains anew
    mine = {"run_dir": str(own), "gate": "pending"}  # registered by this run's failed attempt
    assert reuse_existing_version("4", mine, own, True) == (own, "4")
    assert reuse_existing_version("4", {**mine, "gate": "done"}, own, True) == (own, "4")
    assert reuse_existing_version("5", {"gate": "pending"}, own, False) == (own, "5")  # no run_dir tag


@pytest.mark.slow
def test_force_retrain_trains_again_in_a_directory_of_its_own(run):
    """`force_retrain` really trains: a new run directory (no checkpoint or "already complete" shortcut
    from the version trained on the same inputs) and a new registered version."""
    from mlflow.tracking import MlflowClient

    from pipeline.assets import regressor

    _, settings, _ = run
    import mlflow

    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    client = MlflowClient()
    before = {v.version: v.tags for v in client.search_model_versions("name = 'return-regressor'")}
    config = {**SMALL_RUN["ops"]["regressor"]["config"], "force_retrain": True}
    result = materialize(
        [regressor],
        resources=build_resources(settings),
        run_config={"ops": {"regressor": {"config": config}}},
    )
    meta = result.asset_materializations_for_node("regressor")[0].metadata
    assert meta["retrained"].value is True
    version = meta["model_version"].value
    assert version not in before
    tags = client.get_model_version("return-regressor", version).tags
    same_inputs = [t for t in before.values() if t.get("inputs_sha") == tags["inputs_sha"]]
    assert same_inputs, "precondition: a version was trained on these inputs before"
    assert tags["run_dir"] not in {t.get("run_dir") for t in same_inputs}
    assert Path(tags["run_dir"]).parent == Path(same_inputs[0]["run_dir"]).parent  # runs/regressor/<sha>/
    assert result.run_id in tags["run_dir"]
    report = (Path(tags["run_dir"]) / "train_report.json").read_text()
    assert "resumed" not in report and '"samples": 0' not in report
