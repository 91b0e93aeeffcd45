"""The stored Optuna study of the hyperparameter search (`modeling.search`): opened or resumed in SQLite,
with heartbeats (a killed run's trial is queued again), a TPE sampler seeded past the stored trials, and a
median pruner that compares a trial only with trials judged on the same rows and settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class _TrialsJudgedOn:
    """A study seen through one judging key: `get_trials` returns only the trials judged like the one
    being pruned; everything else (direction, storage) is the study's own."""

    def __init__(self, study: Any, key: str | None) -> None:
        self._study, self._key = study, key

    def get_trials(self, deepcopy: bool = True, states: Any = None) -> list:
        trials = self._study.get_trials(deepcopy=deepcopy, states=states)
        return [t for t in trials if t.user_attrs.get("judged_on") == self._key]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._study, name)


def same_key_median_pruner(n_startup_trials: int = 2):
    """Optuna's median pruner over the trials judged on the same rows and settings as the running one
    (user attribute `judged_on`, `judging_key`). A stored study outlives its data: on another corpus or
    backbone the periodic RankICs sit at other levels, and the plain median pruner would stop a trial
    for falling below trials it is not ranked against. Pruning starts after `n_startup_trials` trials of
    the running trial's own key complete."""
    import optuna

    class SameKeyMedianPruner(optuna.pruners.BasePruner):
        def __init__(self) -> None:
            self._median = optuna.pruners.MedianPruner(n_startup_trials=n_startup_trials, n_warmup_steps=0)

        def prune(self, study: Any, trial: Any) -> bool:
            return self._median.prune(_TrialsJudgedOn(study, trial.user_attrs.get("judged_on")), trial)

    return SameKeyMedianPruner()


def open_study(storage_path: Path, name: str, seed: int) -> Any:
    """The Optuna study `name` in SQLite (created or resumed; `modeling.search.study_key` names it per
    search space): TPE sampler, the median pruner over trials judged on the same rows and settings,
    heartbeats. The sampler's seed moves on with the trials already stored, so a resumed search does
    not replay the random start-up draws of the run before."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = RDBStorage(
        f"sqlite:///{Path(storage_path).resolve()}",
        heartbeat_interval=30,
        grace_period=90,
        heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1),
    )
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        load_if_exists=True,
        direction="maximize",
        pruner=same_key_median_pruner(n_startup_trials=2),
    )
    study.sampler = optuna.samplers.TPESampler(seed=seed + len(study.trials), n_startup_trials=5)
    return study
