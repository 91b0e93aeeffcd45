"""A GGUF file (what llama.cpp and Ollama users hold) turned once into a standard checkpoint directory.

transformers reads GGUF through `from_pretrained(dir, gguf_file=name)` with the `gguf` package. Asked
for `GgufConfig(dequantize=True)`, it unpacks every quantised block into plain dense weights and
drops the quantisation config from the loaded model (the documented "plain dense model" mode), so
the model saves with `save_pretrained` like any other: no private attribute is touched. The
result, with the tokenizer and chat template read from the same file, is written once under
`DATA_DIR/models/` next to a `source.json` that names the source file, its quantisation type and its
SHA-256. Everything downstream loads the directory with `from_pretrained(dir)`.

Dequantised weights are exact copies of what the quantised file encodes (Q4_1 blocks become the
float values llama.cpp would compute with); nothing is re-quantised.

This module must not import dagster, duckdb or mlflow: it runs on the GPU image, which lacks them.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from modeling.backbones.common import (
    SOURCE_INFO_FILE,
    build_dir_next_to,
    file_sha256,
    swap_into_place,
)

GGUF_CONVERSION_VERSION = 2
"""Bumped when the conversion changes, so converted directories from an older version are rebuilt."""

LARGE_MODEL_PARAMETERS = 1_000_000_000
"""Above this many parameters a GGUF is saved in bfloat16 (16 GB for Llama 3 8B instead of 32 GB)."""


def read_gguf_facts(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Architecture, name, file-level quantisation type and per-tensor type counts of a GGUF file.

    Reads only the header (memory-mapped), so it is instant even for an 8B file.
    """
    import gguf

    reader = gguf.GGUFReader(str(path))

    def field(name: str) -> Any:
        f = reader.fields.get(name)
        return f.contents() if f is not None else None

    file_type = field("general.file_type")
    quantisation = None
    if file_type is not None:
        try:
            quantisation = gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_")
        except ValueError:
            quantisation = f"file_type_{file_type}"
    tensor_types = Counter(t.tensor_type.name for t in reader.tensors)
    return {
        "architecture": field("general.architecture"),
        "name": field("general.name"),
        "quantisation": quantisation,
        "tensor_types": dict(sorted(tensor_types.items())),
        "n_tensors": len(reader.tensors),
        "has_chat_template": field("tokenizer.chat_template") is not None,
    }


