"""The prompt corpus file: training-set rows streamed through the `PromptBuilder` into Parquet."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from modeling.data.parquet_io import atomic_parquet_writer
from modeling.prompt import PromptBuilder

PROMPT_SCHEMA = pa.schema([
    ("date", pa.timestamp("us")),
    ("symbol", pa.string()),
    ("split", pa.string()),
    ("label", pa.float64()),
    ("weight", pa.float64()),
    ("prompt", pa.string()),
    ("n_tokens", pa.int32()),
])


def write_prompt_corpus(rows: pd.DataFrame, builder: PromptBuilder, tokenizer, path: Path,
                        batch_size: int = 8192, metadata: dict | None = None) -> np.ndarray:
    """Render and count every row in batches, one Parquet row group per batch (memory stays flat);
    atomic: the previous file stays until the new one is complete. Returns the token counts."""
    counts: list[np.ndarray] = [np.zeros(0, dtype=np.int32)]
    batches = builder.iter_batches(rows, tokenizer, batch_size)
    with atomic_parquet_writer(path, PROMPT_SCHEMA, metadata) as writer:
        for start, (prompts, n_tokens) in zip(range(0, len(rows), batch_size), batches, strict=True):
            part = rows.iloc[start : start + batch_size]
            writer.write_table(pa.table({
                "date": part["date"].to_numpy(dtype="datetime64[us]"),
                "symbol": part["symbol"].astype(str),
                "split": part["split"].astype(str),
                # NULL, as in the training set, where the label is unknown (live rows), not NaN
                "label": pa.array(part["label"].to_numpy(float), type=pa.float64(), from_pandas=True),
                "weight": part["weight"].to_numpy(float),
                "prompt": prompts,
                "n_tokens": n_tokens,
            }, schema=PROMPT_SCHEMA))
            counts.append(n_tokens)
    return np.concatenate(counts)
