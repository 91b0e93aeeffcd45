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
FINGERPRINT_SCHEME = "v3"
"""Prefix of `model_fingerprint`'s value. Fingerprints saved by earlier schemes are still compared by their
own ("v2:", or no prefix: `_edges_fingerprint`), so models saved before keep loading."""
_FINGERPRINT_WHOLE_BYTES_V3 = 1 << 30
"""v3: weight files up to 1 GiB are hashed whole (SmolLM2's 538 MB: about a second), larger ones sampled
per tensor as well as every 16 MiB, so a change to any one tensor changes the fingerprint."""
_TEXT_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
)
"""v3: what turns a row's text into token ids (the tokenizer and its chat template), hashed with the
weights: the same weights under another template read other prompts."""


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
    """A SHA-256 identifying the checkpoint in `path` without reading 16 GB of weights, prefixed "v3:".

    It covers `config.json`, the tokenizer and chat template files in full and, per weight file (sorted
    by name), its name, size and content: the whole file up to 1 GiB, else the first and last MiB, 64 KiB
    at every 16 MiB in between and 64 KiB at the start of every tensor (safetensors). A checkpoint that
    differs only in one middle tensor (a merged fine-tune keeps the header, embeddings and last norms), or
    only in its chat template, changes the fingerprint too. Used to recognise the base model a regressor
    was trained on when it is loaded again (`fingerprint_matches`).
    """
    return f"{FINGERPRINT_SCHEME}:{_checkpoint_hash(path, sampled=True, whole=_FINGERPRINT_WHOLE_BYTES_V3)}"


def fingerprint_matches(path: str | os.PathLike[str], saved: str) -> bool:
    """Whether the checkpoint in `path` is the one whose fingerprint was `saved`, by the scheme that
    made it (regressors and searches saved before "v3" carry "v2:" or `_edges_fingerprint`'s)."""
    if saved.startswith(f"{FINGERPRINT_SCHEME}:"):
        return model_fingerprint(path) == saved
    if saved.startswith("v2:"):
        return f"v2:{_checkpoint_hash(path, sampled=True, whole=_FINGERPRINT_WHOLE_BYTES, v3=False)}" == saved
    return _edges_fingerprint(path) == saved


def _edges_fingerprint(path: str | os.PathLike[str]) -> str:
    """The first scheme (before "v2"): config.json and each weight file's name, size and first and last
    MiB only, which misses a change in the middle tensors of the same layout."""
    return _checkpoint_hash(path, sampled=False, v3=False)


def _checkpoint_hash(
    path: str | os.PathLike[str], sampled: bool, whole: int = _FINGERPRINT_WHOLE_BYTES, v3: bool = True
) -> str:
    """SHA-256 of config.json and, per weight file (sorted by name), its name, size and content: whole up
    to `whole` bytes, else its first and last MiB and a sample every 16 MiB (`sampled`, "v2" and "v3"); or
    its first and last MiB only (the first scheme). `v3` adds the tokenizer and chat template files and
    a sample at the start of every tensor of a sampled safetensors file."""
    p = require_model_dir(path)
    h = hashlib.sha256((p / "config.json").read_bytes())
    for name in _TEXT_FILES if v3 else ():
        if (p / name).is_file():
            h.update(name.encode() + (p / name).read_bytes())
    for file in sorted([*p.glob("*.safetensors"), *p.glob("*.bin")]):
        size = file.stat().st_size
        h.update(file.name.encode() + size.to_bytes(8, "little"))
        with file.open("rb") as f:
            if sampled and size <= whole:
                while block := f.read(1 << 22):
                    h.update(block)
                continue
            h.update(f.read(_FINGERPRINT_EDGE_BYTES))
            if sampled:
                offsets = [*range(_FINGERPRINT_STRIDE, size - _FINGERPRINT_EDGE_BYTES, _FINGERPRINT_STRIDE)]
                if v3 and file.suffix == ".safetensors":
                    offsets += _tensor_starts(f)
                for offset in offsets:
                    f.seek(offset)
                    h.update(f.read(_FINGERPRINT_SAMPLE_BYTES))
                f.seek(size - _FINGERPRINT_EDGE_BYTES)
                h.update(f.read())
            elif size > 2 * _FINGERPRINT_EDGE_BYTES:
                f.seek(size - _FINGERPRINT_EDGE_BYTES)
                h.update(f.read())
    return h.hexdigest()


def _tensor_starts(f) -> list[int]:
    """File offsets of every tensor's data in an open safetensors file (its JSON header's offsets)."""
    f.seek(0)
    n = int.from_bytes(f.read(8), "little")
    try:
        header = json.loads(f.read(min(n, 100 << 20)))
        return sorted(8 + n + int(t["data_offsets"][0]) for k, t in header.items() if k != "__metadata__")
    except (ValueError, KeyError, TypeError, AttributeError):  # not a safetensors header: the strided samples
        return []


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
