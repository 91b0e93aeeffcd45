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
from modeling.feature_registry import MODEL_INPUT_COLUMNS
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
    # each periodic evaluation with its precision: the standard error and the 8 evaluation dates
    se = client.get_metric_history(first["run_id"], "eval/val_rank_ic_se")
    n_dates = client.get_metric_history(first["run_id"], "eval/val_n_dates")
    assert [m.step for m in se] == [12, 24, 36] and all(m.value > 0 for m in se)
    assert [(m.step, m.value) for m in n_dates] == [(12, 8), (24, 8), (36, 8)]
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
    rows = make_training_set(n_dates=3, n_symbols=5, seed=11)[list(MODEL_INPUT_COLUMNS)]
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
    assert any(p.name == "pyfunc_model.py" for p in files)  # the model's code: the pyfunc, never the gate
    assert not any(p.name == "mlflow_registry.py" for p in files)
    assert not any(p.name == "champion_gate.py" for p in files)


def _daily(values, start: str = "2021-03-01") -> pd.Series:
    return pd.Series(values, index=pd.bdate_range(start, periods=len(values)), dtype=float)


def test_a_worse_model_never_moves_the_champion(registered_store) -> None:
    import mlflow

    from modeling import mlflow_registry
    from modeling.champion_gate import champion_gate

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
    assert mlflow_registry.alias_version(NAME, "champion") == "1"
    assert mlflow_registry.alias_version(NAME, "challenger") == "2"
    tags = mlflow_registry.version_tags(NAME, "1")
    assert float(tags["val_rank_ic_se"]) == pytest.approx(first["val_rank_ic_se"])
    assert len(mlflow_registry.daily_from_tag(tags["val_daily_rank_ic"])) == first["val_n_dates"]
    # on other validation rows the champion is re-scored (its daily RankIC on these rows), never compared
    # on its stored number
    calls: list[str] = []
    rng = np.random.default_rng(0)
    champion_daily = _daily(0.05 + rng.normal(0, 0.05, 60))

    def rescore(uri: str) -> pd.Series:
        calls.append(uri)
        return champion_daily

    same_plus_noise = champion_daily + rng.normal(0, 0.002, 60)
    gate = champion_gate(NAME, "2", same_plus_noise, "other-rows", rescore)
    assert calls == [f"models:/{NAME}/1"] and gate["promoted"] is False  # the judged version, not the alias
    assert mlflow_registry.alias_version(NAME, "champion") == "1"
    # better on average by less than the noise: stays; by well over k x SE: moves
    slightly = champion_daily + 0.0005 + rng.normal(0, 0.01, 60)
    assert champion_gate(NAME, "2", slightly, "other-rows", rescore)["promoted"] is False
    clearly = champion_daily + 0.02 + rng.normal(0, 0.01, 60)
    gate = champion_gate(NAME, "2", clearly, "other-rows", rescore)
    assert gate["promoted"] is True and mlflow_registry.alias_version(NAME, "champion") == "2"
    assert gate["delta"] > gate["bar"] == pytest.approx(gate["se"]) and gate["t"] > 1
    # min_delta raises the bar above k x SE
    champion_gate(NAME, "1", _daily([np.nan] * 3), "k", rescore)  # never without a score
    assert mlflow_registry.alias_version(NAME, "champion") == "2"
    gate = champion_gate(NAME, "1", clearly + 0.02, "other-rows", lambda uri: clearly, min_delta=0.05)
    assert gate["promoted"] is False and "min_delta 0.05" in gate["reason"]
    # a champion that cannot be compared fairly is replaced

    def broken(uri: str) -> pd.Series:
        raise FileNotFoundError("base model moved")

    gate = champion_gate(NAME, "1", _daily([0.01, 0.02, 0.0]), "k", broken)
    assert gate["promoted"] is True and "can no longer be loaded (FileNotFoundError" in gate["reason"]
    from mlflow.tracking import MlflowClient

    MlflowClient().set_model_version_tag(NAME, "1", "train_end", "2021-02-05")
    gate = champion_gate(NAME, "2", _daily([-0.5, -0.4]), "k", rescore, validation_start="2021-02-01")
    assert gate["promoted"] is True and "inside the validation period" in gate["reason"]
    gate = champion_gate(NAME, "1", champion_daily + 0.5, "k", rescore, new_tags={"horizon": 5})
    assert mlflow_registry.alias_version(NAME, "champion") == "1"  # restored for the other tests


