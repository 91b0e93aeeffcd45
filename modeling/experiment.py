"""After training: judge the regressor against the baselines, log everything to MLflow, register, gate.

Run by the training process's main rank when the job names an experiment (`TrainJob.experiment`), so
the orchestrator only launches one command and reads back its numbers. Steps:

1. reload the trained model from disk (what gets packaged is what is judged);
2. score validation and test rows (evenly spaced dates, `eval_max_dates` of each; None = all);
3. fit the baselines on the same train rows, labels and weights (features joined from the training set);
4. one comparison table (validation and test, every metric of `modeling.metrics`), plots;
5. one MLflow run with params, per-eval metrics, final metrics, artifacts and the pyfunc model,
   registered as a new version (`challenger`), then the champion gate.

This module imports mlflow only through `modeling.registry`.
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from modeling.backbones.common import load_tokenizer
from modeling.baselines import BaselineConfig, fit_predict_baselines
from modeling.feature_registry import FEATURE_NAMES
from modeling.metrics import evaluate, rank_ic
from modeling.model import load_regressor, predict_ids
from modeling.report_plots import forecast_plots
from modeling.train import (
    TrainJob,
    TrainResult,
    bucket_weights,
    evenly_spaced_dates,
    read_corpus_split,
    sample_rows,
    tokenise_rows,
)

METRIC_KEYS = (
    "rank_ic",
    "rank_icir",
    "ic",
    "icir",
    "mse",
    "mae",
    "directional_accuracy",
    "top_bottom_decile",
)


@dataclass
class ExperimentSpec:
    """`TrainJob.experiment`: where to log and what to judge on."""

    tracking_uri: str
    training_set_path: str
    experiment_name: str = "return-regressor"
    registry_name: str | None = "return-regressor"
    """None: log the run and the model, register nothing (search trials)."""
    artifact_root: str | None = None
    eval_max_dates: int | None = 40
    """Validation and test dates scored at the end (evenly spaced; None = all)."""
    baselines: bool = True
    run_name: str = "regressor"
    params: dict[str, Any] = field(default_factory=dict)
    """Extra params to log: bucket scheme, data ranges, base model identity, hyperparameter source."""
    version_tags: dict[str, Any] = field(default_factory=dict)
    """Extra tags on the registered version (e.g. the inputs fingerprint)."""
    reports_dir: str | None = None
    parent_run_id: str | None = None
    promote: bool = True
    """Run the champion gate (False: register as challenger only)."""
    resume_version: str | None = None
    """A version this job already registered before its run failed (before the gate): it is verified
    and gated instead of registering another copy."""
    gate_tags: dict[str, Any] = field(default_factory=dict)
    """What makes validation scores comparable across versions (horizon, label kind, train end)."""
    validation_start: str | None = None
    """First validation date: a champion trained on or after it is not compared on its in-sample score."""


def _feature_rows(training_set: Path) -> pd.DataFrame:
    columns = ["date", "symbol", "sector", *FEATURE_NAMES, "fwd_ret"]
    rows = pd.read_parquet(training_set, columns=columns)
    return rows.drop_duplicates(["date", "symbol"]).reset_index(drop=True)


def _with_features(keys: pd.DataFrame, features: pd.DataFrame) -> pd.DataFrame:
    """Attach the 16 features, sector and fwd_ret to corpus rows (keeps their order and multiplicity)."""
    merged = keys.merge(features, on=["date", "symbol"], how="left", validate="many_to_one")
    missing = int(merged[FEATURE_NAMES[0]].isna().sum())
    if missing:
        raise ValueError(f"{missing} prompt corpus rows have no training-set row: rebuild prompt_corpus")
    return merged


def comparison_table(results: dict[str, dict[str, dict[str, float]]]) -> pd.DataFrame:
    """rows: model and baselines; columns: split/metric."""
    records = []
    for name, per_split in results.items():
        record: dict[str, Any] = {"model": name}
        for split, metrics in per_split.items():
            for key in METRIC_KEYS:
                record[f"{split}_{key}"] = metrics[key]
        records.append(record)
    return pd.DataFrame(records)


def run_experiment(job: TrainJob, result: TrainResult, log: Callable[[str], None] = print) -> dict[str, Any]:
    from modeling import registry

    spec = ExperimentSpec(**job.experiment)
    started = time.perf_counter()
    model_dir = Path(result.model_dir)
    tokenizer = load_tokenizer(job.base_model_dir)
    tokenizer_dir = model_dir / "tokenizer"
    tokenizer.save_pretrained(tokenizer_dir)
    gc.collect()  # the training copy is gone: free its memory before loading the one that is judged
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    model = load_regressor(model_dir)  # on the GPU when there is one
    features = _feature_rows(Path(spec.training_set_path))

    frames: dict[str, pd.DataFrame] = {}
    for split in ("validation", "test"):
        rows = read_corpus_split(job.corpus_path, split)
        rows = rows[rows["date"].isin(evenly_spaced_dates(rows["date"], spec.eval_max_dates))]
        rows = rows.reset_index(drop=True)
        tokenised = tokenise_rows(rows, tokenizer)
        t0 = time.perf_counter()
        predictions = predict_ids(model, tokenizer, tokenised.ids, job.train.eval_batch_size)
        log(
            f"scored {len(rows)} {split} rows on {rows['date'].nunique()} dates "
            f"in {time.perf_counter() - t0:.1f}s"
        )
        frames[split] = _with_features(tokenised.frame, features).assign(prediction=predictions)

    results: dict[str, dict[str, dict[str, float]]] = {
        "llm_regressor": {split: evaluate(frame) for split, frame in frames.items()}
    }
    baseline_seconds: dict[str, float] = {}
    others: dict[str, pd.Series] = {}
    if spec.baselines:
        train_rows = read_corpus_split(job.corpus_path, "train", ["date", "symbol", "label", "weight"])
        if job.reweight is not None:  # the same weights the regressor trained with
            weights = bucket_weights(train_rows["label"].to_numpy(), job.reweight)
            train_rows = train_rows.assign(weight=weights)
        train_keys = sample_rows(
            train_rows,
            job.train.max_train_samples,
            job.train.seed,
        )
        train = _with_features(train_keys, features)
        baseline_config = BaselineConfig(mlp_head=job.regressor.head, seed=job.train.seed)
        predictions, baseline_seconds = fit_predict_baselines(
            train, frames["validation"], frames, baseline_config, job.train.loss, job.train.huber_delta
        )
        for name, per_split in predictions.items():
            results[name] = {
                split: evaluate(frames[split].assign(prediction=p)) for split, p in per_split.items()
            }
        best = max((n for n in predictions if n != "zero"), key=lambda n: results[n]["validation"]["rank_ic"])
        others[best] = pd.Series(predictions[best]["test"])
    table = comparison_table(results)
    log("\n" + table.to_string(index=False, float_format=lambda v: f"{v:.5f}"))

    reports = Path(spec.reports_dir or model_dir.parent / "reports")
    reports.mkdir(parents=True, exist_ok=True)
    plots = forecast_plots(frames["test"], reports, "test", others)
    table_path = reports / "comparison.csv"
    table.to_csv(table_path, index=False)
    report_path = model_dir.parent / "train_report.json"

    validation_key = registry.dates_key(frames["validation"]["date"].unique())
    metrics: dict[str, float] = {}
    for name, per_split in results.items():
        prefix = "" if name == "llm_regressor" else f"{name}/"
        for split, values in per_split.items():
            for key in METRIC_KEYS:
                metrics[f"{prefix}{split}_{key}"] = values[key]
    report = result.report()
    metrics.update(
        {
            "train_samples_per_s": report["samples_per_s"] or float("nan"),
            "train_samples": report["samples"],
            "best_step": report["best_step"] or 0,
        }
    )
    val_score = results["llm_regressor"]["validation"]["rank_ic"]
    params = {
        "regressor": job.regressor.to_dict(),
        "train": job.to_dict()["train"],
        "prompt": job.prompt,
        "base_model_dir": job.base_model_dir,
        "eval_max_dates": spec.eval_max_dates,
        **spec.params,
    }
    input_example = frames["validation"][["date", "symbol", "sector", *FEATURE_NAMES]].head(3)
    experiment_id = registry.configure(spec.tracking_uri, spec.experiment_name, spec.artifact_root)
    tags = {
        "val_rank_ic": val_score,
        "validation_dates_sha": validation_key,
        **spec.gate_tags,
        **spec.version_tags,
    }
    if spec.resume_version is not None:
        version_tags = registry.version_tags(spec.registry_name, spec.resume_version)
        logged = {
            "run_id": version_tags["run_id"],
            "model_version": spec.resume_version,
            "model_uri": f"models:/{spec.registry_name}/{spec.resume_version}",
        }
        log(f"version {spec.resume_version} was registered before the previous attempt failed: gating it")
    else:
        logged = registry.log_run(
            experiment_id,
            spec.run_name,
            params,
            report["history"],
            metrics,
            [table_path, report_path, *plots.values()],
            model_dir,
            tokenizer_dir,
            Path(job.base_model_dir),
            input_example,
            spec.registry_name,
            tags,
            spec.parent_run_id,
        )
    gate: dict[str, Any] = {"promoted": False, "reason": "not registered"}
    if spec.registry_name and logged["model_version"] and not spec.promote:
        gate = {"promoted": False, "reason": "the champion gate was not asked for (promote=False)"}
        registry.finish_version(spec.registry_name, logged["model_version"], gate)
    if spec.registry_name and logged["model_version"] and spec.promote:
        validation_rows = frames["validation"]

        def rescore(uri: str) -> float:
            champion = registry.load_model(uri)
            frame = validation_rows[["date", "symbol", "sector", *FEATURE_NAMES]]
            return rank_ic(
                validation_rows.assign(prediction=np.asarray(champion.predict(frame), dtype=float))
            )

        # what gets served is what was judged: the registered pyfunc must reproduce these predictions
        check = validation_rows.head(64)
        served = np.asarray(
            registry.load_model(logged["model_uri"]).predict(
                check[["date", "symbol", "sector", *FEATURE_NAMES]]
            ),
            dtype=float,
        )
        gap = float(np.max(np.abs(served - check["prediction"].to_numpy(float)))) if len(check) else 0.0
        if not gap <= 1e-4 * max(1.0, float(np.abs(served).max(initial=0.0))):
            raise RuntimeError(
                f"the registered pyfunc model predicts differently from the judged model "
                f"(max difference {gap:.3g}); it is neither challenger nor champion"
            )
        gate = registry.champion_gate(
            spec.registry_name,
            logged["model_version"],
            val_score,
            validation_key,
            rescore,
            new_tags=spec.gate_tags,
            validation_start=spec.validation_start,
        )
        registry.finish_version(spec.registry_name, logged["model_version"], gate)
        log(f"champion gate: {gate['reason']}")
    outcome = {
        "run_id": logged["run_id"],
        "model_uri": logged["model_uri"],
        "model_version": logged["model_version"],
        "promoted": gate["promoted"],
        "gate": gate["reason"],
        "val_rank_ic": val_score,
        "test_rank_ic": results["llm_regressor"]["test"]["rank_ic"],
        "val_rank_icir": results["llm_regressor"]["validation"]["rank_icir"],
        "test_rank_icir": results["llm_regressor"]["test"]["rank_icir"],
        "baselines_val_rank_ic": {
            n: r["validation"]["rank_ic"] for n, r in results.items() if n != "llm_regressor"
        },
        "comparison": table.to_markdown(index=False, floatfmt=".5f"),
        "plots": {name: str(path) for name, path in plots.items()},
        "train": {k: v for k, v in report.items() if k not in ("history", "eval_dates")},
        "eval_history": report["history"],
        "experiment_s": round(time.perf_counter() - started, 1),
        "baseline_fit_s": baseline_seconds,
    }
    (model_dir.parent / "outcome.json").write_text(json.dumps(outcome, indent=1, default=str) + "\n")
    return outcome
