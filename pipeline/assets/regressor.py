import json
import shutil
import uuid
from dataclasses import replace
from pathlib import Path

from dagster import (
    AssetExecutionContext,
    Backoff,
    Config,
    MaterializeResult,
    MetadataValue,
    PipesClientCompletedInvocation,
    PipesSubprocessClient,
    RetryPolicy,
    asset,
)
from pydantic import Field

from modeling.backbones.embedded import pretrained_past, read_embedded_info
from modeling.backbones.files import fingerprint_matches, model_fingerprint
from modeling.data.parquet_io import snapshot_files
from modeling.job import ExperimentSpec, Outcome, TrainJob
from modeling.plan import RegressorPlan, plan_regressor_job
from pipeline.metadata import png_markdown
from pipeline.resources import TRAINING_POOL, MlflowResource, StorageResource
from pipeline.training_process import run_training_process, training_processes

REGRESSOR_CODE_VERSION = "regressor-v2"
"""Dagster code version; also part of the inputs fingerprint that decides whether to retrain, so it is
bumped whenever the training or scoring code changes what a model trained on the same inputs is (v2: the
learning-rate schedule, the losses, the trunk cache and the gate of sessions 2026-12-01 .. 12-06, which
v1's fingerprint would have reused models across)."""


class RegressorAssetConfig(Config):
    """Which profile trains the LoRA regressor, and settings that override it (None = the profile's)."""

    profile: str = Field(default="cpu", description="Training profile: cpu (the demo) or gpu (everything).")
    use_hyperparameters: bool = Field(
        default=True, description="Apply DATA_DIR/hyperparameters.json (the search's best) when it exists."
    )
    learning_rate: float | None = Field(default=None, gt=0, description="Peak LoRA learning rate.")
    max_train_samples: int | None = Field(default=None, ge=1, description="Train rows sampled (seeded).")
    max_steps: int | None = Field(default=None, ge=1, description="Optimizer steps cap.")
    time_budget_s: float | None = Field(default=None, gt=0, description="Training wall-clock cap, seconds.")
    batch_size: int | None = Field(default=None, ge=1, description="Global batch per optimizer step.")
    epochs: int | None = Field(default=None, ge=1, description="Passes over the sampled train rows.")
    lora_r: int | None = Field(default=None, ge=1, description="LoRA rank.")
    lora_alpha: float | None = Field(default=None, gt=0, description="LoRA alpha.")
    lora_last_layers: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Adapt the last N decoder layers only, at any sample size (None = the profile's: cpu 1 up "
            "to 24k sampled rows and every layer above, gpu every layer; N >= the backbone's layer count "
            "adapts every layer)."
        ),
    )
    loss: str | None = Field(
        default=None, description="mse, huber, or ic (per-date correlation; needs date_group_size)."
    )
    target_transform: str | None = Field(
        default=None, description="Training target: none, clip, cs_zscore or cs_rank (rank-gaussian)."
    )
    ic_mse_weight: float | None = Field(
        default=None,
        ge=0,
        description="Under the ic loss: weight of a weighted squared error added to it (0 = off).",
    )
    aux_feature_weight: float | None = Field(
        default=None,
        ge=0,
        description="Weight of the auxiliary feature-reconstruction loss (0 = off), at any sample size "
        "(the profile's weight can depend on it: cpu 3 up to 24k rows, 10 above).",
    )
    date_group_size: int | None = Field(
        default=None, ge=0, description="Rows of one date per batch group (needed by the ic loss; 0 = off)."
    )
    lr_reference_steps: int | None = Field(
        default=None, ge=1, description="Runs longer than this take peak lr x sqrt(reference / steps)."
    )
    ema_decay: float | None = Field(
        default=None,
        gt=0,
        lt=1,
        description="Average the trainable weights with this EMA decay (off by default).",
    )
    eval_every_steps: int | None = Field(default=None, ge=0, description="Validation RankIC every N steps.")
    eval_max_dates: int | None = Field(default=None, ge=1, description="Validation dates during training.")
    final_eval_max_dates: int | None = Field(
        default=None,
        ge=1,
        description="Validation/test dates of the final comparison (None = the profile's).",
    )
    final_test_max_dates: int | None = Field(
        default=None,
        ge=1,
        description="A tighter cap on the test dates of the final comparison (None = the profile's).",
    )
    quantization: str | None = Field(default=None, description="none, or 4bit (QLoRA, CUDA GPUs only).")
    gradient_checkpointing_layers: int | None = Field(
        default=None,
        ge=1,
        description="Recompute the first N decoder layers' activations in backward: less GPU memory for "
        "a little more compute (None = the profile's: none).",
    )
    last_layer_shortcut: bool | None = Field(
        default=None,
        description="Run the last decoder layer on the pooled token only (None = on): turn it off under "
        "FSDP, which shards the layer's submodules the shortcut calls directly.",
    )
    seed: int | None = Field(default=None, ge=0, description="Seed of sample, batches, initialisation.")
    num_processes: int | None = Field(
        default=None, ge=1, description="Training processes (None = the profile's; gpu: one per GPU)."
    )
    accelerate_config_file: str | None = Field(
        default=None, description="An accelerate config file (e.g. configs/accelerate/multi_gpu.yaml)."
    )
    force_retrain: bool = Field(
        default=False, description="Train even when a registered version was trained on identical inputs."
    )
    gate_k: float = Field(
        default=1.0,
        ge=0,
        description="Champion gate: promote only when the paired daily RankIC difference to the champion "
        "on the same validation rows exceeds gate_k standard errors ...",
    )
    gate_min_delta: float = Field(default=0.0, ge=0, description="... and this margin of RankIC.")

    def overrides(self) -> dict:
        names = (
            "learning_rate",
            "max_train_samples",
            "max_steps",
            "time_budget_s",
            "batch_size",
            "epochs",
            "lora_r",
            "lora_alpha",
            "lora_last_layers",
            "loss",
            "ic_mse_weight",
            "target_transform",
            "aux_feature_weight",
            "date_group_size",
            "lr_reference_steps",
            "ema_decay",
            "eval_every_steps",
            "eval_max_dates",
            "quantization",
            "last_layer_shortcut",
            "seed",
        )
        overrides = {name: getattr(self, name) for name in names if getattr(self, name) is not None}
        if self.gradient_checkpointing_layers is not None:
            overrides["gradient_checkpointing"] = True
            overrides["gradient_checkpointing_layers"] = self.gradient_checkpointing_layers
        return overrides


