"""Diagnostic: how precisely does a trained regressor's pooled state carry the numbers of its prompt?

    DATA_DIR=<make demo's data> python bench/bench_reading.py --model 24k=<model dir> --model 96k=<model dir>

The LLM sees each feature as 3 significant digits of text; ridge is handed the float. The default market's
planted signal is s = -tanh(ret_5d / (sqrt(5) vol_20d)) x vol_20d (`modeling/data/synthetic.py`), so a
model can be no better than its reading of `ret_5d` and `vol_20d`. For each saved regressor this script
computes the pooled hidden state (the head's input) of validation rows on evenly spaced dates, fits a
linear readout (ridge, pooled state -> each feature) on every other date and, on the other dates, reports:

- the correlation of each feature with its readout (1 = read exactly; a linear readout is a lower bound
  of what the MLP head can read);
- the planted signal computed from the true features against the same formula on the readouts: the
  RankIC each reaches against the label (mean ± SE over the held-out dates, paired difference), beside the
  LLM's own forecast. The gap between the two signals is what imprecise reading alone costs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from _common import machine, save_json, write_section

COMMAND = "python bench/bench_reading.py"


def pooled_states(model, tokenizer, prompts: list[str], batch_size: int = 32) -> np.ndarray:
    """The pooled state of each prompt (what the head reads), in order: [N, H] (forward only, adapters
    merged at load)."""
    from modeling.inference import encode_prompts, length_batches, pad_batch

    ids = encode_prompts(tokenizer, prompts)
    out = np.zeros((len(ids), model.head.in_features), dtype=np.float32)
    model.eval()
    with torch.inference_mode():
        for idx in length_batches([len(x) for x in ids], batch_size):
            batch = pad_batch(tokenizer, [ids[i] for i in idx])
            out[idx] = model.pooled_hidden(batch["input_ids"], batch["attention_mask"]).float().numpy()
    return out


def planted_signal(ret_5d: np.ndarray, vol_20d: np.ndarray) -> np.ndarray:
    """The synthetic market's expected-return tilt (up to its constant kappa), from feature values."""
    vol = np.maximum(vol_20d, 1e-4)
    return -np.tanh(ret_5d / (np.sqrt(5.0) * vol)) * vol


