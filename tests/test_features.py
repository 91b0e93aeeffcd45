"""Tests of the point-in-time universe (`modeling.data.universe`) and of the features and labels
(`modeling.data.features`): agreement with an independent pandas implementation
(`tests.pandas_reference`), point-in-time behaviour, survivorship, leakage, labels and the warm-up.

Small seeded synthetic markets (120 symbols x 1.5 years, top 50) in in-memory DuckDB.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import duckdb
import numpy as np
import pandas as pd
import pytest

from modeling.data.features import LabelSpec, build_features, count_non_finite
from modeling.data.ingest import ingest_market_data
from modeling.data.synthetic import SyntheticMarketConfig, generate_synthetic_market
from modeling.data.universe import UniverseSpec, build_universe, universe_count_mismatches
from modeling.feature_registry import FEATURE_NAMES, MODEL_INPUT_COLUMNS, WARMUP_ROWS
from tests.pandas_reference import FEATURE_COLUMNS, reference_features, reference_universe

MARKET = SyntheticMarketConfig(n_symbols=120, n_years=1.5, seed=11)
TOP_N, WINDOW = 50, 20
RTOL, ATOL = 1e-9, 1e-12
LABELS = ["fwd_ret", "fwd_ret_excess"]
NUMERIC = [*FEATURE_NAMES, *LABELS]
KEYS = ["date", "symbol"]


class Tables(NamedTuple):
    raw: pd.DataFrame
    universe: pd.DataFrame
    features: pd.DataFrame
    non_finite: dict[str, int]
    count_mismatches: list[tuple]


def build_tables(frame: pd.DataFrame, horizon: int = 1, top_n: int = TOP_N) -> Tables:
    """Run ingest -> universe -> features in a fresh in-memory DuckDB and read the tables back."""
    con = duckdb.connect()
    try:
        report = ingest_market_data(con, frame=frame)
        assert report.n_rejected == 0
        spec = UniverseSpec(top_n=top_n, window=WINDOW)
        build_universe(con, spec)
        build_features(con, LabelSpec(horizon=horizon))
        raw = con.execute("SELECT * FROM raw_market_data ORDER BY symbol, date").df()
        universe = con.execute("SELECT * FROM universe ORDER BY date, rank").df()
        features = con.execute("SELECT * FROM features ORDER BY date, symbol").df()
        return Tables(raw, universe, features, count_non_finite(con), universe_count_mismatches(con, spec))
    finally:
        con.close()


@functools.cache
def market_frame() -> pd.DataFrame:
    return generate_synthetic_market(MARKET).frame


@functools.cache
def calendar() -> np.ndarray:
    return np.sort(market_frame()["date"].unique())


@functools.cache
def survivor() -> str:
    """A liquid symbol that trades on every date (listed on day 1, never delists)."""
    frame = market_frame()
    counts = frame.groupby("symbol")["date"].count()
    full = counts[counts == len(calendar())].index
    dv = (frame["close"] * frame["volume"]).groupby(frame["symbol"]).mean()
    return str(dv[full].sort_values(ascending=False).index[3])


GAP_DAYS = (150, 200, 201)
"""Calendar positions where the survivor has no row in the gapped market (a trading halt)."""


@functools.cache
def gapped_frame() -> pd.DataFrame:
    frame = market_frame()
    halted = (frame["symbol"] == survivor()) & frame["date"].isin(calendar()[list(GAP_DAYS)])
    assert halted.sum() == len(GAP_DAYS)
    return frame.loc[~halted].reset_index(drop=True)


@functools.cache
def tables(scenario: str = "base", horizon: int = 1) -> Tables:
    frame = {"base": market_frame, "gapped": gapped_frame}[scenario]()
    return build_tables(frame, horizon=horizon)


def _sorted(df: pd.DataFrame, by: list[str] = KEYS) -> pd.DataFrame:
    return df.sort_values(by).reset_index(drop=True)


def _obs_no(raw: pd.DataFrame) -> pd.DataFrame:
    """date, symbol, obs_no: the row number of each raw row in its symbol's history (1-based)."""
    out = raw[KEYS].sort_values(["symbol", "date"]).reset_index(drop=True)
    out["obs_no"] = out.groupby("symbol").cumcount() + 1
    return out


