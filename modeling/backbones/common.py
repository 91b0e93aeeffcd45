"""Loading any base model the same way: a local Hugging Face directory through `from_pretrained`.

Every backbone source (the embedded tiny Llama, a converted GGUF file, SmolLM2, a user's Llama 3
directory) ends as a standard checkpoint directory, and everything downstream loads it through the
functions here, exactly as it would load Meta-Llama-3-8B-Instruct. Nothing touches the Hugging Face hub:
every load passes `local_files_only=True`.

This module must not import dagster, duckdb or mlflow: it runs on the GPU image, which lacks them.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from modeling.backbones.files import (  # noqa: E402,F401 (re-exported)
    _TOKENIZER_FILES,
    file_sha256,
    model_fingerprint,
    require_model_dir,
)

PAD_TOKEN = "<|finetune_right_pad_id|>"
"""Padding token of Llama 3.1; distinct from eos so that padding is never confused with a real turn end."""

EMBEDDED_MODEL_INFO_FILE = "embedded_model.json"
"""File in an embedded model's directory that records how it was built (spec, pretraining, build key)."""

SOURCE_INFO_FILE = "source.json"
"""File in a converted model's directory (GGUF, SmolLM2) naming the file it was converted from."""


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> str:
    """Give `tokenizer` a pad token if it lacks one; return where the pad token came from.

    Real Llama 3 ships without a pad token. `<|finetune_right_pad_id|>` (Llama 3.1's reserved pad) is
    preferred because it is distinct from eos; failing that eos is used, which is harmless because
    padded positions are masked out by the attention mask and the pooling.
    """
    if tokenizer.pad_token is not None:
        return "tokenizer"
    if PAD_TOKEN in tokenizer.get_vocab():
        tokenizer.pad_token = PAD_TOKEN
        return "finetune_right_pad_id"
    if tokenizer.eos_token is None:
        raise ValueError("Tokenizer has neither a pad token nor an eos token to pad with")
    tokenizer.pad_token = tokenizer.eos_token
    return "eos"


def load_tokenizer(path: str | os.PathLike[str]) -> PreTrainedTokenizerBase:
    """Load the base model's tokenizer from a local directory, with a pad token and a chat template.

    The pipeline pads batches, so a pad token is set when the checkpoint has none (see
    `ensure_pad_token`). The prompts are chat-formatted, so a tokenizer without a chat template (a base,
    non-Instruct checkpoint) is rejected rather than silently formatting prompts differently.
    """
    p = require_model_dir(path)
    tokenizer = AutoTokenizer.from_pretrained(p, local_files_only=True)
    ensure_pad_token(tokenizer)
    if not tokenizer.chat_template:
        raise ValueError(
            f"The tokenizer in {str(p)!r} has no chat template; the pipeline's prompts are chat-formatted, "
            "so an Instruct checkpoint (e.g. Meta-Llama-3-8B-Instruct) is required"
        )
    return tokenizer


def _load_kwargs(dtype: torch.dtype | str | None, device_map: str | dict[str, Any] | None) -> dict[str, Any]:
    """`from_pretrained` options: offline always, dtype/device_map only when given (else library default)."""
    kwargs: dict[str, Any] = {"local_files_only": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if device_map is not None:
        kwargs["device_map"] = device_map
    return kwargs


def load_backbone(
    path: str | os.PathLike[str],
    dtype: torch.dtype | str | None = None,
    device_map: str | dict[str, Any] | None = None,
    **kwargs: Any,
) -> PreTrainedModel:
    """Load the base model without its LM head (`AutoModel`): the regression head replaces the head.

    `dtype` (e.g. `torch.bfloat16` on GPU) and `device_map` are passed through when given; otherwise the
    transformers defaults apply. Further keyword arguments (`quantization_config`, ...) go to
    `from_pretrained` unchanged.
    """
    p = require_model_dir(path)
    return AutoModel.from_pretrained(p, **_load_kwargs(dtype, device_map), **kwargs)


def load_causal_lm(
    path: str | os.PathLike[str],
    dtype: torch.dtype | str | None = None,
    device_map: str | dict[str, Any] | None = None,
) -> PreTrainedModel:
    """Load the base model with its LM head (`AutoModelForCausalLM`): pretraining, generation, round trips."""
    p = require_model_dir(path)
    return AutoModelForCausalLM.from_pretrained(p, **_load_kwargs(dtype, device_map))


def load_quantized_backbone(base_model_dir: Path, dtype: torch.dtype | None) -> torch.nn.Module:
    """QLoRA: the frozen backbone in 4-bit NF4 on the GPU (bitsandbytes), prepared for k-bit training."""
    if not torch.cuda.is_available():
        raise RuntimeError(
            "quantization='4bit' (QLoRA through bitsandbytes) needs a CUDA GPU and this machine has none; "
            "use quantization='none' on CPU"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as error:
        raise RuntimeError(
            "quantization='4bit' needs the bitsandbytes package: pip install bitsandbytes"
        ) from error
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    compute = dtype or torch.bfloat16
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
    )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    model = load_backbone(
        base_model_dir, dtype=compute, device_map={"": local_rank}, quantization_config=quant
    )
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def load_frozen_backbone(
    base_model_dir: str | os.PathLike[str], quantization: str, dtype: torch.dtype | None
) -> torch.nn.Module:
    """The frozen backbone a regressor sits on, for both building and loading one.

    `quantization` "4bit" = QLoRA's NF4 backbone on the GPU; otherwise the saved weights in `dtype` with
    SDPA attention. No KV cache: one forward per prompt, no generation.
    """
    if quantization == "4bit":
        backbone = load_quantized_backbone(Path(base_model_dir), dtype)
    else:
        backbone = load_backbone(base_model_dir, dtype=dtype, attn_implementation="sdpa")
    backbone.config.use_cache = False
    return backbone.requires_grad_(False)


def decoder_linear_names(backbone: torch.nn.Module) -> list[str]:
    """The names of the linear modules inside the decoder layers (what "all-linear" adapts), e.g. q_proj."""
    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in backbone.named_modules()
            if isinstance(module, torch.nn.Linear) and "layers" in name.split(".")
        }
    )


