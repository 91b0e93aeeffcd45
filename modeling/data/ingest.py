"""Daily OHLCV ingestion into DuckDB with a counted quarantine for bad rows.

Input: CSV or Parquet files (or an in-memory DataFrame: the synthetic market goes through the same
path). Column names match case-insensitively; `ticker` is accepted for `symbol`; dates may be ISO
strings, `YYYYMMDD` integers/strings or typed dates. Values are parsed with TRY_CAST so that one bad
cell quarantines one row instead of failing the whole load.

Every input row ends in exactly one of two tables, so nothing is lost silently:
- `raw_market_data`: the clean rows, one per (date, symbol), sorted by (symbol, date);
- `raw_market_data_rejects`: the raw text of every bad row with the first `reason` that applies
  (see `REJECT_REASONS`), its source file and its row number in that file.

Both tables are replaced inside one transaction: a load that fails leaves the previous good tables in
place, and loading the same files twice gives the same tables (idempotent).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import pandas as pd

REQUIRED_COLUMNS = ("date", "symbol", "open", "high", "low", "close", "volume")
OPTIONAL_COLUMNS = ("sector",)
COLUMN_ALIASES = {"ticker": "symbol"}
SUPPORTED_SUFFIXES = (".csv", ".csv.gz", ".parquet", ".pq")

# The order is the order of precedence: a row gets the first reason that applies.
REJECT_REASONS = (
    "unparseable_date",
    "missing_symbol",
    "missing_price",  # NULL, unparseable, NaN or infinite open/high/low/close
    "non_positive_price",
    "missing_volume",
    "negative_volume",
    "high_below_open_close",  # high < max(open, close)
    "low_above_open_close",  # low > min(open, close)
    "duplicate_date_symbol",  # an identical extra copy of a (date, symbol) row: one copy is kept
    "conflicting_duplicate",  # copies of a (date, symbol) that disagree: all are rejected
)

RAW_TABLE = "raw_market_data"
REJECTS_TABLE = "raw_market_data_rejects"


class MissingColumnsError(ValueError):
    """A source lacks required columns; the message names what it found and what it expected."""


@dataclass(frozen=True)
class IngestReport:
    n_sources: int
    n_read: int
    n_accepted: int
    n_rejected: int
    rejects_by_reason: dict[str, int] = field(default_factory=dict)

    @property
    def reject_share(self) -> float:
        return self.n_rejected / self.n_read if self.n_read else 0.0


def discover_files(path: str | Path) -> list[Path]:
    """A file, or every supported file directly inside a directory, in sorted order."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"market data path does not exist: {path}")
    if path.is_file():
        files = [path]
    else:
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name.lower().endswith(SUPPORTED_SUFFIXES))
    if not files:
        raise FileNotFoundError(f"no CSV or Parquet files ({', '.join(SUPPORTED_SUFFIXES)}) in {path}")
    unsupported = [p for p in files if not p.name.lower().endswith(SUPPORTED_SUFFIXES)]
    if unsupported:
        raise ValueError(f"unsupported file type {unsupported[0].name}: expected one of {SUPPORTED_SUFFIXES}")
    return files


