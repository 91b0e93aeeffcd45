"""Point-in-time liquidity universe: the top N symbols by trailing mean dollar volume, per date.

A symbol is eligible on date t when it traded on t (a row with positive volume: a zero-volume day
cannot be traded, and it would leave the volume features of the last 20 days undefined) and has
`window` rows up to and including t (a full window) with a positive mean dollar volume. Only data up
to t enters the rank of t, and the ranking runs over whatever traded on t, so a symbol that later
delists is in the universe while it traded (no survivorship bias). Ties break by symbol so the table
is deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb

UNIVERSE_TABLE = "universe"


@dataclass(frozen=True)
class UniverseSpec:
    top_n: int = 500
    """Symbols kept per date."""
    window: int = 20
    """Trailing rows (trading days of the symbol) in the mean dollar volume, the current day included."""

    def __post_init__(self) -> None:
        if self.top_n < 1:
            raise ValueError(f"top_n must be >= 1, got {self.top_n}")
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")


DOLLAR_VOLUME = "CAST(close * volume AS DECIMAL(38, 4))"
"""A day's dollar volume, exact to 1/100 of a cent: a window's sum of doubles depends on the order the
window adds them in (where the row sits in the symbol's history), so two identical 20-day windows could
differ by one ulp and break a tie against the symbol order, and history older than the window could flip
a name at the top-N boundary."""


def eligibility_sql(source: str, window: int) -> str:
    """(date, symbol, avg_dollar_volume, eligible) for every row of `source`."""
    return f"""
        SELECT date, symbol,
               avg({DOLLAR_VOLUME}) OVER w AS avg_dollar_volume,
               volume > 0 AND count(*) OVER w = {window} AND avg({DOLLAR_VOLUME}) OVER w > 0 AS eligible
        FROM {source}
        WINDOW w AS (PARTITION BY symbol ORDER BY date ROWS BETWEEN {window - 1} PRECEDING AND CURRENT ROW)
    """


def build_universe(
    con: duckdb.DuckDBPyConnection, spec: UniverseSpec, source: str = "raw_market_data"
) -> int:
    """Replace the `universe` table (date, symbol, rank, avg_dollar_volume); returns its row count."""
    con.execute(f"""
        CREATE OR REPLACE TABLE {UNIVERSE_TABLE} AS
        SELECT date, symbol, rank, avg_dollar_volume
        FROM (
            SELECT date, symbol, avg_dollar_volume,
                   row_number() OVER (PARTITION BY date ORDER BY avg_dollar_volume DESC, symbol) AS rank
            FROM ({eligibility_sql(source, spec.window)})
            WHERE eligible
        )
        WHERE rank <= {spec.top_n}
        ORDER BY date, rank
    """)
    return con.execute(f"SELECT count(*) FROM {UNIVERSE_TABLE}").fetchall()[0][0]


def universe_count_mismatches(
    con: duckdb.DuckDBPyConnection, spec: UniverseSpec, source: str = "raw_market_data"
) -> list[tuple]:
    """Dates whose universe size differs from min(N, eligible symbols): (date, expected, actual)."""
    return con.execute(f"""
        WITH expected AS (
            SELECT date, least({spec.top_n}, count(*) FILTER (WHERE eligible)) AS n_expected
            FROM ({eligibility_sql(source, spec.window)}) GROUP BY date
        ), actual AS (SELECT date, count(*) AS n_actual FROM {UNIVERSE_TABLE} GROUP BY date)
        SELECT e.date, e.n_expected, coalesce(a.n_actual, 0)
        FROM expected e FULL OUTER JOIN actual a USING (date)
        WHERE coalesce(e.n_expected, 0) <> coalesce(a.n_actual, 0)
        ORDER BY 1
    """).fetchall()
