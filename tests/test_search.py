"""The hyperparameter search: three tiny trials, then a fourth resumed from the stored study."""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import optuna
import pytest

from modeling.buckets import BucketConfig
from modeling.model import HeadConfig, RegressorConfig
from modeling.profiles import PROFILES, apply_overrides
from modeling.prompt import PromptBuilder
from modeling.search import (
    SearchSpace,
    best_params_to_overrides,
    run_search,
    study_key,
    trial_job,
    with_date_groups,
)
from modeling.train import TrainConfig, TrainJob

SPACE = SearchSpace(
    steps=(6, 9), batch_size=(8,), lora_r=(2, 4), head_width=(16, 32), head_depth=(1,), loss=("mse", "huber")
)


def test_three_trials_then_a_fourth_resumes_the_stored_study(
    tiny_base_model, tiny_data, tmp_path: Path
) -> None:
    _, corpus = tiny_data
    template = TrainJob(
        str(tiny_base_model),
        str(corpus),
        str(tmp_path / "runs"),
        PromptBuilder().settings(),
        RegressorConfig(head=HeadConfig(hidden_sizes=(16,))),
        TrainConfig(
            batch_size=8, eval_every_steps=3, eval_max_dates=4, checkpoint_every_steps=0, progress=False
        ),
    )
    logged: list[tuple] = []
    storage = tmp_path / "optuna.db"
    kwargs = {
        "space": SPACE,
        "bucket_config": asdict(BucketConfig()),
        "seed": 0,
        "log_trial": lambda *args: logged.append(args),
        "log": lambda _m: None,
        "objective_dates": 6,
    }
    first = run_search(template, storage, "study", 3, None, tmp_path / "search", **kwargs)
    assert first.n_new_trials == 3 and len(first.trials) == 3
    resumed = run_search(template, storage, "study", 1, None, tmp_path / "search", **kwargs)
    assert resumed.n_new_trials == 1 and list(resumed.trials["number"]) == [0, 1, 2, 3]
    study = optuna.load_study(study_name=study_key("study", SPACE), storage=f"sqlite:///{storage}")
    assert len(study.trials) == 4  # the fourth trial ran against the three stored ones
    assert [entry[0] for entry in logged] == [0, 1, 2, 3]  # one nested MLflow run per trial
    # a complete trial is logged with its judged score's precision; a pruned one with none
    for number, _, score, history, state in logged:
        assert (score is not None) == (state == "complete"), number
        if score is not None:
            assert score.n_dates == 6 and score.se > 0
        assert all(
            h["val_n_dates"] == 4 and h["val_rank_ic_se"] > 0
            for h in history
            if np.isfinite(h["val_rank_ic"])
        )
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert resumed.best_value == max(t.value for t in complete)
    # every trial is judged on the objective dates with its standard error; the trials table shows it
    for trial in complete:
        assert trial.user_attrs["n_dates"] == 6 and trial.user_attrs["rank_ic_se"] > 0
    assert {"se", "n_dates"} <= set(resumed.trials.columns)
    # the best is re-scored on every validation date (the tiny set has 8)
    assert resumed.best_full.n_dates == 8 and resumed.best_full.se > 0
    assert resumed.best_trial in [t.number for t in complete]
    for trial in study.trials:  # the searched dimensions
        assert {
            "learning_rate",
            "lora_r",
            "target_modules",
            "head_width",
            "batch_size",
            "max_steps",
            "loss",
            "weight_scheme",
        } <= set(trial.params)
        assert trial.params["max_steps"] in SPACE.steps
    best = dict(resumed.best_params)
    best.pop("weight_scheme")
    regressor, train = apply_overrides(template.regressor, template.train, best)  # usable by `regressor`
    assert train.max_train_samples == train.max_steps * train.batch_size
    assert regressor.lora.alpha == best["lora_alpha"]
    # the trials ran the template's size-dependent settings; the written params pin them, so a profile
    # whose rules would size them otherwise at the trial's rows trains what was judged
    cpu = PROFILES["cpu"]
    assert (best["lora_last_layers"], best["aux_feature_weight"]) == (
        template.regressor.lora.last_layers,
        template.train.aux_feature_weight,
    )
    regressor, train = apply_overrides(cpu.regressor, cpu.train, {**best, "max_train_samples": 96_000})
    final = TrainJob("b", "c", "o", {}, regressor, train)
    assert final.regressor.lora.last_layers == template.regressor.lora.last_layers
    assert final.train.aux_feature_weight == template.train.aux_feature_weight
    unpinned = {k: v for k, v in best.items() if k not in ("lora_last_layers", "aux_feature_weight")}
    sized = TrainJob(
        "b",
        "c",
        "o",
        {},
        *apply_overrides(cpu.regressor, cpu.train, {**unpinned, "max_train_samples": 96_000}),
    )
    assert (sized.regressor.lora.last_layers, sized.train.aux_feature_weight) != (
        final.regressor.lora.last_layers,
        final.train.aux_feature_weight,
    )  # (without the pins the profile's rules would have changed them: the test can tell)
    assert resumed.history_png is not None and resumed.history_png.stat().st_size > 1000
    # judged on every date (the default): that score is the best's full score, not re-scored
    every = run_search(
        template,
        tmp_path / "every.db",
        "every",
        1,
        None,
        tmp_path / "every",
        **{**kwargs, "objective_dates": None},
    )
    assert every.best_full.n_dates == 8 and every.best_full.mean == every.best_value
    assert resumed.trials["comparable"].all()  # the same rows, settings and dates: all ranked together
    # the stored study judged again on 6 dates: the trial judged on every date is shown, not ranked
    # against it (a 6-date value carries another noise and, with other data, other rows)
    fewer = run_search(template, tmp_path / "every.db", "every", 1, None, tmp_path / "every", **kwargs)
    assert fewer.trials["comparable"].tolist() == [False, True]
    assert fewer.best_trial == 1 and fewer.best_value == fewer.trials["value"].iloc[1]
    assert best_params_to_overrides(
        {
            "lora_r": 4,
            "lora_alpha_multiple": 2.0,
            "head_depth": 2,
            "head_width": 8,
            "target_modules": "attention",
            "max_steps": 5,
            "batch_size": 4,
        }
    ) == {
        "lora_r": 4,
        "lora_alpha": 8.0,
        "head_hidden_sizes": [8, 8],
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "max_steps": 5,
        "batch_size": 4,
        "max_train_samples": 20,
        "epochs": 1,
    }