def test_gate_decision_never_promotes_noise_and_promotes_a_clear_winner() -> None:
    """Forecasts on the same rows: a challenger that is the champion plus noise in its predictions never
    passes the paired bar (over 30 seeds), a challenger with twice the signal always does."""
    from modeling.champion_gate import gate_decision
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
        promoted_noise += gate_decision(daily["noisy"], daily["champion"])[0]
        promoted_better += gate_decision(daily["better"], daily["champion"])[0]
    assert promoted_noise == 0 and promoted_better == 30
    # no true difference at all (two equally good daily series): promoted at about the nominal one-sided
    # rate of k = 1, P(t > 1) = 15.9%, never more
    rng = np.random.default_rng(1)
    hits = sum(
        gate_decision(_daily(rng.normal(0.03, 0.05, 60)), _daily(rng.normal(0.03, 0.05, 60)))[0]
        for _ in range(400)
    )
    assert 0.10 < hits / 400 < 0.21


def test_gate_decision_wants_dates_for_its_lag() -> None:
    """A Newey-West SE with a lag of 19 on 3 dates is a fifth of the honest one, and the bar shrank with
    it: below 5 x lag common dates (2 at horizon 1) the gate does not decide."""
    from modeling.champion_gate import gate_decision

    new, champion = _daily([0.03, -0.01, 0.02]), _daily([0.0, 0.0, 0.0])
    promoted, paired, bar = gate_decision(new, champion, horizon=1)
    assert promoted and bar == pytest.approx(np.std([0.03, -0.01, 0.02], ddof=1) / np.sqrt(3))
    for horizon in (2, 20):  # lag 1 needs 5 dates, lag 19 needs 95
        promoted, paired, bar = gate_decision(new, champion, horizon=horizon)
        assert not promoted and np.isnan(bar) and paired.n_dates == 3
    rng = np.random.default_rng(0)
    strong = _daily(rng.normal(0.05, 0.02, 95))
    assert gate_decision(strong, _daily(np.zeros(95)), horizon=20)[0]  # 95 dates: decided
    assert np.isnan(gate_decision(strong.iloc[:94], _daily(np.zeros(94)), horizon=20)[2])


def test_a_date_one_model_has_no_ranking_on_counts_zero_for_it() -> None:
    """A challenger strong on half the validation dates and constant (no ranking, so no RankIC) on the
    other half is worse than a champion that ranks every date: it must not be judged on its half alone."""
    from modeling.champion_gate import gate_decision
    from modeling.metrics import per_date_correlation

    rng = np.random.default_rng(1)
    dates = pd.bdate_range("2022-01-03", periods=60)
    frame = pd.DataFrame({"date": np.repeat(dates, 100), "label": rng.normal(size=6000)})
    frame["champion"] = 0.25 * frame["label"] + rng.normal(size=6000)
    half = frame["date"].isin(dates[::2])
    frame["challenger"] = np.where(half, 0.5 * frame["label"] + rng.normal(size=6000), 0.0)
    champion, challenger = (
        per_date_correlation(frame, c, method="spearman") for c in ("champion", "challenger")
    )
    assert len(champion) == 60 and len(challenger) == 30  # precondition: constant dates have no RankIC
    promoted, paired, _ = gate_decision(challenger, champion)
    assert not promoted and paired.n_dates == 60
    assert paired.a.mean == pytest.approx(challenger.sum() / 60)  # its 30 RankICs and 30 zeros
    assert paired.delta < 0
    # the same challenger judged on its own 30 dates would have passed the bar by a wide margin
    assert gate_decision(challenger, champion.loc[challenger.index])[0]


