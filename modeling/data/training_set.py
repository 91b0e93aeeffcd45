"""The training set: purged time splits, the label transform and bucket re-balancing.

Reading order: `SplitSpec` / `assign_splits` (which dates go where), `LabelSpec` /
`transform_labels` (what the model regresses on), `build_training_set` (both, plus the buckets of
`modeling.buckets`, re-balanced by `modeling.rebalancing`). Pure pandas/numpy: the Dagster asset only
reads `features` and writes Parquet.

Leakage rules enforced here:
- splits are by date; between consecutive segments the last `purge` dates of the earlier segment
  are dropped (purge = the label horizon h by default), so no train label window (t, t+h] reaches a
  validation or test date, and no validation label window reaches a test date;
- every statistic that is not per date (the label scale, the bucket edges and weights) is fit on the
  train rows only; validation and test keep their natural distribution and weight 1.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from modeling.buckets import BucketConfig, BucketModel
from modeling.feature_registry import FEATURE_NAMES
from modeling.prompt import MIN_PERCENTILE_NAMES, PERCENTILE_SUFFIX, cross_section_percentiles
from modeling.rebalancing import Rebalanced, rebalance

SPLITS = ("train", "validation", "test", "live")
LABEL_KINDS = ("raw", "excess", "cs_zscore")


# --- splits --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SplitSpec:
    validation_fraction: float = 0.15
    """Share of the labelled dates (before the test dates) used for validation."""
    test_fraction: float = 0.20
    """Share of the labelled dates, the most recent ones, used for test."""
    validation_start: str | None = None
    """Explicit first validation date (ISO); with `test_start` it overrides the fractions."""
    test_start: str | None = None
    """Explicit first test date (ISO)."""
    purge_days: int | None = None
    """Trading dates dropped at the end of train and of validation; None = the label horizon h (never
    less)."""

    def __post_init__(self) -> None:
        explicit = (self.validation_start is None, self.test_start is None)
        if explicit[0] != explicit[1]:
            raise ValueError("give both validation_start and test_start, or neither")
        if self.validation_start is not None:
            if pd.Timestamp(self.validation_start) >= pd.Timestamp(self.test_start):
                raise ValueError(
                    f"validation_start {self.validation_start} must precede test_start {self.test_start}"
                )
        elif not (
            0 < self.validation_fraction < 1
            and 0 < self.test_fraction < 1
            and self.validation_fraction + self.test_fraction < 1
        ):
            raise ValueError(
                "validation_fraction and test_fraction must be in (0, 1) and sum to < 1, got "
                f"{self.validation_fraction} and {self.test_fraction}"
            )
        if self.purge_days is not None and self.purge_days < 0:
            raise ValueError(f"purge_days must be >= 0, got {self.purge_days}")


@dataclass(frozen=True)
class SplitPlan:
    """Date boundaries (inclusive) of each segment, and what was purged."""

    train: tuple[pd.Timestamp, pd.Timestamp]
    validation: tuple[pd.Timestamp, pd.Timestamp]
    test: tuple[pd.Timestamp, pd.Timestamp]
    purge_days: int
    purged_dates: tuple[pd.Timestamp, ...]

    def to_dict(self) -> dict:
        def fmt(seg: tuple[pd.Timestamp, pd.Timestamp]) -> list[str]:
            return [seg[0].strftime("%Y-%m-%d"), seg[1].strftime("%Y-%m-%d")]

        return {
            "train": fmt(self.train),
            "validation": fmt(self.validation),
            "test": fmt(self.test),
            "purge_days": self.purge_days,
            "purged_dates": [d.strftime("%Y-%m-%d") for d in self.purged_dates],
        }


def plan_splits(labelled_dates: pd.DatetimeIndex, spec: SplitSpec, horizon: int) -> SplitPlan:
    """Cut the sorted labelled dates into train | purge | validation | purge | test."""
    dates = pd.DatetimeIndex(sorted(set(labelled_dates)))
    n = len(dates)
    purge = horizon if spec.purge_days is None else spec.purge_days
    if purge < horizon:
        # the label of the last train date would read closes inside validation (look-ahead)
        raise ValueError(
            f"purge_days={purge} is shorter than the label horizon h={horizon}: the last train "
            f"labels would overlap validation; use purge_days >= {horizon} (or None = h)"
        )
    if spec.validation_start is not None:
        v0 = int(dates.searchsorted(pd.Timestamp(spec.validation_start)))
        t0 = int(dates.searchsorted(pd.Timestamp(spec.test_start)))
    else:
        n_test = max(1, int(round(spec.test_fraction * n)))
        n_val = max(1, int(round(spec.validation_fraction * n)))
        t0, v0 = n - n_test, n - n_test - n_val
    train_end, val_end = v0 - purge, t0 - purge  # exclusive ends after purging
    if train_end < 1 or val_end <= v0 or t0 >= n:
        raise ValueError(
            f"{n} labelled dates cannot hold non-empty train, validation and test segments with a purge of "
            f"{purge} days (validation starts at index {v0}, test at {t0}); use more data or other boundaries"
        )
    purged = tuple(dates[train_end:v0]) + tuple(dates[val_end:t0])
    return SplitPlan(
        train=(dates[0], dates[train_end - 1]),
        validation=(dates[v0], dates[val_end - 1]),
        test=(dates[t0], dates[n - 1]),
        purge_days=purge,
        purged_dates=purged,
    )


def assign_splits(dates: pd.Series, has_label: pd.Series, plan: SplitPlan) -> pd.Series:
    """Per row: train / validation / test / live, or NA for purged and unlabelled-but-past rows."""
    out = pd.Series(pd.NA, index=dates.index, dtype="string")
    for name in ("train", "validation", "test"):
        lo, hi = getattr(plan, name)
        out[has_label & (dates >= lo) & (dates <= hi)] = name
    # Live: the future is unknown because the dates are after the last labelled date.
    out[~has_label & (dates > plan.test[1])] = "live"
    return out


# --- labels --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LabelSpec:
    kind: str = "excess"
    """raw: fwd_ret; excess: fwd_ret minus the date's cross-sectional mean; cs_zscore: z-scored per date."""
    scale_to_unit_std: bool = True
    """Divide by the train standard deviation of the transformed label (fit on train only), so the
    regression head works at unit scale whatever the kind and horizon."""

    def __post_init__(self) -> None:
        if self.kind not in LABEL_KINDS:
            raise ValueError(f"label kind must be one of {LABEL_KINDS}, got {self.kind!r}")


