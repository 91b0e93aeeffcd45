"""An independent plain-pandas reference for the universe and the 16 features (and the labels).

Written from the definitions (the registry's `formula`/`meaning` text and the module docstrings of
`modeling.data.universe` and `modeling.data.features`), not from their SQL, so that the tests compare
two implementations of one specification. Conventions (from the registry's module docstring):

- `r_t = close_t / close_{t-1} - 1`, over the symbol's own previous row (NaN on its first row);
- a window of N rows ends at and includes row t and covers the symbol's rows t-N+1..t; aggregates
  skip missing values (pandas `rolling(N, min_periods=1)`); only rows with more than `WARMUP_ROWS`
  rows of history are kept, where every window is full;
- `dv_t = close_t * volume_t`; standard deviations are sample ones (ddof=1).

Everything is vectorised (groupby + shift + rolling); no Python loop over symbols. The benchmark also
uses this module on millions of rows as the slow baseline, so the frames are kept lean: the features
are computed only for symbols that ever enter the universe (a symbol's features depend only on its own
rows; the trading calendar still comes from all rows).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from modeling.feature_registry import FEATURE_NAMES, WARMUP_ROWS

UNIVERSE_COLUMNS = ["date", "symbol", "rank", "avg_dollar_volume"]
FEATURE_COLUMNS = ["date", "symbol", "sector", *FEATURE_NAMES, "fwd_ret", "fwd_ret_excess", "fwd_horizon"]


def _sorted_raw(raw: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """The needed columns, sorted by (symbol, date), with a fresh RangeIndex and float prices/volume."""
    out = raw[columns].sort_values(["symbol", "date"], kind="stable").reset_index(drop=True)
    for c in columns:
        if c in ("open", "high", "low", "close", "volume"):
            out[c] = out[c].astype("float64")
    if out.duplicated(["symbol", "date"]).any():
        raise ValueError("raw data has duplicate (symbol, date) rows")
    return out


def _group_keys(df: pd.DataFrame) -> pd.Series:
    """Integer symbol codes (cheaper to group on repeatedly than strings)."""
    return pd.Series(pd.factorize(df["symbol"])[0], index=df.index, name="_g")


def _rolling(df: pd.DataFrame, keys: pd.Series, columns: list[str], window: int, how: str) -> dict:
    """Per-symbol trailing `window`-row aggregate of `columns` as arrays aligned with `df`'s rows."""
    roll = df[columns].groupby(keys, sort=False).rolling(window, min_periods=1)
    out = roll.std(ddof=1) if how == "std" else getattr(roll, how)()
    out = out.droplevel(0).reindex(df.index)
    return {c: out[c].to_numpy() for c in columns}


def reference_universe(raw: pd.DataFrame, top_n: int = 500, window: int = 20) -> pd.DataFrame:
    """Per date, the `top_n` symbols by the mean dollar volume of the symbol's last `window` rows.

    Eligible on t: the symbol traded on t (volume > 0), has `window` rows up to and including t, and
    the mean is positive. Ties break by symbol ascending; ranks start at 1.
    """
    df = _sorted_raw(raw, ["date", "symbol", "close", "volume"])
    keys = _group_keys(df)
    df["dv"] = df["close"] * df["volume"]
    adv = df["dv"].groupby(keys, sort=False).rolling(window, min_periods=window).mean()
    df["avg_dollar_volume"] = adv.droplevel(0).reindex(df.index)
    df = df.loc[df["avg_dollar_volume"].notna() & (df["avg_dollar_volume"] > 0) & (df["volume"] > 0)]
    df = df.sort_values(["date", "avg_dollar_volume", "symbol"], ascending=[True, False, True], kind="stable")
    df["rank"] = df.groupby("date", sort=False).cumcount() + 1
    out = df.loc[df["rank"] <= top_n, UNIVERSE_COLUMNS]
    return out.astype({"rank": "int64"}).reset_index(drop=True)


