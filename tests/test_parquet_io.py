"""Atomic Parquet output: metadata round trip, and a failed write keeps the previous file."""

import pandas as pd
import pyarrow as pa
import pytest

from modeling.data.parquet_io import atomic_parquet_writer, read_parquet_metadata, write_parquet_atomic


def test_metadata_round_trip(tmp_path):
    path = write_parquet_atomic(pd.DataFrame({"a": [1, 2]}), tmp_path / "x.parquet", {"horizon": 5})
    assert read_parquet_metadata(path) == {"horizon": 5}
    assert pd.read_parquet(path)["a"].tolist() == [1, 2]


def test_failed_write_leaves_the_previous_file(tmp_path):
    path = write_parquet_atomic(pd.DataFrame({"a": [1, 2]}), tmp_path / "x.parquet", {"v": 1})
    schema = pa.schema([("a", pa.int64())])
    with pytest.raises(RuntimeError, match="boom"), atomic_parquet_writer(path, schema, {"v": 2}) as writer:
        writer.write_table(pa.table({"a": [7, 8, 9]}, schema=schema))
        raise RuntimeError("boom")
    assert pd.read_parquet(path)["a"].tolist() == [1, 2]
    assert read_parquet_metadata(path) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.parquet"]  # no temporary file left behind


def test_a_snapshot_keeps_the_version_of_the_moment(tmp_path) -> None:
    """A training run reads a snapshot of its inputs: a writer that replaces the file afterwards (atomic
    rename, as every writer here does) changes nothing in it; a second snapshot call keeps the first."""
    from modeling.data.parquet_io import snapshot_files

    source = tmp_path / "training_set.parquet"
    write_parquet_atomic(pd.DataFrame({"x": [1, 2, 3]}), source, metadata={"v": 1})
    frozen = snapshot_files({"training_set": source}, tmp_path / "run" / "inputs")
    assert frozen["training_set"] == tmp_path / "run" / "inputs" / "training_set.parquet"
    write_parquet_atomic(pd.DataFrame({"x": [9]}), source, metadata={"v": 2})  # another run rewrites it
    assert pd.read_parquet(frozen["training_set"])["x"].tolist() == [1, 2, 3]
    assert read_parquet_metadata(frozen["training_set"]) == {"v": 1}
    again = snapshot_files({"training_set": source}, tmp_path / "run" / "inputs")  # a retry of the run
    assert pd.read_parquet(again["training_set"])["x"].tolist() == [1, 2, 3]
    assert not [p for p in (tmp_path / "run" / "inputs").iterdir() if p.name.startswith(".")]
