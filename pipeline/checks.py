"""Asset checks: one per property a downstream user relies on."""

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq
from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetKey,
    Config,
    MetadataValue,
    asset_check,
)
from pydantic import Field

from modeling.backbones.common import describe_base_model
from modeling.data.features import FEATURES_TABLE, LABEL_COLUMNS, count_non_finite
from modeling.data.ingest import RAW_TABLE, REJECTS_TABLE
from modeling.data.parquet_io import read_parquet_metadata
from modeling.data.prompt_corpus import corpus_vs_training_set
from modeling.data.split_jumps import suspected_split_jumps
from modeling.data.universe import UniverseSpec, universe_count_mismatches
from modeling.feature_registry import FEATURE_NAMES, WARMUP_ROWS
from pipeline.metadata import frame_markdown
from pipeline.resources import MlflowResource, StorageResource, WarehouseResource


class RejectShareConfig(Config):
    max_reject_share: float = Field(
        default=0.01, ge=0.0, le=1.0, description="Largest acceptable share of input rows quarantined as bad."
    )


@asset_check(asset="raw_market_data", description="The share of quarantined input rows is below a threshold.")
def reject_share_below_threshold(config: RejectShareConfig, warehouse: WarehouseResource) -> AssetCheckResult:
    with warehouse.get_connection() as con:
        n_ok = con.execute(f"SELECT count(*) FROM {RAW_TABLE}").fetchone()[0]
        by_reason = dict(
            con.execute(f"SELECT reason, count(*) FROM {REJECTS_TABLE} GROUP BY reason").fetchall()
        )
    n_bad = sum(by_reason.values())
    share = n_bad / (n_ok + n_bad) if n_ok + n_bad else 0.0
    return AssetCheckResult(
        passed=share <= config.max_reject_share,
        metadata={
            "reject_share": MetadataValue.float(share),
            "threshold": config.max_reject_share,
            "rejects_by_reason": MetadataValue.json(by_reason),
        },
    )


@asset_check(
    asset="raw_market_data",
    description="(warning) No close-to-close move looks like an unadjusted split: the features and labels "
    "read raw closes, so the input must be split-adjusted.",
)
def no_unadjusted_split_jumps(warehouse: WarehouseResource) -> AssetCheckResult:
    with warehouse.get_connection() as con:
        jumps = suspected_split_jumps(con)
    return AssetCheckResult(
        passed=jumps.empty,
        severity=AssetCheckSeverity.WARN,
        metadata={
            "suspected_split_days": MetadataValue.int(len(jumps)),
            "newest": MetadataValue.md(frame_markdown(jumps.head(20), 4) if len(jumps) else "none"),
        },
    )


def _latest_metadata(context: AssetCheckExecutionContext, asset: str) -> dict:
    event = context.instance.get_latest_materialization_event(AssetKey(asset))
    if event is None or event.asset_materialization is None:
        return {}
    return {k: v.value for k, v in event.asset_materialization.metadata.items()}


@asset_check(
    asset="universe",
    description="Per date, the universe holds min(N, symbols with a full window).",
    blocking=True,  # the model is never trained on a broken universe
)
def universe_size_per_date(
    context: AssetCheckExecutionContext, warehouse: WarehouseResource
) -> AssetCheckResult:
    meta = _latest_metadata(context, "universe")  # check what the last run says it built
    spec = UniverseSpec(
        top_n=int(meta.get("top_n", UniverseSpec.top_n)), window=int(meta.get("window", UniverseSpec.window))
    )
    with warehouse.get_connection() as con:
        bad = universe_count_mismatches(con, spec)
    return AssetCheckResult(
        passed=not bad,
        metadata={
            "top_n": spec.top_n,
            "window": spec.window,
            "dates_mismatched": len(bad),
            "first_mismatches": MetadataValue.json([[str(d), e, a] for d, e, a in bad[:10]]),
        },
    )


