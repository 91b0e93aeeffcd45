"""The job contract: typed, validated when the job is built (not an hour into training), JSON round trip."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from modeling.job import (
    ExperimentSpec,
    HeadConfig,
    LoraSettings,
    Outcome,
    RegressorConfig,
    TrainConfig,
    TrainJob,
)
from modeling.profiles import PROFILES, apply_overrides


def _job(**kwargs) -> TrainJob:
    return TrainJob("base", "corpus.parquet", "out", {"horizon": 1}, **kwargs)


def test_nested_parts_are_typed_and_round_trip_through_json(tmp_path: Path) -> None:
    job = _job(
        regressor=RegressorConfig(head=HeadConfig(hidden_sizes=(64, 32))),
        train=TrainConfig(batch_size=16),
        experiment={"tracking_uri": "sqlite:///x.db", "training_set_path": "ts.parquet", "gate_k": 2.0},
    )
    assert isinstance(job.experiment, ExperimentSpec) and job.experiment.gate_k == 2.0
    again = TrainJob.load(job.save(tmp_path / "job.json"))
    assert again == job and again.regressor.head.hidden_sizes == (64, 32)


def test_lora_last_layers_is_a_flat_override_and_round_trips(tmp_path: Path) -> None:
    cpu, gpu = PROFILES["cpu"], PROFILES["gpu"]
    # the cpu profile adapts the last layer only at its demo size (the 3-seed comparison); the gpu one every
    # layer
    assert cpu.regressor.lora.last_layers == 1 and gpu.regressor.lora.last_layers is None
    # the per-date IC loss on date groups of 16
    assert (cpu.train.loss, cpu.train.date_group_size) == ("ic", 16)
    # the head reads the feature probe's 16 readouts (the seeds' spread)
    assert cpu.regressor.head.feature_bottleneck == 16
    assert cpu.train.aux_feature_weight > 0  # the readout is the probe: it needs the probe's loss
    regressor, _ = apply_overrides(gpu.regressor, gpu.train, {"lora_last_layers": 2})
    assert regressor.lora == LoraSettings(r=32, alpha=64.0, last_layers=2)
    every, _ = apply_overrides(cpu.regressor, cpu.train, {"lora_last_layers": None})
    assert every.lora == LoraSettings(r=32, alpha=64.0) and every.lora.last_layers is None
    job = _job(regressor=regressor)
    assert TrainJob.load(job.save(tmp_path / "job.json")).regressor.lora.last_layers == 2


def test_the_cpu_profiles_last_layer_adapters_hold_at_its_demo_size_and_every_layer_above(
    tmp_path: Path,
) -> None:
    """`last_layers_max_samples`: the cpu profile's last-layer adapters (a speed choice at 24k rows) turn
    into every layer's for a larger sample or every train row; the job resolves the rule once, so what it
    saves says which layers the model has; an explicit `lora_last_layers` holds at any size."""
    cpu = PROFILES["cpu"]
    assert cpu.regressor.lora.last_layers_max_samples == cpu.train.max_train_samples == 24_000
    sized = {n: cpu.regressor.sized_for(n).lora for n in (24_000, 24_001, 96_000, None)}
    assert sized[24_000] == LoraSettings(r=32, alpha=64.0, last_layers=1)
    assert sized[24_001] == sized[96_000] == sized[None] == LoraSettings(r=32, alpha=64.0)
    # a job resolves it from its own sample size, and the saved job holds the resolved shape
    for rows, layers in ((24_000, 1), (96_000, None), (None, None)):
        train = TrainConfig(**{**cpu.train.__dict__, "max_train_samples": rows})
        job = TrainJob.load(_job(regressor=cpu.regressor, train=train).save(tmp_path / f"{rows}.json"))
        assert job.regressor.lora.last_layers == layers
        assert job.regressor.lora.last_layers_max_samples is None
    # through the flat overrides (the regressor asset's config, the search's best params)
    regressor, train = apply_overrides(cpu.regressor, cpu.train, {"max_train_samples": 96_000})
    assert _job(regressor=regressor, train=train).regressor.lora.last_layers is None
    pinned, train = apply_overrides(
        cpu.regressor, cpu.train, {"max_train_samples": 96_000, "lora_last_layers": 1}
    )
    assert _job(regressor=pinned, train=train).regressor.lora.last_layers == 1
    # the gpu profile adapts every layer at any size; the rule needs last_layers to act on
    assert PROFILES["gpu"].regressor.sized_for(1_000) == PROFILES["gpu"].regressor
    with pytest.raises(ValueError, match="needs last_layers"):
        LoraSettings(last_layers_max_samples=10)
    with pytest.raises(ValueError, match="last_layers_max_samples"):
        LoraSettings(last_layers=1, last_layers_max_samples=0)


def test_the_cpu_profiles_probe_weight_is_3_at_its_demo_size_and_10_above() -> None:
    """The cpu profile's rule: weight 3 on the demo's 24k rows (its measured tie with weight 10 there
    keeps the demo as it was), 10 on a larger sample or every row (BENCHMARKS.md, 96k rows)."""
    cpu = PROFILES["cpu"]
    assert cpu.train.aux_feature_weight_max_samples == cpu.train.max_train_samples == 24_000
    for rows, weight in ((24_000, 3.0), (96_000, 10.0), (None, 10.0)):
        _, train = apply_overrides(cpu.regressor, cpu.train, {"max_train_samples": rows})
        assert _job(train=train).train.aux_feature_weight == weight


def test_the_probe_weight_can_depend_on_the_sample_size(tmp_path: Path) -> None:
    """`aux_feature_weight_max_samples`: `aux_feature_weight` up to that many sampled rows,
    `aux_feature_weight_above` for a larger sample or every row; the job resolves the rule once (what it
    saves says which weight it trained with), and an explicit `aux_feature_weight` holds at any size."""
    rule = {
        "aux_feature_weight": 3.0,
        "aux_feature_weight_max_samples": 24_000,
        "aux_feature_weight_above": 10.0,
    }
    weights = {n: TrainConfig(max_train_samples=n, **rule).sized() for n in (24_000, 24_001, None)}
    assert {n: c.aux_feature_weight for n, c in weights.items()} == {24_000: 3.0, 24_001: 10.0, None: 10.0}
    assert all(
        c.aux_feature_weight_max_samples is c.aux_feature_weight_above is None for c in weights.values()
    )
    assert TrainConfig(aux_feature_weight=2.0).sized() == TrainConfig(aux_feature_weight=2.0)  # no rule
    for rows, weight in ((24_000, 3.0), (96_000, 10.0), (None, 10.0)):
        job = _job(train=TrainConfig(max_train_samples=rows, **rule))
        saved = TrainJob.load(job.save(tmp_path / f"{rows}.json")).train
        assert (saved.aux_feature_weight, saved.aux_feature_weight_max_samples) == (weight, None)
    # through the flat overrides (the regressor asset's config, the search's params)
    for given, weight in (({}, 10.0), ({"aux_feature_weight": 1.0}, 1.0)):
        _, train = apply_overrides(
            RegressorConfig(), TrainConfig(**rule), {"max_train_samples": 96_000, **given}
        )
        assert _job(train=train).train.aux_feature_weight == weight
    # `TrainConfig.replaced`, which both the overrides and the benches go through
    ruled = TrainConfig(**rule)
    assert ruled.replaced(seed=3) == replace(ruled, seed=3)  # the rule stays unless the weight is given
    explicit = ruled.replaced(aux_feature_weight=1.0, max_train_samples=96_000).sized()
    assert (explicit.aux_feature_weight, explicit.max_train_samples) == (1.0, 96_000)
    moved = ruled.replaced(
        aux_feature_weight=2.0, aux_feature_weight_max_samples=5, aux_feature_weight_above=4.0
    )
    assert (moved.aux_feature_weight_max_samples, moved.aux_feature_weight_above) == (5, 4.0)
    with pytest.raises(ValueError, match="both None, or both set"):
        ruled.replaced(aux_feature_weight=1.0, aux_feature_weight_above=4.0)
    with pytest.raises(ValueError, match="both None, or both set"):
        TrainConfig(aux_feature_weight_max_samples=10)
    with pytest.raises(ValueError, match="both None, or both set"):
        TrainConfig(aux_feature_weight_above=1.0)
    with pytest.raises(ValueError, match="int >= 1"):
        TrainConfig(aux_feature_weight_max_samples=0, aux_feature_weight_above=1.0)


def test_the_gpu_profile_trains_the_curves_recipe_on_every_row() -> None:
    """The gpu profile is the cpu profile's recipe as the learning curve measured it on every train row
    (the cpu profile's own shape at that size), and differs only in what a GPU run needs: no sample, no
    time guard, the monitoring's cadence and the scoring batch."""
    from dataclasses import asdict

    cpu, gpu = PROFILES["cpu"], PROFILES["gpu"]
    assert gpu.regressor == cpu.regressor.sized_for(None)
    assert gpu.regressor.lora == LoraSettings(r=32, alpha=64.0)  # every layer, the rule resolved
    # the probe's weight as the cpu profile's rule resolves it on every row
    assert gpu.train == replace(gpu.train, max_train_samples=None).sized()
    assert gpu.train.aux_feature_weight == cpu.train.aux_feature_weight_above == 10.0
    differ = {k for k, v in asdict(gpu.train).items() if asdict(cpu.train)[k] != v}
    assert differ == {
        "aux_feature_weight",
        "aux_feature_weight_max_samples",
        "aux_feature_weight_above",
        "max_train_samples",
        "time_budget_s",
        "eval_every_steps",
        "eval_max_dates",
        "checkpoint_every_steps",
        "eval_batch_size",
    }
    assert gpu.train.max_train_samples is None and gpu.train.time_budget_s is None
    assert (gpu.train.loss, gpu.train.epochs, gpu.train.batch_size) == ("ic", 2, 32)
    assert gpu.num_processes is None and gpu.final_eval_max_dates is None


def test_checkpointing_some_layers_is_asset_config_and_round_trips(tmp_path: Path) -> None:
    from pipeline.assets.regressor import RegressorAssetConfig

    gpu = PROFILES["gpu"]
    assert not gpu.regressor.gradient_checkpointing  # unmeasured on a GPU: off until a benchmark says
    overrides = RegressorAssetConfig(gradient_checkpointing_layers=6).overrides()
    assert overrides == {"gradient_checkpointing": True, "gradient_checkpointing_layers": 6}
    regressor, _ = apply_overrides(gpu.regressor, gpu.train, overrides)
    assert (regressor.gradient_checkpointing, regressor.gradient_checkpointing_layers) == (True, 6)
    assert regressor.lora == gpu.regressor.lora and regressor.head == gpu.regressor.head
    loaded = TrainJob.load(_job(regressor=regressor).save(tmp_path / "job.json")).regressor
    assert loaded == regressor
    assert RegressorAssetConfig().overrides() == {}
    # the README's FSDP advice: the shortcut is asset config too
    off = RegressorAssetConfig(last_layer_shortcut=False).overrides()
    assert off == {"last_layer_shortcut": False}
    assert apply_overrides(gpu.regressor, gpu.train, off)[0].last_layer_shortcut is False


def test_counts_and_the_seed_are_checked_when_the_config_is_built() -> None:
    """Values that once crashed only after the corpus was read and tokenised."""
    with pytest.raises(ValueError, match="seed must be in"):
        TrainConfig(seed=-1)
    with pytest.raises(ValueError, match="seed must be in"):
        TrainConfig(seed=2**32)
    with pytest.raises(ValueError, match="batch_size must be an integer, got 8.0"):
        TrainConfig(batch_size=8.0)  # a float from JSON
    with pytest.raises(ValueError, match="max_steps must be an integer, got True"):
        TrainConfig(max_steps=True)
    assert TrainConfig(max_train_samples=np.int64(24_000), seed=2**32 - 1).max_train_samples == 24_000
    # every number of every config part: a NaN weight, an infinite rate, a string, a fractional rank or
    # width (which was truncated), a bool for a count
    for build, bad, message in (
        (TrainConfig, {"aux_feature_weight": float("nan")}, "aux_feature_weight must be a finite number"),
        (TrainConfig, {"learning_rate": float("inf")}, "learning_rate must be a finite number"),
        (TrainConfig, {"learning_rate": "1e-3"}, "learning_rate must be a finite number, got '1e-3'"),
        (TrainConfig, {"ic_mse_weight": float("nan")}, "ic_mse_weight must be a finite number"),
        (TrainConfig, {"time_budget_s": float("inf")}, "time_budget_s must be a finite number"),
        (LoraSettings, {"r": 8.5}, "LoraSettings.r must be an integer"),
        (LoraSettings, {"alpha": float("nan")}, "LoraSettings.alpha must be a finite number"),
        (LoraSettings, {"last_layers": True}, "LoraSettings.last_layers must be an integer"),
        (HeadConfig, {"hidden_sizes": (256.9,)}, "hidden_sizes must be integers"),
        (HeadConfig, {"feature_bottleneck": 2.5}, "HeadConfig.feature_bottleneck must be an integer"),
        (ExperimentSpec, {"tracking_uri": "u", "training_set_path": "t", "gate_k": float("nan")}, "gate_k"),
    ):
        with pytest.raises(ValueError, match=message):
            build(**bad)
    assert TrainConfig(learning_rate=1, time_budget_s=None).learning_rate == 1  # an int is a number
    assert HeadConfig(hidden_sizes=[np.int64(64)]).hidden_sizes == (64,)


def test_a_typo_fails_when_the_job_is_built() -> None:
    with pytest.raises(TypeError, match="gate_kk"):
        _job(experiment={"tracking_uri": "u", "training_set_path": "t", "gate_kk": 1.0})
    with pytest.raises(ValueError, match="unknown train config keys"):
        TrainJob.from_dict({**_job().to_dict(), "train": {"batch_sise": 8}})
    with pytest.raises(ValueError, match="loss"):
        _job(train=TrainConfig(loss="mae"))
    with pytest.raises(ValueError, match="weight"):  # a resampled training set cannot be re-weighted
        _job(reweight={"mode": "resample"})
    with pytest.raises(ValueError, match="either an experiment or a backtest window"):
        _job(experiment=ExperimentSpec("u", "t"), backtest_output="f.parquet")


def test_outcome_reads_older_files_and_refuses_unknown_keys(tmp_path: Path) -> None:
    (tmp_path / Outcome.FILE).write_text(
        json.dumps(
            {
                "run_id": "r",
                "model_uri": "m",
                "model_version": "3",
                "promoted": True,
                "gate": "g",
                "val_rank_ic": 0.04,
            }
        )
    )
    old = Outcome.load(tmp_path)  # written before the SE fields existed: they take their defaults
    assert old.model_version == "3" and old.test_n_dates == 0 and old.paired == {}
    Outcome(**{**old.to_dict(), "test_rank_ic": 0.03}).save(tmp_path)
    assert Outcome.load(tmp_path).test_rank_ic == 0.03
    (tmp_path / Outcome.FILE).write_text(json.dumps({**old.to_dict(), "surprise": 1}))
    with pytest.raises(ValueError, match="surprise"):
        Outcome.load(tmp_path)


def test_a_marker_file_is_replaced_whole_or_not_at_all(tmp_path: Path, monkeypatch) -> None:
    """`outcome.json` tells a later run to skip training: a save cut short (here the disk fails at the
    fsync) leaves the previous file readable and no stray temporary file."""
    from modeling import atomic_files

    first = Outcome(run_id="r", model_uri="m", model_version="3", promoted=True, gate="g", val_rank_ic=0.04)
    first.save(tmp_path)

    def full_disk(fd: int) -> None:
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch, pytest.raises(OSError, match="No space left"):
        patch.setattr(atomic_files.os, "fsync", full_disk)
        Outcome(**{**first.to_dict(), "val_rank_ic": 0.09}).save(tmp_path)
    assert Outcome.load(tmp_path).val_rank_ic == 0.04
    assert sorted(p.name for p in tmp_path.iterdir()) == [Outcome.FILE]
    Outcome(**{**first.to_dict(), "val_rank_ic": 0.09}).save(tmp_path)
    assert Outcome.load(tmp_path).val_rank_ic == 0.09


def test_the_process_count_and_a_retry_of_a_failed_launch(tmp_path: Path) -> None:
    """The process count is the most processes that each take whole date groups of the batch; a retry's
    failure never shows an earlier attempt's traceback."""
    from types import SimpleNamespace

    from dagster import Failure

    from pipeline.training_process import run_training_process, training_processes

    profile = SimpleNamespace(num_processes=4)
    assert training_processes(None, profile, TrainConfig(batch_size=32, date_group_size=16)) == 2
    assert training_processes(None, profile, TrainConfig(batch_size=48, date_group_size=16)) == 3
    assert training_processes(4, profile, TrainConfig(batch_size=48, date_group_size=16)) == 4  # as asked

    out = tmp_path / "run"
    out.mkdir()
    (out / "error_rank0.txt").write_text("CUDA out of memory (the last attempt)")
    context = SimpleNamespace(log=SimpleNamespace(info=lambda _m: None))

    class FailingClient:
        def __init__(self, writes: str | None) -> None:
            self.writes = writes

        def run(self, **_kwargs):
            if self.writes is not None:  # the child got far enough to write its own traceback
                (out / "error_rank0.txt").write_text(self.writes)
            raise RuntimeError("the child exited with code 1")

    job = TrainJob("base", "corpus.parquet", str(out), {"horizon": 1})
    with pytest.raises(RuntimeError, match="exited with code 1"):  # no traceback of its own: the raw error
        run_training_process(context, FailingClient(None), job)
    with pytest.raises(Failure, match="KeyError: 'label'") as failure:
        run_training_process(context, FailingClient("KeyError: 'label'"), job)
    assert "out of memory" not in str(failure.value)
