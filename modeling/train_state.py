"""The training loop's state and result, and the files a training directory holds: what a checkpoint
records (`LoopState`, JSON), what a finished job reports (`TrainResult`), and how a finished job is
recognised so it is not trained again."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modeling import checkpointing
from modeling.job import TrainJob

TRAIN_STATE_FILE = "trainer_state.json"
TRAINABLE_FILE = "trainable.safetensors"
BEST_FILE = "best_trainable.safetensors"
EMA_FILE = "ema_trainable.safetensors"
FINAL_STATE_FILE = "final_state.json"


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under `root` (see `modeling.checkpointing`: temporary, stale and
    truncated directories are never used), one with a loop state."""
    return checkpointing.latest_checkpoint(root, required=(TRAIN_STATE_FILE,))


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
    recent_losses: list[float] = field(default_factory=list)
    """The last 20 steps' training losses, whose mean each evaluation records as `train_loss`: saved, so
    a resumed run's history reads as the uninterrupted run's."""


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
        best = next((h for h in s.history if h["step"] == s.best_step), {})
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
            # its precision (a history saved before evaluations carried them has none)
            "best_val_rank_ic_se": best.get("val_rank_ic_se"),
            "best_val_n_dates": best.get("val_n_dates"),
            "stopped_by": s.stopped_by,
            "n_train_rows": self.n_train_rows,
            "n_eval_rows": self.n_eval_rows,
            "eval_dates": self.eval_dates,
            "n_processes": self.n_processes,
            "history": s.history,
        }


def completed_result(job: TrainJob) -> TrainResult | None:
    """The result of a job that already trained to the end (a later step of its run failed), else None."""
    out = Path(job.output_dir)
    finished = out / FINAL_STATE_FILE
    if not (job.resume and finished.is_file() and (out / "model" / "regressor.json").is_file()):
        return None
    final = json.loads(finished.read_text())
    return TrainResult(
        out / "model",
        LoopState(**final["state"]),
        final["n_train_rows"],
        final["n_eval_rows"],
        final["eval_dates"],
        final["wall_s"],
        final["n_processes"],
    )


def write_weights(
    directory: Path,
    trainable: dict[str, Any],
    optimizer_state: dict[str, Any],
    best: dict[str, Any] | None = None,
    ema: dict[str, Any] | None = None,
) -> None:
    """The tensors of a training checkpoint (safetensors, fsynced; see `modeling.checkpointing`)."""
    checkpointing.save_tensors(directory / TRAINABLE_FILE, trainable)
    if best is not None:
        checkpointing.save_tensors(directory / BEST_FILE, best)
    if ema is not None:
        checkpointing.save_tensors(directory / EMA_FILE, ema)
    checkpointing.save_optimizer(directory, optimizer_state)


@dataclass
class Checkpoint:
    """What `read_checkpoint` returns: safetensors and JSON only, nothing unpickled."""

    trainable: dict[str, Any]
    optimizer: dict[str, Any]
    state: LoopState
    best: dict[str, Any] | None
    ema: dict[str, Any] | None


def read_checkpoint(directory: Path, with_ema: bool) -> Checkpoint:
    best = directory / BEST_FILE
    return Checkpoint(
        trainable=checkpointing.load_tensors(directory / TRAINABLE_FILE),
        optimizer=checkpointing.load_optimizer(directory),
        state=LoopState(**checkpointing.load_json(directory / TRAIN_STATE_FILE)),
        best=checkpointing.load_tensors(best) if best.is_file() else None,
        ema=checkpointing.load_tensors(directory / EMA_FILE) if with_ema else None,
    )
