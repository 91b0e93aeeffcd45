"""The base model the pipeline fine-tunes: a user's local Hugging Face checkpoint, or an embedded tiny Llama.

Everything downstream loads the base model through one code path, `AutoTokenizer.from_pretrained(path)`
and `AutoModel.from_pretrained(path)`, exactly as it would load Meta-Llama-3-8B-Instruct. There is no
special-casing of the small model anywhere: what the tests and the CPU demo exercise is the production
loading path, only with a checkpoint that is a few hundred kilobytes instead of 16 GB.

The embedded model is therefore a real Hugging Face checkpoint written to disk (`config.json`,
`model.safetensors`, `tokenizer.json`, the chat template, ...). It mirrors the parts of Llama 3 that
the pipeline depends on:

- the architecture (`LlamaForCausalLM`, grouped-query attention, RoPE with theta 500000, untied head),
- the special tokens and the Llama-3 Instruct chat template verbatim, so prompts are rendered the same way,
- a byte-level BPE tokenizer whose post-processor prepends `<|begin_of_text|>` like Llama 3's does,
- a pad token `<|finetune_right_pad_id|>` distinct from eos (as in Llama 3.1).

One deliberate difference: numbers are split into single digits (Llama 3 groups up to three digits).
The pipeline's prompts are mostly numbers, and digit-by-digit tokens make equal digits map to equal
tokens wherever they appear, which a tiny model trained on a few hundred lines needs.

Its weights are random (seeded): it is a stand-in that lets the whole pipeline run end to end, not a
model that knows anything. Nothing here touches the Hugging Face hub: every load passes
`local_files_only=True`, and the tokenizer is trained locally with the `tokenizers` library.

This module must not import dagster, duckdb or mlflow: it runs on the GPU image, which lacks them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

LLAMA3_CHAT_TEMPLATE: str = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
"""The chat template of Meta-Llama-3-8B-Instruct, verbatim (the string is only split for line length).

The embedded model carries the same template as the real checkpoint so that a prompt renders to the same
text, and hence the same token structure, whichever base model is used."""

BOS_TOKEN = "<|begin_of_text|>"
"""Start of every sequence; the chat template and the tokenizer's post-processor both emit it."""
END_OF_TEXT_TOKEN = "<|end_of_text|>"
"""End of a document in pre-training (Llama 3's base-model eos)."""
START_HEADER_TOKEN = "<|start_header_id|>"
"""Opens a message's role header in the chat format."""
END_HEADER_TOKEN = "<|end_header_id|>"
"""Closes a message's role header in the chat format."""
EOT_TOKEN = "<|eot_id|>"
"""End of a chat turn; the eos of the Instruct model."""
PAD_TOKEN = "<|finetune_right_pad_id|>"
"""Padding token of Llama 3.1; distinct from eos so that padding is never confused with a real turn end."""

LLAMA3_SPECIAL_TOKENS: tuple[str, ...] = (
    BOS_TOKEN,
    END_OF_TEXT_TOKEN,
    START_HEADER_TOKEN,
    END_HEADER_TOKEN,
    EOT_TOKEN,
    PAD_TOKEN,
)
"""The Llama-3 special tokens the embedded tokenizer defines (each encodes to exactly one token)."""

EMBEDDED_MODEL_INFO_FILE = "embedded_model.json"
"""File in an embedded model's directory that records how it was built (spec, corpus fingerprint)."""

EMBEDDED_MODEL_FORMAT_VERSION = 1
"""Bumped when the way the embedded model is built changes, so stale builds can be recognised."""

_N_BYTE_SYMBOLS = 256
"""Size of the byte-level alphabet: the smallest vocabulary that can encode any text."""


