"""Benchmarks of the LoRA regressor on the default synthetic market (run `make demo` first: it builds
DATA_DIR with the training set, the pretrained embedded backbone and the prompt corpus).

    python bench/bench_regressor.py peer       # our loop vs the stock SeqCls + peft SEQ_CLS + HF Trainer
    python bench/bench_regressor.py quality    # RankIC / ICIR: regressor (random / pretrained tiny), baselines
    python bench/bench_regressor.py curve      # learning curve: 24k, 96k, all train rows; LLM vs ridge, MLP
    python bench/bench_regressor.py inference  # scoring rows/s (pyfunc and trainer path) vs training rows/s
    python bench/bench_regressor.py routes     # each change to the recipe, measured against ridge and the base
    python bench/bench_regressor.py levers     # training samples/s: torch.compile, threads, percentile prompts
    python bench/bench_regressor.py samplers   # ridge on plain vs per-date train draws, over seeds

peer: identical prompts, tokenizer, backbone (the pretrained embedded tiny Llama) and train rows (a
seeded sample), batch 32, one pass, 2 CPU cores, fp32. The peer is transformers'
`LlamaForSequenceClassification` (num_labels=1) with peft `task_type="SEQ_CLS"` (LoRA r=8 on every
projection) under the HF `Trainer` (lr 5e-4, its MSE loss, no bucket weights). Ours is `modeling.train`
with the cpu profile. Both are scored on the same validation dates.

quality: the cpu profile (the `make demo` budget) on the random and the pretrained tiny backbone, the
four baselines fit on the same train rows, ridge on every train row, and the planted signal's oracle.

curve: the cpu profile's recipe at 24k, 96k and every train row (3 seeds at 24k, one above), each
model scored on every validation and test date; ridge and the feature MLP fit on exactly the same rows,
targets and weights; the LLM minus ridge as a paired daily RankIC difference. Every finished run's
record is kept in bench/runs/curve/, tracked in git (a rerun, or a later clone, skips it), its model in
bench/out/curve/; the table and plot go to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import time
from dataclasses import replace
from pathlib import Path

import torch
from _common import OUT, ROOT, daily_series, machine, read_section, save_json, write_section

DATA = Path(os.environ.get("DATA_DIR", "data")).resolve()


def _paths() -> tuple[Path, Path, Path]:
    base, corpus, training_set = (
        DATA / "models" / "base_model",
        DATA / "prompt_corpus.parquet",
        DATA / "training_set.parquet",
    )
    for path in (base, corpus, training_set):
        if not path.exists():
            raise SystemExit(f"{path} is missing: run `make demo` first (DATA_DIR={DATA})")
    return base, corpus, training_set


def _horizon(corpus: Path) -> int:
    """The label horizon of the corpus's prompts (the purge of the baselines' early-stopping rows)."""
    from modeling.data.parquet_io import read_parquet_metadata
    from modeling.prompt import PromptBuilder

    return int(PromptBuilder.of_corpus(read_parquet_metadata(corpus)).settings()["horizon"])


def _positions_horizon(corpus: Path, date_step: int = 1) -> int:
    """The label horizon counted in positions of a series that keeps every `date_step`-th date: what every
    SE (Newey-West lag = it - 1) and paired difference of the bench takes. 1 on the default market."""
    return -(-_horizon(corpus) // date_step)


def _eval_frame(corpus: Path, training_set: Path, split: str, n_dates: int | None):
    import pandas as pd

    from modeling.data.corpus import evenly_spaced_dates, read_corpus_split
    from modeling.feature_registry import FEATURE_NAMES

    rows = read_corpus_split(corpus, split)
    rows = rows[rows["date"].isin(evenly_spaced_dates(rows["date"], n_dates))].reset_index(drop=True)
    features = pd.read_parquet(training_set, columns=["date", "symbol", *FEATURE_NAMES, "fwd_ret"])
    return rows.merge(features.drop_duplicates(["date", "symbol"]), on=["date", "symbol"], how="left")


def _predict(model_dir: Path, base: Path, frame) -> object:
    from modeling.backbones.common import load_tokenizer
    from modeling.data.corpus import tokenise_rows
    from modeling.inference import predict_ids
    from modeling.model import load_regressor

    tok = load_tokenizer(base)
    rows = tokenise_rows(frame[["date", "symbol", "label", "weight", "prompt"]], tok)
    return predict_ids(load_regressor(model_dir, base_model_dir=base), tok, rows.ids, 64)


# --- the stock peer --------------------------------------------------------------------------------------
class _Rows(torch.utils.data.Dataset):
    """Tokenised prompts with float labels, as the HF Trainer consumes them."""

    def __init__(self, ids, labels):
        self.ids, self.labels = ids, labels

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {
            "input_ids": self.ids[i],
            "attention_mask": [1] * len(self.ids[i]),
            "labels": float(self.labels[i]),
        }


def peer_train(base: Path, corpus: Path, n_rows: int, seed: int, out: Path) -> tuple[dict, object]:
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForSequenceClassification,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
    )

    from modeling.backbones.common import load_tokenizer
    from modeling.data.corpus import read_corpus_split, sample_rows
    from modeling.inference import encode_prompts

    tok = load_tokenizer(base)
    train = sample_rows(read_corpus_split(corpus, "train"), n_rows, seed)
    ids = encode_prompts(tok, train["prompt"].tolist())
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, local_files_only=True)
    model.config.pad_token_id = tok.pad_token_id
    model = get_peft_model(
        model,
        LoraConfig(
            task_type="SEQ_CLS",
            r=8,
            lora_alpha=16,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        ),
    )
    args = TrainingArguments(
        output_dir=str(out / "peer"),
        per_device_train_batch_size=32,
        learning_rate=5e-4,
        num_train_epochs=1,
        lr_scheduler_type="cosine",
        warmup_steps=0.05,  # a float below 1 is a ratio of the steps in transformers 5
        logging_steps=50,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=seed,
        dataloader_drop_last=True,
        disable_tqdm=True,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=_Rows(ids, train["label"].to_numpy()),
        data_collator=DataCollatorWithPadding(tok, pad_to_multiple_of=8),
    )
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    n = (len(ids) // 32) * 32
    tokens = sum(len(x) for x in ids[:n])
    return {"samples": n, "wall_s": wall, "samples_per_s": n / wall, "tokens_per_s": tokens / wall}, (
        model,
        tok,
    )


def peer_predict(model_tok, frame) -> object:
    import numpy as np

    from modeling.inference import encode_prompts, pad_batch

    model, tok = model_tok
    model.eval()
    ids = encode_prompts(tok, frame["prompt"].tolist())
    out = np.empty(len(ids))
    with torch.no_grad():
        for start in range(0, len(ids), 64):
            batch = pad_batch(tok, ids[start : start + 64])
            out[start : start + 64] = model(**batch).logits[:, 0].float().numpy()
    return out


def bench_train_config(train, n_rows: int | None, seed: int, **overrides):
    """A profile's train config as the benches train it: `n_rows` sampled rows, no time budget (a guard
    that would make runs depend on the machine's load), no checkpoints, no progress bar. An explicit
    `aux_feature_weight` holds at any size (`TrainConfig.replaced`, as the asset's overrides have it)."""
    return train.replaced(
        max_train_samples=n_rows,
        seed=seed,
        time_budget_s=None,
        progress=False,
        checkpoint_every_steps=0,
        **overrides,
    )


def ours_train(
    base: Path,
    corpus: Path,
    n_rows: int | None,
    seed: int,
    out: Path,
    eval_every: int | None = 0,
    regressor=None,
    profile_name: str = "cpu",
    **overrides,
):
    """A profile's recipe (the cpu one by default) on `n_rows` sampled train rows (None = all), no time
    budget; `eval_every` None keeps the profile's periodic evaluation (and early stopping)."""
    from modeling.profiles import PROFILES
    from modeling.prompt import PromptBuilder
    from modeling.train import TrainJob, train_regressor

    profile = PROFILES[profile_name]
    train = bench_train_config(
        profile.train,
        n_rows,
        seed,
        **({} if eval_every is None else {"eval_every_steps": eval_every}),
        **overrides,
    )
    from modeling.data.parquet_io import read_parquet_metadata

    job = TrainJob(
        str(base),
        str(corpus),
        str(out),
        PromptBuilder.of_corpus(read_parquet_metadata(corpus)).settings(),
        regressor or profile.regressor,
        train,
        resume=False,
        training_set_path=str(corpus.parent / "training_set.parquet"),
    )
    return train_regressor(job, log=lambda _m: None)


def bench_peer(args) -> None:
    from modeling.metrics import evaluate

    base, corpus, training_set = _paths()
    out = OUT / "regressor_peer"
    validation = _eval_frame(corpus, training_set, "validation", args.eval_dates)
    peer_stats, peer_model = peer_train(base, corpus, args.rows, args.seed, out)
    peer_val = evaluate(validation.assign(prediction=peer_predict(peer_model, validation)))
    del peer_model
    ours = ours_train(base, corpus, args.rows, args.seed, out / "ours")
    report = ours.report()
    ours_val = evaluate(validation.assign(prediction=_predict(ours.model_dir, base, validation)))
    result = {
        "rows": args.rows,
        "eval_dates": args.eval_dates,
        "machine": machine(),
        "peer": {**peer_stats, "val_rank_ic": peer_val["rank_ic"], "val_rank_icir": peer_val["rank_icir"]},
        "ours": {
            "samples": report["samples"],
            "samples_per_s": report["samples_per_s"],
            "tokens_per_s": report["tokens_per_s"],
            "val_rank_ic": ours_val["rank_ic"],
            "val_rank_icir": ours_val["rank_icir"],
        },
    }
    save_json("regressor_peer", result)
    p, o = result["peer"], result["ours"]
    speedup = o["samples_per_s"] / p["samples_per_s"]
    met = speedup >= 1.3 and o["val_rank_ic"] > p["val_rank_ic"]
    write_section(
        "regressor_peer",
        f"""## LoRA regressor vs the stock peer (issue 8)

Command: `python bench/bench_regressor.py peer --rows {args.rows} --eval-dates {args.eval_dates}`. Machine: {machine()["cores"]} cores ({machine()["cpu"]}), fp32.
Same backbone (pretrained embedded tiny Llama, DATA_DIR={DATA}), tokenizer, prompts and {report["samples"]:,} train rows (seeded sample), batch 32, one pass; validation RankIC on {args.eval_dates} evenly spaced validation dates ({len(validation):,} rows).
Peer: `LlamaForSequenceClassification` (num_labels=1) + peft `SEQ_CLS` (LoRA r=8, all projections) + HF `Trainer` (lr 5e-4, cosine, MSE). Ours: `modeling.train`, cpu profile (LoRA r=8 all projections, MLP head, lr 1e-3, bucket-weighted MSE).

| | samples/s | tokens/s | validation RankIC | validation RankICIR |
|---|---:|---:|---:|---:|
| stock peer | {p["samples_per_s"]:.1f} | {p["tokens_per_s"]:,.0f} | {p["val_rank_ic"]:.4f} | {p["val_rank_icir"]:.3f} |
| ours | {o["samples_per_s"]:.1f} | {o["tokens_per_s"]:,.0f} | {o["val_rank_ic"]:.4f} | {o["val_rank_icir"]:.3f} |

Throughput ratio {speedup:.2f}x (target >= 1.3x with a higher RankIC: {"met" if met else "not met"}).
""",
    )
    print(json.dumps(result, indent=1, default=str))


def bench_quality(args) -> None:
    """The demo's recipe (cpu profile) on every validation and test date: the LLM on the pretrained
    backbone over `--seeds` seeds (the curve's 24k runs, shared through its cache), the LLM on a random
    backbone (seed 0), the four baselines on the same rows, ridge and LightGBM on every train row, and
    the planted signal's oracle."""
    import numpy as np
    import pandas as pd

    from modeling.backbones.common import load_tokenizer
    from modeling.backbones.embedded import TinyLlamaSpec, build_embedded_base_model
    from modeling.baselines import BaselineConfig, fit_predict_baselines
    from modeling.data.corpus import train_sample
    from modeling.evaluation import score_rows, split_rows
    from modeling.feature_registry import FEATURE_NAMES
    from modeling.metrics import DailyMean, evaluate, paired_series_difference, seed_paired_difference
    from modeling.model import load_regressor
    from modeling.profiles import PROFILES
    from modeling.prompt import PromptBuilder, tokenizer_training_texts

    base, corpus, training_set = _paths()
    hp = _positions_horizon(corpus)  # every date: the label horizon itself
    out = OUT / "regressor_quality"
    profile = PROFILES["cpu"]
    size = profile.train.max_train_samples
    passes = "one pass" if profile.train.epochs == 1 else f"{profile.train.epochs} passes"
    features = pd.read_parquet(
        training_set, columns=["date", "symbol", *FEATURE_NAMES, "fwd_ret"]
    ).drop_duplicates(["date", "symbol"])
    frames = {
        s: split_rows(corpus, s, None).merge(features, on=["date", "symbol"], how="left")
        for s in ("validation", "test")
    }
    seeds = [
        curve_run(base, corpus, features, frames, size, seed, OUT / "curve") for seed in range(args.seeds)
    ]
    rows: list[str] = []

    def llm_row(name: str, records: list[dict], model: str = "prediction") -> None:
        """Mean over the seeds (each seed samples its own rows); "vs ridge" pairs every seed with ridge
        on that seed's rows, then gives the per-seed differences and their SE over seeds: the seeds'
        samples move ridge and the LLM together, so the seed sd of the level is much wider than that of
        the difference."""
        cells = []
        for split in ("validation", "test"):
            daily = [daily_series(r["daily"][split][model]) for r in records]
            sd = np.std([DailyMean.of(d).mean for d in daily], ddof=1) if len(daily) > 1 else float("nan")
            cells.append(
                _stat_cell(DailyMean.of(_seed_mean(records, split, model), hp - 1))
                + (f", seed sd {sd:.4f}" if np.isfinite(sd) else "")
            )
        vs_ridge = ""
        if model != "ridge":
            vs_ridge = str(
                seed_paired_difference(
                    [daily_series(r["daily"]["validation"][model]) for r in records],
                    [daily_series(r["daily"]["validation"]["ridge"]) for r in records],
                    hp,
                )
            )
        rows.append(f"| {name} | {cells[0]} | {cells[1]} | {vs_ridge} |")

    llm_row(f"LLM regressor, pretrained backbone ({len(seeds)} seeds)", seeds)
    if not args.skip_random:  # the random-backbone control (one more training run and scoring pass)
        random_base = out / "random_base_model"
        if not random_base.exists():  # same tokenizer recipe and init as the asset, no pretraining
            build_embedded_base_model(
                random_base, tokenizer_training_texts(PromptBuilder(), 20_000, 0), TinyLlamaSpec()
            )
        # keyed on what `ours_train` trains, like the curve's runs
        random_key = _recipe_key(bench_train_config(profile.train, size, 0), profile.regressor)
        random_path = out / f"random-{random_key}{backbone_key(random_base)}.json"
        if random_path.is_file():  # the random backbone's run is kept like the curve's
            random_record = json.loads(random_path.read_text())
        else:
            trained = ours_train(random_base, corpus, size, 0, out / "random", eval_every=None)
            model, tok = load_regressor(trained.model_dir), load_tokenizer(random_base)
            random_record = {"daily": {}}
            for split, frame in frames.items():
                scored, _ = score_rows(model, tok, frame)
                both = frame.drop(columns="prompt").assign(prediction=scored["prediction"].to_numpy())
                random_record["daily"][split] = {
                    "prediction": _series_json(_daily(both, "prediction")),
                    "ridge": seeds[0]["daily"][split]["ridge"],
                }
            random_path.write_text(json.dumps(random_record, default=float))
        llm_row("LLM regressor, random backbone (seed 0)", [random_record])
    for name in ("ridge", "mlp_features"):  # fit on each seed's rows, like the LLM row above
        llm_row(f"{name} (each seed's {size:,} rows and targets, {len(seeds)} seeds)", seeds, name)

    cfg = replace(profile.train, max_train_samples=size, seed=0)
    train = train_sample(corpus, cfg, None, ["date", "symbol", "label", "weight"]).merge(
        features, on=["date", "symbol"], how="left"
    )
    horizon = _horizon(corpus)
    preds, _ = fit_predict_baselines(  # (early stopping on the train rows' last dates: None)
        train, None, frames, BaselineConfig(mlp_head=profile.regressor.head), horizon=horizon
    )
    everything = train_sample(
        corpus, replace(cfg, max_train_samples=None), None, ["date", "symbol", "label", "weight"]
    ).merge(features, on=["date", "symbol"], how="left")
    preds_all, _ = fit_predict_baselines(
        everything, None, frames, BaselineConfig(), only=("ridge", "lightgbm"), horizon=horizon
    )
    ridge_val = _daily(frames["validation"].assign(p=preds["ridge"]["validation"]), "p")
    for label, source, names in (
        (f"seed 0's {len(train):,} rows and targets", preds, ("ridge", "lightgbm", "mlp_features", "zero")),
        (f"all {len(everything):,} train rows", preds_all, ("ridge", "lightgbm")),
    ):
        for name in names:
            cells = []
            for split, frame in frames.items():
                metrics = evaluate(frame.assign(prediction=source[name][split]), horizon=hp)
                cells.append(
                    f"{metrics['rank_ic']:.4f} ± {metrics['rank_ic_se']:.4f} ({metrics['rank_ic_n_dates']})"
                    if np.isfinite(metrics["rank_ic"])
                    else "n/a (constant)"
                )
            daily = _daily(frames["validation"].assign(p=source[name]["validation"]), "p")
            vs = str(paired_series_difference(daily, ridge_val, hp)) if name != "zero" and len(daily) else ""
            rows.append(f"| {name} ({label}) | {cells[0]} | {cells[1]} | {vs} |")
    oracle = None
    try:
        from dagster import AssetKey, DagsterInstance

        event = DagsterInstance.get().get_latest_materialization_event(AssetKey("raw_market_data"))
        oracle = float(event.asset_materialization.metadata["oracle_ic_universe"].value)
    except Exception:  # noqa: BLE001 - the oracle is a reference line, read from the last demo run if any
        oracle = None
    if oracle is not None:
        rows.append(f"| oracle (planted signal, universe, all dates) | {oracle:.4f} | {oracle:.4f} | |")
    name, title, command = (
        "regressor_quality",
        "",
        f"python bench/bench_regressor.py quality --seeds {args.seeds}",
    )
    command += " --skip-random" if args.skip_random else ""
    if args.override:  # a candidate profile gets its own section; the profile's own table stays
        name, title = "regressor_quality_candidate", f", candidate cpu profile with {args.override}"
        command += f" --override '{args.override}'"
    save_json(name, {"rows": rows})
    write_section(
        name,
        f"""## Forecast quality on the default market{title} (issues 8 and 13)

Command: `{command}` after `make demo`. Machine: {machine()["cores"]} cores ({machine()["cpu"]}). The demo's recipe (cpu profile: {size:,} sampled train rows, {passes}); every model scored on **every** validation and test date ({len(frames["validation"]):,} / {len(frames["test"]):,} rows): mean daily RankIC ± SE (dates). The pretrained-backbone LLM is averaged over {args.seeds} seeds date by date (seed sd: the spread of the seeds' means). A seed also draws the {size:,} train rows, so ridge and the MLP are shown on each seed's rows (averaged the same way) and on seed 0's rows alone. "vs ridge" is the paired daily difference to ridge on the same rows and targets, Δ ± SE (t); for the seeds' mean it pairs each seed with its own ridge, and gives the per-seed differences with their SE over seeds (the training run's noise) beside the date SE of the seed-averaged series.

| model | validation RankIC | test RankIC | vs ridge (same rows), validation |
|---|---:|---:|---:|
{chr(10).join(rows)}
""",
    )
    print("\n".join(rows))


# --- the learning curve ---------------------------------------------------------------------------------
RESULTS = Path(__file__).resolve().parent / "results"
"""Committed bench outputs (plots that BENCHMARKS.md shows)."""


def _daily(frame, column: str):
    from modeling.metrics import per_date_correlation

    return per_date_correlation(frame, column, "label", "spearman")


def _seed_mean(records: list[dict], split: str, model: str):
    """One model's daily RankIC series of several seeds' runs, averaged over the seeds date by date."""
    import pandas as pd

    return pd.concat([daily_series(r["daily"][split][model]) for r in records], axis=1).mean(axis=1)


def _series_json(series) -> dict:
    return {str(d.date()): float(v) for d, v in series.items()}


_KEY_OMITS_AT_DEFAULT = {
    "ic_mse_weight": 0.0,
    "aux_feature_weight_max_samples": None,
    "aux_feature_weight_above": None,
}
"""Train settings added after runs were cached: left out of a run's key while at their default, so the
cached runs (which trained with that default) keep their keys."""
_HEAD_KEY_OMITS_AT_DEFAULT = {"feature_bottleneck": 0}
"""The same for the head's settings."""
_REGRESSOR_KEY_OMITS_AT_DEFAULT = {"gradient_checkpointing_layers": None}
"""The same for the regressor's own settings (`gradient_checkpointing_layers` joined in session y and
keyed every run cached before it anew: a cache miss that retrains for 12 minutes per 96k seed)."""
_LORA_KEY_OMITS_AT_DEFAULT = {"last_layers_max_samples": None}
"""The same for the LoRA settings (a key is taken on the resolved shape, where the rule is None)."""


def _regressor_key(regressor_cfg) -> dict:
    """The regressor config as a cache key sees it (head settings at their old default left out)."""
    regressor = regressor_cfg.to_dict()
    for part, omits in (
        (regressor["head"], _HEAD_KEY_OMITS_AT_DEFAULT),
        (regressor, _REGRESSOR_KEY_OMITS_AT_DEFAULT),
        (regressor["lora"], _LORA_KEY_OMITS_AT_DEFAULT),
    ):
        for name, default in omits.items():
            if name in part and part[name] == default:
                del part[name]
    return regressor


def _recipe_key(train_cfg, regressor_cfg) -> str:
    import hashlib
    from dataclasses import asdict

    # what the run trains: the probe's weight this sample size takes (`TrainConfig.sized`)
    train = asdict(train_cfg.sized())
    for name, default in _KEY_OMITS_AT_DEFAULT.items():
        if train.get(name) == default:
            del train[name]
    # what the run trains: the layers a sample of this size adapts (`RegressorConfig.sized_for`)
    sized = regressor_cfg.sized_for(train_cfg.max_train_samples)
    text = json.dumps({"train": train, "regressor": _regressor_key(sized)}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _prompt_key(corpus: Path) -> str:
    """A cache-key part for a corpus whose prompts are not the default ones ('' for the default, so the
    runs cached before prompts had options keep their keys): '-legend-value', '-inline-value-sig2' (2
    significant digits; the digits were left out of the key before, so only non-default ones join it)."""
    from modeling.data.parquet_io import read_parquet_metadata
    from modeling.prompt import PromptBuilder

    prompt = PromptBuilder.of_corpus(read_parquet_metadata(corpus))
    default = PromptBuilder(horizon=prompt.horizon, target=prompt.target)
    if prompt == default:
        return ""
    key = f"-{prompt.layout}-{prompt.number_format}"
    return key if prompt.sig_digits == default.sig_digits else f"{key}-sig{prompt.sig_digits}"


@functools.cache
def backbone_key(base: Path) -> str:
    """A cache-key part naming the backbone's weights: '-bb' and 8 hex digits of the SHA-256 of its weight
    files' bytes (`*.safetensors`, `*.bin`, in name order). Two backbones built with other settings (a longer
    pretraining, another prompt) share every other part of a run's key, so without it a cached run of one
    would be read as the other's. The embedded backbone's 3 MB hash in milliseconds; an 8B one in a minute."""
    import hashlib

    digest = hashlib.sha256()
    files = sorted(f for f in Path(base).iterdir() if f.suffix in (".safetensors", ".bin"))
    if not files:
        raise FileNotFoundError(f"no weight files (*.safetensors, *.bin) in {base}")
    for f in files:
        digest.update(f.name.encode())
        with f.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 24), b""):
                digest.update(chunk)
    return f"-bb{digest.hexdigest()[:8]}"


