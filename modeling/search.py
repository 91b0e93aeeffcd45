"""Hyperparameter search: Optuna TPE over the regressor's settings, on validation RankIC.

Each trial trains one regressor with `train_regressor` (in process) and reports the periodic validation
RankIC to Optuna's median pruner, which stops trials running below the median of earlier trials at the
same step (only trials judged on the same rows and settings count: `same_key_median_pruner`). The
objective is the RankIC of the checkpoint the trial keeps, scored at the end on
`objective_dates` evenly spaced validation dates (by default every one of them: on the default market's
179 validation dates a standard error of 0.0048-0.0051, where 100 dates carry 0.0068-0.0074 and the
10-date periodic evaluation about 0.018, as large as the differences between trials). Each
trial's standard error and number of dates are stored with it (user attributes `rank_ic_se`,
`n_dates`), and the best trial is re-scored on every validation date before its parameters are
written (`SearchResult.best_full`).

The study lives in SQLite under DATA_DIR with a heartbeat: a search killed mid-trial resumes from the
stored study on the next run, and the trial that was running when it died is marked failed and
re-queued with the same parameters (`RetryHeartbeatStaleTrialCallback`). Each trial is a nested MLflow
run under the search's run (params, per-eval and final validation RankIC; no model is registered).

The search space (flat names, as `modeling.profiles.OVERRIDABLE` understands them, plus the bucket
weight scheme): learning rate (log-uniform), LoRA rank / alpha multiple / dropout, target-module set,
head width / depth / dropout, batch size, steps, bucket weight scheme, loss.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd

from modeling.evaluation import score_split
from modeling.metrics import DailyMean
from modeling.profiles import IC_DATE_GROUP, SIZED_OVERRIDES, apply_overrides
from modeling.search_study import open_study
from modeling.train import TrainJob, train_regressor

TARGET_MODULE_SETS: dict[str, tuple[str, ...] | str] = {
    "all": "all-linear",
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
}
"""Named target-module sets (Llama naming; "all" is every linear layer of any architecture)."""


def with_date_groups(params: dict[str, Any], group: int = IC_DATE_GROUP) -> dict[str, Any]:
    """`params` with the `date_group_size` its loss needs: `group` for `ic`, 0 (plain rows) otherwise,
    so that a trial (or the best trial's overrides) never inherits the profile's grouping for another
    loss."""
    return {**params, "date_group_size": group if params.get("loss") == "ic" else 0}


@dataclass(frozen=True)
class SearchSpace:
    """Ranges and choices of the search."""

    learning_rate: tuple[float, float] = (2e-4, 3e-3)
    lora_r: tuple[int, ...] = (4, 8, 16)
    lora_alpha_multiple: tuple[float, ...] = (1.0, 2.0, 4.0)
    lora_dropout: tuple[float, ...] = (0.0, 0.05, 0.1)
    target_modules: tuple[str, ...] = ("all", "attention", "mlp")
    head_width: tuple[int, ...] = (64, 128, 256, 512)
    head_depth: tuple[int, ...] = (1, 2)
    head_dropout: tuple[float, float] = (0.0, 0.3)
    batch_size: tuple[int, ...] = (16, 32, 64)
    steps: tuple[int, ...] = (250, 500, 750)
    """Optimizer steps per trial (the training budget; `max_train_samples` is set to cover them)."""
    weight_scheme: tuple[str, ...] = ("sqrt_inverse", "inverse", "lds", "none")
    loss: tuple[str, ...] = ("mse", "huber", "ic")
    date_group_size: int = IC_DATE_GROUP
    """Rows of one date per group in an `ic` trial (a per-date correlation needs several names of one
    date in a batch); `mse` and `huber` trials draw plain rows in length-grouped batches."""

    def __post_init__(self) -> None:
        if "ic" in self.loss:
            bad = [b for b in self.batch_size if b % self.date_group_size]
            if bad:
                raise ValueError(
                    f"batch sizes {bad} are not multiples of the ic loss's date groups of "
                    f"{self.date_group_size}: drop 'ic' from the losses or change the batch sizes"
                )


def suggest(trial: Any, space: SearchSpace, reweight: bool) -> dict[str, Any]:
    """One trial's parameters (flat names)."""
    r = trial.suggest_categorical("lora_r", list(space.lora_r))
    multiple = trial.suggest_categorical("lora_alpha_multiple", list(space.lora_alpha_multiple))
    depth = trial.suggest_categorical("head_depth", list(space.head_depth))
    width = trial.suggest_categorical("head_width", list(space.head_width))
    params = {
        "learning_rate": trial.suggest_float("learning_rate", *space.learning_rate, log=True),
        "lora_r": r,
        "lora_alpha": float(r * multiple),
        "lora_dropout": trial.suggest_categorical("lora_dropout", list(space.lora_dropout)),
        "target_modules": trial.suggest_categorical("target_modules", list(space.target_modules)),
        "head_hidden_sizes": [width] * depth,
        "head_dropout": trial.suggest_float("head_dropout", *space.head_dropout),
        "batch_size": trial.suggest_categorical("batch_size", list(space.batch_size)),
        "max_steps": trial.suggest_categorical("max_steps", list(space.steps)),
        "loss": trial.suggest_categorical("loss", list(space.loss)),
    }
    if reweight:
        params["weight_scheme"] = trial.suggest_categorical("weight_scheme", list(space.weight_scheme))
    return with_date_groups(params, space.date_group_size)


def trial_job(template: TrainJob, params: dict[str, Any], out: Path, bucket_config: dict | None) -> TrainJob:
    """The template job with one trial's parameters applied."""
    overrides = {k: v for k, v in params.items() if k != "weight_scheme"}
    if isinstance(overrides.get("target_modules"), str):
        overrides["target_modules"] = TARGET_MODULE_SETS[overrides["target_modules"]]
    steps, batch = overrides["max_steps"], overrides["batch_size"]
    overrides["max_train_samples"] = steps * batch  # one pass: every step sees new rows
    overrides["epochs"] = 1
    regressor, train = apply_overrides(template.regressor, template.train, overrides)
    reweight = None
    if params.get("weight_scheme") and bucket_config is not None:
        reweight = {**bucket_config, "scheme": params["weight_scheme"]}
    return replace(
        template,
        output_dir=str(out),
        regressor=regressor,
        train=train,
        reweight=reweight,
        resume=False,
        experiment=None,
    )


def best_params_to_overrides(best: dict[str, Any], group: int = IC_DATE_GROUP) -> dict[str, Any]:
    """The study's best trial as the overrides `regressor` applies (JSON-friendly)."""
    params = dict(best)
    multiple = params.pop("lora_alpha_multiple", None)
    depth, width = params.pop("head_depth", None), params.pop("head_width", None)
    if multiple is not None:
        params["lora_alpha"] = float(params["lora_r"] * multiple)
    if depth is not None and width is not None:
        params["head_hidden_sizes"] = [width] * depth
    if isinstance(params.get("target_modules"), str):
        target = TARGET_MODULE_SETS[params["target_modules"]]
        params["target_modules"] = target if isinstance(target, str) else list(target)
    params["max_train_samples"] = int(params["max_steps"]) * int(params["batch_size"])
    params["epochs"] = 1
    return with_date_groups(params, group) if "loss" in params else params


def sized_settings(template: TrainJob) -> dict[str, Any]:
    """The settings a profile sizes by the sample (which layers get adapters, the feature probe's weight),
    as every trial ran them: the template resolved them at its own sample size and a trial keeps them
    whatever its rows. The written parameters pin them, so that the `regressor` run of the best trial
    (which re-applies the profile's size rules to the trial's `max_train_samples`) trains the
    configuration that was judged."""
    resolved = {
        "lora_last_layers": template.regressor.lora.last_layers,
        "aux_feature_weight": template.train.aux_feature_weight,
    }
    return {name: resolved[name] for name in SIZED_OVERRIDES}


OBJECTIVE_DATES: int | None = None
"""Validation dates each trial is judged on (None = all: a standard error of about 0.005 on the default
market's 179 dates, measured on the curve's 24k runs; 100 dates give about 0.007)."""


@dataclass
class SearchResult:
    best_value: float
    """The best trial's objective (its RankIC on the objective dates)."""
    best_params: dict[str, Any]
    """The best trial in `regressor` override form (plus `weight_scheme` when searched, and the template's
    size-dependent settings, `sized_settings`)."""
    best_full: DailyMean
    """The best trial's model re-scored on every validation date: what gets reported and written."""
    best_trial: int
    trials: pd.DataFrame
    n_new_trials: int
    history_png: Path | None
    wall_s: float


def study_key(study_name: str, space: SearchSpace) -> str:
    """The stored study of `study_name` over `space`: Optuna refuses a categorical whose choices differ
    from the stored trials' (another `steps`, `batch_sizes` or `losses`), so each space keeps its own
    study; the default space keeps the plain name."""
    from modeling.backbones.files import build_key

    return study_name if space == SearchSpace() else f"{study_name}-{build_key(asdict(space))[:12]}"


def _best_on_every_date(
    best,
    template: TrainJob,
    out_dir: Path,
    space: SearchSpace,
    reweight: bool,
    bucket_config: dict | None,
    horizon: int,
    log: Callable[[str], None],
) -> DailyMean:
    """The best trial's validation RankIC on every date (its model trained again when it is gone)."""
    import optuna

    if best.user_attrs.get("every_date"):
        return DailyMean(
            float(best.value),
            float(best.user_attrs["rank_ic_se"]),
            int(best.user_attrs["n_dates"]),
            horizon - 1,
        )
    else:
        best_dir = Path(out_dir) / f"trial-{best.number:04d}"
        if not (best_dir / "model" / "regressor.json").is_file():  # trained elsewhere: train it again
            log(f"trial {best.number}'s model is gone; training it again (same seed, same parameters)")
            params = suggest(optuna.trial.FixedTrial(best.params), space, reweight)
            train_regressor(trial_job(template, params, best_dir, bucket_config), log=lambda _m: None)
        return score_split(best_dir / "model", template.corpus_path, "validation", None, horizon)[1]


def judging_key(template: TrainJob, objective_dates: int | None, bucket_config: dict | None) -> str:
    """What a trial's objective value rests on besides its own parameters: the scored rows (the corpus's
    content), the backbone, the job the trials start from, the bucket model and the number of dates. A
    stored study outlives the data it was run on (the daily corpus grows, a run may judge on fewer dates),
    so only trials with the current key are ranked against each other."""
    from modeling.backbones.files import build_key, file_sha256, model_fingerprint

    # the inputs by content, not by path: a run trains on its own snapshot of them
    paths = ("output_dir", "corpus_path", "training_set_path")
    job = {k: v for k, v in template.to_dict().items() if k not in paths}
    return build_key(
        {
            "corpus": file_sha256(template.corpus_path),
            "training_set": file_sha256(template.training_set_path) if template.training_set_path else None,
            "base_model": model_fingerprint(template.base_model_dir),
            "job": job,
            "buckets": bucket_config,
            "objective_dates": objective_dates,
        }
    )


def _objective(
    template: TrainJob,
    space: SearchSpace,
    reweight: bool,
    bucket_config: dict | None,
    out_dir: Path,
    objective_dates: int | None,
    horizon: int,
    log_trial: Callable[[int, dict[str, Any], DailyMean | None, list[dict[str, Any]], str], None] | None,
    log: Callable[[str], None],
    key: str,
) -> Callable[[Any], float]:
    """The study's objective: train the trial's regressor (reporting each periodic validation RankIC to
    the pruner), score it on `objective_dates` validation dates, store its SE and dates with the trial,
    and log the trial (`log_trial`) whatever its outcome."""
    import optuna

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr("judged_on", key)
        params = suggest(trial, space, reweight)
        job = trial_job(template, params, Path(out_dir) / f"trial-{trial.number:04d}", bucket_config)

        def report(step: int, score: float) -> None:
            trial.report(score if math.isfinite(score) else -1.0, step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {step} (validation RankIC {score:.4f})")

        state, value = "failed", float("nan")
        scored: DailyMean | None = None
        history: list[dict[str, Any]] = []
        try:
            result = train_regressor(job, log=lambda _msg: None, on_eval=report)
            history = result.state.history
            _, scored = score_split(
                result.model_dir, template.corpus_path, "validation", objective_dates, horizon
            )
            value = scored.mean
            trial.set_user_attr("rank_ic_se", scored.se)
            trial.set_user_attr("n_dates", scored.n_dates)
            trial.set_user_attr("every_date", objective_dates is None)
            state = "complete"
        except optuna.TrialPruned:
            state = "pruned"
            raise
        finally:
            if log_trial is not None:
                log_trial(trial.number, params, scored if state == "complete" else None, history, state)
            log(f"trial {trial.number} {state}: {json.dumps(params, default=str)} -> {value:.5f}")
        return value

    return objective


def run_search(
    template: TrainJob,
    storage_path: Path,
    study_name: str,
    n_trials: int,
    timeout_s: float | None,
    out_dir: Path,
    space: SearchSpace = SearchSpace(),
    bucket_config: dict | None = None,
    seed: int = 0,
    log_trial: Callable[[int, dict[str, Any], DailyMean | None, list[dict[str, Any]], str], None]
    | None = None,
    log: Callable[[str], None] = print,
    objective_dates: int | None = OBJECTIVE_DATES,
) -> SearchResult:
    """Run `n_trials` more trials (or until `timeout_s`) of the study stored at `storage_path`; each is
    judged on `objective_dates` validation dates (None = all)."""
    horizon = int(template.prompt.get("horizon", 1))
    import optuna

    study = open_study(storage_path, study_key(study_name, space), seed)
    # a killed search left its running trial RUNNING: optimize() fails it (no heartbeat for grace_period)
    # and RetryHeartbeatStaleTrialCallback queues it again with the same parameters
    reweight = bucket_config is not None and bucket_config.get("mode", "weight") == "weight"
    started = time.perf_counter()
    key = judging_key(template, objective_dates, bucket_config)
    objective = _objective(
        template, space, reweight, bucket_config, out_dir, objective_dates, horizon, log_trial, log, key
    )
    before = len(study.trials)
    study.optimize(objective, n_trials=n_trials, timeout=timeout_s, catch=())
    trials = study.trials_dataframe(attrs=("number", "value", "user_attrs", "state", "params", "duration"))
    trials = trials.rename(columns={"user_attrs_rank_ic_se": "se", "user_attrs_n_dates": "n_dates"})
    judged_on = trials.pop("user_attrs_judged_on") if "user_attrs_judged_on" in trials else None
    trials["comparable"] = judged_on == key if judged_on is not None else False
    finished = [
        t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and t.value is not None
    ]
    completed = [t for t in finished if t.user_attrs.get("judged_on") == key]
    if not completed:
        raise RuntimeError(
            f"no trial of the search completed on the current rows and settings ({len(finished)} completed "
            "trials of the study were judged on other data, backbone, profile or number of dates)"
        )
    if len(completed) < len(finished):
        log(
            f"{len(finished) - len(completed)} completed trials of the study were judged on other rows or "
            "settings: ranked out"
        )
    best = max(completed, key=lambda t: t.value)
    # the winner of several noisy trials is flattered by its own noise: re-score it on every date (unless
    # it was judged on every date already)
    best_full = _best_on_every_date(best, template, out_dir, space, reweight, bucket_config, horizon, log)
    log(f"best trial {best.number}: {best.value:.5f} on the objective dates, {best_full} on every date")
    png = None
    if len(completed) >= 1:
        png = Path(out_dir) / "optimisation_history.png"
        history_png(trials, png)
    return SearchResult(
        best_value=float(best.value),
        best_params={
            **best_params_to_overrides(best.params, space.date_group_size),
            **sized_settings(template),
        },
        best_full=best_full,
        best_trial=best.number,
        trials=trials,
        n_new_trials=len(study.trials) - before,
        history_png=png,
        wall_s=time.perf_counter() - started,
    )


def history_png(trials: pd.DataFrame, path: Path) -> Path:
    """Validation RankIC per trial with +- 1 SE bars, the running best (pruned and failed trials marked)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3.6))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    finished = trials[trials["state"] == "COMPLETE"]
    ranked = finished.get("comparable", pd.Series(True, index=finished.index)).astype(bool)
    done, elsewhere = finished[ranked], finished[~ranked]
    se = done.get("se")
    ax.errorbar(done["number"], done["value"], yerr=se, fmt="o", color="tab:blue", label="trial ± 1 SE")
    if len(elsewhere):  # judged on other rows or settings: shown, not ranked
        ax.scatter(elsewhere["number"], elsewhere["value"], color="0.6", label="other rows / settings")
    ax.plot(
        done["number"], done["value"].cummax(), color="tab:red", drawstyle="steps-post", label="best so far"
    )
    others = trials[trials["state"] != "COMPLETE"]
    if len(others):
        ymin = float(done["value"].min()) if len(done) else 0.0
        ax.scatter(others["number"], [ymin] * len(others), marker="x", color="0.5", label="pruned / failed")
    ax.set_xlabel("trial")
    ax.set_ylabel("validation RankIC")
    ax.set_title("optimisation history")
    ax.legend(loc="lower right")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    return Path(path)
