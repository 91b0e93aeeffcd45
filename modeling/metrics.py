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

Statistics: a mean RankIC is an average over dates, so its precision is set by the number of dates and
the day-to-day spread of the daily RankIC (about 0.05-0.06 on daily equity returns: 100 dates give a
standard error near 0.005). Every mean here comes with its standard error and number of dates
(`DailyMean`). With a label horizon h > 1 consecutive daily ICs share h - 1 days of returns and are
autocorrelated, so the standard error is Newey-West with lag h - 1 (Bartlett weights). Two forecasts are
compared on the same rows by the *paired* difference: the daily RankIC of one minus that of the other,
on the dates where both are defined (`paired_difference`); its standard error is much smaller than
either one's, because the market noise of a date hits both forecasts alike.
"""

from __future__ import annotations

from dataclasses import dataclass

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

    Ranks with ties averaged, cut into n groups as equal as the count allows:
    quantile = floor((rank - 1) * n / count) + 1. Tied rows share a quantile (never split by row order),
    so a date whose forecast is constant puts every row in the middle quantile and has no top or bottom.
    """
    _check(frame, ("date", pred))
    grouped = frame.groupby("date", sort=False)[pred]
    rank = grouped.rank(method="average")
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
    frame: pd.DataFrame,
    pred: str = "prediction",
    target: str = "label",
    ret: str | None = "fwd_ret",
    horizon: int = 1,
) -> dict[str, float]:
    """All the metrics of one forecast on one set of rows (columns date, pred, target[, ret]).

    Keys: ic, ic_se, icir, rank_ic, rank_ic_se, rank_ic_t, rank_ic_n_dates, rank_icir, mse, mae,
    directional_accuracy, top_bottom_decile, n_rows, n_dates, n_dates_skipped. Standard errors are
    Newey-West with lag horizon - 1. `ret` None or absent: the decile spread is computed on the target.
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
    lag = nw_lag(horizon)
    rank_stats = DailyMean.of(rank_ic, lag)
    return {
        "ic": float(ic.mean()) if len(ic) else float("nan"),
        "ic_se": newey_west_se(ic.to_numpy(), lag),
        "icir": information_ratio(ic),
        "rank_ic": rank_stats.mean,
        "rank_ic_se": rank_stats.se,
        "rank_ic_t": rank_stats.t,
        "rank_ic_n_dates": rank_stats.n_dates,
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


# --- statistics over dates --------------------------------------------------------------------------------
def newey_west_se(series: pd.Series | np.ndarray, lag: int = 0) -> float:
    """Standard error of the mean of a per-date series, Newey-West with `lag` (Bartlett weights).

    With autocovariances g_l = sum_t (x_t - m)(x_{t-l} - m) / n, the long-run variance is
    S = g_0 + 2 sum_{l=1..lag} (1 - l / (lag + 1)) g_l, and SE = sqrt(S / (n - 1)). With lag 0 this is
    the classic std(ddof=1) / sqrt(n). NaN with fewer than 2 values.
    """
    if lag < 0:
        raise ValueError(f"lag must be >= 0, got {lag}")
    x = np.asarray(series, dtype=float)
    x = x[np.isfinite(x)]
    n = len(x)
    if n < 2:
        return float("nan")
    d = x - x.mean()
    variance = float(d @ d) / n
    for k in range(1, min(lag, n - 1) + 1):
        variance += 2.0 * (1.0 - k / (lag + 1)) * float(d[k:] @ d[:-k]) / n
    return float(np.sqrt(max(variance, 0.0) / (n - 1)))


def nw_lag(horizon: int) -> int:
    """The Newey-West lag for a label over `horizon` days: overlapping labels share horizon - 1 days."""
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    return horizon - 1


MIN_DATES_PER_NW_LAG = 5
"""`min_dates_for_lag`'s dates per lag."""


def thinned_horizon(horizon: int, kept_dates: int, split_dates: int) -> int:
    """The label horizon counted in positions of a series that keeps `kept_dates` evenly spaced dates of
    `split_dates` consecutive ones (`evenly_spaced_dates`, whose rounded picks it reproduces): the
    smallest k such that every two kept dates k positions apart stand at least `horizon` trading days
    apart, so that their labels share no day. With a spacing of 5 days and h = 20 that is 4, not 20. The
    picks are rounded, so a spacing like 2.5 leaves some gaps a day short; the count is taken on the picks
    themselves, not on the mean spacing. Pass it where a thinned series' SE takes a horizon."""
    if kept_dates >= split_dates or kept_dates < 2 or horizon == 1:
        return horizon
    positions = np.unique(np.round(np.linspace(0, split_dates - 1, kept_dates)).astype(int))
    for k in range(1, len(positions)):
        if int((positions[k:] - positions[:-k]).min()) >= horizon:
            return k
    return len(positions)