RUNS = ROOT / "bench" / "runs"
"""The curve's run records (JSON: the daily RankIC series of the LLM and its baselines, the training
report, the machine), tracked in git: bench/out does not outlive a session's machine, and without its
records a candidate's pairing retrains the profile's runs first (20-85 minutes each on 2 cores)."""


def records_dir(out: Path) -> Path:
    """Where the records of the runs whose models live in `out` are kept: bench/runs/<name> for a folder
    of bench/out, `out` itself elsewhere (a GPU machine's $OUT, `bench/bench_gpu.py curve`)."""
    return RUNS / out.name if out.resolve().parent == OUT.resolve() else out


def _run_machine() -> str:
    """What trained a run: the GPU's name, else the CPU's (runs of one seed on two CPU types differ by
    float rounding, as two seeds do: a pairing across machines says so)."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else machine()["cpu"]


def curve_run(
    base: Path,
    corpus: Path,
    features,
    frames: dict,
    size: int | None,
    seed: int,
    out: Path,
    profile_name: str = "cpu",
    epochs: int | None = None,
    profile=None,
    baselines: bool = True,
    score_batch: int | None = None,
) -> dict | None:
    """One point of the curve: train the LLM on `size` rows (`epochs` passes; None = the profile's),
    score every date of both splits, fit ridge and the feature MLP on the same rows, targets and weights.
    Kept as JSON (daily RankIC series) in `records_dir(out)`, the model in `out`. `profile` given: that
    profile's run, if recorded (None if not).
    `baselines` False: the LLM's half only (a GPU machine without the feature table,
    `bench/bench_gpu.py curve`); a later run here finds the record and fits the baselines into it.
    `score_batch`: rows per scoring batch (None = the CPU default)."""
    from modeling.backbones.common import load_tokenizer
    from modeling.evaluation import score_rows
    from modeling.model import load_regressor
    from modeling.profiles import PROFILES

    cached_only = profile is not None
    profile = profile or PROFILES[profile_name]
    passes = {} if epochs is None else {"epochs": epochs}
    # keyed on what `ours_train` trains (a profile's time-budget guard can change without changing a run)
    cfg = bench_train_config(profile.train, size, seed, **passes)
    recipe = _recipe_key(cfg, profile.regressor)
    key = f"{size or 'all'}-seed{seed}-{recipe}{_prompt_key(corpus)}{backbone_key(base)}"
    path = records_dir(out) / f"{key}.json"
    if path.is_file():
        record = json.loads(path.read_text())
        if baselines and record.get("baselines_version") != BASELINES_VERSION:  # the LLM's series stay
            record = _with_baselines(record, corpus, features, frames, cfg, profile.regressor.head, seed)
            path.write_text(json.dumps(record, default=float))
        return record
    if cached_only:
        return None
    started = time.perf_counter()
    trained = ours_train(
        base, corpus, size, seed, out / key, eval_every=None, profile_name=profile_name, **passes
    )
    train_s = time.perf_counter() - started
    model, tok = load_regressor(trained.model_dir), load_tokenizer(base)
    batch = {} if score_batch is None else {"batch_size": score_batch}
    record = {
        "size": size,
        "seed": seed,
        "machine": _run_machine(),
        "train_s": round(train_s, 1),
        "report": {k: v for k, v in trained.report().items() if k not in ("history", "eval_dates")},
        "history": trained.report()["history"],
        "daily": {},
        "score_rows_per_s": {},
    }
    for split, frame in frames.items():
        scored, rate = score_rows(model, tok, frame, **batch)
        both = frame.drop(columns="prompt").assign(prediction=scored["prediction"].to_numpy())
        record["score_rows_per_s"][split] = round(rate, 1)
        record["daily"][split] = {"prediction": _series_json(_daily(both, "prediction"))}
    if baselines:
        record = _with_baselines(record, corpus, features, frames, cfg, profile.regressor.head, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, default=float))
    return record


BASELINES_VERSION = 2
"""Version of the baselines' fitting in a curve record. 2: LightGBM and the MLP stop early on the train
rows' last dates (before: on the validation split they are judged on). A cached record of another version
keeps its LLM series and gets its baselines refit."""


def _with_baselines(record: dict, corpus: Path, features, frames: dict, cfg, head, seed: int) -> dict:
    """`record` with ridge's and the feature MLP's daily series, fit on the run's rows, targets and weights."""
    from modeling.baselines import BaselineConfig, fit_predict_baselines
    from modeling.data.corpus import train_sample

    train = train_sample(corpus, cfg, None, ["date", "symbol", "label", "weight"]).merge(
        features, on=["date", "symbol"], how="left"
    )
    preds, _ = fit_predict_baselines(
        train,
        None,  # the MLP stops early on the train rows' last dates, not on the dates it is judged on
        frames,
        BaselineConfig(mlp_head=head, seed=seed),
        cfg.loss,
        cfg.huber_delta,
        only=("ridge", "mlp_features"),
        horizon=_horizon(corpus),
    )
    for split, frame in frames.items():
        both = frame.drop(columns="prompt").assign(**{m: p[split] for m, p in preds.items()})
        record["daily"][split].update({m: _series_json(_daily(both, m)) for m in preds})
    return {**record, "n_train_rows": len(train), "baselines_version": BASELINES_VERSION}


