"""What the training recipe (`modeling.train.RegressorTrainer`) is built from: `TrainerSetup.setup` turns
the job into the pieces the loop runs on, and `modeling.train` holds the loop itself.

- accelerator: devices, mixed precision (bf16 on GPU, fp32 on CPU) and DDP; the micro-batch of one
  accumulation step must split evenly over the processes;
- data (`modeling.data.corpus`): the prompt corpus's train rows (optionally a seeded sample), tokenised
  once, cut into length-grouped batches (transformers' `LengthGroupedSampler`; `batches_of`), which the
  loop pads dynamically to a multiple of 8; `batch_size` is the *global* batch of one optimizer step,
  whatever the number of processes and accumulation steps, so runs with different process counts see the
  same batches; and the validation rows of a fixed set of evaluation dates;
- model: the regressor (with its auxiliary head when the auxiliary loss is on), AdamW over
  `modeling.optim`'s parameter groups, the number of steps, the peak learning rates (scaled down for a
  run longer than `lr_reference_steps`) and the EMA copy of the trainable weights;
- the frozen trunk's cached states of the train and evaluation rows, when the adapters sit in the last
  layer only and the states fit `trunk_cache_gb` (`modeling.trunk_cache`);
- resume: the newest complete checkpoint's weights, optimizer, EMA, RNG states and loop position.

Like `modeling.train`, this module imports neither dagster nor mlflow.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import torch

from modeling import checkpointing
from modeling.backbones.common import load_tokenizer
from modeling.data.corpus import (
    aux_feature_targets,
    epoch_batches,
    evenly_spaced_dates,
    read_corpus_split,
    tokenise_rows,
    train_sample,
)
from modeling.job import TrainJob
from modeling.metrics import thinned_horizon
from modeling.model import LLMRegressor, build_regressor
from modeling.optim import BestTracker, lr_length_factor, param_groups
from modeling.train_state import LoopState, latest_checkpoint, read_checkpoint
from modeling.trunk_cache import TrunkCache, trunk_bytes, trunk_frozen


def share_problem(micro: int, n_proc: int, date_group_size: int = 0) -> str | None:
    """Why a micro-batch of `micro` rows cannot be shared by `n_proc` processes (None: it can). It must
    split evenly, and under date-grouped batches into whole groups: the IC loss correlates within each
    group of a process's share, so 8 GPUs on a batch of 32 (4 rows each) cannot hold a group of 16."""
    if micro % n_proc:
        return (
            f"the micro-batch {micro} (batch_size / grad_accum_steps) does not split over {n_proc} processes"
        )
    share = micro // n_proc
    if date_group_size and share % date_group_size:
        return (
            f"each of {n_proc} processes gets {share} rows of a micro-batch of {micro}: not whole date "
            f"groups of {date_group_size}; set batch_size to a multiple of {date_group_size * n_proc} x "
            f"grad_accum_steps, or train on fewer processes"
        )
    return None


def process_share(micro: int, n_proc: int, date_group_size: int = 0) -> int:
    """Rows of one micro-batch that each of `n_proc` processes trains on (`share_problem` refused).
    Checked before the data and the model load, where the first step would fail minutes later."""
    problem = share_problem(micro, n_proc, date_group_size)
    if problem:
        raise ValueError(problem)
    return micro // n_proc


