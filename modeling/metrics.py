"""Forecast quality as a quant reads it: cross-sectional, per date, then averaged over dates.

A return forecast is used to rank the stocks of one date against each other, so the headline numbers
are computed per date and then summarised over dates:

- IC: Pearson correlation of prediction and label across the stocks of a date; RankIC: the same on
  ranks (Spearman, ties averaged). Reported as the mean over dates, and as ICIR / RankICIR = mean / std
  over dates (the information ratio of the daily IC; std with ddof=1).
- top-minus-bottom decile: per date, the mean forward return of the 10% highest predictions minus that
  of the 10% lowest (the long-short portfolio's return), averaged over dates. It is computed on the raw
  forward return `fwd_ret` when the frame has it (return units), else on the label.
- pointwise: MSE and MAE against the label, and directional accuracy (share of rows whose prediction has
  the label's sign; rows with a zero label or zero prediction are left out, they have no direction).

Dates with fewer than `MIN_NAMES_PER_DATE` names or no spread in prediction or label have no IC and are
skipped (counted in `n_dates_skipped`), never silently treated as zero.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

MIN_NAMES_PER_DATE = 3
"""A correlation across fewer names is meaningless."""
N_QUANTILES = 10
"""Deciles."""


def _check(frame: pd.DataFrame, columns: tuple[str, ...]) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise KeyError(f"metrics need column(s) {missing}; got {list(frame.columns)}")


def per_date_correlation(
    frame: pd.DataFrame, pred: str = "prediction", target: str = "label", method: str = "pearson"
) -> pd.Series:
    """Correlation of `pred` and `target` across the names of each date (index: date, sorted).

    method: "pearson" (IC) or "spearman" (RankIC: Pearson on per-date ranks, ties averaged). Dates with
    too few names or zero variance are absent from the result.
    """
    _check(frame, ("date", pred, target))
    if method not in ("pearson", "spearman"):
        raise ValueError(f"method must be pearson or spearman, got {method!r}")
    data = frame[["date", pred, target]].dropna()
    if method == "spearman":
        by_date = data.groupby("date", sort=False)
        data = data.assign(**{pred: by_date[pred].rank(), target: by_date[target].rank()})
    grouped = data.groupby("date", sort=True)
    x = data[pred] - grouped[pred].transform("mean")
    y = data[target] - grouped[target].transform("mean")
    sums = pd.DataFrame({"date": data["date"], "xy": x * y, "xx": x * x, "yy": y * y}).groupby("date").sum()
    counts = grouped.size()
    denominator = np.sqrt(sums["xx"] * sums["yy"])
    # relative threshold: a constant column leaves only rounding noise in its sum of squares
    scale = np.sqrt(
        (data[pred] ** 2).groupby(data["date"]).sum() * (data[target] ** 2).groupby(data["date"]).sum()
    )
    ok = (counts >= MIN_NAMES_PER_DATE) & (denominator > 1e-12 * scale.clip(lower=1e-300))
    return (sums["xy"][ok] / denominator[ok]).rename(f"{'rank_' if method == 'spearman' else ''}ic")


def information_ratio(series: pd.Series) -> float:
    """mean / std (ddof=1) of a per-date series; NaN with fewer than 2 dates or no spread."""
    if len(series) < 2:
        return float("nan")
    std = float(series.std(ddof=1))
    return float(series.mean()) / std if std > 0 else float("nan")


def assign_quantiles(frame: pd.DataFrame, pred: str = "prediction", n: int = N_QUANTILES) -> pd.Series:
    """Per date, the quantile (1 = lowest predictions .. n = highest) of each row by `pred`.

    Ordinal ranks (ties broken by row order), cut into n groups as equal as the count allows:
    quantile = floor((rank - 1) * n / count) + 1.
    """
    _check(frame, ("date", pred))
    grouped = frame.groupby("date", sort=False)[pred]
    rank = grouped.rank(method="first")
    count = grouped.transform("count")
    return (np.floor((rank - 1) * n / count) + 1).astype("Int64")


def quantile_returns(
    frame: pd.DataFrame, pred: str = "prediction", ret: str = "fwd_ret", n: int = N_QUANTILES
) -> pd.DataFrame:
    """Mean `ret` per (date, quantile of `pred`): rows = dates, columns = 1..n."""
    _check(frame, ("date", pred, ret))
    data = frame[["date", pred, ret]].dropna()
    data = data.assign(quantile=assign_quantiles(data, pred, n))
    return data.groupby(["date", "quantile"])[ret].mean().unstack("quantile").sort_index()


def long_short_returns(
    frame: pd.DataFrame, pred: str = "prediction", ret: str = "fwd_ret", n: int = N_QUANTILES
) -> pd.Series:
    """Per date: mean `ret` of the top quantile minus the bottom quantile (dates with both)."""
    table = quantile_returns(frame, pred, ret, n)
    if table.empty or n not in table.columns or 1 not in table.columns:
        return pd.Series(dtype=float, name="long_short")
    return (table[n] - table[1]).dropna().rename("long_short")


def directional_accuracy(frame: pd.DataFrame, pred: str = "prediction", target: str = "label") -> float:
    """Share of rows where sign(pred) == sign(target), among rows where neither is zero."""
    _check(frame, (pred, target))
    p, y = np.sign(frame[pred].to_numpy(float)), np.sign(frame[target].to_numpy(float))
    keep = (p != 0) & (y != 0) & np.isfinite(p) & np.isfinite(y)
    return float((p[keep] == y[keep]).mean()) if keep.any() else float("nan")


def evaluate(
    frame: pd.DataFrame, pred: str = "prediction", target: str = "label", ret: str | None = "fwd_ret"
) -> dict[str, float]:
    """All the metrics of one forecast on one set of rows (columns date, pred, target[, ret]).

    Keys: ic, icir, rank_ic, rank_icir, mse, mae, directional_accuracy, top_bottom_decile, n_rows,
    n_dates, n_dates_skipped. `ret` None or absent: the decile spread is computed on the target.
    """
    _check(frame, ("date", pred, target))
    data = frame[frame[target].notna()]
    if data[pred].isna().any() or not np.isfinite(data[pred].to_numpy(float)).all():
        raise ValueError(f"{int((~np.isfinite(data[pred].to_numpy(float))).sum())} non-finite predictions")
    ic = per_date_correlation(data, pred, target, "pearson")
    rank_ic = per_date_correlation(data, pred, target, "spearman")
    spread_on = ret if ret is not None and ret in data.columns else target
    long_short = long_short_returns(data, pred, spread_on)
    error = data[pred].to_numpy(float) - data[target].to_numpy(float)
    n_dates = int(data["date"].nunique())
    return {
        "ic": float(ic.mean()) if len(ic) else float("nan"),
        "icir": information_ratio(ic),
        "rank_ic": float(rank_ic.mean()) if len(rank_ic) else float("nan"),
        "rank_icir": information_ratio(rank_ic),
        "mse": float(np.mean(error**2)) if len(error) else float("nan"),
        "mae": float(np.mean(np.abs(error))) if len(error) else float("nan"),
        "directional_accuracy": directional_accuracy(data, pred, target),
        "top_bottom_decile": float(long_short.mean()) if len(long_short) else float("nan"),
        "n_rows": int(len(data)),
        "n_dates": n_dates,
        "n_dates_skipped": n_dates - int(len(rank_ic)),
    }


def rank_ic(frame: pd.DataFrame, pred: str = "prediction", target: str = "label") -> float:
    """Mean per-date RankIC: the model-selection metric (early stopping, search, the champion gate)."""
    series = per_date_correlation(frame, pred, target, "spearman")
    return float(series.mean()) if len(series) else float("nan")
