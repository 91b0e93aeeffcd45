"""Planning a regressor training run, torch-free: the profile with the search's params and the user's
overrides applied, the prompt settings and data facts of the input snapshot, and the inputs fingerprint
that decides whether a registered version was already trained on exactly these inputs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modeling.backbones.files import build_key, file_sha256
from modeling.data.parquet_io import read_parquet_metadata
from modeling.job import TrainJob
from modeling.profiles import PROFILES, SIZED_OVERRIDES, Profile, apply_overrides
from modeling.prompt import PromptBuilder


@dataclass(frozen=True)
class RegressorPlan:
    job: TrainJob
    """The job without its output directory and experiment (the orchestrator adds both)."""
    inputs_sha: str
    """Hash of the code version, the corpus and training-set bytes, the base model and the job config."""
    profile: Profile
    final_eval_max_dates: int | None
    final_test_max_dates: int | None
    base_model_fingerprint: str = ""
    facts: dict[str, Any] = field(default_factory=dict)
    """The training set's splits, buckets and label (its Parquet metadata)."""


def _reweight(bucket_config: dict[str, Any], weight_scheme: str | None) -> dict[str, Any] | None:
    """The bucket config to re-weight with when the search found another scheme better (weight mode)."""
    if (
        weight_scheme
        and weight_scheme != bucket_config.get("scheme")
        and bucket_config.get("mode") == "weight"
    ):
        return {**bucket_config, "scheme": weight_scheme}
    return None


def plan_regressor_job(
    profile_name: str,
    overrides: dict[str, Any],
    best_params: dict[str, Any],
    corpus: Path,
    training_set: Path,
    base_model_dir: str | Path,
    base_model_fingerprint: str,
    registry_name: str,
    code_version: str,
    final_eval_max_dates: int | None = None,
    final_test_max_dates: int | None = None,
) -> RegressorPlan:
    """The training job for these inputs (a snapshot of the corpus and training set) and its fingerprint.

    `best_params` (the search's) apply first, then `overrides`; a `weight_scheme` among them re-weights
    the train rows. The search's pinned size-dependent settings (`SIZED_OVERRIDES`) hold at its sample
    size only: an override of `max_train_samples` leaves them to the profile's rules at the new size.
    Refuses a training set whose features another version of the definitions computed."""
    profile = PROFILES.get(profile_name)
    if profile is None:
        raise ValueError(f"unknown profile {profile_name!r}; choose one of {sorted(PROFILES)}")
    best = dict(best_params)
    weight_scheme = best.pop("weight_scheme", None)
    if "max_train_samples" in overrides:  # another size than the search's: the profile sizes these for it
        for name in SIZED_OVERRIDES:
            best.pop(name, None)
    regressor_cfg, train_cfg = apply_overrides(profile.regressor, profile.train, {**best, **overrides})
    corpus_facts, set_facts = read_parquet_metadata(corpus), read_parquet_metadata(training_set)
    reweight = _reweight((set_facts.get("buckets") or {}).get("config") or {}, weight_scheme)
    prompt = PromptBuilder.of_corpus(corpus_facts).settings()
    data_sha = set_facts.get("feature_registry_sha")
    if data_sha != prompt["feature_registry_sha"]:
        raise ValueError(
            f"the training set's features were computed by definitions {data_sha}, but this code "
            f"defines {prompt['feature_registry_sha']}: materialise features, training_set and "
            "prompt_corpus again before training"
        )
    final_dates = final_eval_max_dates or profile.final_eval_max_dates
    test_dates = final_test_max_dates or profile.final_test_max_dates
    job = TrainJob(
        base_model_dir=str(base_model_dir),
        corpus_path=str(corpus),
        output_dir="",
        prompt=prompt,
        regressor=regressor_cfg,
        train=train_cfg,
        resume=True,
        reweight=reweight,
        training_set_path=str(training_set),
    )
    job_config = {
        # what the job trains: the regressor as the sample's size resolves it (`RegressorConfig.sized_for`)
        "regressor": job.to_dict()["regressor"],
        "train": job.to_dict()["train"],
        "prompt": prompt,
        "final_eval_max_dates": final_dates,
        "final_test_max_dates": test_dates,
        "registry": registry_name,
        "reweight": reweight,
    }
    inputs_sha = build_key(
        {
            "code_version": code_version,
            "corpus": file_sha256(corpus),
            "training_set": file_sha256(training_set),
            "base_model": base_model_fingerprint,
            "job": job_config,
        }
    )
    facts = {k: set_facts.get(k) for k in ("splits", "buckets", "label")}
    return RegressorPlan(job, inputs_sha, profile, final_dates, test_dates, base_model_fingerprint, facts)
