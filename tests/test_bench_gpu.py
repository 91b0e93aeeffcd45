"""The GPU benchmark's code path, run on the CPU with a tiny Llama config (the smoke test of
`python bench/bench_gpu.py llama8b`, which needs a GPU for real numbers)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _llama8b(tmp_path: Path, options: str) -> subprocess.CompletedProcess:
    """`bench_gpu.py llama8b --tiny` with `options` (space-separated), its results under `tmp_path`."""
    return subprocess.run(
        [sys.executable, "bench/bench_gpu.py", "llama8b", "--tiny", *options.split()],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path), "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_llama8b_benchmark_runs_and_counts_flops_on_a_tiny_config(tmp_path: Path) -> None:
    done = _llama8b(tmp_path, "--steps 2 --warmup 1 --batch 2 --seq 32 --peak-tflops 1.0 --ckpt-layers 1")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_llama8b_b2_ckpt1.json").read_text())
    # activations recomputed in the first layer only (the route between none and every layer)
    assert (result["checkpointed_layers"], result["layers"], result["compile"]) == (1, 2, False)
    # per layer: q 64x64, k and v 64x32 (2 KV heads of 16), o 64x64, gate/up/down 64x128, 2 norms of 64;
    # two layers and the final norm
    per_layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128 + 2 * 64
    assert result["non_embedding_params"] == 2 * per_layer + 64
    assert result["tokens_per_s"] > 0 and result["samples_per_s"] == pytest.approx(
        result["tokens_per_s"] / 32
    )
    assert result["mfu"] == pytest.approx(result["tokens_per_s"] * 4 * result["non_embedding_params"] / 1e12)
    assert "| 2 x 32 | 1 of 2 | no |" in done.stdout  # the BENCHMARKS.md row it prints
    assert "`python bench/bench_gpu.py llama8b --batch 2 --ckpt-layers 1`" in done.stdout
    # the gpu profile's shape: r=32 on the 7 projections of both layers, the head on the probe's readouts
    shape = (result["lora_r"], result["lora_layers"], result["head"], result["head_feature_bottleneck"])
    assert shape == (32, 14, [256], 16)
    assert "Llama-3-8B architecture, LoRA r=32, head 256 on 16 readouts" in done.stdout
    lora = 32 * 2 * (64 + 64) + 2 * 32 * (64 + 32) + 3 * 32 * (64 + 128)  # r x (in + out), per layer
    head = 64 * 16 + 16 + 16 * 256 + 256 + 256 + 1
    assert result["trainable_params"] == 2 * lora + head


def test_llama8b_benchmark_measures_the_former_shape_on_request(tmp_path: Path) -> None:
    """`--former`: session x's LoRA r=16 and 1024-256 head on the pooled state, in its own result file."""
    done = _llama8b(tmp_path, "--steps 1 --warmup 0 --batch 2 --seq 16 --former")
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_llama8b_b2_former.json").read_text())
    assert (result["lora_r"], result["head"], result["head_feature_bottleneck"]) == (16, [1024, 256], 0)
    assert "`python bench/bench_gpu.py llama8b --batch 2 --former`" in done.stdout


def test_pack_writes_what_the_gpu_curve_reads_and_nothing_it_does_not(
    tiny_base_model: Path, tiny_data, tmp_path: Path
) -> None:
    import argparse
    import shutil

    import numpy as np
    import pandas as pd
    import pyarrow.parquet as pq

    sys.path.insert(0, str(ROOT / "bench"))
    import bench_gpu

    from modeling.feature_registry import FEATURE_NAMES

    training_set, corpus = tiny_data
    data = tmp_path / "data"
    shutil.copytree(tiny_base_model, data / "models" / "base_model")
    shutil.copy(training_set, data / "training_set.parquet")
    shutil.copy(corpus, data / "prompt_corpus.parquet")
    bench_gpu.pack(argparse.Namespace(data=str(data), to=str(tmp_path / "packed")))
    packed = tmp_path / "packed"
    # the corpus: every row and column, and the prompt settings in its metadata
    pd.testing.assert_frame_equal(pd.read_parquet(packed / "prompt_corpus.parquet"), pd.read_parquet(corpus))
    assert (
        pq.read_schema(packed / "prompt_corpus.parquet").metadata[b"pipeline"]
        == (pq.read_schema(corpus).metadata[b"pipeline"])
    )
    # the features: train rows only, float32 of the same values
    original = pd.read_parquet(training_set)
    train = original[original["split"] == "train"].reset_index(drop=True)
    features = pd.read_parquet(packed / "training_set.parquet")
    assert list(features.columns) == ["date", "symbol", *FEATURE_NAMES] and len(features) == len(train)
    assert (features[list(FEATURE_NAMES)].dtypes == np.float32).all()
    np.testing.assert_array_equal(
        features[list(FEATURE_NAMES)].to_numpy(), train[list(FEATURE_NAMES)].to_numpy(np.float32)
    )
    assert (packed / "models" / "base_model" / "config.json").read_text() == (
        tiny_base_model / "config.json"
    ).read_text()
    # and the device's records pair with this machine's: the packed backbone keys the curve's runs the same
    import bench_regressor

    assert bench_regressor.backbone_key(packed / "models" / "base_model") == bench_regressor.backbone_key(
        tiny_base_model
    )


