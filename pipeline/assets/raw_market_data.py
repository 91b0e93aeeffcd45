from dagster import AssetExecutionContext, Config, MaterializeResult, MetadataValue, asset
from pydantic import Field

from modeling.data.ingest import (
    RAW_TABLE,
    REJECTS_TABLE,
    REVISIONS_TABLE,
    discover_files,
    ingest_market_data,
    skipped_entries,
)
from modeling.data.synthetic import SyntheticMarketConfig, generate_synthetic_market
from pipeline.metadata import relation_metadata
from pipeline.resources import WAREHOUSE_POOL, StorageResource, WarehouseResource


class RawMarketDataConfig(Config):
    """The `synthetic_*` fields are used only when MARKET_DATA_PATH is unset (the built-in market)."""

    synthetic_n_symbols: int = Field(
        default=SyntheticMarketConfig.n_symbols,
        ge=10,
        description="Symbols ever listed in the synthetic market.",
    )
    synthetic_years: float = Field(
        default=SyntheticMarketConfig.n_years, gt=0.25, description="Years of business days to simulate."
    )
    synthetic_seed: int = Field(
        default=SyntheticMarketConfig.seed, description="Seed: same seed, same market."
    )
    max_shrink_share: float = Field(
        default=0.01,
        ge=0.0,
        le=1.0,
        description="Largest share of the existing table's symbol-days a load may drop; a load that "
        "drops more fails and keeps the previous tables (raise it, up to 1.0, when a smaller input "
        "is intended).",
    )
    min_calendar_share: float = Field(
        default=0.2,
        ge=0.0,
        le=1.0,
        description="A date with fewer symbols than this share of the median over the market dates "
        "on each side is off-calendar: its rows are rejected as `off_calendar_date` (0 turns it off).",
    )


@asset(pool=WAREHOUSE_POOL, group_name="data", kinds={"duckdb"}, code_version="raw-market-data-v5")
def raw_market_data(
    context: AssetExecutionContext,
    config: RawMarketDataConfig,
    storage: StorageResource,
    warehouse: WarehouseResource,
) -> MaterializeResult:
    """Daily OHLCV, one clean row per (date, symbol), from MARKET_DATA_PATH or the synthetic market.

    Bad rows are quarantined with a `reason` in `raw_market_data_rejects`, never dropped silently;
    rows replaced by a revised copy from a newer file are kept in `raw_market_data_revisions`.
    """
    oracle: dict = {}
    skipped: list[str] = []
    with warehouse.get_connection() as con:
        if storage.market_data_path:
            files = discover_files(storage.market_data_path)
            skipped = skipped_entries(storage.market_data_path)
            context.log.info(f"ingesting {len(files)} file(s) from {storage.market_data_path}")
            if skipped:
                context.log.warning(f"not market data files, not read: {skipped}")
            report = ingest_market_data(
                con,
                sources=files,
                max_shrink_share=config.max_shrink_share,
                min_calendar_share=config.min_calendar_share,
            )
            source = f"{len(files)} file(s) under {storage.market_data_path}"
        else:
            market = generate_synthetic_market(
                SyntheticMarketConfig(
                    n_symbols=config.synthetic_n_symbols,
                    n_years=config.synthetic_years,
                    seed=config.synthetic_seed,
                )
            )
            report = ingest_market_data(
                con,
                frame=market.frame,
                max_shrink_share=config.max_shrink_share,
                min_calendar_share=config.min_calendar_share,
            )
            oracle = market.oracle
            source = f"built-in synthetic market (seed {config.synthetic_seed})"
        metadata = relation_metadata(con, RAW_TABLE)
    metadata.update(
        {
            "source": MetadataValue.text(source),
            "rows_read": MetadataValue.int(report.n_read),
            "rows_rejected": MetadataValue.int(report.n_rejected),
            "reject_share": MetadataValue.float(round(report.reject_share, 6)),
            "rejects_by_reason": MetadataValue.json(report.rejects_by_reason),
            "rejects_table": MetadataValue.text(REJECTS_TABLE),
            "rows_revised": MetadataValue.int(report.n_revised),
            "rows_removed": MetadataValue.int(report.n_removed),
            "revisions_table": MetadataValue.text(REVISIONS_TABLE),
            "skipped_entries": MetadataValue.json(skipped),
        }
    )
    if oracle:
        metadata["oracle_ic_universe"] = MetadataValue.float(oracle["oracle_ic_universe"])
        metadata["oracle_ic_all"] = MetadataValue.float(oracle["oracle_ic_all"])
        metadata["planted_signal"] = MetadataValue.json(oracle)
    return MaterializeResult(metadata=metadata)