def assert_features_close(actual: pd.DataFrame, expected: pd.DataFrame) -> None:
    assert list(actual.columns) == FEATURE_COLUMNS
    assert list(expected.columns) == FEATURE_COLUMNS
    a, e = _sorted(actual), _sorted(expected)
    # Identical row sets (and sectors, horizon).
    pd.testing.assert_frame_equal(
        a[["date", "symbol", "sector"]], e[["date", "symbol", "sector"]], check_dtype=False
    )
    assert (a["fwd_horizon"] == e["fwd_horizon"]).all()
    for col in NUMERIC:
        np.testing.assert_allclose(
            a[col].to_numpy(float), e[col].to_numpy(float), rtol=RTOL, atol=ATOL, equal_nan=True, err_msg=col
        )


# --- agreement with the independent pandas reference ---------------------------------------------------


def test_universe_matches_reference():
    t = tables()
    expected = reference_universe(t.raw, top_n=TOP_N, window=WINDOW)
    actual = t.universe
    assert len(actual) > 0
    pd.testing.assert_frame_equal(
        _sorted(actual, ["date", "rank"])[["date", "symbol", "rank"]],
        _sorted(expected, ["date", "rank"])[["date", "symbol", "rank"]],
        check_dtype=False,
    )
    np.testing.assert_allclose(
        _sorted(actual, ["date", "rank"])["avg_dollar_volume"],
        _sorted(expected, ["date", "rank"])["avg_dollar_volume"],
        rtol=1e-12,
    )
    # Every date with at least TOP_N eligible symbols has exactly TOP_N members, ranks 1..TOP_N.
    assert t.count_mismatches == []
    per_date = actual.groupby("date")["rank"].agg(["min", "max", "count"])
    assert (per_date["min"] == 1).all()
    assert (per_date["max"] == per_date["count"]).all()
    assert (per_date["count"] <= TOP_N).all()
    assert (per_date["count"] == TOP_N).sum() > 0.8 * len(per_date)
    # Eligibility needs a full window: the first WINDOW - 1 dates have no universe at all.
    assert actual["date"].min() == calendar()[WINDOW - 1]


@pytest.mark.parametrize(
    ("scenario", "horizon"),
    [("base", 1), ("gapped", 1), ("base", 5), ("gapped", 5)],
)
def test_features_match_reference(scenario: str, horizon: int):
    t = tables(scenario, horizon)
    expected = reference_features(t.raw, t.universe, horizon=horizon)
    assert len(t.features) > 10_000
    assert_features_close(t.features, expected)
    assert (t.features["fwd_horizon"] == horizon).all()

    # The comparison covers the awkward symbols: late listers, delisters and the halted survivor.
    span = t.raw.groupby("symbol")["date"].agg(["min", "max"])
    in_features = set(t.features["symbol"])
    late = set(span.index[span["min"] > span["min"].min()])
    delisted = set(span.index[span["max"] < span["max"].max()])
    assert len(late & in_features) >= 3
    assert len(delisted & in_features) >= 3
    assert survivor() in in_features


def test_reference_features_of_late_lister_and_delister_by_symbol():
    """Per symbol (not just in bulk): a late lister's and a delister's whole feature history."""
    t = tables()
    expected = reference_features(t.raw, t.universe, horizon=1)
    span = t.raw.groupby("symbol")["date"].agg(["min", "max"])
    counts = t.features.groupby("symbol").size()
    late = span.index[span["min"] > span["min"].min()].intersection(counts.index)
    delisted = span.index[span["max"] < span["max"].max()].intersection(counts.index)
    for symbol in (counts[late].idxmax(), counts[delisted].idxmax()):
        assert_features_close(
            t.features[t.features["symbol"] == symbol], expected[expected["symbol"] == symbol]
        )


