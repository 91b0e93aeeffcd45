"""What the regressor is trained to fit: the training set's label, tamed, and how much each row weighs.

The label (the forward return, in units of its train standard deviation) is heavy-tailed: on the
default market 1% of the train rows lie beyond 2.4, and the largest at 33. A squared error on such a
row is a thousand times a typical row's, and the bucket weights multiply the extremes by another 3.5,
so a single vendor jump can set the direction of a whole step. Jumps carry no forecastable signal
(they are drawn independently of the past), so the regressor learns more from more data only when
they are tamed. The transforms, all fit per date or on constants, never on other splits:

- `none`: the label as stored;
- `clip`: the label clipped to +- `clip` (label units);
- `cs_zscore`: per date, (label - mean) / std across that date's train rows, then clipped to +- `clip`;
- `cs_rank`: per date, the normal quantile of the label's rank, (rank - 0.5) / n: the "rank-gaussian"
  target of cross-sectional equity models; bounded (about +-3 for 500 names) and blind to outliers.

Evaluation never sees these: RankIC is computed on the raw label of the validation and test rows.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

TARGET_TRANSFORMS = ("none", "clip", "cs_zscore", "cs_rank")
"""Transforms `TrainConfig.target_transform` may name."""


def training_targets(frame: pd.DataFrame, transform: str, clip: float = 5.0) -> np.ndarray:
    """The training target of every row of `frame` (columns date, label), per `transform`.

    Per-date statistics use every row of the frame on that date: call this on the whole train split,
    before any sampling, so a sampled row gets the value it has within its full cross-section. A frame
    that repeats a (date, symbol) (a training set resampled with replacement) has no cross-section: the
    per-date transforms refuse it.
    """
    if transform not in TARGET_TRANSFORMS:
        raise ValueError(f"target transform must be one of {TARGET_TRANSFORMS}, got {transform!r}")
    label = frame["label"].astype(float)
    if transform == "none":
        return label.to_numpy(np.float32)
    if transform == "clip":
        return label.clip(-clip, clip).to_numpy(np.float32)
    repeated = int(frame.duplicated(["date", "symbol"]).sum()) if "symbol" in frame else 0
    if repeated:
        raise ValueError(
            f"target transform {transform!r} is a per-date statistic of the cross-section, and "
            f"{repeated} rows repeat a (date, symbol): a training set "
            "resampled with replacement (bucket mode 'resample') is not a cross-section. Use bucket mode "
            "'weight' or target transform 'none' / 'clip'"
        )
    by_date = label.groupby(frame["date"].to_numpy())
    if transform == "cs_zscore":
        std = by_date.transform("std").replace(0.0, np.nan)
        z = (label - by_date.transform("mean")) / std
        return z.fillna(0.0).clip(-clip, clip).to_numpy(np.float32)
    from scipy.special import ndtri

    n = by_date.transform("count")
    rank = by_date.rank(method="average")
    return ndtri((rank - 0.5) / n).to_numpy(np.float32)


def tempered_weights(weight: np.ndarray, power: float) -> np.ndarray:
    """Bucket weights raised to `power` and rescaled to mean 1: 1 keeps them, 0 drops them, 0.5 halves
    their spread on a log scale."""
    if power < 0:
        raise ValueError(f"weight power must be >= 0, got {power}")
    w = np.asarray(weight, dtype=np.float64)
    if power == 1.0:
        return w.astype(np.float32)
    w = np.power(w, power)
    return (w / w.mean()).astype(np.float32) if len(w) else w.astype(np.float32)