def test_a_run_cached_for_one_backbone_is_never_read_as_another_ones(
    tiny_base_model: Path, tmp_path: Path
) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    sys.path.insert(0, str(ROOT / "bench"))
    import bench_regressor

    other = tmp_path / "other"
    shutil.copytree(tiny_base_model, other)
    (weights,) = other.glob("*.safetensors")
    tensors = load_file(weights)
    name = sorted(tensors)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += 1.0  # one number of one weight moved
    save_file(tensors, weights, metadata={"format": "pt"})
    key = bench_regressor.backbone_key(tiny_base_model)
    assert key.startswith("-bb") and len(key) == 11
    assert bench_regressor.backbone_key(other) != key
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no weight files"):
        bench_regressor.backbone_key(tmp_path / "empty")


def test_a_setting_added_later_keeps_the_cached_runs_keys_while_at_its_default() -> None:
    """A run cached before `gradient_checkpointing_layers` existed trained with its default (None): the
    key leaves it out at that default, so those runs are found again; a set value keys a run of its own."""
    from dataclasses import replace

    from modeling.profiles import PROFILES

    sys.path.insert(0, str(ROOT / "bench"))
    import bench_regressor

    regressor = PROFILES["cpu"].regressor
    assert "gradient_checkpointing_layers" not in bench_regressor._regressor_key(regressor)
    assert "feature_bottleneck" in bench_regressor._regressor_key(regressor)["head"]  # not at its default
    every = replace(regressor, gradient_checkpointing=True)
    first = replace(every, gradient_checkpointing_layers=1)
    assert bench_regressor._regressor_key(first)["gradient_checkpointing_layers"] == 1
    train = PROFILES["cpu"].train
    assert bench_regressor._recipe_key(train, first) != bench_regressor._recipe_key(train, every)


def test_a_run_is_keyed_on_the_layers_its_sample_size_adapts() -> None:
    """The cpu profile at 96k rows trains every layer (`sized_for`): its key is the key of that shape, the
    one a candidate `lora_last_layers=null` had; at 24k the key is the last-layer profile's as before the
    size rule existed (the threshold itself is not part of any key)."""
    from dataclasses import replace

    from modeling.profiles import PROFILES, apply_overrides

    sys.path.insert(0, str(ROOT / "bench"))
    import bench_regressor

    cpu = PROFILES["cpu"]
    every, _ = apply_overrides(cpu.regressor, cpu.train, {"lora_last_layers": None})
    unruled = replace(cpu.regressor, lora=replace(cpu.regressor.lora, last_layers_max_samples=None))
    at = {n: bench_regressor.bench_train_config(cpu.train, n, 0, epochs=2) for n in (24_000, 96_000)}
    key = bench_regressor._recipe_key
    assert key(at[96_000], cpu.regressor) == key(at[96_000], every) != key(at[96_000], unruled)
    assert key(at[24_000], cpu.regressor) == key(at[24_000], unruled) != key(at[24_000], every)


def test_a_run_is_keyed_on_the_probe_weight_its_sample_size_takes() -> None:
    """The cpu profile's probe weight rule (3 up to 24k rows, 10 above): its 96k and every-row runs have the
    keys that `--override 'aux_feature_weight=10.0'` gave them (the recorded every-row seed 1 is the
    profile's run), its 24k runs the keys of weight 3 before the rule existed; the rule is in no key."""
    from dataclasses import replace

    from modeling.profiles import PROFILES, apply_overrides

    sys.path.insert(0, str(ROOT / "bench"))
    import bench_regressor

    cpu = PROFILES["cpu"]
    key = bench_regressor._recipe_key

    def keyed(size: int | None, overrides: dict) -> str:
        _, train = apply_overrides(cpu.regressor, cpu.train, overrides)
        return key(bench_regressor.bench_train_config(train, size, 1, epochs=2), cpu.regressor)

    for size in (96_000, None):
        assert (
            keyed(size, {})
            == keyed(size, {"aux_feature_weight": 10.0})
            != keyed(size, {"aux_feature_weight": 3.0})
        )
    assert (
        keyed(24_000, {})
        == keyed(24_000, {"aux_feature_weight": 3.0})
        != keyed(24_000, {"aux_feature_weight": 10.0})
    )
    unruled = replace(cpu.train, aux_feature_weight_max_samples=None, aux_feature_weight_above=None)
    at = bench_regressor.bench_train_config(unruled, 24_000, 1, epochs=2)
    assert key(at, cpu.regressor) == keyed(24_000, {})
    # an explicit weight given to the bench holds at any size, as the overrides have it
    explicit = bench_regressor.bench_train_config(cpu.train, 96_000, 1, epochs=2, aux_feature_weight=3.0)
    assert explicit.sized().aux_feature_weight == 3.0
    # the key of the every-row seed-1 run this session recorded with the override is the profile's own
    assert list((bench_regressor.RUNS / "curve").glob(f"all-seed1-{keyed(None, {})}-*.json"))


