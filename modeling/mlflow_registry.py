"""MLflow's store, runs and registered versions: with `champion_gate.py` and `pyfunc_model.py` the only
modules of `modeling` that import MLflow (the model's own code is `modeling.pyfunc_model`, which MLflow
ships with every version; loading a model never imports this module or the gate).

Aliases: every new version gets `challenger` (`finish_version`); `champion` moves only through the
champion gate (`modeling.champion_gate`), which reads the aliases and version tags kept here.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from modeling import pyfunc_model
from modeling.metrics import DailyMean

REGISTERED_MODEL_NAME = "return-regressor"
"""Default registry name (configurable, fixed by the interface contract)."""
CHAMPION, CHALLENGER = "champion", "challenger"
"""Registry aliases."""
EMBED_BASE_MODEL_MAX_BYTES = 200 * 1024**2
"""Base models up to this size are copied into the pyfunc artefact (self-contained); larger ones are
referenced by path and fingerprint."""
VERSION_TAGS = (
    "val_rank_ic",
    "val_rank_ic_se",
    "val_n_dates",
    "val_daily_rank_ic",
    "validation_rows_sha",
    "feature_registry_sha",
    "inputs_sha",
    "run_id",
)
"""Tags set on every registered version (`val_daily_rank_ic`: the daily validation RankIC as JSON, what
a later gate pairs against when it judges on the same validation rows)."""


# --- store ----------------------------------------------------------------------------------------------
def configure(tracking_uri: str, experiment_name: str, artifact_root: str | Path | None = None) -> str:
    """Point MLflow at the store and return the experiment's id (created with its artifacts under
    `artifact_root` when new)."""
    mlflow.set_tracking_uri(tracking_uri)
    experiment = mlflow.get_experiment_by_name(experiment_name)
    if experiment is not None:
        return experiment.experiment_id
    location = Path(artifact_root).resolve().as_uri() + f"/{experiment_name}" if artifact_root else None
    return mlflow.create_experiment(experiment_name, artifact_location=location)


def flatten(prefix: str, value: Any) -> dict[str, str]:
    """Nested config -> MLflow params {"a.b.c": "value"} (values as strings, 500 characters at most)."""
    if isinstance(value, dict):
        out: dict[str, str] = {}
        for key, item in value.items():
            out.update(flatten(f"{prefix}.{key}" if prefix else str(key), item))
        return out
    text = json.dumps(value, default=str) if isinstance(value, list | tuple) else str(value)
    return {prefix: text[:500]}


def rows_key(frame: pd.DataFrame) -> str:
    """Identifies a set of validation rows by their (date, symbol, label): a champion's stored daily
    RankIC is reused only on exactly these rows; a revised label or another universe changes the key."""
    rows = frame[["date", "symbol", "label"]].assign(
        date=pd.to_datetime(frame["date"]).dt.strftime("%Y-%m-%d"), label=frame["label"].round(10)
    )
    rows = rows.sort_values(["date", "symbol"], kind="stable")
    digest = hashlib.sha256(pd.util.hash_pandas_object(rows, index=False).to_numpy().tobytes())
    return digest.hexdigest()[:16]


def daily_to_tag(daily: pd.Series) -> str:
    """A daily RankIC series as a compact JSON tag value ({date: value}, 6 decimals)."""
    return json.dumps({str(pd.Timestamp(d).date()): round(float(v), 6) for d, v in daily.items()})


def daily_from_tag(text: str) -> pd.Series:
    data = json.loads(text)
    return pd.Series(list(data.values()), index=pd.to_datetime(list(data.keys())), dtype=float)


def _package_dir(model_dir: Path, tokenizer_dir: Path, base_model_dir: Path) -> tuple[dict[str, str], Path]:
    """Artifacts of the pyfunc model, staged in a temporary directory (the base model copied when small)."""
    stage = Path(tempfile.mkdtemp(prefix="pyfunc-"))
    artifacts = {"regressor": str(model_dir), "tokenizer": str(tokenizer_dir)}
    weights = sum(
        f.stat().st_size
        for pattern in ("*.safetensors", "*.bin", "*.pt")
        for f in base_model_dir.glob(pattern)
    )
    if weights <= EMBED_BASE_MODEL_MAX_BYTES:
        copy = stage / "base_model"
        shutil.copytree(base_model_dir, copy)
        artifacts["base_model"] = str(copy)
    return artifacts, stage


EVAL_KEYS = ("val_rank_ic", "val_rank_ic_se", "val_n_dates")
"""A periodic evaluation's RankIC with its precision: logged as `eval/<key>` at its step."""


def _eval_metrics(record: dict[str, Any], extra: tuple[str, ...] = ()) -> dict[str, float]:
    """The finite values of a training history record, as `eval/<key>` metrics."""
    return {
        f"eval/{key}": float(record[key])
        for key in (*EVAL_KEYS, *extra)
        if record.get(key) is not None and np.isfinite(record[key])
    }