def _other_machines(records: list[dict], base_runs: list[dict]) -> str:
    """'; the base runs trained on X' where a recorded base run came from a machine that trained none of
    `records` ('' otherwise): paired all the same (a CPU type moves a run as a seed does), and named."""
    machines = [{r.get("machine", "an unnamed machine") for r in rs} for rs in (records, base_runs)]
    elsewhere = machines[1] - machines[0]
    return f"; the base runs trained on {', '.join(sorted(elsewhere))}" if elsewhere else ""


def _stat_cell(stat) -> str:
    return f"{stat.mean:.4f} ± {stat.se:.4f} ({stat.n_dates})"


def _curve_out(date_step: int, profile: str) -> Path:
    """Where a profile's curve runs are cached (every date, or every n-th)."""
    name = "curve" if date_step == 1 else f"curve-every{date_step}"
    return OUT / (name if profile == "cpu" else f"{name}-{profile}")


def _passes(epochs: int) -> str:
    return "one pass" if epochs == 1 else f"{epochs} passes over the same rows"


def curve_seeds(size: int | None, args) -> int:
    """Seeds of one curve size: `--seeds` up to `--multi-seed-max` rows, `--large-seeds` above, and
    `--all-seeds` for every row (None, the issue's one seed there)."""
    if size is None:
        return args.all_seeds
    return args.seeds if size <= args.multi_seed_max else args.large_seeds


