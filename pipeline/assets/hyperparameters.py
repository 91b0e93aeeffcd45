import json
import time
from dataclasses import replace
from pathlib import Path

from dagster import AssetExecutionContext, Config, MaterializeResult, MetadataValue, asset
from pydantic import Field

from modeling.atomic_files import write_text_atomic
from modeling.backbones.common import model_fingerprint
from modeling.data.parquet_io import read_parquet_metadata, snapshot_files
from modeling.profiles import PROFILES
from modeling.prompt import PromptBuilder
from modeling.search import OBJECTIVE_DATES, SearchResult, SearchSpace, run_search, study_key
from modeling.train import TrainJob
from pipeline.metadata import frame_markdown, png_markdown
from pipeline.resources import TRAINING_POOL, MlflowResource, StorageResource

HYPERPARAMETERS_CODE_VERSION = "search-v1"
_S = SearchSpace()


class HyperparametersConfig(Config):
    """Budget and space of the search (on demand; the daily job does not run it)."""

    n_trials: int = Field(
        default=8, ge=1, description="New trials this run (the stored study keeps earlier ones)."
    )
    timeout_s: float | None = Field(
        default=3600.0, gt=0, description="Stop starting trials after this many seconds."
    )
    profile: str = Field(default="cpu", description="Profile the trials start from (cpu or gpu).")
    study_name: str = Field(
        default="regressor-search",
        description="Optuna study (stored in DATA_DIR/optuna.db; a search space other than the default "
        "keeps its own study, this name with a suffix of the space).",
    )
    seed: int = Field(default=0, ge=0, description="Seed of the TPE sampler.")
    steps: list[int] = Field(default=list(_S.steps), description="Optimizer-step budgets a trial may take.")
    batch_sizes: list[int] = Field(default=list(_S.batch_size), description="Batch sizes a trial may take.")
    losses: list[str] = Field(
        default=list(_S.loss),
        description="Losses a trial may take (mse, huber, ic; an ic trial needs batch sizes that are "
        f"multiples of its date groups of {_S.date_group_size}).",
    )
    eval_every_steps: int = Field(
        default=125, ge=1, description="Validation RankIC (and pruning) every N steps."
    )
    eval_max_dates: int = Field(
        default=10, ge=1, description="Validation dates of each periodic evaluation (pruning only)."
    )
    objective_dates: int | None = Field(
        default=OBJECTIVE_DATES,
        ge=2,
        description="Validation dates each trial is judged on at its end (None = all, the default: a "
        "standard error near 0.005 on the default market; 100 dates give about 0.007). The best trial is "
        "re-scored on every validation date.",
    )


def _search_template(
    context: AssetExecutionContext, config: HyperparametersConfig, storage: StorageResource
) -> tuple[TrainJob, Path, dict | None]:
    """(the job every trial starts from, the directory of this run's trials, the training set's bucket
    config): the profile's settings with the search's periodic evaluation, no checkpoints, no time budget
    and no early stopping (pruning stops trials)."""
    profile = PROFILES[config.profile]
    # trial directories of this run only (a re-execution of the run continues in them), and the run's own
    # snapshot of the corpus and training set: every trial trains and is judged on the files the search
    # started with, whatever the daily job writes meanwhile
    out = storage.root / "runs" / "search" / (context.run.root_run_id or context.run_id)
    inputs = snapshot_files(
        {name: storage.parquet_path(name) for name in ("prompt_corpus", "training_set")}, out / "inputs"
    )
    corpus = inputs["prompt_corpus"]
    corpus_facts = read_parquet_metadata(corpus)
    set_facts = read_parquet_metadata(inputs["training_set"])
    prompt = PromptBuilder.of_corpus(corpus_facts).settings()
    train = replace(
        profile.train,
        eval_every_steps=config.eval_every_steps,
        eval_max_dates=config.eval_max_dates,
        checkpoint_every_steps=0,
        time_budget_s=None,
        early_stopping_patience=None,
        progress=False,
    )
    template = TrainJob(
        str(storage.base_model_dir),
        str(corpus),
        str(out),
        prompt,
        profile.regressor,
        train,
        training_set_path=str(inputs["training_set"]),
    )
    bucket_config = (set_facts.get("buckets") or {}).get("config")
    return template, out, bucket_config