def test_a_curve_at_other_sizes_keeps_the_section_it_would_have_replaced(tmp_path, monkeypatch) -> None:
    """The curve's section is named by profile, passes and candidate: a run of the same candidate at other
    sizes takes the sizes into its name (the 24k section stays), a rerun at the same sizes replaces its
    section."""
    sys.path.insert(0, str(ROOT / "bench"))
    import _common
    import bench_regressor

    monkeypatch.setattr(_common, "BENCHMARKS_MD", tmp_path / "BENCHMARKS.md")
    suffix = "_epochs2_candidate_aux_feature_weight_10_0"
    assert bench_regressor._sized_suffix(suffix, "96000") == suffix  # no section yet
    _common.write_section(f"regressor_curve{suffix}", "Command: `curve --sizes 24000 --seeds 3`\n| 24k |")
    assert bench_regressor._sized_suffix(suffix, "24000") == suffix
    other = bench_regressor._sized_suffix(suffix, "96000")
    assert other == f"{suffix}_at_96000"
    assert bench_regressor._sized_suffix(suffix, "24000,96000,all") == f"{suffix}_at_24000_96000_all"
    _common.write_section(f"regressor_curve{other}", "Command: `curve --sizes 96000 --seeds 1`\n| 96k |")
    text = _common.BENCHMARKS_MD.read_text()
    assert "| 24k |" in text and "| 96k |" in text  # both kept
    assert bench_regressor._sized_suffix(suffix, "96000") == other  # a rerun finds its own section
    assert bench_regressor._sized_suffix("_gpu", "96000") == "_gpu"


def test_the_curve_takes_its_seeds_per_size_and_one_at_every_row() -> None:
    """`--seeds` at the demo's size, `--large-seeds` above it, `--all-seeds` at every row (defaulting to
    `--large-seeds`, as before the option existed), counted from `--first-seed`."""
    from types import SimpleNamespace

    sys.path.insert(0, str(ROOT / "bench"))
    import bench_regressor

    args = SimpleNamespace(seeds=3, large_seeds=2, all_seeds=1, multi_seed_max=24_000, first_seed=0)
    assert [bench_regressor.curve_seeds(n, args) for n in (24_000, 24_001, 96_000, None)] == [3, 2, 2, 1]
    assert [list(bench_regressor.curve_seed_ids(n, args)) for n in (24_000, None)] == [[0, 1, 2], [0]]
    # `--first-seed 1`: seed 1 alone at every row (seed 0's record missing), seeds 1-3 at 24k
    args.first_seed = 1
    assert [list(bench_regressor.curve_seed_ids(n, args)) for n in (24_000, 96_000, None)] == [
        [1, 2, 3],
        [1, 2],
        [1],
    ]
    # each profile's runs in their own folder: `--against-profile` reads the other profile's there
    out = bench_regressor._curve_out
    names = (out(1, "cpu").name, out(1, "gpu").name, out(2, "gpu").name)
    assert names == ("curve", "curve-gpu", "curve-every2-gpu")
    # their records in git (bench/runs), their models in bench/out; a GPU machine's $OUT keeps both
    runs = bench_regressor.records_dir
    assert runs(out(1, "gpu")) == ROOT / "bench" / "runs" / "curve-gpu"
    assert runs(bench_regressor.OUT / "curve") == bench_regressor.RUNS / "curve"
    assert runs(ROOT / "elsewhere" / "curve-gpu-work") == ROOT / "elsewhere" / "curve-gpu-work"


