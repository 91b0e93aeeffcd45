"""The 16 engineered features: one registry, three readers.

Each `FeatureSpec` is read by
- `modeling.data.features` to compute the column (its `sql` expression, evaluated by DuckDB
  over per-row basics and named windows, see that module),
- `modeling.prompt.PromptBuilder` to write the prompt's data definition (`label`, `unit`),
- the README / asset metadata to document the data (`meaning`, `formula`).

Conventions used in the formulas: `r_t = close_t / close_{t-1} - 1` is the close-to-close return,
windows are the symbol's own last N trading rows ending at and including t (no look-ahead),
`dv_t = close_t * volume_t` is the dollar volume.

Stored values are in natural units (returns as fractions). `prompt_scale` converts them to the
unit the prompt shows (percent for returns), because fewer leading zeros mean fewer digit tokens.
This module is plain Python so that the GPU image can import it without DuckDB.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class FeatureSpec:
    name: str
    """Column name in the `features` table."""
    meaning: str
    """One line: what the number says about the stock."""
    formula: str
    """The definition in symbols (see the module docstring for the conventions)."""
    sql: str
    """DuckDB expression over the per-row basics and the named windows of `modeling.data.features`."""
    label: str
    """Short text the prompt shows in front of the value."""
    prompt_scale: float = 1.0
    """The prompt shows `value * prompt_scale`."""
    unit: str = ""
    """Unit of the prompt value ('%' for returns)."""


FEATURES: tuple[FeatureSpec, ...] = (
    FeatureSpec(
        "ret_1d",
        "Return over the last trading day.",
        "close_t / close_{t-1} - 1",
        "r",
        "1d return",
        100.0,
        "%",
    ),
    FeatureSpec(
        "ret_5d",
        "Return over the last 5 trading days.",
        "close_t / close_{t-5} - 1",
        "close / lag(close, 5) OVER w_sym - 1",
        "5d return",
        100.0,
        "%",
    ),
    FeatureSpec(
        "ret_20d",
        "Return over the last 20 trading days (about one month).",
        "close_t / close_{t-20} - 1",
        "close / lag(close, 20) OVER w_sym - 1",
        "20d return",
        100.0,
        "%",
    ),
    FeatureSpec(
        "ret_60d",
        "Return over the last 60 trading days (about one quarter).",
        "close_t / close_{t-60} - 1",
        "close / lag(close, 60) OVER w_sym - 1",
        "60d return",
        100.0,
        "%",
    ),
    FeatureSpec(
        "vol_20d",
        "Daily volatility over 20 days.",
        "stddev_samp(r_{t-19..t})",
        "stddev_samp(r) OVER w20",
        "20d vol",
        100.0,
        "%",
    ),
    FeatureSpec(
        "vol_60d",
        "Daily volatility over 60 days.",
        "stddev_samp(r_{t-59..t})",
        "stddev_samp(r) OVER w60",
        "60d vol",
        100.0,
        "%",
    ),
    FeatureSpec(
        "hl_range_20d",
        "Mean intraday range relative to the close over 20 days.",
        "mean((high - low) / close over t-19..t)",
        "avg(hl) OVER w20",
        "20d high-low range",
        100.0,
        "%",
    ),
    FeatureSpec(
        "ma_gap_20d",
        "Distance of the close from its 20-day simple moving average.",
        "close_t / mean(close_{t-19..t}) - 1",
        "close / avg(close) OVER w20 - 1",
        "20d SMA gap",
        100.0,
        "%",
    ),
    FeatureSpec(
        "ma_gap_60d",
        "Distance of the close from its 60-day simple moving average.",
        "close_t / mean(close_{t-59..t}) - 1",
        "close / avg(close) OVER w60 - 1",
        "60d SMA gap",
        100.0,
        "%",
    ),
    FeatureSpec(
        "rsi_14d",
        "Relative strength index over 14 days (Cutler's simple-average form), 0 to 100.",
        "100 * mean(gain_{t-13..t}) / (mean(gain) + mean(loss)); 50 when both are 0; gain = max(r, 0)",
        "CASE WHEN avg(gain) OVER w14 + avg(loss) OVER w14 > 0 "
        "THEN 100 * avg(gain) OVER w14 / (avg(gain) OVER w14 + avg(loss) OVER w14) ELSE 50 END",
        "14d RSI",
    ),
    FeatureSpec(
        "dist_high_60d",
        "Distance of the close below the 60-day high.",
        "close_t / max(high_{t-59..t}) - 1",
        "close / max(high) OVER w60 - 1",
        "60d high gap",
        100.0,
        "%",
    ),
    FeatureSpec(
        "volume_ratio_5_20d",
        "Recent volume relative to its monthly level.",
        "mean(volume_{t-4..t}) / mean(volume_{t-19..t})",
        "CASE WHEN avg(volume) OVER w20 > 0 THEN avg(volume) OVER w5 / avg(volume) OVER w20 END",
        "5d/20d volume ratio",
    ),
    FeatureSpec(
        "log_dollar_volume_20d",
        "Liquidity: log of the mean daily dollar volume over 20 days.",
        "ln(mean(dv_{t-19..t}))",
        "CASE WHEN avg(dv) OVER w20 > 0 THEN ln(avg(dv) OVER w20) END",
        "20d log dollar volume",
    ),
    FeatureSpec(
        "amihud_20d",
        "Illiquidity (Amihud): mean absolute daily return per billion dollars traded, 20 days.",
        "mean(abs(r_s) / (dv_s / 1e9) over s in t-19..t with dv_s > 0)",
        "avg(amihud_day) OVER w20",
        "20d Amihud per $1B",
    ),
    FeatureSpec(
        "max_ret_20d",
        "Largest daily return in the last 20 days (lottery demand).",
        "max(r_{t-19..t})",
        "max(r) OVER w20",
        "20d max daily return",
        100.0,
        "%",
    ),
    FeatureSpec(
        "overnight_gap",
        "Gap from the previous close to today's open.",
        "open_t / close_{t-1} - 1",
        "open / prev_close - 1",
        "overnight gap",
        100.0,
        "%",
    ),
)

FEATURE_NAMES: tuple[str, ...] = tuple(f.name for f in FEATURES)
MODEL_INPUT_COLUMNS: tuple[str, ...] = ("date", "symbol", "sector", *FEATURE_NAMES)
"""What the served model reads per row (the pyfunc's input; `sector` optional there)."""
PERCENTILE_SUFFIX = "_pct"
"""Column suffix of precomputed prompt percentiles (`modeling.prompt.PromptBuilder.with_percentiles`)."""
PERCENTILE_COLUMNS: tuple[str, ...] = tuple(name + PERCENTILE_SUFFIX for name in FEATURE_NAMES)
"""The training set's prompt percentiles, ranked on each date's whole universe: the served model's
optional input, so that a percentile model scores the prompts it was judged on whatever rows a call
holds (without them it ranks the rows of each date it is given)."""


def served_columns(available: Sequence[str]) -> list[str]:
    """The model's input columns, with the stored percentiles among `available` (a training set's)."""
    present = set(available)
    return [*MODEL_INPUT_COLUMNS, *(c for c in PERCENTILE_COLUMNS if c in present)]


FEATURES_BY_NAME: dict[str, FeatureSpec] = {f.name: f for f in FEATURES}

# Trading rows of history a symbol needs before every feature is defined: ret_60d and vol_60d read
# close_{t-60}, so the 61st row of a symbol is its first feature row.
WARMUP_ROWS = 60

assert len(FEATURES) == 16, "the model and the prompt are specified for exactly 16 features"


def registry_fingerprint(features: Sequence[FeatureSpec] | None = None) -> str:
    """A hash of what gives the features their values and their prompt text: each feature's name, SQL,
    label, unit and scale, in order (the prose, `meaning` and `formula`, is left out). A saved model
    records it; scoring rows computed by other definitions is refused (`PromptBuilder.from_settings`, the
    `predictions` asset). `features` defaults to this module's `FEATURES` at call time."""
    specs = FEATURES if features is None else features
    text = json.dumps([[f.name, f.sql, f.label, f.unit, f.prompt_scale] for f in specs])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def registry_markdown() -> str:
    """The registry as a markdown table (README and asset metadata); formulas avoid '|' for that reason."""
    lines = ["| feature | meaning | formula |", "|---|---|---|"]
    lines += [f"| `{f.name}` | {f.meaning} | `{f.formula}` |" for f in FEATURES]
    return "\n".join(lines)