def test_smollm2_trains_a_few_lora_steps_and_packages_like_the_tiny_model(smollm2_dir, tmp_path) -> None:
    import mlflow

    from modeling import mlflow_registry
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
    job = replace(job, experiment=replace(job.experiment, eval_max_dates=1, baselines=False))
    result = train_regressor(job, log=lambda _: None)
    assert result.state.step == 3
    outcome = run_experiment(job, result, log=lambda _: None)
    assert outcome["model_version"] == "1"
    mlflow.set_tracking_uri(job.experiment.tracking_uri)
    loaded = mlflow_registry.load_model(f"models:/{NAME}/1")
    rows = frame[frame["split"] == "live"][list(MODEL_INPUT_COLUMNS)].reset_index(drop=True)
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

    from modeling import mlflow_registry
    from modeling.champion_gate import champion_gate

    store, *_ = registered_store
    mlflow.set_tracking_uri(f"sqlite:///{store / 'mlflow.db'}")
    champion = mlflow_registry.alias_version(NAME, "champion")
    assert mlflow_registry.alias_version(NAME, "no-such-alias") is None  # a missing alias is an answer
    monkeypatch.setattr(mlflow_registry, "REGISTRY_ATTEMPTS", 1)  # MLflow waits 20 s on a locked SQLite file
    lock = sqlite3.connect(store / "mlflow.db", timeout=0)
    lock.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(mlflow_registry.RegistryError, match="database is locked"):
            champion_gate(NAME, "2", _daily([0.5, 0.6, 0.7]), "k", lambda uri: _daily([0.0] * 3))
    finally:
        lock.rollback()
        lock.close()
    assert mlflow_registry.alias_version(NAME, "champion") == champion


# --- faults around the gate: a real unloadable champion, a real lock, two gates at once -----------------
def _own_store(tmp_path: Path, good, monkeypatch) -> str:
    """A store of this test's own with version 1 (champion) of the model trained for `registered_store`,
    so the test may break its files. Registered while setting a version tag one by one raises: every tag
    must arrive with the call that creates the version (no half-tagged version)."""
    from mlflow.tracking import MlflowClient

    from modeling import mlflow_registry

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment_id = mlflow_registry.configure(uri, "gate-faults", tmp_path / "mlartifacts")
    model_dir = Path(good.output_dir) / "model"
    rows = make_training_set(n_dates=3, n_symbols=5, seed=11)[list(MODEL_INPUT_COLUMNS)]

    def no_tag_by_tag(*args, **kwargs):
        raise AssertionError("a version tag was set after the version was created")

    with monkeypatch.context() as patch:
        patch.setattr(MlflowClient, "set_model_version_tag", no_tag_by_tag)
        logged = mlflow_registry.log_run(
            experiment_id, "v1", {}, [], {}, [], model_dir, model_dir / "tokenizer",
            Path(good.base_model_dir), rows.head(3), NAME, {"inputs_sha": "abc", "val_rank_ic": 0.1},
        )  # fmt: skip
    tags = mlflow_registry.version_tags(NAME, logged["model_version"])
    assert tags["run_id"] == logged["run_id"] and tags["inputs_sha"] == "abc" and tags["gate"] == "pending"
    MlflowClient().set_registered_model_alias(NAME, "champion", logged["model_version"])
    return logged["model_uri"]