def min_dates_for_lag(lag: int) -> int:
    """Dates a Newey-West SE with `lag` needs to be trusted for a decision: 2 at lag 0, else 5 x lag. With
    fewer its Bartlett autocovariances rest on a handful of pairs and the SE comes out far too small (at
    lag 19 on 10 independent dates about 0.4 of the true spread), which would shrink a gate's bar."""
    return max(2, MIN_DATES_PER_NW_LAG * lag)


@dataclass(frozen=True)
class DailyMean:
    """The mean of a per-date series with its precision: what every reported RankIC carries."""

    mean: float
    """Mean over dates."""
    se: float
    """Standard error of the mean (Newey-West with `lag`)."""
    n_dates: int
    """Dates in the series (dates without a value are not counted)."""
    lag: int = 0
    """Newey-West lag (horizon - 1)."""

    @property
    def t(self) -> float:
        """mean / se (NaN when se is 0 or NaN)."""
        return self.mean / self.se if np.isfinite(self.se) and self.se > 0 else float("nan")

    @classmethod
    def of(cls, series: pd.Series, lag: int = 0) -> DailyMean:
        values = pd.Series(series, dtype=float).dropna()
        mean = float(values.mean()) if len(values) else float("nan")
        return cls(mean, newey_west_se(values.to_numpy(), lag), int(len(values)), lag)

    def to_dict(self, prefix: str = "") -> dict[str, float]:
        """{prefix mean, prefix_se, prefix_t, prefix_n_dates} (prefix "" gives mean, se, t, n_dates)."""
        base = prefix or "mean"
        head = f"{prefix}_" if prefix else ""
        return {base: self.mean, f"{head}se": self.se, f"{head}t": self.t, f"{head}n_dates": self.n_dates}

    def __str__(self) -> str:
        return f"{self.mean:.4f} ± {self.se:.4f} ({self.n_dates} dates)"


def rank_ic_stats(
    frame: pd.DataFrame, pred: str = "prediction", target: str = "label", horizon: int = 1
) -> DailyMean:
    """Mean daily RankIC with its standard error and number of dates."""
    return DailyMean.of(per_date_correlation(frame, pred, target, "spearman"), nw_lag(horizon))


@dataclass(frozen=True)
class PairedDifference:
    """Forecast a minus forecast b on the same rows: the daily RankIC difference and its statistics."""

    a: DailyMean
    """RankIC of a on the common dates."""
    b: DailyMean
    """RankIC of b on the common dates."""
    diff: DailyMean
    """Mean daily difference a - b, its standard error and t, over the dates where both are defined."""
    series: pd.Series
    """The daily difference (index: date)."""

    @property
    def delta(self) -> float:
        return self.diff.mean

    @property
    def se(self) -> float:
        return self.diff.se

    @property
    def t(self) -> float:
        return self.diff.t

    @property
    def n_dates(self) -> int:
        return self.diff.n_dates

    def to_dict(self) -> dict[str, float]:
        return {
            "delta": self.delta,
            "se": self.se,
            "t": self.t,
            "n_dates": self.n_dates,
            "a": self.a.mean,
            "b": self.b.mean,
        }

    def __str__(self) -> str:
        return f"Δ {self.delta:+.4f} ± {self.se:.4f} (t {self.t:.2f}, {self.n_dates} dates)"


def paired_difference(
    frame: pd.DataFrame,
    pred_a: str,
    pred_b: str,
    target: str = "label",
    horizon: int = 1,
    method: str = "spearman",
) -> PairedDifference:
    """Daily RankIC (or IC) of `pred_a` minus that of `pred_b`, on the same rows of `frame`.

    Only rows where both forecasts and the target are present count, so both correlations of a date
    are on the same rows; only dates where both are defined count (a constant forecast has none, and
    then no paired dates: compare against the zero forecast with `rank_ic_stats` of the other, whose
    difference to "no view" is its own RankIC). Standard error Newey-West with lag horizon - 1.
    """
    _check(frame, ("date", pred_a, pred_b, target))
    frame = frame.dropna(subset=[pred_a, pred_b, target])
    a = per_date_correlation(frame, pred_a, target, method)
    b = per_date_correlation(frame, pred_b, target, method)
    return paired_series_difference(a, b, horizon)


