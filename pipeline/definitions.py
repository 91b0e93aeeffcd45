"""The one Definitions object: assets, checks, jobs, schedules, sensors and resources (configured here)."""

from __future__ import annotations

from dagster import AssetSelection, Definitions, define_asset_job, in_process_executor, validate_run_config

from modeling.backbones import resolve_base_model
from pipeline.assets import ALL_ASSETS
from pipeline.checks import ALL_CHECKS
from pipeline.resources import build_resources
from pipeline.schedules import ON_DEMAND_ASSETS, WAREHOUSE_TAG, build_automation, daily_retrain_job
from pipeline.settings import Settings

full_pipeline_job = define_asset_job(
    "full_pipeline",
    selection=AssetSelection.all() - AssetSelection.assets(*ON_DEMAND_ASSETS),
    description="Materialise the whole chain, raw market data to predictions (what `make demo` runs).",
    tags=WAREHOUSE_TAG,
)

_settings = Settings.from_env()
_schedules, _sensors = build_automation(_settings)

defs = Definitions(
    assets=ALL_ASSETS,
    asset_checks=ALL_CHECKS,
    jobs=[full_pipeline_job, daily_retrain_job],
    schedules=_schedules,
    sensors=_sensors,
    resources=build_resources(_settings),
    # DuckDB takes one writer per file: steps that touch the warehouse cannot overlap, and a check
    # running beside a long `features` build in another process would wait on the file lock. One
    # process, one step at a time (the heavy steps use all cores themselves; training runs in its own
    # process, launched through Dagster Pipes).
    executor=in_process_executor,
)

# a typo in BASE_MODEL (a missing directory or GGUF file) fails when the code loads, not in `base_model`
# after the data preparation (nothing is read or converted here)
resolve_base_model(_settings.base_model, _settings.data_dir)
if _settings.retrain_run_config:  # a typo in DAILY_RETRAIN_CONFIG fails when the code loads, not at 17:30
    validate_run_config(defs.resolve_job_def(daily_retrain_job.name), _settings.retrain_run_config)