def _hyperparameters(storage: StorageResource, use: bool, profile: str, fingerprint: str, warn) -> dict:
    """The search's best params, when they were found for this profile and this base model."""
    path = storage.root / "hyperparameters.json"
    if not use or not path.is_file():
        return {}
    payload = json.loads(path.read_text())
    searched_on = str(payload.get("base_model_fingerprint") or "")
    # (a search saved before the fingerprint's "v2" scheme is matched by its own scheme)
    same_base = bool(searched_on) and (
        searched_on == fingerprint or fingerprint_matches(storage.base_model_dir, searched_on)
    )
    if payload.get("profile") != profile or not same_base:
        warn(
            f"{path} was searched for profile {payload.get('profile')!r} on another base model or profile; "
            "not applied (run the search again for this one)"
        )
        return {}
    return dict(payload["best_params"])


def _refuse_a_backbone_pretrained_past_the_train_split(storage: StorageResource, base_dir: Path, facts: dict):
    """The embedded backbone read the features of the train split's prompts: after the training set was
    rebuilt with an earlier split, some of those prompts are validation or test rows, and the judged
    scores would be partly in-sample. `base_model` rebuilds it for the split; refused until it has."""
    if storage.base_model_source.kind != "embedded":
        return
    train_end = ((facts.get("splits") or {}).get("train") or [None, None])[1]
    if train_end is not None and (past := pretrained_past(read_embedded_info(base_dir), train_end)):
        raise ValueError(
            f"the embedded backbone was pretrained on prompts up to {past}, after the training set's train "
            f"split ends ({train_end}): those dates are validation or test rows now. Materialise base_model "
            "(it rebuilds on the current split) before regressor"
        )


def reuse_existing_version(
    existing: str | None, tags: dict[str, str], own_dir: Path, force_retrain: bool
) -> tuple[Path, str | None]:
    """(the run directory, the version to resume or report) given `existing`, the newest version trained
    on the same inputs, and `own_dir`, this run's directory. A version is reused (finished if its gate is
    pending, reported if done) in the directory that trained it, unless `force_retrain` asks for a new
    one; `force_retrain` retrains past the versions of earlier runs, not past this run's own, so a retry
    of a forced run finishes the version its failed attempt registered instead of registering a copy."""
    if existing is None or (force_retrain and tags.get("run_dir") != str(own_dir)):
        return own_dir, None
    return Path(tags.get("run_dir") or own_dir), existing


