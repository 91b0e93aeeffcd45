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

Every input row ends in exactly one of three tables, so nothing is lost silently:
- `raw_market_data`: the clean rows, one per (date, symbol), sorted by (symbol, date);
- `raw_market_data_rejects`: the raw text of every bad row with the first `reason` that applies
  (see `REJECT_REASONS`), its source file and its data-row number in that file (1 = the first row
  after the header, malformed lines counted), and for a malformed CSV line the whole line (`raw_line`)
  and the parser's message (`detail`);
- `raw_market_data_revisions`: every row replaced by a revised copy from a newer file (see below),
  with its old and new values and the file and row of each, and every value that changed since the
  previous load with no old copy left in a file (`modeling.data.revisions`); kept across loads.

Revised data (files are "newest wins"): the files are ranked by modification time, then by name
(then by full path and by position in the list, so the order is total); a later file is newer. For a
(date, symbol) with several valid copies, the first copy in the newest file that has one is kept.
Older copies that differ from it are revisions (a vendor's correction, a daily file re-sending
yesterday with final volumes): they leave `raw_market_data` for `raw_market_data_revisions`, not for
the rejects. Copies identical to the kept one are `duplicate_date_symbol`. When the newest file itself
holds copies that disagree, nothing says which is right: every copy of that (date, symbol) is rejected
as `conflicting_duplicate`. An in-memory frame is one source, so it has no revisions.

Calendar: a date on which almost nobody trades is not a market date. A date is off-calendar when its
number of symbols (rows with a date and a symbol, rejected or not) is below `min_calendar_share` of
the median count over the `CALENDAR_WINDOW` market dates before it and below that share of the median
over the ones after it (one side is enough at the ends of the data; a date with no neighbour is never
off-calendar). Requiring both sides keeps a universe that grows or shrinks in one step, and the first
and last dates, on the calendar; days where every symbol skips have no rows at all. The remaining
clean rows of an off-calendar date are rejected as `off_calendar_date`. A mix of markets with
different holidays may need `min_calendar_share=0` (off).

File names are literal: a name with glob characters (`prices[1].csv`) is read as that one file.