def reference_features(raw: pd.DataFrame, universe: pd.DataFrame, horizon: int = 1) -> pd.DataFrame:
    """The features table: the 16 features and the labels on the universe rows past the warm-up."""
    if not 1 <= horizon <= 60:
        raise ValueError(f"horizon must be in [1, 60], got {horizon}")
    # The global trading calendar: every distinct date of the raw data, numbered.
    calendar = np.sort(pd.unique(raw["date"]))
    members = pd.unique(universe["symbol"])
    df = _sorted_raw(
        raw.loc[raw["symbol"].isin(members)],
        ["date", "symbol", "sector", "open", "high", "low", "close", "volume"],
    )
    keys = _group_keys(df)
    by_sym = df.groupby(keys, sort=False)
    day_idx = np.searchsorted(calendar, df["date"].to_numpy())

    # The rows to keep: in the universe and more than WARMUP_ROWS rows of the symbol's history.
    # Membership goes through one integer key per (date, symbol) (cheaper than a merge on strings).
    codes = pd.Index(pd.unique(df["symbol"]))
    n_sym = len(codes)
    row_key = day_idx.astype(np.int64) * n_sym + codes.get_indexer(df["symbol"])
    u_day = np.searchsorted(calendar, universe["date"].to_numpy().astype(calendar.dtype))
    u_code = codes.get_indexer(universe["symbol"])
    u_key = (u_day.astype(np.int64) * n_sym + u_code)[u_code >= 0]
    obs_no = by_sym.cumcount().to_numpy() + 1
    keep = (obs_no > WARMUP_ROWS) & np.isin(row_key, u_key)

    # Per-row basics over the symbol's own rows.
    close = df["close"]
    prev_close = by_sym["close"].shift(1)
    basics = pd.DataFrame(index=df.index)
    basics["r"] = close / prev_close - 1.0
    basics["dv"] = close * df["volume"]
    basics["hl"] = (df["high"] - df["low"]) / close
    basics["gain"] = basics["r"].clip(lower=0.0)  # NaN stays NaN (first row)
    basics["loss"] = (-basics["r"]).clip(lower=0.0)
    basics["amihud_day"] = (basics["r"].abs() / (basics["dv"] / 1e9)).where(basics["dv"] > 0)
    basics["close"] = close
    basics["high"] = df["high"]
    basics["volume"] = df["volume"]

    out = df.loc[keep, ["date", "symbol", "sector"]].reset_index(drop=True)
    c = close.to_numpy()[keep]

    def put(name: str, values: np.ndarray) -> None:  # a full-length array, restricted to the kept rows
        out[name] = values[keep]

    put("ret_1d", basics["r"].to_numpy())
    for k in (5, 20, 60):
        out[f"ret_{k}d"] = c / by_sym["close"].shift(k).to_numpy()[keep] - 1.0
    put("vol_20d", _rolling(basics, keys, ["r"], 20, "std")["r"])
    put("vol_60d", _rolling(basics, keys, ["r"], 60, "std")["r"])
    mean20 = {
        k: v[keep]
        for k, v in _rolling(basics, keys, ["hl", "close", "volume", "dv", "amihud_day"], 20, "mean").items()
    }
    out["hl_range_20d"] = mean20["hl"]
    out["ma_gap_20d"] = c / mean20["close"] - 1.0
    out["ma_gap_60d"] = c / _rolling(basics, keys, ["close"], 60, "mean")["close"][keep] - 1.0
    mean14 = _rolling(basics, keys, ["gain", "loss"], 14, "mean")
    up, down = mean14["gain"][keep], mean14["loss"][keep]
    with np.errstate(divide="ignore", invalid="ignore"):
        out["rsi_14d"] = np.where(up + down > 0, 100.0 * up / (up + down), 50.0)
        out["dist_high_60d"] = c / _rolling(basics, keys, ["high"], 60, "max")["high"][keep] - 1.0
        mean5 = _rolling(basics, keys, ["volume"], 5, "mean")["volume"][keep]
        out["volume_ratio_5_20d"] = np.where(mean20["volume"] > 0, mean5 / mean20["volume"], np.nan)
        out["log_dollar_volume_20d"] = np.log(np.where(mean20["dv"] > 0, mean20["dv"], np.nan))
    out["amihud_20d"] = mean20["amihud_day"]
    put("max_ret_20d", _rolling(basics, keys, ["r"], 20, "max")["r"])
    out["overnight_gap"] = df["open"].to_numpy()[keep] / prev_close.to_numpy()[keep] - 1.0

    # Label: the close of the symbol's row dated exactly h trading days later on the calendar, looked up
    # by (calendar position, symbol); NaN when there is no such row (past the last date, or delisted or
    # halted on that day). Rows missing strictly between t and t+h do not matter.
    target_key = (day_idx[keep].astype(np.int64) + horizon) * n_sym + codes.get_indexer(out["symbol"])
    target_row = pd.Index(row_key).get_indexer(target_key)
    lead_close = np.where(target_row >= 0, close.to_numpy()[target_row], np.nan)
    out["fwd_ret"] = lead_close / c - 1.0
    out["fwd_ret_excess"] = out["fwd_ret"] - out.groupby("date")["fwd_ret"].transform("mean")
    out["fwd_horizon"] = np.int32(horizon)
    out = out.sort_values(["date", "symbol"], kind="stable").reset_index(drop=True)
    return out[FEATURE_COLUMNS]
