"""The training recipe for `LLMRegressor`, on accelerate: `RegressorTrainer` (torchtune style: `setup`,
`fit` = `train_step` + `after_step`, `evaluate`, `save_checkpoint`, `finish`) and `train_regressor(job)`,
the thin wrapper the training process, the search and the tests call. The job it runs is data
(`modeling.job`); the optimizer groups, schedule, EMA and best-score rule are `modeling.optim`'s. The
training process's entry point, which trains and then evaluates and publishes, is `modeling.run_job`:

    python -m modeling.run_job --job job.json                                   # one process
    accelerate launch --multi_gpu --num_processes 2 -m modeling.run_job --job job.json  # DDP (gloo on a CPU)
    accelerate launch --config_file configs/accelerate/multi_gpu.yaml -m modeling.run_job --job job.json

accelerate owns devices, mixed precision (bf16 on GPU, fp32 on CPU) and DDP; the recipe owns what is
specific to the method:

- data, model and optimizer, built from the job by `modeling.train_setup` (`TrainerSetup`, which
  `RegressorTrainer` extends): the prompt corpus's train rows, tokenised once, in length-grouped batches
  of a *global* `batch_size` (the same batches whatever the number of processes and accumulation steps);
- loss: the bucket weights of the training set in a weighted MSE (or Huber) loss, normalised by the
  global weight sum so that a DDP run computes exactly the single-process loss (a resampled training
  set has weight 1 everywhere, which is the plain loss);
- AdamW (adapters and head may take different learning rates), linear warm-up then cosine decay,
  gradient accumulation and clipping;
- validation RankIC every N steps on a fixed set of validation dates, early stopping on it, and the best
  weights restored at the end;
- caps: `max_train_samples`, `max_steps`, `time_budget_s` (when the clock runs ahead of the steps, the
  cosine schedule follows elapsed time, so the learning rate still decays to its floor when the budget
  ends; a run that fits its budget has a schedule of steps alone: `modeling.optim.schedule_progress`);
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
import time
from collections.abc import Callable
from dataclasses import asdict

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from modeling import checkpointing
from modeling.atomic_files import write_text_atomic
from modeling.data.corpus import FixedBatches, RowsDataset, make_collate
from modeling.inference import predict_ids
from modeling.job import TrainConfig, TrainJob  # noqa: F401 (re-exported: what callers hand the recipe)
from modeling.losses import ic_mse_loss, weighted_loss
from modeling.metrics import DailyMean, rank_ic_stats
from modeling.model import save_regressor
from modeling.optim import ema_update, lr_factor, lr_length_factor, schedule_progress  # noqa: F401 (lr_length_factor: re-export)
from modeling.train_setup import TrainerSetup
from modeling.train_state import (  # noqa: F401 (re-exported: the loop's files and state)
    BEST_FILE,
    EMA_FILE,
    FINAL_STATE_FILE,
    TRAIN_STATE_FILE,
    TRAINABLE_FILE,
    LoopState,
    TrainResult,
    completed_result,
    latest_checkpoint,
    read_checkpoint,
    write_weights,
)


def _clock() -> float:
    """The training loop's clock (seconds); tests replace it with a deterministic one."""
    return time.perf_counter()


