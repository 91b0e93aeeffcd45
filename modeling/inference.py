"""Scoring: the one inference path of the regressor (training's evaluation, the experiment, the pyfunc,
the predictions asset and the benchmarks all call `predict_ids`).

Forward only, under `torch.inference_mode` (no autograd graph), rows sorted by token length and cut
into batches of similar length (little padding), the LoRA updates folded into the frozen weights for
the duration (`merged_adapters`), no LM head and the last-layer shortcut (both in `LLMRegressor`).
Given an `accelerate.Accelerator` the batches are shared out across its processes and gathered, so a
DDP run evaluates in 1/N of the time and every process gets every prediction. Without one, on a CPU
with several cores, the batches are shared out the same way across forked single-threaded worker
processes (`cpu_workers`): the embedded backbone's matrix products (inner size 128) use a second thread
poorly, and two one-thread processes score about 1.2x the rows per second of one two-thread process on
2 cores (BENCHMARKS.md, "Scoring on forked workers"). Each batch's forecasts do not depend on which
process scored it.

This module must not import dagster, duckdb or mlflow (it runs on the GPU image). It does not import
`modeling.model` either (which re-exports `predict_prompts` for old pyfunc code): a model here is an
`LLMRegressor` by its interface (`adapters_mergeable`, `lora_layers`, `backbone`, a forward on ids and
mask), so it is typed as a torch module.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager, nullcontext
from typing import Any

import numpy as np
import torch
from torch import nn

DEFAULT_PREDICT_BATCH_SIZE = 32
"""Rows per forward pass when scoring. On 2 CPU cores the embedded backbone scores fastest at 16-32 rows
(the activations stay in cache; at 128 rows it is 40% slower); a GPU caller passes a larger one."""
MIN_BATCHES_PER_WORKER = 4
"""Fewer batches than this per worker are scored in the calling process: each fork copies this process's
page tables and starts a pool worker, which a few batches would not repay."""


# --- tokens ---------------------------------------------------------------------------------------------
ENCODE_CHUNK = 1024
"""Prompts per call of a fast tokenizer's Rust backend (its working set stays in cache)."""


def encode_prompts(tokenizer: Any, prompts: list[str]) -> list[list[int]]:
    """Token ids of rendered prompts (the chat template already wrote bos: no special tokens added).

    A fast tokenizer without truncation or padding encodes through its Rust backend in chunks
    (`encode_batch_fast`: no offsets computed), the same ids as `tokenizer(prompts)` (tested) in about
    half the time; the final comparison tokenises some 200k prompts. Others take the generic call."""
    if not len(prompts):
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.truncation is not None or backend.padding is not None:
        return tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    prompts = list(prompts)
    return [
        encoding.ids
        for start in range(0, len(prompts), ENCODE_CHUNK)
        for encoding in backend.encode_batch_fast(
            prompts[start : start + ENCODE_CHUNK], add_special_tokens=False
        )
    ]


def pad_batch(
    tokenizer: Any,
    ids: list[list[int]],
    device: torch.device | str | None = None,
    pad_to_multiple_of: int | None = 8,
) -> dict[str, torch.Tensor]:
    """Dynamic padding of a batch (to the longest row, rounded up to a multiple of 8), on the tokenizer's
    padding side."""
    batch = tokenizer.pad({"input_ids": ids}, pad_to_multiple_of=pad_to_multiple_of, return_tensors="pt")
    return {k: v.to(device) for k, v in batch.items()} if device is not None else dict(batch)