def curve_seed_ids(size: int | None, args) -> range:
    """The seeds one curve size trains: `curve_seeds` of them from `--first-seed` on (a later seed whose
    base run is recorded is added without retraining the seeds before it)."""
    return range(args.first_seed, args.first_seed + curve_seeds(size, args))


def bench_curve(args) -> None:
    import numpy as np
    import pandas as pd

    from modeling.baselines import BaselineConfig, fit_predict_baselines
    from modeling.data.corpus import train_sample
    from modeling.evaluation import split_rows
    from modeling.feature_registry import FEATURE_NAMES
    from modeling.metrics import DailyMean, paired_series_difference, seed_paired_difference
    from modeling.profiles import PROFILES

    base, corpus, training_set = _paths()
    hp = _positions_horizon(corpus, args.date_step)  # the SEs' horizon on every date_step-th date
    features = pd.read_parquet(
        training_set, columns=["date", "symbol", *FEATURE_NAMES, "fwd_ret"]
    ).drop_duplicates(["date", "symbol"])
    frames = {}
    for split in ("validation", "test"):
        rows = split_rows(corpus, split, None)
        rows = rows[rows["date"].isin(sorted(rows["date"].unique())[:: args.date_step])].reset_index(
            drop=True
        )
        frames[split] = rows.merge(features, on=["date", "symbol"], how="left")
    sizes = [None if x == "all" else int(x) for x in args.sizes.split(",")]
    out = _curve_out(args.date_step, args.profile)
    runs: dict = {}
    for size in sizes:
        for seed in curve_seed_ids(size, args):
            print(f"curve: {size or 'all'} rows, seed {seed}", flush=True)
            runs.setdefault(size, []).append(
                curve_run(base, corpus, features, frames, size, seed, out, args.profile, epochs=args.epochs)
            )
    # ridge on every train row with the recipe's targets and weights: the reference line
    cfg_all = replace(PROFILES["cpu"].train, max_train_samples=None)
    all_rows = train_sample(corpus, cfg_all, None, ["date", "symbol", "label", "weight"]).merge(
        features, on=["date", "symbol"], how="left"
    )
    ridge_all, _ = fit_predict_baselines(all_rows, None, frames, BaselineConfig(), only=("ridge",))
    reference = {
        s: DailyMean.of(_daily(frames[s].assign(ridge=ridge_all["ridge"][s]), "ridge"), hp - 1)
        for s in frames
    }

    rows, summary = [], {}
    for size, records in runs.items():
        label = f"{records[0]['n_train_rows']:,}" + (f" ({len(records)} seeds)" if len(records) > 1 else "")
        for split in ("validation", "test"):
            llm = _seed_mean(records, split, "prediction")
            per_seed = [DailyMean.of(daily_series(r["daily"][split]["prediction"])).mean for r in records]
            ridge, mlp = _seed_mean(records, split, "ridge"), _seed_mean(records, split, "mlp_features")
            summary[(size, split)] = {
                "llm": DailyMean.of(llm, hp - 1),
                "seed_sd": float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else float("nan"),
                "ridge": DailyMean.of(ridge, hp - 1),
                "mlp": DailyMean.of(mlp, hp - 1),
                "vs_ridge": paired_series_difference(llm, ridge, hp),
                "vs_ridge_seeds": seed_paired_difference(
                    [daily_series(r["daily"][split]["prediction"]) for r in records],
                    [daily_series(r["daily"][split]["ridge"]) for r in records],
                    hp,
                ),
                "vs_mlp": paired_series_difference(llm, mlp, hp),
                "llm_daily": llm,
            }
        v, t = summary[(size, "validation")], summary[(size, "test")]
        sd = f" (seed sd {v['seed_sd']:.4f})" if np.isfinite(v["seed_sd"]) else ""
        train_s = np.mean([r["train_s"] for r in records])
        rows.append(
            f"| {label} | {_stat_cell(v['llm'])}{sd} | {_stat_cell(t['llm'])} | {_stat_cell(v['ridge'])} | "
            f"{_stat_cell(v['mlp'])} | {v['vs_ridge']} | {t['vs_ridge']} | {v['vs_mlp']} | {train_s:.0f} |"
        )
    # the candidate against the profile as it is, paired on the same seeds' rows: a candidate profile
    # (--override) on this backbone, or this DATA_DIR's backbone against --baseline-data's; or this
    # profile against another one as it is (--against-profile: each its own rows and passes)
    against = Path(args.baseline_data).resolve() / "models" / "base_model" if args.baseline_data else base
    other = PROFILES[args.against_profile] if args.against_profile else None
    if args.override or args.baseline_data or other or args.against_epochs:
        for size, records in runs.items():
            base_runs = [
                curve_run(
                    against,
                    corpus,
                    features,
                    frames,
                    size,
                    r["seed"],
                    _curve_out(args.date_step, other.name) if other else out,
                    epochs=None if other else (args.against_epochs or args.epochs),
                    profile=other or args.base_profile,
                )
                for r in records
            ]
            if any(b is None for b in base_runs):
                whose = f"the {other.name} profile's" if other else "the profile's own"
                if args.against_epochs:
                    whose += f" {args.against_epochs}-pass"
                print(f"curve: {whose} runs at {size or 'all'} rows are not cached: no pairing")
                continue
            cells = [
                str(
                    seed_paired_difference(
                        [daily_series(r["daily"][split]["prediction"]) for r in records],
                        [daily_series(b["daily"][split]["prediction"]) for b in base_runs],
                        hp,
                    )
                )
                for split in ("validation", "test")
            ]
            drawn = (
                "rows" if not DRAW_SETTINGS & set(_override_names(args.override)) else "seeds, its own rows"
            )
            if args.baseline_data:
                drawn += f", the backbone of {args.baseline_data}"
            pair = f"candidate − the {args.profile} profile"
            if other:
                pair, drawn = (
                    f"the {args.profile} profile − the {other.name} profile",
                    "seeds, each its own rows",
                )
            if args.against_epochs:
                pair = f"{_passes(args.epochs)} − {_passes(args.against_epochs)}"
            drawn += _other_machines(records, base_runs)
            rows.append(
                f"| {records[0]['n_train_rows']:,}: **{pair}** (same {drawn}) | {cells[0]} | {cells[1]} | | | | | | |"
            )
    # targets
    checks = []
    previous = None
    for size in runs:
        cur = summary[(size, "validation")]
        if previous is not None:
            step = paired_series_difference(cur["llm_daily"], previous["llm_daily"], hp)
            ok = step.delta >= -step.se  # the printed paired step and its own SE decide
            checks.append(
                f"- rises with data, {size or 'all'} vs the previous size: {step} — "
                f"{'met' if ok else 'not met'} (at least the previous minus 1 SE of the paired step)"
            )
        ok = cur["vs_ridge"].delta >= 0
        seeds = cur["vs_ridge_seeds"]
        checks.append(
            f"- ≥ ridge on the same rows at {size or 'all'}: {cur['vs_ridge']} — {'met' if ok else 'not met'}"
            + (f" (each seed against its own ridge: {seeds})" if seeds.n_seeds > 1 else "")
        )
        previous = cur
    last = summary[(list(runs)[-1], "validation")]
    goal = 0.9 * reference["validation"].mean
    checks.append(
        f"- at the largest size ≥ 0.9 × ridge on all rows ({goal:.4f}): {last['llm'].mean:.4f} — "
        f"{'met' if last['llm'].mean >= goal else 'not met'}"
    )
    # each profile and pass count keeps its own section
    suffix = (
        ("" if args.profile == "cpu" else f"_{args.profile}")
        + ("" if args.epochs == 1 else f"_epochs{args.epochs}")
        + (f"_candidate_{_slug(args.override)}" if args.override else "")
        + (f"_candidate_backbone{backbone_key(base)}" if args.baseline_data else "")
        + (f"_against_{args.against_profile}" if args.against_profile else "")
        + (f"_against_epochs{args.against_epochs}" if args.against_epochs else "")
    )
    suffix = _sized_suffix(suffix, args.sizes)  # another size's section of the same run is kept
    candidate = f", candidate: the profile with {args.override}" if args.override else ""
    if args.baseline_data:
        candidate += f", candidate: the backbone of DATA_DIR (key {backbone_key(base)[1:]})"
    if args.against_profile:
        candidate += f", against the {args.against_profile} profile as it is"
    if args.against_epochs:
        candidate += f", against {_passes(args.against_epochs)}"
    passes = _passes(args.epochs)
    png = _curve_png(runs, summary, reference, f"learning_curve{suffix}.png")
    save_json(f"curve{suffix}", {"runs": {str(k): v for k, v in runs.items()}})
    rate = np.mean([r["score_rows_per_s"]["validation"] for rs in runs.values() for r in rs])
    write_section(
        f"regressor_curve{suffix}",
        f"""## Learning curve of the LLM regressor, {args.profile} profile, {passes}{candidate} (issue 13)

Command: `python bench/bench_regressor.py curve --sizes {args.sizes} --seeds {args.seeds}{"" if args.large_seeds == 1 else f" --large-seeds {args.large_seeds}"}{"" if args.all_seeds == args.large_seeds else f" --all-seeds {args.all_seeds}"}{f" --first-seed {args.first_seed}" if args.first_seed else ""} --profile {args.profile}{"" if args.epochs == 1 else f" --epochs {args.epochs}"}{f" --override '{args.override}'" if args.override else ""}{f" --baseline-data {args.baseline_data}" if args.baseline_data else ""}{f" --against-profile {args.against_profile}" if args.against_profile else ""}{f" --against-epochs {args.against_epochs}" if args.against_epochs else ""}` after `make demo`. Machine: {machine()["cores"]} cores ({machine()["cpu"]}). Recipe: the {args.profile} profile (`modeling/profiles.py`) with `max_train_samples` = the size, {passes}, no time budget, the final weights (its periodic validation on 16 dates only monitors; no early stopping). The `train s` column is wall time, which other jobs on the same cores may have stretched: not a speed measurement. Every model is scored on **every** validation and test date; cells are mean daily RankIC ± its standard error (dates). Ridge and the MLP on the 16 features are fit on exactly the same rows, targets and weights; "LLM − ridge" is the paired daily difference on the same rows, Δ ± SE (t). With several seeds, the LLM's daily RankIC is averaged over seeds date by date (the seed sd is the spread of the seeds' means); a comparison over several seeds also pairs each seed with its own counterpart and gives the SE over seeds of those per-seed differences (`modeling.metrics.seed_paired_difference`), which holds the training run's noise that the date SE does not: a change counts only when it clears both. Scoring ran at {rate:,.0f} rows/s.

| train rows | LLM validation | LLM test | ridge validation | MLP validation | LLM − ridge, validation | LLM − ridge, test | LLM − MLP, validation | train s |
|---|---:|---:|---:|---:|---:|---:|---:|---:|
{chr(10).join(rows)}

Reference: ridge on all {len(all_rows):,} train rows (same targets and weights): validation {_stat_cell(reference["validation"])}, test {_stat_cell(reference["test"])}.

Targets:
{chr(10).join(checks)}

![learning curve]({png.relative_to(ROOT)})
""",
    )
    print("\n".join(rows + checks))
    print(png)