def test_a_curve_run_is_read_from_its_tracked_record_and_never_retrained(tmp_path: Path, monkeypatch) -> None:
    """A fresh clone has the records in bench/runs and no bench/out: the curve reads a run from its record
    (no training, nothing written), and a pairing with a run that has none finds nothing (no training)."""
    from modeling.profiles import PROFILES

    sys.path.insert(0, str(ROOT / "bench"))
    import bench_regressor as bench

    def no_training(*args, **kwargs):
        raise AssertionError("a recorded run was trained again")

    monkeypatch.setattr(bench, "OUT", tmp_path / "out")
    monkeypatch.setattr(bench, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(bench, "_prompt_key", lambda corpus: "")
    monkeypatch.setattr(bench, "backbone_key", lambda base: "-bbtest")
    monkeypatch.setattr(bench, "ours_train", no_training)
    cpu, out = PROFILES["cpu"], bench.OUT / "curve"
    run = (tmp_path, tmp_path, None, {}, 24_000, 1, out)
    assert bench.curve_run(*run, epochs=2, profile=cpu, baselines=False) is None  # no record: no pairing
    recipe = bench._recipe_key(bench.bench_train_config(cpu.train, 24_000, 1, epochs=2), cpu.regressor)
    record = {"size": 24_000, "seed": 1, "machine": "AMD EPYC", "daily": {"validation": {}}}
    (tmp_path / "runs" / "curve").mkdir(parents=True)
    (tmp_path / "runs" / "curve" / f"24000-seed1-{recipe}-bbtest.json").write_text(json.dumps(record))
    assert bench.curve_run(*run, epochs=2, baselines=False) == record
    assert bench.curve_run(*run, epochs=2, profile=cpu, baselines=False) == record
    assert not (tmp_path / "out").exists()
    # another pass count is another run: not read from this record
    assert bench.curve_run(*run, epochs=1, profile=cpu, baselines=False) is None
    # a pairing with records of another machine says so
    assert bench._other_machines([record], [record]) == ""
    assert bench._other_machines([record], [{"machine": "Intel Xeon"}, {}]) == (
        "; the base runs trained on Intel Xeon, an unnamed machine"
    )


def test_the_curve_pairs_pass_counts_only_on_the_same_profile_and_keeps_them_apart() -> None:
    """`--against-epochs`: one pass and two over the same rows are cached under different keys (so the
    pairing reads the other run, not itself), and a pairing that cannot mean anything is refused."""
    import subprocess

    from modeling.profiles import PROFILES

    sys.path.insert(0, str(ROOT / "bench"))
    import bench_regressor

    cpu = PROFILES["cpu"]
    one, two = (bench_regressor.bench_train_config(cpu.train, None, 0, epochs=e) for e in (1, 2))
    assert (one.epochs, two.epochs) == (1, 2)
    assert one.max_train_samples == two.max_train_samples and one.seed == two.seed
    key = bench_regressor._recipe_key
    assert key(one, cpu.regressor) != key(two, cpu.regressor)
    script = str(ROOT / "bench" / "bench_regressor.py")
    for argv in (
        ["curve", "--epochs", "2", "--against-epochs", "2"],  # against itself
        ["curve", "--against-epochs", "0"],  # no passes: not a run to pair with
        ["curve", "--against-epochs", "2", "--against-profile", "gpu"],
        ["quality", "--against-epochs", "2"],
    ):
        done = subprocess.run([sys.executable, script, *argv], capture_output=True, text=True, timeout=120)
        assert done.returncode != 0 and "--against-epochs: `curve` only" in done.stderr, argv


def test_the_gpu_curves_follow_up_command_finds_its_records() -> None:
    """The records' cache keys hold the passes: the command printed for back here names the gpu profile's,
    the sizes and seeds that finished, the date step and the candidate; bench_regressor's own default (one
    pass) would key other runs and train them again on the CPU."""
    import argparse
    import shlex

    sys.path.insert(0, str(ROOT / "bench"))
    import bench_gpu
    import bench_regressor

    from modeling.profiles import PROFILES

    gpu = PROFILES["gpu"]
    done = [{"size": 24000, "seed": 0}, {"size": 96000, "seed": 0}, {"size": 24000, "seed": 1}]
    args = argparse.Namespace(date_step=60, override="learning_rate=2e-4")
    command = shlex.split(bench_gpu.follow_up_command(done, args))
    assert command[:4] == ["python", "bench/bench_regressor.py", "curve", "--profile"]
    options = dict(zip(command[5::2], command[6::2], strict=True))
    assert options == {
        "--epochs": str(gpu.train.epochs),
        "--sizes": "24000,96000",
        "--seeds": "2",
        "--date-step": "60",
        "--override": "learning_rate=2e-4",
    }

    def key(epochs: int) -> str:
        return bench_regressor._recipe_key(
            bench_regressor.bench_train_config(gpu.train, 24000, 0, epochs=epochs), gpu.regressor
        )

    assert key(1) != key(gpu.train.epochs)  # (the one-pass default keys another run: the test can tell)
    # a session cut between seeds of two small sizes asks for the seeds both finished
    cut = [{"size": 1000, "seed": 0}, {"size": 24000, "seed": 0}, {"size": 1000, "seed": 1}]
    plain = argparse.Namespace(date_step=1, override="")
    assert bench_gpu.follow_up_command(cut, plain).endswith("--sizes 1000,24000 --seeds 1")
