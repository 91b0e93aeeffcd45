import time

import numpy as np
import pandas as pd
from dagster import Config, MaterializeResult, MetadataValue, asset
from pydantic import Field

from modeling.backbones.common import load_tokenizer
from modeling.data.parquet_io import create_parquet_view, read_parquet_metadata
from modeling.data.prompt_corpus import write_prompt_corpus
from modeling.prompt import DEFAULT_LAYOUT, DEFAULT_NUMBER_FORMAT, PromptBuilder
from pipeline.metadata import relation_metadata
from pipeline.resources import WAREHOUSE_POOL, StorageResource, WarehouseResource


class PromptCorpusConfig(Config):
    sig_digits: int = Field(
        default=3,
        ge=1,
        le=8,
        description="Significant digits of each feature value. Keep base_model's prompt_sig_digits equal "
        "to it.",
    )
    batch_size: int = Field(default=8192, ge=1, description="Rows rendered and tokenised per batch.")
    number_format: str = Field(
        default=DEFAULT_NUMBER_FORMAT,
        description="How each feature's number is written: value (significant digits), percentile (rank "
        "among the date's stocks, 0-99) or both. Keep base_model's prompt_number_format equal to it.",
    )
    layout: str = Field(
        default=DEFAULT_LAYOUT,
        description="Where each feature's definition is written: inline (next to its number, one line per "
        "feature) or legend (once in the system turn with a letter code; the rows carry code=value pairs, "
        "and the shared system turn is computed once per batch). Keep base_model's prompt_layout equal "
        "to it.",
    )


@asset(
    pool=WAREHOUSE_POOL,
    group_name="training",
    kinds={"parquet"},
    deps=["training_set", "base_model"],
    code_version="prompt-corpus-v3",
)
def prompt_corpus(
    config: PromptCorpusConfig, storage: StorageResource, warehouse: WarehouseResource
) -> MaterializeResult:
    """One chat-formatted, zero-shot regression prompt per training-set row (train, validation, test and
    live), rendered with the base model's chat template, with its token count.
    """
    source = storage.parquet_path("training_set")
    facts = read_parquet_metadata(source)
    horizon, label_kind = int(facts["horizon"]), str(facts["label"]["kind"])
    model_dir = storage.base_model_dir
    tokenizer = load_tokenizer(model_dir)
    builder = PromptBuilder(
        horizon=horizon,
        sig_digits=config.sig_digits,
        target=label_kind,
        number_format=config.number_format,
        layout=config.layout,
    )
    rows = builder.with_percentiles(pd.read_parquet(source))  # each date's whole cross-section

    path = storage.parquet_path("prompt_corpus")
    started = time.perf_counter()
    n_tokens = write_prompt_corpus(
        rows,
        builder,
        tokenizer,
        path,
        config.batch_size,
        metadata={
            "horizon": horizon,
            "label_kind": label_kind,
            "base_model": str(model_dir),
            "sig_digits": config.sig_digits,
            "number_format": config.number_format,
            "layout": config.layout,
        },
    )
    elapsed = time.perf_counter() - started
    sample = builder.render(rows.iloc[0], tokenizer) if len(rows) else ""
    with warehouse.get_connection() as con:
        create_parquet_view(con, "prompt_corpus", path)
        metadata = relation_metadata(
            con, "prompt_corpus", preview_columns=["date", "symbol", "split", "label", "weight", "n_tokens"]
        )
    quantiles = np.percentile(n_tokens, [0, 5, 50, 95, 100]) if len(n_tokens) else np.zeros(5)
    return MaterializeResult(
        metadata={
            **metadata,
            "path": MetadataValue.path(str(path)),
            "base_model": MetadataValue.path(str(model_dir)),
            "mean_tokens_per_prompt": MetadataValue.float(
                round(float(n_tokens.mean()), 2) if len(n_tokens) else 0.0
            ),
            "total_tokens": MetadataValue.int(int(n_tokens.sum())),
            "token_count_distribution": MetadataValue.md(
                "| min | p5 | median | p95 | max |\n|---|---|---|---|---|\n| "
                + " | ".join(f"{q:.0f}" for q in quantiles)
                + " |"
            ),
            "prompts_per_second": MetadataValue.float(round(len(rows) / elapsed, 1) if elapsed > 0 else 0.0),
            "rows_by_split": MetadataValue.json(rows["split"].value_counts().to_dict()),
            "sample_prompt": MetadataValue.md(f"```\n{sample}\n```"),
        }
    )