def _curve_png(runs: dict, summary: dict, reference: dict, name: str = "learning_curve.png") -> Path:
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2, sharey=True)
    x = np.array([runs[s][0]["n_train_rows"] for s in runs], dtype=float)
    for ax, split in zip(axes, ("validation", "test"), strict=True):
        for key, label, color in (
            ("llm", "LLM regressor", "tab:red"),
            ("ridge", "ridge", "tab:blue"),
            ("mlp", "MLP on features", "tab:green"),
        ):
            y = np.array([summary[(s, split)][key].mean for s in runs])
            e = np.array([summary[(s, split)][key].se for s in runs])
            ax.errorbar(x, y, yerr=e, marker="o", capsize=3, color=color, label=f"{label} (± 1 SE)")
        ax.axhline(reference[split].mean, color="tab:blue", ls="--", lw=1, label="ridge, all train rows")
        ax.set_xscale("log")
        ax.set_xlabel("train rows")
        ax.set_title(f"{split}: mean daily RankIC, every date")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("RankIC")
    axes[0].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    fig.savefig(path, dpi=90)
    return path


# --- routes to a recipe that learns from data -------------------------------------------------------------
R32 = {"aux_feature_weight": 1.0, "target_transform": "cs_rank", "lora.r": 32, "lora.alpha": 64.0}
"""The recipe of the cpu profile's model (the probe, rank-gaussian targets, LoRA r=32): the later routes' base."""

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""Every linear layer of a Llama decoder layer ("all-linear" spelled out, to add other modules to it)."""

ROUTES: dict[str, tuple[int, dict]] = {
    # name: (train rows, overrides of the cpu profile's train config; "lora." / "head." prefixes for those)
    "base (lr 1e-3, MSE, raw label, bucket weights)": (24_000, {}),
    "lr 3e-4": (24_000, {"learning_rate": 3e-4}),
    "label clipped at 3": (24_000, {"target_transform": "clip", "target_clip": 3.0}),
    "label per-date rank-gaussian (cs_rank)": (24_000, {"target_transform": "cs_rank"}),
    "cs_rank, lr 3e-4": (24_000, {"target_transform": "cs_rank", "learning_rate": 3e-4}),
    "cs_rank, no bucket weights": (24_000, {"target_transform": "cs_rank", "weight_power": 0.0}),
    "cs_rank, per-date IC loss (date groups of 16)": (
        24_000,
        {"target_transform": "cs_rank", "loss": "ic", "date_group_size": 16},
    ),
    "aux feature probe 1.0": (24_000, {"aux_feature_weight": 1.0}),
    "aux 1.0, cs_rank": (24_000, {"aux_feature_weight": 1.0, "target_transform": "cs_rank"}),
    "aux 3.0, cs_rank": (24_000, {"aux_feature_weight": 3.0, "target_transform": "cs_rank"}),
    "aux 1.0, cs_rank, LoRA r=32": (24_000, R32),
    "aux 1.0, cs_rank, LoRA r=64": (
        24_000,
        {"aux_feature_weight": 1.0, "target_transform": "cs_rank", "lora.r": 64, "lora.alpha": 128.0},
    ),
    "aux 1.0, cs_rank, LoRA r=32, 2 epochs": (24_000, {**R32, "epochs": 2}),
    "aux 1.0, cs_rank, LoRA r=32, 3 epochs": (24_000, {**R32, "epochs": 3}),
    "aux 1.0, cs_rank, LoRA r=32, 2 epochs, LoRA dropout 0.1": (
        24_000,
        {**R32, "lora.dropout": 0.1, "epochs": 2},
    ),
    "aux 1.0, cs_rank, LoRA r=32, 2 epochs, LoRA on the token embeddings too": (
        24_000,
        {**R32, "epochs": 2, "lora.target_modules": (*PROJECTIONS, "embed_tokens")},
    ),
    "aux 1.0, cs_rank, LoRA r=32, 2 epochs, LoRA on the attention projections only": (
        24_000,
        {**R32, "epochs": 2, "lora.target_modules": PROJECTIONS[:4]},
    ),
    "aux 1.0, cs_rank, LoRA r=32, 2 epochs, LoRA on the MLP projections only": (
        24_000,
        {**R32, "epochs": 2, "lora.target_modules": PROJECTIONS[4:]},
    ),
    "aux 1.0, cs_rank, LoRA r=32, 2 epochs, LoRA in the last decoder layer only": (
        24_000,
        {**R32, "epochs": 2, "lora.last_layers": 1},
    ),
    "aux 1.0, cs_rank, LoRA r=32, 2 epochs, LoRA in the last decoder layer only, 48k rows": (
        48_000,
        {**R32, "epochs": 2, "lora.last_layers": 1},
    ),
    "aux 1.0, cs_rank, LoRA r=32, 2 epochs, LoRA in the last decoder layer only, MSE on date groups of 16": (
        24_000,
        {**R32, "epochs": 2, "lora.last_layers": 1, "date_group_size": 16},
    ),
    "aux 1.0, cs_rank, LoRA r=32, 2 epochs, LoRA in the last decoder layer only, IC loss on date groups of 16": (
        24_000,
        {**R32, "epochs": 2, "lora.last_layers": 1, "loss": "ic", "date_group_size": 16},
    ),
    "aux 1.0, cs_rank, LoRA r=32, 2 epochs, head dropout 0": (
        24_000,
        {**R32, "epochs": 2, "head.dropout": 0.0},
    ),
    "aux 1.0, cs_rank, LoRA r=32, 2 epochs, linear head": (
        24_000,
        {**R32, "epochs": 2, "head.hidden_sizes": ()},
    ),
    "aux 1.0, cs_rank, LoRA r=32, 2 epochs, IC loss on date groups of 16": (
        24_000,
        {**R32, "epochs": 2, "loss": "ic", "date_group_size": 16},
    ),
    "aux 1.0, cs_rank, LoRA r=32, 48k rows (one pass, the steps of 2 epochs)": (48_000, R32),
    "aux 1.0, cs_rank, LoRA r=32, batch 16": (24_000, {**R32, "batch_size": 16}),
    "aux 1.0, cs_rank, LoRA r=32, 2 epochs, batch 64": (24_000, {**R32, "epochs": 2, "batch_size": 64}),
    "aux 1.0, cs_rank, LoRA r=32, 2 epochs, batch 64, lr 1.4e-3": (
        24_000,
        {**R32, "epochs": 2, "batch_size": 64, "learning_rate": 1.4e-3},
    ),
    "aux 1.0, cs_rank, head lr 3e-3": (
        24_000,
        {"aux_feature_weight": 1.0, "target_transform": "cs_rank", "head_learning_rate": 3e-3},
    ),
    "aux 1.0, cs_rank, lr 2e-3": (
        24_000,
        {"aux_feature_weight": 1.0, "target_transform": "cs_rank", "learning_rate": 2e-3},
    ),
    "aux 1.0, cs_rank, EMA 0.995": (
        24_000,
        {"aux_feature_weight": 1.0, "target_transform": "cs_rank", "ema_decay": 0.995},
    ),
    "96k: base": (96_000, {}),
    "96k: aux 1.0, cs_rank": (96_000, {"aux_feature_weight": 1.0, "target_transform": "cs_rank"}),
    "96k: aux 1.0, cs_rank, lr 3e-4": (
        96_000,
        {"aux_feature_weight": 1.0, "target_transform": "cs_rank", "learning_rate": 3e-4},
    ),
}
"""Each route is `ROUTE_BASE` with these changes, trained once (seed 0), judged on the final weights (no
early stopping) on every other validation date."""


def _route_base():
    from modeling.train import TrainConfig

    # the recipe the project started from (the cpu profile before the routes below were measured)
    return TrainConfig(
        learning_rate=1e-3, batch_size=32, epochs=1, checkpoint_every_steps=0, select_best=False, seed=0
    )


ROUTE_BASE = _route_base()


def route_config(name: str, size: int, overrides: dict):
    """(train config, regressor config, cache key) of a route."""
    from modeling.model import HeadConfig, LoraSettings, RegressorConfig

    train_over = {k: v for k, v in overrides.items() if "." not in k}
    lora = {k.split(".", 1)[1]: v for k, v in overrides.items() if k.startswith("lora.")}
    head = {k.split(".", 1)[1]: v for k, v in overrides.items() if k.startswith("head.")}
    # the shape the project started from: LoRA r=8 on every projection, a 256-wide head
    regressor = RegressorConfig(lora=LoraSettings(r=8, alpha=16.0), head=HeadConfig(hidden_sizes=(256,)))
    regressor = replace(regressor, lora=replace(regressor.lora, **lora), head=replace(regressor.head, **head))
    cfg = replace(
        ROUTE_BASE,
        max_train_samples=size,
        eval_every_steps=0,
        time_budget_s=None,
        progress=False,
        **train_over,
    )
    return cfg, regressor, hashlib_key({"name": name, "train": cfg, "regressor": _regressor_key(regressor)})


def route_record(
    name, size, overrides, model_dir: Path, train_s, samples_per_s, base, corpus, features, frame
):
    """Score a route's trained model and ridge (same rows, targets, weights) on `frame`."""
    from modeling.backbones.common import load_tokenizer
    from modeling.baselines import BaselineConfig, FeatureScaler, fit_ridge
    from modeling.data.corpus import train_sample
    from modeling.evaluation import score_rows
    from modeling.model import load_regressor

    cfg, _, _ = route_config(name, size, overrides)
    scored, _ = score_rows(load_regressor(model_dir), load_tokenizer(base), frame)
    train = train_sample(corpus, cfg, None, ["date", "symbol", "label", "weight"]).merge(
        features, on=["date", "symbol"], how="left"
    )
    ridge = fit_ridge(train, FeatureScaler.fit(train, 5.0), BaselineConfig())
    both = frame.drop(columns="prompt").assign(prediction=scored["prediction"].to_numpy(), ridge=ridge(frame))
    return {
        "name": name,
        "size": size,
        "overrides": overrides,
        "train_s": round(train_s, 1),
        "samples_per_s": samples_per_s,
        "daily": {m: _series_json(_daily(both, m)) for m in ("prediction", "ridge")},
    }


