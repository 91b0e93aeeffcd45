"""After training: judge the regressor against the baselines, log everything to MLflow, register, gate.

Run by the training process's main rank (`modeling.run_job`) when the job names an experiment
(`TrainJob.experiment`), so the orchestrator only launches one command and reads back its numbers. Steps:

1. reload the trained model from disk (what gets packaged is what is judged);
2. score validation and test rows (evenly spaced dates, `eval_max_dates` of each; None = all);
3. fit the baselines on the same train rows, targets and weights (features joined from the training
   set);
4. one comparison table (validation and test, every metric of `modeling.metrics`, each RankIC with its
   standard error and number of dates) and one table of paired differences (the regressor's daily
   RankIC minus each baseline's on the same rows: mean, SE, t), plots;
5. one MLflow run with params, per-eval metrics, final metrics, artifacts and the pyfunc model,
   registered as a new version (`challenger`), then the champion gate (a paired test on the same
   validation rows).

This module imports mlflow only through `modeling.mlflow_registry` and `modeling.champion_gate`.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from modeling.backbones.common import load_tokenizer
from modeling.baselines import BaselineConfig, fit_predict_baselines
from modeling.data.corpus import train_sample
from modeling.data.parquet_io import read_served_rows
from modeling.evaluation import score_rows, split_horizon, split_rows
from modeling.feature_registry import FEATURE_NAMES, MODEL_INPUT_COLUMNS, served_columns
from modeling.job import ExperimentSpec, Outcome  # noqa: F401 (ExperimentSpec re-exported)
from modeling.metrics import evaluate, paired_difference, per_date_correlation
from modeling.model import LLMRegressor, load_regressor
from modeling.report_plots import forecast_plots
from modeling.train import TrainJob, TrainResult

METRIC_KEYS = (
    "rank_ic",
    "rank_ic_se",
    "rank_ic_t",
    "rank_ic_n_dates",
    "rank_icir",
    "ic",
    "icir",
    "mse",
    "mae",
    "directional_accuracy",
    "top_bottom_decile",
)


def feature_rows(training_set: Path) -> pd.DataFrame:
    """The training set's model inputs (its stored percentiles included) and fwd_ret, one row per (date,
    symbol)."""
    return read_served_rows(training_set, ["fwd_ret"])


def with_features(keys: pd.DataFrame, features: pd.DataFrame) -> pd.DataFrame:
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


def paired_against(frame: pd.DataFrame, baseline: np.ndarray, horizon: int) -> dict[str, float]:
    """The regressor (column `prediction`) minus `baseline` on the rows of `frame`: paired daily RankIC.
    Against a constant forecast (no daily RankIC) the difference is the regressor's own RankIC."""
    both = frame.assign(baseline=baseline)
    if np.ptp(np.asarray(baseline, dtype=float)) == 0:
        own = evaluate(frame, horizon=horizon)
        return {
            "delta": own["rank_ic"],
            "se": own["rank_ic_se"],
            "t": own["rank_ic_t"],
            "n_dates": own["rank_ic_n_dates"],
        }
    return paired_difference(both, "prediction", "baseline", horizon=horizon).to_dict()


def _pm(mean: float, se: float, n: float) -> str:
    return f"{mean:.4f} ± {se:.4f} ({int(n)})" if np.isfinite(mean) else "n/a"


