"""The training recipe: determinism, resume after a kill, DDP equivalence, caps, schedule, early stopping."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from safetensors.torch import load_file

from modeling.backbones.common import load_tokenizer
from modeling.data.corpus import (
    epoch_batches,
    evenly_spaced_dates,
    read_corpus_split,
    sample_rows,
    tokenise_rows,
)
from modeling.inference import predict_ids
from modeling.launch import launch_command
from modeling.model import HeadConfig, RegressorConfig, load_regressor
from modeling.prompt import PromptBuilder
from modeling.train import (
    TrainConfig,
    TrainJob,
    ema_update,
    lr_factor,
    lr_length_factor,
    train_regressor,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIG = TrainConfig(
    batch_size=8,
    learning_rate=3e-3,
    eval_every_steps=0,
    eval_max_dates=4,
    checkpoint_every_steps=0,
    progress=False,
    seed=3,
)


def _job(base: Path, corpus: Path, out: Path, dropout: float = 0.1, **train) -> TrainJob:
    return TrainJob(
        base_model_dir=str(base),
        corpus_path=str(corpus),
        output_dir=str(out),
        prompt=PromptBuilder().settings(),
        regressor=RegressorConfig(head=HeadConfig(hidden_sizes=(16,), dropout=dropout)),
        train=replace(CONFIG, **train),
    )


def _weights(model_dir: Path) -> dict:
    return {
        **load_file(model_dir / "adapter" / "adapter_model.safetensors"),
        **load_file(model_dir / "head.safetensors"),
    }


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}


def test_killed_training_resumes_to_the_same_weights(tiny_base_model, tiny_data, tmp_path: Path) -> None:
    _, corpus = tiny_data
    # with the weight average on: its state must survive the kill too; and evaluations every 10 steps, whose
    # recorded train_loss (the mean of the last 20 steps' losses) must read as the uninterrupted run's
    settings = {
        "max_steps": 60,
        "epochs": 3,
        "checkpoint_every_steps": 5,
        "ema_decay": 0.9,
        "eval_every_steps": 10,
    }
    reference = train_regressor(
        _job(tiny_base_model, corpus, tmp_path / "ref", **settings), log=lambda _: None
    )

    job_path = _job(tiny_base_model, corpus, tmp_path / "run", **settings).save(tmp_path / "job.json")
    command = [sys.executable, "-m", "modeling.run_job", "--job", str(job_path)]
    child = subprocess.Popen(command, cwd=ROOT, env=_env(), stderr=subprocess.PIPE, text=True)
    for line in child.stderr:  # kill -9 right after the first checkpoint is on disk
        if "checkpoint step-00000005 saved" in line:
            child.send_signal(signal.SIGKILL)
            break
    child.wait(timeout=120)
    assert child.returncode == -signal.SIGKILL
    assert not (tmp_path / "run" / "model").exists()  # it died mid-training
    assert (tmp_path / "run" / "checkpoints" / "step-00000005").is_dir()

    resumed = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step-" in resumed.stderr
    expected, got = _weights(reference.model_dir), _weights(tmp_path / "run" / "model")
    assert expected.keys() == got.keys()
    for name in expected:
        assert np.array_equal(expected[name].numpy(), got[name].numpy()), name
    history = __import__("json").loads((tmp_path / "run" / "final_state.json").read_text())["state"][
        "history"
    ]
    assert (
        [h["step"] for h in history]
        == [h["step"] for h in reference.state.history]
        == list(range(10, 61, 10))
    )
    assert [h["train_loss"] for h in history] == [h["train_loss"] for h in reference.state.history]


@pytest.mark.parametrize(
    "loss",
    [
        {},
        # the per-date correlation with its squared-error anchor: each process holds one date group of
        # the batch's two, and the anchor is normalised by the global weight sum
        {"loss": "ic", "date_group_size": 4, "ic_mse_weight": 0.5},
    ],
    ids=["mse", "ic_mse"],
)
def test_two_process_ddp_matches_one_process(tiny_base_model, tiny_data, tmp_path: Path, loss: dict) -> None:
    """`accelerate launch` with 2 gloo processes and the same global batch gives the same model.

    Tolerance: predictions within 1e-4 (labels have unit scale); the two runs differ only in the order of
    floating-point sums (per-process halves, then the all-reduce). Dropout is off: each process draws its
    own masks, so dropout noise cannot match a single process's draws."""
    _, corpus = tiny_data
    settings = {"max_steps": 12, "epochs": 2, "dropout": 0.0, **loss}
    single = train_regressor(_job(tiny_base_model, corpus, tmp_path / "one", **settings), log=lambda _: None)
    job_path = _job(tiny_base_model, corpus, tmp_path / "two", **settings).save(tmp_path / "job2.json")
    done = subprocess.run(
        launch_command(job_path, num_processes=2),
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = __import__("json").loads((tmp_path / "two" / "train_report.json").read_text())
    assert report["n_processes"] == 2 and report["steps"] == 12 and report["samples"] == 12 * 8
    tokenizer = load_tokenizer(tiny_base_model)
    rows = tokenise_rows(read_corpus_split(corpus, "test"), tokenizer)
    a = predict_ids(load_regressor(single.model_dir), tokenizer, rows.ids)
    b = predict_ids(load_regressor(tmp_path / "two" / "model"), tokenizer, rows.ids)
    assert np.abs(a).max() > 1e-3  # the model moved away from zero
    np.testing.assert_allclose(b, a, atol=1e-4, rtol=0)


@pytest.mark.parametrize("eval_every", [0, 3])
def test_the_last_evaluation_counts_in_the_loop_clock_not_against_the_steps(
    tiny_base_model, tiny_data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, eval_every: int
) -> None:
    # a deterministic clock: 0.01 s per reading, and every evaluation takes 100 s
    import modeling.train as train_module

    now = {"t": 0.0}

    def clock() -> float:
        now["t"] += 0.01
        return now["t"]

    evaluate = train_module.RegressorTrainer.evaluate

    def slow_evaluate(self):
        now["t"] += 100.0
        return evaluate(self)

    monkeypatch.setattr(train_module, "_clock", clock)
    monkeypatch.setattr(train_module.RegressorTrainer, "evaluate", slow_evaluate)
    _, corpus = tiny_data
    # no periodic evaluation: the only one is the last, after the loop (`finish`); or one every 3 steps,
    # the last at the last step (as at every early stop), which `finish` does not repeat
    job = _job(tiny_base_model, corpus, tmp_path, max_steps=6, eval_every_steps=eval_every)
    result = train_regressor(job, log=lambda _: None)
    report = result.report()
    assert [h["step"] for h in result.state.history] == ([6] if not eval_every else [3, 6])
    assert report["eval_s"] >= 100.0 * len(result.state.history)
    assert report["train_loop_s"] >= report["eval_s"]  # the loop's clock holds the evaluation it timed
    steps_s = report["train_loop_s"] - report["eval_s"]  # the steps' own time: readings of 0.01 s
    assert 0 < steps_s < 5.0
    assert report["samples_per_s"] == pytest.approx(6 * 8 / steps_s, rel=1e-2)


def test_training_is_seeded_and_learns_the_planted_signal(tiny_base_model, tiny_data, tmp_path: Path) -> None:
    _, corpus = tiny_data
    job = _job(tiny_base_model, corpus, tmp_path / "a", max_steps=36, eval_every_steps=9, eval_max_dates=8)
    result = train_regressor(job, log=lambda _: None)
    again = train_regressor(replace(job, output_dir=str(tmp_path / "b")), log=lambda _: None)
    first, second = _weights(result.model_dir), _weights(again.model_dir)
    assert all(np.array_equal(first[k].numpy(), second[k].numpy()) for k in first)
    history = result.state.history
    assert [h["step"] for h in history] == [9, 18, 27, 36]
    assert result.state.best_rank_ic == max(h["val_rank_ic"] for h in history)
    assert result.state.best_rank_ic > 0.2  # label = -40 ret_5d + noise: learnable from the prompt digits
    report = result.report()
    assert report["samples"] == 36 * 8 and report["samples_per_s"] > 0 and report["tokens_per_s"] > 0


def test_evaluations_that_decide_nothing_leave_the_weights_alone(
    tiny_base_model, tiny_data, tmp_path: Path
) -> None:
    """With the final weights kept and no early stopping, periodic evaluations only monitor: the trained
    weights are bit-identical with or without them (the backtest drops them on that ground)."""
    _, corpus = tiny_data
    settings = {"max_steps": 18, "select_best": False, "early_stopping_patience": None, "eval_max_dates": 4}
    watched = train_regressor(
        _job(tiny_base_model, corpus, tmp_path / "a", eval_every_steps=6, **settings), log=lambda _: None
    )
    quiet = train_regressor(
        _job(tiny_base_model, corpus, tmp_path / "b", eval_every_steps=0, **settings), log=lambda _: None
    )
    assert [h["step"] for h in watched.state.history] == [6, 12, 18]
    assert [h["step"] for h in quiet.state.history] == [18]  # evaluated once, at the end
    first, second = _weights(watched.model_dir), _weights(quiet.model_dir)
    assert all(np.array_equal(first[k].numpy(), second[k].numpy()) for k in first)
    # every evaluation carries its precision; the last one judged the saved weights, so by hand: the
    # Spearman correlation of forecast and label on each evaluation date, their mean, std / sqrt(n)
    # (horizon 1: no Newey-West lag)
    from scipy.stats import spearmanr

    last = watched.state.history[-1]
    val = read_corpus_split(corpus, "validation")
    val = val[val["date"].isin(pd.to_datetime(watched.report()["eval_dates"]))].reset_index(drop=True)
    tokenizer = load_tokenizer(tiny_base_model)
    ids = tokenise_rows(val, tokenizer).ids
    val["prediction"] = predict_ids(load_regressor(watched.model_dir), tokenizer, ids)
    daily = np.array([spearmanr(g["prediction"], g["label"])[0] for _, g in val.groupby("date")])
    assert last["val_n_dates"] == len(daily) == 4
    assert last["val_rank_ic"] == pytest.approx(daily.mean(), abs=1e-9)
    assert last["val_rank_ic_se"] == pytest.approx(daily.std(ddof=1) / np.sqrt(len(daily)), abs=1e-9)
    best = next(h for h in watched.state.history if h["step"] == watched.state.best_step)
    assert watched.report()["best_val_rank_ic_se"] == best["val_rank_ic_se"] > 0


def test_schedule_follows_the_clock_only_when_the_budget_binds() -> None:
    from modeling.optim import TIME_GUARD_SLACK, schedule_progress

    assert TIME_GUARD_SLACK == 0.1
    assert schedule_progress(10, 100, 5.0, None) == 0.1
    # the backtest's first step: 0.31 s of a 420 s budget no longer beats 1 of 1,526 steps
    assert schedule_progress(1, 1526, 0.31, 420.0) == 1 / 1526
    # a run far behind its steps follows the clock: (300 / 400 - 0.1) / 0.9
    assert schedule_progress(100, 1000, 300.0, 400.0) == pytest.approx(0.65 / 0.9)
    assert schedule_progress(100, 1000, 400.0, 400.0) == pytest.approx(1.0)  # the budget's end: the floor


def test_a_run_that_fits_its_time_budget_does_not_depend_on_the_clock(
    tiny_base_model, tiny_data, tmp_path: Path, monkeypatch
) -> None:
    """A slow first step (9 s of a 100 s budget, where 1 of 12 steps is 8.3%) once set the learning rate
    from the clock; a run that fits its budget now trains bit-identically to the same run without one."""
    import itertools

    from modeling import train as train_module

    _, corpus = tiny_data
    settings = {"max_steps": 12, "eval_every_steps": 1, "select_best": False, "early_stopping_patience": None}
    free = train_regressor(_job(tiny_base_model, corpus, tmp_path / "a", **settings), log=lambda _: None)
    readings = itertools.chain(
        [1000.0, 1009.0], itertools.count(1010.0)
    )  # 1 s a reading after the first step
    monkeypatch.setattr(train_module, "_clock", lambda: next(readings))
    timed = train_regressor(
        _job(tiny_base_model, corpus, tmp_path / "b", time_budget_s=100.0, **settings), log=lambda _: None
    )
    assert timed.state.stopped_by == "max_steps" and timed.state.elapsed_s < 100
    assert timed.state.history[0]["elapsed_s"] >= 9  # the slow first step happened
    assert [h["lr"] for h in timed.state.history] == [h["lr"] for h in free.state.history]
    first, second = _weights(free.model_dir), _weights(timed.model_dir)
    assert all(np.array_equal(first[k].numpy(), second[k].numpy()) for k in first)


def test_caps_and_early_stopping(tiny_base_model, tiny_data, tmp_path: Path) -> None:
    _, corpus = tiny_data
    capped = train_regressor(
        _job(tiny_base_model, corpus, tmp_path / "s", max_steps=5, max_train_samples=64), log=lambda _: None
    )
    assert (capped.state.step, capped.state.stopped_by, capped.n_train_rows) == (5, "max_steps", 64)
    timed = train_regressor(
        _job(tiny_base_model, corpus, tmp_path / "t", epochs=50, time_budget_s=1.0), log=lambda _: None
    )
    assert timed.state.stopped_by == "time_budget" and timed.state.epoch < 50
    # learning rate 0: nothing improves after the first evaluation, patience 2 stops at the third
    frozen = train_regressor(
        _job(
            tiny_base_model,
            corpus,
            tmp_path / "e",
            epochs=20,
            learning_rate=1e-12,
            eval_every_steps=3,
            early_stopping_patience=2,
        ),
        log=lambda _: None,
    )
    assert frozen.state.stopped_by == "early_stopping" and frozen.state.step == 9
    assert frozen.state.best_step == 3


def test_schedule_batches_and_samples() -> None:
    assert lr_factor(0.0, 0.1, 0.05) == 0.0
    assert lr_factor(0.05, 0.1, 0.05) == pytest.approx(0.5)
    assert lr_factor(0.1, 0.1, 0.05) == pytest.approx(1.0)
    assert lr_factor(1.0, 0.1, 0.05) == pytest.approx(0.05)
    assert lr_factor(0.55, 0.1, 0.0) == pytest.approx(0.5)
    # longer runs than the reference take a smaller peak: sqrt(reference / steps), never a larger one
    assert lr_length_factor(3000, 750) == pytest.approx(0.5)
    assert lr_length_factor(500, 750) == 1.0 and lr_length_factor(12_000, None) == 1.0
    lengths = np.random.default_rng(0).integers(200, 260, size=103)
    batches = epoch_batches(lengths, 8, seed=1, epoch=0, group_by_length=True, multiple_of=3)
    assert len(batches) == 12 and all(len(b) == 8 for b in batches)  # 12 full batches, a multiple of 3
    assert batches == epoch_batches(lengths, 8, 1, 0, True, 3)
    assert batches != epoch_batches(lengths, 8, 1, 1, True, 3)
    spreads = [np.ptp(lengths[b]) for b in batches]
    assert np.mean(spreads) < np.ptp(lengths) / 3  # grouped by length: little padding
    dates = pd.Series(pd.bdate_range("2024-01-01", periods=50)).repeat(3)
    chosen = evenly_spaced_dates(dates, 5)
    assert len(chosen) == 5 and chosen[0] == dates.min() and chosen[-1] == dates.max()
    frame = pd.DataFrame({"x": range(100)})
    assert (
        sample_rows(frame, 10, 0).equals(sample_rows(frame, 10, 0)) and len(sample_rows(frame, 10, 0)) == 10
    )
    assert len(sample_rows(frame, None, 0)) == 100


def test_weight_average_update_and_what_is_saved(tiny_base_model, tiny_data, tmp_path: Path) -> None:
    import torch

    average = {"w": torch.zeros(2)}
    param = {"w": torch.tensor([1.0, -2.0])}
    assert ema_update(average, param, 0.99, step=1) == pytest.approx(2 / 11)  # warm-up: (1+1)/(10+1)
    np.testing.assert_allclose(average["w"].numpy(), [9 / 11, -18 / 11], rtol=1e-6)
    assert ema_update(average, {"w": torch.zeros(2)}, 0.5, step=100) == 0.5  # the cap binds later
    np.testing.assert_allclose(average["w"].numpy(), [9 / 22, -9 / 11], rtol=1e-6)
    with pytest.raises(ValueError, match="ema_decay"):
        TrainConfig(ema_decay=1.0)

    # a vanishing decay averages nothing: the saved model is the live one of a run without the average
    _, corpus = tiny_data
    plain = train_regressor(_job(tiny_base_model, corpus, tmp_path / "p", max_steps=8), log=lambda _: None)
    near = train_regressor(
        _job(tiny_base_model, corpus, tmp_path / "n", max_steps=8, ema_decay=1e-9), log=lambda _: None
    )
    averaged = train_regressor(
        _job(tiny_base_model, corpus, tmp_path / "a", max_steps=8, ema_decay=0.9), log=lambda _: None
    )
    a, b, c = _weights(plain.model_dir), _weights(near.model_dir), _weights(averaged.model_dir)
    for name in a:
        np.testing.assert_allclose(b[name].numpy(), a[name].numpy(), atol=1e-6, rtol=0)
    assert any(not np.allclose(c[k].numpy(), a[k].numpy(), atol=1e-4) for k in a)  # the average differs


def test_auxiliary_feature_probe_trains_and_is_not_saved(tiny_base_model, tiny_data, tmp_path: Path) -> None:
    from modeling.data.corpus import aux_feature_targets

    training_set, corpus = tiny_data
    train_frame = read_corpus_split(corpus, "train")
    targets = aux_feature_targets(train_frame, training_set)
    assert targets.shape == (len(train_frame), 16)
    np.testing.assert_allclose(targets.mean(axis=0), 0, atol=1e-5)  # standardised on these rows
    with pytest.raises(ValueError, match="training_set_path"):
        train_regressor(_job(tiny_base_model, corpus, tmp_path / "x", max_steps=2, aux_feature_weight=1.0))
    job = replace(
        _job(tiny_base_model, corpus, tmp_path / "a", max_steps=6, aux_feature_weight=1.0),
        training_set_path=str(training_set),
    )
    result = train_regressor(job, log=lambda _: None)
    plain = train_regressor(_job(tiny_base_model, corpus, tmp_path / "b", max_steps=6), log=lambda _: None)
    # the probe adds its reconstruction error to the loss, and changes what the adapters learn ...
    assert result.state.history[-1]["train_loss"] > plain.state.history[-1]["train_loss"]
    assert not np.array_equal(
        _weights(result.model_dir)["base_model.model.layers.0.self_attn.q_proj.lora_B.weight"].numpy(),
        _weights(plain.model_dir)["base_model.model.layers.0.self_attn.q_proj.lora_B.weight"].numpy(),
    )
    # ... but is a training device only: the saved model is the same set of files and loads as usual
    saved = sorted(p.name for p in result.model_dir.rglob("*") if p.is_file())
    assert saved == sorted(p.name for p in plain.model_dir.rglob("*") if p.is_file())
    assert not any("aux" in k for k in _weights(result.model_dir))
    load_regressor(result.model_dir)


def test_the_trainer_dies_with_the_run_process() -> None:
    """A trainer whose orchestrator was SIGKILLed must not live on (it would register a model and race the
    retry): `exit_with_parent` kills it within a few seconds of its parent's death."""
    import signal
    import subprocess
    import sys
    import time

    parent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    trainer = subprocess.Popen(
        [sys.executable, "-c", "import time\nfrom modeling.run_job import exit_with_parent\n"
         "exit_with_parent(0.2)\ntime.sleep(120)"],
        env={**os.environ, "REGRESSOR_PARENT_PID": str(parent.pid)},
    )  # fmt: skip
    time.sleep(3)
    assert trainer.poll() is None  # alive while its parent is
    parent.send_signal(signal.SIGKILL)  # not reaped yet: a zombie counts as dead
    assert trainer.wait(timeout=30) == -signal.SIGKILL
    parent.wait()


def test_a_feature_bottleneck_head_forecasts_from_the_probe_and_saves_it(
    tiny_base_model, tiny_data, tmp_path: Path
) -> None:
    """`HeadConfig.feature_bottleneck`: the auxiliary probe is the head's first layer. The forecast is the
    MLP of its 16 readouts, the probe's loss trains that layer (no separate probe), and it is saved."""
    import torch

    from modeling.inference import encode_prompts, pad_batch

    training_set, corpus = tiny_data
    head = HeadConfig(hidden_sizes=(16,), dropout=0.0, feature_bottleneck=16)
    job = replace(
        _job(tiny_base_model, corpus, tmp_path / "a", max_steps=6, aux_feature_weight=1.0),
        training_set_path=str(training_set),
        regressor=RegressorConfig(head=head),
    )
    result = train_regressor(job, log=lambda _: None)
    weights = _weights(result.model_dir)
    assert weights["readout.weight"].shape == (16, 32)  # 16 features from the tiny backbone's 32-wide state
    assert weights["net.0.weight"].shape == (16, 16)  # the MLP reads the 16 readouts, not the state
    assert not any("aux" in k for k in weights)

    model = load_regressor(result.model_dir)
    assert model.aux_head is None
    train_frame = read_corpus_split(corpus, "train").head(8)
    tok = load_tokenizer(tiny_base_model)
    batch = pad_batch(tok, encode_prompts(tok, train_frame["prompt"].tolist()))
    with torch.no_grad():
        pooled = model.pooled_hidden(batch["input_ids"], batch["attention_mask"])
        readouts = model.head.readout(pooled)
        forecast, aux = model(batch["input_ids"], batch["attention_mask"], with_aux=True)
        by_hand = model.head.net(readouts).squeeze(-1)
    np.testing.assert_allclose(forecast.numpy(), by_hand.numpy(), atol=1e-6)
    np.testing.assert_array_equal(aux.numpy(), readouts.numpy())  # the probe's output is the readout

    # the probe's loss reaches the readout: the same run without it ends with another readout
    plain = train_regressor(
        replace(job, output_dir=str(tmp_path / "b"), train=replace(job.train, aux_feature_weight=0.0)),
        log=lambda _: None,
    )
    assert not np.allclose(
        _weights(plain.model_dir)["readout.weight"].numpy(), weights["readout.weight"].numpy()
    )

    # the probe has one output per feature: a bottleneck of another width cannot be it
    with pytest.raises(ValueError, match="feature bottleneck has 8 outputs"):
        train_regressor(
            replace(
                job,
                output_dir=str(tmp_path / "c"),
                regressor=RegressorConfig(head=replace(head, feature_bottleneck=8)),
            ),
            log=lambda _: None,
        )
    with pytest.raises(ValueError, match="feature_bottleneck"):
        HeadConfig(feature_bottleneck=-1)


def test_date_groups_larger_than_any_date_are_named_in_the_error(
    tiny_base_model, tiny_data, tmp_path
) -> None:
    """12 names a date and groups of 16: every date-grouped draw is empty. The error says why, instead of
    claiming the corpus has no train rows."""
    _, corpus = tiny_data
    job = _job(tiny_base_model, corpus, tmp_path, max_steps=2, batch_size=16, loss="ic", date_group_size=16)
    with pytest.raises(
        ValueError, match="no date of the prompt corpus .* has date_group_size = 16 train rows"
    ):
        train_regressor(job, log=lambda _: None)