def length_batches(lengths: np.ndarray | list[int], batch_size: int) -> list[np.ndarray]:
    """Row indices cut into batches of similar length (stable sort by length, then consecutive slices)."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


# --- merged adapters ------------------------------------------------------------------------------------
@contextmanager
def merged_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Inference with the LoRA updates folded into the frozen weights, restored bit for bit afterwards.

    Why: with a small backbone on a CPU, the adapters' cost is mostly not arithmetic but extra passes
    over the activations (two thin matmuls, a scale and an add per projection: 42 more ops per forward
    of the 2-layer embedded Llama); merged, each projection is one matmul, and scoring runs about 1.8x
    faster (BENCHMARKS.md). Only fp32 backbones are merged, and their original weights are copied back
    afterwards, so training goes on from exactly the weights it left. A bf16 or 4-bit backbone (the GPU
    path) is scored unmerged: folding a small update into bf16 and out again would round it away, and
    there the adapters cost little next to the large matmuls.
    """
    if not model.adapters_mergeable():  # (a loaded model is merged already: `load_regressor`)
        yield model
        return
    layers = model.lora_layers()
    saved = [layer.get_base_layer().weight.detach().clone() for layer in layers]
    model.backbone.merge_adapter()
    try:
        yield model
    finally:
        model.backbone.unmerge_adapter()
        with torch.no_grad():
            for layer, weight in zip(layers, saved, strict=True):
                layer.get_base_layer().weight.copy_(weight)


# --- prediction -----------------------------------------------------------------------------------------
def cpu_workers(n_batches: int, device: torch.device | str) -> int:
    """How many forked one-thread processes score `n_batches` batches on `device` (1: this process).

    One per core this process may run on, when the device is the CPU, fork exists (Linux), and there are
    at least `MIN_BATCHES_PER_WORKER` batches per worker. A fork copies only the calling thread; the
    children run only torch and the tokenizer's padding, whose locks (Python's own, glibc's allocator)
    are re-initialised in a forked child, so another thread of the parent cannot leave them held.
    """
    if torch.device(device).type != "cpu" or "fork" not in multiprocessing.get_all_start_methods():
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, n_batches // MIN_BATCHES_PER_WORKER))


