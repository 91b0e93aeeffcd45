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
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
    get_cosine_with_min_lr_schedule_with_warmup,
)

from modeling.backbones.common import (
    EMBEDDED_MODEL_INFO_FILE,
    PAD_TOKEN,
    build_dir_next_to,
    swap_into_place,
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

LLAMA3_SPECIAL_TOKENS: tuple[str, ...] = (
    BOS_TOKEN,
    END_OF_TEXT_TOKEN,
    START_HEADER_TOKEN,
    END_HEADER_TOKEN,
    EOT_TOKEN,
    PAD_TOKEN,
)
"""The Llama-3 special tokens the embedded tokenizer defines (each encodes to exactly one token)."""

EMBEDDED_MODEL_FORMAT_VERSION = 2
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


# --- pretraining ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PretrainSpec:
    """Budget and optimiser of the embedded model's causal-LM pretraining on train-split prompts."""

    max_rows: int = 8_000
    """Train-split prompts drawn (seeded, without replacement) to pretrain on; 0 = no pretraining (the
    backbone keeps its random initialisation, the ablation)."""
    epochs: int = 1
    """Passes over the drawn prompts."""
    max_steps: int | None = None
    """Optimizer steps cap (None = epochs x batches)."""
    time_budget_s: float | None = None
    """Wall-clock cap in seconds (None = none). A run stopped by it is not reproducible step for step:
    keep it None where determinism matters and bound the work with rows and steps instead."""
    batch_size: int = 32
    """Prompts per optimizer step."""
    learning_rate: float = 3e-3
    """Peak AdamW learning rate (a tiny model from scratch takes a large one)."""
    min_lr_ratio: float = 0.1
    """The cosine schedule ends at this fraction of the peak."""
    warmup_steps: int = 20
    """Linear warm-up steps."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    eval_rows: int = 256
    """Validation prompts whose per-token loss is measured before and after (never trained on)."""
    seed: int = 0
    """Seed of the row draw and of the batch order."""

    def __post_init__(self) -> None:
        for name in ("max_rows", "epochs", "batch_size", "warmup_steps", "eval_rows", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"PretrainSpec.{name} must be an int >= 0, got {value!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("PretrainSpec.epochs and batch_size must be >= 1")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"PretrainSpec.max_steps must be >= 1 or None, got {self.max_steps}")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ValueError(f"PretrainSpec.time_budget_s must be > 0 or None, got {self.time_budget_s}")
        if not (self.learning_rate > 0 and 0 <= self.min_lr_ratio <= 1 and self.max_grad_norm > 0):
            raise ValueError(
                "PretrainSpec needs learning_rate > 0, min_lr_ratio in [0, 1] and max_grad_norm > 0"
            )


@dataclass(frozen=True)
class PretrainReport:
    """What the pretraining did, for `embedded_model.json`, asset metadata and BENCHMARKS.md."""

    rows: int
    """Distinct train prompts drawn."""
    steps: int
    """Optimizer steps taken."""
    samples: int
    """Prompts processed (rows x epochs when not stopped early)."""
    tokens: int
    """Tokens processed (padding excluded)."""
    wall_s: float
    """Wall time of the training loop (tokenisation and the two evaluations excluded)."""
    eval_rows: int
    """Validation prompts the loss was measured on."""
    val_loss_before: float
    """Causal-LM loss on the validation prompts at random initialisation, nats per predicted token."""
    val_loss_after: float
    """The same after pretraining."""
    train_loss_last: float | None
    """Mean training loss over the last 10 steps (None without steps)."""
    stopped_by: str
    """What ended the run: `data` (all epochs), `max_steps`, `time_budget` or `disabled`."""

    @property
    def rows_per_s(self) -> float:
        return self.samples / self.wall_s if self.wall_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rows_per_s": round(self.rows_per_s, 2)}


PRETRAINING_COLUMNS_EXCLUDED = ("label", "weight", "bucket", "fwd_ret", "fwd_ret_excess")
"""Columns of the training set that the pretraining rows never carry: it learns from prompt text only."""


def select_pretraining_rows(
    training_set: pd.DataFrame, spec: PretrainSpec
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(train rows to pretrain on, validation rows to measure the held-out loss on), labels dropped.

    Only `split == "train"` rows are ever drawn for training (distinct (date, symbol): a resampled
    training set repeats rows); `spec.eval_rows` validation rows are drawn for the before/after loss.
    Test and live rows are never returned. Both draws are seeded and returned in (date, symbol) order.
    """
    if "split" not in training_set.columns:
        raise KeyError("the training set has no 'split' column")
    keep = [c for c in training_set.columns if c not in PRETRAINING_COLUMNS_EXCLUDED]
    rng = np.random.default_rng(spec.seed)

    def draw(split: str, n: int) -> pd.DataFrame:
        rows = training_set.loc[training_set["split"] == split, keep].drop_duplicates(["date", "symbol"])
        if n < len(rows):
            rows = rows.iloc[np.sort(rng.choice(len(rows), size=n, replace=False))]
        return rows.sort_values(["date", "symbol"], kind="stable").reset_index(drop=True)

    train = draw("train", spec.max_rows)
    if spec.max_rows and train.empty:
        raise ValueError("the training set has no train rows to pretrain the embedded backbone on")
    return train, draw("validation", spec.eval_rows)


def _encode(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    # the chat template already wrote bos: no special tokens added, exactly as in the regressor
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"] if texts else []


def _lm_batch(tokenizer: PreTrainedTokenizerBase, ids: list[list[int]]) -> dict[str, torch.Tensor]:
    batch = tokenizer.pad({"input_ids": ids}, pad_to_multiple_of=8, return_tensors="pt")
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batch


@torch.no_grad()
def lm_loss_per_token(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], batch_size: int = 32
) -> float:
    """Mean causal-LM cross-entropy over every predicted token of `texts`, in nats per token."""
    ids = _encode(tokenizer, texts)
    if not ids:
        return float("nan")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(ids), batch_size):
        batch = _lm_batch(tokenizer, ids[start : start + batch_size])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        # position t predicts token t+1; padded targets are ignored
        targets = batch["labels"][:, 1:]
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2).float(), targets, ignore_index=-100, reduction="sum"
        )
        total += float(losses)
        count += int((targets != -100).sum())
    model.train(was_training)
    return total / count