def main() -> None:
    from modeling.backbones.common import load_tokenizer
    from modeling.evaluation import split_rows
    from modeling.feature_registry import FEATURE_NAMES
    from modeling.metrics import DailyMean, paired_series_difference, per_date_correlation
    from modeling.model import load_regressor, read_regressor_info

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", required=True, help="name=saved regressor dir")
    parser.add_argument("--dates", type=int, default=60, help="evenly spaced validation dates")
    parser.add_argument("--data-dir", default=None, help="DATA_DIR (default: the env's)")
    args = parser.parse_args()
    import os

    data = Path(args.data_dir or os.environ.get("DATA_DIR", "data")).resolve()
    rows = split_rows(data / "prompt_corpus.parquet", "validation", args.dates)
    features = pd.read_parquet(
        data / "training_set.parquet", columns=["date", "symbol", *FEATURE_NAMES]
    ).drop_duplicates(["date", "symbol"])
    rows = rows.merge(features, on=["date", "symbol"], how="left")
    if rows[list(FEATURE_NAMES)].isna().any().any():
        raise SystemExit("some validation rows have no features in the training set")
    dates = np.sort(rows["date"].unique())
    fit = rows["date"].isin(dates[0::2]).to_numpy()
    held = rows.loc[~fit, ["date", "symbol", "label"]].copy()
    held["true_signal"] = planted_signal(
        rows.loc[~fit, "ret_5d"].to_numpy(), rows.loc[~fit, "vol_20d"].to_numpy()
    )
    results: dict = {"rows": len(rows), "dates": len(dates), "held_out_dates": int(held["date"].nunique())}
    for spec in args.model:
        name, _, model_dir = spec.partition("=")
        base = read_regressor_info(model_dir)["base_model"]["path"]
        model, tokenizer = load_regressor(model_dir, device="cpu"), load_tokenizer(base)
        states = pooled_states(model, tokenizer, rows["prompt"].tolist())
        with torch.no_grad():
            held["llm"] = model.head(torch.from_numpy(states[~fit])).numpy()
        x_fit, x_held = states[fit], states[~fit]
        mu, sd = x_fit.mean(0), x_fit.std(0) + 1e-6
        x_fit, x_held = (x_fit - mu) / sd, (x_held - mu) / sd
        gram = x_fit.T @ x_fit + 1e-3 * len(x_fit) * np.eye(x_fit.shape[1])
        reading = {}
        for feature in FEATURE_NAMES:
            y = rows.loc[fit, feature].to_numpy(np.float64)
            coef = np.linalg.solve(gram, x_fit.T @ (y - y.mean()))
            read = x_held @ coef + y.mean()
            held[f"read_{feature}"] = read
            reading[feature] = float(np.corrcoef(read, rows.loc[~fit, feature].to_numpy())[0, 1])
        held["read_signal"] = planted_signal(held["read_ret_5d"].to_numpy(), held["read_vol_20d"].to_numpy())
        daily = {
            col: per_date_correlation(held, col, "label", "spearman")
            for col in ("true_signal", "read_signal", "llm")
        }
        results[name] = {
            "reading_correlation": reading,
            "rank_ic": {col: vars(DailyMean.of(s)) for col, s in daily.items()},
            "read_minus_true": str(paired_series_difference(daily["read_signal"], daily["true_signal"])),
            "llm_minus_read": str(paired_series_difference(daily["llm"], daily["read_signal"])),
        }
        print(name, {k: round(v, 3) for k, v in reading.items()})
        print(name, {c: f"{s.mean():.4f}" for c, s in daily.items()}, results[name]["read_minus_true"])
    save_json("reading", results)
    _write(args, results)


def _write(args, results: dict) -> None:
    names = [s.partition("=")[0] for s in args.model]
    feats = ("ret_5d", "vol_20d", "ret_1d", "ret_20d", "rsi_14d", "log_dollar_volume_20d")
    head = "| model | " + " | ".join(f"read {f}" for f in feats) + " |"
    rule = "|---|" + "---:|" * len(feats)
    lines = [head, rule]
    for n in names:
        r = results[n]["reading_correlation"]
        lines.append(f"| {n} | " + " | ".join(f"{r[f]:.3f}" for f in feats) + " |")
    sig = [
        "| model | signal from true features | signal from readouts | read − true | LLM forecast | LLM − readouts |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for n in names:
        ic = results[n]["rank_ic"]
        cell = {c: f"{v['mean']:.4f} ± {v['se']:.4f} ({v['n_dates']})" for c, v in ic.items()}
        sig.append(
            f"| {n} | {cell['true_signal']} | {cell['read_signal']} | {results[n]['read_minus_true']} | {cell['llm']} | {results[n]['llm_minus_read']} |"
        )
    facts = machine()
    write_section(
        "reading",
        f"""## How precisely the LLM reads its prompt's numbers (issue 13 diagnostic)

Command: `{COMMAND} {" ".join("--model " + s.partition("=")[0] + "=<dir>" for s in args.model)} --dates {args.dates}` after `make demo`. Machine: {facts["cores"]} cores ({facts["cpu"]}). Validation rows on {results["dates"]} evenly spaced dates ({results["rows"]:,} rows); a ridge readout from the pooled state (the head's input) to each feature is fit on every other date and judged on the other {results["held_out_dates"]}. Correlation of each feature with its readout:

{chr(10).join(lines)}

The planted signal, s = −tanh(ret_5d / (√5 vol_20d)) × vol_20d, computed from the true features and from
the readouts: mean daily RankIC against the label ± SE (dates) on the held-out dates, the paired
difference, and the LLM's own forecast on the same rows:

{chr(10).join(sig)}
""",
    )


if __name__ == "__main__":
    main()
