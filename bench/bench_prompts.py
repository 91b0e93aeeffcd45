"""Benchmark: prompt corpus build rate (rendering + tokenisation) on 500 symbols x 2,500 dates.

The rows are real `features` rows: a synthetic market of 800 always-listed symbols, its top-500
universe and the 16 features over 2,500 feature dates (1.25M rows). The tokenizer is the embedded
default (`base_model` asset recipe: vocabulary 4096 trained on 20k prompt-like rows). Timed: the
`PromptBuilder.iter_batches` loop the `prompt_corpus` asset runs (user messages, chat template,
batched fast tokenisation, token counts), without the Parquet write; plus each part on its own.

    python bench/bench_prompts.py            # full workload, updates BENCHMARKS.md
    python bench/bench_prompts.py --dates 500
"""

from __future__ import annotations

import argparse
import os
import time

from _common import OUT, machine, peak_rss_gib, save_json, write_section

COMMAND = "python bench/bench_prompts.py"


def feature_rows(n_dates: int):
    import duckdb

    from modeling.data.features import LabelSpec, build_features
    from modeling.data.ingest import ingest_market_data
    from modeling.data.synthetic import (
        TRADING_DAYS_PER_YEAR,
        SyntheticMarketConfig,
        generate_synthetic_market,
    )
    from modeling.data.universe import UniverseSpec, build_universe
    from modeling.feature_registry import WARMUP_ROWS

    n_days = n_dates + WARMUP_ROWS
    market = generate_synthetic_market(
        SyntheticMarketConfig(
            n_symbols=800, n_years=n_days / TRADING_DAYS_PER_YEAR, late_listing_share=0.0, delisting_share=0.0
        )
    )
    con = duckdb.connect()
    ingest_market_data(con, frame=market.frame)
    build_universe(con, UniverseSpec(top_n=500))
    build_features(con, LabelSpec())
    return con.execute("SELECT * FROM features ORDER BY date, symbol").df()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dates", type=int, default=2500)
    parser.add_argument("--batch-size", type=int, default=8192)
    args = parser.parse_args()

    from modeling.backbones.common import load_tokenizer
    from modeling.backbones.embedded import build_embedded_base_model
    from modeling.prompt import PromptBuilder, count_tokens, tokenizer_training_texts

    rows = feature_rows(args.dates)
    builder = PromptBuilder()
    model_dir = build_embedded_base_model(
        OUT / "base_model", tokenizer_training_texts(builder, 20_000, seed=0)
    )
    tokenizer = load_tokenizer(model_dir)

    timings: dict[str, float] = {}
    start = time.perf_counter()
    n_tokens_total, n_prompts = 0, 0
    for prompts, n_tokens in builder.iter_batches(rows, tokenizer, args.batch_size):
        n_prompts += len(prompts)
        n_tokens_total += int(n_tokens.sum())
    timings["end_to_end"] = time.perf_counter() - start

    sample = rows.iloc[: min(len(rows), 50_000)]
    start = time.perf_counter()
    contents = builder.user_contents(sample)
    timings["user_messages"] = (time.perf_counter() - start) / len(sample)
    start = time.perf_counter()
    rendered = builder.render_batch(sample, tokenizer)
    timings["messages_plus_template"] = (time.perf_counter() - start) / len(sample)
    start = time.perf_counter()
    count_tokens(tokenizer, rendered)
    timings["tokenise"] = (time.perf_counter() - start) / len(sample)
    start = time.perf_counter()
    for i in range(0, len(rendered), args.batch_size):
        tokenizer(rendered[i : i + args.batch_size], add_special_tokens=False, return_attention_mask=False)
    timings["tokenise_generic_call"] = (time.perf_counter() - start) / len(sample)
    del contents

    results = {
        "machine": machine(),
        "rows": len(rows),
        "symbols_per_date": float(rows.groupby("date").size().mean()),
        "dates": int(rows["date"].nunique()),
        "prompts": n_prompts,
        "seconds": timings["end_to_end"],
        "prompts_per_s": n_prompts / timings["end_to_end"],
        "mean_tokens": n_tokens_total / n_prompts,
        "tokens_per_s": n_tokens_total / timings["end_to_end"],
        "per_prompt_us": {k: v * 1e6 for k, v in timings.items() if k != "end_to_end"},
        "peak_rss_gib": peak_rss_gib(),
        "tokenizer_vocab": len(tokenizer),
        "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM", "default (on)"),
    }
    save_json("prompts", results)
    us = results["per_prompt_us"]
    write_section(
        "prompts",
        "\n".join(
            [
                "## Prompt corpus build rate (issue 3)",
                "",
                f"Command: `{COMMAND}`. Machine: {results['machine']['cores']} cores ({results['machine']['cpu']}). "
                f"Workload: {results['prompts']:,} prompts = {results['symbols_per_date']:.0f} symbols x "
                f"{results['dates']:,} dates of real `features` rows; embedded tokenizer ({results['tokenizer_vocab']} "
                "tokens, Llama-3 chat template, digits split). Timed: `PromptBuilder.iter_batches` (messages, chat "
                f"template, batched tokenisation, token counts), batch {args.batch_size}, Parquet write excluded.",
                "",
                "| prompts/s | mean tokens/prompt | tokens/s | wall s | peak RSS GiB |",
                "|---:|---:|---:|---:|---:|",
                f"| {results['prompts_per_s']:,.0f} | {results['mean_tokens']:.1f} | {results['tokens_per_s']:,.0f} | "
                f"{results['seconds']:.1f} | {results['peak_rss_gib']:.2f} |",
                "",
                f"Per prompt, measured on 50k rows: user messages {us['user_messages']:.1f} us, messages + chat template "
                f"{us['messages_plus_template']:.1f} us, token counting {us['tokenise']:.1f} us (Rust backend, as in the "
                f"pipeline; the generic `tokenizer(texts)` call would take {us['tokenise_generic_call']:.1f} us).",
            ]
        ),
    )
    print(results)


if __name__ == "__main__":
    main()
