"""Base-model files without torch: is a directory a Hugging Face checkpoint, and what identifies it.

Torch-free, so that the orchestrator plans and fingerprints a training run without importing torch.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
"""Any one of these marks a directory as holding a Hugging Face tokenizer."""

_FINGERPRINT_EDGE_BYTES = 1 << 20
"""Bytes read from each end of a weight file for its fingerprint (the header and the last tensors)."""
_FINGERPRINT_WHOLE_BYTES = 64 << 20
"""Weight files up to this size are hashed whole (the embedded model, SmolLM2's 270 MB is sampled)."""
_FINGERPRINT_STRIDE = 16 << 20
"""A sample is read at every multiple of this offset of a larger file ..."""
_FINGERPRINT_SAMPLE_BYTES = 64 << 10
"""... this many bytes long: 64 MiB read per 16 GB, and every tensor of 16 MiB or more is sampled."""
FINGERPRINT_SCHEME = "v2"
"""Prefix of `model_fingerprint`'s value; a saved fingerprint without it was made by `_edges_fingerprint`."""


def require_model_dir(path: str | os.PathLike[str]) -> Path:
    """Check that `path` is a local Hugging Face model directory (config + tokenizer); return it as a Path.

    Checked up front because `from_pretrained` on a missing local path treats the string as a hub repo id
    and fails with a message about the hub, which hides the real problem.
    """
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(
            f"Base model directory {str(p)!r} does not exist or is not a directory "
            "(a local Hugging Face checkpoint directory is required; hub ids are not supported)"
        )
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"{str(p)!r} is not a Hugging Face model directory: it has no config.json")
    if not any((p / name).is_file() for name in _TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{str(p)!r} is not a Hugging Face model directory: it has no tokenizer files "
            f"(expected one of {', '.join(_TOKENIZER_FILES)})"
        )
    return p


def model_fingerprint(path: str | os.PathLike[str]) -> str:
    """A SHA-256 identifying the checkpoint in `path` without reading 16 GB of weights, prefixed "v2:".

    It covers `config.json` in full and, per weight file (sorted by name), its name, size and content:
    the whole file up to 64 MiB, else the first and last MiB and 64 KiB at every 16 MiB in between. A
    checkpoint that differs only in its middle tensors (a merged fine-tune keeps the header, embeddings
    and last norms) changes the fingerprint too, since every tensor of 16 MiB or more is sampled (each
    projection of an 8B model; smaller ones change with their layer's large ones). Used to recognise the
    base model a regressor was trained on when it is loaded again (`fingerprint_matches`).
    """
    return f"{FINGERPRINT_SCHEME}:{_checkpoint_hash(path, sampled=True)}"


def fingerprint_matches(path: str | os.PathLike[str], saved: str) -> bool:
    """Whether the checkpoint in `path` is the one whose fingerprint was `saved`, by the scheme that
    made it (regressors and searches saved before "v2" carry `_edges_fingerprint`'s)."""
    if saved.startswith(f"{FINGERPRINT_SCHEME}:"):
        return model_fingerprint(path) == saved
    return _edges_fingerprint(path) == saved


def _edges_fingerprint(path: str | os.PathLike[str]) -> str:
    """The first scheme (before "v2"): config.json and each weight file's name, size and first and last
    MiB only, which misses a change in the middle tensors of the same layout."""
    return _checkpoint_hash(path, sampled=False)


def _checkpoint_hash(path: str | os.PathLike[str], sampled: bool) -> str:
    """SHA-256 of config.json and, per weight file (sorted by name), its name, size and content: whole up
    to 64 MiB, else its first and last MiB and a sample every 16 MiB (`sampled`, "v2"); or its first and
    last MiB only (the first scheme)."""
    p = require_model_dir(path)
    h = hashlib.sha256((p / "config.json").read_bytes())
    for file in sorted([*p.glob("*.safetensors"), *p.glob("*.bin")]):
        size = file.stat().st_size
        h.update(file.name.encode() + size.to_bytes(8, "little"))
        with file.open("rb") as f:
            if sampled and size <= _FINGERPRINT_WHOLE_BYTES:
                while block := f.read(1 << 22):
                    h.update(block)
                continue
            h.update(f.read(_FINGERPRINT_EDGE_BYTES))
            if sampled:
                for offset in range(_FINGERPRINT_STRIDE, size - _FINGERPRINT_EDGE_BYTES, _FINGERPRINT_STRIDE):
                    f.seek(offset)
                    h.update(f.read(_FINGERPRINT_SAMPLE_BYTES))
                f.seek(size - _FINGERPRINT_EDGE_BYTES)
                h.update(f.read())
            elif size > 2 * _FINGERPRINT_EDGE_BYTES:
                f.seek(size - _FINGERPRINT_EDGE_BYTES)
                h.update(f.read())
    return h.hexdigest()


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 22) -> str:
    """Content hash of a whole file (a GGUF source, a downloaded wheel), read in 4 MiB chunks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def build_key(payload: dict[str, Any]) -> str:
    """A short, stable hash of a JSON-serialisable payload (config + code version + input hashes)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]