def _unchanged_metadata(
    mlflow_registry, mlflow: MlflowResource, version: str, tags: dict, out: Path, inputs_sha: str
) -> dict:
    """Metadata of a run that reused a version: the stored numbers of the run that trained it."""
    metadata = {
        "retrained": MetadataValue.bool(False),
        "model_version": MetadataValue.text(version),
        "run_id": MetadataValue.text(tags.get("run_id", "")),
        "val_rank_ic": MetadataValue.float(float(tags.get("val_rank_ic", "nan"))),
        "val_rank_ic_se": MetadataValue.float(float(tags.get("val_rank_ic_se", "nan"))),
        "val_n_dates": MetadataValue.int(int(float(tags.get("val_n_dates", "0")))),
        "gate": MetadataValue.text(tags.get("gate_reason", "")),
        "champion_version": MetadataValue.text(
            str(mlflow_registry.alias_version(mlflow.registry_name, "champion"))
        ),
        "inputs_sha": MetadataValue.text(inputs_sha),
    }
    if (out / Outcome.FILE).is_file():
        outcome = Outcome.load(out)
        metadata["baselines_val_rank_ic"] = MetadataValue.json(outcome.baselines_val_rank_ic)
        metadata["test_rank_ic"] = MetadataValue.float(float(outcome.test_rank_ic))
        metadata["test_rank_ic_se"] = MetadataValue.float(float(outcome.test_rank_ic_se))
        metadata["test_n_dates"] = MetadataValue.float(float(outcome.test_n_dates))
        metadata["comparison"] = MetadataValue.md(outcome.comparison)
        metadata["paired"] = MetadataValue.json(outcome.paired)
    return metadata


def _experiment_spec(
    context: AssetExecutionContext,
    config: RegressorAssetConfig,
    storage: StorageResource,
    mlflow: MlflowResource,
    plan: RegressorPlan,
    out: Path,
    best: dict,
    resume_version: str | None,
) -> ExperimentSpec:
    """Where the trained model is logged, registered and gated, and what the run records about itself."""
    splits, prompt, facts = plan.facts["splits"], plan.job.prompt, plan.facts
    base_dir = storage.base_model_dir
    return ExperimentSpec(
        tracking_uri=mlflow.tracking_uri,
        training_set_path=str(out / "inputs" / Path(plan.job.training_set_path).name),
        experiment_name=mlflow.experiment_name,
        registry_name=mlflow.registry_name,
        artifact_root=mlflow.artifact_root,
        eval_max_dates=plan.final_eval_max_dates,
        test_max_dates=plan.final_test_max_dates,
        run_name=f"regressor-{context.run_id[:8]}",
        reports_dir=str(storage.reports_dir / "regressor"),
        params={
            "profile": plan.profile.name,
            "hyperparameters_source": "hyperparameters.json" if best else "profile",
            "hyperparameters": best,
            "buckets": facts.get("buckets"),
            "label": facts.get("label"),
            "data_splits": {k: splits[k] for k in ("train", "validation", "test")},
            "base_model": {
                "path": str(base_dir),
                "fingerprint": plan.base_model_fingerprint,
                "source": storage.base_model_source.kind,
            },
            "prompt_template_version": prompt["template_version"],
            "dagster_run_id": context.run_id,
        },
        version_tags={"inputs_sha": plan.inputs_sha, "dagster_run_id": context.run_id, "run_dir": str(out)},
        gate_tags={
            "horizon": prompt["horizon"],
            "label_kind": prompt["target"],
            "train_end": splits["train"][1],
        },
        validation_start=splits["validation"][0],
        resume_version=resume_version,
        gate_k=config.gate_k,
        gate_min_delta=config.gate_min_delta,
    )


def _launch(context, client: PipesSubprocessClient, job: TrainJob, config: RegressorAssetConfig, profile):
    """Run the training process through Pipes; a failure carries the child's own traceback."""
    processes = training_processes(config.num_processes, profile, job.train)
    return run_training_process(context, client, job, processes, config.accelerate_config_file)


def _trained_metadata(
    invocation: PipesClientCompletedInvocation, out: Path, inputs_sha: str, job_path: Path, profile_name: str
) -> dict:
    """Metadata of a run that trained: what the training process reported through Pipes, plus the
    comparison table and plots of its outcome, the inputs fingerprint, the job file and the profile."""
    result = invocation.get_materialize_result()
    outcome = Outcome.load(out)
    reported = dict(result.metadata or {})
    plots = {name: png_markdown(Path(path), name) for name, path in outcome.plots.items()}
    return {
        **reported,
        "retrained": MetadataValue.bool(True),
        "comparison": MetadataValue.md(outcome.comparison),
        **{f"plot_{name}": value for name, value in plots.items()},
        "inputs_sha": MetadataValue.text(inputs_sha),
        "job": MetadataValue.path(str(job_path)),
        "profile": MetadataValue.text(profile_name),
    }


