"""MLflow: the run, the pyfunc model from the registry in a fresh process, and the champion gate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from modeling.backbones.common import load_tokenizer
from modeling.experiment import run_experiment
from modeling.feature_registry import FEATURE_NAMES
from modeling.inference import predict_prompts
from modeling.model import load_regressor
from modeling.prompt import PromptBuilder
from modeling.train import train_regressor
from tests.conftest import make_training_set, registry_job

ROOT = Path(__file__).resolve().parents[1]
NAME = "return-regressor"


def test_run_has_params_metrics_artifacts_and_the_registered_model(registered_store) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    store, first, _, _ = registered_store
    mlflow.set_tracking_uri(f"sqlite:///{store / 'mlflow.db'}")
    client = MlflowClient()
    run = client.get_run(first["run_id"])
    assert run.data.params["regressor.lora.r"] == "4"
    assert run.data.params["train.learning_rate"] == "0.003"
    assert run.data.params["buckets.scheme"] == "sqrt_inverse"
    assert run.data.params["prompt.template_version"] == str(PromptBuilder().settings()["template_version"])
    metrics = run.data.metrics
    for key in (
        "validation_rank_ic",
        "test_rank_ic",
        "validation_rank_icir",
        "test_top_bottom_decile",
        "ridge/validation_rank_ic",
        "lightgbm/test_rank_ic",
        "mlp_features/validation_rank_ic",
        "zero/test_mse",
    ):
        assert key in metrics, key
    assert metrics["validation_rank_ic"] == pytest.approx(first["val_rank_ic"])
    history = client.get_metric_history(first["run_id"], "eval/val_rank_ic")
    assert [m.step for m in history] == [12, 24, 36]
    artifacts = {a.path for a in client.list_artifacts(first["run_id"], "report")}
    assert {
        "report/comparison.csv",
        "report/ic_by_date.png",
        "report/cumulative_long_short.png",
        "report/predicted_vs_realised.png",
        "report/decile_returns.png",
    } <= artifacts
    version = client.get_model_version(NAME, first["model_version"])
    assert version.tags["run_id"] == first["run_id"]
    assert float(version.tags["val_rank_ic"]) == pytest.approx(first["val_rank_ic"])


def test_champion_pyfunc_in_a_fresh_process_predicts_what_the_model_predicts(
    registered_store, tiny_base_model, tmp_path
) -> None:
    store, first, _, good = registered_store
    rows = make_training_set(n_dates=3, n_symbols=5, seed=11)[["date", "symbol", "sector", *FEATURE_NAMES]]
    rows = rows.drop(columns=["sector"]).iloc[:7]  # sector is optional
    rows_path, out_path = tmp_path / "rows.parquet", tmp_path / "pred.npy"
    rows.to_parquet(rows_path)
    uri = f"sqlite:///{store / 'mlflow.db'}"
    script = (
        "import sys, mlflow, numpy as np, pandas as pd\n"
        f"mlflow.set_tracking_uri({uri!r})\n"
        f"model = mlflow.pyfunc.load_model('models:/{NAME}@champion')\n"
        f"np.save({str(out_path)!r}, np.asarray(model.predict(pd.read_parquet({str(rows_path)!r}))))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    fresh = np.load(out_path)
    model = load_regressor(Path(good.output_dir) / "model")
    expected = predict_prompts(
        model,
        load_tokenizer(tiny_base_model),
        PromptBuilder().render_batch(rows.reset_index(drop=True), load_tokenizer(tiny_base_model)),
    )
    assert fresh.shape == (7,)
    np.testing.assert_allclose(fresh, expected, atol=1e-6, rtol=0)
    # the artefact holds no pickle: code file, safetensors, JSON, the tokenizer and the small base model
    files = [p for p in (store / "mlartifacts").rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".pkl", ".pickle", ".pt", ".bin")]
    assert any(p.name == "registry.py" for p in files)


def _daily(values, start: str = "2021-03-01") -> pd.Series:
    return pd.Series(values, index=pd.bdate_range(start, periods=len(values)), dtype=float)


def test_a_worse_model_never_moves_the_champion(registered_store) -> None:
    import mlflow

    from modeling import registry

    store, first, second, _ = registered_store
    mlflow.set_tracking_uri(f"sqlite:///{store / 'mlflow.db'}")
    assert first["promoted"] is True and first["model_version"] == "1"
    assert second["val_rank_ic"] < first["val_rank_ic"]  # precondition: version 2 is worse
    assert second["promoted"] is False and "does not beat" in second["gate"]
    # the decision's numbers: version 2 is version 1 negated, so the paired difference is -2 x its RankIC
    stats = second["gate_stats"]
    assert stats["delta"] == pytest.approx(-2 * first["val_rank_ic"], abs=1e-6)
    assert stats["n_dates"] == first["val_n_dates"] and stats["se"] > 0
    assert f"{stats['delta']:+.4f}" in second["gate"] and "t " in second["gate"]
    assert registry.alias_version(NAME, "champion") == "1"
    assert registry.alias_version(NAME, "challenger") == "2"
    tags = registry.version_tags(NAME, "1")
    assert float(tags["val_rank_ic_se"]) == pytest.approx(first["val_rank_ic_se"])
    assert len(registry.daily_from_tag(tags["val_daily_rank_ic"])) == first["val_n_dates"]
    # on other validation rows the champion is re-scored (its daily RankIC on these rows), never compared
    # on its stored number
    calls: list[str] = []
    rng = np.random.default_rng(0)
    champion_daily = _daily(0.05 + rng.normal(0, 0.05, 60))

    def rescore(uri: str) -> pd.Series:
        calls.append(uri)
        return champion_daily

    same_plus_noise = champion_daily + rng.normal(0, 0.002, 60)
    gate = registry.champion_gate(NAME, "2", same_plus_noise, "other-rows", rescore)
    assert calls == [f"models:/{NAME}@champion"] and gate["promoted"] is False
    assert registry.alias_version(NAME, "champion") == "1"
    # better on average by less than the noise: stays; by well over k x SE: moves
    slightly = champion_daily + 0.0005 + rng.normal(0, 0.01, 60)
    assert registry.champion_gate(NAME, "2", slightly, "other-rows", rescore)["promoted"] is False
    clearly = champion_daily + 0.02 + rng.normal(0, 0.01, 60)
    gate = registry.champion_gate(NAME, "2", clearly, "other-rows", rescore)
    assert gate["promoted"] is True and registry.alias_version(NAME, "champion") == "2"
    assert gate["delta"] > gate["bar"] == pytest.approx(gate["se"]) and gate["t"] > 1
    # min_delta raises the bar above k x SE
    registry.champion_gate(NAME, "1", _daily([np.nan] * 3), "k", rescore)  # never without a score
    assert registry.alias_version(NAME, "champion") == "2"
    gate = registry.champion_gate(
        NAME, "1", clearly + 0.02, "other-rows", lambda uri: clearly, min_delta=0.05
    )
    assert gate["promoted"] is False and "min_delta 0.05" in gate["reason"]
    # a champion that cannot be compared fairly is replaced

    def broken(uri: str) -> pd.Series:
        raise FileNotFoundError("base model moved")

    gate = registry.champion_gate(NAME, "1", _daily([0.01, 0.02, 0.0]), "k", broken)
    assert gate["promoted"] is True and "could not be re-scored" in gate["reason"]
    from mlflow.tracking import MlflowClient

    MlflowClient().set_model_version_tag(NAME, "1", "train_end", "2021-02-05")
    gate = registry.champion_gate(
        NAME, "2", _daily([-0.5, -0.4]), "k", rescore, validation_start="2021-02-01"
    )
    assert gate["promoted"] is True and "inside the validation period" in gate["reason"]
    gate = registry.champion_gate(NAME, "1", _daily([1.0, 0.9]), "k", rescore, new_tags={"horizon": 5})
    assert registry.alias_version(NAME, "champion") == "1"  # restored for the other tests


def test_gate_decision_never_promotes_noise_and_promotes_a_clear_winner() -> None:
    """Forecasts on the same rows: a challenger that is the champion plus noise in its predictions never
    passes the paired bar (over 30 seeds), a challenger with twice the signal always does."""
    from modeling import registry
    from modeling.metrics import per_date_correlation

    promoted_noise, promoted_better = 0, 0
    for seed in range(30):
        rng = np.random.default_rng(seed)
        dates = pd.bdate_range("2024-01-01", periods=60)
        signal = rng.normal(size=(60, 200))
        label = 0.1 * signal + rng.normal(size=(60, 200))
        champion = 0.5 * signal + rng.normal(size=(60, 200))
        frame = pd.DataFrame(
            {
                "date": np.repeat(dates, 200),
                "label": label.ravel(),
                "champion": champion.ravel(),
                "noisy": (champion + 0.6 * rng.normal(size=(60, 200))).ravel(),
                "better": (signal + 0.2 * rng.normal(size=(60, 200))).ravel(),
            }
        )
        daily = {
            c: per_date_correlation(frame, c, method="spearman") for c in ("champion", "noisy", "better")
        }
        promoted_noise += registry.gate_decision(daily["noisy"], daily["champion"])[0]
        promoted_better += registry.gate_decision(daily["better"], daily["champion"])[0]
    assert promoted_noise == 0 and promoted_better == 30
    # no true difference at all (two equally good daily series): promoted at about the nominal one-sided
    # rate of k = 1, P(t > 1) = 15.9%, never more
    rng = np.random.default_rng(1)
    hits = sum(
        registry.gate_decision(_daily(rng.normal(0.03, 0.05, 60)), _daily(rng.normal(0.03, 0.05, 60)))[0]
        for _ in range(400)
    )
    assert 0.10 < hits / 400 < 0.21


def test_smollm2_trains_a_few_lora_steps_and_packages_like_the_tiny_model(smollm2_dir, tmp_path) -> None:
    import mlflow

    from modeling import registry
    from modeling.data.parquet_io import write_parquet_atomic
    from modeling.data.prompt_corpus import write_prompt_corpus

    frame = make_training_set(n_dates=40, n_symbols=4)
    training_set = write_parquet_atomic(frame, tmp_path / "training_set.parquet", metadata={"horizon": 1})
    corpus = tmp_path / "prompt_corpus.parquet"
    n_tokens = write_prompt_corpus(frame, PromptBuilder(), load_tokenizer(smollm2_dir), corpus)
    assert n_tokens.mean() > 150
    job = registry_job(
        smollm2_dir,
        training_set,
        corpus,
        tmp_path / "run",
        tmp_path / "store",
        max_steps=3,
        batch_size=4,
        eval_every_steps=0,
        eval_max_dates=1,
        max_train_samples=12,
    )
    job = replace(job, experiment={**job.experiment, "eval_max_dates": 1, "baselines": False})
    result = train_regressor(job, log=lambda _: None)
    assert result.state.step == 3
    outcome = run_experiment(job, result, log=lambda _: None)
    assert outcome["model_version"] == "1"
    mlflow.set_tracking_uri(job.experiment["tracking_uri"])
    loaded = registry.load_model(f"models:/{NAME}/1")
    rows = frame[frame["split"] == "live"][["date", "symbol", "sector", *FEATURE_NAMES]].reset_index(
        drop=True
    )
    tok = load_tokenizer(smollm2_dir)
    expected = predict_prompts(load_regressor(result.model_dir), tok, PromptBuilder().render_batch(rows, tok))
    np.testing.assert_allclose(np.asarray(loaded.predict(rows)), expected, atol=1e-5, rtol=0)
    # a 540 MB base model is referenced by path and fingerprint, not copied into the artefact
    info = json.loads((result.model_dir / "regressor.json").read_text())
    assert info["base_model"]["path"] == str(smollm2_dir.resolve())
    assert not list((tmp_path / "store" / "mlartifacts").rglob("model.safetensors"))
    assert isinstance(pd.Timestamp(rows["date"].iloc[0]), pd.Timestamp)


def test_a_locked_store_is_a_fault_never_no_champion(registered_store, monkeypatch) -> None:
    """A real lock on the SQLite store (another process's exclusive transaction): reading the champion
    fails with the store's error after the retries, and the gate promotes nothing."""
    import sqlite3

    import mlflow

    from modeling import registry

    store, *_ = registered_store
    mlflow.set_tracking_uri(f"sqlite:///{store / 'mlflow.db'}")
    champion = registry.alias_version(NAME, "champion")
    assert registry.alias_version(NAME, "no-such-alias") is None  # a missing alias is an answer
    monkeypatch.setattr(registry, "REGISTRY_ATTEMPTS", 1)  # MLflow waits 20 s on a locked SQLite file
    lock = sqlite3.connect(store / "mlflow.db", timeout=0)
    lock.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(registry.RegistryError, match="database is locked"):
            registry.champion_gate(NAME, "2", _daily([0.5, 0.6, 0.7]), "k", lambda uri: _daily([0.0] * 3))
    finally:
        lock.rollback()
        lock.close()
    assert registry.alias_version(NAME, "champion") == champion
