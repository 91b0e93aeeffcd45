"""Building the embedded backbone: the tiny Llama 3 configuration, the seeded build (tokenizer ->
weights -> pretraining -> a checkpoint written atomically), its info file and the reuse rule."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
)

from modeling.backbones.common import (
    EMBEDDED_MODEL_INFO_FILE,
    build_dir_next_to,
    swap_into_place,
)
from modeling.backbones.embedded.pretrain import PretrainSpec, pretrain_causal_lm
from modeling.backbones.embedded.tokenizer import (
    _N_BYTE_SYMBOLS,
    LLAMA3_SPECIAL_TOKENS,
    MAX_POSITION_EMBEDDINGS,
    _texts_fingerprint,
    train_tokenizer,
)
from modeling.backbones.files import build_key  # noqa: F401 (re-exported)

EMBEDDED_MODEL_FORMAT_VERSION = 2
"""Bumped when the way the embedded model is built changes, so stale builds can be recognised."""


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
    max_position_embeddings: int = MAX_POSITION_EMBEDDINGS
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


PretrainingTexts = Callable[[PreTrainedTokenizerBase], tuple[list[str], list[str]]]
"""Renders (train prompts, validation prompts) with the freshly trained tokenizer: the prompts need the
tokenizer's chat template, and the backbone is then trained on them, so the caller hands over a
function rather than texts."""


def read_embedded_info(path: str | Path) -> dict[str, Any] | None:
    """The `embedded_model.json` of an embedded model directory, or None when there is none."""
    info = Path(path) / EMBEDDED_MODEL_INFO_FILE
    return json.loads(info.read_text()) if info.is_file() else None


def build_embedded_base_model(
    out_dir: Path,
    texts: Iterable[str],
    spec: TinyLlamaSpec = TinyLlamaSpec(),
    pretraining: PretrainingTexts | None = None,
    pretrain_spec: PretrainSpec | None = None,
    extra_info: dict[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Build the embedded tiny Llama into `out_dir` as a regular Hugging Face checkpoint; return `out_dir`.

    Trains the tokenizer on `texts` (prompt-like text, so the vocabulary fits the prompts), initialises
    `LlamaForCausalLM` randomly under `spec.seed`, then, when `pretraining` is given, pretrains it on the
    prompts that function renders (see `pretrain_causal_lm`). Model (safetensors, float32) and tokenizer
    are saved with `save_pretrained`, plus `embedded_model.json` recording the spec, the pretraining
    report, a fingerprint of the tokenizer texts and `extra_info` (the caller's build key, row ranges).

    Atomic: the model is built in a temporary sibling directory and renamed to `out_dir` only once
    complete, so a failed build or pretraining leaves a previous good model in `out_dir` untouched. The
    global torch RNG state of the caller is not changed. Same inputs give bit-identical weights.
    """
    out_dir = Path(out_dir)
    corpus = [texts] if isinstance(texts, str) else list(texts)
    tokenizer = train_tokenizer(corpus, spec.vocab_size, model_max_length=spec.max_position_embeddings)
    config = _llama_config(spec, tokenizer)
    pretrain_spec = pretrain_spec or PretrainSpec()
    tmp = build_dir_next_to(out_dir)
    try:
        # fork_rng: seed for a reproducible init without disturbing the caller's RNG stream.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            model = LlamaForCausalLM(config).to(torch.float32)
            report = None
            if pretraining is not None:
                train_texts, eval_texts = pretraining(tokenizer)
                report = pretrain_causal_lm(model, tokenizer, train_texts, eval_texts, pretrain_spec, log)
        model.eval()
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        pretrained = report is not None and report.steps > 0
        info = {
            "format_version": EMBEDDED_MODEL_FORMAT_VERSION,
            "description": (
                "Embedded tiny Llama-3-style model, causal-LM pretrained on train-split prompts."
                if pretrained
                else "Embedded tiny Llama-3-style model with random weights (no pretraining)."
            ),
            "pretrained": pretrained,
            "spec": asdict(spec),
            "pretrain_spec": asdict(pretrain_spec) if pretraining is not None else None,
            "pretraining": report.to_dict() if report is not None else None,
            "tokenizer_vocab_size": len(tokenizer),
            "n_parameters": sum(p.numel() for p in model.parameters()),
            "n_training_texts": len(corpus),
            "texts_sha256": _texts_fingerprint(corpus),
            **(extra_info or {}),
        }
        (tmp / EMBEDDED_MODEL_INFO_FILE).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        swap_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def pretrain_dates(info: dict[str, Any] | None) -> tuple[str | None, str | None]:
    """(first, last) date of the prompts an embedded model (`read_embedded_info`) was pretrained on;
    (None, None) when it records none (not pretrained, or not an embedded model)."""
    first, last = (info or {}).get("pretrain_train_dates") or [None, None]
    return (None if first is None else str(first)), (None if last is None else str(last))


def pretrained_past(info: dict[str, Any] | None, train_end: str) -> str | None:
    """The last date an embedded model was pretrained on, when it is after `train_end` (its prompts are
    validation or test rows of the current split: a look-ahead); None when it is within the train split
    or the model records no pretraining dates."""
    last = pretrain_dates(info)[1]
    return last if last is not None and last > str(train_end) else None


def reuse_decision(info: dict[str, Any] | None, key: str, train_end: str) -> tuple[bool, str]:
    """Keep the existing embedded model (True) or rebuild it, and why.

    Kept only when it was built with the same build key (config and code version) and every prompt it
    was pretrained on is still dated within the train split: when the split moves earlier (other split
    settings, less data), a backbone that read prompts now in validation or test would leak, so it is
    rebuilt. New days arriving (the daily run) move the train end later and keep the model.
    """
    if info is None:
        return False, "no embedded model yet"
    if info.get("build_key") != key:
        return False, "its config or code version changed"
    if pretrained_to := pretrained_past(info, train_end):
        return False, (
            f"it was pretrained on prompts up to {pretrained_to}, after the current train end {train_end}"
        )
    return True, f"build key {key} unchanged and pretrained on train dates only"
