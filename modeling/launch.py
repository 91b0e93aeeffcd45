"""The command that runs a training job: `accelerate launch ... -m modeling.run_job --job job.json`.

The same command runs the child process of the `regressor` asset on this machine, on a GPU box, and in
Kubernetes; only the process count or the accelerate config file changes:

- 1 process: `accelerate launch --num_processes 1 -m modeling.run_job --job job.json`
- N processes: `accelerate launch --multi_gpu --num_processes N ...` (torchrun). On a CPU-only machine
  the training script asks accelerate for the CPU (`Accelerator(cpu=True)`), which makes the N
  processes one gloo DDP group. (accelerate 1.15's `--cpu` flag itself starts a single process unless
  an MPI hostfile is given, so it is not used for several processes.)
- a config file (`configs/accelerate/multi_gpu.yaml`, or an FSDP / DeepSpeed one):
  `accelerate launch --config_file FILE -m modeling.run_job --job job.json`
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def accelerate_executable() -> str:
    """The `accelerate` script of this interpreter's environment."""
    candidate = Path(sys.executable).parent / "accelerate"
    return str(candidate) if candidate.exists() else "accelerate"


def launch_command(
    job_path: str | Path,
    num_processes: int = 1,
    config_file: str | Path | None = None,
    main_process_port: int | None = None,
) -> list[str]:
    """argv of the training child for `job_path`."""
    command = [accelerate_executable(), "launch"]
    if config_file is not None:
        command += ["--config_file", str(config_file)]
    elif num_processes > 1:
        command += [
            "--multi_gpu",
            "--num_processes",
            str(num_processes),
            "--num_machines",
            "1",
            "--main_process_port",
            str(main_process_port or free_port()),
        ]
    else:
        command += ["--num_processes", "1", "--num_machines", "1"]
    if config_file is None:
        # precision is decided by the script (bf16 on GPU, fp32 on CPU); no torch.compile
        command += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    # without this accelerate sets OMP_NUM_THREADS=1, which halves CPU training on a 2-core machine
    threads = max(1, (os.cpu_count() or 1) // max(1, num_processes))
    command += ["--num_cpu_threads_per_process", str(threads)]
    return [*command, "-m", "modeling.run_job", "--job", str(job_path)]


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0
