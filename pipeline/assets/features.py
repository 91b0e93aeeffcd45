from dagster import Config, MaterializeResult, MetadataValue, asset
from pydantic import Field

from modeling.data.features import FEATURES_TABLE, LabelSpec, build_features
from modeling.feature_registry import FEATURE_NAMES, WARMUP_ROWS, registry_markdown
from pipeline.metadata import relation_metadata
from pipeline.resources import WAREHOUSE_POOL, WarehouseResource


class FeaturesConfig(Config):
    horizon: int = Field(
        default=LabelSpec.horizon,
        ge=1,
        le=60,
        description="Label horizon h in trading days: fwd_ret = close(t+h)/close(t) - 1.",
    )


@asset(
    pool=WAREHOUSE_POOL,
    group_name="features",
    kinds={"duckdb"},
    deps=["raw_market_data", "universe"],
    code_version="features-v2",
)
def features(config: FeaturesConfig, warehouse: WarehouseResource) -> MaterializeResult:
    """Per (date, symbol) in the universe: the 16 registry features (data up to t only) and the labels
    `fwd_ret`, `fwd_ret_excess` (t+1..t+h; NULL where the future is unknown: the rows to predict).
    """
    spec = LabelSpec(horizon=config.horizon)
    with warehouse.get_connection() as con:
        build_features(con, spec)
        metadata = relation_metadata(
            con, FEATURES_TABLE, preview_columns=["date", "symbol", *FEATURE_NAMES[:6], "fwd_ret"]
        )
        n_live, n_unlabelled, n_in_universe = con.execute(f"""
            SELECT count(*) FILTER (WHERE fwd_ret IS NULL
                                    AND date = (SELECT max(date) FROM {FEATURES_TABLE})),
                   count(*) FILTER (WHERE fwd_ret IS NULL),
                   (SELECT count(*) FROM universe)
            FROM {FEATURES_TABLE}
        """).fetchone()
        stats = con.execute(
            f"SUMMARIZE SELECT {', '.join(FEATURE_NAMES)}, fwd_ret FROM {FEATURES_TABLE}"
        ).df()
    metadata.update(
        {
            "horizon": MetadataValue.int(spec.horizon),
            "warmup_rows": MetadataValue.int(WARMUP_ROWS),
            "universe_rows_in_warmup": MetadataValue.int(
                int(n_in_universe - metadata["dagster/row_count"].value)
            ),
            "rows_without_label": MetadataValue.int(int(n_unlabelled)),
            "rows_without_label_on_last_date": MetadataValue.int(int(n_live)),
            "feature_registry": MetadataValue.md(registry_markdown()),
            "summary": MetadataValue.md(
                stats[["column_name", "min", "max", "avg", "std", "null_percentage"]].to_markdown(index=False)
            ),
        }
    )
    return MaterializeResult(metadata=metadata)