def _source_stat(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def converted_is_current(gguf_path: Path, out_dir: Path) -> bool:
    """True when `out_dir` holds a conversion of this very file (same path, size and mtime, same
    conversion version): the file is then neither re-hashed nor re-converted."""
    info_file = out_dir / SOURCE_INFO_FILE
    if not (info_file.is_file() and (out_dir / "config.json").is_file()):
        return False
    info = json.loads(info_file.read_text())
    return (
        info.get("conversion_version") == GGUF_CONVERSION_VERSION
        and info.get("source_path") == str(gguf_path.resolve())
        and info.get("source_stat") == _source_stat(gguf_path)
    )


def default_dtype(gguf_path: Path) -> torch.dtype:
    """float32 for small models (exact, and what CPUs compute in), bfloat16 above 1B parameters."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, local_files_only=True)
    with torch.device("meta"):
        n = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    return torch.bfloat16 if n > LARGE_MODEL_PARAMETERS else torch.float32


def convert_gguf(
    gguf_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    dtype: torch.dtype | None = None,
    extra_info: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Convert `gguf_path` into the checkpoint directory `out_dir` (unless already current); return the
    facts of `source.json`.

    Atomic like the embedded build: written to a temporary sibling, renamed into place when complete.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf_path, out_dir = Path(gguf_path).expanduser().resolve(), Path(out_dir)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {str(gguf_path)!r} does not exist")
    if converted_is_current(gguf_path, out_dir):
        return json.loads((out_dir / SOURCE_INFO_FILE).read_text())
    facts = read_gguf_facts(gguf_path)
    if not facts["has_chat_template"]:
        raise ValueError(
            f"{gguf_path.name} carries no chat template (tokenizer.chat_template); the pipeline's prompts "
            "are chat-formatted, so an Instruct GGUF (e.g. Meta-Llama-3-8B-Instruct) is required"
        )
    dtype = dtype or default_dtype(gguf_path)
    kwargs = {"gguf_file": gguf_path.name, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent,
        dtype=dtype,
        quantization_config=GgufConfig(gguf_file=gguf_path.name, dequantize=True),
        **kwargs,
    )
    if getattr(model, "is_quantized", False) or getattr(model.config, "quantization_config", None):
        # guards the documented contract of dequantize=True: if a transformers upgrade changes it, this
        # fails loudly here instead of writing a checkpoint that does not reload
        raise RuntimeError(
            "transformers kept the GGUF quantisation on the model despite GgufConfig(dequantize=True); "
            "the checkpoint cannot be saved as plain safetensors with this transformers version"
        )
    rope = _llama3_rope_from_gguf(gguf_path, model.config)
    if rope is not None:
        model.config.rope_parameters = rope
    info = {
        "source": "gguf",
        "source_path": str(gguf_path),
        "source_file": gguf_path.name,
        "source_stat": _source_stat(gguf_path),
        "source_sha256": file_sha256(gguf_path),
        "conversion_version": GGUF_CONVERSION_VERSION,
        "saved_dtype": str(dtype).removeprefix("torch."),
        **facts,
        **(extra_info or {}),
    }
    tmp = build_dir_next_to(out_dir)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / SOURCE_INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return info


LLAMA3_ROPE_CANDIDATES = ((8.0, 1.0, 4.0, 8192), (32.0, 1.0, 4.0, 8192))
"""(factor, low_freq_factor, high_freq_factor, original_max_position_embeddings) of Llama 3.1 and 3.2."""


def llama3_rope_factors(
    theta: float, head_dim: int, factor: float, low: float, high: float, context: int
) -> list[float]:
    """The per-frequency scale factors llama.cpp stores as `rope_freqs.weight` for "llama3" RoPE scaling
    (its converter's `generate_extra_tensors`): 1 for short wavelengths, `factor` for long ones, smooth
    in between."""
    factors = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < context / high:
            factors.append(1.0)
        elif wavelen > context / low:
            factors.append(factor)
        else:
            smooth = (context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return factors


def _llama3_rope_from_gguf(gguf_path: Path, config: Any) -> dict[str, Any] | None:
    """The "llama3" RoPE parameters of a Llama 3.1/3.2 GGUF, which llama.cpp keeps only as the tensor
    `rope_freqs.weight` and transformers drops (the converted model would rotate with plain RoPE: another
    model). None without the tensor; refused when no known parameter set reproduces it."""
    import gguf
    import numpy as np

    tensor = next((t for t in gguf.GGUFReader(str(gguf_path)).tensors if t.name == "rope_freqs.weight"), None)
    if tensor is None:
        return None
    stored = np.asarray(tensor.data, dtype=np.float64).ravel()
    params = dict(getattr(config, "rope_parameters", None) or {})
    theta = float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    for factor, low, high, context in LLAMA3_ROPE_CANDIDATES:
        expected = llama3_rope_factors(theta, head_dim, factor, low, high, context)
        if len(expected) == len(stored) and np.allclose(stored, expected, rtol=1e-5, atol=1e-6):
            return {
                **params,
                "rope_type": "llama3",
                "rope_theta": theta,
                "factor": factor,
                "low_freq_factor": low,
                "high_freq_factor": high,
                "original_max_position_embeddings": context,
            }
    raise ValueError(
        f"{gguf_path.name} scales its RoPE by a rope_freqs.weight tensor that no known Llama 3 parameter set "
        "reproduces; converting it without them would give another model. Convert it from its Hugging Face "
        "checkpoint instead (BASE_MODEL=<the directory>)"
    )


def converted_dir_name(gguf_path: str | os.PathLike[str]) -> str:
    """Directory name under `DATA_DIR/models/` for a GGUF file: `gguf-<file stem>`."""
    return f"gguf-{Path(gguf_path).name.removesuffix('.gguf')}"