# --- the recipe -----------------------------------------------------------------------------------------
class RegressorTrainer(TrainerSetup):
    """The training recipe (torchtune style): `setup` (of `TrainerSetup`) builds everything from the job,
    `fit` runs the loop of `train_step` and `after_step` (EMA, clock, learning rate, progress, evaluation,
    stop rules, checkpoints) and `finish` saves the model. Every process of an `accelerate launch` runs it;
    only the main process writes files."""

    # --- schedule and clock ------------------------------------------------------------------------------
    def set_lr(self, elapsed: float) -> None:
        """The schedule is a function of progress (steps, or elapsed time under a budget), not of a step
        counter, so it is set directly rather than through an LRScheduler."""
        cfg = self.cfg
        progress = schedule_progress(self.state.step, self.total_steps, elapsed, cfg.time_budget_s)
        factor = lr_factor(progress, cfg.warmup_ratio, cfg.min_lr_ratio)
        for group, peak in zip(self.optimizer.param_groups, self.peak_lrs, strict=True):
            group["lr"] = peak * factor

    def _shared_elapsed(self) -> float:
        """The loop time on the main process's clock, the same on every process (one learning rate, one
        stop decision)."""
        from accelerate.utils import broadcast

        now = torch.tensor([_clock() - self.segment_start], device=self.accelerator.device)
        return float(broadcast(now, from_process=0)[0])

    # --- the loop ----------------------------------------------------------------------------------------
    def fit(self) -> TrainResult:
        self.bar = None
        if self.main and self.cfg.progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=self.total_steps, initial=self.state.step, desc="train", unit="step", mininterval=2.0
            )
        self.model.train()
        # the clock of this segment starts where the checkpoint's stopped (0 on a fresh run)
        self.segment_start = _clock() - self.state.elapsed_s
        self.set_lr(self.state.elapsed_s)
        self.last_eval_step = self.state.history[-1]["step"] if self.state.history else -1
        stop = self.state.stopped_by is not None or self.state.step >= self.total_steps
        while not stop and self.state.epoch < self.cfg.epochs:
            stop = self._run_epoch()
        if self.state.stopped_by is None:
            self.state.stopped_by = "data"
        if self.bar is not None:
            self.bar.close()
        return self.finish()

    def _run_epoch(self) -> bool:
        """The rest of the current epoch; True when a stop rule ended it."""
        cfg, state = self.cfg, self.state
        batches = self.batches_of(state.epoch)
        # its own generator: a DataLoader without one draws a seed from the global RNG whenever an iterator
        # starts, which would shift the dropout stream of a resumed run against an uninterrupted one
        loader = self.accelerator.prepare(
            DataLoader(
                RowsDataset(self.train_rows),
                batch_sampler=FixedBatches(batches, self.micro),
                collate_fn=make_collate(self.tokenizer),
                generator=torch.Generator().manual_seed(cfg.seed),
            )
        )
        # the weight sum of each optimizer step's rows (all processes, all accumulated micro-batches): the
        # loss of every micro-batch is normalised by it, so a step's gradient is exactly the weighted mean
        # over its rows, whatever the process count and accumulation
        micro_weights = [float(self.train_rows.weight[b].sum()) for b in batches]
        step_weights = [
            sum(micro_weights[i : i + cfg.grad_accum_steps])
            for i in range(0, len(batches), cfg.grad_accum_steps)
        ]
        if state.batch_in_epoch:
            loader = self.accelerator.skip_first_batches(loader, state.batch_in_epoch)
        self.step_loss = 0.0
        for batch in loader:
            micro_index = state.batch_in_epoch
            loss = self.train_step(batch, step_weights[micro_index // cfg.grad_accum_steps])
            state.batch_in_epoch += 1
            self.step_loss += float(loss.detach()) / (self.n_proc * cfg.grad_accum_steps)
            rows_now = batches[micro_index]  # the global micro-batch, all processes
            state.samples += len(rows_now)
            state.tokens += int(self.train_rows.n_tokens[rows_now].sum())
            if self.accelerator.sync_gradients and self.after_step():
                return True
        state.epoch += 1
        state.batch_in_epoch = 0
        return False

    def train_step(self, batch: dict[str, torch.Tensor], step_weight: float) -> torch.Tensor:
        """Forward, loss and backward of one micro-batch; the optimizer steps when accumulation is done."""
        cfg, accelerator = self.cfg, self.accelerator
        with accelerator.accumulate(self.model):
            ids, mask = batch["input_ids"], batch["attention_mask"]
            # the frozen layers' states of these rows, when cached: [B, T, H]
            trunk = None if self.train_trunk is None else self.train_trunk.batch(batch["index"], mask)
            if self.train_rows.aux is not None:
                pred, aux_pred = self.model(ids, mask, with_aux=True, trunk=trunk)
            else:
                pred = self.model(ids, mask, trunk=trunk)
            # a pointwise loss is summed over the local rows, divided by the step's global weight sum and
            # multiplied by the processes (DDP averages them) x accumulation steps (accelerate divides)
            total, scale = torch.tensor(step_weight, device=pred.device), self.n_proc * cfg.grad_accum_steps
            target, weight = batch["label"], batch["weight"]
            if cfg.loss == "ic":  # whole date groups on every process: the mean over them is exact
                loss = ic_mse_loss(pred, target, weight, cfg.date_group_size, cfg.ic_mse_weight, total, scale)
            else:
                loss = weighted_loss(pred, target, weight, cfg.loss, cfg.huber_delta, total, scale)
            if self.train_rows.aux is not None:  # equal rows per process: DDP's average is the global mean
                loss = loss + cfg.aux_feature_weight * ((aux_pred - batch["aux"]) ** 2).mean()
            accelerator.backward(loss)
            checkpointing.fault_point("step")  # (a test hook: a no-op unless its env var is set)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return loss

    def after_step(self) -> bool:
        """After an optimizer step: EMA, clock, learning rate, progress, evaluation, stop rules and
        checkpoint. True when the run stops here."""
        cfg, state = self.cfg, self.state
        state.step += 1
        if self.ema is not None:
            ema_update(self.ema, self.trainable, float(cfg.ema_decay), state.step)
        state.elapsed_s = self._shared_elapsed()
        self.set_lr(state.elapsed_s)
        device = self.accelerator.device
        loss_value = float(self.accelerator.reduce(torch.tensor(self.step_loss, device=device), "sum"))
        state.recent_losses = [*state.recent_losses[-19:], loss_value]
        self.step_loss = 0.0
        if self.bar is not None:
            self.bar.update(1)
            rate = state.samples / max(state.elapsed_s - state.eval_s, 1e-9)
            self.bar.set_postfix(
                loss=f"{np.mean(state.recent_losses):.4f}",
                lr=f"{self.optimizer.param_groups[0]['lr']:.2e}",
                samples_s=f"{rate:.1f}",
            )
        if cfg.eval_every_steps and state.step % cfg.eval_every_steps == 0:
            self.last_eval_step = state.step
            if self.record_eval(float(np.mean(state.recent_losses))):
                state.stopped_by = "early_stopping"
            self.model.train()
        over_time = cfg.time_budget_s is not None and state.elapsed_s >= cfg.time_budget_s
        if state.stopped_by is None and state.step >= self.total_steps:
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
            self.save_checkpoint()
        return state.stopped_by is not None

    # --- evaluation --------------------------------------------------------------------------------------
    def evaluated_weights(self) -> dict[str, torch.Tensor]:
        """What is judged and kept: the average when there is one, else the live weights (copies)."""
        if self.ema is not None:
            return {k: v.detach().cpu().clone() for k, v in self.ema.items()}
        return {k: v.cpu() for k, v in self.unwrapped.trainable_state_dict().items()}

    def evaluate(self) -> DailyMean:
        """Validation RankIC of the judged weights on the fixed evaluation dates, with its standard error
        and number of dates (all processes score)."""
        live = None
        if self.ema is not None:  # judge the average, then put the live weights back to go on training
            live = self.unwrapped.trainable_state_dict()
            self.unwrapped.load_trainable_state_dict(self.ema)
        preds = predict_ids(
            self.model,
            self.tokenizer,
            self.val_rows.ids,
            self.cfg.eval_batch_size,
            accelerator=self.accelerator,
            trunk=self.val_trunk,
        )
        checkpointing.fault_point("eval")
        if live is not None:
            self.unwrapped.load_trainable_state_dict(live)
        frame = self.val_rows.frame.assign(prediction=preds, label=self.val_rows.label)
        return rank_ic_stats(frame, horizon=self.eval_horizon)

    def record_eval(self, train_loss: float | None) -> bool:
        """Evaluate, keep the best weights; True when early stopping says stop."""
        state = self.state
        eval_started = _clock()
        stats = self.evaluate()
        score = stats.mean
        state.eval_s += _clock() - eval_started
        if self.tracker.update(score, state.step):
            self.best_state = self.evaluated_weights()
        state.best_rank_ic, state.best_step = self.tracker.best, self.tracker.best_step
        state.evals_without_improvement = self.tracker.waited
        state.history.append(
            {
                "step": state.step,
                "samples": state.samples,
                "elapsed_s": round(state.elapsed_s, 2),
                "train_loss": train_loss,
                "lr": float(self.optimizer.param_groups[0]["lr"]),
                "val_rank_ic": float(score),
                "val_rank_ic_se": float(stats.se),
                "val_n_dates": int(stats.n_dates),
            }
        )
        if self.on_eval is not None:
            self.on_eval(state.step, float(score))
        self.say(
            f"step {state.step}: validation RankIC {stats} (best {state.best_rank_ic:.4f} at step "
            f"{state.best_step})"
        )
        return self.tracker.should_stop

    # --- checkpoints and the end -------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        """Every file fsynced into `step-N.tmp/`, renamed into place, parent fsynced, then the older
        checkpoints deleted (`modeling.checkpointing`): a crash at any point leaves a usable checkpoint."""
        accelerator, state = self.accelerator, self.state
        accelerator.wait_for_everyone()
        tmp = self.ckpt_root / f"{checkpointing.checkpoint_name(state.step)}{checkpointing.TMP_SUFFIX}"
        if self.main:
            tmp = checkpointing.begin_checkpoint(self.ckpt_root, state.step)
            write_weights(
                tmp,
                self.unwrapped.trainable_state_dict(),
                self.optimizer.state_dict(),
                self.best_state,
                self.ema,
            )
            checkpointing.fault_point("checkpoint_write")
        accelerator.wait_for_everyone()
        checkpointing.save_rng(tmp, accelerator.process_index)
        # the loop time as of this checkpoint (the evaluation of this step and the writes included): a
        # resumed run's clock starts from here, and so does the learning rate of the next step, in this
        # run as in a resumed one (under a time budget it moved on)
        state.elapsed_s = self._shared_elapsed()
        self.set_lr(state.elapsed_s)
        accelerator.wait_for_everyone()
        if self.main:
            checkpointing.save_json(tmp / TRAIN_STATE_FILE, asdict(state))
            final = checkpointing.commit_checkpoint(tmp)
            self.say(f"checkpoint {final.name} saved")
        accelerator.wait_for_everyone()

    def finish(self) -> TrainResult:
        """The last evaluation, the weights to keep (best or average), the saved model and the reports."""
        cfg, state = self.cfg, self.state
        if self.last_eval_step != state.step and (cfg.eval_every_steps or not state.history):
            self.record_eval(float(np.mean(state.recent_losses)) if state.recent_losses else None)
        # the loop's clock holds its evaluations, this one or the last step's (a run ending on an evaluation
        # step, every early stop): without reading it again, samples/s = samples / (elapsed - eval) would
        # count that evaluation against the steps' time (None when it outlasts them)
        state.elapsed_s = self._shared_elapsed()
        if (
            cfg.select_best and self.best_state is not None
        ):  # (the average, when there is one: what was judged)
            self.unwrapped.load_trainable_state_dict(self.best_state)
        elif self.ema is not None:
            self.unwrapped.load_trainable_state_dict(self.ema)
        model_dir = self.out / "model"
        self.accelerator.wait_for_everyone()
        if self.main:
            extra = {
                "train": asdict(cfg),
                "best_step": state.best_step,
                "best_val_rank_ic": state.best_rank_ic,
            }
            save_regressor(self.unwrapped, model_dir, self.job.prompt, extra)
        dates = [str(pd.Timestamp(d).date()) for d in self.eval_dates]
        n_train, n_eval = len(self.train_rows), len(self.val_rows)
        wall = time.perf_counter() - self.started_wall
        result = TrainResult(model_dir, state, n_train, n_eval, dates, wall, self.n_proc)
        if self.main:
            write_text_atomic(
                self.out / "train_report.json", json.dumps(result.report(), indent=1, default=float) + "\n"
            )
            final = {
                "state": asdict(state),
                "n_train_rows": n_train,
                "n_eval_rows": n_eval,
                "eval_dates": dates,
                "wall_s": wall,
                "n_processes": self.n_proc,
            }
            # last and atomic: its presence tells a retry that this training is complete
            write_text_atomic(self.out / FINAL_STATE_FILE, json.dumps(final, default=float) + "\n")
        self.accelerator.wait_for_everyone()
        return result


def train_regressor(
    job: TrainJob,
    log: Callable[[str], None] = print,
    on_eval: Callable[[int, float], None] | None = None,
) -> TrainResult:
    """Train `job` (every process of an `accelerate launch` runs this); the main process saves the model.

    `on_eval(step, validation_rank_ic)` is called after every evaluation (a search reports to its pruner
    there; an exception it raises ends the run).
    """
    done = completed_result(job)
    if done is not None:
        log(f"training of {job.output_dir} already complete (step {done.state.step}); not repeated")
        return done
    trainer = RegressorTrainer(job, log, on_eval)
    trainer.setup()
    return trainer.fit()