def paired_series_difference(a: pd.Series, b: pd.Series, horizon: int = 1) -> PairedDifference:
    """`paired_difference` for two per-date series already computed (the same dates are paired)."""
    common = a.dropna().index.intersection(b.dropna().index)
    a, b = a.loc[common], b.loc[common]
    lag = nw_lag(horizon)
    series = (a - b).rename("difference")
    return PairedDifference(DailyMean.of(a, lag), DailyMean.of(b, lag), DailyMean.of(series, lag), series)


@dataclass(frozen=True)
class SeedPairedDifference:
    """Forecast a minus forecast b over several training seeds, each seed's pair on the same rows.

    Two sources of noise sit in a comparison of two recipes: the dates (the market of a day hits both
    forecasts, which the paired daily difference removes) and the training run (initialisation, row
    draw and batch order move a whole model up or down by more than the date SE of a paired
    difference). `pooled` averages the seeds' daily differences date by date and reads the date noise
    of that average; `se_seeds` reads the run noise: the spread of the per-seed mean differences,
    sd(ddof=1) / sqrt(n_seeds). A recipe change is larger than the noise only when it is larger than
    both (`t` is the smaller of the two t statistics in absolute value).
    """

    per_seed: tuple[PairedDifference, ...]
    """Each seed's paired difference (a_s - b_s on that seed's rows and dates)."""
    pooled: PairedDifference
    """The paired difference of the seed-averaged daily series (date noise only)."""

    @property
    def n_seeds(self) -> int:
        return len(self.per_seed)

    @property
    def deltas(self) -> np.ndarray:
        """Mean daily difference of each seed."""
        return np.array([p.delta for p in self.per_seed], dtype=float)

    @property
    def delta(self) -> float:
        """Mean of the per-seed mean differences."""
        return float(self.deltas.mean())

    @property
    def se_seeds(self) -> float:
        """Standard error over seeds: sd of the per-seed deltas (ddof=1) / sqrt(n_seeds); NaN with one."""
        if self.n_seeds < 2:
            return float("nan")
        return float(self.deltas.std(ddof=1) / np.sqrt(self.n_seeds))

    @property
    def t_seeds(self) -> float:
        se = self.se_seeds
        return self.delta / se if np.isfinite(se) and se > 0 else float("nan")

    @property
    def t(self) -> float:
        """The more cautious of the two t statistics (over seeds, over dates): the one nearer zero."""
        ts = [t for t in (self.t_seeds, self.pooled.t) if np.isfinite(t)]
        return min(ts, key=abs) if ts else float("nan")

    def to_dict(self) -> dict[str, float]:
        return {
            "delta": self.delta,
            "se_seeds": self.se_seeds,
            "t_seeds": self.t_seeds,
            "n_seeds": self.n_seeds,
            "se_dates": self.pooled.se,
            "t_dates": self.pooled.t,
            "n_dates": self.pooled.n_dates,
            "t": self.t,
        }

    def __str__(self) -> str:
        if self.n_seeds == 1:  # no spread over seeds to report: the one seed's paired difference
            return str(self.pooled)
        per_seed = " / ".join(f"{d:+.4f}" for d in self.deltas)
        return (
            f"Δ {self.delta:+.4f} ± {self.se_seeds:.4f} over {self.n_seeds} seeds (t {self.t_seeds:.2f}; "
            f"per seed {per_seed}), ± {self.pooled.se:.4f} over {self.pooled.n_dates} dates "
            f"(t {self.pooled.t:.2f})"
        )


def seed_paired_difference(a: list[pd.Series], b: list[pd.Series], horizon: int = 1) -> SeedPairedDifference:
    """`paired_series_difference` per seed (a[i] against b[i]) and on the seed-averaged series.

    Every seed is paired on its own common dates; the pooled series averages the seeds' daily RankICs
    over the dates common to all of them, so every seed weighs the same on every date.
    """
    if len(a) != len(b) or not a:
        raise ValueError(f"need the same number (>= 1) of seeds on both sides, got {len(a)} and {len(b)}")
    per_seed = tuple(paired_series_difference(x, y, horizon) for x, y in zip(a, b, strict=True))
    mean_a = pd.concat([x.rename(i) for i, x in enumerate(a)], axis=1, join="inner").mean(axis=1)
    mean_b = pd.concat([y.rename(i) for i, y in enumerate(b)], axis=1, join="inner").mean(axis=1)
    return SeedPairedDifference(per_seed, paired_series_difference(mean_a, mean_b, horizon))