def _score_batches(
    net: nn.Module,
    tokenizer: Any,
    ids: list[list[int]],
    batches: list[np.ndarray],
    device: Any,
    trunk: Any | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(row indices, forecasts) of `batches`, in batch order: the forward loop every path runs."""
    indices, values = [], []
    for idx in batches:
        batch = pad_batch(tokenizer, [ids[i] for i in idx], device)
        ids_, mask = batch["input_ids"], batch["attention_mask"]
        states = None if trunk is None else trunk.batch(idx, mask)  # the frozen layers': [B, T, H]
        pred = net(ids_, mask) if states is None else net(ids_, mask, trunk=states)
        values.append(pred.float().cpu().numpy())
        indices.append(idx)
    if not indices:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    return np.concatenate(indices), np.concatenate(values).astype(np.float64)


_FORKED: Callable[[int, int], Any] | None = None
"""In a worker of `run_forked`: its pool's task, set by `_take_task` when the worker starts."""


def _take_task(task: Callable[[int, int], Any]) -> None:
    """A forked worker's initializer: keep its pool's task (inherited through the fork, not pickled)."""
    global _FORKED
    _FORKED = task


def _run_share(share: int, workers: int) -> Any:
    """One forked worker: the task's share `share` of `workers`, on one thread (runs in the child)."""
    assert _FORKED is not None
    torch.set_num_threads(1)  # one core each; the parent's thread pool does not survive a fork anyway
    return _FORKED(share, workers)


def run_forked(task: Callable[[int, int], Any], workers: int) -> list[Any]:
    """`task(share, workers)` for share 0..workers-1, each in a forked one-thread process; the results in
    share order. The children inherit `task` and what it refers to (the model, the rows: copy-on-write)
    as their pool's initializer argument; only the results are pickled back. Each pool carries its own
    task, so threads of one process (a scoring server's requests) may call this at the same time. A
    worker that dies (killed for memory, say) raises `BrokenProcessPool` here, never a hang."""
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(
        max_workers=workers, mp_context=context, initializer=_take_task, initargs=(task,)
    ) as pool:
        return list(pool.map(_run_share, range(workers), [workers] * workers))


def _score_forked(
    net: nn.Module,
    tokenizer: Any,
    ids: list[list[int]],
    batches: list[np.ndarray],
    workers: int,
    trunk: Any | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """`_score_batches` across `workers` forked processes (interleaved batches: similar lengths each)."""

    @torch.inference_mode()
    def share(k: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        return _score_batches(net, tokenizer, ids, batches[k::n], "cpu", trunk)

    parts = run_forked(share, workers)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


@torch.inference_mode()
def predict_ids(
    model: nn.Module,
    tokenizer: Any,
    ids: list[list[int]],
    batch_size: int = DEFAULT_PREDICT_BATCH_SIZE,
    device: torch.device | str | None = None,
    progress: bool = False,
    accelerator: Any | None = None,
    workers: int | None = None,
    trunk: Any | None = None,
) -> np.ndarray:
    """Forecasts for tokenised prompts, in their order.

    With `accelerator` (a DDP-wrapped model is unwrapped): process p scores batches p, p + N, ..., the
    predictions are gathered, and every process returns all of them. Otherwise (no accelerator, or one
    process: the trainer's periodic evaluation on a CPU), `workers` forked one-thread processes share
    the batches the same way on the CPU (None: `cpu_workers` decides; 1: this process only; `progress`
    shows a bar only then). NaN predictions (a diverged model) stay NaN: the metrics count them, they
    never hide. `trunk`: a `modeling.trunk_cache.TrunkCache` of these `ids` (the trainer's validation
    rows), whose frozen layers' states are read instead of recomputed; forked workers inherit it.
    """
    net: nn.Module = accelerator.unwrap_model(model) if accelerator is not None else model
    device = accelerator.device if accelerator is not None else device or next(net.parameters()).device
    n_proc = accelerator.num_processes if accelerator is not None else 1
    rank = accelerator.process_index if accelerator is not None else 0
    batches = length_batches([len(x) for x in ids], batch_size)
    if n_proc > 1 or torch.device(device).type != "cpu":  # DDP shares already; CUDA does not survive a fork
        workers = 1
    elif workers is None:
        workers = cpu_workers(len(batches), device)
    mine = batches[rank::n_proc]
    if accelerator is not None:
        autocast = accelerator.autocast()
    elif torch.device(device).type == "cuda":
        autocast = torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    else:
        autocast = nullcontext()
    was_training = net.training
    net.eval()
    with merged_adapters(net), autocast:
        if workers > 1:
            local_idx, local_val = _score_forked(net, tokenizer, ids, mine, workers, trunk)
        else:
            if progress:
                from tqdm.auto import tqdm

                mine = tqdm(mine, desc="predict", unit="batch", leave=False)
            local_idx, local_val = _score_batches(net, tokenizer, ids, mine, device, trunk)
    net.train(was_training)
    if n_proc > 1:
        from accelerate.utils import gather_object

        pairs = gather_object([(local_idx.tolist(), local_val.tolist())])
        local_idx = np.asarray([i for idx, _ in pairs for i in idx], dtype=np.int64)
        local_val = np.asarray([v for _, val in pairs for v in val], dtype=np.float64)
    out = np.full(len(ids), np.nan)
    assigned = np.zeros(len(ids), dtype=bool)
    out[local_idx] = local_val
    assigned[local_idx] = True
    if not assigned.all():
        raise RuntimeError(f"{int((~assigned).sum())} rows got no prediction")
    return out


def predict_prompts(
    model: nn.Module,
    tokenizer: Any,
    prompts: list[str],
    batch_size: int = DEFAULT_PREDICT_BATCH_SIZE,
    device: torch.device | str | None = None,
) -> np.ndarray:
    """Forecasts for rendered prompts, in their order."""
    return predict_ids(model, tokenizer, encode_prompts(tokenizer, prompts), batch_size, device)
