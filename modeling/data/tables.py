"""Questions to the DuckDB warehouse about its tables, asked the same way by every writer."""

from __future__ import annotations

import duckdb


def table_exists(con: duckdb.DuckDBPyConnection, name: str) -> bool:
    """Whether the warehouse holds table `name` (a permanent one, in the current schema)."""
    query = (
        "SELECT count(*) FROM duckdb_tables() WHERE table_name = ? AND NOT temporary "
        "AND schema_name = current_schema() AND database_name = current_database()"
    )
    return bool(con.execute(query, [name]).fetchall()[0][0])
