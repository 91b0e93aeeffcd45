"""The one Definitions object: assets, checks, jobs, schedules and resources (configured here)."""

from __future__ import annotations

from dagster import AssetSelection, Definitions, define_asset_job, in_process_executor

from pipeline.assets import ALL_ASSETS
from pipeline.checks import ALL_CHECKS
from pipeline.resources import build_resources
from pipeline.settings import Settings

full_pipeline_job = define_asset_job(
    "full_pipeline",
    selection=AssetSelection.all(),
    description="Materialise the whole chain, from raw market data to the last asset.",
)

defs = Definitions(
    assets=ALL_ASSETS,
    asset_checks=ALL_CHECKS,
    jobs=[full_pipeline_job],
    resources=build_resources(Settings.from_env()),
    # DuckDB takes one writer per file: steps that touch the warehouse cannot overlap, and a check
    # running beside a long `features` build in another process would wait on the file lock. One
    # process, one step at a time (the heavy steps use all cores themselves).
    executor=in_process_executor,
)