@asset_check(asset="features", description="The table has exactly the 16 registry feature columns.")
def exactly_16_feature_columns(warehouse: WarehouseResource) -> AssetCheckResult:
    with warehouse.get_connection() as con:
        columns = [r[0] for r in con.execute(f"DESCRIBE {FEATURES_TABLE}").fetchall()]
    feature_columns = [
        c for c in columns if c not in ("date", "symbol", "sector", "fwd_horizon", *LABEL_COLUMNS)
    ]
    return AssetCheckResult(
        passed=feature_columns == list(FEATURE_NAMES),
        metadata={"n_feature_columns": len(feature_columns), "columns": MetadataValue.json(feature_columns)},
    )


@asset_check(
    asset="features", description="No NULL, NaN or infinite feature value after the warm-up.", blocking=True
)
def features_finite(warehouse: WarehouseResource) -> AssetCheckResult:
    with warehouse.get_connection() as con:
        bad = count_non_finite(con)
    return AssetCheckResult(
        passed=sum(bad.values()) == 0, metadata={"non_finite_by_feature": MetadataValue.json(bad)}
    )


@asset_check(
    asset="features",
    description=f"Each symbol's first feature row comes after its {WARMUP_ROWS}-row warm-up.",
)
def first_feature_date_after_warmup(warehouse: WarehouseResource) -> AssetCheckResult:
    with warehouse.get_connection() as con:
        n_early = con.execute(f"""
            WITH history AS (
                SELECT symbol, date, row_number() OVER (PARTITION BY symbol ORDER BY date) AS obs_no
                FROM {RAW_TABLE}
            ), firsts AS (SELECT symbol, min(date) AS first_date FROM {FEATURES_TABLE} GROUP BY symbol)
            SELECT count(*) FROM firsts f JOIN history h ON h.symbol = f.symbol AND h.date = f.first_date
            WHERE h.obs_no <= {WARMUP_ROWS}
        """).fetchone()[0]
        first = con.execute(f"SELECT min(date) FROM {FEATURES_TABLE}").fetchone()[0]
        first_raw = con.execute(f"SELECT min(date) FROM {RAW_TABLE}").fetchone()[0]
    return AssetCheckResult(
        passed=n_early == 0 and (first is None or first > first_raw),
        metadata={
            "symbols_starting_inside_warmup": n_early,
            "first_feature_date": str(first),
            "first_raw_date": str(first_raw),
        },
    )


def _training_set(storage: StorageResource) -> pd.DataFrame:
    return pd.read_parquet(storage.parquet_path("training_set"), columns=["date", "split", "weight", "label"])


@asset_check(
    asset="training_set",
    description="No train label window (t, t+h] reaches a validation or test "
    "date, and no validation window reaches a test date.",
    blocking=True,
)
def splits_are_purged(storage: StorageResource, warehouse: WarehouseResource) -> AssetCheckResult:
    horizon = int(read_parquet_metadata(storage.parquet_path("training_set"))["horizon"])
    frame = _training_set(storage)
    with warehouse.get_connection() as con:
        calendar = pd.DatetimeIndex(
            con.execute(f"SELECT DISTINCT date FROM {RAW_TABLE} ORDER BY 1").df()["date"]
        )
    position = {d: i for i, d in enumerate(calendar)}
    first = frame.groupby("split")["date"].min()
    last = frame.groupby("split")["date"].max()
    gaps = {
        "train->validation": position[first["validation"]] - position[last["train"]],
        "validation->test": position[first["test"]] - position[last["validation"]],
    }
    # the label of the last date t of a segment ends at t+h, which must come before the next segment's start
    return AssetCheckResult(
        passed=all(g > horizon for g in gaps.values()),
        metadata={"horizon": horizon, "gap_in_trading_days": MetadataValue.json(gaps)},
    )