@dataclass(frozen=True)
class TinyLlamaSpec:
    """Shape of the embedded tiny Llama: Llama 3's architecture at a size a CPU trains in seconds."""

    vocab_size: int = 4096
    """Target size of the BPE vocabulary. The trained tokenizer may be smaller when the corpus offers
    fewer merges; the model's embedding is sized to the actual tokenizer, never to this target."""
    hidden_size: int = 128
    """Width of the residual stream, i.e. of the hidden states the regression head reads."""
    intermediate_size: int = 352
    """Width of the SwiGLU MLP (about 2.75x hidden, close to Llama 3's 14336 / 4096 = 3.5x)."""
    num_hidden_layers: int = 2
    """Number of decoder layers."""
    num_attention_heads: int = 4
    """Number of query heads; must divide hidden_size, and the head size must be even for RoPE."""
    num_key_value_heads: int = 2
    """Number of key/value heads, fewer than query heads: grouped-query attention as in Llama 3."""
    max_position_embeddings: int = 2048
    """Longest sequence the model (and the tokenizer's model_max_length) accepts."""
    rope_theta: float = 500000.0
    """RoPE base frequency, Llama 3's value."""
    seed: int = 0
    """Seed of the random initialisation: the same texts and spec give bit-identical weights."""

    def __post_init__(self) -> None:
        positive_ints = {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "max_position_embeddings": self.max_position_embeddings,
        }
        for name, value in positive_ints.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TinyLlamaSpec.{name} must be a positive int, got {value!r}")
        min_vocab = _N_BYTE_SYMBOLS + len(LLAMA3_SPECIAL_TOKENS)
        if self.vocab_size < min_vocab:
            raise ValueError(
                f"TinyLlamaSpec.vocab_size must be at least {min_vocab} (256 byte symbols + "
                f"{len(LLAMA3_SPECIAL_TOKENS)} special tokens), got {self.vocab_size}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"TinyLlamaSpec.hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if (self.hidden_size // self.num_attention_heads) % 2:
            raise ValueError(
                f"TinyLlamaSpec head size hidden_size / num_attention_heads = "
                f"{self.hidden_size // self.num_attention_heads} must be even (RoPE rotates pairs)"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"TinyLlamaSpec.num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if (
            isinstance(self.rope_theta, bool)
            or not isinstance(self.rope_theta, int | float)
            or not math.isfinite(self.rope_theta)
            or self.rope_theta <= 0
        ):
            raise ValueError(f"TinyLlamaSpec.rope_theta must be a finite number > 0, got {self.rope_theta!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"TinyLlamaSpec.seed must be an int >= 0, got {self.seed!r}")


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    model_max_length: int = TinyLlamaSpec.max_position_embeddings,
) -> PreTrainedTokenizerBase:
    """Train a Llama-3-style byte-level BPE tokenizer on `texts`, locally, and wrap it for transformers.

    Byte-level BPE (as in Llama 3) can encode any string without an unknown token. The pre-tokenizer
    splits every digit on its own before the byte-level split, so a number always tokenizes digit by
    digit, independently of the merges learnt from the corpus. The special tokens are the Llama-3 ones;
    bos is `<|begin_of_text|>`, eos `<|eot_id|>` (the Instruct model's end of turn), pad
    `<|finetune_right_pad_id|>`. Like Llama 3's tokenizer, plain encoding prepends bos; text already
    rendered by the chat template (which writes bos itself) must be encoded with
    `add_special_tokens=False`, exactly as with the real checkpoint.

    Deterministic: the same texts (in the same order) and vocab_size give the same tokenizer.
    """
    corpus = [texts] if isinstance(texts, str) else list(texts)
    if not corpus:
        raise ValueError("train_tokenizer needs at least one text to learn merges from")
    bad = next((t for t in corpus if not isinstance(t, str)), None)
    if bad is not None:
        raise TypeError(f"train_tokenizer expects str texts, got {type(bad).__name__}")
    min_vocab = _N_BYTE_SYMBOLS + len(LLAMA3_SPECIAL_TOKENS)
    if vocab_size < min_vocab:
        raise ValueError(f"vocab_size must be at least {min_vocab}, got {vocab_size}")

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(LLAMA3_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer, length=len(corpus))
    # Merges were learnt inside GPT-2 regex words (letters, punctuation runs, whitespace), so the vocabulary
    # is made of word pieces as in Llama 3. Encoding then skips the regex split, which is about 3x faster:
    # a learnt merge can only join pieces of one class, so words still tokenize as words (a run of
    # newlines may now take one token instead of two). The digit split stays, so numbers always
    # tokenize digit by digit, and byte-level encoding keeps it lossless (both tested).
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bos_id = tok.token_to_id(BOS_TOKEN)
    # Llama 3's post-processor: byte-level offsets, then bos in front of each sequence.
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{BOS_TOKEN} $A",
                pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B:1",
                special_tokens=[(BOS_TOKEN, bos_id)],
            ),
        ]
    )

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOT_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=model_max_length,
    )
    wrapped.chat_template = LLAMA3_CHAT_TEMPLATE
    return wrapped


