"""The audit of revised market data (`raw_market_data_revisions`): every value a load replaced, with its
old and new copy, kept across loads.

Two kinds of revision: between copies of a (date, symbol) in the files of one load (the newest file
wins; `modeling.data.ingest` marks the older copies), and a value that changed since the previous load
with no old copy left in any file (a vendor re-sent a file under the same name): then the old source
is `PREVIOUS_LOAD` and has no row number. A symbol-day of the previous load that this load no longer
holds as a clean row (its file went missing, a re-send left it out, or it is now rejected) is a removal:
its old values, no new ones, and the new source `REMOVED`. A revision is added once; `revised_at` is when
it was first seen, so loading the same files again leaves the table as it is.
"""

from __future__ import annotations

import datetime

import duckdb

from modeling.data.tables import table_exists

RAW_TABLE = "raw_market_data"
REVISIONS_TABLE = "raw_market_data_revisions"
PREVIOUS_LOAD = "raw_market_data (previous load)"
"""The old source of a revision against the warehouse's previous load rather than a copy in a file."""
REMOVED = "(removed: not a clean row of this load)"
"""The new source of a symbol-day the previous load held and this one does not."""
REMOVED_KEYS_SQL = f"""
    SELECT date, symbol FROM {RAW_TABLE}
    EXCEPT SELECT date, symbol FROM _staged WHERE reason IS NULL
"""
"""The (date, symbol) keys of the previous load that the load staged in `_staged` drops."""
VALUE_COLUMNS = ("open", "high", "low", "close", "volume", "sector")


def write_revisions(con: duckdb.DuckDBPyConnection, revised_at: datetime.datetime) -> tuple[int, int]:
    """Extend the audit with this load's revisions (inside the caller's transaction, before the clean
    rows replace `RAW_TABLE`): `_staged` holds the load's rows with their reasons, `_revised` maps each
    replaced copy to the one that replaces it. Returns (values changed since the previous load, symbol-days
    of the previous load removed)."""
    old = ", ".join(f"o.{c} AS old_{c}" for c in VALUE_COLUMNS)
    new = ", ".join(f"n.{c} AS new_{c}" for c in VALUE_COLUMNS)
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE _revisions_now AS
        SELECT o.date, o.symbol, {old}, {new},
               o.source_file AS old_source_file, o.source_row AS old_source_row,
               n.source_file AS new_source_file, n.source_row AS new_source_row,
               CAST(? AS TIMESTAMP) AS revised_at
        FROM _revised r
        JOIN _staged o ON o.source_idx = r.source_idx AND o.source_row = r.source_row
        JOIN _staged n ON n.source_idx = r.new_source_idx AND n.source_row = r.new_source_row
    """,
        [revised_at],
    )
    n_since = n_removed = 0
    if table_exists(con, RAW_TABLE):
        changed = " OR ".join(f"o.{c} IS DISTINCT FROM n.{c}" for c in VALUE_COLUMNS)
        explained = " AND ".join(f"r.old_{c} IS NOT DISTINCT FROM o.{c}" for c in VALUE_COLUMNS)
        n_since = con.execute(
            f"""
            INSERT INTO _revisions_now
            SELECT o.date, o.symbol, {old}, {new}, '{PREVIOUS_LOAD}', NULL,
                   n.source_file, n.source_row, CAST(? AS TIMESTAMP)
            FROM {RAW_TABLE} o JOIN _staged n USING (date, symbol)
            WHERE n.reason IS NULL AND ({changed})
              AND NOT EXISTS (  -- a copy in this load's files already tells this revision
                  SELECT 1 FROM _revisions_now r WHERE r.date = o.date AND r.symbol = o.symbol AND {explained}
              )
        """,
            [revised_at],
        ).fetchall()[0][0]
        gone = ", ".join(f"NULL AS new_{c}" for c in VALUE_COLUMNS)
        n_removed = con.execute(
            f"""
            INSERT INTO _revisions_now
            SELECT o.date, o.symbol, {old}, {gone}, '{PREVIOUS_LOAD}', NULL, '{REMOVED}', NULL,
                   CAST(? AS TIMESTAMP)
            FROM {RAW_TABLE} o SEMI JOIN ({REMOVED_KEYS_SQL}) k USING (date, symbol)
        """,
            [revised_at],
        ).fetchall()[0][0]
    earlier = f"SELECT * FROM {REVISIONS_TABLE} UNION ALL " if table_exists(con, REVISIONS_TABLE) else ""
    columns = [f"{side}_{c}" for side in ("old", "new") for c in VALUE_COLUMNS]
    keys = ", ".join(["date", "symbol", *columns, "old_source_file", "old_source_row"])
    con.execute(f"""
        CREATE OR REPLACE TABLE {REVISIONS_TABLE} AS
        SELECT {keys}, new_source_file, new_source_row, min(revised_at) AS revised_at
        FROM ({earlier}SELECT * FROM _revisions_now)
        GROUP BY ALL
        ORDER BY symbol, date, revised_at, old_source_file, old_source_row
    """)
    con.execute("DROP TABLE _revisions_now")
    return int(n_since), int(n_removed)
