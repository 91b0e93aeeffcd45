"""The built-in synthetic market: seeded daily OHLCV with the statistical quirks that matter here.

Why each ingredient is there:
- market + sector factors with GARCH(1,1) variance and Student-t shocks: cross-sectional
  correlation, volatility clustering and fat tails, as in real daily returns;
- log-normal liquidity with a slow random walk: the top-N-by-dollar-volume ranking is meaningful and
  changes over time;
- stale-price days (exact zero returns, more often for illiquid names) and rare jumps: the label
  distribution has the spike at zero and the thin extreme tails that bucket re-balancing targets;
- staggered listings and delistings: a point-in-time universe differs from a survivor universe;
- a weak planted signal, a known function of lagged observable prices, whose oracle IC is measured
  and reported so that what a model learns can be compared with a known ceiling.

The planted signal (short-term reversal, scaled by recent volatility):
    s_{i,t} = -tanh(ret5_{i,t} / (sqrt(5) * rv20_{i,t}))
    E[r_{i,t+1} | past] gets + kappa * rv20_{i,t} * s_{i,t}
with ret5 the 5-day simple return and rv20 the 20-day standard deviation of daily close-to-close
returns, both computed from the published (cent-rounded) closes up to t.
"""

from __future__ import annotations

import string
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

SECTORS = (
    "Technology",
    "Healthcare",
    "Financials",
    "Consumer Discretionary",
    "Consumer Staples",
    "Industrials",
    "Energy",
    "Materials",
    "Utilities",
    "Real Estate",
    "Communication Services",
)
TRADING_DAYS_PER_YEAR = 252


