"""Checkpoints that survive a crash: durable writes, no pickle, exact resume after a SIGKILL at any point
(mid-step, mid-checkpoint write, mid-evaluation) and under a binding time budget."""

from __future__ import annotations

import itertools
import json
import os
import pickle
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from modeling import checkpointing
from modeling import train as train_module
from modeling.model import HeadConfig, RegressorConfig
from modeling.prompt import PromptBuilder
from modeling.train import TRAIN_STATE_FILE, TrainConfig, TrainJob, latest_checkpoint, train_regressor

ROOT = Path(__file__).resolve().parents[1]
# 12 steps, evaluations at 3, 6, 9, 12, checkpoints at 4 and 8; the weight average is on, so a kill
# mid-evaluation (the average swapped into the model) is a kill in the worst place
SETTINGS = TrainConfig(
    batch_size=8,
    learning_rate=3e-3,
    max_steps=12,
    epochs=1,
    eval_every_steps=3,
    eval_max_dates=4,
    checkpoint_every_steps=4,
    ema_decay=0.9,
    progress=False,
    seed=3,
)


def _job(base: Path, corpus: Path, out: Path, **train) -> TrainJob:
    return TrainJob(
        base_model_dir=str(base),
        corpus_path=str(corpus),
        output_dir=str(out),
        prompt=PromptBuilder().settings(),
        regressor=RegressorConfig(head=HeadConfig(hidden_sizes=(16,), dropout=0.1)),
        train=replace(SETTINGS, **train),
    )


def _weights(model_dir: Path) -> dict:
    return {
        **load_file(model_dir / "adapter" / "adapter_model.safetensors"),
        **load_file(model_dir / "head.safetensors"),
    }


def _assert_same_weights(expected: dict, got: dict) -> None:
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def _child(job_path: Path, fault: str | None, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    env.pop(checkpointing.FAULT_ENV, None)
    if fault is not None:
        env[checkpointing.FAULT_ENV] = fault
    command = [sys.executable, "-m", "modeling.run_job", "--job", str(job_path)]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _assert_no_pickle(directory: Path) -> None:
    """Every file of a checkpoint is safetensors (it opens as one) or JSON (it parses)."""
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    assert files
    for path in files:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                list(f.keys())
        else:
            assert path.suffix == ".json", path.name
            json.loads(path.read_text())


@pytest.fixture
def no_unpickling(monkeypatch):
    """Any torch.load or unpickling fails the test."""

    def refuse(*_args, **_kwargs):
        raise AssertionError("a checkpoint was unpickled")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)


@pytest.fixture(scope="module")
def reference(tiny_base_model, tiny_data, tmp_path_factory):
    """The uninterrupted run: its weights and report."""
    _, corpus = tiny_data
    out = tmp_path_factory.mktemp("reference")
    result = train_regressor(_job(tiny_base_model, corpus, out), log=lambda _: None)
    return _weights(result.model_dir), result.report()


# --- SIGKILL at three points, then retry --------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(
    ("fault", "resumes_from"),
    [
        ("step:6", "step-00000004"),  # mid-step (after backward, before the optimizer step) at step 6
        ("checkpoint_write:1", None),  # writing the first checkpoint: only a .tmp, the retry starts clean
        ("eval:3", "step-00000008"),  # in the evaluation of step 9, the average in the model
    ],
)
def test_sigkill_then_retry_resumes_exactly(
    fault, resumes_from, reference, tiny_base_model, tiny_data, tmp_path: Path
) -> None:
    _, corpus = tiny_data
    out = tmp_path / "run"
    job_path = _job(tiny_base_model, corpus, out).save(tmp_path / "job.json")

    killed = _child(job_path, fault)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (out / "model").exists()
    found = latest_checkpoint(out / "checkpoints")
    assert (found.name if found else None) == resumes_from
    if fault.startswith("checkpoint_write"):  # the half-written checkpoint is there, and ignored
        assert (out / "checkpoints" / "step-00000004.tmp").is_dir()

    retry = _child(job_path, None)
    assert retry.returncode == 0, retry.stderr[-3000:]
    if resumes_from is None:
        assert "resumed from" not in retry.stderr
    else:
        assert f"resumed from {resumes_from}" in retry.stderr
    expected_weights, expected_report = reference
    _assert_same_weights(expected_weights, _weights(out / "model"))
    report = json.loads((out / "train_report.json").read_text())
    for key in ("steps", "samples", "best_step", "best_val_rank_ic", "stopped_by"):
        assert report[key] == expected_report[key], key
    assert [(h["step"], h["val_rank_ic"], h["lr"]) for h in report["history"]] == [
        (h["step"], h["val_rank_ic"], h["lr"]) for h in expected_report["history"]
    ]
    # the last checkpoint alone remains (older ones and the leftover .tmp deleted), and it is pickle-free
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-00000008"]
    _assert_no_pickle(out / "checkpoints" / "step-00000008")