# --- universe: point in time, no survivorship ----------------------------------------------------------


def test_universe_is_point_in_time_under_future_volume_spike():
    base = tables().universe
    d = calendar()[200]
    on_d = base[base["date"] == d].set_index("symbol")["rank"]
    frame = market_frame()
    traded_through = frame.groupby("symbol")["date"].max() == calendar()[-1]
    # A symbol in the universe on d, ranked low enough that a spike must move it, that trades to the end.
    symbol = next(s for s in on_d.index[on_d > 10] if traded_through[s])
    spiked = frame.copy()
    spiked.loc[(spiked["symbol"] == symbol) & (spiked["date"] >= d), "volume"] *= 1000
    t = build_tables(spiked)
    before = t.universe["date"] < d
    pd.testing.assert_frame_equal(
        _sorted(t.universe[before], ["date", "rank"]), _sorted(base[base["date"] < d], ["date", "rank"])
    )
    # ... and the spike is visible from d on, so the test can fail.
    at_d = t.universe[t.universe["date"] == d].set_index("symbol")["rank"]
    assert at_d[symbol] == 1
    after = t.universe[~before]
    assert not _sorted(after, ["date", "rank"]).equals(_sorted(base[base["date"] >= d], ["date", "rank"]))


def test_delisted_symbol_is_in_universe_while_it_traded():
    t = tables()
    span = t.raw.groupby("symbol")["date"].agg(["min", "max"])
    market_last = span["max"].max()
    delisted = span.index[span["max"] < market_last]
    assert len(delisted) > 0
    # The reference universe (pandas) says which delisters are liquid enough to be members on their last
    # trading day; the DuckDB universe must have them there (a survivor universe would not).
    ref = reference_universe(t.raw, top_n=TOP_N, window=WINDOW)
    ref_last = ref.merge(span["max"].rename("date").reset_index(), on=KEYS)
    members_at_exit = sorted(set(ref_last["symbol"]))
    assert len(members_at_exit) >= 3
    for symbol in members_at_exit:
        last = span.loc[symbol, "max"]
        rows = t.universe[t.universe["symbol"] == symbol]
        assert last in set(rows["date"]), symbol
        assert rows["date"].max() == last
        assert len(rows) == (ref["symbol"] == symbol).sum()
        # Its feature rows run to its last day, which has no label (there is no next row).
        feats = t.features[t.features["symbol"] == symbol]
        assert feats["date"].max() == last
        assert pd.isna(feats.loc[feats["date"] == last, "fwd_ret"]).all()
        # After the exit the universe is refilled: still TOP_N members per date.
        after = t.universe[t.universe["date"] > last].groupby("date").size()
        assert (after == TOP_N).all()


# --- no look-ahead ------------------------------------------------------------------------------------


def perturb_after(frame: pd.DataFrame, d: np.datetime64, seed: int = 3) -> pd.DataFrame:
    """Every price and volume after d changed at random (rows stay valid OHLCV)."""
    rng = np.random.default_rng(seed)
    out = frame.copy()
    later = (out["date"] > d).to_numpy()
    n = int(later.sum())
    scale = rng.uniform(0.5, 2.0, n)
    o = out.loc[later, "open"].to_numpy() * scale * rng.uniform(0.9, 1.1, n)
    c = out.loc[later, "close"].to_numpy() * scale * rng.uniform(0.9, 1.1, n)
    h = np.maximum(out.loc[later, "high"].to_numpy() * scale, np.maximum(o, c))
    lo = np.minimum(out.loc[later, "low"].to_numpy() * scale, np.minimum(o, c))
    out.loc[later, "open"], out.loc[later, "close"] = o, c
    out.loc[later, "high"], out.loc[later, "low"] = h, lo
    vol = out.loc[later, "volume"].to_numpy() * rng.uniform(0.1, 10.0, n)
    out.loc[later, "volume"] = np.round(vol).astype(np.int64)
    return out


