"""Route (issue 13): refit the head's output layer in closed form after training.

    DATA_DIR=<make demo's data> python bench/bench_head_refit.py --run bench/out/curve/<key> [--run ...]

The reading diagnostic (bench_reading.py) found that at 96k rows the pooled state carries the planted
signal, while the trained forecast trails a linear readout of that state. SGD on noisy labels leaves the
head's last layer a noisy estimate; weighted least squares over every train row at once is the
best linear map under the training loss's MSE counterpart. For each cached curve run (its saved model
and its record of daily RankIC series), this script computes on the run's own train rows (the same
sample, targets and weights) and on every validation and test row:

- the pooled state (the head's input) and the head's last hidden activations (the output layer's input);
- ridge from those activations to the training target, with bucket weights, its penalty picked on the
  train rows' last 20% of dates (purged by the horizon), then refit on every train row;

and reports validation and test RankIC ± SE (dates) with the paired differences against the trained
forecast and ridge on the 16 features (the record's series, the same rows). States are cached in
bench/out/head_refit/.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from _common import OUT, daily_series, machine, save_json, write_section
from bench_reading import pooled_states

COMMAND = "python bench/bench_head_refit.py"

PENALTIES = (1e-2, 1e-1, 1.0, 3.0, 10.0, 100.0)
"""Ridge penalties, as a multiple of the weighted row count (features standardised)."""
HOLDOUT_FROM = 0.8
"""The penalty is picked on the train rows' dates from this quantile on (the baselines' early-stopping rule)."""


def head_inputs(model, tokenizer, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(pooled state [N, H], the head's last hidden activations [N, K]) in prompt order, dropout off."""
    pooled = pooled_states(model, tokenizer, prompts)  # model in eval mode
    with torch.inference_mode():
        state = torch.from_numpy(pooled)
        if model.head.readout is not None:  # a feature-bottleneck head reads its 16 readouts of the state
            state = model.head.readout(state)
        last = model.head.net[:-1](state).numpy()
    return pooled, last


def weighted_ridge(x: np.ndarray, y: np.ndarray, w: np.ndarray, penalty: float):
    """sklearn's ridge on columns standardised with the weights; `penalty` x the weighted row count (weights
    at mean 1); returns predict(x)."""
    from sklearn.linear_model import Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    w = w / w.mean()
    model = make_pipeline(StandardScaler(), Ridge(alpha=penalty * w.sum()))
    model.fit(x, y, standardscaler__sample_weight=w, ridge__sample_weight=w)
    return model.predict


def refit_series(train: pd.DataFrame, states: dict, splits: dict, inputs: str) -> dict:
    """Daily RankIC series of the refit on `inputs` ("last" or "pooled") on each split, with the penalty picked on the train rows' last 20% of dates (purged by one date, the
    horizon) and the held-out IC of every penalty."""
    from modeling.metrics import DailyMean, per_date_correlation

    y, w = train["label"].to_numpy(np.float64), train["weight"].to_numpy(np.float64)
    dates = np.sort(train["date"].unique())
    cut = int(len(dates) * HOLDOUT_FROM)
    fit_rows = (train["date"] < dates[cut - 1]).to_numpy()  # the date before the cut is purged
    hold_rows = (train["date"] >= dates[cut]).to_numpy()
    x = states[f"train_{inputs}"].astype(np.float64)
    picks = {}
    for penalty in PENALTIES:
        predict = weighted_ridge(x[fit_rows], y[fit_rows], w[fit_rows], penalty)
        held = train.loc[hold_rows, ["date", "label"]].assign(p=predict(x[hold_rows]))
        picks[penalty] = DailyMean.of(per_date_correlation(held, "p", "label", "spearman")).mean
    best = max(picks, key=picks.get)
    predict = weighted_ridge(x, y, w, best)
    out = {"penalty": best, "holdout_ic": picks}
    for split, frame in splits.items():
        scored = frame[["date", "label"]].assign(
            refit=predict(states[f"{split}_{inputs}"].astype(np.float64))
        )
        out[split] = per_date_correlation(scored, "refit", "label", "spearman")
    return out