# --- the time budget ------------------------------------------------------------------------------------
def test_resume_under_a_binding_time_budget_continues_the_clock(
    tiny_base_model, tiny_data, tmp_path: Path, monkeypatch, no_unpickling
) -> None:
    """A deterministic clock (1 s per reading: each step, each evaluation's start and end, each
    checkpoint): the budget ends the run at step 11, and the cosine runs on elapsed time. A run
    interrupted at step 9 resumes from step 6 with the clock where the checkpoint left it, so it stops at
    the same step with the same learning rates and weights. (Restarting the clock, or dropping the
    evaluation that precedes a checkpoint, would run longer on a different schedule.)"""
    _, corpus = tiny_data
    settings = {
        "max_steps": None,
        "epochs": 3,
        "time_budget_s": 20.0,
        "eval_every_steps": 3,
        "checkpoint_every_steps": 3,
        "ema_decay": None,
    }

    def fresh_clock() -> None:
        ticks = itertools.count(1000)
        monkeypatch.setattr(train_module, "_clock", lambda: float(next(ticks)))

    fresh_clock()
    reference = train_regressor(
        _job(tiny_base_model, corpus, tmp_path / "ref", **settings), log=lambda _: None
    )
    assert reference.state.stopped_by == "time_budget" and reference.state.step == 11

    class Crash(Exception):
        pass

    def crash_at_9(step: int, _score: float) -> None:
        if step == 9:
            raise Crash

    job = _job(tiny_base_model, corpus, tmp_path / "run", **settings)
    fresh_clock()
    with pytest.raises(Crash):
        train_regressor(job, log=lambda _: None, on_eval=crash_at_9)
    checkpoint = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert checkpoint is not None and checkpoint.name == "step-00000006"
    saved = json.loads((checkpoint / TRAIN_STATE_FILE).read_text())
    assert saved["elapsed_s"] == 12.0  # 6 steps, 2 evaluations (2 readings each), 2 checkpoints
    _assert_no_pickle(checkpoint)

    fresh_clock()  # a new process: its clock reads anything
    messages: list[str] = []
    resumed = train_regressor(job, log=messages.append)  # (torch.load and pickle refuse: see the fixture)
    assert any("resumed from step-00000006" in m for m in messages)
    assert (resumed.state.step, resumed.state.stopped_by) == (11, "time_budget")
    assert resumed.state.elapsed_s == reference.state.elapsed_s
    assert [(h["step"], h["elapsed_s"], h["lr"]) for h in resumed.state.history] == [
        (h["step"], h["elapsed_s"], h["lr"]) for h in reference.state.history
    ]
    _assert_same_weights(_weights(reference.model_dir), _weights(resumed.model_dir))


# --- the format -----------------------------------------------------------------------------------------
def test_optimizer_and_rng_states_round_trip_without_pickle(tmp_path: Path, no_unpickling) -> None:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(4))]
    groups = [{"params": [params[0]], "lr": 1e-2, "name": "a"}, {"params": [params[1]], "lr": 2e-2}]
    optimizer = torch.optim.AdamW(groups, betas=(0.8, 0.95), weight_decay=0.1)
    for _ in range(3):
        sum((p**2).sum() for p in params).backward()
        optimizer.step()
        optimizer.zero_grad()
    checkpointing.save_optimizer(tmp_path, optimizer.state_dict())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["optimizer.json", "optimizer.safetensors"]
    keys = set(load_file(tmp_path / "optimizer.safetensors"))
    assert keys == {f"state.{i}.{n}" for i in (0, 1) for n in ("step", "exp_avg", "exp_avg_sq")}
    loaded = checkpointing.load_optimizer(tmp_path)
    original = optimizer.state_dict()
    assert loaded["param_groups"] == original["param_groups"]  # tuples (betas) come back as tuples
    assert isinstance(loaded["param_groups"][0]["betas"], tuple)
    for i, values in original["state"].items():
        for name, value in values.items():
            assert (
                torch.equal(loaded["state"][i][name], value) and loaded["state"][i][name].dtype == value.dtype
            )
    # a fresh optimizer given the loaded state continues exactly like the original
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    twin = torch.optim.AdamW(
        [{"params": [twins[0]], "lr": 1.0, "name": "a"}, {"params": [twins[1]], "lr": 1.0}]
    )
    twin.load_state_dict(loaded)
    for opt, ps in ((optimizer, params), (twin, twins)):
        sum((p**2).sum() for p in ps).backward()
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(params, twins, strict=True))

    import random

    random.random(), np.random.rand(), torch.rand(1), random.gauss(0, 1), np.random.randn()

    def draw() -> tuple:  # one draw from every generator the checkpoint restores
        return (
            random.random(),
            random.gauss(0, 1),
            np.random.rand(3).tolist(),
            np.random.randn(),
            torch.rand(3),
        )

    checkpointing.save_rng(tmp_path, 0)
    draws = draw()
    checkpointing.load_rng(tmp_path, 0)
    again = draw()
    assert draws[:4] == again[:4] and torch.equal(draws[4], again[4])
    _assert_no_pickle(tmp_path)
    with pytest.raises(TypeError, match="without pickle"):
        checkpointing.flatten_state({"x": object()})


