"""The frozen trunk's hidden states, computed once per row and read back, instead of once per forward.

With LoRA in the last decoder layer only (the cpu profile: `LoraSettings.last_layers = 1`), a Llama
backbone's token embeddings and layers 0..L-2 are frozen: the hidden states they give a prompt never
change during training. The trainer reads the same rows many times: two passes over the train sample,
and the same validation dates at every periodic evaluation. That trunk is about 55-65% of a training
step and 80% of a scoring forward of the embedded backbone on 2 cores (BENCHMARKS.md, "The frozen-trunk
cache"), so each row's trunk runs once, here, and every later forward reads it (`LLMRegressor.forward`'s
`trunk`, through the last-layer shortcut).

    rows' token ids -> llama_trunk in length-sorted batches (no autograd) -> states [sum of tokens, H]
    a batch (row indices, attention mask [B, T]) -> states scattered to the mask's real positions [B, T, H]

The states are kept unpadded in one fp32 tensor on the CPU (4 x H bytes per token: 3 GB for the cpu
profile's 24k train rows on the 128-wide embedded model), built only when they fit `max_bytes`: an 8B
backbone's 4096-wide states of every train row never do, so the GPU profile recomputes as before.
Padding positions get zeros, which the last layer masks out as keys. A row's states do not depend on
which batch computes them beyond float rounding (the matrix products' blocking follows the batch
shape), so a cached forward matches a recomputed one to about 1e-6; the cache is built in a fixed order
from the rows alone, so a resumed run reads the same states as an uninterrupted one.

This module must not import dagster, duckdb or mlflow (it runs on the GPU image).
"""

from __future__ import annotations

import mmap
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from modeling.inference import cpu_workers, length_batches, pad_batch, run_forked
from modeling.llama_shortcut import llama_trunk, supports_last_layer_shortcut

BUILD_BATCH_SIZE = 32
"""Rows per trunk forward while building (the scoring batch: fastest on 2 CPU cores)."""


def trunk_frozen(model: nn.Module) -> bool:
    """True when an `LLMRegressor`'s trunk (token embeddings and layers 0..L-2) can be cached: a Llama base
    taking the last-layer shortcut, with no trainable parameter, no adapter and no dropout in the trunk."""
    from peft.tuners.lora import LoraLayer

    base = model.base
    if not (model.config.last_layer_shortcut and supports_last_layer_shortcut(base)):
        return False
    if float(getattr(base.config, "attention_dropout", 0.0) or 0.0) > 0:
        return False
    trunk = [base.embed_tokens, *base.layers[: base.config.num_hidden_layers - 1]]
    return not any(p.requires_grad for m in trunk for p in m.parameters()) and not any(
        isinstance(sub, LoraLayer) for m in trunk for sub in m.modules()
    )


def trunk_bytes(n_tokens: int, model: nn.Module) -> int:
    """Bytes the states of `n_tokens` tokens take (fp32)."""
    return 4 * int(n_tokens) * int(model.base.config.hidden_size)


class TrunkCache:
    """Every row's trunk states, unpadded: row i is `states[offsets[i]:offsets[i + 1]]` [T_i, H]."""

    def __init__(self, states: torch.Tensor, offsets: np.ndarray) -> None:
        if states.ndim != 2 or len(offsets) < 1 or int(offsets[-1]) != states.shape[0]:
            raise ValueError("TrunkCache: offsets must end at the number of stored token states")
        self.states = states  # [N_tokens, H]
        self.offsets = offsets  # [N + 1]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def nbytes(self) -> int:
        return self.states.numel() * self.states.element_size()

    @classmethod
    def build(
        cls,
        model: nn.Module,
        tokenizer: object,
        ids: Sequence[list[int]],
        device: torch.device | str = "cpu",
        workers: int | None = None,
    ) -> TrunkCache:
        """The trunk states of every row of `ids` (token ids, as the trainer holds them), built on `device`
        in length-sorted batches, stored on the CPU. `model` is an `LLMRegressor` with `trunk_frozen`.

        On the CPU the batches are shared out to forked one-thread processes like scoring's
        (`modeling.inference.cpu_workers`; None decides, 1 = this process), which write the states into
        one anonymous shared mapping that this process then reads: no copy back, no pickling."""
        if not trunk_frozen(model):
            raise ValueError("the model's trunk is not frozen (or not a Llama shortcut): nothing to cache")
        lengths = np.fromiter((len(x) for x in ids), dtype=np.int64, count=len(ids))
        offsets = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        batches = length_batches(lengths, BUILD_BATCH_SIZE)
        workers = cpu_workers(len(batches), device) if workers is None else workers
        if torch.device(device).type != "cpu":
            workers = 1  # CUDA does not survive a fork
        hidden_size = int(model.base.config.hidden_size)
        n_tokens = int(offsets[-1])
        states = _shared_empty(n_tokens, hidden_size) if workers > 1 else torch.empty(n_tokens, hidden_size)
        was_training = model.training
        model.eval()
        try:
            if workers > 1:
                run_forked(
                    lambda k, n: _fill(model, tokenizer, ids, batches[k::n], offsets, states, "cpu"), workers
                )
            else:
                _fill(model, tokenizer, ids, batches, offsets, states, device)
        finally:
            model.train(was_training)
        return cls(states, offsets)

    def batch(self, indices: torch.Tensor | Sequence[int], attention_mask: torch.Tensor) -> torch.Tensor:
        """The states of rows `indices` laid out on the batch's real positions (the mask's ones, under
        either padding side), zeros elsewhere: [B, T] -> [B, T, H], on the mask's device."""
        indices = [int(i) for i in indices]
        mask = attention_mask.to(torch.bool).cpu()
        lengths = self.offsets[np.asarray(indices) + 1] - self.offsets[np.asarray(indices)]
        if len(indices) != mask.shape[0] or not np.array_equal(lengths, mask.sum(dim=1).numpy()):
            raise ValueError("the batch's attention mask does not match the cached rows' lengths")
        out = torch.zeros(*mask.shape, self.states.shape[1], dtype=self.states.dtype)
        out[mask] = torch.cat([self.states[self.offsets[i] : self.offsets[i + 1]] for i in indices])
        return out.to(attention_mask.device)


def _shared_empty(rows: int, cols: int) -> torch.Tensor:
    """An fp32 [rows, cols] tensor in an anonymous shared mapping: what forked children write into it,
    this process reads (the mapping lives as long as the tensor does)."""
    if rows * cols == 0:
        return torch.empty(rows, cols)
    buffer = mmap.mmap(-1, 4 * rows * cols)  # fileno -1: anonymous; MAP_SHARED is the default
    return torch.frombuffer(buffer, dtype=torch.float32).view(rows, cols)


@torch.no_grad()
def _fill(
    model: nn.Module,
    tokenizer: object,
    ids: Sequence[list[int]],
    batches: Sequence[np.ndarray],
    offsets: np.ndarray,
    states: torch.Tensor,
    device: torch.device | str,
) -> None:
    """Run the trunk on `batches` of rows and write each row's real positions to its slice of `states`."""
    for idx in batches:
        batch = pad_batch(tokenizer, [ids[i] for i in idx], device)
        mask = batch["attention_mask"].to(torch.bool)
        hidden, _ = llama_trunk(model.base, batch["input_ids"], batch["attention_mask"])
        real = hidden[mask].float().cpu()  # [sum T_i, H], row by row, each in token order
        at = 0
        for i in idx:
            n = int(offsets[i + 1] - offsets[i])
            states[offsets[i] : offsets[i + 1]] = real[at : at + n]
            at += n
