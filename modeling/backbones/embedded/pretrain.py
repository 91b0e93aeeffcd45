"""The embedded backbone's pretraining: a bounded, full-parameter causal-LM pass over train-split prompts
(never labels, never a validation, test or live prompt), and its held-out loss before and after."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from modeling.inference import encode_prompts, pad_batch
from modeling.optim import lr_factor, param_groups

LOSS_TOKENS = ("all", "values")
"""The `PretrainSpec.loss_tokens` choices."""
VALUE_CHARACTERS = frozenset("0123456789.-=")
"""A token with any of these characters is part of a prompt's numbers (its digits, point and sign; the
'=' tokens, some merged with the sign, are where a value starts)."""


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
    loss_tokens: str = "all"
    """Which next tokens the loss (and the LM head) covers: `all` (the causal-LM loss), or `values`: only
    targets that are part of a number (a digit, '.', '-' or the '=' before a value, `VALUE_CHARACTERS`).
    `values` runs a step 1.32x faster (the head over the vocabulary is about a third of it) but the
    regressor on such a backbone scored -0.0072 +- 0.0032 validation RankIC over 3 seeds (BENCHMARKS.md):
    predicting the template's tokens is how the backbone learns which feature a number belongs to."""

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
        if self.loss_tokens not in LOSS_TOKENS:
            raise ValueError(
                f"PretrainSpec.loss_tokens must be one of {LOSS_TOKENS}, got {self.loss_tokens!r}"
            )
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
    val_value_loss_before: float
    """The loss on the validation prompts' number tokens only (`value_vocabulary`), at initialisation."""
    val_value_loss_after: float
    """The same after pretraining: what `loss_tokens="values"` trains, comparable across both choices."""
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


def _lm_batch(tokenizer: PreTrainedTokenizerBase, ids: list[list[int]]) -> dict[str, torch.Tensor]:
    """A padded batch (the inference path's padding) whose labels ignore the padding."""
    batch = pad_batch(tokenizer, ids)
    batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return batch


def value_vocabulary(tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    """[vocab] bool: the token ids whose text has a `VALUE_CHARACTERS` character."""
    return torch.tensor(
        [not VALUE_CHARACTERS.isdisjoint(tokenizer.decode([i])) for i in range(len(tokenizer))]
    )


def number_targets(labels: torch.Tensor, vocabulary: torch.Tensor) -> torch.Tensor:
    """[B, T-1] bool: the next-token targets of a `_lm_batch`'s `labels` that are in `vocabulary` (padding
    excluded); position t predicts token t+1."""
    targets = labels[:, 1:]
    return (targets != -100) & vocabulary[targets.clamp(min=0)]


def value_token_loss(
    model: PreTrainedModel, batch: dict[str, torch.Tensor], vocabulary: torch.Tensor
) -> torch.Tensor:
    """Mean next-token cross-entropy over the targets in `vocabulary` (padding excluded).

    The decoder runs on every position (the numbers' context is the whole prompt); the LM head and the
    softmax run only on the positions whose next token is kept, which is where the step's time goes.
    """
    hidden = model.get_decoder()(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state  # [B, T, H]
    targets = batch["labels"][:, 1:]  # [B, T-1]: position t predicts token t+1
    keep = number_targets(batch["labels"], vocabulary)
    if not bool(keep.any()):
        raise ValueError("a pretraining batch has no value tokens to predict (loss_tokens='values')")
    logits = model.get_output_embeddings()(hidden[:, :-1][keep])  # [N kept, vocab]
    return torch.nn.functional.cross_entropy(logits.float(), targets[keep])


@torch.no_grad()
def lm_loss_per_token(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    batch_size: int = 32,
    vocabulary: torch.Tensor | None = None,
) -> float:
    """Mean causal-LM cross-entropy over every predicted token of `texts`, in nats per token; with
    `vocabulary` ([vocab] bool, `value_vocabulary`), over the targets in it only."""
    ids = encode_prompts(tokenizer, texts)
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
        if vocabulary is not None:
            targets = targets.masked_fill(~number_targets(batch["labels"], vocabulary), -100)
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2).float(), targets, ignore_index=-100, reduction="sum"
        )
        total += float(losses)
        count += int((targets != -100).sum())
    model.train(was_training)
    return total / count if count else float("nan")


def _optimizer_and_schedule(
    model: PreTrainedModel, spec: PretrainSpec, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the trainer's parameter groups (`modeling.optim.param_groups`: weight decay on the
    matrices, not on norms and biases), and the trainer's schedule (`modeling.optim.lr_factor`): linear
    warm-up over `spec.warmup_steps`, then cosine decay to `spec.min_lr_ratio` at `total_steps`."""
    optimizer = torch.optim.AdamW(
        param_groups(model, spec.learning_rate, spec.weight_decay), lr=spec.learning_rate
    )
    warmup_ratio = min(spec.warmup_steps, total_steps) / total_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step / total_steps, warmup_ratio, spec.min_lr_ratio)
    )
    return optimizer, scheduler


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
    numbers = value_vocabulary(tokenizer)
    before = lm_loss_per_token(model, tokenizer, eval_texts)
    values_before = lm_loss_per_token(model, tokenizer, eval_texts, vocabulary=numbers)
    ids = encode_prompts(tokenizer, train_texts)
    if not ids:
        return PretrainReport(
            0, 0, 0, 0, 0.0, len(eval_texts), before, before, values_before, values_before, None, "disabled"
        )
    per_epoch = math.ceil(len(ids) / spec.batch_size)
    total_steps = spec.epochs * per_epoch
    if spec.max_steps is not None:
        total_steps = min(total_steps, spec.max_steps)
    optimizer, scheduler = _optimizer_and_schedule(model, spec, total_steps)
    generator = torch.Generator().manual_seed(spec.seed)
    vocabulary = numbers if spec.loss_tokens == "values" else None
    model.train()
    steps = samples = tokens = 0
    recent: list[float] = []
    stopped_by = "data"
    started = time.perf_counter()
    for _ in range(spec.epochs):
        order = torch.randperm(len(ids), generator=generator).tolist()
        for start in range(0, len(order), spec.batch_size):
            batch = _lm_batch(tokenizer, [ids[i] for i in order[start : start + spec.batch_size]])
            loss = model(**batch).loss if vocabulary is None else value_token_loss(model, batch, vocabulary)
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
        val_value_loss_before=values_before,
        val_value_loss_after=lm_loss_per_token(model, tokenizer, eval_texts, vocabulary=numbers),
        train_loss_last=float(np.mean(recent)) if recent else None,
        stopped_by=stopped_by,
    )