@asset_check(asset="training_set", description="Train weights have mean 1; validation and test weigh 1.")
def weights_are_normalised(storage: StorageResource) -> AssetCheckResult:
    frame = _training_set(storage)
    train_mean = float(frame.loc[frame["split"] == "train", "weight"].mean())
    others_one = bool((frame.loc[frame["split"] != "train", "weight"] == 1.0).all())
    return AssetCheckResult(
        passed=abs(train_mean - 1.0) < 1e-9 and others_one,
        metadata={"train_weight_mean": train_mean, "eval_weights_all_one": others_one},
    )


@asset_check(
    asset="prompt_corpus", description="Every prompt fits the base model's context window.", blocking=True
)
def prompts_fit_context(storage: StorageResource) -> AssetCheckResult:
    model_dir = storage.base_model_dir
    limit = describe_base_model(model_dir)["max_position_embeddings"]
    longest = int(
        pq.read_table(storage.parquet_path("prompt_corpus"), columns=["n_tokens"])["n_tokens"]
        .to_numpy()
        .max(initial=0)
    )
    return AssetCheckResult(
        passed=limit is None or longest <= limit,
        metadata={"longest_prompt_tokens": longest, "context_window": limit or -1},
    )


@asset_check(
    asset="prompt_corpus",
    description="The corpus is the current training set: one prompt per training-set row, with the same "
    "split, label and weight (a stale corpus built from an older training set fails).",
)
def prompts_cover_training_set(storage: StorageResource) -> AssetCheckResult:
    counts = corpus_vs_training_set(
        storage.parquet_path("training_set"), storage.parquet_path("prompt_corpus")
    )
    return AssetCheckResult(
        passed=counts["missing"] == counts["extra"] == counts["different"] == 0,
        metadata={name: MetadataValue.int(n) for name, n in counts.items()},
    )


@asset_check(asset="prompt_corpus", description="No prompt shows a NaN or infinite feature value.")
def prompts_have_finite_values(storage: StorageResource) -> AssetCheckResult:
    prompts = pq.read_table(storage.parquet_path("prompt_corpus"), columns=["prompt"])["prompt"]
    n_bad = int(pc.sum(pc.match_substring_regex(prompts, r"=-?(nan|inf)\b")).as_py() or 0)
    return AssetCheckResult(passed=n_bad == 0, metadata={"prompts": len(prompts), "nan_prompts": n_bad})


@asset_check(
    asset="prompt_corpus",
    description="Warning: the corpus's prompts are written as the embedded backbone's pretraining prompts "
    "were (number format, significant digits, horizon, target, template, feature registry), so pretraining "
    "taught the backbone the text it is fine-tuned on. Other backbones were not pretrained here: passes.",
)
def prompts_match_pretraining(storage: StorageResource) -> AssetCheckResult:
    from modeling.backbones.embedded import read_embedded_info
    from modeling.prompt import PromptBuilder

    source = storage.base_model_source
    info = read_embedded_info(source.path) if source.kind == "embedded" else None
    pretrained_on = (info or {}).get("pretrain_prompt")
    if not ((info or {}).get("pretraining") or {}).get("steps") or not pretrained_on:
        why = (
            f"a {source.kind} backbone, not pretrained here"
            if source.kind != "embedded"
            else "an embedded backbone not pretrained, or built before it recorded its prompt settings"
        )
        return AssetCheckResult(passed=True, severity=AssetCheckSeverity.WARN, metadata={"compared": why})
    corpus = PromptBuilder.of_corpus(read_parquet_metadata(storage.parquet_path("prompt_corpus")))
    differences = corpus.differences(pretrained_on)
    return AssetCheckResult(
        passed=not differences,
        severity=AssetCheckSeverity.WARN,
        metadata={
            "compared": MetadataValue.json(sorted(k for k in corpus.settings() if k in pretrained_on)),
            "differences (pretrained on, corpus)": MetadataValue.json(
                {k: list(v) for k, v in differences.items()}
            ),
        },
    )


