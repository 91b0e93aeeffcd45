import pandas as pd
from dagster import AssetExecutionContext, MaterializeResult, MetadataValue, asset

from modeling.data.features import FEATURES_TABLE
from modeling.data.predictions import PREDICTIONS_TABLE
from modeling.monitoring import (
    PERFORMANCE_TABLE,
    ROLLING_WINDOWS,
    performance_table,
    realised_rank_ic_png,
    write_performance,
)
from pipeline.metadata import frame_markdown, png_markdown
from pipeline.resources import WAREHOUSE_POOL, StorageResource, WarehouseResource

PREDICTION_PERFORMANCE_CODE_VERSION = "prediction-performance-v2"


def read_forecasts_and_outcomes(con) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every stored forecast, and the realised forward return (`features.fwd_ret`) of its (date, symbol)
    where the features table has one."""
    tables = {name for (name,) in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
    missing = [t for t in (PREDICTIONS_TABLE, FEATURES_TABLE) if t not in tables]
    if missing:
        raise ValueError(f"the warehouse has no {' or '.join(missing)} table yet: materialise it first")
    predictions = con.execute(f"SELECT date, symbol, prediction, model_version FROM {PREDICTIONS_TABLE}").df()
    outcomes = con.execute(f"""
        SELECT f.date, f.symbol, f.fwd_ret FROM {FEATURES_TABLE} f
        SEMI JOIN {PREDICTIONS_TABLE} p USING (date, symbol) WHERE f.fwd_ret IS NOT NULL
    """).df()
    return predictions, outcomes


@asset(
    pool=WAREHOUSE_POOL,
    group_name="serving",
    kinds={"duckdb"},
    deps=["predictions", "features"],
    code_version=PREDICTION_PERFORMANCE_CODE_VERSION,
)
def prediction_performance(
    context: AssetExecutionContext, storage: StorageResource, warehouse: WarehouseResource
) -> MaterializeResult:
    """The realised performance of the live forecasts: per (date, model_version) whose forward return is
    now known, the IC, RankIC, top-minus-bottom decile return, hit rate and number of names of the
    stored `predictions` against the realised `fwd_ret`, with rolling 20- and 60-date means along the
    served track record. Recomputed from both tables on every run: a re-run without new labels writes
    the same rows."""
    with warehouse.get_connection() as con:
        predictions, outcomes = read_forecasts_and_outcomes(con)
        # the realised returns' horizon (the features table's label), for the rolling RankIC's SE
        horizon = con.execute(f"SELECT max(fwd_horizon) FROM {FEATURES_TABLE}").fetchone()[0] or 1
        table = performance_table(predictions, outcomes, int(horizon))
        counts = write_performance(con, table)
    png = realised_rank_ic_png(table, storage.reports_dir / "prediction_performance.png")
    latest = table.tail(1)
    context.log.info(
        f"{counts['dates']} realised date(s) ({counts['new_dates']} new) of {predictions['date'].nunique()} "
        "forecast date(s)"
    )
    dates = pd.to_datetime(table["date"])
    return MaterializeResult(
        metadata={
            "dagster/row_count": MetadataValue.int(len(table)),
            "date_range": MetadataValue.text(f"{dates.min()} .. {dates.max()}" if len(table) else "none"),
            "symbol_count": MetadataValue.int(int(predictions["symbol"].nunique())),
            "preview": MetadataValue.md(frame_markdown(table.tail(8).iloc[::-1])),
            "forecast_dates": MetadataValue.int(int(predictions["date"].nunique())),
            "new_dates": MetadataValue.int(counts["new_dates"]),
            "changed_dates": MetadataValue.int(counts["changed_dates"]),
            **{
                f"{column}_{w}": MetadataValue.float(
                    float(latest[f"{column}_{w}"].iloc[0]) if len(latest) else float("nan")
                )
                for w in ROLLING_WINDOWS
                for column in ("rank_ic_mean", "rank_ic_se")
            },
            **{
                f"n_dates_{w}": MetadataValue.int(int(latest[f"n_dates_{w}"].iloc[0]) if len(latest) else 0)
                for w in ROLLING_WINDOWS
            },
            "realised_rank_ic": png_markdown(png, "realised RankIC over time"),
            "table": MetadataValue.text(PERFORMANCE_TABLE),
        }
    )