The three tables are replaced inside one transaction: a load that fails leaves the previous good tables
in place, and loading the same files twice gives the same tables (idempotent; a revision already in the
audit is not added again, and `revised_at` is the time of the load that first saw it). A load that
would remove more than `max_shrink_share` of the symbol-days (distinct (date, symbol)) of
`raw_market_data` fails with `ShrinkingLoadError` and keeps the previous tables: a file that went missing
or a truncated re-send must not delete history silently, even when new dates arrive in the same load.
Smaller removals are allowed, each one audited in `raw_market_data_revisions` (new source `REMOVED`)
and counted in `IngestReport.n_removed`.
"""

from __future__ import annotations

import datetime
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import pandas as pd

from modeling.data.parquet_io import sql_string
from modeling.data.revisions import (  # noqa: F401 (RAW_TABLE, REVISIONS_TABLE, PREVIOUS_LOAD re-exported)
    PREVIOUS_LOAD,
    RAW_TABLE,
    REVISIONS_TABLE,
    write_revisions,
)
from modeling.data.sources import (  # noqa: F401 (re-exported: what readers of the market data use)
    COLUMN_ALIASES,
    OPTIONAL_COLUMNS,
    REQUIRED_COLUMNS,
    SKIPPED_PREFIXES,
    SUPPORTED_SUFFIXES,
    MissingColumnsError,
    _is_csv,
    _naive_local_dates,
    _normalised_select,
    discover_files,
    skipped_entries,
)
from modeling.data.tables import table_exists

CALENDAR_WINDOW = 5  # market dates on each side of a date that the calendar test compares it with

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
    "conflicting_duplicate",  # copies of a (date, symbol) that disagree in its newest file: all rejected
    "off_calendar_date",  # a clean row on a date when almost no symbol trades (see the module docstring)
)

REJECTS_TABLE = "raw_market_data_rejects"
_REVISED = "revised"  # the internal mark of a replaced row in `_staged`: not a reject
_REMOVED = "removed"  # the count of the previous load's symbol-days this load drops (not a reason)


class ShrinkingLoadError(ValueError):
    """A load would drop more than `max_shrink_share` of the symbol-days of the existing table."""


@dataclass(frozen=True)
class IngestReport:
    n_sources: int
    n_read: int
    n_accepted: int
    n_rejected: int
    rejects_by_reason: dict[str, int] = field(default_factory=dict)
    n_revised: int = 0  # older copies replaced by a newer file's (in `raw_market_data_revisions`)
    n_removed: int = 0  # symbol-days of the previous load this one dropped (audited as `REMOVED` revisions)

    @property
    def reject_share(self) -> float:
        return self.n_rejected / self.n_read if self.n_read else 0.0


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
    *,
    max_shrink_share: float = 0.01,
    min_calendar_share: float = 0.2,
) -> IngestReport:
    """Load `sources` (files) or `frame` (an in-memory OHLCV table) into the three tables, atomically.

    `max_shrink_share`: the largest share of the existing table's symbol-days that a load may drop
    (1.0 allows any load). `min_calendar_share`: a date with fewer symbols than this share of its
    neighbouring dates' median is off-calendar (0 turns the test off). See the module docstring.
    """
    _check_arguments(sources, frame, max_shrink_share, min_calendar_share)
    tag = f"_ingest_{uuid.uuid4().hex[:12]}"  # names of this load's temp tables
    labelled: list[tuple[Path | str, str]]
    if frame is not None:
        labelled = [(f"{tag}_frame", "<synthetic>")]
        con.register(f"{tag}_frame", _naive_local_dates(frame))
    else:
        labelled = [(Path(p), str(p)) for p in sources]
    rejects = {i: f"{tag}_csv{i}" for i, (src, _) in enumerate(labelled) if _is_csv(src)}
    revised_at = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)  # UTC
    try:
        # raises (e.g. MissingColumnsError, FileNotFoundError) before any write
        ranks = _source_ranks([src for src, _ in labelled])
        selects = [
            _normalised_select(con, src, label, i, ranks[i], rejects.get(i))
            for i, (src, label) in enumerate(labelled)
        ]
        union = "\nUNION ALL\n".join(selects)
        n_staged, n_clean, by_reason = _stage_and_write(
            con, union, labelled, rejects, min_calendar_share, max_shrink_share, revised_at
        )
    finally:
        if frame is not None:
            con.unregister(f"{tag}_frame")
        for name in rejects.values():
            for suffix in ("_errors", "_scans", "_sniff_errors", "_sniff_scans"):
                con.execute(f"DROP TABLE IF EXISTS {name}{suffix}")
    n_revised = int(by_reason.pop(_REVISED, 0))
    n_removed = int(by_reason.pop(_REMOVED, 0))
    n_rejected = sum(by_reason.values())
    return IngestReport(
        n_sources=len(labelled),
        n_read=n_staged,
        n_accepted=n_clean,
        n_rejected=n_rejected,
        rejects_by_reason={r: int(by_reason.get(r, 0)) for r in REJECT_REASONS},
        n_revised=n_revised,
        n_removed=n_removed,
    )


def _check_arguments(
    sources: list[Path] | None, frame: pd.DataFrame | None, max_shrink_share: float, min_calendar_share: float
) -> None:
    if (sources is None) == (frame is None):
        raise ValueError("give exactly one of `sources` (files) or `frame` (a DataFrame)")
    if sources is not None and not sources:
        raise ValueError("no sources given: pass at least one CSV or Parquet file")
    if not 0.0 <= max_shrink_share <= 1.0:
        raise ValueError(f"max_shrink_share must be in [0, 1], got {max_shrink_share}")
    if not 0.0 <= min_calendar_share <= 1.0:
        raise ValueError(f"min_calendar_share must be in [0, 1], got {min_calendar_share}")


def _stage_and_write(
    con: duckdb.DuckDBPyConnection,
    union: str,
    labelled: list[tuple[Path | str, str]],
    rejects: dict[int, str],
    min_calendar_share: float,
    max_shrink_share: float,
    revised_at: datetime.datetime,
) -> tuple[int, int, dict[str, int]]:
    """In one transaction (rolled back on any error): stage the normalised rows of every source with
    their first reject reason, resolve duplicates, revisions and off-calendar dates, check the shrink
    guard and replace the three tables. Returns (rows read, clean rows, rows by reason)."""
    con.execute("BEGIN TRANSACTION")
    try:
        con.execute(
            f"CREATE OR REPLACE TEMP TABLE _staged AS SELECT *, {_ROW_REASON_SQL} AS reason FROM ({union})"
        )
        for i, name in rejects.items():
            _quarantine_malformed_lines(con, i, labelled[i][1], f"{name}_errors")
        n_staged = con.execute("SELECT count(*) FROM _staged").fetchall()[0][0]
        if n_staged == 0:
            # a header-only file (or files): replacing good tables with empty ones would be silent loss
            raise EmptyInputError(
                f"no data rows in {', '.join(label for _, label in labelled)}: the input has a header "
                "but no rows; the previous tables are kept"
            )
        _mark_duplicates(con)
        _mark_off_calendar(con, min_calendar_share)
        # counted after duplicates, revisions and the calendar are resolved: what the table would hold
        n_clean = con.execute("SELECT count(*) FROM _staged WHERE reason IS NULL").fetchall()[0][0]
        if n_clean == 0:
            raise EmptyInputError(
                f"all {n_staged} rows of the input were rejected or replaced; the previous tables are "
                "kept (see the reasons by ingesting the file into an empty DATA_DIR)"
            )
        n_old = _symbol_days(con)
        n_since, n_removed = _write_tables(con, revised_at)
        _check_shrink(n_old, n_removed, max_shrink_share)  # raising rolls the writes back
        by_reason = dict(
            con.execute(
                "SELECT reason, count(*) FROM _staged WHERE reason IS NOT NULL GROUP BY reason"
            ).fetchall()
        )
        by_reason[_REVISED] = by_reason.get(_REVISED, 0) + n_since
        by_reason[_REMOVED] = n_removed
        con.execute("DROP TABLE _revised")
        con.execute("DROP TABLE _staged")
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    return n_staged, n_clean, by_reason


def _write_tables(con: duckdb.DuckDBPyConnection, revised_at: datetime.datetime) -> tuple[int, int]:
    """Extend the revisions audit (`modeling.data.revisions`), then replace the clean rows and the rejects
    from the resolved `_staged` rows (inside the caller's transaction); returns the revisions against
    the previous load and its symbol-days removed."""
    n_since, n_removed = write_revisions(con, revised_at)
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
        FROM _staged WHERE reason IS NOT NULL AND reason <> '{_REVISED}'
        ORDER BY source_idx, source_row
    """)
    return n_since, n_removed


