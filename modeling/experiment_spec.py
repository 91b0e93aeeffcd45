"""`TrainJob.experiment` as data: where a training run's result is logged and how it is judged (torch-free,
like `modeling.job`, which re-exports it)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, fields
from typing import Any


def check_numbers(config: Any) -> None:
    """Every field annotated float a finite real number, every one annotated int an integer (None where
    the annotation allows it): a JSON 8.0, a bool, a string, NaN or inf is refused when the config is
    built, not when it is used (or silently truncated) an hour into a run."""
    for f in fields(config):
        value, kind = getattr(config, f.name), str(f.type)
        number = isinstance(value, numbers.Real) and not isinstance(value, bool)
        if value is None and kind.endswith("| None"):
            continue
        if kind.startswith("float") and not (number and math.isfinite(value)):
            raise ValueError(f"{type(config).__name__}.{f.name} must be a finite number, got {value!r}")
        if kind.startswith("int") and not (number and isinstance(value, numbers.Integral)):
            raise ValueError(f"{type(config).__name__}.{f.name} must be an integer, got {value!r}")


@dataclass
class ExperimentSpec:
    """`TrainJob.experiment`: where to log and what to judge on."""

    tracking_uri: str
    training_set_path: str
    experiment_name: str = "return-regressor"
    registry_name: str | None = "return-regressor"
    """None: log the run and the model, register nothing (search trials)."""
    artifact_root: str | None = None
    eval_max_dates: int | None = 40
    """Validation and test dates scored at the end (evenly spaced; None = all)."""
    test_max_dates: int | None = None
    """A further cap on the test dates only (the smaller of the two applies; None = `eval_max_dates`): the
    gate decides on validation, test is only reported, so the demo buys its time there."""
    baselines: bool = True
    run_name: str = "regressor"
    params: dict[str, Any] = field(default_factory=dict)
    """Extra params to log: bucket scheme, data ranges, base model identity, hyperparameter source."""
    version_tags: dict[str, Any] = field(default_factory=dict)
    """Extra tags on the registered version (e.g. the inputs fingerprint)."""
    reports_dir: str | None = None
    parent_run_id: str | None = None
    promote: bool = True
    """Run the champion gate (False: register as challenger only)."""
    gate_k: float = 1.0
    """The gate promotes when the paired RankIC difference exceeds gate_k standard errors ..."""
    gate_min_delta: float = 0.0
    """... and this margin."""
    resume_version: str | None = None
    """A version this job already registered before its run failed (before the gate): it is verified
    and gated instead of registering another copy."""
    gate_tags: dict[str, Any] = field(default_factory=dict)
    """What makes validation scores comparable across versions (horizon, label kind, train end)."""
    validation_start: str | None = None
    """First validation date: a champion trained on or after it is not compared on its in-sample score."""

    def __post_init__(self) -> None:
        check_numbers(self)
