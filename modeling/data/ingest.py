"""Daily OHLCV ingestion into DuckDB with a counted quarantine for bad rows.

Input: CSV or Parquet files (or an in-memory DataFrame: the synthetic market goes through the same
path). Column names match case-insensitively; `ticker` is accepted for `symbol`; dates may be ISO
strings, `YYYYMMDD` integers/strings or typed dates. Values are parsed with TRY_CAST so that one bad
cell quarantines one row instead of failing the whole load, and a CSV line with the wrong number of
fields is quarantined as `malformed_line` (DuckDB's `store_rejects`) instead of aborting the load.

Dates are calendar dates in the market's own time zone. A time-zone-aware timestamp becomes the date
of its wall-clock time in the zone it was written with (the Parquet/Arrow column's zone, the pandas
dtype's zone), never in the machine's zone, so a load gives the same dates on every machine; text with
an offset (`2020-01-02T00:00:00+09:00`) keeps its written date.

Every input row ends in exactly one of two tables, so nothing is lost silently:
- `raw_market_data`: the clean rows, one per (date, symbol), sorted by (symbol, date);
- `raw_market_data_rejects`: the raw text of every bad row with the first `reason` that applies
  (see `REJECT_REASONS`), its source file and its data-row number in that file (1 = the first row
  after the header, malformed lines counted), and for a malformed CSV line the whole line (`raw_line`)
  and the parser's message (`detail`).

Both tables are replaced inside one transaction: a load that fails leaves the previous good tables in
place, and loading the same files twice gives the same tables (idempotent).
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import pandas as pd

from modeling.data.parquet_io import sql_string

REQUIRED_COLUMNS = ("date", "symbol", "open", "high", "low", "close", "volume")
OPTIONAL_COLUMNS = ("sector",)
COLUMN_ALIASES = {"ticker": "symbol"}
SUPPORTED_SUFFIXES = (".csv", ".csv.gz", ".parquet", ".pq")
IGNORED_PREFIXES = (".", "_")  # hidden files and writer markers such as Spark's `_SUCCESS`

# The order is the order of precedence: a row gets the first reason that applies.
REJECT_REASONS = (
    "malformed_line",  # a CSV line with too many or too few fields (or bad quoting/encoding)
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
    """A file, or every supported file directly inside a directory, in sorted order.

    Other entries of a directory are not read; `skipped_entries` names them so that the caller can
    report them (the `raw_market_data` asset logs them and puts them in its metadata).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"market data path does not exist: {path}")
    if path.is_file():
        if not _is_supported(path):
            raise ValueError(f"unsupported file type {path.name}: expected one of {SUPPORTED_SUFFIXES}")
        return [path]
    files = sorted(p for p in path.iterdir() if p.is_file() and _is_supported(p))
    if not files:
        raise FileNotFoundError(f"no CSV or Parquet files ({', '.join(SUPPORTED_SUFFIXES)}) in {path}")
    return files