def _source_ranks(sources: list[Path | str]) -> list[int]:
    """The rank of each source from oldest (0) to newest: by mtime, then name, path and list position."""
    keys = [
        (0, "", "", i) if isinstance(src, str) else (src.stat().st_mtime_ns, src.name, str(src), i)
        for i, src in enumerate(sources)
    ]
    ranks = [0] * len(keys)
    for rank, i in enumerate(sorted(range(len(keys)), key=keys.__getitem__)):
        ranks[i] = rank
    return ranks


def _mark_off_calendar(con: duckdb.DuckDBPyConnection, min_share: float) -> None:
    """Reject the clean rows of dates with far fewer symbols than the market dates on both sides."""
    if min_share <= 0:
        return
    con.execute(
        f"""
        CREATE OR REPLACE TEMP TABLE _off_calendar AS
        WITH per_date AS (
            SELECT date, count(DISTINCT symbol) AS n
            FROM _staged WHERE date IS NOT NULL AND symbol IS NOT NULL GROUP BY date
        ), around AS (
            SELECT date, n,
                   median(n) OVER (ORDER BY date ROWS BETWEEN {CALENDAR_WINDOW} PRECEDING AND 1 PRECEDING)
                       AS before,
                   median(n) OVER (ORDER BY date ROWS BETWEEN 1 FOLLOWING AND {CALENDAR_WINDOW} FOLLOWING)
                       AS after
            FROM per_date
        )
        SELECT date FROM around
        WHERE n < ? * least(coalesce(before, after), coalesce(after, before))
    """,
        [min_share],
    )
    if con.execute("SELECT count(*) FROM _off_calendar").fetchall()[0][0]:
        con.execute("""
            UPDATE _staged SET reason = 'off_calendar_date'
            WHERE reason IS NULL AND date IN (SELECT date FROM _off_calendar)
        """)
    con.execute("DROP TABLE _off_calendar")


