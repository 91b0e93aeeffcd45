"""Small files replaced whole or not at all: the JSON markers that later runs read to decide what to skip
(`outcome.json`, `final_state.json`, `hyperparameters.json`). Torch-free.

A marker written in place and cut short (a crash, a full disk) would be found by the next run and fail
it on every retry; written here, a reader sees the previous file or the new one, never a torn one.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write `text` to `path` atomically: a temporary file beside it, fsynced, renamed over `path`
    (`os.replace`, atomic on one filesystem), then the directory fsynced so the rename is durable."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
    return path
