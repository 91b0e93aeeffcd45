"""Launch a training process (`modeling.run_job`) through Dagster Pipes: the `regressor` asset and each
`backtest` window run their child the same way."""

from __future__ import annotations

import os
from pathlib import Path

from dagster import Failure, MetadataValue, PipesClientCompletedInvocation, PipesSubprocessClient

from modeling.job import TrainJob
from modeling.launch import launch_command, visible_gpus
from modeling.train_setup import share_problem


def training_processes(requested: int | None, profile, train=None) -> int:
    """Training processes of a run: the config's count, else the profile's, else one per visible GPU
    (at least one), and then no more than the batch (`train`, the run's `TrainConfig`) has date groups for:
    under the IC loss each process correlates within whole groups of its share of a batch
    (`modeling.train_setup.share_problem`, the rule the training process checks), so a batch of 32 in
    groups of 16 trains on 2 of 8 GPUs. A count set in the config is kept as asked (the training process
    refuses one that cannot split).
    `regressor` and each `backtest` window choose alike."""
    if requested:
        return requested
    n = profile.num_processes or max(1, visible_gpus())
    if train is not None and train.date_group_size:
        micro = train.batch_size // train.grad_accum_steps
        n = max(p for p in range(1, n + 1) if share_problem(micro, p, train.date_group_size) is None)
    return n


def run_training_process(
    context,
    client: PipesSubprocessClient,
    job: TrainJob,
    processes: int = 1,
    accelerate_config_file: str | None = None,
    what: str = "the training process",
) -> tuple[PipesClientCompletedInvocation, Path]:
    """Save `job` in its output directory and run it through Pipes (its log lines reach the run's logs,
    its result comes back as Pipes metadata); (the invocation, the job file). A failure carries the
    child's own traceback (`error_rank<N>.txt`); the child dies with this process."""
    out = Path(job.output_dir)
    job_path = job.save(out / "job.json")
    # the directory is reused by retries: an earlier attempt's traceback must not pass for this one's
    for stale in out.glob("error_rank*.txt"):
        stale.unlink()
    command = launch_command(job_path, processes, accelerate_config_file)
    context.log.info(f"launching: {' '.join(command)}")
    try:
        invocation = client.run(
            command=command,
            context=context,
            cwd=str(Path.cwd()),
            env={"REGRESSOR_PARENT_PID": str(os.getpid())},  # the trainer dies with this run's process
        )
    except Exception as error:  # the Pipes client raises when the child exits with an error
        texts = [p.read_text() for p in sorted(out.glob("error_rank*.txt"))]
        if not texts:
            raise
        raise Failure(
            description=f"{what} failed:\n" + "\n".join(texts),
            metadata={"job": MetadataValue.path(str(job_path))},
        ) from error
    return invocation, job_path