def pretrain_causal_lm(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train_texts: Sequence[str],
    eval_texts: Sequence[str],
    spec: PretrainSpec,
    log: Callable[[str], None] | None = None,
) -> PretrainReport:
    """Full-parameter causal-LM training of `model` on `train_texts` (in place), within `spec`'s budget.

    Seeded: the batch order comes from a generator seeded with `spec.seed`, so the same texts and spec
    give the same weights (when no time budget cuts the run short). The loss on `eval_texts` is measured
    before and after with `lm_loss_per_token`.
    """
    before = lm_loss_per_token(model, tokenizer, eval_texts)
    ids = _encode(tokenizer, train_texts)
    if not ids:
        return PretrainReport(0, 0, 0, 0, 0.0, len(eval_texts), before, before, None, "disabled")
    per_epoch = math.ceil(len(ids) / spec.batch_size)
    total_steps = spec.epochs * per_epoch
    if spec.max_steps is not None:
        total_steps = min(total_steps, spec.max_steps)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if param.ndim < 2 or "norm" in name else decay).append(param)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=spec.learning_rate,
    )
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, min(spec.warmup_steps, total_steps), total_steps, min_lr_rate=spec.min_lr_ratio
    )
    generator = torch.Generator().manual_seed(spec.seed)
    model.train()
    steps = samples = tokens = 0
    recent: list[float] = []
    stopped_by = "data"
    started = time.perf_counter()
    for _ in range(spec.epochs):
        order = torch.randperm(len(ids), generator=generator).tolist()
        for start in range(0, len(order), spec.batch_size):
            batch = _lm_batch(tokenizer, [ids[i] for i in order[start : start + spec.batch_size]])
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), spec.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            steps += 1
            samples += len(batch["input_ids"])
            tokens += int(batch["attention_mask"].sum())
            recent = [*recent[-9:], float(loss.detach())]
            if log is not None and (steps % 50 == 0 or steps == total_steps):
                elapsed = time.perf_counter() - started
                log(
                    f"pretraining step {steps}/{total_steps}: loss {recent[-1]:.3f}, "
                    f"{samples / elapsed:.0f} prompts/s"
                )
            if steps >= total_steps:
                stopped_by = "max_steps" if spec.max_steps is not None and steps == spec.max_steps else "data"
                break
            if spec.time_budget_s is not None and time.perf_counter() - started >= spec.time_budget_s:
                stopped_by = "time_budget"
                break
        if stopped_by != "data" or steps >= total_steps:
            break
    wall = time.perf_counter() - started
    model.eval()
    after = lm_loss_per_token(model, tokenizer, eval_texts)
    return PretrainReport(
        rows=len(ids),
        steps=steps,
        samples=samples,
        tokens=tokens,
        wall_s=round(wall, 3),
        eval_rows=len(eval_texts),
        val_loss_before=before,
        val_loss_after=after,
        train_loss_last=float(np.mean(recent)) if recent else None,
        stopped_by=stopped_by,
    )


# --- build ----------------------------------------------------------------------------------------------
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


def build_key(payload: dict[str, Any]) -> str:
    """A short, stable hash of a JSON-serialisable payload (config + code version): when it is unchanged,
    an existing embedded model is reused instead of being rebuilt."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


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
    pretrained_to = (info.get("pretrain_train_dates") or [None, None])[1]
    if pretrained_to is not None and str(pretrained_to) > str(train_end):
        return False, (
            f"it was pretrained on prompts up to {pretrained_to}, after the current train end {train_end}"
        )
    return True, f"build key {key} unchanged and pretrained on train dates only"