def transform_labels(frame: pd.DataFrame, spec: LabelSpec) -> pd.Series:
    """The per-date part of the transform (no global statistics: those are fit on train later)."""
    if spec.kind == "raw":
        return frame["fwd_ret"].astype(float)
    if spec.kind == "excess":
        return frame["fwd_ret_excess"].astype(float)
    by_date = frame.groupby("date")["fwd_ret"]
    std = by_date.transform(lambda s: s.std(ddof=0))
    z = (frame["fwd_ret"] - by_date.transform("mean")) / std
    return z.where(std > 0, 0.0).where(frame["fwd_ret"].notna())


# --- prompt percentiles ---------------------------------------------------------------------------------
def with_universe_percentiles(frame: pd.DataFrame) -> pd.DataFrame:
    """`frame` (whole dates of the features table) with `<feature>_pct`: each feature's percentile among
    the date's whole universe, for percentile prompts (`modeling.prompt`). Ranked here, before unlabelled
    rows leave the set: a name that stops trading at t+h is still part of t's cross-section, as it is at
    serving time; ranking the rows that kept a label would rank among the survivors to t+h (look-ahead).
    Missing (<NA>) on a date of fewer than `MIN_PERCENTILE_NAMES` names and for a missing value."""
    names = [n for n in FEATURE_NAMES if n in frame]
    if len(names) < len(FEATURE_NAMES) or frame.empty:
        return frame
    pct = cross_section_percentiles(frame, names)
    thin = (frame.groupby("date")["date"].transform("size") < MIN_PERCENTILE_NAMES).to_numpy()
    pct[thin] = np.nan
    return frame.assign(
        **{n + PERCENTILE_SUFFIX: pd.array(pct[:, j], dtype="Int8") for j, n in enumerate(names)}
    )