BEATS_K = 1.0
"""`regressor_beats_baselines`: the paired difference must exceed this many standard errors."""


@asset_check(
    asset="regressor",
    description="Warning: the LLM regressor beats the zero predictor and the same MLP head on the raw "
    "features (the no-LLM ablation), each by a paired daily RankIC difference on the same validation rows "
    "above one standard error.",
)
def regressor_beats_baselines(context: AssetCheckExecutionContext) -> AssetCheckResult:
    meta = _latest_metadata(context, "regressor")
    paired = meta.get("paired") or {}
    metadata: dict = {"retrained": bool(meta.get("retrained", True))}
    passed = bool(paired)
    for name in ("zero", "mlp_features"):
        d = (paired.get(name) or {}).get("validation")
        if not d:
            passed = False
            metadata[f"vs_{name}"] = "not measured"
            continue
        delta, se, t = float(d["delta"]), float(d["se"]), float(d["t"])
        beats = bool(np.isfinite(delta) and np.isfinite(se) and delta > BEATS_K * se)
        passed = passed and beats
        metadata[f"vs_{name}"] = (
            f"Δ RankIC {delta:+.4f} ± {se:.4f} (t {t:.2f}, {int(d['n_dates'])} dates): "
            f"{'beats' if beats else 'does not beat'}"
        )
    return AssetCheckResult(passed=passed, severity=AssetCheckSeverity.WARN, metadata=metadata)


@asset_check(
    asset="predictions",
    description="Exactly one finite prediction per live universe row (a symbol with features) on each "
    "live date.",
)
def predictions_cover_live_universe(
    storage: StorageResource, warehouse: WarehouseResource
) -> AssetCheckResult:
    from modeling.data.predictions import coverage, live_rows

    live = live_rows(storage.parquet_path("training_set"))
    with warehouse.get_connection() as con:
        counts = coverage(con, live)
        con.register("_live_dates", pd.DataFrame({"date": live["date"].unique()}))
        # universe members of a live date still in their feature warm-up have no features to score
        in_warmup = con.execute(f"""
            SELECT count(*) FROM universe u ANTI JOIN {FEATURES_TABLE} f USING (date, symbol)
            WHERE u.date IN (SELECT date FROM _live_dates)
        """).fetchone()[0]
    passed = (
        counts["live_rows"] > 0
        and counts["missing"] == counts["extra"] == counts["duplicated"] == 0
        and counts["non_finite"] == 0
    )
    return AssetCheckResult(
        passed=passed,
        metadata={
            **{k: MetadataValue.int(v) for k, v in counts.items()},
            "universe_rows_in_feature_warmup": MetadataValue.int(int(in_warmup)),
        },
    )


@asset_check(
    asset="base_model",
    description="The embedded backbone's pretraining lowered the loss it trains (every token, or the "
    "number tokens) on held-out validation prompts by a wide margin (to under half the random-init "
    "loss); other backbones come pretrained.",
)
def pretraining_lowered_lm_loss(storage: StorageResource) -> AssetCheckResult:
    from modeling.backbones.embedded import read_embedded_info

    source = storage.base_model_source
    info = read_embedded_info(source.path) if source.kind == "embedded" else None
    report = (info or {}).get("pretraining") or {}
    if source.kind != "embedded" or not report.get("steps"):
        # a user's or converted checkpoint is pretrained by its publisher; an embedded one without
        # pretraining (pretrain_rows=0, the random ablation) is not what the method assumes: a warning
        return AssetCheckResult(
            passed=source.kind != "embedded",
            severity=AssetCheckSeverity.WARN,
            metadata={"source_kind": source.kind, "pretrained_here": False},
        )
    # the loss it trained: every token, or the number tokens only (`pretrain_loss_tokens="values"`)
    tokens = ((info or {}).get("pretrain_spec") or {}).get("loss_tokens", "all")
    field = "val_loss" if tokens == "all" else "val_value_loss"
    before, after = float(report[f"{field}_before"]), float(report[f"{field}_after"])
    return AssetCheckResult(
        passed=after < 0.5 * before,
        metadata={
            "loss_tokens": tokens,
            "val_lm_loss_before": before,
            "val_lm_loss_after": after,
            "ratio": after / before,
        },
    )


