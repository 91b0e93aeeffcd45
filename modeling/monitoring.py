"""Live monitoring: how the forecasts the pipeline served have done since their returns became known.

The `predictions` table keeps every live date's forecasts with the model version that made them. Once a
date's forward return is known (the `features` table's `fwd_ret`, h trading days later), the forecast
and the realised return are joined and summarised per (date, model_version):

- `ic` / `rank_ic`: Pearson / Spearman correlation of forecast and realised forward return across the
  names of the date (`modeling.metrics.per_date_correlation`; a date with fewer than 3 names or no
  spread has none);
- `decile_spread`: mean `fwd_ret` of the top forecast decile minus the bottom decile (the daily
  long-short return, in return units);
- `hit_rate`: the share of names on the right side of the date's average: sign(forecast - the date's
  mean forecast) == sign(fwd_ret - the date's mean fwd_ret), names at exactly the mean left out;
- `n_names`: the names with both a forecast and a realised return.

Rolling means over the last 20 and 60 realised dates (`<metric>_mean_20`, `<metric>_mean_60`, with
`rank_ic_se_20` / `rank_ic_se_60` the standard error of the RankIC's mean and `n_dates_20` /
`n_dates_60` the dates with a RankIC in the window) follow the serving track record:
each date counts with the model that served it, whichever version that was.

The decay rule (`decay_verdict`) judges the current champion on its *own* realised dates only: the mean
RankIC of its last `window` realised dates must stay at or above a floor. The default floor is the
champion's validation RankIC minus 2 standard errors of the difference between the two means (the
validation mean's and the window's, sqrt(se_val^2 + se_window^2): 20 realised dates are about three
times noisier than 179 validation dates), or 0, whichever is lower: a model is flagged when it does worse
than its validation said it could plausibly do *and* worse than no skill. Too few realised
dates (fewer than `min_dates`, by default the full window) is not evidence either way: the rule passes and
says so.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from modeling.metrics import long_short_returns, newey_west_se, nw_lag, per_date_correlation

if TYPE_CHECKING:  # the annotation only: the rules import where DuckDB is not installed (the GPU image)
    import duckdb

PERFORMANCE_TABLE = "prediction_performance"
ROLLING_WINDOWS = (20, 60)
"""Rolling means over this many realised dates."""
ROLLED_METRICS = ("rank_ic", "ic", "decile_spread", "hit_rate")
DAILY_COLUMNS = ("date", "model_version", "n_names", "ic", "rank_ic", "decile_spread", "hit_rate")
PERFORMANCE_COLUMNS = (
    *DAILY_COLUMNS,
    *(f"{metric}_mean_{w}" for w in ROLLING_WINDOWS for metric in ROLLED_METRICS),
    *(f"rank_ic_se_{w}" for w in ROLLING_WINDOWS),
    *(f"n_dates_{w}" for w in ROLLING_WINDOWS),
)


def realised_forecasts(predictions: pd.DataFrame, outcomes: pd.DataFrame) -> pd.DataFrame:
    """Forecasts (date, symbol, prediction, model_version) joined with their realised forward return
    (date, symbol, fwd_ret); rows whose return is not known yet (NaN or absent) are left out."""
    for name, frame, columns in (
        ("predictions", predictions, ("date", "symbol", "prediction", "model_version")),
        ("outcomes", outcomes, ("date", "symbol", "fwd_ret")),
    ):
        missing = [c for c in columns if c not in frame.columns]
        if missing:
            raise KeyError(f"{name} lacks column(s) {missing}")
        if frame.duplicated(["date", "symbol"]).any():
            raise ValueError(f"{name} holds duplicate (date, symbol) rows; cannot join forecasts to outcomes")
    joined = predictions[["date", "symbol", "prediction", "model_version"]].merge(
        outcomes[["date", "symbol", "fwd_ret"]], on=["date", "symbol"], how="inner", validate="one_to_one"
    )
    joined = joined[np.isfinite(joined["fwd_ret"].to_numpy(float))]
    return joined.sort_values(["date", "symbol"]).reset_index(drop=True)


def _hit_rate(frame: pd.DataFrame) -> pd.Series:
    by_date = frame.groupby("date")
    side_pred = np.sign(frame["prediction"] - by_date["prediction"].transform("mean"))
    side_ret = np.sign(frame["fwd_ret"] - by_date["fwd_ret"].transform("mean"))
    keep = (side_pred != 0) & (side_ret != 0)
    hits = (side_pred == side_ret)[keep]
    return hits.groupby(frame.loc[keep, "date"]).mean()


def daily_performance(realised: pd.DataFrame) -> pd.DataFrame:
    """Per (date, model_version) of `realised_forecasts` rows: n_names, ic, rank_ic, decile_spread and
    hit_rate (NaN where a date has too few names for the statistic)."""
    if realised.empty:
        return pd.DataFrame({c: pd.Series(dtype=float) for c in DAILY_COLUMNS}).astype(
            {"date": "datetime64[ns]", "model_version": str, "n_names": "int64"}
        )
    versions = realised.groupby("date")["model_version"].nunique()
    if (versions > 1).any():
        raise ValueError(f"dates served by two model versions: {list(versions[versions > 1].index[:5])}")
    out = realised.groupby("date").agg(model_version=("model_version", "first"), n_names=("symbol", "size"))
    out["ic"] = per_date_correlation(realised, "prediction", "fwd_ret", "pearson")
    out["rank_ic"] = per_date_correlation(realised, "prediction", "fwd_ret", "spearman")
    out["decile_spread"] = long_short_returns(realised, "prediction", "fwd_ret")
    out["hit_rate"] = _hit_rate(realised)
    return out.reset_index()[list(DAILY_COLUMNS)]


def with_rolling_means(
    daily: pd.DataFrame, windows: tuple[int, ...] = ROLLING_WINDOWS, horizon: int = 1
) -> pd.DataFrame:
    """`daily` sorted by date, with the mean of each metric over the last w realised dates (dates where
    the metric is undefined are skipped inside the window), the standard error of the RankIC's mean
    (`window_mean_se` at the label `horizon`, as the decay rule takes it) and the number of dates with a
    RankIC in the window."""
    out = daily.sort_values("date").reset_index(drop=True)
    rank_ic = out["rank_ic"].to_numpy(float)
    for w in windows:
        for metric in ROLLED_METRICS:
            out[f"{metric}_mean_{w}"] = out[metric].rolling(w, min_periods=1).mean()
        windows_ric = [rank_ic[max(0, i - w + 1) : i + 1] for i in range(len(out))]
        defined = [x[np.isfinite(x)] for x in windows_ric]
        out[f"rank_ic_se_{w}"] = [window_mean_se(x, horizon) if len(x) > 1 else np.nan for x in defined]
        out[f"n_dates_{w}"] = np.array([len(x) for x in defined], dtype="int64")
    return out


def performance_table(predictions: pd.DataFrame, outcomes: pd.DataFrame, horizon: int = 1) -> pd.DataFrame:
    """The whole `prediction_performance` table from the forecasts and the realised returns (`horizon`:
    the label's, for the rolling RankIC's standard error)."""
    table = with_rolling_means(daily_performance(realised_forecasts(predictions, outcomes)), horizon=horizon)
    return table[list(PERFORMANCE_COLUMNS)]


def write_performance(con: duckdb.DuckDBPyConnection, table: pd.DataFrame) -> dict[str, int]:
    """Replace the table's content with `table` in one transaction (it is recomputed from scratch each
    time, so a revised return updates its date). Returns the dates added and the dates whose row
    changed; a re-run with nothing new reports (and writes) the same rows."""
    numeric = ", ".join(f"{c} DOUBLE" for c in PERFORMANCE_COLUMNS[3:] if not c.startswith("n_dates"))
    counts = ", ".join(f"n_dates_{w} BIGINT" for w in ROLLING_WINDOWS)
    schema = f"(date TIMESTAMP, model_version VARCHAR, n_names BIGINT, {numeric}, {counts})"
    con.execute(f"CREATE TABLE IF NOT EXISTS {PERFORMANCE_TABLE} {schema}")
    before = con.execute(f"SELECT * FROM {PERFORMANCE_TABLE}").df()
    con.register("_new_performance", table)
    try:
        con.execute("BEGIN TRANSACTION")
        try:  # recreated, not emptied: a table of an earlier version may lack a column
            con.execute(f"CREATE OR REPLACE TABLE {PERFORMANCE_TABLE} {schema}")
            con.execute(
                f"INSERT INTO {PERFORMANCE_TABLE} "
                f"SELECT {', '.join(PERFORMANCE_COLUMNS)} FROM _new_performance"
            )
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
    finally:
        con.unregister("_new_performance")
    old = set(pd.to_datetime(before["date"])) if len(before) else set()
    return {
        "dates": len(table),
        "new_dates": len(set(table["date"]) - old),
        "changed_dates": _changed_dates(before, table),
    }


def _changed_dates(before: pd.DataFrame, after: pd.DataFrame) -> int:
    """Dates present in both whose row differs (numbers beyond 1e-12, or the model version)."""
    merged = after.assign(date=pd.to_datetime(after["date"]).astype("datetime64[ns]")).merge(
        before.assign(date=pd.to_datetime(before["date"]).astype("datetime64[ns]")),
        on="date",
        suffixes=("", "_old"),
    )
    if merged.empty:
        return 0
    differs = merged["model_version"].astype(str) != merged["model_version_old"].astype(str)
    for col in PERFORMANCE_COLUMNS[2:]:
        if f"{col}_old" not in merged:  # a column the earlier table version did not have
            continue
        a, b = merged[col].to_numpy(float), merged[f"{col}_old"].to_numpy(float)
        differs |= ~(np.isclose(a, b, rtol=0.0, atol=1e-12) | (np.isnan(a) & np.isnan(b)))
    return int(differs.sum())


# --- the decay rule --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DecayRule:
    window: int = 20
    """Judge the champion on the mean RankIC of its last `window` realised dates."""
    min_dates: int | None = None
    """Fewer realised dates of the champion than this is no evidence (the rule passes); None = window."""
    floor: float | None = None
    """Fixed floor; None = min(validation RankIC - 2 sqrt(se_val^2 + se_window^2), 0)."""
    horizon: int = 1
    """Label horizon of the forecasts: the Newey-West lag (h - 1) of the window's standard error."""

    def __post_init__(self) -> None:
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if self.min_dates is not None and not 1 <= self.min_dates <= self.window:
            raise ValueError(f"min_dates must be in [1, window={self.window}], got {self.min_dates}")