def _count_parameters_from_safetensors(files: list[Path]) -> int:
    """Sum of the tensor sizes declared in the safetensors headers; reads no weight data."""
    from safetensors import safe_open

    total = 0
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open handles are not iterable
                total += math.prod(f.get_slice(name).get_shape())
    return total


def _count_parameters_from_config(config: Any) -> int:
    """Parameter count of the architecture `config` describes, instantiated on the meta device (no memory)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def describe_base_model(path: str | os.PathLike[str]) -> dict[str, Any]:
    """JSON-serialisable facts about the base model in `path`, for logs and asset metadata.

    Never loads the weights: the parameter count comes from the safetensors headers, or (for other
    weight formats) from the architecture built on the meta device.
    """
    p = require_model_dir(path)
    config = AutoConfig.from_pretrained(p, local_files_only=True)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    tokenizer = AutoTokenizer.from_pretrained(p, local_files_only=True)
    pad_source = ensure_pad_token(tokenizer)
    vocab = getattr(text_config, "vocab_size", None)
    if isinstance(vocab, int) and len(tokenizer) > vocab:
        raise ValueError(
            f"the tokenizer in {str(p)!r} has {len(tokenizer)} tokens, the model's embedding {vocab} rows: "
            f"a token id from {vocab} on would fail at the first forward (a tokenizer of another model?)"
        )

    weight_files = sorted(p.glob("*.safetensors"))
    if weight_files:
        n_parameters, n_parameters_source = _count_parameters_from_safetensors(weight_files), "safetensors"
    else:
        n_parameters, n_parameters_source = _count_parameters_from_config(config), "config"

    def _int_or_none(value: Any) -> int | None:
        return int(value) if isinstance(value, int) and not isinstance(value, bool) else None

    return {
        "path": str(p.resolve()),
        "model_type": str(config.model_type),
        "architectures": list(getattr(config, "architectures", None) or []),
        "hidden_size": _int_or_none(getattr(text_config, "hidden_size", None)),
        "num_hidden_layers": _int_or_none(getattr(text_config, "num_hidden_layers", None)),
        "num_attention_heads": _int_or_none(getattr(text_config, "num_attention_heads", None)),
        "num_key_value_heads": _int_or_none(getattr(text_config, "num_key_value_heads", None)),
        "max_position_embeddings": _int_or_none(getattr(text_config, "max_position_embeddings", None)),
        "vocab_size": _int_or_none(getattr(text_config, "vocab_size", None)),
        "tokenizer_size": len(tokenizer),
        "n_parameters": int(n_parameters),
        "n_parameters_source": n_parameters_source,
        "has_chat_template": bool(tokenizer.chat_template),
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
        "pad_token_source": pad_source,
        "is_embedded": (p / EMBEDDED_MODEL_INFO_FILE).is_file(),
    }


def swap_into_place(built: Path, out_dir: Path) -> None:
    """Move the finished build `built` to `out_dir`, replacing any previous model there.

    POSIX cannot rename a directory over a non-empty one, so the old model is first renamed aside,
    then the new one renamed in, then the old one deleted. If the second rename fails the old model is
    renamed back, so `out_dir` always ends up holding a complete model, old or new.
    """
    if not out_dir.exists():
        os.replace(built, out_dir)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    old.rmdir()  # only its unique name is wanted
    os.replace(out_dir, old)
    try:
        os.replace(built, out_dir)
    except BaseException:
        os.replace(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


def build_dir_next_to(out_dir: Path) -> Path:
    """A fresh temporary directory beside `out_dir` (same filesystem, so `swap_into_place` is a rename)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp creates 0700; a model directory is readable like any checkpoint
    return tmp
