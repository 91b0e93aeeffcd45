"""The training recipe for `LLMRegressor`, on accelerate. The training process's entry point, which
trains and then evaluates and publishes, is `modeling.run_job`:

    python -m modeling.run_job --job job.json                                   # one process
    accelerate launch --num_processes 2 --cpu -m modeling.run_job --job job.json  # DDP (gloo on CPU)
    accelerate launch --config_file configs/accelerate/multi_gpu.yaml -m modeling.run_job --job job.json

accelerate owns devices, mixed precision (bf16 on GPU, fp32 on CPU) and DDP; this file owns what is
specific to the method:

- data (`modeling.data.corpus`): the prompt corpus's train rows (optionally a seeded sample), tokenised
  once, served in length-grouped batches (transformers' `LengthGroupedSampler`) with dynamic padding to a
  multiple of 8;
  `batch_size` is the *global* batch of one optimizer step, whatever the number of processes and
  accumulation steps, so runs with different process counts see the same batches;
- loss: the bucket weights of the training set in a weighted MSE (or Huber) loss, normalised by the
  global weight sum so that a DDP run computes exactly the single-process loss (a resampled training
  set has weight 1 everywhere, which is the plain loss);
- AdamW (adapters and head may take different learning rates), linear warm-up then cosine decay,
  gradient accumulation and clipping;
- validation RankIC every N steps on a fixed set of validation dates, early stopping on it, and the best
  weights restored at the end;
- caps: `max_train_samples`, `max_steps`, `time_budget_s` (under a time budget the cosine schedule runs
  on elapsed time, so the learning rate still decays to its floor when the budget ends);
- checkpoints of the trainable weights, optimizer, RNG states and loop position (elapsed time included),
  in safetensors and JSON (no pickle), fsynced and renamed into place before the previous one is deleted
  (`modeling.checkpointing`); a killed run resumes from the last one to the same weights as an
  uninterrupted run.

This module imports neither dagster nor mlflow: it trains on a bare GPU image with torch, transformers,
peft and accelerate. Evaluation, logging and registration (`modeling.experiment`) come after it, in
`modeling.run_job`; this module never imports them.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from modeling import checkpointing
from modeling.backbones.common import load_tokenizer
from modeling.data.corpus import (
    FixedBatches,
    RowsDataset,
    aux_feature_targets,
    epoch_batches,
    evenly_spaced_dates,
    make_collate,
    read_corpus_split,
    tokenise_rows,
    train_sample,
)
from modeling.inference import predict_ids
from modeling.losses import LOSSES, ic_loss, weighted_loss
from modeling.metrics import rank_ic
from modeling.model import LLMRegressor, RegressorConfig, build_regressor, save_regressor
from modeling.targets import TARGET_TRANSFORMS

TRAIN_STATE_FILE = "trainer_state.json"
TRAINABLE_FILE = "trainable.safetensors"
BEST_FILE = "best_trainable.safetensors"
EMA_FILE = "ema_trainable.safetensors"
FINAL_STATE_FILE = "final_state.json"


# --- configuration --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainConfig:
    """How the regressor is trained: optimiser, schedule, batches, loss, caps, evaluation, checkpoints."""

    learning_rate: float = 1e-3
    """Peak learning rate of the LoRA adapters."""
    head_learning_rate: float | None = None
    """Peak learning rate of the MLP head (None = learning_rate)."""
    weight_decay: float = 0.0
    """AdamW weight decay (adapters and head weights; biases and norms are never decayed)."""
    warmup_ratio: float = 0.05
    """Share of the schedule spent in linear warm-up."""
    lr_reference_steps: int | None = None
    """When set, a run of more optimizer steps than this takes a smaller peak learning rate (adapters and
    head alike): peak x sqrt(reference / steps), never larger than peak. The noise a step adds grows with
    lr^2 x steps; the square root keeps it at the reference run's. None = the peak for any length."""
    min_lr_ratio: float = 0.05
    """The cosine decays to this fraction of the peak."""
    batch_size: int = 32
    """Global batch per optimizer step (all processes x accumulation steps)."""
    grad_accum_steps: int = 1
    """Micro-batches accumulated per optimizer step."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm."""
    ema_decay: float | None = None
    """Exponential moving average of the trainable weights (adapters and head), updated every optimizer
    step with the warm-up `min(decay, (1 + step) / (10 + step))`; evaluation, best-checkpoint selection and
    the saved model use the average (None = off). On a weak, noisy target the raw weights wander from one
    evaluation to the next; their average does not."""
    epochs: int = 1
    """Passes over the (sampled) train rows."""
    max_train_samples: int | None = None
    """Train rows drawn (seeded) from the corpus (None = all)."""
    max_steps: int | None = None
    """Optimizer steps cap (None = epochs x steps per epoch)."""
    time_budget_s: float | None = None
    """Wall-clock cap of the training loop in seconds, across resumes (None = none)."""
    loss: Literal["mse", "huber", "ic"] = "mse"
    """mse or huber: pointwise, weighted by the bucket weights; ic: minus the per-date correlation of
    forecast and target on date-grouped batches (needs `date_group_size`; see `modeling.losses`)."""
    huber_delta: float = 1.0
    """Huber transition point, in label units (unit train std by default)."""
    target_transform: Literal["none", "clip", "cs_zscore", "cs_rank"] = "none"
    """What the train label becomes before the loss (`modeling.targets`): as is, clipped, per-date
    z-score (clipped) or per-date rank-gaussian. Evaluation always uses the raw label."""
    target_clip: float = 5.0
    """Clip bound of the `clip` and `cs_zscore` targets, in label units."""
    weight_power: float = 1.0
    """The bucket weights are raised to this power (mean 1 again): 1 as built, 0 unweighted."""
    aux_feature_weight: float = 0.0
    """Weight of an auxiliary loss: a linear probe on the pooled hidden state reconstructs the prompt's
    16 feature values (standardised on the train rows, clipped at 5). The forecast's own signal is weak
    (R^2 under 1%), so the adapters learn slowly what the numbers in the prompt are; the probe asks for
    exactly that with a strong signal. Training only (needs `TrainJob.training_set_path`); 0 = off."""
    date_group_size: int = 0
    """0: batches by length, dates mixed. k > 0: every batch is made of whole groups of k rows of one
    date each (the per-date loss needs them), and the train sample is drawn per date in multiples of k."""
    eval_every_steps: int = 100
    """Validation RankIC every N optimizer steps (and at the end); 0 = only at the end."""
    eval_max_dates: int | None = 20
    """Validation dates evaluated during training, evenly spaced over the validation period (None = all)."""
    eval_batch_size: int = 32
    """Rows per forward pass at evaluation (32 is fastest on 2 CPU cores; larger on a GPU)."""
    early_stopping_patience: int | None = 4
    """Stop after this many evaluations without a better validation RankIC (None = never)."""
    select_best: bool = True
    """Save the weights of the best periodic evaluation (True) or the final weights (False; the average
    when `ema_decay` is set). With evaluations on a few dates the best of several is mostly the luckiest:
    a run that keeps improving is better served by its final weights."""
    checkpoint_every_steps: int = 200
    """Checkpoint every N optimizer steps (0 = never; the end of training is not checkpointed)."""
    group_by_length: bool = True
    """Length-grouped batches: rows of similar length together, less padding."""
    seed: int = 0
    """Seed of the sample, the batch order, the LoRA and head initialisation and dropout."""
    bf16: bool = True
    """bf16 autocast on GPU (ignored on CPU, which trains in fp32)."""
    progress: bool = True
    """tqdm progress bar with loss, lr and samples/s (main process)."""

    def __post_init__(self) -> None:
        positive = (
            "learning_rate",
            "batch_size",
            "grad_accum_steps",
            "max_grad_norm",
            "epochs",
            "eval_batch_size",
            "huber_delta",
        )
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"TrainConfig.{name} must be > 0, got {getattr(self, name)!r}")
        for name in (
            "max_train_samples",
            "max_steps",
            "eval_max_dates",
            "early_stopping_patience",
            "lr_reference_steps",
        ):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1 or None, got {value!r}")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ValueError(f"TrainConfig.time_budget_s must be > 0 or None, got {self.time_budget_s}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"TrainConfig.ema_decay must be in (0, 1) or None, got {self.ema_decay!r}")
        if self.head_learning_rate is not None and not self.head_learning_rate > 0:
            raise ValueError("TrainConfig.head_learning_rate must be > 0 or None")
        if not (0 <= self.warmup_ratio < 1 and 0 <= self.min_lr_ratio <= 1 and self.weight_decay >= 0):
            raise ValueError(
                "TrainConfig needs 0 <= warmup_ratio < 1, 0 <= min_lr_ratio <= 1 and weight_decay >= 0"
            )
        if self.loss not in LOSSES:
            raise ValueError(f"TrainConfig.loss must be one of {LOSSES}, got {self.loss!r}")
        if self.target_transform not in TARGET_TRANSFORMS:
            raise ValueError(
                f"TrainConfig.target_transform must be in {TARGET_TRANSFORMS}, got {self.target_transform!r}"
            )
        if not self.target_clip > 0 or self.weight_power < 0 or self.aux_feature_weight < 0:
            raise ValueError("TrainConfig needs target_clip > 0, weight_power >= 0, aux_feature_weight >= 0")
        if self.date_group_size < 0 or self.date_group_size == 1 or self.date_group_size == 2:
            raise ValueError(
                f"TrainConfig.date_group_size must be 0 (off) or >= 3 rows, got {self.date_group_size}"
            )
        if self.loss == "ic" and not self.date_group_size:
            raise ValueError("loss 'ic' is a per-date correlation: set date_group_size (e.g. 16)")
        if self.date_group_size and (self.batch_size // self.grad_accum_steps) % self.date_group_size:
            raise ValueError(
                f"the micro-batch {self.batch_size // self.grad_accum_steps} is not a multiple of "
                f"date_group_size {self.date_group_size}"
            )
        if self.eval_every_steps < 0 or self.checkpoint_every_steps < 0:
            raise ValueError("TrainConfig.eval_every_steps and checkpoint_every_steps must be >= 0")
        if self.batch_size % self.grad_accum_steps:
            raise ValueError(
                f"batch_size {self.batch_size} is not a multiple of grad_accum_steps {self.grad_accum_steps}"
            )


@dataclass
class TrainJob:
    """Everything a training process needs, as one JSON file (what the orchestrator hands the child)."""

    base_model_dir: str
    """The `base_model` checkpoint directory."""
    corpus_path: str
    """The `prompt_corpus` Parquet file."""
    output_dir: str
    """Where checkpoints, the trained model (`model/`) and `train_report.json` go."""
    prompt: dict[str, Any]
    """The `PromptBuilder` settings of the corpus (horizon, sig_digits, target), saved with the model."""
    regressor: RegressorConfig = field(default_factory=RegressorConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    resume: bool = True
    """Continue from the last checkpoint in output_dir when there is one."""
    experiment: dict[str, Any] | None = None
    """When set: evaluate, log to MLflow and register after training (see `modeling.experiment`)."""
    reweight: dict[str, Any] | None = None
    """A `BucketConfig` (as a dict) to recompute the train weights with, fit on the train labels of the
    corpus (a search trial trying another weight scheme); None = the training set's own weights."""
    training_set_path: str | None = None
    """The `training_set` Parquet file: the feature values of the auxiliary loss come from it."""
    backtest_output: str | None = None
    """When set (a walk-forward window, see `modeling.walk_forward`): after training, forecast the corpus's
    test rows with the regressor and the feature baselines and write them to this Parquet file."""

    def __post_init__(self) -> None:
        if self.backtest_output is not None and self.experiment is not None:
            raise ValueError("a TrainJob is either an experiment or a backtest window, not both")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "regressor": self.regressor.to_dict(), "train": asdict(self.train)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainJob:
        values = dict(data)
        values["regressor"] = RegressorConfig.from_dict(values.get("regressor") or {})
        train = values.get("train") or {}
        unknown = set(train) - {f.name for f in fields(TrainConfig)}
        if unknown:
            raise ValueError(f"unknown train config keys {sorted(unknown)}")
        values["train"] = TrainConfig(**train)
        return cls(**values)

    def save(self, path: str | os.PathLike[str]) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=2, default=str) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> TrainJob:
        return cls.from_dict(json.loads(Path(path).read_text()))


# --- schedule ----------------------------------------------------------------------------------
def lr_length_factor(total_steps: int, reference_steps: int | None) -> float:
    """min(1, sqrt(reference_steps / total_steps)); 1 when there is no reference."""
    if reference_steps is None or total_steps <= reference_steps:
        return 1.0
    return math.sqrt(reference_steps / total_steps)


def lr_factor(progress: float, warmup_ratio: float, min_lr_ratio: float) -> float:
    """Learning-rate multiplier at a schedule progress in [0, 1]: linear warm-up, then cosine to the floor."""
    progress = min(max(progress, 0.0), 1.0)
    if warmup_ratio > 0 and progress < warmup_ratio:
        return progress / warmup_ratio
    span = (progress - warmup_ratio) / (1 - warmup_ratio) if warmup_ratio < 1 else 1.0
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * span))