@pytest.mark.parametrize("horizon", [1, 5])
def test_no_leakage_from_future_prices_and_volumes(horizon: int):
    cal = calendar()
    d_pos = 250
    d = cal[d_pos]
    base = tables("base", horizon)
    t = build_tables(perturb_after(market_frame(), d), horizon=horizon)

    # Universe up to d: identical.
    up_to_d = t.universe["date"] <= d
    pd.testing.assert_frame_equal(
        _sorted(t.universe[up_to_d], ["date", "rank"]),
        _sorted(base.universe[base.universe["date"] <= d], ["date", "rank"]),
        check_exact=True,
    )
    # Features up to d: identical. Same rows and keys exactly; values to 1e-12 relative, because the
    # feature SQL skips symbols that never enter the universe, so a future change can change which
    # symbols DuckDB's window operator processes together, and with it the order in which its segment
    # trees add partial sums (floating-point noise around 1e-17; any look-ahead moves values by far more).
    cols = list(MODEL_INPUT_COLUMNS)
    new, old = _sorted(t.features), _sorted(base.features)
    new_d = new.loc[new["date"] <= d, cols].reset_index(drop=True)
    old_d = old.loc[old["date"] <= d, cols].reset_index(drop=True)
    pd.testing.assert_frame_equal(new_d[["date", "symbol", "sector"]], old_d[["date", "symbol", "sector"]])
    np.testing.assert_allclose(new_d[list(FEATURE_NAMES)], old_d[list(FEATURE_NAMES)], rtol=1e-12, atol=1e-14)
    # Labels at dates <= d - h read closes up to d only: identical too, bit for bit (the per-date mean
    # behind fwd_ret_excess is an ordered sum, so it does not depend on the thread schedule).
    label_cut = cal[d_pos - horizon]
    new_labels = new.loc[new["date"] <= label_cut, [*KEYS, *LABELS]].reset_index(drop=True)
    old_labels = old.loc[old["date"] <= label_cut, [*KEYS, *LABELS]].reset_index(drop=True)
    pd.testing.assert_frame_equal(new_labels, old_labels, check_exact=True)
    # The perturbation is real: features after d and the labels that look past d do change.
    both = new.merge(old, on=KEYS, suffixes=("_new", "_old"))
    after = both["date"] > d
    assert (both.loc[after, "ret_1d_new"] != both.loc[after, "ret_1d_old"]).mean() > 0.9
    looking_past = (both["date"] > label_cut) & (both["date"] <= d) & both["fwd_ret_old"].notna()
    assert looking_past.sum() > 0
    assert (both.loc[looking_past, "fwd_ret_new"] != both.loc[looking_past, "fwd_ret_old"]).all()