def route_run(
    base: Path, corpus: Path, features, frame, name: str, size: int, overrides: dict, out: Path
) -> dict:
    from modeling.data.parquet_io import read_parquet_metadata
    from modeling.prompt import PromptBuilder
    from modeling.train import TrainJob, train_regressor

    cfg, regressor, key = route_config(name, size, overrides)
    key += backbone_key(base)
    path = out / f"{key}.json"
    if path.is_file():
        return json.loads(path.read_text())
    job = TrainJob(
        str(base),
        str(corpus),
        str(out / key),
        PromptBuilder.of_corpus(read_parquet_metadata(corpus)).settings(),
        regressor,
        cfg,
        resume=False,
        training_set_path=str(corpus.parent / "training_set.parquet"),
    )
    started = time.perf_counter()
    trained = train_regressor(job, log=lambda _m: None)
    record = route_record(
        name,
        size,
        overrides,
        trained.model_dir,
        time.perf_counter() - started,
        trained.report()["samples_per_s"],
        base,
        corpus,
        features,
        frame,
    )
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, default=float))
    return record


def hashlib_key(payload: dict) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _route_inputs():
    """(backbone, corpus, the 16 features by date and symbol, every other validation date's rows with
    their features): what every route is trained from and judged on."""
    import pandas as pd

    from modeling.evaluation import split_rows
    from modeling.feature_registry import FEATURE_NAMES

    base, corpus, training_set = _paths()
    features = pd.read_parquet(
        training_set, columns=["date", "symbol", *FEATURE_NAMES, "fwd_ret"]
    ).drop_duplicates(["date", "symbol"])
    frame = split_rows(corpus, "validation", None)
    frame = frame[frame["date"].isin(sorted(frame["date"].unique())[::2])].reset_index(drop=True)
    return base, corpus, features, frame.merge(features, on=["date", "symbol"], how="left")


