"""Close-to-close moves that look like an unadjusted stock split or reverse split.

The features and labels read raw closes (`modeling.data.features`), so the input must be split-adjusted:
an unadjusted 2-for-1 split reads as a -50% day, which becomes an extreme label with the largest bucket
weight and distorts about 60 days of price features. A genuine -50% day exists too, so this is an audit
(the warning check `no_unadjusted_split_jumps`), not a quarantine: a move is suspected when the close
moves by a common split ratio, up to the day's own return (`tolerance`, 4%: close / previous close times
the ratio within 1 +- 0.04), and the volume moves the other way by at least the square root of that
ratio, as the share count changes.
"""

from __future__ import annotations

import duckdb
import pandas as pd

from modeling.data.revisions import RAW_TABLE

SPLIT_RATIOS = (2.0, 3.0, 4.0, 5.0, 8.0, 10.0, 20.0)
"""Shares after / before of the usual forward splits (a reverse split is the inverse). 3-for-2 is left
out: a -33% day is too common to flag."""


def suspected_split_jumps(con: duckdb.DuckDBPyConnection, tolerance: float = 0.04) -> pd.DataFrame:
    """One row per suspected split day: symbol, date, close_ratio (close / previous close), volume_ratio,
    split_ratio (> 1 a forward split, < 1 a reverse split), newest first."""
    ratios = ", ".join(f"({r}), ({1.0 / r})" for r in SPLIT_RATIOS)
    return con.execute(
        f"""
        WITH moves AS (
            SELECT symbol, date,
                   close / lag(close) OVER w AS close_ratio,
                   volume / nullif(lag(volume) OVER w, 0) AS volume_ratio
            FROM {RAW_TABLE}
            WINDOW w AS (PARTITION BY symbol ORDER BY date)
        )
        SELECT m.symbol, m.date, m.close_ratio, m.volume_ratio, s.split_ratio
        FROM moves m JOIN (VALUES {ratios}) s(split_ratio)
          ON abs(m.close_ratio * s.split_ratio - 1) <= ?
         AND m.volume_ratio IS NOT NULL AND m.volume_ratio > 0
         AND ln(m.volume_ratio) / ln(s.split_ratio) >= 0.5
        ORDER BY m.date DESC, m.symbol
    """,
        [tolerance],
    ).df()
