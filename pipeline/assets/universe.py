from dagster import Config, MaterializeResult, MetadataValue, asset
from pydantic import Field

from modeling.data.universe import UNIVERSE_TABLE, UniverseSpec, build_universe
from pipeline.metadata import relation_metadata
from pipeline.resources import WAREHOUSE_POOL, WarehouseResource


class UniverseConfig(Config):
    top_n: int = Field(
        default=UniverseSpec.top_n, ge=1, description="Symbols kept per date (the most liquid)."
    )
    window: int = Field(
        default=UniverseSpec.window, ge=1, description="Trailing trading days in the mean dollar volume."
    )


@asset(
    pool=WAREHOUSE_POOL,
    group_name="data",
    kinds={"duckdb"},
    deps=["raw_market_data"],
    code_version="universe-v3",
)
def universe(config: UniverseConfig, warehouse: WarehouseResource) -> MaterializeResult:
    """Per date, the top N symbols by trailing mean dollar volume (close x volume), with their rank.

    Point in time: the rank of date t uses data up to and including t, over the symbols that traded on t.
    """
    spec = UniverseSpec(top_n=config.top_n, window=config.window)
    with warehouse.get_connection() as con:
        build_universe(con, spec)
        metadata = relation_metadata(con, UNIVERSE_TABLE)
        per_date = con.execute(
            f"SELECT min(n), max(n) FROM (SELECT count(*) n FROM {UNIVERSE_TABLE} GROUP BY date)"
        ).fetchone()
    metadata.update(
        {
            "top_n": MetadataValue.int(spec.top_n),
            "window": MetadataValue.int(spec.window),
            "symbols_per_date_min_max": MetadataValue.text(f"{per_date[0]} .. {per_date[1]}"),
        }
    )
    return MaterializeResult(metadata=metadata)