@pytest.mark.slow
def test_only_an_unloadable_champion_is_replaced_and_a_locked_store_fails_the_gate(
    registered_store, tmp_path, monkeypatch
) -> None:
    import shutil
    import sqlite3

    import mlflow

    from modeling import mlflow_registry
    from modeling.champion_gate import ChampionRescoreError, champion_gate, champion_unloadable
    from modeling.errors import ModelUnloadableError

    store, _, _, good = registered_store
    model_uri = _own_store(tmp_path, good, monkeypatch)
    assert mlflow.register_model(model_uri, NAME).version == 2  # the challenger (the same files)
    rows = make_training_set(n_dates=4, n_symbols=6, seed=3)[list(MODEL_INPUT_COLUMNS)]

    def rescore(uri: str) -> pd.Series:  # the real thing: load the champion from the store and score
        predicted = mlflow_registry.load_model(uri).predict(rows)
        return pd.Series(predicted, index=rows["date"]).groupby(level=0).mean()

    assert len(rescore(f"models:/{NAME}/1")) == 4  # precondition: the champion loads and scores
    # a row without its date or symbol would be scored on a prompt that reads "nan": refused by position
    served, keyed = mlflow_registry.load_model(f"models:/{NAME}/1"), rows.reset_index(drop=True)
    with pytest.raises(ValueError, match=r"1 input row\(s\) lack a date or a symbol \(positions \[1\]\)"):
        served.predict(keyed.assign(symbol=keyed["symbol"].where(keyed.index != 1)))
    with pytest.raises(ValueError, match=r"2 input row\(s\).*positions \[0, 3\]"):
        served.predict(keyed.assign(date=keyed["date"].where(~keyed.index.isin([0, 3]))))
    with pytest.raises(ValueError, match=r"positions \[2\]"):
        served.predict(keyed.assign(symbol=keyed["symbol"].where(keyed.index != 2, "  ")))
    new_daily = _daily([0.05, 0.04, 0.06, 0.05])
    # 1. the store is locked by another process while the champion is re-scored: a fault, not a verdict
    monkeypatch.setattr(mlflow_registry, "REGISTRY_ATTEMPTS", 1)
    lock = sqlite3.connect(tmp_path / "mlflow.db", timeout=0)

    def rescore_while_locked(uri: str) -> pd.Series:
        lock.execute("BEGIN EXCLUSIVE")
        return rescore(uri)

    try:
        with pytest.raises(ChampionRescoreError, match="database is locked"):
            champion_gate(NAME, "2", new_daily, "other-rows", rescore_while_locked)
    finally:
        lock.rollback()
        lock.close()
    assert mlflow_registry.alias_version(NAME, "champion") == "1"

    # 2. an error of the moment (out of memory) fails the gate too
    def out_of_memory(uri: str) -> pd.Series:
        raise MemoryError("cannot allocate 8 GiB")

    with pytest.raises(ChampionRescoreError, match="MemoryError"):
        champion_gate(NAME, "2", new_daily, "other-rows", out_of_memory)
    assert mlflow_registry.alias_version(NAME, "champion") == "1"
    # 3. the champion's files are gone: it can no longer be loaded, so it is replaced, and the reason names
    # the error
    logged_model = mlflow.get_logged_model(model_uri.removeprefix("models:/"))
    shutil.rmtree(logged_model.artifact_location.removeprefix("file://"))
    with pytest.raises(Exception) as raised:
        rescore(f"models:/{NAME}/1")
    assert champion_unloadable(raised.value)
    gate = champion_gate(NAME, "2", new_daily, "other-rows", rescore)
    assert gate["promoted"] is True and mlflow_registry.alias_version(NAME, "champion") == "2"
    assert "v1 can no longer be loaded" in gate["reason"] and type(raised.value).__name__ in gate["reason"]
    # the same gate again (a retry after a crash between the alias move and `finish_version`): v2 is the
    # champion, and it says so with the verdict recorded before the alias moved
    again = champion_gate(NAME, "2", new_daily, "other-rows", rescore)
    assert again["promoted"] is True and mlflow_registry.alias_version(NAME, "champion") == "2"
    assert again["reason"].startswith("already champion (promoted by an earlier attempt: ")
    assert "v1 can no longer be loaded" in again["reason"]
    # what counts as "can no longer be loaded"
    assert champion_unloadable(ModelUnloadableError("fingerprint 1a2b != 3c4d"))
    assert champion_unloadable(RuntimeError("wrapped")) is False
    try:
        try:
            raise FileNotFoundError("regressor.json")
        except FileNotFoundError as inner:
            raise RuntimeError("load_context failed") from inner
    except RuntimeError as outer:
        assert champion_unloadable(outer)
    assert not champion_unloadable(sqlite3.OperationalError("database is locked"))
    try:  # the model's code no longer imports (MLflow wraps the ImportError of its code file)
        try:
            raise ModuleNotFoundError("No module named 'modeling.gone'")
        except ModuleNotFoundError as inner:
            raise mlflow.exceptions.MlflowException("Failed to import code model") from inner
    except mlflow.exceptions.MlflowException as outer:
        assert champion_unloadable(outer)