# --- assembly ------------------------------------------------------------------------------------------
@dataclass
class TrainingSetReport:
    plan: SplitPlan
    label_spec: LabelSpec
    label_scale: float
    bucket_model: BucketModel
    rebalanced: Rebalanced
    rows_by_split: dict[str, int]
    dropped: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "splits": self.plan.to_dict(),
            "label": {**asdict(self.label_spec), "train_scale": self.label_scale},
            "buckets": self.bucket_model.to_dict(),
            "rows_by_split": self.rows_by_split,
            "dropped": self.dropped,
        }


def build_training_set(
    features: pd.DataFrame,
    horizon: int,
    split_spec: SplitSpec = SplitSpec(),
    label_spec: LabelSpec = LabelSpec(),
    bucket_cfg: BucketConfig = BucketConfig(),
) -> tuple[pd.DataFrame, TrainingSetReport]:
    """Features rows -> rows with `split`, `label`, `weight`, `bucket` (train possibly resampled).

    Rows that are dropped are counted in the report, never lost silently: `purged` (inside a purge
    gap) and `unlabelled` (no clean forward return before the live dates: a delisting or a gap).
    """
    frame = features.copy()
    frame["date"] = pd.to_datetime(frame["date"])
    frame = with_universe_percentiles(frame)
    has_label = frame["fwd_ret"].notna()
    if not has_label.any():
        raise ValueError("no labelled rows: the features table holds no forward returns yet")
    plan = plan_splits(pd.DatetimeIndex(frame.loc[has_label, "date"]), split_spec, horizon)
    frame["split"] = assign_splits(frame["date"], has_label, plan)
    purged_mask = frame["date"].isin(plan.purged_dates) & has_label
    dropped = {
        "purged": int(purged_mask.sum()),
        "unlabelled": int((frame["split"].isna() & ~purged_mask).sum()),
    }
    frame = frame[frame["split"].notna()].copy()

    label = transform_labels(frame, label_spec)
    is_train = (frame["split"] == "train").to_numpy()
    scale = float(label[is_train].std(ddof=0)) if label_spec.scale_to_unit_std else 1.0
    if not np.isfinite(scale) or scale <= 0:
        raise ValueError(f"train labels have no spread (std {scale}); cannot scale them")
    frame["label"] = label / scale

    model, rebalanced = rebalance(frame.loc[is_train, "label"].to_numpy(), bucket_cfg)
    train = frame[is_train].iloc[rebalanced.indices].copy()
    train["weight"] = rebalanced.weights
    train["bucket"] = rebalanced.buckets
    rest = frame[~is_train].copy()
    rest["weight"] = 1.0
    labelled_rest = rest["label"].notna().to_numpy()
    rest["bucket"] = pd.Series(pd.NA, index=rest.index, dtype="string")
    rest.loc[labelled_rest, "bucket"] = model.assign(rest.loc[labelled_rest, "label"].to_numpy())
    out = pd.concat([train, rest], ignore_index=True)
    out["split"] = pd.Categorical(out["split"], categories=list(SPLITS))
    out = out.sort_values(["split", "date", "symbol"], kind="stable").reset_index(drop=True)
    out["split"] = out["split"].astype(str)
    out["bucket"] = out["bucket"].astype("string")
    report = TrainingSetReport(
        plan=plan,
        label_spec=label_spec,
        label_scale=scale,
        bucket_model=model,
        rebalanced=rebalanced,
        rows_by_split={s: int((out["split"] == s).sum()) for s in SPLITS},
        dropped=dropped,
    )
    return out, report