# --- labels ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scenario", "horizon"),
    [("base", 1), ("gapped", 1), ("base", 5), ("gapped", 5)],
)
def test_labels_are_forward_returns_on_the_trading_calendar(scenario: str, horizon: int):
    t = tables(scenario, horizon)
    cal = np.sort(t.raw["date"].unique())
    pos = {date: i for i, date in enumerate(cal)}
    close = t.raw.set_index(KEYS)["close"]
    f = t.features
    # Ground truth by lookup: the symbol's close exactly h calendar days later, if that row exists.
    target_pos = f["date"].map(pos) + horizon
    target_date = pd.Series(
        [cal[p] if p < len(cal) else pd.NaT for p in target_pos], index=f.index, dtype=f["date"].dtype
    )
    later_close = close.reindex(pd.MultiIndex.from_arrays([target_date, f["symbol"]])).to_numpy()
    expected = later_close / close.reindex(pd.MultiIndex.from_frame(f[KEYS])).to_numpy() - 1.0

    np.testing.assert_array_equal(f["fwd_ret"].isna().to_numpy(), np.isnan(expected))
    np.testing.assert_allclose(f["fwd_ret"].to_numpy(float), expected, rtol=1e-12, equal_nan=True)
    # The last h dates have no label at all; the earlier ones mostly do.
    last_dates = f["date"] >= cal[-horizon]
    assert f.loc[last_dates, "fwd_ret"].isna().all()
    assert f.loc[f["date"] == cal[-1], "fwd_ret"].isna().all()
    assert f.loc[~last_dates, "fwd_ret"].notna().mean() > 0.98
    # Some labels are NULL before the last h dates (delistings, and the halt in the gapped market).
    assert f.loc[~last_dates, "fwd_ret"].isna().sum() > 0
    if scenario == "gapped":
        sym = f[f["symbol"] == survivor()].set_index("date")
        for gap in GAP_DAYS:
            before = cal[gap - horizon] if gap - horizon not in GAP_DAYS else None
            if before is not None and before in sym.index:
                assert pd.isna(sym.loc[before, "fwd_ret"])

    # Excess labels: NULL exactly with fwd_ret, mean zero per date, and fwd_ret minus the date mean.
    assert (f["fwd_ret_excess"].isna() == f["fwd_ret"].isna()).all()
    labelled = f[f["fwd_ret"].notna()]
    date_mean = labelled.groupby("date")["fwd_ret"].transform("mean")
    np.testing.assert_allclose(
        labelled["fwd_ret_excess"], labelled["fwd_ret"] - date_mean, rtol=0, atol=1e-15
    )
    assert labelled.groupby("date")["fwd_ret_excess"].mean().abs().max() < 1e-15
    assert (f["fwd_horizon"] == horizon).all()


# --- warm-up, completeness, finiteness ------------------------------------------------------------------


def test_warmup_and_every_feature_finite():
    t = tables()
    obs = _obs_no(t.raw)
    f = t.features.merge(obs, on=KEYS, how="left", validate="one_to_one")
    assert f["obs_no"].notna().all()
    first = f.groupby("symbol")["obs_no"].min()
    assert (first >= WARMUP_ROWS + 1).all()
    assert (first == WARMUP_ROWS + 1).any(), "the warm-up drops more rows than needed"
    # Every universe row past the warm-up has a feature row (and only those).
    u = t.universe.merge(obs, on=KEYS, how="left")
    expected_rows = _sorted(u.loc[u["obs_no"] > WARMUP_ROWS, KEYS])
    pd.testing.assert_frame_equal(_sorted(t.features[KEYS]), expected_rows)
    # No NULL, NaN or inf in any feature: counted by DuckDB and checked here.
    assert t.non_finite == dict.fromkeys(FEATURE_NAMES, 0)
    values = t.features[list(FEATURE_NAMES)].to_numpy(float)
    assert np.isfinite(values).all()
    assert t.features[["date", "symbol", "sector"]].notna().all().all()
    # Range sanity of the bounded features.
    assert t.features["rsi_14d"].between(0, 100).all()
    assert (t.features["dist_high_60d"] <= 0).all()
    assert (t.features["vol_20d"] >= 0).all() and (t.features["amihud_20d"] >= 0).all()


def _tiny_market(n_days: int, missing: dict[str, list[int]]) -> pd.DataFrame:
    """Hand-made OHLCV: symbols A and B, close_t = 100 + t (A) or 50 + t (B), minus the `missing` days."""
    dates = pd.bdate_range("2024-01-01", periods=n_days)
    rows = []
    for symbol, base in (("A", 100.0), ("B", 50.0)):
        for t, date in enumerate(dates):
            if t not in missing.get(symbol, []):
                c = base + t
                rows.append((date, symbol, c, c + 1, c - 1, c, 1000 + t, "Technology"))
    return pd.DataFrame(rows, columns=["date", "symbol", "open", "high", "low", "close", "volume", "sector"])