def _gate_in_process(uri: str, version: str, daily: list, champion_daily: list, delay: float, barrier, out):
    """One gate in its own process: it re-scores the champion (waiting for the other gate to have read
    the same champion, then `delay` seconds), then decides and moves the alias."""
    import time as clock

    import mlflow

    from modeling.champion_gate import champion_gate

    mlflow.set_tracking_uri(uri)

    def rescore(model_uri: str) -> pd.Series:
        barrier.wait(timeout=120)
        clock.sleep(delay)
        return _daily(champion_daily)

    gate = champion_gate(NAME, version, _daily(daily), "rows", rescore)
    out.put((version, gate["promoted"], gate["reason"]))


@pytest.mark.slow
def test_two_gates_at_once_only_the_better_model_ends_as_champion(registered_store, tmp_path, monkeypatch):
    """v2 and v3 both beat champion v1 and are judged at the same time; v2 is far better than v3. v2 moves
    the alias first; v3 finds the champion moved under it and judges again, against v2, and loses."""
    import multiprocessing

    import mlflow
    from mlflow.tracking import MlflowClient

    from modeling import mlflow_registry
    from modeling.champion_gate import gate_lock_path

    store, _, _, good = registered_store
    model_uri = _own_store(tmp_path, good, monkeypatch)
    rng = np.random.default_rng(5)
    champion = 0.02 + rng.normal(0, 0.03, 40)
    better, best = champion + 0.03 + rng.normal(0, 0.005, 40), champion + 0.08 + rng.normal(0, 0.005, 40)
    client = MlflowClient()
    for version, daily in (("2", best), ("3", better)):
        assert str(mlflow.register_model(model_uri, NAME).version) == version
        client.set_model_version_tag(NAME, version, "validation_rows_sha", "rows")
        client.set_model_version_tag(
            NAME, version, "val_daily_rank_ic", mlflow_registry.daily_to_tag(_daily(daily))
        )
    spawn = multiprocessing.get_context("spawn")
    barrier, out = spawn.Barrier(2), spawn.Queue()
    uri = mlflow.get_tracking_uri()
    gates = [
        spawn.Process(
            target=_gate_in_process, args=(uri, "2", list(best), list(champion), 0.0, barrier, out)
        ),
        spawn.Process(
            target=_gate_in_process, args=(uri, "3", list(better), list(champion), 3.0, barrier, out)
        ),
    ]
    for gate in gates:
        gate.start()
    results = {
        version: (promoted, reason) for version, promoted, reason in (out.get(timeout=300) for _ in gates)
    }
    for gate in gates:
        gate.join(timeout=60)
        assert gate.exitcode == 0
    assert mlflow_registry.alias_version(NAME, "champion") == "2"
    assert results["2"][0] is True
    assert results["3"][0] is False and "does not beat champion v2" in results["3"][1]
    assert gate_lock_path() == tmp_path / "mlflow.gate.lock"


