"""Walk-forward backtest: the window plan, signal analysis and portfolio analysis (Qlib's conventions).

Windows. The period (the test split by default) is cut into consecutive windows of `step` dates. A
window's models train on the labelled dates before it, purged by the horizon exactly as the splits are
(`modeling.data.training_set`): with h the label horizon,

    train ... | h purged | val_dates (early stopping) | h purged | the window's dates (out of sample)

so no training or validation label window (d, d+h] reaches a predicted date. `expanding` trains on every
labelled date from the start; `sliding` on the last `train_dates` dates before the first purge.

Portfolios, per model, from the forecasts of date t and the next-day return r(t) = close(t+1)/close(t) - 1
(the forecast of t is known at t's close and traded then; with h > 1 the model still ranks names daily):

- **TopkDropout** (Qlib `TopkDropoutStrategy`, `method_sell="bottom"`, `method_buy="top"`): hold `topk`
  names at equal weight. On the first date buy the `topk` best-ranked names. On each later date take the
  held names and the best-ranked `n_drop + topk - held` names not held, rank them together by today's
  forecast, sell the held names among the `n_drop` worst of that combined list, and buy as many of the
  candidates, best first, as keeps `topk` held. A held name without a forecast today ranks worst.
- **Decile long-short**: long the top decile, short the bottom decile of the forecast (the ceil(n/10)
  best- and worst-ranked names: a decile of 500 names, one name of 6), equal weight, rebalanced daily.

Costs: a name entering a book pays `open_cost` on its weight, a name leaving pays `close_cost` (Qlib's
defaults 5 and 15 bp). The book is taken as re-weighted to equal weight every day at no cost (the drift
trades are second order). Turnover is the one-way share of the book replaced on a date: (weight bought +
weight sold) / 2; the first date's purchase counts as turnover 1/2 (bought, nothing sold).

Excess return: the portfolio's daily return minus the benchmark's, the equal-weighted return of every
name with a forecast and a next-day return that date (the universe). The long-short book is already net
of the market; its "excess" is its own return. A held name earns its next-day return whether or not it
has a forecast that day (it may have left the universe); one with no next-day return at all (a gap or
a delisting) earns 0 that day and is counted in `missing_returns`. Known limitation: a name's last h
trading days before it leaves the data have no label, so no row in the corpus and no forecast; the book
sells it from the first of them on (a held name without a forecast ranks worst, so it goes first), up
to h - 1 days before a live book could know it leaves. At h = 1 that costs nothing (its last return
is unknown either way); at h > 1 it skips up to h - 1 days of its returns.

Risk figures follow Qlib's `risk_analysis` (mode "sum", N = 252): mean and std (ddof=1) of the daily
series, annualized_return = mean * 252, information_ratio = mean / std * sqrt(252), max_drawdown = the
lowest value of cumsum - running max of cumsum.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from modeling.metrics import DailyMean, information_ratio, paired_difference, per_date_correlation

TRADING_DAYS = 252
WINDOW_MODES = ("expanding", "sliding")


# --- the window plan ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WindowSpec:
    step: int = 40
    """Dates predicted per window (each window's models are trained once, before its first date)."""
    mode: str = "expanding"
    """expanding: train on every labelled date from the start; sliding: the last `train_dates` dates."""
    train_dates: int | None = None
    """Sliding window's train length in dates (required for `sliding`)."""
    val_dates: int = 20
    """Dates just before the (purged) window used for early stopping."""

    def __post_init__(self) -> None:
        if self.step < 1 or self.val_dates < 2:
            raise ValueError(f"step must be >= 1 and val_dates >= 2, got {self.step}, {self.val_dates}")
        if self.mode not in WINDOW_MODES:
            raise ValueError(f"mode must be one of {WINDOW_MODES}, got {self.mode!r}")
        if self.mode == "sliding" and (self.train_dates is None or self.train_dates < 2):
            raise ValueError("a sliding window needs train_dates >= 2")


@dataclass(frozen=True)
class Window:
    index: int
    train: tuple[pd.Timestamp, pd.Timestamp]
    validation: tuple[pd.Timestamp, pd.Timestamp]
    predict: tuple[pd.Timestamp, pd.Timestamp]
    n_predict_dates: int

    def to_dict(self) -> dict:
        def fmt(seg: tuple[pd.Timestamp, pd.Timestamp]) -> list[str]:
            return [str(seg[0].date()), str(seg[1].date())]

        return {
            "window": self.index,
            "train": fmt(self.train),
            "validation": fmt(self.validation),
            "predict": fmt(self.predict),
            "n_predict_dates": self.n_predict_dates,
        }


def plan_windows(
    calendar: pd.DatetimeIndex, period: pd.DatetimeIndex, horizon: int, spec: WindowSpec = WindowSpec()
) -> list[Window]:
    """Windows over `period` (dates of `calendar`, the sorted trading dates with features). Training and
    validation dates are taken from `calendar` before each window, purged by `horizon` (see the module
    docstring). Raises when the first window has too little history."""
    dates = pd.DatetimeIndex(sorted(set(calendar)))
    period = pd.DatetimeIndex(sorted(set(period)))
    if period.empty:
        raise ValueError("the backtest period holds no dates")
    if not period.isin(dates).all():
        raise ValueError("every backtest date must be a date of the calendar")
    position = {d: i for i, d in enumerate(dates)}
    windows = []
    for k, lo in enumerate(range(0, len(period), spec.step)):
        chunk = period[lo : lo + spec.step]
        start = position[chunk[0]]
        val_hi = start - horizon - 1  # h dates purged before the window
        val_lo = val_hi - spec.val_dates + 1
        train_hi = val_lo - horizon - 1  # and h more before validation
        train_lo = 0 if spec.mode == "expanding" else max(0, train_hi - int(spec.train_dates) + 1)
        if val_lo < 0 or train_hi - train_lo + 1 < 2:
            raise ValueError(
                f"window {k} (from {chunk[0].date()}) has too little history: it needs {spec.val_dates} "
                f"validation dates and 2+ train dates before them, each purged by h={horizon}"
            )
        windows.append(
            Window(
                index=k,
                train=(dates[train_lo], dates[train_hi]),
                validation=(dates[val_lo], dates[val_hi]),
                predict=(chunk[0], chunk[-1]),
                n_predict_dates=len(chunk),
            )
        )
    return windows


def window_rows(frame: pd.DataFrame, window: Window, part: str) -> pd.DataFrame:
    """The rows of `frame` (with `date`) in a window's `train`, `validation` or `predict` segment."""
    lo, hi = getattr(window, part)
    return frame[(frame["date"] >= lo) & (frame["date"] <= hi)]


def window_corpus(corpus: pd.DataFrame, training_set: pd.DataFrame, window: Window) -> pd.DataFrame:
    """The prompt corpus rows of one window, their `split` relabelled: `train` and `validation` for the
    window's fitting segments, `test` for its dates to forecast; every other row (purged, later, live) is
    dropped.

    Rows that were not train rows in the training set carry weight 1 there; inside a window's train or
    validation segment they get their bucket's train weight (the training set's bucket model, fit on its
    train split only, which precedes every window), so a window weighs its rows as the regressor does."""
    by_bucket = (
        training_set[training_set["split"] == "train"].groupby("bucket", observed=True)["weight"].mean()
    )
    bucket = training_set.drop_duplicates(["date", "symbol"]).set_index(["date", "symbol"])["bucket"]
    out = corpus[corpus["label"].notna()].copy()
    segment = pd.Series(pd.NA, index=out.index, dtype="string")
    for part, split in (("train", "train"), ("validation", "validation"), ("predict", "test")):
        lo, hi = getattr(window, part)
        segment[(out["date"] >= lo) & (out["date"] <= hi)] = split
    reweigh = out["split"] != "train"
    keys = pd.MultiIndex.from_frame(out.loc[reweigh, ["date", "symbol"]])
    out.loc[reweigh, "weight"] = bucket.reindex(keys).map(by_bucket).fillna(1.0).to_numpy(float)
    out["split"] = segment
    return out[out["split"].notna()].astype({"split": str}).reset_index(drop=True)


# --- signal analysis ------------------------------------------------------------------------------------
def signal_summary(
    frame: pd.DataFrame, models: list[str], ret: str = "label", horizon: int = 1
) -> pd.DataFrame:
    """Per model (a column of `frame` with its forecasts): IC, ICIR, RankIC with its standard error
    (Newey-West, lag h - 1), RankICIR and the number of dates, on (date, `ret`)."""
    rows = []
    for model in models:
        ic = per_date_correlation(frame, model, ret, "pearson")
        ric = per_date_correlation(frame, model, ret, "spearman")
        rows.append(
            {
                "model": model,
                "IC": float(ic.mean()),
                "ICIR": information_ratio(ic),
                "RankIC": float(ric.mean()),
                "RankIC_se": DailyMean.of(ric, horizon - 1).se,
                "RankICIR": information_ratio(ric),
                "n_dates": len(ric),
            }
        )
    return pd.DataFrame(rows).set_index("model")


def paired_rank_ic(
    frame: pd.DataFrame, model: str, baseline: str, ret: str = "label", horizon: int = 1
) -> dict:
    """Mean daily RankIC of `model` minus `baseline` on the same rows: delta, se (Newey-West, lag h-1), t,
    n_dates (rows where either forecast is missing, e.g. a model absent from a window, count for neither)."""
    return paired_difference(frame, model, baseline, ret, horizon).to_dict()


def monthly_rank_ic(
    frame: pd.DataFrame, models: list[str], ret: str = "label", horizon: int = 1
) -> pd.DataFrame:
    """Per calendar month (rows, "YYYY-MM") and model (columns): the daily RankIC's `DailyMean` (mean, SE
    with Newey-West lag h - 1, number of dates), from one pass over the rows."""
    out = {}
    for model in models:
        ric = per_date_correlation(frame, model, ret, "spearman")
        out[model] = ric.groupby(ric.index.to_period("M")).agg(lambda x: DailyMean.of(x, horizon - 1))
    table = pd.DataFrame(out)
    table.index = table.index.astype(str)
    return table


def rank_ic_by_month(
    frame: pd.DataFrame, models: list[str], ret: str = "label", horizon: int = 1, cells: bool = False
) -> pd.DataFrame:
    """Mean daily RankIC per calendar month (rows) and model (columns); `cells`: each as its mean ± SE
    (Newey-West, lag h - 1) and number of dates, the table a reader gets (the plot takes the means)."""
    return _month_table(monthly_rank_ic(frame, models, ret, horizon), cells)


def _month_table(monthly: pd.DataFrame, cells: bool) -> pd.DataFrame:
    """`monthly_rank_ic`'s table as means (floats) or as "mean ± SE (n dates)" cells."""
    return monthly.map(lambda m: str(m) if cells else (m.mean if isinstance(m, DailyMean) else np.nan))


# --- portfolios -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PortfolioSpec:
    topk: int = 50
    """Names held by TopkDropout."""
    n_drop: int = 5
    """Names TopkDropout may replace per date."""
    open_cost: float = 0.0005
    """Cost of buying (entering a book), as a share of the traded weight (5 bp)."""
    close_cost: float = 0.0015
    """Cost of selling (leaving a book), as a share of the traded weight (15 bp)."""

    def __post_init__(self) -> None:
        if self.topk < 1 or not 0 <= self.n_drop <= self.topk:
            raise ValueError(f"need topk >= 1 and 0 <= n_drop <= topk, got {self.topk}, {self.n_drop}")
        if self.open_cost < 0 or self.close_cost < 0:
            raise ValueError("costs must be >= 0")


def _daily_panel(scores: pd.DataFrame, returns: pd.DataFrame, model: str) -> dict[pd.Timestamp, pd.DataFrame]:
    """Per date: the names with a forecast of `model`, and their next-day return (NaN if unknown)."""
    merged = scores[["date", "symbol", model]].dropna().merge(returns[["date", "symbol", "ret"]], how="left")
    return {d: g.set_index("symbol") for d, g in merged.groupby("date", sort=True)}


def topk_dropout_holdings(ranked: list[pd.Series], spec: PortfolioSpec) -> list[list[str]]:
    """The names held after each date's trades; `ranked[i]`: date i's forecasts by symbol."""
    held: list[str] = []
    out = []
    for score in ranked:
        order = score.sort_values(ascending=False, kind="mergesort")
        if not held:
            held = list(order.index[: spec.topk])
            out.append(held)
            continue
        held_scores = score.reindex(held).fillna(-np.inf)  # a name without a forecast ranks worst
        last = held_scores.sort_values(ascending=False, kind="mergesort")
        candidates = [s for s in order.index if s not in set(held)][: spec.n_drop + spec.topk - len(held)]
        combined = pd.concat([last, order.reindex(candidates)]).sort_values(ascending=False, kind="mergesort")
        worst = set(combined.index[-spec.n_drop :]) if spec.n_drop else set()
        sell = [s for s in last.index if s in worst]
        n_buy = len(sell) + spec.topk - len(held)
        buy = candidates[: max(n_buy, 0)]
        held = [s for s in last.index if s not in set(sell)] + buy
        out.append(held)
    return out


def _book_costs(previous: set[str], current: set[str], spec: PortfolioSpec) -> tuple[float, float]:
    """(cost, turnover) of moving an equal-weight book from `previous` to `current` names."""
    bought = len(current - previous) / len(current) if current else 0.0
    sold = len(previous - current) / len(previous) if previous else 0.0
    return spec.open_cost * bought + spec.close_cost * sold, (bought + sold) / 2


def portfolio_returns(
    scores: pd.DataFrame, returns: pd.DataFrame, model: str, spec: PortfolioSpec
) -> pd.DataFrame:
    """Per date: TopkDropout and decile long-short returns with and without cost, the benchmark, the
    turnover of each book and the held names without a return (see the module docstring)."""
    panel = _daily_panel(scores, returns, model)
    # every name's return, with or without a forecast that day: a held name that left the forecasts
    # (the universe) still earns its return until it is sold
    market = {d: g.set_index("symbol")["ret"] for d, g in returns.groupby("date", sort=False)}
    dates = list(panel)
    holdings = topk_dropout_holdings([panel[d][model] for d in dates], spec)
    rows, previous, prev_long, prev_short = [], set(), set(), set()
    for date, held in zip(dates, holdings, strict=True):
        day = panel[date]
        ret = day["ret"]
        bench = float(ret.dropna().mean()) if ret.notna().any() else float("nan")
        held_ret = market.get(date, ret).reindex(held)
        cost, turnover = _book_costs(previous, set(held), spec)
        top_ret = float(held_ret.fillna(0.0).mean())
        order = day[model].sort_values(ascending=False, kind="mergesort").index
        tail = int(np.ceil(len(order) / 10))  # a decile, and at least one name with fewer than 10
        long, short = set(order[:tail]), set(order[-tail:])
        long_cost, long_turn = _book_costs(prev_long, long, spec)
        short_cost, short_turn = _book_costs(prev_short, short, spec)
        ls = float(ret.reindex(list(long)).fillna(0.0).mean() - ret.reindex(list(short)).fillna(0.0).mean())
        rows.append(
            {
                "date": date,
                "benchmark": bench,
                "topk_return": top_ret,
                "excess_return_without_cost": top_ret - bench,
                "excess_return_with_cost": top_ret - bench - cost,
                "topk_turnover": turnover,
                "long_short_without_cost": ls,
                "long_short_with_cost": ls - long_cost - short_cost,
                "long_short_turnover": (long_turn + short_turn) / 2,
                "missing_returns": int(held_ret.isna().sum()),
            }
        )
        previous, prev_long, prev_short = set(held), long, short
    return pd.DataFrame(rows)


def risk_analysis(series: pd.Series) -> dict[str, float]:
    """Qlib's risk figures of a daily return series (mode "sum", N = 252)."""
    r = pd.Series(series, dtype=float).dropna()
    mean = float(r.mean()) if len(r) else float("nan")
    std = float(r.std(ddof=1)) if len(r) > 1 else float("nan")
    cumulative = r.cumsum()
    return {
        "mean": mean,
        "std": std,
        "annualized_return": mean * TRADING_DAYS,
        "information_ratio": mean / std * np.sqrt(TRADING_DAYS) if std and np.isfinite(std) else float("nan"),
        "max_drawdown": float((cumulative - cumulative.cummax()).min()) if len(r) else float("nan"),
    }


def portfolio_metrics(daily: pd.DataFrame) -> dict[str, float]:
    """Every figure of one model's `portfolio_returns`, under Qlib's names (plus the long-short book's)."""
    out: dict[str, float] = {}
    for series in (
        "excess_return_without_cost",
        "excess_return_with_cost",
        "long_short_without_cost",
        "long_short_with_cost",
    ):
        for name, value in risk_analysis(daily[series]).items():
            out[f"{series}.{name}"] = value
    out["topk_turnover.mean"] = float(daily["topk_turnover"].mean())
    out["long_short_turnover.mean"] = float(daily["long_short_turnover"].mean())
    out["missing_returns"] = int(daily["missing_returns"].sum())
    return out


# --- the whole analysis ---------------------------------------------------------------------------------
@dataclass
class BacktestAnalysis:
    signal: pd.DataFrame
    """Per model: IC, ICIR, RankIC, RankICIR, n_dates."""
    paired: dict[str, dict[str, dict[str, float]]]
    """paired[model][baseline]: the daily RankIC difference model - baseline (delta, se, t, n_dates)."""
    by_month: pd.DataFrame
    """Per calendar month (rows) and model (columns): the mean daily RankIC (the plot's)."""
    by_month_cells: pd.DataFrame
    """The same months as "mean ± SE (n dates)" (the metadata's)."""
    daily: dict[str, pd.DataFrame]
    """Per model: `portfolio_returns`."""
    portfolio: dict[str, dict[str, float]]
    """Per model: `portfolio_metrics` (Qlib's names)."""

    def table(self, reference: str = "ridge") -> pd.DataFrame:
        """The comparison a quant reads first: one row per model."""
        rows = []
        for model in self.signal.index:
            d = self.paired.get(model, {}).get(reference)
            p = self.portfolio[model]
            rows.append(
                {
                    "model": model,
                    "RankIC": self.signal.loc[model, "RankIC"],
                    "RankIC SE": self.signal.loc[model, "RankIC_se"],
                    "RankICIR": self.signal.loc[model, "RankICIR"],
                    f"Δ RankIC vs {reference}": "—" if d is None else f"{d['delta']:+.4f} ± {d['se']:.4f}",
                    "t": float("nan") if d is None else d["t"],
                    "ann. excess (cost)": p["excess_return_with_cost.annualized_return"],
                    "IR (cost)": p["excess_return_with_cost.information_ratio"],
                    "max DD (cost)": p["excess_return_with_cost.max_drawdown"],
                    "ann. excess (no cost)": p["excess_return_without_cost.annualized_return"],
                    "turnover": p["topk_turnover.mean"],
                    "L/S ann. (cost)": p["long_short_with_cost.annualized_return"],
                    "n_dates": int(self.signal.loc[model, "n_dates"]),
                }
            )
        return pd.DataFrame(rows)

    def metrics(self) -> dict[str, float]:
        """Every number, flat, for MLflow: `<model>/<name>`."""
        out: dict[str, float] = {}
        for model in self.signal.index:
            for name, value in self.signal.loc[model].items():
                out[f"{model}/{name}"] = float(value)
            for name, value in self.portfolio[model].items():
                out[f"{model}/{name}"] = float(value)
            for baseline, d in self.paired.get(model, {}).items():
                for name, value in d.items():
                    out[f"{model}/vs_{baseline}/rank_ic_{name}"] = float(value)
        return out


def analyse(
    forecasts: pd.DataFrame,
    labels: pd.DataFrame,
    returns: pd.DataFrame,
    models: list[str],
    baselines: list[str],
    spec: PortfolioSpec = PortfolioSpec(),
    horizon: int = 1,
) -> BacktestAnalysis:
    """Signal and portfolio analysis of the out-of-sample `forecasts` (date, symbol, one column per model)
    against `labels` (date, symbol, label) and next-day `returns` (date, symbol, ret)."""
    frame = forecasts.merge(labels[["date", "symbol", "label"]], on=["date", "symbol"], how="left")
    paired = {
        model: {b: paired_rank_ic(frame, model, b, horizon=horizon) for b in baselines if b != model}
        for model in models
    }
    daily = {model: portfolio_returns(forecasts, returns, model, spec) for model in models}
    monthly = monthly_rank_ic(frame, models, horizon=horizon)  # once, for the plot and the table
    return BacktestAnalysis(
        signal=signal_summary(frame, models, horizon=horizon),
        paired=paired,
        by_month=_month_table(monthly, cells=False),
        by_month_cells=_month_table(monthly, cells=True),
        daily=daily,
        portfolio={model: portfolio_metrics(d) for model, d in daily.items()},
    )
