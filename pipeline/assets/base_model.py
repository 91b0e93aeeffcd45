from dagster import AssetExecutionContext, Config, MaterializeResult, MetadataValue, asset
from pydantic import Field

from modeling.base_model import (
    TinyLlamaSpec,
    build_embedded_base_model,
    describe_base_model,
    load_tokenizer,
    resolve_base_model_dir,
)
from modeling.prompt import PromptBuilder, tokenizer_training_texts
from pipeline.resources import StorageResource


class BaseModelConfig(Config):
    """Shape of the embedded tiny Llama (ignored when BASE_MODEL names a local checkpoint)."""

    vocab_size: int = Field(
        default=TinyLlamaSpec.vocab_size,
        ge=300,
        description="Target vocabulary of the locally trained tokenizer.",
    )
    hidden_size: int = Field(
        default=TinyLlamaSpec.hidden_size, ge=8, description="Hidden size of the tiny Llama."
    )
    intermediate_size: int = Field(
        default=TinyLlamaSpec.intermediate_size, ge=8, description="MLP size of the tiny Llama."
    )
    num_hidden_layers: int = Field(
        default=TinyLlamaSpec.num_hidden_layers, ge=1, description="Decoder layers."
    )
    num_attention_heads: int = Field(
        default=TinyLlamaSpec.num_attention_heads, ge=1, description="Query heads."
    )
    num_key_value_heads: int = Field(
        default=TinyLlamaSpec.num_key_value_heads, ge=1, description="Key/value heads (GQA, as in Llama 3)."
    )
    seed: int = Field(default=TinyLlamaSpec.seed, ge=0, description="Seed of the random initialisation.")
    tokenizer_rows: int = Field(
        default=20_000, ge=100, description="Prompt-like rows the tokenizer learns from."
    )


@asset(group_name="model", kinds={"pytorch", "huggingface"})
def base_model(
    context: AssetExecutionContext, config: BaseModelConfig, storage: StorageResource
) -> MaterializeResult:
    """The backbone and tokenizer every later step loads with `from_pretrained(path)`: the local checkpoint
    named by BASE_MODEL (e.g. Llama 3 8B Instruct) as is, or the embedded tiny Llama built under
    DATA_DIR/models/base_model (random weights, a locally trained tokenizer, Llama 3 chat template).
    """
    path, user_supplied = resolve_base_model_dir(storage.base_model, storage.root)
    if not user_supplied:
        # the config fields are the spec's own names, so the mapping cannot drift
        spec = TinyLlamaSpec(**config.model_dump(exclude={"tokenizer_rows"}))
        texts = tokenizer_training_texts(PromptBuilder(), n_rows=config.tokenizer_rows, seed=config.seed)
        build_embedded_base_model(path, texts, spec)
        context.log.info(f"built the embedded base model in {path}")
    load_tokenizer(path)  # fails clearly without a chat template: the prompts are chat-formatted
    facts = describe_base_model(path)
    return MaterializeResult(
        metadata={
            "path": MetadataValue.path(str(path)),
            "user_supplied": MetadataValue.bool(user_supplied),
            "n_parameters": MetadataValue.int(facts["n_parameters"]),
            "model_type": MetadataValue.text(facts["model_type"]),
            "vocab_size": MetadataValue.int(facts["tokenizer_size"]),
            "description": MetadataValue.json(facts),
        }
    )