def bench_routes(args) -> None:
    from modeling.metrics import DailyMean, paired_series_difference

    base, corpus, features, frame = _route_inputs()
    hp = _positions_horizon(corpus, 2)  # the SEs' horizon on every other validation date
    chosen = [n for n in ROUTES if not args.only or any(o in n for o in args.only.split(","))]
    records = {}
    for name in chosen:
        size, overrides = ROUTES[name]
        print(f"route: {name}", flush=True)
        records[name] = route_run(base, corpus, features, frame, name, size, overrides, OUT / "routes")
    reference = {
        size: daily_series(r["daily"]["prediction"])
        for r in records.values()
        for size in [r["size"]]
        if r["overrides"] == {}
    }
    lines = [
        "| route | train rows | LLM validation | ridge, same rows and targets | LLM − ridge | LLM − base at its size | train s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in records.items():
        llm, ridge = daily_series(r["daily"]["prediction"]), daily_series(r["daily"]["ridge"])
        vs_base = (
            str(paired_series_difference(llm, reference[r["size"]], hp))
            if r["size"] in reference and r["overrides"]
            else ""
        )
        lines.append(
            f"| {name} | {r['size']:,} | {_stat_cell(DailyMean.of(llm, hp - 1))} | {_stat_cell(DailyMean.of(ridge, hp - 1))} | "
            f"{paired_series_difference(llm, ridge, hp)} | {vs_base} | {r['train_s']:.0f} |"
        )
    if args.only:  # a subset: the table's other rows would be lost, so print the rows to add by hand
        print("--only: BENCHMARKS.md left as it is; rows:\n" + "\n".join(lines))
        return
    write_section(
        "regressor_routes",
        f"""## Routes to a recipe that learns from data (issue 13)

Command: `python bench/bench_regressor.py routes` after `make demo`. Machine: {machine()["cores"]} cores ({machine()["cpu"]}). Each route is the cpu profile's recipe with the named change, seed 0, one pass, judged on its final weights (no early stopping) on every other validation date ({frame["date"].nunique()} dates, {len(frame):,} rows): mean daily RankIC ± SE (dates). Ridge is fit on the same rows with the same targets and weights; differences are paired daily differences on the same rows, Δ ± SE (t).

{chr(10).join(lines)}
""",
    )
    print("\n".join(lines))


def bench_route_seeds(args) -> None:
    """The routes named by `--only` (exact names, "|"-separated) on seeds 0..--seeds-1, each paired with
    every other seed by seed (`seed_paired_difference`: the SE over seeds and over dates; a profile change
    takes this, not one seed's route). Prints the rows; BENCHMARKS.md gets them by hand, with the decision
    they support."""
    import pandas as pd

    from modeling.metrics import DailyMean, seed_paired_difference

    names = [n for n in args.only.split("|") if n]
    missing = [n for n in names if n not in ROUTES]
    if len(names) < 2 or missing:
        raise SystemExit(f"route-seeds needs two or more exact route names in --only; unknown: {missing}")
    base, corpus, features, frame = _route_inputs()
    hp = _positions_horizon(corpus, 2)  # the SEs' horizon on every other validation date
    series: dict[str, list] = {}
    lines = ["| run | " + " | ".join(f"seed {s}" for s in range(args.seeds)) + " | mean (sd) | samples/s |"]
    lines.append("|---|" + "---:|" * (args.seeds + 2))
    for name in names:
        size, overrides = ROUTES[name]
        runs = []
        for seed in range(args.seeds):  # seed 0 is the route itself (its cache entry)
            over = overrides if seed == 0 else {**overrides, "seed": seed}
            print(f"route: {name}, seed {seed}", flush=True)
            runs.append(route_run(base, corpus, features, frame, name, size, over, OUT / "routes"))
        series[name] = [daily_series(r["daily"]["prediction"]) for r in runs]
        ridge = [daily_series(r["daily"]["ridge"]) for r in runs]
        if not any(k.startswith("ridge") and all(map(pd.Series.equals, v, ridge)) for k, v in series.items()):
            series[f"ridge on the rows of: {name}"] = ridge  # (routes on the same rows share one ridge)
        means = pd.Series([DailyMean.of(x).mean for x in series[name]])
        rates = [r["samples_per_s"] for r in runs]
        lines.append(
            f"| {name} | "
            + " | ".join(_stat_cell(DailyMean.of(x, hp - 1)) for x in series[name])
            + f" | {means.mean():.4f} ({means.std():.4f}) | {min(rates):.0f}-{max(rates):.0f} |"
        )
    lines.append("")
    keys = list(series)
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:  # each seed against the same seed (the same rows where the draw matches)
            lines.append(f"- {a} − {b}: {seed_paired_difference(series[a], series[b], hp)}")
    print("\n".join(lines))


# --- time levers ----------------------------------------------------------------------------------------------
def _train_rate(
    base: Path, corpus: Path, n_rows: int, compile_model: bool = False, steps: int = 60
) -> tuple[float, float]:
    """(samples/s of `steps` cpu-profile training steps after a warm-up, seconds the warm-up took): the
    forward, backward and AdamW step of the recipe, on real prompts in length-grouped batches."""
    import torch

    from modeling.backbones.common import load_tokenizer
    from modeling.data.corpus import read_corpus_split, sample_rows, tokenise_rows
    from modeling.inference import length_batches, pad_batch
    from modeling.model import build_regressor
    from modeling.profiles import PROFILES

    profile = PROFILES["cpu"]
    tok = load_tokenizer(base)
    rows = tokenise_rows(sample_rows(read_corpus_split(corpus, "train"), n_rows, 0), tok)
    batches = [pad_batch(tok, [rows.ids[i] for i in b]) for b in length_batches(rows.n_tokens, 32)]
    batches = [b for b in batches if b["input_ids"].shape[0] == 32]
    torch.manual_seed(0)
    model = build_regressor(base, profile.regressor)
    step_fn = torch.compile(model, dynamic=True) if compile_model else model
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()

    def step(batch) -> None:
        step_fn(batch["input_ids"], batch["attention_mask"]).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    started = time.perf_counter()
    for batch in batches[:8]:  # warm-up (and, compiled, the compilation of each new length)
        step(batch)
    warm = time.perf_counter() - started
    timed = [batches[8 + i % (len(batches) - 8)] for i in range(steps)]
    started = time.perf_counter()
    for batch in timed:
        step(batch)
    return 32 * steps / (time.perf_counter() - started), warm


def bench_samplers(args) -> None:
    """Ridge on the two train samplers at the same size: plain rows (the MSE profiles) against whole
    groups of `IC_DATE_GROUP` rows per date (the IC loss's), each over `--seeds` seeds, scored on every
    validation and test date. Does the per-date draw itself cost signal, and how far apart do two seeds'
    draws put ridge?"""
    import numpy as np
    import pandas as pd

    from modeling.baselines import BaselineConfig, fit_predict_baselines
    from modeling.data.corpus import train_sample
    from modeling.evaluation import split_rows
    from modeling.feature_registry import FEATURE_NAMES
    from modeling.metrics import DailyMean, paired_series_difference
    from modeling.profiles import IC_DATE_GROUP, PROFILES

    _, corpus, training_set = _paths()
    hp = _positions_horizon(corpus)  # every date: the label horizon itself
    features = pd.read_parquet(training_set, columns=["date", "symbol", *FEATURE_NAMES]).drop_duplicates(
        ["date", "symbol"]
    )
    frames = {
        s: split_rows(corpus, s, None)
        .drop(columns="prompt")
        .merge(features, on=["date", "symbol"], how="left")
        for s in ("validation", "test")
    }
    sizes = [None if x == "all" else int(x) for x in args.sizes.split(",")]
    lines = []
    for size in sizes:
        daily: dict = {}
        for sampler, group in (("plain", 0), ("per date", IC_DATE_GROUP)):
            for seed in range(args.seeds):
                cfg = replace(
                    PROFILES["cpu"].train,
                    max_train_samples=size,
                    date_group_size=group,
                    seed=seed,
                    loss="mse",
                )
                rows = train_sample(corpus, cfg, None, ["date", "symbol", "label", "weight"]).merge(
                    features, on=["date", "symbol"], how="left"
                )
                preds, _ = fit_predict_baselines(rows, None, frames, BaselineConfig(), only=("ridge",))
                for split, frame in frames.items():
                    series = _daily(frame.assign(ridge=preds["ridge"][split]), "ridge")
                    daily.setdefault((sampler, split), []).append(series)
            print(f"samplers: {size or 'all'} rows, {sampler}, {len(rows):,} rows (last seed)", flush=True)
        cells = []
        for split in frames:
            plain = pd.concat(daily[("plain", split)], axis=1)
            grouped = pd.concat(daily[("per date", split)], axis=1)
            sd = np.std(np.r_[plain.mean().to_numpy(), grouped.mean().to_numpy()], ddof=1)
            cells += [
                _stat_cell(DailyMean.of(plain.mean(axis=1), hp - 1)),
                _stat_cell(DailyMean.of(grouped.mean(axis=1), hp - 1)),
                str(paired_series_difference(plain.mean(axis=1), grouped.mean(axis=1), hp)),
                f"{sd:.4f}",
            ]
        lines.append(f"| {f'{size:,}' if size else 'all'} | " + " | ".join(cells) + " |")
    write_section(
        "regressor_samplers",
        f"""## Ridge on the two train samplers (issue 13)

Command: `python bench/bench_regressor.py samplers --sizes {args.sizes} --seeds {args.seeds}` after `make demo`. Machine: {machine()["cores"]} cores ({machine()["cpu"]}). Ridge (the cpu profile's targets and bucket weights) on a seeded draw of the train rows: plain rows (`sample_rows`, what an MSE profile trains on) or whole groups of {IC_DATE_GROUP} rows per date (`sample_rows_by_date`, what the IC loss trains on), seeds 0..{args.seeds - 1} each, scored on every validation and test date. Cells: the seeds' daily RankIC averaged date by date, mean ± SE (dates); "plain − per date" is the paired daily difference of those averages; "seed sd" is the spread of the {2 * args.seeds} draws' means: how far apart two draws of the same size put ridge, which is why the curve compares the LLM with ridge on its own rows.

| train rows | plain, validation | per date, validation | plain − per date, validation | seed sd, validation | plain, test | per date, test | plain − per date, test | seed sd, test |
|---|---:|---:|---:|---:|---:|---:|---:|---:|
{chr(10).join(lines)}
""",
    )
    print("\n".join(lines))


def bench_levers(args) -> None:
    """What buys `make demo` time: training samples/s with torch.compile, with 1 or 2 threads, and with
    the percentile prompt (a DATA_DIR built with number_format=percentile, `--pct-data`)."""
    import torch

    base, corpus, _ = _paths()
    results = {}
    threads = torch.get_num_threads()
    results["eager, default threads"] = _train_rate(base, corpus, args.rows)
    torch.set_num_threads(1)
    results["eager, 1 thread"] = _train_rate(base, corpus, args.rows)
    torch.set_num_threads(threads)
    results["torch.compile (dynamic shapes)"] = _train_rate(base, corpus, args.rows, compile_model=True)
    if args.pct_data:
        pct = Path(args.pct_data)
        results["percentile prompts (eager)"] = _train_rate(
            pct / "models" / "base_model", pct / "prompt_corpus.parquet", args.rows
        )
    save_json("levers", {k: {"samples_per_s": v[0], "warmup_s": v[1]} for k, v in results.items()})
    ref = results["eager, default threads"][0]
    lines = [
        "| setting | training samples/s | × default | warm-up s (8 steps; compile included) |",
        "|---|---:|---:|---:|",
    ]
    lines += [
        f"| {name} | {rate:.0f} | {rate / ref:.2f} | {warm:.1f} |" for name, (rate, warm) in results.items()
    ]
    write_section(
        "regressor_levers",
        f"""## Time levers for `make demo` (issue 13)

Command: `python bench/bench_regressor.py levers --rows {args.rows}{" --pct-data " + args.pct_data if args.pct_data else ""}` after `make demo`. Machine: {machine()["cores"]} cores ({machine()["cpu"]}), fp32, default threads = {threads}. 60 timed forward + backward + AdamW steps of the cpu profile's model (LoRA r=32, batch 32, length-grouped real prompts) after 8 warm-up steps.

{chr(10).join(lines)}
""",
    )
    print("\n".join(lines))


# --- inference throughput ---------------------------------------------------------------------------------
def bench_inference(args) -> None:
    """Rows/s of training (forward + backward + step), of the trainer's evaluation path and of the
    registered pyfunc (prompts rendered from raw feature rows), on the same machine in one run."""
    import pandas as pd

    from modeling.backbones.common import load_tokenizer
    from modeling.data.corpus import tokenise_rows
    from modeling.evaluation import split_rows
    from modeling.feature_registry import MODEL_INPUT_COLUMNS
    from modeling.inference import length_batches, pad_batch, predict_ids
    from modeling.model import load_regressor
    from modeling.trunk_cache import TrunkCache

    base, corpus, training_set = _paths()
    out = OUT / "inference"
    trained = ours_train(base, corpus, args.rows, args.seed, out / "train", eval_every=0)
    report = trained.report()
    # three rates of the same training, since the frozen-trunk cache (`modeling.trunk_cache`) moved the
    # trunk's forward out of the steps: the steps alone (what `samples_per_s` reports), the whole run from
    # setup to the saved model (the cache's build included), and the steps with the trunk recomputed in
    # each step (`trunk_cache_gb=0`: the forward and backward of the "training throughput")
    train_rates = {
        "training steps, trunk cached (the profile)": report["samples_per_s"],
        "training end to end, the cache's build included": report["samples"] / trained.wall_s,
    }
    uncached = ours_train(base, corpus, args.rows, args.seed, out / "train_nocache", 0, trunk_cache_gb=0)
    train_rates["training steps, trunk recomputed (`trunk_cache_gb=0`)"] = uncached.report()["samples_per_s"]
    tok = load_tokenizer(base)
    rows = split_rows(corpus, "validation", args.eval_dates)
    ids = tokenise_rows(rows, tok).ids
    model = load_regressor(trained.model_dir, merge_adapters=False)  # as the trainer holds it: unmerged
    results = {"train_rows_per_s": train_rates, "eval_rows": len(ids), "malloc": args.malloc}
    started = time.perf_counter()
    predict_ids(model, tok, ids)  # merges the adapters for the call, restores them afterwards
    results["scoring, trunk recomputed (`predict_ids`: the final comparison's path)"] = len(ids) / (
        time.perf_counter() - started
    )
    # the cpu profile's periodic evaluation: its rows' trunk states are cached once at setup (built
    # like the train rows'), and each evaluation runs the adapted last layer only
    started = time.perf_counter()
    cache = TrunkCache.build(model, tok, ids)
    results["the trunk cache's build (once per training run)"] = len(ids) / (time.perf_counter() - started)
    started = time.perf_counter()
    predict_ids(model, tok, ids, trunk=cache)
    results["trainer evaluation on the trunk cache (the profile's periodic evaluation)"] = len(ids) / (
        time.perf_counter() - started
    )
    del cache
    started = time.perf_counter()
    with torch.inference_mode():  # reference: the same batches, adapters not merged
        for batch_rows in length_batches([len(x) for x in ids], 32):
            batch = pad_batch(tok, [ids[i] for i in batch_rows])
            model(batch["input_ids"], batch["attention_mask"])
    results["same batches, adapters not merged (reference)"] = len(ids) / (time.perf_counter() - started)
    try:
        import mlflow

        tracking = os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{DATA / 'mlflow.db'}")
        mlflow.set_tracking_uri(tracking)
        pyfunc = mlflow.pyfunc.load_model("models:/return-regressor@champion")
        features = pd.read_parquet(training_set, columns=list(MODEL_INPUT_COLUMNS))
        raw = rows[["date", "symbol"]].merge(features, on=["date", "symbol"], how="left")
        started = time.perf_counter()
        pyfunc.predict(raw)
        results["pyfunc (render + tokenise + score)"] = len(raw) / (time.perf_counter() - started)
    except Exception as error:  # noqa: BLE001 - the pyfunc line needs `make demo`'s registry
        print(f"pyfunc not measured: {error}")
    save_json("inference", results)
    rates = {
        **train_rates,
        **{k: v for k, v in results.items() if k not in ("train_rows_per_s", "eval_rows", "malloc")},
    }
    lines = [
        "| path | rows/s | " + " | ".join(f"× {i + 1}" for i in range(len(train_rates))) + " |",
        "|---|---:|" + "---:|" * len(train_rates),
    ]
    lines += [
        f"| {name} | {rate:.0f} | " + " | ".join(f"{rate / t:.2f}" for t in train_rates.values()) + " |"
        for name, rate in rates.items()
    ]
    legend = "; ".join(f"× {i + 1}: against {name}" for i, name in enumerate(train_rates))
    write_section(
        "regressor_inference",
        f"""## Scoring throughput (issue 13)

Command: `python bench/bench_regressor.py inference --rows {args.rows} --eval-dates {args.eval_dates}` after `make demo`. Machine: {machine()["cores"]} cores ({machine()["cpu"]}), fp32, malloc {args.malloc} (`modeling/allocator.py`). Training: the cpu profile on {args.rows:,} rows; scoring: {len(ids):,} validation rows ({args.eval_dates} dates), batches of 32 by length, forward only, adapters merged, no LM head, last-layer shortcut. The pyfunc line is the registered champion of DATA_DIR's store, fed raw feature rows (it renders and tokenises the prompts too). Training is two passes over the rows (the profile's), no periodic evaluation; {legend}. Target: scoring ≥ 3× the training throughput.

{chr(10).join(lines)}
""",
    )
    print(json.dumps(results, indent=1))


DRAW_SETTINGS = {"date_group_size", "max_train_samples", "seed"}
"""Settings that change which train rows a seed draws: a candidate with one of them is paired with the
profile on the same dates, not on the same rows."""


def _override_names(spec: str) -> list[str]:
    return [item.partition("=")[0].strip() for item in spec.split(",")]


def _slug(spec: str) -> str:
    """A candidate's section and file name part: 'ic_mse_weight=1.0' -> 'ic_mse_weight_1_0'."""
    return re.sub(r"[^a-z0-9]+", "_", spec.lower()).strip("_")


def _sized_suffix(suffix: str, sizes: str) -> str:
    """The curve's section and file name part, with the sizes added when BENCHMARKS.md already holds the
    section from other sizes: a candidate run at 96k keeps the same candidate's 24k section instead of
    replacing it, and a rerun at either size replaces its own."""
    block = read_section(f"regressor_curve{suffix}")
    return suffix if block is None or f"--sizes {sizes} " in block else f"{suffix}_at_{_slug(sizes)}"


def override_profile(spec: str, name: str = "cpu") -> None:
    """Replace the profile `name`, in this process only, by itself with `spec`'s flat settings (`k=v`,
    comma-separated, JSON values; the names `modeling.profiles.OVERRIDABLE` knows)."""
    from modeling.profiles import PROFILES, apply_overrides

    overrides = {}
    for item in spec.split(","):
        key, _, value = item.partition("=")
        overrides[key.strip()] = json.loads(value)
    profile = PROFILES[name]
    regressor, train = apply_overrides(profile.regressor, profile.train, overrides)
    PROFILES[name] = replace(profile, regressor=regressor, train=train)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "what",
        choices=["peer", "quality", "curve", "inference", "routes", "route-seeds", "levers", "samplers"],
    )
    parser.add_argument("--pct-data", default="", help="levers: a DATA_DIR built with percentile prompts")
    parser.add_argument(
        "--only",
        default="",
        help="routes: comma-separated substrings of route names; route-seeds: exact names, '|'-separated",
    )
    parser.add_argument("--rows", type=int, default=8000, help="peer / inference: train rows")
    parser.add_argument("--eval-dates", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sizes", default="24000,96000,all", help="curve: train sizes ('all' = every row)")
    parser.add_argument(
        "--profile",
        default="cpu",
        help="curve: the training profile (gpu: on a GPU machine, see BENCHMARKS.md)",
    )
    parser.add_argument("--seeds", type=int, default=3, help="curve / quality / route-seeds: seeds")
    parser.add_argument(
        "--epochs",
        type=int,
        default=1,
        help="curve: passes over each size's rows (1, the issue's curve; 2 = the cpu profile's recipe; "
        "other than 1 gets its own BENCHMARKS.md section)",
    )
    parser.add_argument("--date-step", type=int, default=1, help="curve: every n-th date (1 = every date)")
    parser.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="curve: the first seed at every size (seeds first..first+n-1): adds a seed whose base run is "
        "recorded without retraining the ones before it",
    )
    parser.add_argument(
        "--multi-seed-max", type=int, default=24000, help="curve: sizes up to this get --seeds"
    )
    parser.add_argument(
        "--large-seeds", type=int, default=1, help="curve: seeds of the sizes above --multi-seed-max"
    )
    parser.add_argument(
        "--all-seeds",
        type=int,
        default=None,
        help="curve: seeds of the size 'all' (default: --large-seeds; the issue asks one there)",
    )
    parser.add_argument(
        "--baseline-data",
        default="",
        help="curve: a DATA_DIR (same market and prompts) whose backbone's cached runs of the same profile "
        "the runs on DATA_DIR's backbone are paired against, seed by seed (a candidate pretraining)",
    )
    parser.add_argument(
        "--against-profile",
        default="",
        help="curve: pair each run with another profile's cached run of the same size and seed, as that "
        "profile trains it (its own rows and passes; run its curve first), e.g. --profile gpu "
        "--against-profile cpu",
    )
    parser.add_argument(
        "--against-epochs",
        type=int,
        default=None,
        help="curve: pair each run with the same profile's cached run of the same size and seed with this "
        "many passes (run that curve first), e.g. --epochs 1 --against-epochs 2",
    )
    parser.add_argument(
        "--skip-random", action="store_true", help="quality: leave out the random-backbone control run"
    )
    parser.add_argument(
        "--override",
        default="",
        help="quality / curve: a candidate profile (curve: --profile's, else cpu), flat settings as JSON values, e.g. "
        "'loss=\"ic\",date_group_size=16' (its own BENCHMARKS.md section)",
    )
    args = parser.parse_args()
    if args.all_seeds is None:
        args.all_seeds = args.large_seeds
    from modeling.profiles import PROFILES

    if args.against_profile and (
        args.what != "curve"
        or args.against_profile not in set(PROFILES) - {args.profile}
        or args.override
        or args.baseline_data
    ):
        raise SystemExit(
            "--against-profile: `curve` only, another profile than --profile, without --override or "
            "--baseline-data"
        )

    if args.against_epochs is not None and (
        args.what != "curve"
        or args.against_epochs < 1
        or args.against_epochs == args.epochs
        or args.override
        or args.baseline_data
        or args.against_profile
    ):
        raise SystemExit(
            "--against-epochs: `curve` only, a positive pass count other than --epochs, without --override, "
            "--baseline-data or --against-profile"
        )

    if args.override and args.profile != "cpu" and args.what != "curve":
        raise SystemExit(f"--override with --profile {args.profile}: only `curve` trains another profile")
    # the profile as it is (a curve pairs a candidate with it); quality and the routes train the cpu one
    args.base_profile = PROFILES[args.profile if args.what == "curve" else "cpu"]
    if args.override:
        override_profile(args.override, args.base_profile.name)
    from modeling.allocator import tune_malloc

    # as the training process and the pyfunc do (modeling/allocator.py); `GLIBC_TUNABLES= python ...`
    # measures glibc's defaults instead
    args.malloc = "tuned" if tune_malloc() else "glibc defaults"
    runners = {
        "peer": bench_peer,
        "quality": bench_quality,
        "curve": bench_curve,
        "inference": bench_inference,
        "routes": bench_routes,
        "route-seeds": bench_route_seeds,
        "levers": bench_levers,
        "samplers": bench_samplers,
    }
    runners[args.what](args)


if __name__ == "__main__":
    main()