def _texts_fingerprint(texts: list[str]) -> str:
    """SHA-256 over the texts (length-prefixed, so boundaries count): identifies the tokenizer corpus."""
    h = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def _llama_config(spec: TinyLlamaSpec, tokenizer: PreTrainedTokenizerBase) -> LlamaConfig:
    """The `LlamaConfig` of the embedded model: Llama 3's hyper-parameters except for the sizes."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": float(spec.rope_theta)},
        hidden_act="silu",
        rms_norm_eps=1e-5,
        initializer_range=0.02,
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )


def _swap_into_place(built: Path, out_dir: Path) -> None:
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


def build_embedded_base_model(
    out_dir: Path,
    texts: Iterable[str],
    spec: TinyLlamaSpec = TinyLlamaSpec(),
) -> Path:
    """Build the embedded tiny Llama into `out_dir` as a regular Hugging Face checkpoint; return `out_dir`.

    Trains the tokenizer on `texts` (typically the pipeline's own prompts, so the vocabulary fits
    them), initialises `LlamaForCausalLM` randomly under `spec.seed`, and saves model (safetensors,
    float32) and tokenizer with `save_pretrained`, plus `embedded_model.json` recording the spec and a
    fingerprint of the texts. The result loads with `AutoModel.from_pretrained(out_dir)` like any
    checkpoint.

    Atomic: the model is built in a temporary sibling directory and renamed to `out_dir` only once
    complete, so a failed build leaves a previous good model in `out_dir` untouched. The global torch
    RNG state of the caller is not changed. Same texts and spec give bit-identical weights.
    """
    out_dir = Path(out_dir)
    corpus = [texts] if isinstance(texts, str) else list(texts)
    tokenizer = train_tokenizer(corpus, spec.vocab_size, model_max_length=spec.max_position_embeddings)
    config = _llama_config(spec, tokenizer)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        # fork_rng: seed for a reproducible init without disturbing the caller's RNG stream.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            model = LlamaForCausalLM(config).to(torch.float32)
        model.eval()
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        info = {
            "format_version": EMBEDDED_MODEL_FORMAT_VERSION,
            "description": "Embedded tiny Llama-3-style model with random weights (stand-in base model).",
            "spec": asdict(spec),
            "tokenizer_vocab_size": len(tokenizer),
            "n_parameters": sum(p.numel() for p in model.parameters()),
            "n_training_texts": len(corpus),
            "texts_sha256": _texts_fingerprint(corpus),
        }
        (tmp / EMBEDDED_MODEL_INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        tmp.chmod(0o755)  # mkdtemp creates 0700; a model directory is readable like any checkpoint
        _swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
"""Any one of these marks a directory as holding a Hugging Face tokenizer."""


def _require_model_dir(path: str | os.PathLike[str]) -> Path:
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


def _ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> str:
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
    `_ensure_pad_token`). The prompts are chat-formatted, so a tokenizer without a chat template (a base,
    non-Instruct checkpoint) is rejected rather than silently formatting prompts differently.
    """
    p = _require_model_dir(path)
    tokenizer = AutoTokenizer.from_pretrained(p, local_files_only=True)
    _ensure_pad_token(tokenizer)
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
) -> PreTrainedModel:
    """Load the base model without its LM head (`AutoModel`): the regression head replaces the head.

    `dtype` (e.g. `torch.bfloat16` on GPU) and `device_map` are passed through when given; otherwise the
    transformers defaults apply.
    """
    p = _require_model_dir(path)
    return AutoModel.from_pretrained(p, **_load_kwargs(dtype, device_map))


def load_causal_lm(
    path: str | os.PathLike[str],
    dtype: torch.dtype | str | None = None,
    device_map: str | dict[str, Any] | None = None,
) -> PreTrainedModel:
    """Load the base model with its LM head (`AutoModelForCausalLM`), e.g. to check a save/load round trip."""
    p = _require_model_dir(path)
    return AutoModelForCausalLM.from_pretrained(p, **_load_kwargs(dtype, device_map))


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
    p = _require_model_dir(path)
    config = AutoConfig.from_pretrained(p, local_files_only=True)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    tokenizer = AutoTokenizer.from_pretrained(p, local_files_only=True)
    pad_source = _ensure_pad_token(tokenizer)

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


def resolve_base_model_dir(base_model: str | None, data_dir: Path) -> tuple[Path, bool]:
    """Where the base model lives: `(path, is_user_supplied)`.

    A user-supplied `base_model` must be an existing local Hugging Face model directory (checked here, so
    a typo fails at the start of a run, not after data preparation). When it is None or blank the
    embedded model's location `data_dir / "models" / "base_model"` is returned; it need not exist yet
    (the pipeline builds it there).
    """
    if base_model is not None and base_model.strip():
        return _require_model_dir(base_model.strip()).resolve(), True
    return Path(data_dir) / "models" / "base_model", False
