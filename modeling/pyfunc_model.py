"""The code MLflow ships with every registered model: `RegressorPyfunc`, its signature and requirements.

The registered model `return-regressor` is an `mlflow.pyfunc` model logged *from code*: this file is
the model's code (MLflow copies it into the artefact and executes it at load time; it registers
`RegressorPyfunc` through `set_model`), so the artefact holds no pickle, and loading a model imports
neither the champion gate (`modeling.champion_gate`) nor `modeling.mlflow_registry`. The artefact holds the
adapter and head (safetensors), the regressor's JSON config, the tokenizer, and either a copy of a small
base model or, for a large one (Llama 3 8B), a reference to its directory checked by fingerprint.

    mlflow.pyfunc.load_model("models:/return-regressor@champion").predict(rows)

takes raw feature rows (date, symbol, the 16 features, optional sector) and returns one forecast per
row, rendering the prompts with the same `PromptBuilder` settings the model was trained on.
"""

from __future__ import annotations

import os
from importlib import metadata as importlib_metadata
from typing import Any

import numpy as np
import pandas as pd
from mlflow.models import ModelSignature, set_model
from mlflow.pyfunc import PythonModel
from mlflow.types import ColSpec, Schema

from modeling.feature_registry import FEATURE_NAMES, PERCENTILE_COLUMNS


class RegressorPyfunc(PythonModel):
    """Raw feature rows in, forecasts out: prompts are rendered with the training-time `PromptBuilder`."""

    def load_context(self, context: Any) -> None:
        from transformers import AutoTokenizer

        from modeling.allocator import tune_malloc
        from modeling.backbones.common import ensure_pad_token
        from modeling.inference import DEFAULT_PREDICT_BATCH_SIZE
        from modeling.model import load_regressor, read_regressor_info
        from modeling.prompt import PromptBuilder

        tune_malloc()  # the scoring of every predict call runs about 1.4x faster with the heap kept
        regressor_dir = context.artifacts["regressor"]
        info = read_regressor_info(regressor_dir)
        base = context.artifacts.get("base_model") or info["base_model"]["path"]
        self.model = load_regressor(regressor_dir, base_model_dir=base)
        self.tokenizer = AutoTokenizer.from_pretrained(context.artifacts["tokenizer"], local_files_only=True)
        ensure_pad_token(self.tokenizer)
        self.builder = PromptBuilder.from_settings(info["prompt"])
        self.batch_size = predict_batch_size(
            os.environ.get(PREDICT_BATCH_SIZE_ENV), DEFAULT_PREDICT_BATCH_SIZE
        )

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict | None = None) -> np.ndarray:
        from modeling.inference import predict_prompts

        frame = pd.DataFrame(model_input)
        missing = [c for c in ("date", "symbol", *FEATURE_NAMES) if c not in frame.columns]
        if missing:
            raise ValueError(f"input rows lack column(s) {missing}")
        frame = frame.assign(date=pd.to_datetime(frame["date"]))
        if len(frame) == 0:
            return np.zeros(0)
        # the prompt names the date and the symbol: without them it would read "nan" and still score
        blank = (
            frame["date"].isna() | frame["symbol"].isna() | (frame["symbol"].astype(str).str.strip() == "")
        )
        if blank.any():
            rows = np.flatnonzero(blank.to_numpy())
            raise ValueError(
                f"{len(rows)} input row(s) lack a date or a symbol (positions {rows[:5].tolist()})"
            )
        prompts = self.builder.render_batch(frame.reset_index(drop=True), self.tokenizer)
        return predict_prompts(self.model, self.tokenizer, prompts, self.batch_size)


if __name__ != "modeling.pyfunc_model":  # MLflow is executing this file to load (or validate) a logged model
    set_model(RegressorPyfunc())


PREDICT_BATCH_SIZE_ENV = "REGRESSOR_PREDICT_BATCH_SIZE"
"""Rows per forward of the served model (read when it loads; README, "Configuration")."""


def predict_batch_size(value: str | None, default: int) -> int:
    """The served model's batch size from its environment variable (`default` when unset)."""
    if value is None or value.strip() == "":
        return default
    try:
        size = int(value)
    except ValueError:
        size = 0
    if size < 1:
        raise ValueError(f"{PREDICT_BATCH_SIZE_ENV} must be a positive integer, got {value!r}")
    return size


def signature() -> ModelSignature:
    """Input: date, symbol, the 16 features, optional sector and optional stored percentiles (the
    training set's `<feature>_pct`, which a percentile-prompt model reads instead of ranking the rows it
    is given); output: one double per row."""
    inputs = [ColSpec("datetime", "date"), ColSpec("string", "symbol")]
    inputs += [ColSpec("double", name) for name in FEATURE_NAMES]
    inputs.append(ColSpec("string", "sector", required=False))
    inputs += [ColSpec("double", name, required=False) for name in PERCENTILE_COLUMNS]
    return ModelSignature(inputs=Schema(inputs), outputs=Schema([ColSpec("double")]))


def pip_requirements() -> list[str]:
    """The libraries the pyfunc model needs, pinned to the versions it was logged with."""
    names = (
        "torch",
        "transformers",
        "tokenizers",
        "peft",
        "accelerate",
        "safetensors",
        "pandas",
        "numpy",
        "mlflow",
    )
    return [f"{name}=={importlib_metadata.version(name)}" for name in names]
