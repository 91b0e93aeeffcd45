"""The GPU benchmark's code path, run on the CPU with a tiny Llama config (the smoke test of
`python bench/bench_gpu.py llama8b`, which needs a GPU for real numbers)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_llama8b_benchmark_runs_and_counts_flops_on_a_tiny_config(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "bench/bench_gpu.py",
            "llama8b",
            "--tiny",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--batch",
            "2",
            "--seq",
            "32",
            "--peak-tflops",
            "1.0",
        ],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path), "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_llama8b.json").read_text())
    # per layer: q 64x64, k and v 64x32 (2 KV heads of 16), o 64x64, gate/up/down 64x128, 2 norms of 64;
    # two layers and the final norm
    per_layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128 + 2 * 64
    assert result["non_embedding_params"] == 2 * per_layer + 64
    assert result["tokens_per_s"] > 0 and result["samples_per_s"] == pytest.approx(
        result["tokens_per_s"] / 32
    )
    assert result["mfu"] == pytest.approx(result["tokens_per_s"] * 4 * result["non_embedding_params"] / 1e12)
    assert "| 2 x 32 |" in done.stdout  # the BENCHMARKS.md row it prints