def skipped_entries(path: str | Path) -> list[str]:
    """Entries of a market-data directory that `discover_files` does not read (subdirectories end in /).

    Hidden files and `_`-prefixed writer markers (Spark's `_SUCCESS`) are not listed.
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        return []
    return sorted(
        p.name + ("/" if p.is_dir() else "")
        for p in path.iterdir()
        if not p.name.startswith(IGNORED_PREFIXES) and not (p.is_file() and _is_supported(p))
    )


def _is_supported(path: Path) -> bool:
    return path.name.lower().endswith(SUPPORTED_SUFFIXES)


def _is_csv(source: Path | str) -> bool:
    return isinstance(source, Path) and not source.name.lower().endswith((".parquet", ".pq"))


def _scan_sql(source: Path | str, rejects: str | None = None) -> str:
    """A relation over one source; CSV cells stay text so that bad cells can be quarantined.

    With `rejects`, malformed CSV lines are skipped by the scan and recorded in the temp tables
    `{rejects}_errors` / `{rejects}_scans` (DuckDB's store_rejects) so they can be quarantined too.
    """
    if isinstance(source, str):  # a registered view (in-memory DataFrame)
        return source
    if not _is_csv(source):
        return f"read_parquet({sql_string(str(source))})"
    store = (
        f", store_rejects = true, rejects_table = '{rejects}_errors', rejects_scan = '{rejects}_scans'"
        if rejects
        else ""
    )
    return f"read_csv({sql_string(str(source))}, header = true, all_varchar = true{store})"


def _resolve_columns(con: duckdb.DuckDBPyConnection, scan: str, label: str) -> dict[str, tuple[str, str]]:
    """Map canonical column name -> (source column name, DuckDB type), or raise MissingColumnsError."""
    described = con.execute(f"DESCRIBE SELECT * FROM {scan}").fetchall()
    found: dict[str, tuple[str, str]] = {}
    for name, dtype, *_ in described:
        canonical = COLUMN_ALIASES.get(name.strip().lower(), name.strip().lower())
        if canonical in found:
            raise ValueError(
                f"{label}: column {name!r} duplicates {found[canonical][0]!r} (as {canonical!r})"
            )
        found[canonical] = (name, dtype)
    missing = [c for c in REQUIRED_COLUMNS if c not in found]
    if missing:
        raise MissingColumnsError(
            f"{label}: missing required column(s) {missing}. Found columns {[d[0] for d in described]}; "
            f"expected {list(REQUIRED_COLUMNS)} (case-insensitive, 'ticker' accepted for 'symbol'), "
            f"optional {list(OPTIONAL_COLUMNS)}."
        )
    return found


def _date_expr(column: str, dtype: str, zone: str | None) -> str:
    """Typed dates cast directly; text and integers accept ISO forms first, then YYYYMMDD.

    A TIMESTAMP WITH TIME ZONE is an instant: its date is taken in `zone` (the zone the source was
    written with; UTC when the source does not say), not in the session's (machine's) zone.
    """
    if dtype.upper().startswith("TIMESTAMP WITH TIME ZONE"):
        offset = re.fullmatch(r"([+-])(\d{2}):?(\d{2})", zone or "")
        if offset:  # a fixed offset such as "+09:00" (not a zone name DuckDB knows)
            minutes = (1 if offset[1] == "+" else -1) * (int(offset[2]) * 60 + int(offset[3]))
            return f"CAST(timezone('UTC', {column}) + INTERVAL ({minutes}) MINUTE AS DATE)"
        return f"CAST(timezone({sql_string(zone or 'UTC')}, {column}) AS DATE)"
    if dtype.upper().startswith(("DATE", "TIMESTAMP")):
        return f"CAST({column} AS DATE)"
    text = f"trim(CAST({column} AS VARCHAR))"
    return f"COALESCE(TRY_CAST({text} AS DATE), TRY_CAST(TRY_STRPTIME({text}, '%Y%m%d') AS DATE))"


def _parquet_time_zone(source: Path | str, column: str) -> str | None:
    """The time zone stored with a Parquet timestamp column (Arrow schema), if any."""
    if isinstance(source, str) or _is_csv(source):
        return None
    import pyarrow.parquet as pq

    schema = pq.read_schema(source)
    idx = schema.get_field_index(column)
    return getattr(schema.field(idx).type, "tz", None) if idx >= 0 else None


def _naive_local_dates(frame: pd.DataFrame) -> pd.DataFrame:
    """Time-zone-aware datetime columns as naive wall-clock times in their own zone."""
    aware = [c for c in frame.columns if isinstance(frame[c].dtype, pd.DatetimeTZDtype)]
    return frame.assign(**{c: frame[c].dt.tz_localize(None) for c in aware}) if aware else frame


def _normalised_select(
    con: duckdb.DuckDBPyConnection, source: Path | str, label: str, source_idx: int, rejects: str | None
) -> str:
    # the same reader options as the scan (store_rejects also makes the sniffer robust to a bad line)
    cols = _resolve_columns(con, _scan_sql(source, f"{rejects}_sniff" if rejects else None), label)
    scan = _scan_sql(source, rejects)

    def q(canonical: str) -> str:
        return '"' + cols[canonical][0].replace('"', '""') + '"'

    sector = (
        f"NULLIF(trim(CAST({q('sector')} AS VARCHAR)), '')" if "sector" in cols else "CAST(NULL AS VARCHAR)"
    )
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
            {source_idx} AS source_idx,
            {sql_string(label)} AS source_file,
            row_number() OVER () AS source_row,
            {_date_expr(q("date"), cols["date"][1], _parquet_time_zone(source, cols["date"][0]))} AS date,
            NULLIF(upper(trim(CAST({q("symbol")} AS VARCHAR))), '') AS symbol,
            {parsed["open"]} AS open, {parsed["high"]} AS high, {parsed["low"]} AS low,
            {parsed["close"]} AS close, {parsed["volume"]} AS volume,
            {sector} AS sector,
            {raw_date} AS raw_date, CAST({q("symbol")} AS VARCHAR) AS raw_symbol,
            {raw["open"]} AS raw_open, {raw["high"]} AS raw_high, {raw["low"]} AS raw_low,
            {raw["close"]} AS raw_close, {raw["volume"]} AS raw_volume,
            CAST(NULL AS VARCHAR) AS raw_line, CAST(NULL AS VARCHAR) AS detail
        FROM {scan}
    """


