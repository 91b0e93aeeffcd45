"""Settings: every environment variable the project reads, read here and nowhere else.

Names and defaults are fixed by the interface contract (see README): `DATA_DIR`,
`MARKET_DATA_PATH`, `BASE_MODEL`, `MLFLOW_TRACKING_URI` (`DAGSTER_HOME` is Dagster's own); this project
adds `DAILY_RETRAIN_CRON` and `DAILY_RETRAIN_TIMEZONE` for the daily retrain schedule, and
`DECAY_RETRAIN_COOLDOWN_HOURS` for the sensor that retrains when the champion's realised RankIC decays,
and `DAILY_RETRAIN_CONFIG`, the run config of every automated run.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    """Root of `warehouse.duckdb`, the Parquet outputs, model directories and the MLflow store."""
    market_data_path: Path | None
    """A CSV/Parquet file or a directory of them; None = the built-in synthetic market."""
    base_model: str | None
    """A local Hugging Face model directory or GGUF file (absolute), or `smollm2-135m-instruct`;
    None = the embedded tiny Llama built and pretrained locally."""
    mlflow_tracking_uri: str
    """MLflow tracking store (SQLite under DATA_DIR unless overridden)."""
    retrain_cron: str = "30 17 * * 1-5"
    """DAILY_RETRAIN_CRON: when the daily retrain runs (default weekdays 17:30, after the US close)."""
    retrain_timezone: str = "America/New_York"
    """DAILY_RETRAIN_TIMEZONE: the time zone of that schedule."""
    decay_retrain_cooldown_hours: float = 24.0
    """DECAY_RETRAIN_COOLDOWN_HOURS: `retrain_on_decay` requests at most one forced retrain per this many
    hours, however often `champion_still_works` fails."""

    retrain_run_config: dict[str, Any] = field(default_factory=dict)
    """DAILY_RETRAIN_CONFIG: a YAML or JSON file with the run config of every automated run (the daily
    schedule, the new-file sensor and the decay sensor, which adds `force_retrain`), e.g. the `gpu`
    profile or another horizon; unset = every asset's defaults, the `cpu` profile."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env

        def value(name: str) -> str | None:  # unset, empty and whitespace-only all mean "not set"
            return (env.get(name) or "").strip() or None

        data_dir = Path(value("DATA_DIR") or "./data").expanduser().resolve()
        market = value("MARKET_DATA_PATH")
        base_model = value("BASE_MODEL")
        tracking = value("MLFLOW_TRACKING_URI") or f"sqlite:///{data_dir / 'mlflow.db'}"
        return cls(
            data_dir=data_dir,
            market_data_path=Path(market).expanduser().resolve() if market else None,
            base_model=_base_model_value(base_model),
            mlflow_tracking_uri=tracking,
            retrain_cron=value("DAILY_RETRAIN_CRON") or cls.retrain_cron,
            retrain_timezone=value("DAILY_RETRAIN_TIMEZONE") or cls.retrain_timezone,
            decay_retrain_cooldown_hours=_hours(
                "DECAY_RETRAIN_COOLDOWN_HOURS",
                value("DECAY_RETRAIN_COOLDOWN_HOURS"),
                cls.decay_retrain_cooldown_hours,
            ),
            retrain_run_config=_run_config_file(value("DAILY_RETRAIN_CONFIG")),
        )

    @property
    def mlflow_artifacts_dir(self) -> Path:
        """Artifact root of the MLflow experiments this pipeline creates."""
        return self.data_dir / "mlartifacts"

    @property
    def warehouse_path(self) -> Path:
        return self.data_dir / "warehouse.duckdb"


def _base_model_value(value: str | None) -> str | None:
    """A path made absolute (so it means the same from any working directory), its symbolic links kept (a
    `model.gguf` link to a store's `sha256-...` blob is a GGUF file by its name); a model name as given."""
    if value is None:
        return None
    from modeling.backbones import SMOLLM2_NAME

    if value.lower() == SMOLLM2_NAME:
        return SMOLLM2_NAME
    return str(Path(value).expanduser().absolute())


def _hours(name: str, value: str | None, default: float) -> float:
    if value is None:
        return default
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"{name} must be a number of hours, got {value!r}") from None
    if not number >= 0:
        raise ValueError(f"{name} must be >= 0 hours, got {value!r}")
    return number


def _run_config_file(value: str | None) -> dict[str, Any]:
    """The run config in the file DAILY_RETRAIN_CONFIG names (YAML, of which JSON is a subset), read as
    `dagster job execute -c` reads it (Dagster's loader: an unquoted date stays a string), so one file
    serves both."""
    if value is None:
        return {}
    import yaml
    from dagster_shared.yaml_utils import load_yaml_from_path

    path = Path(value).expanduser().resolve()
    if not path.is_file():
        raise ValueError(f"DAILY_RETRAIN_CONFIG names {path}, which is not a file")
    try:
        config = load_yaml_from_path(str(path))
    except yaml.YAMLError as error:
        raise ValueError(f"DAILY_RETRAIN_CONFIG {path} is not valid YAML or JSON: {error}") from None
    if not isinstance(config, dict):
        raise ValueError(
            f"DAILY_RETRAIN_CONFIG {path} must hold a run config mapping (e.g. ops: {{regressor: {{config: "
            f"{{profile: gpu}}}}}}), got {type(config).__name__}"
        )
    return config