def _write_best(
    storage: StorageResource,
    config: HyperparametersConfig,
    result: SearchResult,
    parent: str,
    fingerprint: str,
    study: str,
) -> Path:
    """DATA_DIR/hyperparameters.json (written atomically): the best trial's parameters and scores, with the
    study, profile and base model they hold for."""
    full = result.best_full
    path = storage.root / "hyperparameters.json"
    payload = {
        "best_params": result.best_params,
        "best_val_rank_ic": full.mean,
        "best_val_rank_ic_se": full.se,
        "best_val_n_dates": full.n_dates,
        "best_trial": result.best_trial,
        "best_trial_objective": result.best_value,
        "objective_dates": config.objective_dates,
        "study": study,
        "profile": config.profile,
        "base_model_fingerprint": fingerprint,
        "n_trials_in_study": len(result.trials),
        "mlflow_run_id": parent,
        "updated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return write_text_atomic(path, json.dumps(payload, indent=2, default=str) + "\n")


def _search_metadata(result: SearchResult, path: Path, parent: str) -> dict:
    """The asset's metadata: the best trial's scores and parameters, the trials table and the history plot."""
    full = result.best_full
    trials = result.trials.rename(columns=lambda c: c.removeprefix("params_"))
    if "duration" in trials:
        trials["duration"] = trials["duration"].dt.total_seconds().round(1)
    metadata = {
        "path": MetadataValue.path(str(path)),
        "best_val_rank_ic": MetadataValue.float(full.mean),
        "best_val_rank_ic_se": MetadataValue.float(full.se),
        "best_val_n_dates": MetadataValue.int(full.n_dates),
        "best_trial": MetadataValue.int(result.best_trial),
        "best_trial_objective": MetadataValue.float(result.best_value),
        "best_params": MetadataValue.json(result.best_params),
        "trials": MetadataValue.md(frame_markdown(trials)),
        "n_new_trials": MetadataValue.int(result.n_new_trials),
        "n_trials_in_study": MetadataValue.int(len(result.trials)),
        "search_wall_s": MetadataValue.float(round(result.wall_s, 1)),
        "mlflow_run_id": MetadataValue.text(parent),
    }
    if result.history_png:
        metadata["optimisation_history"] = png_markdown(result.history_png, "optimisation history")
    return metadata


@asset(
    pool=TRAINING_POOL,
    group_name="training",
    kinds={"optuna", "mlflow"},
    deps=["prompt_corpus", "base_model", "training_set"],
    code_version=HYPERPARAMETERS_CODE_VERSION,
)
def hyperparameters(
    context: AssetExecutionContext,
    config: HyperparametersConfig,
    storage: StorageResource,
    mlflow: MlflowResource,
) -> MaterializeResult:
    """The best regressor settings found by an Optuna TPE search on validation RankIC (median pruning on the
    periodic validation RankIC; each trial judged on `objective_dates` validation dates, its standard
    error in the trials table; the best re-scored on every validation date), saved as
    DATA_DIR/hyperparameters.json; `regressor` uses them when present.
    The study is stored in DATA_DIR/optuna.db, so a killed search resumes; each trial is a nested MLflow run.
    """
    from modeling import mlflow_registry

    template, out, bucket_config = _search_template(context, config, storage)
    space = replace(
        _S, steps=tuple(config.steps), batch_size=tuple(config.batch_sizes), loss=tuple(config.losses)
    )
    # every trial loads the backbone from its directory: the one the search starts on must be the one
    # it ends on (the base_model asset replaces the directory whole)
    fingerprint = model_fingerprint(storage.base_model_dir)

    experiment_id = mlflow_registry.configure(
        mlflow.tracking_uri, mlflow.experiment_name, mlflow.artifact_root
    )
    parent = mlflow_registry.start_parent_run(
        experiment_id,
        f"search-{context.run_id[:8]}",
        {
            "study": study_key(config.study_name, space),
            "n_trials": config.n_trials,
            "profile": config.profile,
            "space": space.__dict__,
        },
    )
    try:
        result = run_search(
            template,
            storage.root / "optuna.db",
            config.study_name,
            config.n_trials,
            config.timeout_s,
            out,
            space,
            bucket_config,
            config.seed,
            log_trial=lambda n, params, score, history, state: mlflow_registry.log_trial_run(
                experiment_id, parent, n, params, score, history, state
            ),
            log=context.log.info,
            objective_dates=config.objective_dates,
        )
        if model_fingerprint(storage.base_model_dir) != fingerprint:
            raise RuntimeError(
                "base_model was replaced while the search ran, so its trials ran on two backbones: nothing "
                "is written; run the search again"
            )
    except BaseException:
        mlflow_registry.end_run(status="FAILED")
        raise
    full = result.best_full
    mlflow_registry.end_run(
        {
            "best_trial_objective": result.best_value,
            "best_val_rank_ic": full.mean,
            "best_val_rank_ic_se": full.se,
            "best_val_n_dates": full.n_dates,
        },
        [result.history_png] if result.history_png else [],
    )

    path = _write_best(storage, config, result, parent, fingerprint, study_key(config.study_name, space))
    return MaterializeResult(metadata=_search_metadata(result, path, parent))