_NUMERIC_TYPES = (
    "DOUBLE",
    "FLOAT",
    "REAL",
    "BIGINT",
    "INTEGER",
    "SMALLINT",
    "TINYINT",
    "HUGEINT",
    "UBIGINT",
    "UINTEGER",
    "USMALLINT",
    "UTINYINT",
    "DECIMAL",
)


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


class EmptyInputError(ValueError):
    """The input yields no data rows (a header-only file) or no clean row at all."""


def ingest_market_data(
    con: duckdb.DuckDBPyConnection,
    sources: list[Path] | None = None,
    frame: pd.DataFrame | None = None,
) -> IngestReport:
    """Load `sources` (files) or `frame` (an in-memory OHLCV table) into the two tables, atomically."""
    if (sources is None) == (frame is None):
        raise ValueError("give exactly one of `sources` (files) or `frame` (a DataFrame)")
    if sources is not None and not sources:
        raise ValueError("no sources given: pass at least one CSV or Parquet file")
    tag = f"_ingest_{uuid.uuid4().hex[:12]}"  # names of this load's temp tables
    labelled: list[tuple[Path | str, str]]
    if frame is not None:
        labelled = [(f"{tag}_frame", "<synthetic>")]
        con.register(f"{tag}_frame", _naive_local_dates(frame))
    else:
        labelled = [(Path(p), str(p)) for p in sources]
    rejects = {i: f"{tag}_csv{i}" for i, (src, _) in enumerate(labelled) if _is_csv(src)}
    try:
        # raises (e.g. MissingColumnsError) before any write
        selects = [
            _normalised_select(con, src, label, i, rejects.get(i)) for i, (src, label) in enumerate(labelled)
        ]
        union = "\nUNION ALL\n".join(selects)
        con.execute("BEGIN TRANSACTION")
        try:
            con.execute(
                f"CREATE OR REPLACE TEMP TABLE _staged AS SELECT *, {_ROW_REASON_SQL} AS reason FROM ({union})"
            )
            for i, name in rejects.items():
                _quarantine_malformed_lines(con, i, labelled[i][1], f"{name}_errors")
            n_staged, n_clean = con.execute(
                "SELECT count(*), count(*) FILTER (WHERE reason IS NULL) FROM _staged"
            ).fetchall()[0]
            if n_staged == 0:
                # a header-only file (or files): replacing good tables with empty ones would be silent loss
                raise EmptyInputError(
                    f"no data rows in {', '.join(label for _, label in labelled)}: the input has a header "
                    "but no rows; the previous tables are kept"
                )
            if n_clean == 0:
                raise EmptyInputError(
                    f"all {n_staged} rows of the input were rejected; the previous tables are kept "
                    "(see the reasons by ingesting the file into an empty DATA_DIR)"
                )
            _mark_duplicates(con)
            con.execute(f"""
                CREATE OR REPLACE TABLE {RAW_TABLE} AS
                SELECT date, symbol, open, high, low, close, volume, sector
                FROM _staged WHERE reason IS NULL
                ORDER BY symbol, date
            """)
            con.execute(f"""
                CREATE OR REPLACE TABLE {REJECTS_TABLE} AS
                SELECT source_file, source_row, reason, coalesce(raw_date, CAST(date AS VARCHAR)) AS date,
                       raw_symbol AS symbol,
                       coalesce(raw_open, CAST(open AS VARCHAR)) AS open,
                       coalesce(raw_high, CAST(high AS VARCHAR)) AS high,
                       coalesce(raw_low, CAST(low AS VARCHAR)) AS low,
                       coalesce(raw_close, CAST(close AS VARCHAR)) AS close,
                       coalesce(raw_volume, CAST(volume AS VARCHAR)) AS volume,
                       sector, raw_line, detail
                FROM _staged WHERE reason IS NOT NULL
                ORDER BY source_idx, source_row
            """)
            n_read = con.execute("SELECT count(*) FROM _staged").fetchall()[0][0]
            by_reason = dict(
                con.execute(
                    "SELECT reason, count(*) FROM _staged WHERE reason IS NOT NULL GROUP BY reason"
                ).fetchall()
            )
            con.execute("DROP TABLE _staged")
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
    finally:
        if frame is not None:
            con.unregister(f"{tag}_frame")
        for name in rejects.values():
            for suffix in ("_errors", "_scans", "_sniff_errors", "_sniff_scans"):
                con.execute(f"DROP TABLE IF EXISTS {name}{suffix}")
    n_rejected = sum(by_reason.values())
    return IngestReport(
        n_sources=len(labelled),
        n_read=n_read,
        n_accepted=n_read - n_rejected,
        n_rejected=n_rejected,
        rejects_by_reason={r: int(by_reason.get(r, 0)) for r in REJECT_REASONS},
    )