def _write_checkpoint(root: Path, step: int) -> Path:
    tmp = checkpointing.begin_checkpoint(root, step)
    checkpointing.save_tensors(tmp / "trainable.safetensors", {"w": torch.full((4,), float(step))})
    checkpointing.save_json(tmp / TRAIN_STATE_FILE, {"step": step})
    return tmp


def test_latest_checkpoint_ignores_temporary_and_incomplete_directories(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    assert latest_checkpoint(root) is None and latest_checkpoint(tmp_path) is None
    checkpointing.commit_checkpoint(_write_checkpoint(root, 4))
    assert latest_checkpoint(root) == root / "step-00000004"
    _write_checkpoint(root, 8)  # killed mid-write: a .tmp, whatever it holds
    assert latest_checkpoint(root) == root / "step-00000004"
    # final names but incomplete: no manifest (a rename that outran its files), a truncated file
    (root / "step-00000012").mkdir()
    checkpointing.save_json(root / "step-00000012" / TRAIN_STATE_FILE, {"step": 12})
    truncated = checkpointing.commit_checkpoint(_write_checkpoint(tmp_path / "x", 16))
    truncated.rename(root / "step-00000016")
    with open(root / "step-00000016" / "trainable.safetensors", "r+b") as f:
        f.truncate(10)
    (root / "step-00000020.stale").mkdir()
    assert latest_checkpoint(root) == root / "step-00000004"
    # the loop's own reader also wants a loop state: it goes back to the last one that has it
    no_state = _write_checkpoint(tmp_path / "y", 24)
    (no_state / TRAIN_STATE_FILE).unlink()
    checkpointing.commit_checkpoint(no_state).rename(root / "step-00000024")
    assert checkpointing.latest_checkpoint(root) == root / "step-00000024"
    assert latest_checkpoint(root) == root / "step-00000004"
    # the next commit deletes everything else
    checkpointing.commit_checkpoint(_write_checkpoint(root, 28))
    assert [p.name for p in root.iterdir()] == ["step-00000028"]


def test_commit_is_durable_before_the_previous_checkpoint_goes(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "checkpoints"
    checkpointing.commit_checkpoint(_write_checkpoint(root, 4))
    tmp = _write_checkpoint(root, 8)
    events: list[tuple] = []
    fsync, rename = checkpointing.fsync_path, os.replace
    monkeypatch.setattr(
        checkpointing,
        "fsync_path",
        lambda p: (events.append(("fsync", p.name, (root / "step-00000004").exists())), fsync(p))[1],
    )
    monkeypatch.setattr(
        os, "replace", lambda a, b: (events.append(("rename", Path(a).name)), rename(a, b))[1]
    )
    checkpointing.commit_checkpoint(tmp)
    files = {"trainable.safetensors", TRAIN_STATE_FILE}  # (the manifest: fsynced as it is written)
    n = len(files)
    assert {e[1] for e in events[:n]} == files  # every file, then the directory, then the rename
    assert events[n : n + 4] == [
        ("fsync", "step-00000008.tmp", True),
        ("rename", "step-00000008.tmp"),
        ("fsync", "checkpoints", True),  # the parent made durable with the old checkpoint still there
        ("fsync", "checkpoints", False),  # then it is deleted
    ]
    assert [p.name for p in root.iterdir()] == ["step-00000008"]


def test_a_kill_right_after_the_rename_leaves_two_good_checkpoints(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "checkpoints"
    checkpointing.commit_checkpoint(_write_checkpoint(root, 4))

    class Killed(Exception):
        pass

    def fault(name: str) -> None:
        if name == "checkpoint_rename":
            raise Killed

    monkeypatch.setattr(checkpointing, "fault_point", fault)
    with pytest.raises(Killed):
        checkpointing.commit_checkpoint(_write_checkpoint(root, 8))
    assert sorted(p.name for p in root.iterdir()) == ["step-00000004", "step-00000008"]
    assert latest_checkpoint(root) == root / "step-00000008"


def test_fault_point_is_a_no_op_unless_asked(monkeypatch) -> None:
    monkeypatch.delenv(checkpointing.FAULT_ENV, raising=False)
    for _ in range(3):
        checkpointing.fault_point("step")
    monkeypatch.setenv(checkpointing.FAULT_ENV, "eval:1")
    checkpointing.fault_point("step")  # another point: still alive
    assert "step" not in checkpointing._fault_hits
