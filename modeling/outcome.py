"""What a training process reports back: `Outcome` (`outcome.json` beside the model), typed for the
`regressor` asset and its checks. Torch-free, like `modeling.job`, which re-exports it."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from modeling.atomic_files import write_text_atomic


@dataclass(frozen=True)
class Outcome:
    """What an experiment job reports (`outcome.json` beside the model; also the asset's metadata)."""

    run_id: str
    """The MLflow run."""
    model_uri: str
    model_version: str | None
    """The registered version (None when the job registers nothing)."""
    promoted: bool
    """Whether the champion gate moved `champion` to this version."""
    gate: str
    """The gate's reason: Δ, SE, t and the bar, or why there was no comparison."""
    val_rank_ic: float
    val_rank_ic_se: float = float("nan")
    val_n_dates: int = 0
    test_rank_ic: float = float("nan")
    test_rank_ic_se: float = float("nan")
    test_n_dates: int = 0
    val_rank_icir: float = float("nan")
    test_rank_icir: float = float("nan")
    baselines_val_rank_ic: dict[str, float] = field(default_factory=dict)
    comparison: str = ""
    """The headline table (markdown): every model with RankIC ± SE and the paired Δ to the regressor."""
    paired: dict[str, Any] = field(default_factory=dict)
    """paired[baseline][split]: the regressor minus the baseline, daily RankIC (delta, se, t, n_dates)."""
    gate_stats: dict[str, Any] = field(default_factory=dict)
    plots: dict[str, str] = field(default_factory=dict)
    """Plot name -> PNG path."""
    train: dict[str, Any] = field(default_factory=dict)
    """The training report (steps, throughput, stop reason)."""
    eval_history: list[dict[str, Any]] = field(default_factory=list)
    experiment_s: float = float("nan")
    score_rows_per_s: float = float("nan")
    baseline_fit_s: dict[str, float] = field(default_factory=dict)

    FILE = "outcome.json"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write `outcome.json` atomically (a temporary file, fsynced, then renamed): a run that finds it
        reads it back instead of training again, so a torn file must never be what it finds."""
        path = Path(directory) / self.FILE
        write_text_atomic(path, json.dumps(self.to_dict(), indent=1, default=str) + "\n")
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> Outcome:
        """Read `outcome.json` from a run directory (fields an older file lacks take their defaults)."""
        data = json.loads((Path(directory) / cls.FILE).read_text())
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown outcome keys {sorted(unknown)} in {directory}")
        return cls(**data)