def headline_table(
    results: dict[str, dict[str, dict[str, float]]], paired: dict[str, dict[str, dict[str, float]]]
) -> str:
    """Markdown: every model's RankIC ± SE (dates) on validation and test, ICIR, the decile spread, and
    the regressor's paired difference to each baseline (Δ ± SE, t) on the same rows."""
    lines = [
        "| model | validation RankIC ± SE (dates) | test RankIC ± SE (dates) | validation RankICIR "
        "| test top-bottom decile | LLM − model, validation: Δ ± SE (t) | LLM − model, test: Δ ± SE (t) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, per_split in results.items():
        v, t = per_split["validation"], per_split.get("test", {})
        cells = [
            name,
            _pm(v["rank_ic"], v["rank_ic_se"], v["rank_ic_n_dates"]),
            _pm(t.get("rank_ic", np.nan), t.get("rank_ic_se", np.nan), t.get("rank_ic_n_dates", 0)),
            f"{v['rank_icir']:.3f}" if np.isfinite(v["rank_icir"]) else "n/a",
            f"{t.get('top_bottom_decile', np.nan):.5f}",
        ]
        for split in ("validation", "test"):
            d = paired.get(name, {}).get(split)
            cells.append(f"{d['delta']:+.4f} ± {d['se']:.4f} ({d['t']:.2f})" if d else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _flat_metrics(
    results: dict[str, dict[str, dict[str, float]]],
    paired: dict[str, dict[str, dict[str, float]]],
    report: dict[str, Any],
    rates: dict[str, float],
) -> dict[str, float]:
    """Every number of the comparison as one flat MLflow metrics dict (the regressor's without prefix)."""
    metrics: dict[str, float] = {}
    for name, per_split in results.items():
        prefix = "" if name == "llm_regressor" else f"{name}/"
        for split, values in per_split.items():
            for key in METRIC_KEYS:
                metrics[f"{prefix}{split}_{key}"] = values[key]
    for short, split in (("val", "validation"), ("test", "test")):
        llm = results["llm_regressor"][split]
        metrics[f"{short}_rank_ic"] = llm["rank_ic"]
        metrics[f"{short}_rank_ic_se"] = llm["rank_ic_se"]
        metrics[f"{short}_n_dates"] = llm["rank_ic_n_dates"]
    for name, per_split in paired.items():
        for split, values in per_split.items():
            for key in ("delta", "se", "t", "n_dates"):
                metrics[f"paired/{name}/{split}_{key}"] = values[key]
    metrics.update(
        {
            "train_samples_per_s": report["samples_per_s"] or float("nan"),
            "score_rows_per_s": float(np.mean(list(rates.values()))),
            "train_samples": report["samples"],
            "best_step": report["best_step"] or 0,
        }
    )
    return metrics


def _verify_and_gate(
    spec: ExperimentSpec,
    logged: dict[str, Any],
    validation_rows: pd.DataFrame,
    daily: pd.Series,
    validation_key: str,
    horizon: int,
) -> dict[str, Any]:
    """The registered pyfunc must reproduce the judged predictions; then the champion gate decides."""
    from modeling import mlflow_registry
    from modeling.champion_gate import champion_gate

    columns = served_columns(validation_rows.columns)  # with the stored percentiles

    def rescore(uri: str) -> pd.Series:
        champion = mlflow_registry.load_model(uri)
        predicted = np.asarray(champion.predict(validation_rows[columns]), dtype=float)
        return per_date_correlation(validation_rows.assign(prediction=predicted), method="spearman")

    # what gets served is what was judged: the registered pyfunc must reproduce these predictions
    check = validation_rows.head(64)
    served = np.asarray(mlflow_registry.load_model(logged["model_uri"]).predict(check[columns]), dtype=float)
    gap = float(np.max(np.abs(served - check["prediction"].to_numpy(float)))) if len(check) else 0.0
    if not gap <= 1e-4 * max(1.0, float(np.abs(served).max(initial=0.0))):
        raise RuntimeError(
            f"the registered pyfunc model predicts differently from the judged model "
            f"(max difference {gap:.3g}); it is neither challenger nor champion"
        )
    return champion_gate(
        spec.registry_name,
        logged["model_version"],
        daily,
        validation_key,
        rescore,
        new_tags=spec.gate_tags,
        validation_start=spec.validation_start,
        k=spec.gate_k,
        min_delta=spec.gate_min_delta,
        horizon=horizon,
        probe_champion=mlflow_registry.load_model,
    )


def _compare_with_baselines(
    job: TrainJob,
    frames: dict[str, pd.DataFrame],
    features: pd.DataFrame,
    results: dict[str, dict[str, dict[str, float]]],
    horizon: int,
    horizons: dict[str, int],
) -> tuple[dict[str, dict[str, dict[str, float]]], dict[str, float], dict[str, pd.Series]]:
    """Fit the baselines on the rows, targets and weights the regressor trained on, score them on the same
    rows (added to `results`), and pair the regressor with each. `horizon`: the label's (the baselines'
    early-stopping purge); `horizons`: each split's in positions of its scored dates (their SEs). Returns
    (paired, fit seconds, the best baseline's test forecasts for the plots)."""
    paired: dict[str, dict[str, dict[str, float]]] = {}
    # the same rows, targets and weights the regressor trained on
    train_keys = train_sample(job.corpus_path, job.train, job.reweight, ["date", "symbol", "label", "weight"])
    train = with_features(train_keys, features)
    baseline_config = BaselineConfig(mlp_head=job.regressor.head, seed=job.train.seed)
    # early stopping on the train rows' last dates, never on the validation rows they are judged on
    predictions, baseline_seconds = fit_predict_baselines(
        train, None, frames, baseline_config, job.train.loss, job.train.huber_delta, horizon=horizon
    )
    for name, per_split in predictions.items():
        results[name] = {
            split: evaluate(frames[split].assign(prediction=p), horizon=horizons[split])
            for split, p in per_split.items()
        }
        # the regressor minus this baseline, date by date on the same rows (the zero forecast has no
        # daily RankIC: the difference to "no view" is the regressor's own RankIC)
        paired[name] = {
            split: paired_against(frames[split], per_split[split], horizons[split]) for split in per_split
        }
    best = max((n for n in predictions if n != "zero"), key=lambda n: results[n]["validation"]["rank_ic"])
    return paired, baseline_seconds, {best: pd.Series(predictions[best]["test"])}


def _run_params(job: TrainJob) -> dict[str, Any]:
    """The MLflow params of a run: the model's shape, training config, prompt settings and the job's own."""
    spec = job.experiment
    return {
        "regressor": job.regressor.to_dict(),
        "train": job.to_dict()["train"],
        "prompt": job.prompt,
        "base_model_dir": job.base_model_dir,
        "eval_max_dates": spec.eval_max_dates,
        "test_max_dates": spec.test_max_dates,
        **spec.params,
    }


def _version_tags(
    job: TrainJob, validation: dict[str, float], daily: pd.Series, rows_key: str
) -> dict[str, Any]:
    """Tags of the registered version: its validation score with SE and dates, the daily series a later
    gate pairs against, the rows it was judged on and the feature definitions it was trained on."""
    from modeling import mlflow_registry

    spec = job.experiment
    return {
        "val_rank_ic": validation["rank_ic"],
        "val_rank_ic_se": validation["rank_ic_se"],
        "val_n_dates": validation["rank_ic_n_dates"],
        "val_daily_rank_ic": mlflow_registry.daily_to_tag(daily),
        "validation_rows_sha": rows_key,
        # the feature definitions the model was trained on: `predictions` refuses rows computed otherwise
        "feature_registry_sha": job.prompt.get("feature_registry_sha", ""),
        **spec.gate_tags,
        **spec.version_tags,
    }


def _outcome(
    logged: dict[str, Any],
    gate: dict[str, Any],
    results: dict[str, dict[str, dict[str, float]]],
    headline: str,
    paired: dict[str, Any],
    plots: dict[str, Path],
    report: dict[str, Any],
    rates: dict[str, float],
    baseline_seconds: dict[str, float],
) -> Outcome:
    """What the run reports back: the version, the gate's verdict, every score with its SE and dates."""
    val_score = results["llm_regressor"]["validation"]["rank_ic"]
    return Outcome(
        run_id=logged["run_id"],
        model_uri=logged["model_uri"],
        model_version=logged["model_version"],
        promoted=gate["promoted"],
        gate=gate["reason"],
        val_rank_ic=val_score,
        val_rank_ic_se=results["llm_regressor"]["validation"]["rank_ic_se"],
        val_n_dates=results["llm_regressor"]["validation"]["rank_ic_n_dates"],
        test_rank_ic=results["llm_regressor"]["test"]["rank_ic"],
        test_rank_ic_se=results["llm_regressor"]["test"]["rank_ic_se"],
        test_n_dates=results["llm_regressor"]["test"]["rank_ic_n_dates"],
        val_rank_icir=results["llm_regressor"]["validation"]["rank_icir"],
        test_rank_icir=results["llm_regressor"]["test"]["rank_icir"],
        baselines_val_rank_ic={
            n: r["validation"]["rank_ic"] for n, r in results.items() if n != "llm_regressor"
        },
        comparison=headline,
        paired=paired,
        gate_stats={k: gate.get(k) for k in ("delta", "se", "t", "n_dates", "bar")},
        plots={name: str(path) for name, path in plots.items()},
        train={k: v for k, v in report.items() if k not in ("history", "eval_dates")},
        eval_history=report["history"],
        score_rows_per_s=round(float(np.mean(list(rates.values()))), 1),
        baseline_fit_s=baseline_seconds,
    )


def _load_judged_model(job: TrainJob, model_dir: Path) -> tuple[LLMRegressor, Any, Path]:
    """(the trained model reloaded from disk, its tokenizer, the tokenizer saved beside the model): what
    gets packaged is what is judged."""
    tokenizer = load_tokenizer(job.base_model_dir)
    tokenizer_dir = model_dir / "tokenizer"
    tokenizer.save_pretrained(tokenizer_dir)
    gc.collect()  # the training copy is gone: free its memory before loading the one that is judged
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    model = load_regressor(model_dir)  # on the GPU when there is one
    return model, tokenizer, tokenizer_dir


def _score_splits(
    job: TrainJob, model: LLMRegressor, tokenizer: Any, features: pd.DataFrame, log: Callable[[str], None]
) -> tuple[dict[str, pd.DataFrame], dict[str, float], dict[str, int]]:
    """The validation and test rows scored (each capped at its number of dates) with their features,
    the scoring rate of each split (rows/s) and its label horizon in positions of the scored dates
    (`thinned_horizon`: the Newey-West lag of a capped split's series)."""
    spec = job.experiment
    horizon = int(job.prompt.get("horizon", 1))
    frames: dict[str, pd.DataFrame] = {}
    rates: dict[str, float] = {}
    horizons: dict[str, int] = {}
    for split in ("validation", "test"):
        caps = [c for c in (spec.eval_max_dates, spec.test_max_dates if split == "test" else None) if c]
        cap = min(caps) if caps else None
        rows = split_rows(job.corpus_path, split, cap)
        horizons[split] = split_horizon(job.corpus_path, split, rows, horizon, cap)
        scored, rates[split] = score_rows(model, tokenizer, rows, job.train.eval_batch_size)
        log(f"scored {len(rows)} {split} rows on {rows['date'].nunique()} dates at {rates[split]:.0f} rows/s")
        frames[split] = with_features(scored, features)
    return frames, rates, horizons


def run_experiment(job: TrainJob, result: TrainResult, log: Callable[[str], None] = print) -> dict[str, Any]:
    from modeling import mlflow_registry

    spec = job.experiment
    started = time.perf_counter()
    model_dir = Path(result.model_dir)
    model, tokenizer, tokenizer_dir = _load_judged_model(job, model_dir)
    features = feature_rows(Path(spec.training_set_path))
    frames, rates, horizons = _score_splits(job, model, tokenizer, features, log)

    horizon = int(job.prompt.get("horizon", 1))
    results: dict[str, dict[str, dict[str, float]]] = {
        "llm_regressor": {split: evaluate(frame, horizon=horizons[split]) for split, frame in frames.items()}
    }
    paired: dict[str, dict[str, dict[str, float]]] = {}
    baseline_seconds: dict[str, float] = {}
    others: dict[str, pd.Series] = {}
    if spec.baselines:
        paired, baseline_seconds, others = _compare_with_baselines(
            job, frames, features, results, horizon, horizons
        )
    table = comparison_table(results)
    headline = headline_table(results, paired)
    log("\n" + headline)

    reports = Path(spec.reports_dir or model_dir.parent / "reports")
    reports.mkdir(parents=True, exist_ok=True)
    plots = forecast_plots(frames["test"], reports, "test", others)
    table_path = reports / "comparison.csv"
    table.to_csv(table_path, index=False)
    report_path = model_dir.parent / "train_report.json"

    validation_key = mlflow_registry.rows_key(frames["validation"])
    daily = per_date_correlation(frames["validation"], method="spearman")
    report = result.report()
    metrics = _flat_metrics(results, paired, report, rates)
    input_example = frames["validation"][list(MODEL_INPUT_COLUMNS)].head(3)
    experiment_id = mlflow_registry.configure(spec.tracking_uri, spec.experiment_name, spec.artifact_root)
    tags = _version_tags(job, results["llm_regressor"]["validation"], daily, validation_key)
    if spec.resume_version is not None:
        version_tags = mlflow_registry.version_tags(spec.registry_name, spec.resume_version)
        logged = {
            "run_id": version_tags["run_id"],
            "model_version": spec.resume_version,
            "model_uri": f"models:/{spec.registry_name}/{spec.resume_version}",
        }
        log(f"version {spec.resume_version} was registered before the previous attempt failed: gating it")
    else:
        logged = mlflow_registry.log_run(
            experiment_id,
            spec.run_name,
            _run_params(job),
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
    if spec.registry_name and logged["model_version"]:
        if spec.promote:
            gate = _verify_and_gate(
                spec, logged, frames["validation"], daily, validation_key, horizons["validation"]
            )
            log(f"champion gate: {gate['reason']}")
        else:
            gate = {"promoted": False, "reason": "the champion gate was not asked for (promote=False)"}
        mlflow_registry.finish_version(spec.registry_name, logged["model_version"], gate)
    outcome = _outcome(logged, gate, results, headline, paired, plots, report, rates, baseline_seconds)
    outcome = replace(outcome, experiment_s=round(time.perf_counter() - started, 1))
    outcome.save(model_dir.parent)
    return outcome.to_dict()
