"""One walk-forward window in the training process: after the LLM regressor trained on the window's
corpus (`TrainJob.backtest_output` set), forecast the window's dates out of sample with it and with the
feature baselines, fit on exactly the rows, targets and weights the LLM trained on.

The window's corpus (`modeling.backtest.window_corpus`) carries the window's segments as splits: `train`
(the rows to fit), `validation` (early stopping and monitoring) and `test` (the dates to forecast). The
forecasts go to one Parquet file (model, date, symbol, prediction) that the orchestrator stores; nothing
here touches the warehouse, so the child needs only torch, transformers, peft and pandas.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from modeling.baselines import BaselineConfig, fit_predict_baselines
from modeling.data.corpus import train_sample
from modeling.data.parquet_io import write_parquet_atomic
from modeling.evaluation import score_rows, split_rows
from modeling.experiment import feature_rows, with_features
from modeling.targets import training_targets
from modeling.train import TrainJob, TrainResult

LLM_MODEL = "llm"
FEATURE_BASELINES = ("ridge", "lightgbm", "mlp_features")
"""The models a window forecasts with besides the LLM (the zero forecast has no ranking to backtest)."""
PREDICTION_COLUMNS = ["model", "date", "symbol", "prediction"]


def forecast_with_baselines(
    train: pd.DataFrame,
    validation: pd.DataFrame,
    predict: pd.DataFrame,
    cfg: BaselineConfig | None = None,
    loss: str = "mse",
    huber_delta: float = 1.0,
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Fit ridge, LightGBM and the feature MLP on `train` (features, label, weight; `validation` for early
    stopping) and forecast `predict`: ({model: forecasts}, {model: fit seconds})."""
    fitted, seconds = fit_predict_baselines(
        train,
        validation,
        {"test": predict},
        cfg or BaselineConfig(),
        loss,
        huber_delta,
        only=FEATURE_BASELINES,
    )
    return {name: per_split["test"] for name, per_split in fitted.items()}, seconds


def stopping_rows(job: TrainJob, features: pd.DataFrame) -> pd.DataFrame:
    """The window's validation rows, on which the baselines stop early, with the training target as
    `label` (`cfg.target_transform`, per date: no train statistic): LightGBM stops at its best l2 against
    the labels, and its forecasts are on the scale of the target it trains on, not of the stored label."""
    rows = with_features(split_rows(job.corpus_path, "validation", None), features)
    return rows.assign(label=training_targets(rows, job.train.target_transform, job.train.target_clip))


def run_window(job: TrainJob, result: TrainResult, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Forecast the window corpus's `test` rows with the trained LLM and the feature baselines; write them
    to `job.backtest_output`. Returns the timings and row counts."""
    from modeling.backbones.common import load_tokenizer
    from modeling.model import load_regressor

    if job.training_set_path is None or job.backtest_output is None:
        raise ValueError("a backtest window needs training_set_path and backtest_output")
    rows = split_rows(job.corpus_path, "test", None)
    started = time.perf_counter()
    scored, rate = score_rows(
        load_regressor(result.model_dir), load_tokenizer(job.base_model_dir), rows, job.train.eval_batch_size
    )
    score_s = time.perf_counter() - started
    log(f"scored {len(rows)} rows on {rows['date'].nunique()} dates at {rate:.0f} rows/s ({score_s:.1f} s)")

    started = time.perf_counter()
    features = feature_rows(Path(job.training_set_path))  # read once for the three frames
    train = with_features(
        train_sample(job.corpus_path, job.train, job.reweight, ["date", "symbol", "label", "weight"]),
        features,
    )
    validation = stopping_rows(job, features)
    predict = with_features(scored[["date", "symbol"]], features)
    baselines, fit_s = forecast_with_baselines(
        train,
        validation,
        predict,
        BaselineConfig(mlp_head=job.regressor.head, seed=job.train.seed),
        job.train.loss,
        job.train.huber_delta,
    )
    baselines_s = time.perf_counter() - started
    frames = [scored[["date", "symbol", "prediction"]].assign(model=LLM_MODEL)]
    for name, forecast in baselines.items():
        frames.append(predict[["date", "symbol"]].assign(model=name, prediction=forecast))
    out = pd.concat(frames, ignore_index=True)[PREDICTION_COLUMNS]
    write_parquet_atomic(out, Path(job.backtest_output))
    report = result.report()
    return {
        "rows": len(rows),
        "dates": int(rows["date"].nunique()),
        "train_loop_s": report["train_loop_s"],
        "train_rows": report["n_train_rows"],
        "score_s": round(score_s, 2),
        "score_rows_per_s": round(rate, 1),
        "baselines_s": round(baselines_s, 2),
        "baseline_fit_s": fit_s,
    }