def test_an_ic_trial_gets_date_groups_and_other_losses_plain_rows(tmp_path: Path) -> None:
    """The per-date IC loss needs date-grouped batches; an MSE or Huber trial must not inherit a profile's
    grouping (its rows would be drawn per date): the trial job and the best trial's overrides say so."""
    with pytest.raises(ValueError, match="not multiples of the ic loss's date groups of 16"):
        SearchSpace(batch_size=(8, 32))
    assert SearchSpace(batch_size=(8,), loss=("mse",)).batch_size == (8,)
    template = TrainJob(
        "base", "corpus", str(tmp_path), PromptBuilder().settings(), RegressorConfig(),
        TrainConfig(batch_size=32, loss="ic", date_group_size=16),
    )  # fmt: skip
    params = {
        "learning_rate": 1e-3, "lora_r": 4, "lora_alpha": 8.0, "lora_dropout": 0.0, "target_modules": "all",
        "head_hidden_sizes": [16], "head_dropout": 0.0, "batch_size": 32, "max_steps": 10,
    }  # fmt: skip
    for loss, group in (("ic", 16), ("mse", 0), ("huber", 0)):
        job = trial_job(template, with_date_groups({**params, "loss": loss}), tmp_path / loss, None)
        assert (job.train.loss, job.train.date_group_size) == (loss, group)
        overrides = best_params_to_overrides({"loss": loss, "max_steps": 10, "batch_size": 32})
        assert overrides["date_group_size"] == group
    # a trial's groups are the cpu profile's, so an ic trial and the profile draw rows alike
    assert PROFILES["cpu"].train.loss == "ic"
    assert with_date_groups({"loss": "ic"})["date_group_size"] == PROFILES["cpu"].train.date_group_size


def test_the_regressor_applies_a_search_of_its_own_base_model_only(tiny_base_model, tmp_path: Path) -> None:
    """hyperparameters.json holds for the profile and base model it was searched on: the fingerprint of
    today's scheme, or of the first one for a search saved before it; any other is not applied."""
    import json

    from modeling.backbones.files import _edges_fingerprint, model_fingerprint
    from pipeline.assets.regressor import _hyperparameters
    from pipeline.resources import build_resources
    from pipeline.settings import Settings

    settings = Settings.from_env({"DATA_DIR": str(tmp_path / "data"), "BASE_MODEL": str(tiny_base_model)})
    storage = build_resources(settings)["storage"]
    storage.root.mkdir(parents=True, exist_ok=True)
    current = model_fingerprint(tiny_base_model)
    warnings: list[str] = []
    for saved, applied in (
        (current, True),
        (_edges_fingerprint(tiny_base_model), True),
        ("v2:" + "0" * 64, False),
    ):
        payload = {"profile": "cpu", "base_model_fingerprint": saved, "best_params": {"lora_r": 8}}
        (storage.root / "hyperparameters.json").write_text(json.dumps(payload))
        got = _hyperparameters(storage, True, "cpu", current, warnings.append)
        assert got == ({"lora_r": 8} if applied else {}), saved
    assert len(warnings) == 1 and "another base model or profile" in warnings[0]
    assert _hyperparameters(storage, True, "gpu", current, warnings.append) == {}  # another profile


