"""The 16 features and the forward-return labels, computed by DuckDB window functions.

Two stages, both set-based SQL (no Python loop over symbols):
1. per-row basics over the symbol's own history: previous close, daily return `r`, dollar volume,
   high-low range, gain/loss for the RSI, the daily Amihud ratio and the row number `obs_no`;
2. the registry's expressions (`modeling.feature_registry`) over named trailing windows
   `w5, w14, w20, w60` (ROWS frames ending at the current row: no look-ahead).

Rows are kept where the symbol is in the universe and has more than `WARMUP_ROWS` rows of history,
so every feature is defined. Labels look forward on the trading calendar (all distinct dates):
`fwd_ret = close(t+h) / close(t) - 1` where t+h is h trading days later on that calendar, whatever
the symbol did in between; NULL when the symbol has no row at t+h (the last h dates: the future is
unknown, these are the rows to predict; or a delisting or a halt on t+h: no clean label).
`fwd_ret_excess` subtracts that date's cross-sectional mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb

from modeling.feature_registry import FEATURE_NAMES, FEATURES, WARMUP_ROWS, registry_fingerprint

FEATURES_TABLE = "features"
DEFINITIONS_TABLE = "feature_definitions"
"""The definitions `features` was computed with (see `build_features`)."""
LABEL_COLUMNS = ("fwd_ret", "fwd_ret_excess")


@dataclass(frozen=True)
class LabelSpec:
    horizon: int = 1
    """h: the label is the return from the close of t to the close of t+h trading days."""

    def __post_init__(self) -> None:
        if not 1 <= self.horizon <= 60:
            raise ValueError(f"horizon must be in [1, 60] trading days, got {self.horizon}")


def _feature_select() -> str:
    return ",\n               ".join(f"{f.sql} AS {f.name}" for f in FEATURES)


def features_sql(source: str, universe: str, horizon: int) -> str:
    """SELECT producing the features table from raw OHLCV `source` and the `universe` table."""
    return f"""
        WITH calendar AS (
            SELECT date, row_number() OVER (ORDER BY date) AS day_idx
            FROM (SELECT DISTINCT date FROM {source})
        ),
        basics AS (
            SELECT m.date, m.symbol, m.sector, m.open, m.high, m.close, m.volume, c.day_idx,
                   lag(m.close) OVER w_sym AS prev_close,
                   m.close / lag(m.close) OVER w_sym - 1 AS r,
                   m.close * m.volume AS dv,
                   (m.high - m.low) / m.close AS hl,
                   row_number() OVER w_sym AS obs_no
            FROM {source} m JOIN calendar c USING (date)
            -- a symbol's features read only its own rows: skip symbols that never enter the universe
            WHERE m.symbol IN (SELECT DISTINCT symbol FROM {universe})
            WINDOW w_sym AS (PARTITION BY m.symbol ORDER BY c.day_idx)
        ),
        basics2 AS (
            SELECT *,
                   greatest(r, 0) AS gain,
                   greatest(-r, 0) AS loss,
                   CASE WHEN dv > 0 THEN abs(r) / (dv / 1e9) END AS amihud_day
            FROM basics
        ),
        computed AS (
            SELECT date, symbol, sector, obs_no,
               {_feature_select()},
               -- the symbol's close exactly h trading days later (a RANGE frame on the calendar index:
               -- empty, hence NULL, when the symbol has no row that day)
               first_value(close) OVER w_fwd / close - 1 AS fwd_ret
            FROM basics2
            WINDOW w_sym AS (PARTITION BY symbol ORDER BY day_idx),
                   w5 AS (PARTITION BY symbol ORDER BY day_idx ROWS BETWEEN 4 PRECEDING AND CURRENT ROW),
                   w14 AS (PARTITION BY symbol ORDER BY day_idx ROWS BETWEEN 13 PRECEDING AND CURRENT ROW),
                   w20 AS (PARTITION BY symbol ORDER BY day_idx ROWS BETWEEN 19 PRECEDING AND CURRENT ROW),
                   w60 AS (PARTITION BY symbol ORDER BY day_idx ROWS BETWEEN 59 PRECEDING AND CURRENT ROW),
                   w_fwd AS (PARTITION BY symbol ORDER BY day_idx
                             RANGE BETWEEN {horizon} FOLLOWING AND {horizon} FOLLOWING)
        ),
        kept AS (
            SELECT c.* FROM computed c JOIN {universe} u USING (date, symbol) WHERE c.obs_no > {WARMUP_ROWS}
        ),
        date_means AS (
            -- an ordered sum: the same bits on every run, whatever the thread schedule
            SELECT date, sum(fwd_ret ORDER BY symbol) / count(fwd_ret) AS mean_fwd_ret FROM kept GROUP BY date
        )
        SELECT k.date, k.symbol, k.sector,
               {", ".join(f"k.{n}" for n in FEATURE_NAMES)},
               k.fwd_ret,
               k.fwd_ret - m.mean_fwd_ret AS fwd_ret_excess,
               CAST({horizon} AS INTEGER) AS fwd_horizon
        FROM kept k JOIN date_means m USING (date)
        ORDER BY k.date, k.symbol
    """


def build_features(
    con: duckdb.DuckDBPyConnection,
    spec: LabelSpec,
    source: str = "raw_market_data",
    universe: str = "universe",
) -> int:
    """Replace the `features` table and, in the same transaction, `feature_definitions`: the definitions
    it was computed with (one row per feature: name, SQL, label, unit, scale) and their fingerprint
    (`registry_sha`), which travels on to the training set and the model. Returns the row count."""
    definitions = [(f.name, f.sql, f.label, f.unit, f.prompt_scale) for f in FEATURES]
    con.execute("BEGIN TRANSACTION")
    try:
        con.execute(
            f"CREATE OR REPLACE TABLE {FEATURES_TABLE} AS {features_sql(source, universe, spec.horizon)}"
        )
        con.execute(f"""
            CREATE OR REPLACE TABLE {DEFINITIONS_TABLE} (
                position INTEGER, name VARCHAR, sql VARCHAR, label VARCHAR, unit VARCHAR,
                prompt_scale DOUBLE, registry_sha VARCHAR)
        """)
        sha = registry_fingerprint(FEATURES)
        con.executemany(
            f"INSERT INTO {DEFINITIONS_TABLE} VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(i, *d, sha) for i, d in enumerate(definitions)],
        )
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    return con.execute(f"SELECT count(*) FROM {FEATURES_TABLE}").fetchall()[0][0]


def features_registry_sha(con: duckdb.DuckDBPyConnection) -> str:
    """The fingerprint of the definitions the `features` table was computed with."""
    try:
        shas = con.execute(f"SELECT DISTINCT registry_sha FROM {DEFINITIONS_TABLE}").fetchall()
    except duckdb.CatalogException:
        shas = []
    if len(shas) != 1:
        raise ValueError(
            f"the warehouse does not say which feature definitions computed `{FEATURES_TABLE}` "
            f"(table {DEFINITIONS_TABLE}); materialise `features` again"
        )
    return str(shas[0][0])


def count_non_finite(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
    """Per feature: rows whose value is NULL, NaN or infinite (after the warm-up there must be none)."""
    exprs = ", ".join(
        f"count(*) FILTER (WHERE {n} IS NULL OR NOT isfinite({n})) AS {n}" for n in FEATURE_NAMES
    )
    row = con.execute(f"SELECT {exprs} FROM {FEATURES_TABLE}").fetchall()[0]
    return dict(zip(FEATURE_NAMES, row, strict=True))