# --- checkpoints ----------------------------------------------------------------------------------------
@torch.no_grad()
def ema_update(
    average: dict[str, torch.Tensor], params: dict[str, torch.Tensor], decay: float, step: int
) -> float:
    """One step of the weights' exponential moving average, in place: `average += (1 - d) (param - average)`
    with `d = min(decay, (1 + step) / (10 + step))` (early steps weigh the fresh weights more, so the
    average does not cling to the random initialisation). Returns `d`."""
    d = min(decay, (1 + step) / (10 + step))
    for name, param in params.items():
        average[name].lerp_(param.detach().float(), 1.0 - d)
    return d


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under `root` (see `modeling.checkpointing`: temporary, stale and
    truncated directories are never used), one with a loop state."""
    return checkpointing.latest_checkpoint(root, required=(TRAIN_STATE_FILE,))


def _clock() -> float:
    """The training loop's clock (seconds); tests replace it with a deterministic one."""
    return time.perf_counter()


@dataclass
class LoopState:
    """Where the loop is: saved in every checkpoint as JSON."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    samples: int = 0
    tokens: int = 0
    elapsed_s: float = 0.0
    """Training-loop time so far, across resumes (evaluations and checkpoint writes included; process
    start-up and resume not): a checkpoint stores it as of its writing, and a resumed run's clock starts
    there, so a time budget and the schedule it drives continue rather than restart."""
    eval_s: float = 0.0
    best_rank_ic: float | None = None
    best_step: int | None = None
    evals_without_improvement: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    stopped_by: str | None = None


# --- the loop -------------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    model_dir: Path
    state: LoopState
    n_train_rows: int
    n_eval_rows: int
    eval_dates: list[str]
    wall_s: float
    n_processes: int

    def report(self) -> dict[str, Any]:
        s = self.state
        train_s = s.elapsed_s - s.eval_s
        return {
            "model_dir": str(self.model_dir),
            "steps": s.step,
            "samples": s.samples,
            "tokens": s.tokens,
            "train_loop_s": round(s.elapsed_s, 3),
            "eval_s": round(s.eval_s, 3),
            # throughput of the training steps alone (periodic evaluations excluded)
            "samples_per_s": round(s.samples / train_s, 2) if train_s > 0 else None,
            "tokens_per_s": round(s.tokens / train_s, 1) if train_s > 0 else None,
            "best_step": s.best_step,
            "best_val_rank_ic": s.best_rank_ic,
            "stopped_by": s.stopped_by,
            "n_train_rows": self.n_train_rows,
            "n_eval_rows": self.n_eval_rows,
            "eval_dates": self.eval_dates,
            "n_processes": self.n_processes,
            "history": s.history,
        }


def _param_groups(model: LLMRegressor, cfg: TrainConfig) -> list[dict[str, Any]]:
    groups: dict[tuple[str, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        part = "head" if name.startswith("head.") else "adapter"
        decay = param.ndim >= 2
        groups.setdefault((part, decay), []).append(param)
    head_lr = cfg.head_learning_rate or cfg.learning_rate
    return [
        {
            "params": params,
            "lr": head_lr if part == "head" else cfg.learning_rate,
            "weight_decay": cfg.weight_decay if decay else 0.0,
            "name": f"{part}{'' if decay else '_no_decay'}",
        }
        for (part, decay), params in sorted(groups.items())
    ]


def train_regressor(
    job: TrainJob,
    log: Callable[[str], None] = print,
    on_eval: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train `job` (every process of an `accelerate launch` runs this); the main process saves the model.

    `on_eval(step, validation_rank_ic)` is called after every evaluation (a search reports to its pruner
    there; an exception it raises ends the run).
    """
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, broadcast, set_seed

    cfg = job.train
    finished = Path(job.output_dir) / FINAL_STATE_FILE
    if job.resume and finished.is_file() and (Path(job.output_dir) / "model" / "regressor.json").is_file():
        # this job already trained to the end (a later step of its run failed): nothing to redo
        final = json.loads(finished.read_text())
        log(f"training of {job.output_dir} already complete (step {final['state']['step']}); not repeated")
        return TrainResult(
            Path(job.output_dir) / "model",
            LoopState(**final["state"]),
            final["n_train_rows"],
            final["n_eval_rows"],
            final["eval_dates"],
            final["wall_s"],
            final["n_processes"],
        )
    use_cuda = torch.cuda.is_available()
    accelerator = Accelerator(
        cpu=not use_cuda,  # on a CPU-only box: MULTI_CPU (gloo) under torchrun, not one process per rank
        mixed_precision="bf16" if use_cuda and cfg.bf16 else "no",
        gradient_accumulation_steps=cfg.grad_accum_steps,
        dataloader_config=DataLoaderConfiguration(split_batches=True),
        rng_types=[],  # batches are precomputed from the seed; no sampler RNG to synchronise
    )
    n_proc = accelerator.num_processes
    micro = cfg.batch_size // cfg.grad_accum_steps
    if micro % n_proc:
        raise ValueError(
            f"the micro-batch {micro} (batch_size / grad_accum_steps) does not split over {n_proc} processes"
        )
    main = accelerator.is_main_process
    say = log if main else (lambda _msg: None)
    out = Path(job.output_dir)
    ckpt_root = out / "checkpoints"
    if main:
        ckpt_root.mkdir(parents=True, exist_ok=True)

    started_wall = time.perf_counter()
    tokenizer = load_tokenizer(job.base_model_dir)
    train_frame = train_sample(job.corpus_path, cfg, job.reweight)
    if train_frame.empty:
        raise ValueError(f"the prompt corpus {job.corpus_path} has no train rows")
    val_frame = read_corpus_split(job.corpus_path, "validation")
    eval_dates = evenly_spaced_dates(val_frame["date"], cfg.eval_max_dates)
    val_frame = val_frame[val_frame["date"].isin(eval_dates)].reset_index(drop=True)
    train_rows, val_rows = tokenise_rows(train_frame, tokenizer), tokenise_rows(val_frame, tokenizer)
    if cfg.aux_feature_weight:
        if not job.training_set_path:
            raise ValueError("aux_feature_weight needs TrainJob.training_set_path (the feature values)")
        train_rows.aux = aux_feature_targets(train_frame, job.training_set_path)
    say(
        f"train rows {len(train_rows)}, validation rows {len(val_rows)} on {len(eval_dates)} dates, "
        f"{n_proc} process(es), device {accelerator.device}"
    )

    set_seed(cfg.seed)
    dtype = torch.bfloat16 if use_cuda and cfg.bf16 else torch.float32
    model = build_regressor(job.base_model_dir, job.regressor, dtype=dtype)
    if train_rows.aux is not None:
        model.attach_aux_head(train_rows.aux.shape[1])
    optimizer = torch.optim.AdamW(_param_groups(model, cfg))
    date_codes = pd.factorize(train_frame["date"], sort=True)[0] if cfg.date_group_size else None

    def batches_of(epoch: int) -> list[list[int]]:
        return epoch_batches(
            train_rows.n_tokens,
            micro,
            cfg.seed,
            epoch,
            cfg.group_by_length,
            cfg.grad_accum_steps,
            date_codes,
            cfg.date_group_size,
        )

    batches_per_epoch = len(batches_of(0))
    steps_per_epoch = batches_per_epoch // cfg.grad_accum_steps
    if steps_per_epoch == 0:
        raise ValueError(f"{len(train_rows)} train rows do not fill one batch of {cfg.batch_size}")
    total_steps = (
        cfg.epochs * steps_per_epoch
        if cfg.max_steps is None
        else min(cfg.max_steps, cfg.epochs * steps_per_epoch)
    )
    state = LoopState()
    length_factor = lr_length_factor(total_steps, cfg.lr_reference_steps)
    peak_lrs = [group["lr"] * length_factor for group in optimizer.param_groups]
    if length_factor < 1:
        say(f"{total_steps} steps > lr_reference_steps {cfg.lr_reference_steps}: lr x {length_factor:.3f}")
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped: LLMRegressor = accelerator.unwrap_model(model)
    best_state: dict[str, torch.Tensor] | None = None
    # the trainable parameters by name (the same names as `trainable_state_dict`) and their average
    trainable = {n: p for n, p in unwrapped.named_parameters() if p.requires_grad}
    ema: dict[str, torch.Tensor] | None = (
        {n: p.detach().float().clone() for n, p in trainable.items()} if cfg.ema_decay is not None else None
    )

    checkpoint = latest_checkpoint(ckpt_root) if job.resume else None
    if checkpoint is not None:  # safetensors and JSON only: nothing is unpickled
        unwrapped.load_trainable_state_dict(checkpointing.load_tensors(checkpoint / TRAINABLE_FILE))
        optimizer.load_state_dict(checkpointing.load_optimizer(checkpoint))
        state = LoopState(**checkpointing.load_json(checkpoint / TRAIN_STATE_FILE))
        if (checkpoint / BEST_FILE).is_file():
            best_state = checkpointing.load_tensors(checkpoint / BEST_FILE)
        if ema is not None:
            ema = {
                n: v.to(trainable[n].device)
                for n, v in checkpointing.load_tensors(checkpoint / EMA_FILE).items()
            }
        checkpointing.load_rng(checkpoint, accelerator.process_index)
        say(f"resumed from {checkpoint.name} (step {state.step}, {state.samples} samples)")

    def progress_now(elapsed: float, step: int) -> float:
        by_steps = step / total_steps
        by_time = elapsed / cfg.time_budget_s if cfg.time_budget_s else 0.0
        return max(by_steps, by_time)

    def set_lr(elapsed: float) -> None:
        # the schedule is a function of progress (steps, or elapsed time under a budget), not of a step
        # counter, so it is set directly rather than through an LRScheduler
        factor = lr_factor(progress_now(elapsed, state.step), cfg.warmup_ratio, cfg.min_lr_ratio)
        for group, peak in zip(optimizer.param_groups, peak_lrs, strict=True):
            group["lr"] = peak * factor

    def evaluated_weights() -> dict[str, torch.Tensor]:
        """What is judged and kept: the average when there is one, else the live weights (copies)."""
        if ema is not None:
            return {k: v.detach().cpu().clone() for k, v in ema.items()}
        return {k: v.cpu() for k, v in unwrapped.trainable_state_dict().items()}

    def evaluate_now() -> float:
        live = None
        if ema is not None:  # judge the average, then put the live weights back to go on training
            live = unwrapped.trainable_state_dict()
            unwrapped.load_trainable_state_dict(ema)
        preds = predict_ids(model, tokenizer, val_rows.ids, cfg.eval_batch_size, accelerator=accelerator)
        checkpointing.fault_point("eval")
        if live is not None:
            unwrapped.load_trainable_state_dict(live)
        frame = val_rows.frame.assign(prediction=preds, label=val_rows.label)
        return rank_ic(frame)

    def save_checkpoint() -> None:
        """Every file fsynced into `step-N.tmp/`, renamed into place, parent fsynced, then the older
        checkpoints deleted (`modeling.checkpointing`): a crash at any point leaves a usable checkpoint."""
        accelerator.wait_for_everyone()
        tmp = ckpt_root / f"{checkpointing.checkpoint_name(state.step)}{checkpointing.TMP_SUFFIX}"
        if main:
            tmp = checkpointing.begin_checkpoint(ckpt_root, state.step)
            checkpointing.save_tensors(tmp / TRAINABLE_FILE, unwrapped.trainable_state_dict())
            if best_state is not None:
                checkpointing.save_tensors(tmp / BEST_FILE, best_state)
            if ema is not None:
                checkpointing.save_tensors(tmp / EMA_FILE, ema)
            checkpointing.save_optimizer(tmp, optimizer.state_dict())
            checkpointing.fault_point("checkpoint_write")
        accelerator.wait_for_everyone()
        checkpointing.save_rng(tmp, accelerator.process_index)
        # the loop time as of this checkpoint (the evaluation of this step and the writes included), on
        # the main process's clock: a resumed run's clock starts from here, and so does the learning rate
        # of the next step, in this run as in a resumed one (under a time budget it moved on)
        now = torch.tensor([_clock() - segment_start], device=accelerator.device)
        state.elapsed_s = float(broadcast(now, from_process=0)[0])
        set_lr(state.elapsed_s)
        accelerator.wait_for_everyone()
        if main:
            checkpointing.save_json(tmp / TRAIN_STATE_FILE, asdict(state))
            final = checkpointing.commit_checkpoint(tmp)
            say(f"checkpoint {final.name} saved")
        accelerator.wait_for_everyone()

    def record_eval(train_loss: float | None) -> bool:
        """Evaluate, keep the best weights; True when early stopping says stop."""
        nonlocal best_state
        eval_started = _clock()
        score = evaluate_now()
        state.eval_s += _clock() - eval_started
        best = state.best_rank_ic
        # a NaN score (no spread in the predictions) never beats a real one, and a real one beats a NaN best
        improved = best is None or (np.isfinite(score) and (not np.isfinite(best) or score > best))
        if improved:
            state.best_rank_ic, state.best_step = float(score), state.step
            best_state = evaluated_weights()
            state.evals_without_improvement = 0
        else:
            state.evals_without_improvement += 1
        state.history.append(
            {
                "step": state.step,
                "samples": state.samples,
                "elapsed_s": round(state.elapsed_s, 2),
                "train_loss": train_loss,
                "lr": float(optimizer.param_groups[0]["lr"]),
                "val_rank_ic": float(score),
            }
        )
        if on_eval is not None:
            on_eval(state.step, float(score))
        say(
            f"step {state.step}: validation RankIC {score:.4f} (best {state.best_rank_ic:.4f} at step "
            f"{state.best_step})"
        )
        patience = cfg.early_stopping_patience
        return patience is not None and state.evals_without_improvement >= patience

    bar = None
    if main and cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=state.step, desc="train", unit="step", mininterval=2.0)
    model.train()
    # the clock of this segment starts where the checkpoint's stopped (0 on a fresh run)
    segment_start = _clock() - state.elapsed_s
    set_lr(state.elapsed_s)
    running: list[float] = []
    last_eval_step = state.history[-1]["step"] if state.history else -1
    stop = state.stopped_by is not None or state.step >= total_steps
    while not stop and state.epoch < cfg.epochs:
        batches = batches_of(state.epoch)
        # its own generator: a DataLoader without one draws a seed from the global RNG whenever an iterator
        # starts, which would shift the dropout stream of a resumed run against an uninterrupted one
        loader = DataLoader(
            RowsDataset(train_rows),
            batch_sampler=FixedBatches(batches, micro),
            collate_fn=make_collate(tokenizer),
            generator=torch.Generator().manual_seed(cfg.seed),
        )
        loader = accelerator.prepare(loader)
        # the weight sum of each optimizer step's rows (all processes, all accumulated micro-batches): the
        # loss of every micro-batch is normalised by it, so a step's gradient is exactly the weighted mean
        # over its rows, whatever the process count and accumulation
        micro_weights = [float(train_rows.weight[b].sum()) for b in batches]
        step_weights = [
            sum(micro_weights[i : i + cfg.grad_accum_steps])
            for i in range(0, len(batches), cfg.grad_accum_steps)
        ]
        if state.batch_in_epoch:
            loader = accelerator.skip_first_batches(loader, state.batch_in_epoch)
        step_loss = 0.0
        for batch in loader:
            with accelerator.accumulate(model):
                if train_rows.aux is not None:
                    pred, aux_pred = model(batch["input_ids"], batch["attention_mask"], with_aux=True)
                else:
                    pred = model(batch["input_ids"], batch["attention_mask"])
                micro_index = state.batch_in_epoch
                weight_total = torch.tensor(
                    step_weights[micro_index // cfg.grad_accum_steps], device=pred.device
                )
                if cfg.loss == "ic":  # whole date groups on every process: the mean over them is exact
                    loss = ic_loss(pred, batch["label"], batch["weight"], cfg.date_group_size)
                else:  # x processes (DDP averages them) x accumulation steps (accelerate divides by them)
                    loss = weighted_loss(
                        pred,
                        batch["label"],
                        batch["weight"],
                        cfg.loss,
                        cfg.huber_delta,
                        weight_total,
                        n_proc * cfg.grad_accum_steps,
                    )
                if train_rows.aux is not None:  # equal rows per process: DDP's average is the global mean
                    loss = loss + cfg.aux_feature_weight * ((aux_pred - batch["aux"]) ** 2).mean()
                accelerator.backward(loss)
                checkpointing.fault_point("step")  # (a test hook: a no-op unless its env var is set)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            state.batch_in_epoch += 1
            step_loss += float(loss.detach()) / (n_proc * cfg.grad_accum_steps)
            rows_now = batches[micro_index]  # the global micro-batch, all processes
            state.samples += len(rows_now)
            state.tokens += int(train_rows.n_tokens[rows_now].sum())
            if not accelerator.sync_gradients:
                continue
            state.step += 1
            if ema is not None:
                ema_update(ema, trainable, float(cfg.ema_decay), state.step)
            # every process uses the main process's clock: the same learning rate and the same stop decision
            elapsed = torch.tensor([_clock() - segment_start], device=accelerator.device)
            state.elapsed_s = float(broadcast(elapsed, from_process=0)[0])
            set_lr(state.elapsed_s)
            loss_value = float(accelerator.reduce(torch.tensor(step_loss, device=accelerator.device), "sum"))
            running = [*running[-19:], loss_value]
            step_loss = 0.0
            if bar is not None:
                bar.update(1)
                rate = state.samples / max(state.elapsed_s - state.eval_s, 1e-9)
                bar.set_postfix(
                    loss=f"{np.mean(running):.4f}",
                    lr=f"{optimizer.param_groups[0]['lr']:.2e}",
                    samples_s=f"{rate:.1f}",
                )
            if cfg.eval_every_steps and state.step % cfg.eval_every_steps == 0:
                last_eval_step = state.step
                if record_eval(float(np.mean(running))):
                    state.stopped_by = "early_stopping"
                model.train()
            over_time = cfg.time_budget_s is not None and state.elapsed_s >= cfg.time_budget_s
            if state.stopped_by is None and state.step >= total_steps:
                state.stopped_by = (
                    "max_steps" if cfg.max_steps is not None and state.step == cfg.max_steps else "data"
                )
            elif state.stopped_by is None and over_time:
                state.stopped_by = "time_budget"
            if (
                cfg.checkpoint_every_steps
                and state.step % cfg.checkpoint_every_steps == 0
                and state.stopped_by is None
            ):
                save_checkpoint()
            if state.stopped_by is not None:
                stop = True
                break
        else:
            state.epoch += 1
            state.batch_in_epoch = 0
    if state.stopped_by is None:
        state.stopped_by = "data"
    if bar is not None:
        bar.close()

    if last_eval_step != state.step and (cfg.eval_every_steps or not state.history):
        record_eval(float(np.mean(running)) if running else None)
    if cfg.select_best and best_state is not None:  # (the average, when there is one: what was judged)
        unwrapped.load_trainable_state_dict(best_state)
    elif ema is not None:
        unwrapped.load_trainable_state_dict(ema)
    model_dir = out / "model"
    accelerator.wait_for_everyone()
    if main:
        extra = {"train": asdict(cfg), "best_step": state.best_step, "best_val_rank_ic": state.best_rank_ic}
        save_regressor(unwrapped, model_dir, job.prompt, extra)
    dates = [str(pd.Timestamp(d).date()) for d in eval_dates]
    result = TrainResult(
        model_dir, state, len(train_rows), len(val_rows), dates, time.perf_counter() - started_wall, n_proc
    )
    if main:
        (out / "train_report.json").write_text(json.dumps(result.report(), indent=1, default=float) + "\n")
        final = {
            "state": asdict(state),
            "n_train_rows": len(train_rows),
            "n_eval_rows": len(val_rows),
            "eval_dates": dates,
            "wall_s": result.wall_s,
            "n_processes": n_proc,
        }
        (out / FINAL_STATE_FILE).write_text(json.dumps(final, default=float) + "\n")
    accelerator.wait_for_everyone()
    return result