def log_run(
    experiment_id: str,
    run_name: str,
    params: dict[str, Any],
    history: list[dict[str, Any]],
    metrics: dict[str, float],
    artifact_files: Iterable[Path],
    model_dir: Path,
    tokenizer_dir: Path,
    base_model_dir: Path,
    input_example: pd.DataFrame,
    registry_name: str | None,
    version_tags: dict[str, Any] | None = None,
    parent_run_id: str | None = None,
) -> dict[str, Any]:
    """One MLflow run: params, per-eval metrics, final metrics, artifacts and the pyfunc model, registered
    as a new version of `registry_name` with alias `challenger` (None: logged, not registered).

    Returns {"run_id", "model_uri", "model_version"}.
    """
    tags = {"mlflow.parentRunId": parent_run_id} if parent_run_id else None
    with mlflow.start_run(
        experiment_id=experiment_id, run_name=run_name, tags=tags, nested=parent_run_id is not None
    ) as run:
        flat = flatten("", params)
        for start in range(0, len(flat), 90):  # MLflow takes at most 100 params per batch
            mlflow.log_params(dict(list(flat.items())[start : start + 90]))
        for record in history:
            for key, value in _eval_metrics(record, ("train_loss", "lr")).items():
                mlflow.log_metric(key, value, step=int(record["step"]))
        # NaN is kept (an undefined metric, e.g. the RankIC of a constant forecast); inf is not a value
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None and not np.isinf(v)})
        for path in artifact_files:
            mlflow.log_artifact(str(path), artifact_path="report")
        artifacts, stage = _package_dir(Path(model_dir), Path(tokenizer_dir), Path(base_model_dir))
        try:
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=pyfunc_model.__file__,
                artifacts=artifacts,
                signature=pyfunc_model.signature(),
                input_example=input_example,
                pip_requirements=pyfunc_model.pip_requirements(),
            )
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        version = None
        if registry_name:
            # every tag in the one call that creates the version, so that no version is ever half-tagged
            # (a version without `run_id` or `inputs_sha` would be trained again); aliases come later,
            # after the model was verified and gated (`finish_version`)
            all_tags = {**(version_tags or {}), "run_id": run.info.run_id, "gate": "pending"}
            created = mlflow.register_model(
                info.model_uri, registry_name, tags={k: str(v) for k, v in all_tags.items()}
            )
            version = str(created.version)
    return {"run_id": run.info.run_id, "model_uri": info.model_uri, "model_version": version}


def tag_verdict(name: str, version: str, gate: dict[str, Any]) -> None:
    """The gate's verdict on the version: its reason and whether it was promoted."""
    client = MlflowClient()
    client.set_model_version_tag(name, version, "gate_reason", str(gate.get("reason", ""))[:500])
    client.set_model_version_tag(name, version, "promoted", str(bool(gate.get("promoted"))))


def finish_version(name: str, version: str, gate: dict[str, Any]) -> None:
    """Mark the version as gated (with the gate's reason) and make it the challenger."""
    tag_verdict(name, version, gate)
    client = MlflowClient()
    client.set_registered_model_alias(name, CHALLENGER, version)
    # last: "done" is what tells a later run that this version needs nothing more
    client.set_model_version_tag(name, version, "gate", "done")


def start_parent_run(experiment_id: str, run_name: str, params: dict[str, Any]) -> str:
    """Open a run that nested runs (search trials) hang under; returns its id (ended by `end_run`)."""
    run = mlflow.start_run(experiment_id=experiment_id, run_name=run_name)
    flat = flatten("", params)
    for start in range(0, len(flat), 90):
        mlflow.log_params(dict(list(flat.items())[start : start + 90]))
    return run.info.run_id


def end_run(
    metrics: dict[str, float] | None = None, artifacts: Iterable[Path] = (), status: str = "FINISHED"
) -> None:
    if metrics:
        mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None and np.isfinite(v)})
    for path in artifacts:
        mlflow.log_artifact(str(path))
    mlflow.end_run(status=status)


def log_trial_run(
    experiment_id: str,
    parent_run_id: str,
    trial: int,
    params: dict[str, Any],
    score: DailyMean | None,
    history: list[dict[str, Any]],
    state: str,
) -> str:
    """One search trial as a nested run: its params, per-eval validation RankIC and its judged score
    (`val_rank_ic` with `val_rank_ic_se` and `val_n_dates`; None for a pruned or failed trial)."""
    client = MlflowClient()
    run = client.create_run(
        experiment_id,
        run_name=f"trial-{trial:04d}",
        tags={"mlflow.parentRunId": parent_run_id, "trial_state": state},
    )
    for key, text in flatten("", params).items():
        client.log_param(run.info.run_id, key, text)
    for record in history:
        for key, value in _eval_metrics(record).items():
            client.log_metric(run.info.run_id, key, value, step=int(record["step"]))
    if score is not None and np.isfinite(score.mean):
        client.log_metric(run.info.run_id, "val_rank_ic", score.mean)
        client.log_metric(run.info.run_id, "val_rank_ic_se", score.se)
        client.log_metric(run.info.run_id, "val_n_dates", score.n_dates)
    client.set_terminated(run.info.run_id, status="FINISHED" if state == "complete" else "KILLED")
    return run.info.run_id


