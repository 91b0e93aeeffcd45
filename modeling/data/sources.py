"""Reading market-data sources: which files a path names (literal names, hidden and office lock files
skipped), the columns each provides (aliases, required and optional), and one normalised SELECT per
source that parses dates (time zones resolved to the exchange's local date) and numbers, keeping the raw
text of every field so that a rejected row can be quarantined as it was read. `modeling.data.ingest`
loads what these SELECTs return."""

from __future__ import annotations

import re
from pathlib import Path

import duckdb
import pandas as pd

from modeling.data.parquet_io import sql_string

REQUIRED_COLUMNS = ("date", "symbol", "open", "high", "low", "close", "volume")


OPTIONAL_COLUMNS = ("sector",)


COLUMN_ALIASES = {"ticker": "symbol"}


SUPPORTED_SUFFIXES = (".csv", ".csv.gz", ".parquet", ".pq")
# Not read from a directory (but listed by `skipped_entries`): hidden files, which include macOS
# AppleDouble files (`._x.csv`), and office lock files (`~$x.csv`).


SKIPPED_PREFIXES = (".", "~$")


class MissingColumnsError(ValueError):
    """A source lacks required columns; the message names what it found and what it expected."""


def discover_files(path: str | Path) -> list[Path]:
    """A file, or every supported file directly inside a directory, in sorted order.

    In a directory, hidden files (including AppleDouble `._x.csv`) and office lock files (`~$x.csv`)
    are not read; a file named explicitly is read whatever its name. Every entry of a directory that is
    not read is named by `skipped_entries` so that the caller can report it (the `raw_market_data`
    asset logs them and puts them in its metadata). Which copy of a row wins is decided by
    `ingest_market_data` (newest file), not by this order.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"market data path does not exist: {path}")
    if path.is_file():
        if not _is_supported(path):
            raise ValueError(f"unsupported file type {path.name}: expected one of {SUPPORTED_SUFFIXES}")
        return [path]
    files = sorted(p for p in path.iterdir() if _is_data_file(p))
    if not files:
        raise FileNotFoundError(f"no CSV or Parquet files ({', '.join(SUPPORTED_SUFFIXES)}) in {path}")
    return files


def skipped_entries(path: str | Path) -> list[str]:
    """Every entry of a market-data directory that `discover_files` does not read (directories end in /).

    All of them are listed: other file types, subdirectories, hidden, AppleDouble and lock files, and
    writer markers such as Spark's `_SUCCESS`.
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        return []
    return sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir() if not _is_data_file(p))


def _is_data_file(path: Path) -> bool:
    return path.is_file() and _is_supported(path) and not path.name.startswith(SKIPPED_PREFIXES)


def _is_supported(path: Path) -> bool:
    return path.name.lower().endswith(SUPPORTED_SUFFIXES)


def _is_csv(source: Path | str) -> bool:
    return isinstance(source, Path) and not source.name.lower().endswith((".parquet", ".pq"))


def _literal_path(path: Path) -> str:
    """`path` as a DuckDB file pattern that matches only itself.

    read_csv/read_parquet expand `*`, `?` and `[...]` as a glob, so `prices[1].csv` would read
    `prices1.csv`. Each such character is put in a bracket class of its own (`[[]`), which DuckDB's glob
    matches literally; a path without them is passed as it is (no directory listing).
    """
    return re.sub(r"[*?\[]", lambda m: f"[{m[0]}]", str(path))


def _scan_sql(source: Path | str, rejects: str | None = None) -> str:
    """A relation over one source; CSV cells stay text so that bad cells can be quarantined.

    With `rejects`, malformed CSV lines are skipped by the scan and recorded in the temp tables
    `{rejects}_errors` / `{rejects}_scans` (DuckDB's store_rejects) so they can be quarantined too.
    """
    if isinstance(source, str):  # a registered view (in-memory DataFrame)
        return source
    if not _is_csv(source):
        return f"read_parquet({sql_string(_literal_path(source))})"
    store = (
        f", store_rejects = true, rejects_table = '{rejects}_errors', rejects_scan = '{rejects}_scans'"
        if rejects
        else ""
    )
    return f"read_csv({sql_string(_literal_path(source))}, header = true, all_varchar = true{store})"


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
    con: duckdb.DuckDBPyConnection,
    source: Path | str,
    label: str,
    source_idx: int,
    source_rank: int,
    rejects: str | None,
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
            {source_rank} AS source_rank,
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
