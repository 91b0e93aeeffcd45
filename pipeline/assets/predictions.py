from dagster import AssetExecutionContext, MaterializeResult, MetadataValue, asset

from modeling.data.parquet_io import read_parquet_metadata
from modeling.data.predictions import (
    PREDICTIONS_TABLE,
    live_rows,
    rank_predictions,
    rows_to_publish,
    write_predictions,
)
from modeling.feature_registry import served_columns
from pipeline.metadata import frame_markdown, relation_metadata
from pipeline.resources import WAREHOUSE_POOL, MlflowResource, StorageResource, WarehouseResource

PREDICTIONS_CODE_VERSION = "predictions-v1"


@asset(
    pool=WAREHOUSE_POOL,
    group_name="serving",
    kinds={"duckdb", "mlflow"},
    deps=["regressor", "training_set"],
    code_version=PREDICTIONS_CODE_VERSION,
)
def predictions(
    context: AssetExecutionContext,
    storage: StorageResource,
    warehouse: WarehouseResource,
    mlflow: MlflowResource,
) -> MaterializeResult:
    """Forecasts of the registry's champion (`models:/return-regressor@champion`, loaded from MLflow, not
    from memory) for every live row: (date, symbol, prediction, rank, decile, model_version); rank 1 and
    decile 10 are the highest forecasts of a date. The newest live date is (re)written; an older live
    date keeps the forecasts served on it.
    """
    from modeling import mlflow_registry

    mlflow_registry.configure(mlflow.tracking_uri, mlflow.experiment_name, mlflow.artifact_root)
    version = mlflow_registry.alias_version(mlflow.registry_name, mlflow_registry.CHAMPION)
    if version is None:
        raise RuntimeError(f"the registry has no {mlflow.registry_name}@champion to predict with")
    # the champion scores only features computed by the definitions it was trained on
    trained_on = mlflow_registry.version_tags(mlflow.registry_name, version).get("feature_registry_sha")
    computed_by = read_parquet_metadata(storage.parquet_path("training_set")).get("feature_registry_sha")
    if trained_on is not None and trained_on != computed_by:
        raise ValueError(
            f"champion v{version} was trained on features of definitions {trained_on}; the live rows were "
            f"computed by definitions {computed_by}: a feature's SQL, label, unit or scale changed. Retrain "
            "(materialise regressor) before predicting; no forecast was written"
        )
    rows = live_rows(storage.parquet_path("training_set"))
    if rows.empty:
        raise ValueError("the training set has no live rows (dates without a label) to predict")
    # by number, not by alias: a promotion between the two calls cannot mislabel the rows
    model = mlflow_registry.load_model(f"models:/{mlflow.registry_name}/{version}")
    scored = rows.assign(prediction=model.predict(rows[served_columns(rows.columns)]))
    table = rank_predictions(scored, version)
    with warehouse.get_connection() as con:
        fresh = rows_to_publish(con, table)
        write_predictions(con, fresh)
        metadata = relation_metadata(con, PREDICTIONS_TABLE, preview_columns=list(table.columns))
    top = table.sort_values(["date", "rank"]).groupby("date").head(5)
    bottom = table.sort_values(["date", "rank"]).groupby("date").tail(5)
    context.log.info(
        f"scored {len(table)} live rows on {table['date'].nunique()} date(s) with v{version}; wrote "
        f"{fresh['date'].nunique()} date(s) (older live dates keep the forecasts served on them)"
    )
    return MaterializeResult(
        metadata={
            **metadata,
            "model_version": MetadataValue.text(version),
            "live_dates": MetadataValue.json(sorted(str(d.date()) for d in table["date"].unique())),
            "rows_scored": MetadataValue.int(len(table)),
            "dates_written": MetadataValue.json(sorted(str(d.date()) for d in fresh["date"].unique())),
            "prediction_std": MetadataValue.float(float(table["prediction"].std(ddof=0))),
            "top_5": MetadataValue.md(frame_markdown(top)),
            "bottom_5": MetadataValue.md(frame_markdown(bottom)),
        }
    )