def main() -> None:
    from modeling.backbones.common import load_tokenizer
    from modeling.data.corpus import train_sample
    from modeling.evaluation import split_rows
    from modeling.job import TrainConfig
    from modeling.metrics import DailyMean, paired_series_difference, per_date_correlation
    from modeling.model import load_regressor, read_regressor_info

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", action="append", required=True, help="a curve run's dir (next to its .json)")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args()
    data = Path(args.data_dir or os.environ.get("DATA_DIR", "data")).resolve()
    corpus = data / "prompt_corpus.parquet"
    out = OUT / "head_refit"
    out.mkdir(parents=True, exist_ok=True)
    splits = {s: split_rows(corpus, s, None) for s in ("validation", "test")}
    runs = {}
    for run in map(Path, args.run):
        record = json.loads(run.with_suffix(".json").read_text())
        info = read_regressor_info(run / "model")
        saved = info["extra"]["train"]
        cfg = TrainConfig(**{k: v for k, v in saved.items() if k in TrainConfig.__dataclass_fields__})
        train = train_sample(corpus, cfg, None, ["date", "symbol", "label", "weight", "prompt"])
        if len(train) != record["n_train_rows"]:
            raise SystemExit(f"{run.name}: {len(train)} train rows, the record says {record['n_train_rows']}")
        cache = out / f"{run.name}.npz"
        if cache.is_file():
            states = dict(np.load(cache))
        else:
            model = load_regressor(run / "model", device="cpu")
            tok = load_tokenizer(info["base_model"]["path"])
            states = {}
            for name, frame in {"train": train, **splits}.items():
                print(f"{run.name}: {name} {len(frame):,} rows", flush=True)
                states[f"{name}_pooled"], states[f"{name}_last"] = head_inputs(
                    model, tok, frame["prompt"].tolist()
                )
            with torch.no_grad():
                for name in ("train", *splits):
                    last = torch.from_numpy(states[f"{name}_last"])
                    states[f"{name}_forecast"] = model.head.net[-1](last).squeeze(-1).numpy()
            np.savez(cache, **states)
        recorded = {s: {m: daily_series(v) for m, v in d.items()} for s, d in record["daily"].items()}
        forecast = {
            split: per_date_correlation(
                frame[["date", "label"]].assign(f=states[f"{split}_forecast"]), "f", "label", "spearman"
            )
            for split, frame in splits.items()
        }
        for split in splits:  # the states reproduce the recorded forecast's series
            mine, theirs = (
                DailyMean.of(forecast[split]).mean,
                DailyMean.of(recorded[split]["prediction"]).mean,
            )
            if abs(mine - theirs) > 1e-4:
                raise SystemExit(f"{run.name}: forecast {mine:.5f} on {split}, the record says {theirs:.5f}")
        runs[run.name] = {
            "seed": record["seed"],
            "size": record["size"],
            "n_train_rows": len(train),
            "ridge": {s: recorded[s]["ridge"] for s in splits},
            "forecast": forecast,
            **{inputs: refit_series(train, states, splits, inputs) for inputs in ("last", "pooled")},
        }

    def mean(series: list[pd.Series]) -> pd.Series:  # seeds averaged date by date
        return pd.concat(series, axis=1).mean(axis=1)

    lines = [
        "| runs | refit on | penalty | split | trained forecast | refit | refit − forecast | refit − ridge | forecast − ridge |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    by_size: dict[int, list[str]] = {}
    for name, run in runs.items():
        by_size.setdefault(run["size"], []).append(name)
    groups = {name: [name] for name in runs} | {
        f"{size:,} rows, mean of {len(names)} seeds": names
        for size, names in by_size.items()
        if len(names) > 1
    }
    results = {}
    for label, names in groups.items():
        for inputs in ("last", "pooled"):
            penalty = ", ".join(f"{runs[n][inputs]['penalty']:g}" for n in names)
            for split in splits:
                forecast = mean([runs[n]["forecast"][split] for n in names])
                refit = mean([runs[n][inputs][split] for n in names])
                ridge = mean([runs[n]["ridge"][split] for n in names])
                row = {
                    "forecast": str(DailyMean.of(forecast)),
                    "refit": str(DailyMean.of(refit)),
                    "refit_minus_forecast": str(paired_series_difference(refit, forecast)),
                    "refit_minus_ridge": str(paired_series_difference(refit, ridge)),
                    "forecast_minus_ridge": str(paired_series_difference(forecast, ridge)),
                }
                results[f"{label}/{inputs}/{split}"] = row
                lines.append(
                    f"| {label} | {inputs} | {penalty} | {split} | " + " | ".join(row.values()) + " |"
                )
    save_json("head_refit", results)
    facts = machine()
    names = " ".join(f"--run bench/out/curve/{n}" for n in runs)
    write_section(
        "head_refit",
        f"""## Route: the head's output layer refit in closed form (issue 13)

Command: `{COMMAND} {names}` after the curve's runs (`make demo`'s DATA_DIR). Machine: {facts["cores"]} cores
({facts["cpu"]}). Each run is a cached learning-curve model; on its own train rows (the same sample,
targets and bucket weights) the script computes the head's input ("pooled", the backbone's state of the
last token) and the output layer's input ("last", the head's hidden activations), fits weighted ridge from
them to the training target with the penalty (× the weighted row count, columns standardised) picked on the
train rows' last 20% of dates, purged by the horizon, refits on every train row, and scores every
validation and test row. Cells: mean daily RankIC ± SE (dates); differences are paired by date; "ridge" is
ridge on the 16 features on the same rows (the curve record's series). "mean of n seeds": the daily
series of one size's runs averaged date by date.

{chr(10).join(lines)}
""",
    )


if __name__ == "__main__":
    main()