def _sql_str(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _scan_sql(source: Path | str) -> str:
    """A relation over one source; CSV cells stay text so that bad cells can be quarantined."""
    if isinstance(source, str):  # a registered view (in-memory DataFrame)
        return source
    if source.name.lower().endswith((".parquet", ".pq")):
        return f"read_parquet({_sql_str(str(source))})"
    return f"read_csv({_sql_str(str(source))}, header = true, all_varchar = true)"


def _resolve_columns(con: duckdb.DuckDBPyConnection, scan: str, label: str) -> dict[str, tuple[str, str]]:
    """Map canonical column name -> (source column name, DuckDB type), or raise MissingColumnsError."""
    described = con.execute(f"DESCRIBE SELECT * FROM {scan}").fetchall()
    found: dict[str, tuple[str, str]] = {}
    for name, dtype, *_ in described:
        canonical = COLUMN_ALIASES.get(name.strip().lower(), name.strip().lower())
        if canonical in found:
            raise ValueError(f"{label}: column {name!r} duplicates {found[canonical][0]!r} (as {canonical!r})")
        found[canonical] = (name, dtype)
    missing = [c for c in REQUIRED_COLUMNS if c not in found]
    if missing:
        raise MissingColumnsError(
            f"{label}: missing required column(s) {missing}. Found columns {[d[0] for d in described]}; "
            f"expected {list(REQUIRED_COLUMNS)} (case-insensitive, 'ticker' accepted for 'symbol'), "
            f"optional {list(OPTIONAL_COLUMNS)}."
        )
    return found


def _date_expr(column: str, dtype: str) -> str:
    """Typed dates cast directly; text and integers accept ISO forms first, then YYYYMMDD."""
    if dtype.upper().startswith(("DATE", "TIMESTAMP")):
        return f"CAST({column} AS DATE)"
    text = f"trim(CAST({column} AS VARCHAR))"
    return f"COALESCE(TRY_CAST({text} AS DATE), TRY_CAST(TRY_STRPTIME({text}, '%Y%m%d') AS DATE))"


def _normalised_select(con: duckdb.DuckDBPyConnection, source: Path | str, label: str) -> str:
    scan = _scan_sql(source)
    cols = _resolve_columns(con, scan, label)

    def q(canonical: str) -> str:
        return '"' + cols[canonical][0].replace('"', '""') + '"'

    sector = f"NULLIF(trim(CAST({q('sector')} AS VARCHAR)), '')" if "sector" in cols else "CAST(NULL AS VARCHAR)"
    parsed: dict[str, str] = {}
    raw: dict[str, str] = {}
    for c in ("open", "high", "low", "close", "volume"):
        if _is_numeric(cols[c][1]):
            # Typed column (Parquet): the cast is lossless, so the rejects table can print the parsed
            # value and no text copy is kept for every row.
            parsed[c], raw[c] = f"CAST({q(c)} AS DOUBLE)", "CAST(NULL AS VARCHAR)"
        else:
            raw[c] = f"CAST({q(c)} AS VARCHAR)"
            parsed[c] = f"TRY_CAST(trim({raw[c]}) AS DOUBLE)"
    typed_date = cols["date"][1].upper().startswith(("DATE", "TIMESTAMP"))
    raw_date = "CAST(NULL AS VARCHAR)" if typed_date else f"CAST({q('date')} AS VARCHAR)"
    return f"""
        SELECT
            {_sql_str(label)} AS source_file,
            row_number() OVER () AS source_row,
            {_date_expr(q('date'), cols['date'][1])} AS date,
            NULLIF(upper(trim(CAST({q('symbol')} AS VARCHAR))), '') AS symbol,
            {parsed['open']} AS open, {parsed['high']} AS high, {parsed['low']} AS low,
            {parsed['close']} AS close, {parsed['volume']} AS volume,
            {sector} AS sector,
            {raw_date} AS raw_date, CAST({q('symbol')} AS VARCHAR) AS raw_symbol,
            {raw['open']} AS raw_open, {raw['high']} AS raw_high, {raw['low']} AS raw_low,
            {raw['close']} AS raw_close, {raw['volume']} AS raw_volume
        FROM {scan}
    """


_NUMERIC_TYPES = ("DOUBLE", "FLOAT", "REAL", "BIGINT", "INTEGER", "SMALLINT", "TINYINT", "HUGEINT",
                  "UBIGINT", "UINTEGER", "USMALLINT", "UTINYINT", "DECIMAL")


def _is_numeric(dtype: str) -> bool:
    return dtype.upper().startswith(_NUMERIC_TYPES)


_ROW_REASON_SQL = """
    CASE
        WHEN date IS NULL THEN 'unparseable_date'
        WHEN symbol IS NULL THEN 'missing_symbol'
        WHEN open IS NULL OR high IS NULL OR low IS NULL OR close IS NULL
             OR NOT (isfinite(open) AND isfinite(high) AND isfinite(low) AND isfinite(close))
            THEN 'missing_price'
        WHEN open <= 0 OR high <= 0 OR low <= 0 OR close <= 0 THEN 'non_positive_price'
        WHEN volume IS NULL OR NOT isfinite(volume) THEN 'missing_volume'
        WHEN volume < 0 THEN 'negative_volume'
        WHEN high < greatest(open, close) THEN 'high_below_open_close'
        WHEN low > least(open, close) THEN 'low_above_open_close'
    END
"""


def ingest_market_data(
    con: duckdb.DuckDBPyConnection,
    sources: list[Path] | None = None,
    frame: pd.DataFrame | None = None,
) -> IngestReport:
    """Load `sources` (files) or `frame` (an in-memory OHLCV table) into the two tables, atomically."""
    if (sources is None) == (frame is None):
        raise ValueError("give exactly one of `sources` (files) or `frame` (a DataFrame)")
    if frame is not None:
        con.register("_ingest_frame", frame)
        labelled: list[tuple[Path | str, str]] = [("_ingest_frame", "<synthetic>")]
    else:
        labelled = [(p, str(p)) for p in sources]
    selects = [_normalised_select(con, src, label) for src, label in labelled]  # raises before any write
    union = "\nUNION ALL\n".join(selects)

    con.execute("BEGIN TRANSACTION")
    try:
        con.execute(f"CREATE OR REPLACE TEMP TABLE _staged AS SELECT *, {_ROW_REASON_SQL} AS reason FROM ({union})")
        # Duplicates among rows that are otherwise valid: identical copies keep the first (by file,
        # row), copies that disagree are all rejected because we cannot tell which one is right.
        # Two steps: the duplicated keys are few, so versions are only counted for them.
        con.execute("""
            CREATE OR REPLACE TEMP TABLE _dupes AS
            WITH keys AS (
                SELECT date, symbol FROM _staged WHERE reason IS NULL GROUP BY date, symbol HAVING count(*) > 1
            )
            SELECT s.date, s.symbol,
                   count(DISTINCT (s.open, s.high, s.low, s.close, s.volume, coalesce(s.sector, ''))) AS n_versions
            FROM _staged s JOIN keys k ON s.date = k.date AND s.symbol = k.symbol
            WHERE s.reason IS NULL
            GROUP BY s.date, s.symbol
        """)
        con.execute("""
            UPDATE _staged AS s SET reason = CASE WHEN d.n_versions > 1 THEN 'conflicting_duplicate'
                                                  ELSE 'duplicate_date_symbol' END
            FROM (
                SELECT s2.source_file, s2.source_row, d2.n_versions,
                       row_number() OVER (PARTITION BY s2.date, s2.symbol
                                          ORDER BY s2.source_file, s2.source_row) AS copy_no
                FROM _staged s2 JOIN _dupes d2 USING (date, symbol)
                WHERE s2.reason IS NULL
            ) AS d
            WHERE s.source_file = d.source_file AND s.source_row = d.source_row
              AND (d.n_versions > 1 OR d.copy_no > 1)
        """)
        con.execute(f"""
            CREATE OR REPLACE TABLE {RAW_TABLE} AS
            SELECT date, symbol, open, high, low, close, volume, sector
            FROM _staged WHERE reason IS NULL
            ORDER BY symbol, date
        """)
        con.execute(f"""
            CREATE OR REPLACE TABLE {REJECTS_TABLE} AS
            SELECT source_file, source_row, reason, coalesce(raw_date, CAST(date AS VARCHAR)) AS date, raw_symbol AS symbol,
                   coalesce(raw_open, CAST(open AS VARCHAR)) AS open,
                   coalesce(raw_high, CAST(high AS VARCHAR)) AS high,
                   coalesce(raw_low, CAST(low AS VARCHAR)) AS low,
                   coalesce(raw_close, CAST(close AS VARCHAR)) AS close,
                   coalesce(raw_volume, CAST(volume AS VARCHAR)) AS volume,
                   sector
            FROM _staged WHERE reason IS NOT NULL
            ORDER BY source_file, source_row
        """)
        n_read = con.execute("SELECT count(*) FROM _staged").fetchall()[0][0]
        by_reason = dict(con.execute(
            "SELECT reason, count(*) FROM _staged WHERE reason IS NOT NULL GROUP BY reason"
        ).fetchall())
        con.execute("DROP TABLE _staged")
        con.execute("DROP TABLE _dupes")
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    finally:
        if frame is not None:
            con.unregister("_ingest_frame")
    n_rejected = sum(by_reason.values())
    return IngestReport(
        n_sources=len(labelled),
        n_read=n_read,
        n_accepted=n_read - n_rejected,
        n_rejected=n_rejected,
        rejects_by_reason={r: int(by_reason.get(r, 0)) for r in REJECT_REASONS},
    )