class ChampionStillWorksConfig(Config):
    window: int = Field(
        default=20, ge=1, description="Judge the champion on its last this many realised dates."
    )
    min_dates: int | None = Field(
        default=None,
        ge=1,
        description="Fewer realised dates of the champion is no evidence (passes); None = the whole window.",
    )
    floor: float | None = Field(
        default=None,
        description="Fixed floor of the realised RankIC; None = min(validation RankIC - 2 SE of the "
        "difference to the window's mean, 0).",
    )


@asset_check(
    asset="prediction_performance",
    description="Warning: the serving champion's mean realised RankIC over its last 20 realised dates is at "
    "or above a floor (default: its validation RankIC minus 2 standard errors of the difference between "
    "the validation mean and the window's, or 0, whichever is lower). "
    "A failure makes the `retrain_on_decay` sensor request a forced daily retrain (same champion gate).",
)
def champion_still_works(
    config: ChampionStillWorksConfig, warehouse: WarehouseResource, mlflow: MlflowResource
) -> AssetCheckResult:
    from modeling import mlflow_registry
    from modeling.monitoring import PERFORMANCE_TABLE, DecayRule, decay_verdict

    mlflow_registry.configure(mlflow.tracking_uri, mlflow.experiment_name, mlflow.artifact_root)
    version = mlflow_registry.alias_version(mlflow.registry_name, mlflow_registry.CHAMPION)
    if version is None:
        return AssetCheckResult(
            passed=True, severity=AssetCheckSeverity.WARN, metadata={"reason": "no champion is serving"}
        )
    tags = mlflow_registry.version_tags(mlflow.registry_name, version)
    with warehouse.get_connection() as con:
        performance = con.execute(f"SELECT date, model_version, rank_ic FROM {PERFORMANCE_TABLE}").df()
    rule = DecayRule(
        window=config.window,
        min_dates=config.min_dates,
        floor=config.floor,
        horizon=int(tags.get("horizon", 1)),
    )
    verdict = decay_verdict(
        performance,
        version,
        float(tags.get("val_rank_ic", "nan")),
        float(tags.get("val_rank_ic_se", "nan")),
        rule,
    )
    return AssetCheckResult(
        passed=verdict.passed,
        severity=AssetCheckSeverity.WARN,
        description=verdict.reason,
        metadata={
            "model_version": MetadataValue.text(verdict.model_version),
            "realised_dates": MetadataValue.int(verdict.n_dates),
            "realised_rank_ic": MetadataValue.float(verdict.realised_rank_ic),
            "realised_rank_ic_se": MetadataValue.float(verdict.realised_rank_ic_se),
            "floor": MetadataValue.float(verdict.floor),
            "floor_rule": MetadataValue.text(verdict.floor_rule),
            "val_rank_ic": MetadataValue.float(verdict.val_rank_ic),
            "val_rank_ic_se": MetadataValue.float(verdict.val_rank_ic_se),
            "reason": MetadataValue.text(verdict.reason),
        },
    )


ALL_CHECKS = [
    reject_share_below_threshold,
    no_unadjusted_split_jumps,
    universe_size_per_date,
    exactly_16_feature_columns,
    features_finite,
    first_feature_date_after_warmup,
    splits_are_purged,
    weights_are_normalised,
    prompts_fit_context,
    prompts_cover_training_set,
    prompts_have_finite_values,
    prompts_match_pretraining,
    regressor_beats_baselines,
    predictions_cover_live_universe,
    pretraining_lowered_lm_loss,
    champion_still_works,
]
"""Every check, in data order: what `Definitions` registers."""
