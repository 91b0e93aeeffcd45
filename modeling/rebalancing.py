"""The re-balanced train set, from the bucket weights of `modeling.buckets`.

`rebalance` fits a `BucketModel` on the train labels and returns the train rows with their weights
("weight" mode), or seeded draws with replacement in proportion to those weights, each with weight 1
("resample" mode); `bucket_table` is the per-bucket count, share, mean weight and effective share (a
bucket's share of the loss) before and after, and `histogram_png` the diagnostic figure of both.

Pure numpy / pandas (matplotlib for the diagnostic plot): no dagster, no mlflow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from modeling.buckets import BucketConfig, BucketModel, as_labels, fit_buckets, is_int


def resample_indices(weights: np.ndarray, target_size: int, seed: int) -> np.ndarray:
    """target_size row positions drawn with replacement, P(row i) = weights[i] / sum(weights).
    Deterministic for a seed (numpy default_rng), so a resampled train set is reproducible."""
    w = np.asarray(weights, dtype=float)
    if w.ndim != 1 or w.size == 0:
        raise ValueError(f"weights must be a non-empty 1-D array, got shape {w.shape}")
    if not (np.isfinite(w).all() and (w >= 0).all() and w.sum() > 0):
        raise ValueError("weights must be finite, non-negative and not all zero")
    if not (is_int(target_size) and target_size >= 1):
        raise ValueError(f"target_size must be an integer >= 1, got {target_size!r}")
    rng = np.random.default_rng(seed)
    return rng.choice(w.size, size=int(target_size), replace=True, p=w / w.sum()).astype(np.int64)


def bucket_table(buckets: np.ndarray, weights: np.ndarray, order: list[str]) -> pd.DataFrame:
    """One row per bucket of `order` (empty ones included), indexed by bucket name: count, share
    (count / total), weight (mean weight in the bucket, NaN if empty), effective_share (the bucket's
    share of the total weight, i.e. its share of the loss)."""
    b = np.asarray(buckets, dtype=object)
    w = np.asarray(weights, dtype=float)
    if b.shape != w.shape or b.ndim != 1:
        raise ValueError(f"buckets and weights must be 1-D of equal length, got {b.shape} and {w.shape}")
    position = {name: i for i, name in enumerate(order)}
    unknown = sorted({str(x) for x in b if x not in position})
    if unknown:
        raise ValueError(f"buckets not in order: {unknown}")
    codes = np.fromiter((position[x] for x in b), dtype=np.intp, count=b.size)
    count = np.bincount(codes, minlength=len(order))
    weight_sum = np.bincount(codes, weights=w, minlength=len(order))
    total, total_weight = count.sum(), weight_sum.sum()
    nan = np.full(len(order), np.nan)
    share = count / total if total > 0 else nan
    mean_weight = np.divide(weight_sum, count, out=nan.copy(), where=count > 0)
    effective = weight_sum / total_weight if total_weight > 0 else nan
    return pd.DataFrame(
        {
            "count": count.astype(np.int64),
            "share": share,
            "weight": mean_weight,
            "effective_share": effective,
        },
        index=pd.Index(list(order), name="bucket"),
    )


@dataclass(frozen=True)
class Rebalanced:
    """The re-balanced train set, as positions into the train rows plus per-row weights."""

    indices: np.ndarray
    """Row positions into the train rows: identity in weight mode, the draws in resample mode."""
    weights: np.ndarray
    """Weight per output row: the normalised weights in weight mode, 1.0 in resample mode."""
    buckets: np.ndarray
    """Bucket name per output row."""
    before: pd.DataFrame
    """bucket_table of the natural train set with the scheme's weights."""
    after: pd.DataFrame
    """bucket_table of the output rows (weight mode: same counts and effective shares as before;
    resample mode: counts of the drawn rows, weight 1)."""


def rebalance(train_labels: np.ndarray, cfg: BucketConfig) -> tuple[BucketModel, Rebalanced]:
    """Fit on the train labels and return the weighted (or resampled) train set."""
    y = as_labels(train_labels, "train_labels", allow_empty=False)
    model = fit_buckets(y, cfg)
    weights = model.train_weights(y)
    buckets = model.assign(y)
    before = bucket_table(buckets, weights, model.order)
    if cfg.mode == "weight":
        return model, Rebalanced(np.arange(y.size, dtype=np.int64), weights, buckets, before, before.copy())
    target = cfg.target_size if cfg.target_size is not None else y.size
    idx = resample_indices(weights, target, cfg.seed)
    ones = np.ones(idx.size)
    drawn = buckets[idx]
    return model, Rebalanced(idx, ones, drawn, before, bucket_table(drawn, ones, model.order))


def histogram_png(
    train_labels: np.ndarray, model: BucketModel, rebalanced: Rebalanced, path: str | Path
) -> Path:
    """Diagnostic figure: the train label histogram with the bucket edges, and each bucket's share
    before (natural counts) vs after (effective share under the weights or the draws)."""
    # A bare Figure on an Agg canvas renders headless without touching pyplot or the global backend
    # (matplotlib.use would switch, and close, the figures of an interactive session).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    y = as_labels(train_labels, "train_labels", allow_empty=False)
    k = model.extreme_threshold
    lo, hi = min(model.winsor_lo, -1.25 * k), max(model.winsor_hi, 1.25 * k)
    fig = Figure(figsize=(12, 4.5))
    FigureCanvasAgg(fig)
    ax_hist, ax_share = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.2, 1]})

    ax_hist.hist(np.clip(y, lo, hi), bins=120, range=(lo, hi), color="0.55")
    ax_hist.set_yscale("log")
    cuts = sorted({*model.edges["pos"], *(-e for e in model.edges["neg"])})
    for cut in cuts:
        extreme = math.isclose(abs(cut), k)
        ax_hist.axvline(cut, color="tab:red" if extreme else "tab:blue", lw=0.8, ls="-" if extreme else "--")
    ax_hist.set_xlabel("train label (outside the axis range clipped to its ends)")
    ax_hist.set_ylabel("rows (log)")
    ax_hist.set_title(
        f"train labels, sigma={model.sigma:.4g}; blue: bin edges, red: +-{model.cfg.extreme_k} sigma"
    )

    order = model.order
    x = np.arange(len(order))
    ax_share.bar(x - 0.2, rebalanced.before["share"].to_numpy(), 0.4, label="before (count share)")
    ax_share.bar(
        x + 0.2, rebalanced.after["effective_share"].to_numpy(), 0.4, label="after (effective share)"
    )
    ax_share.set_xticks(x, order, rotation=60, ha="right")
    ax_share.set_ylabel("share")
    ax_share.set_title(f"bucket shares, scheme={model.cfg.scheme}, mode={model.cfg.mode}")
    ax_share.legend()

    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", dpi=100)
    fig.clear()
    return out
