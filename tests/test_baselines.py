"""The feature baselines' early stopping: on rows held out of the train split, never on the rows they are
judged on."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from modeling.baselines import BaselineConfig, early_stopping_split, fit_predict_baselines, mlp_baseline_loss
from modeling.feature_registry import FEATURE_NAMES
from modeling.metrics import rank_ic


def _market(
    n_dates: int, n_symbols: int, signal: float, seed: int, start: str = "2020-01-01"
) -> pd.DataFrame:
    """16 noise features; the label is `signal` x the first one plus unit noise."""
    rng = np.random.default_rng(seed)
    dates = pd.bdate_range(start, periods=n_dates)
    frame = pd.DataFrame(
        [(d, f"S{i:03d}") for d in dates for i in range(n_symbols)], columns=["date", "symbol"]
    )
    for name in FEATURE_NAMES:
        frame[name] = rng.normal(size=len(frame))
    frame["label"] = signal * frame[FEATURE_NAMES[0]] + rng.normal(size=len(frame))
    frame["weight"] = 1.0
    return frame


def test_early_stopping_split_holds_out_the_last_dates_behind_a_purge_by_hand() -> None:
    frame = _market(10, 3, 0.0, 0)
    dates = sorted(frame["date"].unique())
    fit, held = early_stopping_split(frame, fraction=0.2, horizon=2)
    # 10 dates: the last 2 held out, the 2 before them purged (a label at t spans t+1..t+2), 6 fitted
    assert sorted(held["date"].unique()) == dates[8:]
    assert sorted(fit["date"].unique()) == dates[:6]
    assert len(fit) == 18 and len(held) == 6
    fit1, held1 = early_stopping_split(frame, fraction=0.3, horizon=1)
    assert sorted(held1["date"].unique()) == dates[7:] and sorted(fit1["date"].unique()) == dates[:6]
    with pytest.raises(ValueError, match="cannot hold out"):
        early_stopping_split(frame, fraction=0.5, horizon=5)


def test_the_feature_mlp_takes_the_regressors_loss_but_mse_for_the_per_date_ic_loss() -> None:
    """The IC loss needs date-grouped batches, which the MLP's plain row batches are not."""
    assert [mlp_baseline_loss(loss) for loss in ("mse", "huber", "ic")] == ["mse", "huber", "mse"]


def test_baseline_config_rejects_an_early_stopping_share_outside_0_1() -> None:
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="early_stopping_fraction"):
            BaselineConfig(early_stopping_fraction=bad)


def test_baselines_stopped_on_their_own_train_dates_learn_the_signal_and_ignore_the_judged_labels() -> None:
    """With `validation=None` LightGBM and the MLP stop on the train rows' last dates and refit on all of
    them: they still find a planted signal on later dates, and the labels of the frames they are judged
    on cannot move their forecasts (with the judged frame as the stopping set, they do)."""
    train = _market(60, 80, 0.5, 1)
    later = _market(20, 80, 0.5, 2, start="2020-06-01")
    flipped = later.assign(label=-later["label"])
    cfg = BaselineConfig(mlp_epochs=4, lgbm_estimators=150)
    only = ("lightgbm", "mlp_features")
    own, _ = fit_predict_baselines(train, None, {"later": later}, cfg, only=only)
    own_flipped, _ = fit_predict_baselines(train, None, {"later": flipped}, cfg, only=only)
    for name in only:
        np.testing.assert_array_equal(own[name]["later"], own_flipped[name]["later"])
        assert rank_ic(later.assign(prediction=own[name]["later"])) > 0.3, name
    # the control: stopping on the judged rows lets their labels pick the rounds (flipped labels: few)
    judged, _ = fit_predict_baselines(train, later, {"later": later}, cfg, only=("lightgbm",))
    judged_flipped, _ = fit_predict_baselines(train, flipped, {"later": later}, cfg, only=("lightgbm",))
    assert np.abs(judged["lightgbm"]["later"] - judged_flipped["lightgbm"]["later"]).max() > 1e-3


def test_the_feature_mlp_drops_the_regressors_feature_bottleneck() -> None:
    """The MLP on the 16 features is the regressor's head without the LLM; with a feature bottleneck that
    head reads the features back from the state, so the MLP reads them directly: the same forecasts as a
    head configured without one (an extra 16 x 16 layer would change the ablation)."""
    from modeling.model import HeadConfig

    train = _market(30, 40, 0.5, 3)
    later = _market(5, 40, 0.5, 4, start="2020-06-01")
    head = HeadConfig(hidden_sizes=(16,))
    plain, _ = fit_predict_baselines(
        train, None, {"later": later}, BaselineConfig(mlp_head=head, mlp_epochs=2), only=("mlp_features",)
    )
    bottleneck = BaselineConfig(mlp_head=HeadConfig(hidden_sizes=(16,), feature_bottleneck=16), mlp_epochs=2)
    dropped, _ = fit_predict_baselines(train, None, {"later": later}, bottleneck, only=("mlp_features",))
    np.testing.assert_array_equal(dropped["mlp_features"]["later"], plain["mlp_features"]["later"])
