"""The training process's entry point: train a `TrainJob`, then (main rank) evaluate and publish it.

    python -m modeling.run_job --job job.json                                   # one process
    accelerate launch --multi_gpu --num_processes 2 -m modeling.run_job --job job.json  # DDP (gloo on a CPU)
    accelerate launch --config_file configs/accelerate/multi_gpu.yaml -m modeling.run_job --job job.json

Every process trains (`modeling.train`); when the job names an MLflow experiment the main process then
hands the trained model to `modeling.experiment` (imported only then: mlflow is needed only there) for
evaluation, logging and registration; when it is a walk-forward window (`backtest_output`) to
`modeling.walk_forward`, which forecasts the window's dates with it and the feature baselines.
Progress and the result go back to the orchestrator through Dagster Pipes when it launched this
process (`modeling.pipes_reporting`); a failure's traceback is also written to `error_rank<RANK>.txt` in
the job's output directory. `modeling.launch.launch_command` builds the command.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
import time
from pathlib import Path

from modeling.allocator import tune_malloc
from modeling.processes import process_alive
from modeling.train import TrainJob, train_regressor

PARENT_PID_ENV = "REGRESSOR_PARENT_PID"
"""The orchestrator's process id (set by the `regressor` asset): the trainer dies with it."""


def exit_with_parent(interval_s: float = 2.0) -> threading.Thread | None:
    """When the process named by `REGRESSOR_PARENT_PID` is gone (a Dagster run process killed with
    SIGKILL), kill this one too: an orphaned trainer would otherwise go on, register a model, and race the
    retry of the same run, which registers the same inputs again. Checked every `interval_s` seconds by
    a daemon thread; no-op without the variable."""
    pid = os.environ.get(PARENT_PID_ENV)
    if not pid:
        return None

    def watch() -> None:
        while True:
            time.sleep(interval_s)
            if not process_alive(int(pid)):
                os.kill(os.getpid(), signal.SIGKILL)

    thread = threading.Thread(target=watch, name="exit-with-parent", daemon=True)
    thread.start()
    return thread


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--job", required=True, help="TrainJob JSON file")
    args = parser.parse_args(argv)
    job = TrainJob.load(args.job)
    exit_with_parent()
    tune_malloc()  # before the first tensor: 1.08-1.15x training, 1.4x scoring on 2 cores
    from modeling.pipes_reporting import child_reporter, is_main_rank

    error_file = Path(job.output_dir) / f"error_rank{os.environ.get('RANK', '0')}.txt"
    error_file.unlink(missing_ok=True)
    try:
        with child_reporter() as report:
            result = train_regressor(job, log=report.log)
            if job.experiment is not None and is_main_rank():
                from modeling.experiment import run_experiment

                report.done(run_experiment(job, result, log=report.log))
            elif job.backtest_output is not None and is_main_rank():
                from modeling.walk_forward import run_window

                report.done(run_window(job, result, log=report.log))
            elif is_main_rank():
                report.done({"train": result.report()})
    except BaseException:
        import traceback

        # the orchestrator reads this to fail the step with the child's own error text
        error_file.parent.mkdir(parents=True, exist_ok=True)
        error_file.write_text(traceback.format_exc()[-4000:])
        raise
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