def _symbol_days(con: duckdb.DuckDBPyConnection) -> int:
    """The distinct (date, symbol) keys of the existing clean table (0 before the first load)."""
    if not table_exists(con, RAW_TABLE):
        return 0
    keys = f"SELECT DISTINCT date, symbol FROM {RAW_TABLE}"
    return con.execute(f"SELECT count(*) FROM ({keys})").fetchall()[0][0]


def _check_shrink(n_old: int, n_removed: int, max_shrink_share: float) -> None:
    """Raise ShrinkingLoadError when the load removed too many of the existing table's `n_old` symbol-days.
    Counted as the old (date, symbol) keys the load no longer holds (`n_removed`, from the revisions
    audit), not as a difference of row counts: new dates must not hide lost history (a missing old file
    while a new one arrives)."""
    if n_old and n_removed > max_shrink_share * n_old:
        raise ShrinkingLoadError(
            f"this load would remove {n_removed} of the {n_old} symbol-days of {RAW_TABLE} "
            f"({n_removed / n_old:.2%}, more than max_shrink_share = {max_shrink_share:.2%}); the previous "
            "tables are kept. A file may be missing or truncated; if the smaller input is intended, raise "
            "max_shrink_share (the raw_market_data config) for this load."
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
        SELECT {source_idx}, {sql_string(label)}, source_row, raw_line, detail, 'malformed_line'
        FROM _malformed
    """)
    con.execute("DROP TABLE _malformed")


def _mark_duplicates(con: duckdb.DuckDBPyConnection) -> None:
    """Resolve the (date, symbol) keys with several otherwise valid rows in `_staged`.

    Per key, the newest file (highest `source_rank`) with a copy decides: if its copies disagree, every
    copy of the key is `conflicting_duplicate`; otherwise its first copy is kept, copies identical to
    it are `duplicate_date_symbol` and older copies that differ are marked revised and listed in the
    temp table `_revised` with the row that replaces them. Duplicated keys are few, so versions are
    only compared for them.
    """
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE _copies AS
        WITH keys AS (
            SELECT date, symbol FROM _staged WHERE reason IS NULL GROUP BY date, symbol HAVING count(*) > 1
        ), copies AS (
            SELECT s.source_idx, s.source_row, s.source_rank, s.date, s.symbol,
                   (s.open, s.high, s.low, s.close, s.volume, coalesce(s.sector, '')) AS version
            FROM _staged s JOIN keys k ON s.date = k.date AND s.symbol = k.symbol
            WHERE s.reason IS NULL
        ), newest AS (
            SELECT *, row_number() OVER (PARTITION BY date, symbol ORDER BY source_row) AS copy_no
            FROM (
                SELECT * FROM copies
                QUALIFY source_rank = max(source_rank) OVER (PARTITION BY date, symbol)
            )
        ), winners AS (
            SELECT date, symbol, count(DISTINCT version) AS n_versions,
                   any_value(source_idx) FILTER (WHERE copy_no = 1) AS new_source_idx,
                   any_value(source_row) FILTER (WHERE copy_no = 1) AS new_source_row,
                   any_value(version) FILTER (WHERE copy_no = 1) AS new_version
            FROM newest GROUP BY date, symbol
        )
        SELECT c.source_idx, c.source_row, w.new_source_idx, w.new_source_row,
               CASE WHEN w.n_versions > 1 THEN 'conflicting_duplicate'
                    WHEN c.version = w.new_version THEN 'duplicate_date_symbol'
                    ELSE '{_REVISED}' END AS reason
        FROM copies c JOIN winners w ON c.date = w.date AND c.symbol = w.symbol
        WHERE w.n_versions > 1 OR c.source_idx <> w.new_source_idx OR c.source_row <> w.new_source_row
    """)
    con.execute("""
        UPDATE _staged AS s SET reason = c.reason
        FROM _copies c WHERE s.source_idx = c.source_idx AND s.source_row = c.source_row
    """)
    con.execute(f"""
        CREATE OR REPLACE TEMP TABLE _revised AS
        SELECT source_idx, source_row, new_source_idx, new_source_row FROM _copies WHERE reason = '{_REVISED}'
    """)
    con.execute("DROP TABLE _copies")