@dataclass(frozen=True)
class DecayVerdict:
    model_version: str
    passed: bool
    n_dates: int
    """Realised dates of this version in the window."""
    realised_rank_ic: float
    """Mean daily realised RankIC over them (NaN without any)."""
    floor: float
    floor_rule: str
    """Which floor applied: "configured", "validation - 2 SE" or "zero"."""
    val_rank_ic: float
    val_rank_ic_se: float
    reason: str
    realised_rank_ic_se: float = float("nan")
    """Newey-West SE of the window's mean (its part of the floor's 2 SE)."""

    def to_dict(self) -> dict:
        return asdict(self)


def decay_floor(
    val_rank_ic: float, val_se: float, configured: float | None = None, window_se: float = 0.0
) -> tuple[float, str]:
    """(floor, which rule) — see the module docstring. `window_se`: the SE of the realised window's
    mean, which the validation mean is compared with (0 = the validation SE alone)."""
    if configured is not None:
        return float(configured), "configured"
    window_se = window_se if np.isfinite(window_se) else 0.0
    lower = val_rank_ic - 2.0 * float(np.hypot(val_se, window_se))
    if not np.isfinite(lower) or lower >= 0.0:
        return 0.0, "zero"
    return float(lower), "validation - 2 SE"


def window_mean_se(daily: np.ndarray, horizon: int = 1) -> float:
    """SE of the mean of a short window of daily RankICs. At horizon 1: the classic std / sqrt(n). Above,
    overlapping labels make neighbouring dates co-move, and Newey-West on a 20-date window misses most of
    it (lag h - 1 from too few pairs: about 0.6x the true spread at h = 5, 0.2x at h = 20), so the SE is
    at least the classic one times sqrt(h), the long-run spread of a mean of h-day overlapping sums."""
    lagged = newey_west_se(daily, nw_lag(horizon))
    if horizon == 1 or not np.isfinite(lagged):
        return lagged
    return max(lagged, newey_west_se(daily, 0) * float(np.sqrt(horizon)))