class TrainerSetup:
    """The setup half of the recipe: `setup` builds the accelerator, the data, the model and optimizer
    with the schedule's constants, and the state resumed from a checkpoint; `RegressorTrainer` (its
    subclass in `modeling.train`) trains on them."""

    def __init__(
        self,
        job: TrainJob,
        log: Callable[[str], None] = print,
        on_eval: Callable[[int, float], None] | None = None,
    ) -> None:
        self.job, self.cfg, self.log, self.on_eval = job, job.train, log, on_eval
        self.out = Path(job.output_dir)
        self.ckpt_root = self.out / "checkpoints"

    def say(self, message: str) -> None:
        if self.main:
            self.log(message)

    # --- setup -------------------------------------------------------------------------------------------
    def setup(self) -> None:
        self._setup_accelerator()
        self.started_wall = time.perf_counter()
        self._setup_data()
        self._setup_model()
        self._resume()

    def _setup_accelerator(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DataLoaderConfiguration

        cfg = self.cfg
        self.use_cuda = torch.cuda.is_available()
        self.accelerator = Accelerator(
            cpu=not self.use_cuda,  # on a CPU-only box: MULTI_CPU (gloo) under torchrun, not one per rank
            mixed_precision="bf16" if self.use_cuda and cfg.bf16 else "no",
            gradient_accumulation_steps=cfg.grad_accum_steps,
            dataloader_config=DataLoaderConfiguration(split_batches=True),
            rng_types=[],  # batches are precomputed from the seed; no sampler RNG to synchronise
        )
        self.n_proc = self.accelerator.num_processes
        self.micro = cfg.batch_size // cfg.grad_accum_steps
        process_share(self.micro, self.n_proc, cfg.date_group_size)
        self.main = self.accelerator.is_main_process
        if self.main:
            self.ckpt_root.mkdir(parents=True, exist_ok=True)

    def _setup_data(self) -> None:
        cfg, job = self.cfg, self.job
        self.tokenizer = load_tokenizer(job.base_model_dir)
        self.train_frame = train_sample(job.corpus_path, cfg, job.reweight)
        if self.train_frame.empty:
            if cfg.date_group_size and not read_corpus_split(job.corpus_path, "train").empty:
                raise ValueError(
                    f"no date of the prompt corpus {job.corpus_path} has date_group_size = "
                    f"{cfg.date_group_size} train rows: lower date_group_size (and the batch with it)"
                )
            raise ValueError(f"the prompt corpus {job.corpus_path} has no train rows")
        val_frame = read_corpus_split(job.corpus_path, "validation")
        self.eval_dates = evenly_spaced_dates(val_frame["date"], cfg.eval_max_dates)
        # the label horizon in positions of the evaluation dates: the Newey-West lag of their SE
        self.eval_horizon = thinned_horizon(
            int(job.prompt.get("horizon", 1)), len(self.eval_dates), int(val_frame["date"].nunique())
        )
        val_frame = val_frame[val_frame["date"].isin(self.eval_dates)].reset_index(drop=True)
        self.train_rows = tokenise_rows(self.train_frame, self.tokenizer)
        self.val_rows = tokenise_rows(val_frame, self.tokenizer)
        if cfg.aux_feature_weight:
            if not job.training_set_path:
                raise ValueError("aux_feature_weight needs TrainJob.training_set_path (the feature values)")
            self.train_rows.aux = aux_feature_targets(self.train_frame, job.training_set_path)
        self.say(
            f"train rows {len(self.train_rows)}, validation rows {len(self.val_rows)} on "
            f"{len(self.eval_dates)} dates, {self.n_proc} process(es), device {self.accelerator.device}"
        )

    def _setup_model(self) -> None:
        from accelerate.utils import set_seed

        cfg = self.cfg
        set_seed(cfg.seed)
        dtype = torch.bfloat16 if self.use_cuda and cfg.bf16 else torch.float32
        model = build_regressor(self.job.base_model_dir, self.job.regressor, dtype=dtype)
        if self.train_rows.aux is not None:
            model.attach_aux_head(self.train_rows.aux.shape[1])
        optimizer = torch.optim.AdamW(
            param_groups(model, cfg.learning_rate, cfg.weight_decay, cfg.head_learning_rate)
        )
        self.date_codes = (
            pd.factorize(self.train_frame["date"], sort=True)[0] if cfg.date_group_size else None
        )
        steps_per_epoch = len(self.batches_of(0)) // cfg.grad_accum_steps
        if steps_per_epoch == 0:
            raise ValueError(f"{len(self.train_rows)} train rows do not fill one batch of {cfg.batch_size}")
        epochs_steps = cfg.epochs * steps_per_epoch
        self.total_steps = epochs_steps if cfg.max_steps is None else min(cfg.max_steps, epochs_steps)
        self.state = LoopState()
        length_factor = lr_length_factor(self.total_steps, cfg.lr_reference_steps)
        self.peak_lrs = [group["lr"] * length_factor for group in optimizer.param_groups]
        if length_factor < 1:
            self.say(
                f"{self.total_steps} steps > lr_reference_steps {cfg.lr_reference_steps}: "
                f"lr x {length_factor:.3f}"
            )
        self._setup_trunk_cache(model)
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        self.unwrapped: LLMRegressor = self.accelerator.unwrap_model(self.model)
        self.best_state: dict[str, torch.Tensor] | None = None
        # the trainable parameters by name (the same names as `trainable_state_dict`) and their average
        self.trainable = {n: p for n, p in self.unwrapped.named_parameters() if p.requires_grad}
        self.ema: dict[str, torch.Tensor] | None = (
            {n: p.detach().float().clone() for n, p in self.trainable.items()}
            if cfg.ema_decay is not None
            else None
        )

    def _setup_trunk_cache(self, model: LLMRegressor) -> None:
        """The frozen trunk's states of the train rows, then of the evaluation rows, each when it fits what
        is left of `trunk_cache_gb` (`modeling.trunk_cache`); None where not cached. CPU training only:
        on a GPU the states would cross the bus at every step, and bf16 was never measured with it."""
        self.train_trunk: TrunkCache | None = None
        self.val_trunk: TrunkCache | None = None
        budget = self.cfg.trunk_cache_gb * 1e9
        if not budget or self.use_cuda or not trunk_frozen(model):
            return
        started = time.perf_counter()
        for name, rows in (("train", self.train_rows), ("val", self.val_rows)):
            need = trunk_bytes(int(rows.n_tokens.sum()), model)
            if not len(rows) or need > budget:
                continue
            device = next(model.parameters()).device
            workers = 1 if self.accelerator.num_processes > 1 else None  # DDP processes hold the cores
            cache = TrunkCache.build(model, self.tokenizer, rows.ids, device, workers)
            setattr(self, f"{name}_trunk", cache)
            budget -= cache.nbytes
        caches = (("train", self.train_trunk), ("validation", self.val_trunk))
        built = [f"{name} {cache.nbytes / 1e9:.2f} GB" for name, cache in caches if cache is not None]
        if built:
            self.say(f"trunk cache: {', '.join(built)} in {time.perf_counter() - started:.1f} s")

    def _resume(self) -> None:
        """Continue from the newest complete checkpoint (safetensors and JSON only: nothing unpickled)."""
        checkpoint = latest_checkpoint(self.ckpt_root) if self.job.resume else None
        if checkpoint is not None:
            saved = read_checkpoint(checkpoint, with_ema=self.ema is not None)
            self.unwrapped.load_trainable_state_dict(saved.trainable)
            self.optimizer.load_state_dict(saved.optimizer)
            self.state, self.best_state = saved.state, saved.best
            if saved.ema is not None:
                self.ema = {n: v.to(self.trainable[n].device) for n, v in saved.ema.items()}
            checkpointing.load_rng(checkpoint, self.accelerator.process_index)
            self.say(f"resumed from {checkpoint.name} (step {self.state.step}, {self.state.samples} samples)")
        s = self.state
        self.tracker = BestTracker(
            self.cfg.early_stopping_patience, s.best_rank_ic, s.best_step, s.evals_without_improvement
        )

    def batches_of(self, epoch: int) -> list[list[int]]:
        """The global micro-batches of one epoch (deterministic in seed and epoch)."""
        cfg = self.cfg
        return epoch_batches(
            self.train_rows.n_tokens,
            self.micro,
            cfg.seed,
            epoch,
            cfg.group_by_length,
            cfg.grad_accum_steps,
            self.date_codes,
            cfg.date_group_size,
        )