def test_the_pruner_compares_a_trial_with_trials_judged_on_its_own_key_only(tmp_path: Path) -> None:
    from modeling.search_study import open_study

    study = open_study(tmp_path / "optuna.db", "s", seed=0)

    def done(key: str, intermediate: float) -> None:
        study.add_trial(
            optuna.trial.create_trial(
                value=intermediate,
                intermediate_values={5: intermediate},
                user_attrs={"judged_on": key},
                distributions={},
                params={},
            )
        )

    for level in (0.10, 0.11, 0.12):  # an older corpus's trials, at another level
        done("old", level)
    running = study.ask()
    running.set_user_attr("judged_on", "new")
    running.report(0.02, 5)
    # three finished trials sit above it, but none was judged on its rows: no median to fall below yet
    assert not running.should_prune()
    done("new", 0.04)
    done("new", 0.05)
    # two of its own key finished, both above it: now it is pruned
    assert running.should_prune()


def test_each_search_space_keeps_its_own_study_and_a_resumed_study_draws_new_trials(tmp_path: Path) -> None:
    """Another `steps` / `batch_sizes` / `losses` on the same optuna.db: Optuna refuses a categorical whose
    choices differ from the stored trials', so the space names its own study (the default space keeps the
    plain name). A resumed study's sampler is seeded past its stored trials: the random start-up draws
    are not replayed (before, two runs of two trials gave the same two parameter sets)."""
    import optuna

    from modeling.search import suggest
    from modeling.search_study import open_study

    def draw(space: SearchSpace, n: int) -> list[dict]:
        study = open_study(tmp_path / "optuna.db", study_key("s", space), seed=0)
        drawn = []
        for _ in range(n):
            trial = study.ask()
            drawn.append(suggest(trial, space, reweight=False))
            study.tell(trial, 0.01)
        return drawn

    assert study_key("s", SearchSpace()) == "s"
    fewer_steps = SearchSpace(steps=(250,))
    assert study_key("s", fewer_steps).startswith("s-") and study_key("s", fewer_steps) != study_key(
        "s", SPACE
    )
    first = draw(SearchSpace(), 2)
    assert draw(SearchSpace(), 2) != first  # resumed: two new draws
    assert [d["max_steps"] for d in draw(fewer_steps, 2)] == [250, 250]  # its own study, no refusal
    names = {s.study_name for s in optuna.get_all_study_summaries(f"sqlite:///{tmp_path / 'optuna.db'}")}
    assert names == {"s", study_key("s", fewer_steps)}
    with pytest.raises(ValueError, match="dynamic value space"):  # what one shared study did
        study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
        suggest(study.ask(), fewer_steps, reweight=False)


def test_the_judging_key_reads_the_inputs_by_content_not_by_path(tiny_data, tmp_path: Path) -> None:
    """A search trains on its run's snapshot of the corpus and training set: the same bytes at another path
    judge alike, and a training set that changed under the same path does not."""
    import shutil

    from modeling.search import judging_key

    training_set, corpus = tiny_data
    template = TrainJob(
        "/models/base", str(corpus), str(tmp_path / "a"), PromptBuilder().settings(), RegressorConfig(),
        TrainConfig(), training_set_path=str(training_set),
    )  # fmt: skip
    copies = tmp_path / "snapshot"
    copies.mkdir()
    moved = replace(
        template,
        corpus_path=str(shutil.copy(corpus, copies)),
        training_set_path=str(shutil.copy(training_set, copies)),
        output_dir=str(tmp_path / "b"),
    )
    fingerprint = "modeling.backbones.files.model_fingerprint"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(fingerprint, lambda _path: "fp")
        key = judging_key(template, None, None)
        assert judging_key(moved, None, None) == key
        Path(moved.training_set_path).write_bytes(Path(training_set).read_bytes() + b"\0")
        assert judging_key(moved, None, None) != key


def test_an_override_of_the_sample_size_leaves_the_searched_size_settings_to_the_profile(
    tiny_data, tmp_path: Path
) -> None:
    """The search pins the size-dependent settings it judged (last-layer adapters, probe weight 3 at the
    profile's 24k rows); a `regressor` run that asks for another sample size gets the profile's rules at
    that size (every layer, weight 10 above 24k), unless it names them too."""
    import pandas as pd

    from modeling.data.parquet_io import read_parquet_metadata, write_parquet_atomic
    from modeling.feature_registry import registry_fingerprint
    from modeling.plan import plan_regressor_job

    source, corpus = tiny_data
    facts = {**read_parquet_metadata(source), "feature_registry_sha": registry_fingerprint()}
    training_set = write_parquet_atomic(pd.read_parquet(source), tmp_path / "training_set.parquet", facts)
    searched = {"lora_r": 16, "lora_last_layers": 1, "aux_feature_weight": 3.0}

    def planned(overrides: dict) -> tuple:
        job = plan_regressor_job(
            "cpu", overrides, searched, corpus, training_set, "/base", "fp", "r", "v"
        ).job
        return job.regressor.lora.r, job.regressor.lora.last_layers, job.train.aux_feature_weight

    assert planned({}) == (16, 1, 3.0)  # the judged configuration
    assert planned({"max_train_samples": 96_000}) == (16, None, 10.0)  # sized by the profile at 96k
    assert planned({"max_train_samples": 96_000, "lora_last_layers": 1}) == (16, 1, 10.0)