def test_label_survives_a_halt_strictly_inside_the_horizon():
    """Minimal case: A is halted on day 66 only. On day 63 (h=5) A has a row exactly 5 trading days later
    (day 68), so fwd_ret = close(68) / close(63) - 1 = 168 / 163 - 1 by the label's definition."""
    t = build_tables(_tiny_market(70, {"A": [66]}), horizon=5, top_n=2)
    row = t.features[(t.features["symbol"] == "A") & (t.features["date"] == pd.Timestamp("2024-03-28"))]
    assert len(row) == 1  # day 63 (0-based) of the calendar
    assert row["fwd_ret"].iloc[0] == pytest.approx(168.0 / 163.0 - 1.0)


def test_label_null_when_the_target_day_is_missing():
    """The companion case that does hold: A halted on day 68, so day 63 has no label (h=5)."""
    t = build_tables(_tiny_market(70, {"A": [68]}), horizon=5, top_n=2)
    a = t.features[t.features["symbol"] == "A"].set_index("date")["fwd_ret"]
    b = t.features[t.features["symbol"] == "B"].set_index("date")["fwd_ret"]
    day = pd.bdate_range("2024-01-01", periods=70)
    assert pd.isna(a[day[63]])
    assert a[day[62]] == pytest.approx(167.0 / 162.0 - 1.0)  # day 67 exists
    assert b[day[63]] == pytest.approx(118.0 / 113.0 - 1.0)
    assert b[b.index >= day[65]].isna().all() and a[a.index >= day[65]].isna().all()  # past the end


def test_identical_liquidity_windows_tie_and_break_by_symbol_whatever_the_older_history():
    """Two names trade the same close and volume every day; ZZZ also has 150 older days. Each date's
    20-day mean dollar volume must tie exactly, so the tie breaks by symbol (AAA first) on every date:
    a sum of doubles added in another order (where the window sits in the name's history) differed by
    one ulp and put ZZZ first on some dates."""
    rng = np.random.default_rng(0)
    dates = pd.bdate_range("2020-01-01", periods=200)
    volume, close = np.round(rng.uniform(1e5, 1e8, 200)), np.round(rng.uniform(5, 500, 200), 2)
    frame = pd.DataFrame(
        [
            (d, symbol, close[i], close[i], close[i], close[i], volume[i])
            for symbol, start in (("AAA", 150), ("ZZZ", 0))
            for i, d in enumerate(dates)
            if i >= start
        ],
        columns=["date", "symbol", "open", "high", "low", "close", "volume"],
    )
    con = duckdb.connect()
    con.register("frame", frame)
    con.execute("CREATE TABLE raw_market_data AS SELECT * FROM frame")
    build_universe(con, UniverseSpec(top_n=1, window=20))
    both = con.execute("SELECT symbol FROM universe WHERE date >= ?", [dates[169]]).df()
    assert len(both) == 31 and set(both["symbol"]) == {"AAA"}


def test_zero_volume_days_are_not_in_the_universe_so_volume_features_stay_defined():
    """A 25-day run of zero volume inside a 60-day universe window: the 60-day mean dollar volume stays
    positive, but a symbol with no trade on t is not eligible on t, so no feature row has an undefined
    volume ratio, dollar volume or Amihud value (they need a traded day in the last 20)."""
    frame = _tiny_market(120, {})
    zero = (frame["symbol"] == "A") & frame.index.isin(frame.index[(frame["symbol"] == "A")][70:95])
    frame.loc[zero, "volume"] = 0
    con = duckdb.connect()
    ingest_market_data(con, frame=frame)
    build_universe(con, UniverseSpec(top_n=2, window=60))
    build_features(con, LabelSpec(horizon=1))
    zero_dates = set(frame.loc[zero, "date"])
    members = con.execute("SELECT date, symbol FROM universe WHERE symbol = 'A'").df()
    assert not set(members["date"]) & zero_dates  # out on every zero-volume day ...
    assert len(members) == 120 - 59 - 25  # ... and in on every other day with a full window
    assert count_non_finite(con) == dict.fromkeys(FEATURE_NAMES, 0)
    expected = reference_features(frame, reference_universe(frame, top_n=2, window=60))
    actual = con.execute("SELECT * FROM features").df()
    assert_features_close(actual, expected)
