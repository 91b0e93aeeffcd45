from typing import Literal

from dagster import Config, MaterializeResult, MetadataValue, asset
from pydantic import Field

from modeling.buckets import BucketConfig
from modeling.data.features import FEATURES_TABLE, features_registry_sha
from modeling.data.parquet_io import create_parquet_view, write_parquet_atomic
from modeling.data.training_set import LabelSpec, SplitSpec, build_training_set
from modeling.rebalancing import histogram_png
from pipeline.metadata import frame_markdown, png_markdown, relation_metadata
from pipeline.resources import WAREHOUSE_POOL, StorageResource, WarehouseResource

_S, _L, _B = SplitSpec(), LabelSpec(), BucketConfig()  # defaults live in the dataclasses


class TrainingSetConfig(Config):
    validation_fraction: float = Field(
        default=_S.validation_fraction, gt=0, lt=1, description="Share of labelled dates for validation."
    )
    test_fraction: float = Field(
        default=_S.test_fraction, gt=0, lt=1, description="Share of labelled dates, the last ones, for test."
    )
    validation_start: str | None = Field(default=None, description="Explicit first validation date (ISO).")
    test_start: str | None = Field(default=None, description="Explicit first test date (ISO).")
    purge_days: int | None = Field(
        default=None, ge=0, description="Dates purged between segments; None = horizon h."
    )
    label_kind: Literal["raw", "excess", "cs_zscore"] = Field(
        default=_L.kind, description="raw fwd_ret, cross-sectionally demeaned, or z-scored per date."
    )
    scale_to_unit_std: bool = Field(
        default=_L.scale_to_unit_std, description="Divide the label by its train std (fit on train)."
    )
    zero_eps: float = Field(
        default=_B.zero_eps, description="|label| <= zero_eps * sigma is the zero bucket."
    )
    extreme_k: float = Field(
        default=_B.extreme_k, description="|label| > extreme_k * sigma is an extreme bucket."
    )
    n_bins: int = Field(default=_B.n_bins, ge=1, description="Magnitude buckets per sign.")
    binning: Literal["equal_width", "quantile"] = Field(
        default=_B.binning, description="Magnitude bin edges."
    )
    winsor_quantile: float = Field(
        default=_B.winsor_quantile, description="Winsorisation of train labels for sigma and edges."
    )
    weight_scheme: Literal["inverse", "sqrt_inverse", "lds", "none"] = Field(
        default=_B.scheme, description="How bucket frequencies (or the smoothed density) become weights."
    )
    weight_clip: float = Field(
        default=_B.clip, ge=1, description="Weights clipped to [1/clip, clip] around mean 1."
    )
    mode: Literal["weight", "resample"] = Field(
        default=_B.mode, description="Weight column or weighted resample."
    )
    target_size: int | None = Field(
        default=None, ge=1, description="Resample: train rows drawn (None = as many)."
    )
    seed: int = Field(default=_B.seed, ge=0, description="Seed of the resample draws.")

    def specs(self) -> tuple[SplitSpec, LabelSpec, BucketConfig]:
        return (
            SplitSpec(
                self.validation_fraction,
                self.test_fraction,
                self.validation_start,
                self.test_start,
                self.purge_days,
            ),
            LabelSpec(self.label_kind, self.scale_to_unit_std),
            BucketConfig(
                zero_eps=self.zero_eps,
                extreme_k=self.extreme_k,
                n_bins=self.n_bins,
                binning=self.binning,
                winsor_quantile=self.winsor_quantile,
                scheme=self.weight_scheme,
                clip=self.weight_clip,
                mode=self.mode,
                target_size=self.target_size,
                seed=self.seed,
            ),
        )


@asset(
    pool=WAREHOUSE_POOL,
    group_name="training",
    kinds={"parquet", "pandas"},
    deps=["features"],
    code_version="training-set-v3",
)
def training_set(
    config: TrainingSetConfig, storage: StorageResource, warehouse: WarehouseResource
) -> MaterializeResult:
    """Feature rows with `split` (train/validation/test by date, purged by the horizon; live = no label
    yet), the model's `label`, and the bucket re-balancing: `bucket` and `weight` (fit on train only;
    validation and test keep their natural distribution and weight 1). Parquet, also a DuckDB view.
    """
    split_spec, label_spec, bucket_cfg = config.specs()
    with warehouse.get_connection() as con:
        features = con.execute(f"SELECT * FROM {FEATURES_TABLE}").df()
        registry_sha = features_registry_sha(con)
    horizons = features["fwd_horizon"].unique()
    if len(horizons) != 1:
        raise ValueError(f"the features table mixes label horizons {sorted(horizons)}; rebuild it")
    frame, report = build_training_set(features, int(horizons[0]), split_spec, label_spec, bucket_cfg)

    path = storage.parquet_path("training_set")
    write_parquet_atomic(
        frame,
        path,
        metadata={"horizon": int(horizons[0]), "feature_registry_sha": registry_sha, **report.to_dict()},
    )
    png = histogram_png(
        frame.loc[frame["split"] == "train", "label"].to_numpy(),
        report.bucket_model,
        report.rebalanced,
        storage.reports_dir / "training_set_buckets.png",
    )
    with warehouse.get_connection() as con:
        create_parquet_view(con, "training_set", path)
        metadata = relation_metadata(
            con, "training_set", preview_columns=["date", "symbol", "split", "label", "bucket", "weight"]
        )
    metadata.update(
        {
            "path": MetadataValue.path(str(path)),
            "horizon": MetadataValue.int(int(horizons[0])),
            "feature_registry_sha": MetadataValue.text(registry_sha),
            "rows_by_split": MetadataValue.json(report.rows_by_split),
            "rows_dropped": MetadataValue.json(report.dropped),
            "split_plan": MetadataValue.json(report.plan.to_dict()),
            "label": MetadataValue.json(report.to_dict()["label"]),
            "buckets_before": MetadataValue.md(frame_markdown(report.rebalanced.before.reset_index())),
            "buckets_after": MetadataValue.md(frame_markdown(report.rebalanced.after.reset_index())),
            "bucket_histogram": png_markdown(png, "train label histogram and bucket shares"),
            "bucket_histogram_path": MetadataValue.path(str(png)),
        }
    )
    return MaterializeResult(metadata=metadata)
