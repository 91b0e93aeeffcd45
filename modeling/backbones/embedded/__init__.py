"""The embedded default backbone: a tiny Llama 3, its locally trained tokenizer, and its pretraining.

The embedded model is a real Hugging Face checkpoint written to disk (`config.json`,
`model.safetensors`, `tokenizer.json`, the chat template, ...) and loaded like any other through
`modeling.backbones.common`. It mirrors the parts of Llama 3 that the pipeline depends on:

- the architecture (`LlamaForCausalLM`, grouped-query attention, RoPE with theta 500000, untied head),
- the special tokens and the Llama-3 Instruct chat template verbatim, so prompts are rendered the same way,
- a byte-level BPE tokenizer whose post-processor prepends `<|begin_of_text|>` like Llama 3's does,
- a pad token `<|finetune_right_pad_id|>` distinct from eos (as in Llama 3.1).

One deliberate difference: numbers are split into single digits (Llama 3 groups up to three digits).
The pipeline's prompts are mostly numbers, and digit-by-digit tokens make equal digits map to equal
tokens wherever they appear, which a tiny model trained on a few thousand prompts needs.

The method freezes a *pretrained* backbone, so a random one is not enough: after the seeded random
initialisation the model gets a bounded, full-parameter causal-LM pretraining on prompt text of the
training split (`pretrain_causal_lm`). It reads prompts only, never labels, and never a validation,
test or live prompt (those are used only to measure the held-out loss before and after). It learns
the prompt language (the layout, the feature names, how digits follow each other), which is what
a frozen backbone must bring to the regression.

This module must not import dagster, duckdb or mlflow: it runs on the GPU image, which lacks them.

Modules: `tokenizer` (special tokens, chat template, BPE training), `pretrain` (causal-LM pretraining
on train-split prompts) and `build` (the model spec, the seeded build, its info file and reuse rule).
"""

from modeling.backbones.embedded.build import (
    EMBEDDED_MODEL_FORMAT_VERSION,
    TinyLlamaSpec,
    build_embedded_base_model,
    build_key,
    pretrain_dates,
    pretrained_past,
    read_embedded_info,
    reuse_decision,
)
from modeling.backbones.embedded.pretrain import (
    PretrainReport,
    PretrainSpec,
    lm_loss_per_token,
    pretrain_causal_lm,
    select_pretraining_rows,
)
from modeling.backbones.embedded.tokenizer import (
    BOS_TOKEN,
    END_HEADER_TOKEN,
    END_OF_TEXT_TOKEN,
    EOT_TOKEN,
    LLAMA3_CHAT_TEMPLATE,
    LLAMA3_SPECIAL_TOKENS,
    START_HEADER_TOKEN,
    train_tokenizer,
)

__all__ = [
    "BOS_TOKEN",
    "EMBEDDED_MODEL_FORMAT_VERSION",
    "END_HEADER_TOKEN",
    "END_OF_TEXT_TOKEN",
    "EOT_TOKEN",
    "LLAMA3_CHAT_TEMPLATE",
    "LLAMA3_SPECIAL_TOKENS",
    "PretrainReport",
    "PretrainSpec",
    "START_HEADER_TOKEN",
    "TinyLlamaSpec",
    "build_embedded_base_model",
    "build_key",
    "lm_loss_per_token",
    "pretrain_causal_lm",
    "pretrain_dates",
    "pretrained_past",
    "read_embedded_info",
    "reuse_decision",
    "select_pretraining_rows",
    "train_tokenizer",
]