def log_backtest_run(
    experiment_id: str,
    run_name: str,
    analysis_id: str,
    params: dict[str, Any],
    metrics: dict[str, float],
    windows: list[dict[str, Any]],
    artifacts: Iterable[Path] = (),
) -> tuple[str, bool]:
    """The walk-forward backtest as one MLflow run with a nested run per window (its dates, timings and
    per-model RankIC). A finished run of the same `analysis_id` (inputs, config, costs) is reused, not
    logged twice. Returns (run id, logged now?)."""
    client = MlflowClient()
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.backtest_analysis_id = '{analysis_id}' and attributes.status = 'FINISHED'",
        max_results=1,
    )
    if found:
        return found[0].info.run_id, False
    run_id = client.create_run(
        experiment_id, run_name=run_name, tags={"backtest_analysis_id": analysis_id}
    ).info.run_id
    try:
        _log_flat(client, run_id, params, metrics)
        for path in artifacts:
            client.log_artifact(run_id, str(path))
        for window in windows:
            child = client.create_run(
                experiment_id,
                run_name=f"{run_name}-window-{window['window']}",
                tags={"mlflow.parentRunId": run_id},
            ).info.run_id
            _log_flat(client, child, window.get("params", {}), window.get("metrics", {}))
            client.set_terminated(child, status="FINISHED")
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")
    return run_id, True


def _log_flat(client: MlflowClient, run_id: str, params: dict[str, Any], metrics: dict[str, float]) -> None:
    from mlflow.entities import Metric, Param

    now = int(time.time() * 1000)
    flat = list(flatten("", params).items())
    values = [Metric(k, float(v), now, 0) for k, v in metrics.items() if v is not None and np.isfinite(v)]
    for start in range(0, max(len(flat), len(values)), 90):
        client.log_batch(
            run_id,
            metrics=values[start : start + 90],
            params=[Param(k, v[:6000]) for k, v in flat[start : start + 90]],
        )


class RegistryError(RuntimeError):
    """The model registry could not be read (after retries): nothing is decided on a guess."""


REGISTRY_ATTEMPTS = 4
"""Reads of the registry are tried this many times (back-off 0.5 s, 1 s, 2 s) before failing."""


def _alias_missing(error: Exception) -> bool:
    """True only for "no such alias" / "no such model": every other error is a fault, not an answer."""
    code = getattr(error, "error_code", "")
    text = str(error)
    return code == "RESOURCE_DOES_NOT_EXIST" or (
        code == "INVALID_PARAMETER_VALUE" and "alias" in text and "not found" in text
    )


def alias_version(name: str, alias: str, attempts: int | None = None, backoff_s: float = 0.5) -> str | None:
    """The version an alias points at; None only when the alias (or the model) does not exist.

    Any other error (a locked SQLite store, a tracking server that is down) is retried with back-off and
    then raised as `RegistryError` with the store's message: reading "no champion" from a fault would
    crown whatever model comes next."""
    attempts = attempts or REGISTRY_ATTEMPTS
    attempt = 0
    while True:
        try:
            return str(MlflowClient().get_model_version_by_alias(name, alias).version)
        except mlflow.exceptions.MlflowException as error:
            if _alias_missing(error):
                return None
            attempt += 1
            if attempt >= attempts:
                raise RegistryError(f"could not read alias {alias!r} of {name!r}: {error}") from error
        time.sleep(backoff_s * 2 ** (attempt - 1))


def version_tags(name: str, version: str) -> dict[str, str]:
    return dict(MlflowClient().get_model_version(name, version).tags)


def find_version(name: str, tag: str, value: str) -> str | None:
    """The newest version of `name` whose `tag` equals `value` (None when none or no such model). A store
    error propagates: "none found" read from a fault would train and register a duplicate."""
    try:
        versions = MlflowClient().search_model_versions(f"name = '{name}'")
    except mlflow.exceptions.MlflowException as error:
        if getattr(error, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise
    matches = [v for v in versions if v.tags.get(tag) == value]
    return str(max(int(v.version) for v in matches)) if matches else None


def load_model(uri: str) -> Any:
    """`mlflow.pyfunc.load_model`, for callers that must not import mlflow themselves."""
    return mlflow.pyfunc.load_model(uri)