@asset(
    pool=TRAINING_POOL,
    group_name="training",
    kinds={"pytorch", "mlflow"},
    deps=["prompt_corpus", "base_model", "training_set", "hyperparameters"],
    code_version=REGRESSOR_CODE_VERSION,
    retry_policy=RetryPolicy(max_retries=2, delay=5, backoff=Backoff.LINEAR),
)
def regressor(
    context: AssetExecutionContext,
    config: RegressorAssetConfig,
    storage: StorageResource,
    mlflow: MlflowResource,
    pipes_subprocess_client: PipesSubprocessClient,
) -> MaterializeResult:
    """The LoRA-finetuned LLM regressor: the frozen `base_model` with LoRA adapters and an MLP head on the
    last token, trained on the bucket-weighted `prompt_corpus`, judged against ridge, LightGBM, the same
    head on the raw features and the zero predictor, logged to MLflow and registered as a new version of
    `return-regressor` (alias `challenger`; `champion` only if it beats the champion on validation RankIC).

    Training runs as its own process (`accelerate launch -m modeling.run_job`) through Dagster Pipes; the
    weights never pass through the orchestrator. A version trained on identical inputs is not trained again.
    """
    base_dir = storage.base_model_dir
    fingerprint = model_fingerprint(base_dir)
    best = _hyperparameters(
        storage, config.use_hyperparameters, config.profile, fingerprint, context.log.warning
    )
    # the run reads a snapshot of its inputs (hard links), never what another run writes meanwhile
    runs_root = storage.root / "runs" / "regressor"
    staging = runs_root / f".staging-{context.run_id}-{uuid.uuid4().hex[:8]}"
    staged = snapshot_files(
        {name: storage.parquet_path(name) for name in ("prompt_corpus", "training_set")}, staging
    )
    try:
        plan = plan_regressor_job(
            config.profile,
            config.overrides(),
            best,
            staged["prompt_corpus"],
            staged["training_set"],
            base_dir,
            fingerprint,
            mlflow.registry_name,
            REGRESSOR_CODE_VERSION,
            config.final_eval_max_dates,
            config.final_test_max_dates,
        )
        _refuse_a_backbone_pretrained_past_the_train_split(storage, base_dir, plan.facts)
        inputs_sha = plan.inputs_sha
        from modeling import mlflow_registry

        mlflow_registry.configure(mlflow.tracking_uri, mlflow.experiment_name, mlflow.artifact_root)
        existing = mlflow_registry.find_version(mlflow.registry_name, "inputs_sha", inputs_sha)
        tags = mlflow_registry.version_tags(mlflow.registry_name, existing) if existing else {}
        # A directory per (inputs, run): a retry or a re-execution of this run (same root run) resumes from
        # its own checkpoints; another run never shares, or deletes, them. A version registered before its
        # run failed is finished in the directory that trained it.
        out, resume_version = reuse_existing_version(
            existing, tags, runs_root / inputs_sha / (context.run.root_run_id or context.run_id),
            config.force_retrain,
        )  # fmt: skip
        if resume_version is not None and tags.get("gate") == "done":
            context.log.info(
                f"version {existing} was trained on identical inputs ({inputs_sha}); not retrained"
            )
            return MaterializeResult(
                metadata=_unchanged_metadata(mlflow_registry, mlflow, existing, tags, out, inputs_sha)
            )
        out.mkdir(parents=True, exist_ok=True)
        if not (out / "inputs").exists():  # same inputs_sha, same bytes: an existing snapshot is kept
            staging.rename(out / "inputs")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    corpus, training_set = (out / "inputs" / staged[name].name for name in ("prompt_corpus", "training_set"))
    job = replace(
        plan.job,
        corpus_path=str(corpus),
        training_set_path=str(training_set),
        output_dir=str(out),
        experiment=_experiment_spec(context, config, storage, mlflow, plan, out, best, resume_version),
    )
    invocation, job_path = _launch(context, pipes_subprocess_client, job, config, plan.profile)
    return MaterializeResult(
        metadata=_trained_metadata(invocation, out, inputs_sha, job_path, plan.profile.name)
    )
