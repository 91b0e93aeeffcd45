"""The prompt corpus file: training-set rows streamed through the `PromptBuilder` into Parquet."""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa

from modeling.data.parquet_io import atomic_parquet_writer, sql_string
from modeling.prompt import PromptBuilder

PROMPT_SCHEMA = pa.schema(
    [
        ("date", pa.timestamp("us")),
        ("symbol", pa.string()),
        ("split", pa.string()),
        ("label", pa.float64()),
        ("weight", pa.float64()),
        ("prompt", pa.string()),
        ("n_tokens", pa.int32()),
    ]
)


def write_prompt_corpus(
    rows: pd.DataFrame,
    builder: PromptBuilder,
    tokenizer,
    path: Path,
    batch_size: int = 8192,
    metadata: dict | None = None,
) -> np.ndarray:
    """Render and count every row in batches, one Parquet row group per batch (memory stays flat);
    atomic: the previous file stays until the new one is complete. Returns the token counts."""
    counts: list[np.ndarray] = [np.zeros(0, dtype=np.int32)]
    batches = builder.iter_batches(rows, tokenizer, batch_size)
    with atomic_parquet_writer(path, PROMPT_SCHEMA, metadata) as writer:
        for start, (prompts, n_tokens) in zip(range(0, len(rows), batch_size), batches, strict=True):
            part = rows.iloc[start : start + batch_size]
            writer.write_table(
                pa.table(
                    {
                        "date": part["date"].to_numpy(dtype="datetime64[us]"),
                        "symbol": part["symbol"].astype(str),
                        "split": part["split"].astype(str),
                        # NULL, as in the training set, where the label is unknown (live rows), not NaN
                        "label": pa.array(part["label"].to_numpy(float), type=pa.float64(), from_pandas=True),
                        "weight": part["weight"].to_numpy(float),
                        "prompt": prompts,
                        "n_tokens": n_tokens,
                    },
                    schema=PROMPT_SCHEMA,
                )
            )
            counts.append(n_tokens)
    return np.concatenate(counts)


def corpus_vs_training_set(training_set: Path, corpus: Path) -> dict[str, int]:
    """Rows of the training set without a prompt, prompts without a training-set row, and rows whose
    split, label or weight differ, matched on (date, symbol)."""
    con = duckdb.connect()  # in memory: two Parquet files, no warehouse lock
    try:
        row = con.execute(
            f"""
            SELECT count(*) FILTER (WHERE p.symbol IS NULL) AS missing,
                   count(*) FILTER (WHERE t.symbol IS NULL) AS extra,
                   count(*) FILTER (WHERE t.symbol IS NOT NULL AND p.symbol IS NOT NULL
                                    AND (t.split IS DISTINCT FROM p.split OR t.label IS DISTINCT FROM p.label
                                         OR t.weight IS DISTINCT FROM p.weight)) AS different,
                   count(t.symbol) AS training_set_rows,
                   count(p.symbol) AS prompts
            FROM read_parquet({sql_string(str(training_set))}) t
            FULL OUTER JOIN read_parquet({sql_string(str(corpus))}) p
                ON t.date = p.date AND t.symbol = p.symbol
            """
        ).fetchall()[0]
    finally:
        con.close()
    return dict(zip(("missing", "extra", "different", "training_set_rows", "prompts"), row, strict=True))
