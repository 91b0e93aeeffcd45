"""Materialisation metadata shared by the assets: row count, date range, symbols, a preview."""

from __future__ import annotations

import base64
from pathlib import Path

import duckdb
import pandas as pd
from dagster import MetadataValue


def relation_metadata(
    con: duckdb.DuckDBPyConnection,
    relation: str,
    preview_rows: int = 8,
    preview_columns: list[str] | None = None,
) -> dict[str, object]:
    """Metadata for a DuckDB table/view or `read_parquet(...)` expression with date and symbol."""
    n, first, last, n_sym = con.execute(
        f"SELECT count(*), min(date), max(date), count(DISTINCT symbol) FROM {relation}"
    ).fetchone()
    cols = ", ".join(preview_columns) if preview_columns else "*"
    preview = con.execute(
        f"SELECT {cols} FROM {relation} ORDER BY date DESC, symbol LIMIT {preview_rows}"
    ).df()
    return {
        "dagster/row_count": MetadataValue.int(int(n)),
        "date_range": MetadataValue.text(f"{first} .. {last}"),
        "symbol_count": MetadataValue.int(int(n_sym)),
        "preview": MetadataValue.md(frame_markdown(preview)),
    }


def frame_markdown(frame: pd.DataFrame, float_digits: int = 5) -> str:
    return frame.to_markdown(index=False, floatfmt=f".{float_digits}g")


def png_markdown(path: Path, alt: str) -> MetadataValue:
    """A PNG embedded in markdown metadata (the Dagster UI shows it inline)."""
    encoded = base64.b64encode(Path(path).read_bytes()).decode()
    return MetadataValue.md(f"![{alt}](data:image/png;base64,{encoded})")
