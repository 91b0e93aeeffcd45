"""Atomic Parquet output: a failed write never replaces the previous good file.

Files are written next to their destination under a temporary name and renamed into place only when
complete (`os.replace` is atomic on one filesystem). JSON metadata travels in the Parquet schema, so
a file describes itself (label scaling, split plan, ...) without a side file.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

METADATA_KEY = b"pipeline"


def _with_metadata(schema: pa.Schema, metadata: dict | None) -> pa.Schema:
    if metadata is None:
        return schema
    return schema.with_metadata({**(schema.metadata or {}), METADATA_KEY: json.dumps(metadata).encode()})


@contextmanager
def atomic_parquet_writer(
    path: Path, schema: pa.Schema, metadata: dict | None = None
) -> Iterator[pq.ParquetWriter]:
    """Stream row groups into `path`; on any error the destination is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    writer = pq.ParquetWriter(tmp, _with_metadata(schema, metadata), compression="zstd")
    try:
        yield writer
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise


def write_parquet_atomic(frame: pd.DataFrame, path: Path, metadata: dict | None = None) -> Path:
    table = pa.Table.from_pandas(frame, preserve_index=False)
    with atomic_parquet_writer(path, table.schema, metadata) as writer:
        writer.write_table(table, row_group_size=256_000)
    return Path(path)


def read_parquet_metadata(path: Path) -> dict:
    """The JSON metadata written with the file ({} if none)."""
    raw = (pq.read_schema(path).metadata or {}).get(METADATA_KEY)
    return json.loads(raw) if raw else {}


def read_served_rows(path: Path, columns: list[str], filters: list | None = None) -> pd.DataFrame:
    """`columns` of a training set and the model's served inputs (`served_columns`: the features and the
    stored percentiles it has, as floats: NaN where a date is too thin to rank), one row per (date,
    symbol)."""
    from modeling.feature_registry import PERCENTILE_COLUMNS, served_columns

    wanted = list(dict.fromkeys([*served_columns(pq.read_schema(path).names), *columns]))
    rows = pd.read_parquet(path, columns=wanted, filters=filters)
    rows = rows.astype({c: "float64" for c in PERCENTILE_COLUMNS if c in rows})
    return rows.drop_duplicates(["date", "symbol"]).reset_index(drop=True)


def sql_string(value: str) -> str:
    """`value` as a SQL string literal (quotes doubled), e.g. a file path under any DATA_DIR."""
    return "'" + value.replace("'", "''") + "'"


def create_parquet_view(con, name: str, path: Path) -> None:
    """(Re)define the DuckDB view `name` over the Parquet file `path` (the file stays the storage)."""
    con.execute(f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM read_parquet({sql_string(str(path))})")


def snapshot_files(files: dict[str, Path], into: Path) -> dict[str, Path]:
    """Freeze `files` (name -> path) under `into`: a hard link (instant, no copy) when the filesystem allows,
    else a copy. Writers here replace a file by renaming a new one over it (`atomic_parquet_writer`), so a
    link keeps the version of the moment: a run reads the files it started with, never what another run
    wrote since. Names already in `into` are kept (a retry continues on its own snapshot)."""
    into.mkdir(parents=True, exist_ok=True)
    frozen = {}
    for name, source in files.items():
        target = into / f"{name}{Path(source).suffix}"
        if not target.exists():
            tmp = into / f".{target.name}.tmp-{uuid.uuid4().hex}"
            try:
                os.link(source, tmp)
            except OSError:  # another filesystem, or links not supported
                import shutil

                shutil.copy2(source, tmp)
            os.replace(tmp, target)
        frozen[name] = target
    return frozen
