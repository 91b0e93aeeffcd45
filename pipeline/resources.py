"""Resources: the warehouse connection and the storage layout, built from `Settings` in one place."""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

import duckdb
from dagster import ConfigurableResource, InitResourceContext, PipesSubprocessClient
from dagster_duckdb import DuckDBResource
from pydantic import Field

from modeling.backbones import BaseModelSource, resolve_base_model
from pipeline.settings import Settings

WAREHOUSE_POOL = "warehouse"
"""Dagster concurrency pool of every asset that writes DATA_DIR's tables and files (DuckDB, Parquet, the
base model): one step at a time across all runs, whatever launched them (UI, job, schedule, sensor, CLI).
The instance's `concurrency.pools.default_limit: 1` (written by `make`) sets the limit."""
TRAINING_POOL = "training"
"""Pool of the steps that train (the regressor, the search): one at a time; they may overlap a data step,
since they read a snapshot of their inputs (`modeling.data.parquet_io.snapshot_files`)."""


def _record_run_worker(context: InitResourceContext) -> None:
    from pipeline.run_workers import record_run_worker

    record_run_worker(context.instance, context.dagster_run)


class WarehouseResource(DuckDBResource):
    """DuckDB `warehouse.duckdb` under DATA_DIR.

    Unlike the base class, the connection is closed even when the step fails (DuckDB keeps one database
    instance per file and process, so a leaked connection would block later ones), and the directory
    is created on first use. Opening retries while another process holds the file lock.
    """

    def setup_for_execution(self, context: InitResourceContext) -> None:
        _record_run_worker(context)  # a SIGKILLed run is found and freed (`pipeline.run_workers`)

    @contextmanager
    def get_connection(self):
        if self.database != ":memory:":
            Path(self.database).parent.mkdir(parents=True, exist_ok=True)
        conn = self._connect_with_retries()
        try:
            yield conn
        finally:
            conn.close()

    lock_timeout_s: float = Field(
        default=600.0, ge=0.0, description="How long to wait for another process's lock on the file."
    )

    def _connect_with_retries(self) -> duckdb.DuckDBPyConnection:
        """Another process (a `dagster dev` run beside a CLI run, a notebook) may hold the write lock for
        a while: back off until `lock_timeout_s`, then fail with DuckDB's lock error."""
        deadline = time.monotonic() + self.lock_timeout_s
        delay = 0.1
        while True:
            try:
                return duckdb.connect(self.database, config=dict(self.connection_config))
            except duckdb.IOException:
                if time.monotonic() + delay > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 10.0)


class StorageResource(ConfigurableResource):
    """Where assets write files and which external inputs they read (see `pipeline.settings`)."""

    data_dir: str = Field(description="Absolute DATA_DIR: Parquet outputs, models, reports.")
    market_data_path: str | None = Field(
        default=None, description="CSV/Parquet file or directory of OHLCV; None = built-in synthetic market."
    )
    base_model: str | None = Field(
        default=None,
        description="BASE_MODEL: a local Hugging Face model directory, a GGUF file or smollm2-135m-instruct; "
        "None = the embedded tiny Llama built and pretrained locally.",
    )

    def setup_for_execution(self, context: InitResourceContext) -> None:
        _record_run_worker(context)  # a SIGKILLed run is found and freed (`pipeline.run_workers`)

    @property
    def root(self) -> Path:
        return Path(self.data_dir)

    def parquet_path(self, asset_name: str) -> Path:
        """`DATA_DIR/<asset>.parquet`: the asset's name is also its file's name."""
        return self.root / f"{asset_name}.parquet"

    @property
    def base_model_source(self) -> BaseModelSource:
        """Which backbone BASE_MODEL selects and the checkpoint directory everything loads."""
        return resolve_base_model(self.base_model, self.root)

    @property
    def base_model_dir(self) -> Path:
        return self.base_model_source.path

    @property
    def reports_dir(self) -> Path:
        path = self.root / "reports"
        path.mkdir(parents=True, exist_ok=True)
        return path


class MlflowResource(ConfigurableResource):
    """The MLflow tracking store and model registry (SQLite under DATA_DIR unless MLFLOW_TRACKING_URI)."""

    tracking_uri: str = Field(description="MLFLOW_TRACKING_URI, e.g. sqlite:////abs/DATA_DIR/mlflow.db.")
    artifact_root: str = Field(description="Artifact root of the experiments created here.")
    experiment_name: str = Field(default="return-regressor", description="Experiment of the training runs.")
    registry_name: str = Field(default="return-regressor", description="Registered model name.")


def build_resources(settings: Settings) -> dict[str, object]:
    return {
        "warehouse": WarehouseResource(database=str(settings.warehouse_path)),
        "storage": StorageResource(
            data_dir=str(settings.data_dir),
            market_data_path=str(settings.market_data_path) if settings.market_data_path else None,
            base_model=str(settings.base_model) if settings.base_model else None,
        ),
        # the training child process: logs, metrics and results come back through Dagster Pipes
        "pipes_subprocess_client": PipesSubprocessClient(),
        "mlflow": MlflowResource(
            tracking_uri=settings.mlflow_tracking_uri, artifact_root=str(settings.mlflow_artifacts_dir)
        ),
    }