def _quarantine_malformed_lines(
    con: duckdb.DuckDBPyConnection, source_idx: int, label: str, errors_table: str
) -> None:
    """Add the CSV lines the scan skipped (DuckDB store_rejects) to `_staged` as `malformed_line`.

    The scan numbered only the lines it parsed, so the parsed rows after a skipped line are renumbered
    to their data-row number in the file: with skipped data rows d_1 < d_2 < ... (file line - 1, the
    header being line 1), parsed row k sits at k + #{i : d_i - i < k}.
    """
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE _malformed AS
        SELECT line - 1 AS source_row, row_number() OVER (ORDER BY line) AS nth,
               raw_line, detail
        FROM (SELECT line, first(csv_line ORDER BY column_idx) AS raw_line,
                     string_agg(error_message, '; ' ORDER BY column_idx) AS detail
              FROM {errors_table} GROUP BY line)
    """)
    if not con.execute("SELECT count(*) FROM _malformed").fetchall()[0][0]:  # the usual case: skip the
        con.execute("DROP TABLE _malformed")  # renumbering pass over every row of the source
        return
    con.execute(f"""
        UPDATE _staged AS s SET source_row = s.source_row + m.n_before
        FROM (
            SELECT p.source_row AS k, t.n_before
            FROM (SELECT source_row FROM _staged WHERE source_idx = {source_idx}) p
            ASOF JOIN (SELECT source_row - nth AS t, max(nth) AS n_before FROM _malformed GROUP BY 1) t
                ON p.source_row > t.t
        ) AS m
        WHERE s.source_idx = {source_idx} AND s.source_row = m.k
    """)
    con.execute(f"""
        INSERT INTO _staged (source_idx, source_file, source_row, raw_line, detail, reason)
        SELECT {source_idx}, {sql_string(label)}, source_row, raw_line, detail, 'malformed_line' FROM _malformed
    """)
    con.execute("DROP TABLE _malformed")


def _mark_duplicates(con: duckdb.DuckDBPyConnection) -> None:
    """Duplicates among rows of `_staged` that are otherwise valid.

    Identical copies keep the first (by source, row); copies that disagree are all rejected because we
    cannot tell which one is right. Two steps: the duplicated keys are few, so versions are only
    counted for them.
    """
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
            SELECT s2.source_idx, s2.source_row, d2.n_versions,
                   row_number() OVER (PARTITION BY s2.date, s2.symbol
                                      ORDER BY s2.source_idx, s2.source_row) AS copy_no
            FROM _staged s2 JOIN _dupes d2 USING (date, symbol)
            WHERE s2.reason IS NULL
        ) AS d
        WHERE s.source_idx = d.source_idx AND s.source_row = d.source_row
          AND (d.n_versions > 1 OR d.copy_no > 1)
    """)
    con.execute("DROP TABLE _dupes")
