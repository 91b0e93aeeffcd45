"""Scoring a trained regressor on a split of the prompt corpus: one function for the experiment, the
search and the benchmarks, so that every number they report is computed the same way.

The dates are the split's, evenly spaced when capped (`max_dates`; None = every date). With the daily
RankIC's spread of about 0.05-0.06 on the default market, the standard error of a mean over n dates is
about 0.055 / sqrt(n): 24 dates give 0.011, 100 give 0.0055, all 179 validation dates 0.0041.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np
import pandas as pd

from modeling.data.corpus import evenly_spaced_dates, read_corpus_split, tokenise_rows
from modeling.inference import DEFAULT_PREDICT_BATCH_SIZE, predict_ids
from modeling.metrics import DailyMean, rank_ic_stats, thinned_horizon


def split_rows(corpus_path: str | os.PathLike[str], split: str, max_dates: int | None) -> pd.DataFrame:
    """The corpus rows of `split` on `max_dates` evenly spaced dates (None = all), index reset."""
    rows = read_corpus_split(corpus_path, split)
    rows = rows[rows["date"].isin(evenly_spaced_dates(rows["date"], max_dates))]
    return rows.reset_index(drop=True)


def split_horizon(
    corpus_path: str | os.PathLike[str], split: str, rows: pd.DataFrame, horizon: int, max_dates: int | None
) -> int:
    """`horizon` in positions of `rows`' dates (`split_rows(corpus_path, split, max_dates)`, an evenly
    spaced subset of the split's): what the Newey-West lag of their daily series is computed from
    (`thinned_horizon`). Every date kept (`max_dates` None): the horizon itself, nothing read."""
    if horizon == 1 or max_dates is None:
        return horizon
    split_dates = int(read_corpus_split(corpus_path, split, ["date"])["date"].nunique())
    return thinned_horizon(horizon, int(rows["date"].nunique()), split_dates)


def score_rows(
    model: Any, tokenizer: Any, rows: pd.DataFrame, batch_size: int = DEFAULT_PREDICT_BATCH_SIZE
) -> tuple[pd.DataFrame, float]:
    """(rows without the prompt, plus `prediction`; rows scored per second)."""
    tokenised = tokenise_rows(rows, tokenizer)
    started = time.perf_counter()
    predictions = predict_ids(model, tokenizer, tokenised.ids, batch_size)
    rate = len(rows) / max(time.perf_counter() - started, 1e-9)
    return tokenised.frame.assign(prediction=predictions), rate


def score_split(
    model_dir: str | os.PathLike[str],
    corpus_path: str | os.PathLike[str],
    split: str,
    max_dates: int | None = None,
    horizon: int = 1,
    batch_size: int = DEFAULT_PREDICT_BATCH_SIZE,
) -> tuple[pd.DataFrame, DailyMean]:
    """A saved regressor's forecasts on a split and its mean daily RankIC with SE and dates."""
    from modeling.backbones.common import load_tokenizer
    from modeling.model import load_regressor, read_regressor_info

    base = read_regressor_info(model_dir)["base_model"]["path"]
    rows = split_rows(corpus_path, split, max_dates)
    frame, _ = score_rows(load_regressor(model_dir), load_tokenizer(base), rows, batch_size)
    return frame, rank_ic_stats(frame, horizon=split_horizon(corpus_path, split, rows, horizon, max_dates))


def dates_for_se(target_se: float, daily_sd: float = 0.055) -> int:
    """Dates needed for a mean daily RankIC with standard error `target_se` (daily spread `daily_sd`)."""
    return int(np.ceil((daily_sd / target_se) ** 2))