def test_a_champion_judged_on_its_stored_series_must_still_load(registered_store, tmp_path, monkeypatch):
    """On the same validation rows the gate pairs against the champion's stored daily RankIC instead of
    re-scoring it, but it still loads it: a champion whose features are defined otherwise, or whose files
    are corrupt, serves nothing, so a challenger replaces it (before, the stored score kept it champion
    and `predictions` refused on every run). Corrupt files are a verdict; a filesystem fault is not."""
    import errno

    import mlflow
    from mlflow.tracking import MlflowClient

    from modeling import feature_registry, mlflow_registry
    from modeling.champion_gate import champion_gate, champion_unloadable

    store, _, _, good = registered_store
    model_uri = _own_store(tmp_path, good, monkeypatch)
    assert int(mlflow.register_model(model_uri, NAME).version) == 2
    stored = _daily([0.05, 0.06, 0.05, 0.06, 0.05, 0.06])
    client = MlflowClient()
    client.set_model_version_tag(NAME, "1", "validation_rows_sha", "rows-key")
    client.set_model_version_tag(NAME, "1", "val_daily_rank_ic", mlflow_registry.daily_to_tag(stored))

    def never(uri: str) -> pd.Series:
        raise AssertionError("the same rows: the stored series, no re-scoring")

    def gate() -> dict:
        return champion_gate(NAME, "2", stored, "rows-key", never, probe_champion=mlflow_registry.load_model)

    kept = gate()  # as good as the champion, which loads: it stays
    assert kept["promoted"] is False and "stored daily RankIC on the same rows" in kept["reason"]
    assert mlflow_registry.alias_version(NAME, "champion") == "1"
    # 1. a feature's SQL changed in the code: v1 no longer loads, so the stored score does not keep it
    features = feature_registry.FEATURES
    with monkeypatch.context() as patch:
        changed = replace(features[2], sql=features[2].sql + " + 0")
        patch.setattr(feature_registry, "FEATURES", (*features[:2], changed, *features[3:]))
        replaced = gate()
    assert replaced["promoted"] is True and mlflow_registry.alias_version(NAME, "champion") == "2"
    assert "v1 can no longer be loaded (ModelUnloadableError" in replaced["reason"]
    # the stored-series path as it was (no load): the unloadable champion stayed
    client.set_registered_model_alias(NAME, "champion", "1")
    with monkeypatch.context() as patch:
        patch.setattr(feature_registry, "FEATURES", (*features[:2], changed, *features[3:]))
        old = champion_gate(NAME, "2", stored, "rows-key", never)
    assert old["promoted"] is False and mlflow_registry.alias_version(NAME, "champion") == "1"
    # 2. a truncated head file: corrupt, so replaced, not a fault that fails every run
    artifacts = mlflow.get_logged_model(model_uri.removeprefix("models:/")).artifact_location
    (head,) = Path(artifacts.removeprefix("file://")).rglob("head.safetensors")
    head.write_bytes(head.read_bytes()[: head.stat().st_size // 2])
    corrupt = gate()
    assert corrupt["promoted"] is True and "v1 can no longer be loaded (SafetensorError" in corrupt["reason"]
    # what else counts as corrupt, and what does not
    assert champion_unloadable(json.JSONDecodeError("Expecting value", "{", 1))
    assert champion_unloadable(OSError("Can't load tokenizer for '/gone/tokenizer'"))  # a library's, no errno
    assert not champion_unloadable(OSError(errno.EIO, "Input/output error"))  # the filesystem's moment
    import requests

    for network in (requests.ConnectionError("tracking server down"), ConnectionResetError(), TimeoutError()):
        wrapped = mlflow.exceptions.MlflowException("API request failed")
        wrapped.__cause__ = network
        assert not champion_unloadable(wrapped), network  # a server that is down is not a verdict
    assert not champion_unloadable(ValueError("could not convert string to float"))


def test_the_pyfunc_refuses_when_a_feature_is_defined_otherwise(registered_store, monkeypatch) -> None:
    """The registered model recorded the feature definitions it was trained on; after one feature's SQL
    changes in the code, loading it fails with a clear error (and the gate may replace such a champion)."""
    from dataclasses import replace

    import mlflow

    from modeling import feature_registry, mlflow_registry
    from modeling.champion_gate import champion_unloadable

    store, *_ = registered_store
    mlflow.set_tracking_uri(f"sqlite:///{store / 'mlflow.db'}")
    features = feature_registry.FEATURES
    assert (
        mlflow_registry.version_tags(NAME, "1")["feature_registry_sha"]
        == feature_registry.registry_fingerprint()
    )
    changed = replace(features[2], sql=features[2].sql + " + 0")
    monkeypatch.setattr(feature_registry, "FEATURES", (*features[:2], changed, *features[3:]))
    with pytest.raises(Exception) as raised:
        mlflow_registry.load_model(f"models:/{NAME}/1")
    assert champion_unloadable(raised.value)
    assert "trained on features defined otherwise" in str(raised.value)


def test_a_percentile_model_serves_the_stored_percentiles_whatever_rows_a_call_holds(
    tiny_base_model, monkeypatch
) -> None:
    """A percentile-prompt model was judged on percentiles ranked on each date's whole universe (stored in
    the training set). Served the stored `<feature>_pct` columns, it renders those prompts for any subset
    of a date's rows; without them it ranks the rows it is given: other prompts on 25 of 30 names, and a
    refusal on 5 (before, the registration check's 64 rows always took that path and failed)."""
    from modeling import inference, pyfunc_model
    from modeling.feature_registry import PERCENTILE_COLUMNS, served_columns
    from modeling.prompt import PromptBuilder, PromptDataError

    builder = PromptBuilder(number_format="percentile")
    rows = make_training_set(n_dates=1, n_symbols=30, seed=5)
    whole = builder.with_percentiles(rows)  # as the training set stores them: the date's whole universe
    whole = whole.astype({c: "float64" for c in PERCENTILE_COLUMNS})
    tokenizer = load_tokenizer(tiny_base_model)
    judged = builder.render_batch(whole, tokenizer)
    seen: list[list[str]] = []

    def capture(model, tok, prompts, batch_size):  # the forward is not what is tested
        seen.append(list(prompts))
        return np.zeros(len(prompts))

    monkeypatch.setattr(inference, "predict_prompts", capture)
    served = pyfunc_model.RegressorPyfunc()
    served.builder, served.tokenizer, served.model, served.batch_size = builder, tokenizer, None, 8
    columns = served_columns(whole.columns)
    assert set(PERCENTILE_COLUMNS) <= set(columns)
    for subset in (slice(0, 5), slice(3, 28)):
        served.predict(None, whole.iloc[subset][columns])
        assert seen.pop() == judged[subset]
    plain = [c for c in columns if c not in PERCENTILE_COLUMNS]
    served.predict(None, whole.iloc[3:28][plain])  # ranked among the 25 it was given
    assert sum(a != b for a, b in zip(seen.pop(), judged[3:28], strict=True)) > 0
    with pytest.raises(PromptDataError, match="has 5 rows"):
        served.predict(None, whole.iloc[:5][plain])
    optional = {c.name for c in pyfunc_model.signature().inputs.inputs if not c.required}
    assert optional == {"sector", *PERCENTILE_COLUMNS}


def test_the_registered_model_takes_the_stored_percentiles_as_optional_input(
    registered_store, monkeypatch
) -> None:
    """MLflow's schema enforcement passes the optional percentile columns (floats, NaN on a thin date)
    through to the model: a value-prompt model ignores them, and a percentile-prompt one (the loaded
    model's builder switched) renders its prompts from them on 5 rows of a date, which it could not rank."""
    import mlflow

    from modeling import inference, mlflow_registry
    from modeling.feature_registry import PERCENTILE_COLUMNS, served_columns
    from modeling.prompt import PromptBuilder

    store, *_ = registered_store
    mlflow.set_tracking_uri(f"sqlite:///{store / 'mlflow.db'}")
    model = mlflow_registry.load_model(f"models:/{NAME}/1")
    rows = make_training_set(n_dates=3, n_symbols=6, seed=2)[list(MODEL_INPUT_COLUMNS)]
    pct = {c: np.where(np.arange(len(rows)) % 4 == 0, np.nan, 50.0) for c in PERCENTILE_COLUMNS}
    np.testing.assert_array_equal(model.predict(rows.assign(**pct)), model.predict(rows))
    served = model.unwrap_python_model()
    builder = served.builder = PromptBuilder(number_format="percentile")
    whole = builder.with_percentiles(make_training_set(n_dates=1, n_symbols=30, seed=5))
    whole = whole.astype({c: "float64" for c in PERCENTILE_COLUMNS})
    seen: list[list[str]] = []

    def capture(net, tok, prompts, batch_size):
        seen.append(list(prompts))
        return np.zeros(len(prompts))

    monkeypatch.setattr(inference, "predict_prompts", capture)
    model.predict(whole.head(5)[served_columns(whole.columns)])
    assert seen == [builder.render_batch(whole, served.tokenizer)[:5]]


def test_the_served_batch_size_comes_from_its_variable_or_a_clear_error() -> None:
    from modeling.pyfunc_model import predict_batch_size

    assert predict_batch_size(None, 32) == 32 and predict_batch_size(" ", 32) == 32
    assert predict_batch_size("8", 32) == 8
    for bad in ("0", "-4", "eight", "2.5"):
        with pytest.raises(ValueError, match="REGRESSOR_PREDICT_BATCH_SIZE must be a positive integer"):
            predict_batch_size(bad, 32)