def decay_verdict(
    performance: pd.DataFrame,
    model_version: str,
    val_rank_ic: float,
    val_se: float,
    rule: DecayRule = DecayRule(),
) -> DecayVerdict:
    """Is the champion `model_version` still working? `performance`: the `prediction_performance` rows."""
    own = performance[performance["model_version"].astype(str) == str(model_version)].sort_values("date")
    daily = own["rank_ic"].dropna().tail(rule.window)
    n, need = len(daily), rule.min_dates or rule.window
    realised = float(daily.mean()) if n else float("nan")
    window_se = window_mean_se(daily.to_numpy(), rule.horizon)
    floor, which = decay_floor(val_rank_ic, val_se, rule.floor, window_se)
    if n < need:
        passed = True
        reason = f"v{model_version} has {n} realised date(s) with a RankIC; {need} are needed to judge it"
    else:
        passed = realised >= floor
        reason = (
            f"v{model_version}: realised RankIC {realised:.4f} over its last {n} dates "
            f"{'>=' if passed else '<'} floor {floor:.4f} ({which})"
        )
    return DecayVerdict(
        str(model_version), passed, n, realised, floor, which, float(val_rank_ic), float(val_se), reason,
        window_se,
    )  # fmt: skip


# --- the plot --------------------------------------------------------------------------------------------
def realised_rank_ic_png(table: pd.DataFrame, path: str | Path) -> Path:
    """Daily realised RankIC (points), its 20-date rolling mean (line) and a dashed line where the
    serving model version changed (a new champion)."""
    from modeling.report_plots import _figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = _figure((9, 3.5))
    ax = fig.add_subplot(1, 1, 1)
    data = table.sort_values("date")
    if len(data):
        ax.scatter(data["date"], data["rank_ic"], s=10, alpha=0.6, label="daily realised RankIC")
        ax.plot(data["date"], data["rank_ic_mean_20"], color="C1", label="20-date mean")
        changes = data[data["model_version"] != data["model_version"].shift()]
        for _, row in changes.iterrows():
            ax.axvline(row["date"], color="grey", ls="--", lw=0.8)
            ax.annotate(
                f"v{row['model_version']}",
                (row["date"], 1.0),
                xycoords=("data", "axes fraction"),
                fontsize=7,
                va="top",
            )
    ax.axhline(0.0, color="black", lw=0.6)
    ax.set_ylabel("RankIC")
    ax.set_title("Realised RankIC of the served forecasts (dashed: champion changes)")
    if len(data):
        ax.legend(loc="lower left", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return path