@dataclass(frozen=True)
class SyntheticMarketConfig:
    n_symbols: int = 1000
    """Symbols ever listed during the period (at least 800 for the default market)."""
    n_years: float = 5.0
    """Length of the period in years of 252 business days."""
    start: str = "2019-01-02"
    """First business day."""
    seed: int = 7
    """Everything is drawn from one `numpy.random.default_rng(seed)`: same seed, same market."""
    signal_kappa: float = 0.08
    """Strength of the planted reversal signal, in units of the stock's recent daily volatility."""
    late_listing_share: float = 0.25
    """Share of symbols that list after the first day."""
    delisting_share: float = 0.2
    """Share of symbols that delist before the last day."""
    jump_prob: float = 0.002
    """Daily probability of a jump (an extreme move of 8% to 35%) per symbol."""
    universe_size: int = 500
    """N of the point-in-time top-N universe in which the oracle IC is also reported."""

    def __post_init__(self) -> None:
        if self.n_symbols < 10:
            raise ValueError(f"n_symbols must be >= 10, got {self.n_symbols}")
        if self.n_years <= 0.25:
            raise ValueError(
                f"n_years must be > 0.25 (the features need a 60-day warm-up), got {self.n_years}"
            )
        for name in ("late_listing_share", "delisting_share", "jump_prob"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        if self.signal_kappa < 0:
            raise ValueError(f"signal_kappa must be >= 0, got {self.signal_kappa}")

    @property
    def n_days(self) -> int:
        return int(round(self.n_years * TRADING_DAYS_PER_YEAR))


@dataclass
class SyntheticMarket:
    frame: pd.DataFrame
    """Long OHLCV: date, symbol, open, high, low, close, volume, sector (listed symbol-days only)."""
    oracle: dict = field(default_factory=dict)
    """The planted signal's definition and its oracle information coefficients."""


def _garch_t(
    rng: np.random.Generator,
    n_days: int,
    size: int,
    long_run_vol: np.ndarray | float,
    alpha: float,
    beta: float,
    df: float,
) -> np.ndarray:
    """(n_days, size) GARCH(1,1) returns with unit-variance Student-t shocks."""
    long_var = np.broadcast_to(np.asarray(long_run_vol, dtype=float) ** 2, (size,))
    omega = (1.0 - alpha - beta) * long_var
    shocks = rng.standard_t(df, size=(n_days, size)) / np.sqrt(df / (df - 2.0))
    out = np.empty((n_days, size))
    var = long_var.copy()
    for t in range(n_days):
        out[t] = np.sqrt(var) * shocks[t]
        var = omega + alpha * out[t] ** 2 + beta * var
    return out


def _tickers(rng: np.random.Generator, n: int) -> np.ndarray:
    letters = np.array(list(string.ascii_uppercase))
    seen: set[str] = set()
    out: list[str] = []
    while len(out) < n:
        length = int(rng.choice([3, 4], p=[0.35, 0.65]))
        ticker = "".join(rng.choice(letters, size=length))
        if ticker not in seen:
            seen.add(ticker)
            out.append(ticker)
    return np.array(out)


def _mean_rank_ic(pred: np.ndarray, realised: np.ndarray, mask: np.ndarray, min_names: int = 20) -> float:
    """Mean over dates of the cross-sectional Spearman correlation, using only `mask` cells."""
    p = pd.DataFrame(np.where(mask, pred, np.nan)).rank(axis=1)
    r = pd.DataFrame(np.where(mask, realised, np.nan)).rank(axis=1)
    p = p.sub(p.mean(axis=1), axis=0)
    r = r.sub(r.mean(axis=1), axis=0)
    ic = (p * r).sum(axis=1) / np.sqrt((p**2).sum(axis=1) * (r**2).sum(axis=1))
    ic = ic[mask.sum(axis=1) >= min_names]
    return float(ic.mean())


@dataclass(frozen=True)
class _CrossSection:
    """Per-symbol draws: identities, sectors, exposures, liquidity."""

    symbols: np.ndarray
    sector_idx: np.ndarray
    beta_mkt: np.ndarray
    beta_sec: np.ndarray
    idio_vol: np.ndarray
    """Long-run daily idiosyncratic volatility."""
    log_liq: np.ndarray
    """Log mean dollar volume."""
    stale_prob: np.ndarray
    price0: np.ndarray


@dataclass(frozen=True)
class _Calendar:
    """Listing calendar: survivors, late listers, delisters."""

    list_day: np.ndarray
    delist_day: np.ndarray
    """Exclusive end."""
    late: np.ndarray
    delists: np.ndarray
    listed: np.ndarray
    """(n_days, n_symbols): the symbol is listed that day."""


@dataclass(frozen=True)
class _Shocks:
    """Every random component of the daily moves, drawn up front."""

    systematic: np.ndarray
    idio: np.ndarray
    jumps: np.ndarray
    stale: np.ndarray
    gap_share: np.ndarray
    noise_open: np.ndarray
    noise_hi: np.ndarray
    noise_lo: np.ndarray
    liq_shock: np.ndarray
    vol_noise: np.ndarray


@dataclass(frozen=True)
class _Bars:
    """The simulated daily bars, (n_days, n_symbols) each."""

    open_: np.ndarray
    high: np.ndarray
    low: np.ndarray
    close: np.ndarray
    volume: np.ndarray
    expected: np.ndarray
    """kappa * rv20 * s: the planted E[r_{t+1}], known at the close of t."""
    rets: np.ndarray
    """Published close-to-close returns."""


def _draw_cross_section(rng: np.random.Generator, n_sym: int) -> _CrossSection:
    symbols = _tickers(rng, n_sym)
    sector_idx = rng.integers(0, len(SECTORS), n_sym)
    beta_mkt = rng.normal(1.0, 0.3, n_sym)
    beta_sec = rng.normal(0.8, 0.3, n_sym)
    idio_vol = np.exp(rng.normal(np.log(0.015), 0.35, n_sym))  # long-run daily idiosyncratic vol
    log_liq = rng.normal(np.log(4e7), 1.5, n_sym)  # log mean dollar volume: $1M .. $5B spread
    stale_prob = np.clip(0.06 - 0.012 * (log_liq - np.log(4e7)), 0.003, 0.15)  # illiquid -> more stale
    price0 = np.exp(rng.uniform(np.log(8.0), np.log(400.0), n_sym))
    return _CrossSection(symbols, sector_idx, beta_mkt, beta_sec, idio_vol, log_liq, stale_prob, price0)


def _draw_calendar(
    rng: np.random.Generator, cfg: SyntheticMarketConfig, n_days: int, n_sym: int
) -> _Calendar:
    min_life = min(150, n_days // 2)
    list_day = np.zeros(n_sym, dtype=int)
    late = rng.random(n_sym) < cfg.late_listing_share
    list_day[late] = rng.integers(1, max(2, int(n_days * 0.75)), late.sum())
    delist_day = np.full(n_sym, n_days)  # exclusive end
    delists = (rng.random(n_sym) < cfg.delisting_share) & (list_day + min_life < n_days - 1)
    delist_day[delists] = rng.integers(list_day[delists] + min_life, n_days - 1)
    listed = (np.arange(n_days)[:, None] >= list_day) & (np.arange(n_days)[:, None] < delist_day)
    return _Calendar(list_day, delist_day, late, delists, listed)


def _draw_shocks(
    rng: np.random.Generator, cfg: SyntheticMarketConfig, n_days: int, cs: _CrossSection
) -> _Shocks:
    n_sym = cs.symbols.size
    mkt = _garch_t(rng, n_days, 1, 0.009, alpha=0.09, beta=0.89, df=5.0)[:, 0]
    sec = _garch_t(rng, n_days, len(SECTORS), 0.007, alpha=0.07, beta=0.90, df=5.0)
    idio = _garch_t(rng, n_days, n_sym, cs.idio_vol, alpha=0.06, beta=0.92, df=4.0)
    systematic = cs.beta_mkt * mkt[:, None] + cs.beta_sec * sec[:, cs.sector_idx]
    jumps = np.where(
        rng.random((n_days, n_sym)) < cfg.jump_prob,
        rng.choice([-1.0, 1.0], (n_days, n_sym)) * rng.uniform(0.08, 0.35, (n_days, n_sym)),
        0.0,
    )
    stale = rng.random((n_days, n_sym)) < cs.stale_prob
    gap_share = rng.uniform(0.15, 0.4, n_sym)
    noise_open = rng.normal(0.0, 1.0, (n_days, n_sym))
    noise_hi = np.abs(rng.normal(0.0, 1.0, (n_days, n_sym)))
    noise_lo = np.abs(rng.normal(0.0, 1.0, (n_days, n_sym)))
    liq_shock = rng.normal(0.0, 1.0, (n_days, n_sym))
    vol_noise = rng.normal(0.0, 0.35, (n_days, n_sym))
    return _Shocks(
        systematic, idio, jumps, stale, gap_share, noise_open, noise_hi, noise_lo, liq_shock, vol_noise
    )


def _simulate_bars(cfg: SyntheticMarketConfig, cs: _CrossSection, cal: _Calendar, shocks: _Shocks) -> _Bars:
    """Day by day (prices are path dependent), with vector operations over symbols; no random draws."""
    n_days, n_sym = shocks.systematic.shape
    open_ = np.empty((n_days, n_sym))
    high = np.empty((n_days, n_sym))
    low = np.empty((n_days, n_sym))
    close = np.empty((n_days, n_sym))
    volume = np.empty((n_days, n_sym))
    signal = np.full((n_days, n_sym), np.nan)  # s_{i,t}, known at the close of t
    expected = np.full((n_days, n_sym), np.nan)  # kappa * rv20 * s: the planted E[r_{t+1}]
    rets = np.zeros((n_days, n_sym))  # published close-to-close returns
    prev_close = np.round(cs.price0, 2)
    liq = cs.log_liq.copy()
    tilt = np.zeros(n_sym)  # planted expected return for today, set at yesterday's close
    sigma = np.sqrt(cs.idio_vol**2 + 0.009**2)  # typical daily move: scales the open and the bar's range
    for t in range(n_days):
        log_ret = shocks.systematic[t] + shocks.idio[t] + shocks.jumps[t] + tilt
        log_ret = np.clip(log_ret, -0.9, 1.5)
        is_stale = shocks.stale[t] & (shocks.jumps[t] == 0)
        gap = shocks.gap_share * log_ret + 0.25 * sigma * shocks.noise_open[t]
        c = np.maximum(np.round(prev_close * np.exp(log_ret), 2), 0.01)
        o = np.maximum(np.round(prev_close * np.exp(gap), 2), 0.01)
        h = np.round(np.maximum(o, c) * np.exp(0.5 * sigma * shocks.noise_hi[t]), 2)
        lo = np.maximum(np.round(np.minimum(o, c) * np.exp(-0.5 * sigma * shocks.noise_lo[t]), 2), 0.01)
        c = np.where(is_stale, prev_close, c)
        o = np.where(is_stale, prev_close, o)
        h = np.where(is_stale, prev_close, np.maximum(h, np.maximum(o, c)))
        lo = np.where(is_stale, prev_close, np.minimum(lo, np.minimum(o, c)))
        r = c / prev_close - 1.0

        liq = 0.995 * liq + 0.005 * cs.log_liq + 0.04 * shocks.liq_shock[t]
        dollar_vol = (
            np.exp(liq + shocks.vol_noise[t]) * (1.0 + 8.0 * np.abs(r)) * np.where(is_stale, 0.3, 1.0)
        )
        open_[t], high[t], low[t], close[t] = o, h, lo, c
        volume[t] = np.maximum(np.round(dollar_vol / c), 0.0)
        rets[t] = r
        prev_close = c

        # The planted signal at the close of t, from published closes only: the 20 returns of rows
        # t-19..t must all be published, i.e. the symbol listed at t-20 or earlier.
        if t >= 20:
            window = rets[t - 19 : t + 1]
            rv20 = np.maximum(window.std(axis=0, ddof=1), 1e-4)
            ret5 = close[t] / close[t - 5] - 1.0
            observable = cal.list_day <= t - 20
            s = np.where(observable, -np.tanh(ret5 / (np.sqrt(5.0) * rv20)), np.nan)
            signal[t] = s
            expected[t] = cfg.signal_kappa * rv20 * s
            tilt = np.nan_to_num(expected[t], nan=0.0)
        # A symbol that is not yet listed starts from its initial price when it lists.
        not_yet = t + 1 < cal.list_day
        prev_close = np.where(not_yet, np.round(cs.price0, 2), prev_close)
    return _Bars(open_, high, low, close, volume, expected, rets)


def _oracle_ic(cfg: SyntheticMarketConfig, cal: _Calendar, bars: _Bars) -> dict:
    """The oracle information coefficient of the planted signal, on all listed names and in the universe."""
    n_sym = bars.rets.shape[1]
    listed = cal.listed
    next_ret = np.vstack([bars.rets[1:], np.full((1, n_sym), np.nan)])
    listed_both = listed & np.vstack([listed[1:], np.zeros((1, n_sym), dtype=bool)])
    valid = listed_both & ~np.isnan(bars.expected)
    dollar_volume = np.where(listed, bars.close * bars.volume, np.nan)
    adv20 = pd.DataFrame(dollar_volume).rolling(20, min_periods=20).mean().to_numpy()
    adv_rank = pd.DataFrame(adv20).rank(axis=1, ascending=False, method="first").to_numpy()
    in_universe = valid & (adv_rank <= cfg.universe_size)
    return {
        "signal": "s = -tanh(ret_5d / (sqrt(5) * vol_20d)); E[r_{t+1}] += kappa * vol_20d * s",
        "kappa": cfg.signal_kappa,
        "oracle_ic_all": round(_mean_rank_ic(bars.expected, next_ret, valid), 5),
        "oracle_ic_universe": round(_mean_rank_ic(bars.expected, next_ret, in_universe), 5),
        "horizon_days": 1,
    }


def generate_synthetic_market(cfg: SyntheticMarketConfig = SyntheticMarketConfig()) -> SyntheticMarket:
    """Simulate the market day by day (prices are path dependent) with vector operations over symbols.

    Every draw comes from one generator, in a fixed order: the cross-section, the listing calendar, then
    the return components; the simulation itself draws nothing."""
    rng = np.random.default_rng(cfg.seed)
    n_days, n_sym = cfg.n_days, cfg.n_symbols
    dates = pd.bdate_range(cfg.start, periods=n_days)
    cs = _draw_cross_section(rng, n_sym)
    cal = _draw_calendar(rng, cfg, n_days, n_sym)
    bars = _simulate_bars(cfg, cs, cal, _draw_shocks(rng, cfg, n_days, cs))
    oracle = _oracle_ic(cfg, cal, bars)

    # --- long format, listed symbol-days only --------------------------------------------------------
    t_idx, s_idx = np.nonzero(cal.listed)
    frame = pd.DataFrame(
        {
            "date": dates.values[t_idx].astype("datetime64[s]").astype("datetime64[ms]"),
            "symbol": cs.symbols[s_idx],
            "open": bars.open_[t_idx, s_idx],
            "high": bars.high[t_idx, s_idx],
            "low": bars.low[t_idx, s_idx],
            "close": bars.close[t_idx, s_idx],
            "volume": bars.volume[t_idx, s_idx].astype(np.int64),
            "sector": np.array(SECTORS, dtype=object)[cs.sector_idx[s_idx]],
        }
    )
    listed_rets = bars.rets[t_idx, s_idx]
    oracle.update(
        {
            "zero_return_share": round(float(np.mean(listed_rets == 0.0)), 5),
            "extreme_move_share": round(float(np.mean(np.abs(listed_rets) > 0.1)), 5),
            "n_delisted": int(cal.delists.sum()),
            "n_late_listed": int(cal.late.sum()),
        }
    )
    return SyntheticMarket(frame=frame, oracle=oracle)
