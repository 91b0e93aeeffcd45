"""Baselines the LLM regressor must beat, fit on the same train rows, labels and weights.

- `zero`: predicts 0 for every row (the label is demeaned per date by default: no view at all);
- `ridge`: linear ridge regression on the 16 features, standardised;
- `lightgbm`: gradient-boosted trees on the 16 raw features, early-stopped (see below);
- `mlp_features`: the regressor's own MLP head (same `RegressionHead`, same loss and bucket weights) on
  the 16 standardised features instead of the LLM's hidden state: the no-LLM ablation. If the LLM
  regressor does not beat it, the language model adds nothing over its inputs.

Every statistic (feature means and standard deviations, clipping) is fit on the train rows only.

Early stopping (LightGBM's rounds, the feature MLP's epochs) needs rows the fit does not see. A caller that
scores the baselines on its validation split must not stop on that split as well: the rounds and epochs
would be picked on the very dates the baselines are judged on, an in-sample edge over the LLM, whose final
weights are judged there. So with `validation=None` the stopping rows come from the train rows
themselves (`early_stopping_split`): the last `early_stopping_fraction` of their dates held out, the
`horizon` dates before those purged; the count found there is then refit on every train row. The
walk-forward backtest passes its window's validation dates (before the purge, never forecast).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
import torch

from modeling.feature_registry import FEATURE_NAMES
from modeling.metrics import rank_ic
from modeling.model import HeadConfig, RegressionHead
from modeling.optim import BestTracker

BASELINES = ("zero", "ridge", "lightgbm", "mlp_features")


def mlp_baseline_loss(regressor_loss: str) -> str:
    """The feature MLP's loss for a regressor trained with `regressor_loss`: the same one, except that the
    per-date IC loss (which needs date-grouped batches the MLP's plain row batches do not have) maps to
    MSE on the same targets and weights."""
    return "mse" if regressor_loss == "ic" else regressor_loss


@dataclass(frozen=True)
class BaselineConfig:
    """Settings of the baselines (fixed, not searched: they are references, not contenders)."""

    ridge_alpha: float = 10.0
    """L2 penalty of ridge on standardised features."""
    lgbm_estimators: int = 400
    """Boosting rounds cap (early stopping on validation l2 usually ends sooner)."""
    lgbm_learning_rate: float = 0.05
    """Shrinkage per round."""
    lgbm_num_leaves: int = 15
    """Leaves per tree (small: daily returns are mostly noise)."""
    lgbm_min_child_samples: int = 200
    """Rows per leaf at least."""
    mlp_head: HeadConfig = field(default_factory=HeadConfig)
    """The head shape (the regressor's own by default; a feature bottleneck is dropped: the MLP reads the
    16 features themselves, which is what the regressor's bottleneck reads them back as)."""
    mlp_epochs: int = 20
    """Epochs cap of the feature MLP (early stopping on validation RankIC)."""
    mlp_batch_size: int = 512
    """Rows per step of the feature MLP."""
    mlp_learning_rate: float = 1e-3
    """AdamW learning rate of the feature MLP."""
    mlp_patience: int = 3
    """Epochs without a better validation RankIC before stopping."""
    early_stopping_fraction: float = 0.2
    """With no validation rows given: the share of the train dates (the last ones) held out to pick
    LightGBM's rounds and the MLP's epochs, which are then refit on every train row."""
    clip_z: float = 5.0
    """Standardised features are clipped to +- this (fit on train)."""
    seed: int = 0
    """Seed of LightGBM and of the MLP's initialisation and batch order."""

    def __post_init__(self) -> None:
        if not 0.0 < self.early_stopping_fraction < 1.0:
            raise ValueError(
                "BaselineConfig.early_stopping_fraction must be in (0, 1), "
                f"got {self.early_stopping_fraction}"
            )


@dataclass(frozen=True)
class FeatureScaler:
    """z-score with the train mean and std, clipped: fit on train rows only."""

    mean: np.ndarray
    std: np.ndarray
    clip: float

    @classmethod
    def fit(cls, frame: pd.DataFrame, clip: float) -> FeatureScaler:
        values = frame[list(FEATURE_NAMES)].to_numpy(float)
        std = values.std(axis=0)
        return cls(values.mean(axis=0), np.where(std > 0, std, 1.0), clip)

    def transform(self, frame: pd.DataFrame) -> np.ndarray:
        z = (frame[list(FEATURE_NAMES)].to_numpy(float) - self.mean) / self.std
        return np.clip(z, -self.clip, self.clip)


def _weights(frame: pd.DataFrame) -> np.ndarray:
    return frame["weight"].to_numpy(float) if "weight" in frame else np.ones(len(frame))


def fit_ridge(train: pd.DataFrame, scaler: FeatureScaler, cfg: BaselineConfig):
    from sklearn.linear_model import Ridge

    model = Ridge(alpha=cfg.ridge_alpha)
    model.fit(scaler.transform(train), train["label"].to_numpy(float), sample_weight=_weights(train))
    return lambda frame: model.predict(scaler.transform(frame))


def early_stopping_split(
    train: pd.DataFrame, fraction: float, horizon: int = 1
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(rows to fit, rows to stop on): the last `fraction` of `train`'s dates held out, and the `horizon`
    dates before them dropped, so that no fitted label's window (t+1..t+h) reaches a held-out date."""
    dates = np.sort(train["date"].unique())
    n_held = max(1, int(round(len(dates) * fraction)))
    n_fit = len(dates) - n_held - horizon
    if n_fit < 1:
        raise ValueError(
            f"{len(dates)} train dates cannot hold out {n_held} for early stopping "
            f"behind a purge of {horizon}"
        )
    fit = train[train["date"] <= dates[n_fit - 1]]
    held = train[train["date"] >= dates[-n_held]]
    return fit.reset_index(drop=True), held.reset_index(drop=True)


def _lightgbm(cfg: BaselineConfig, rounds: int):
    import lightgbm as lgb

    return lgb.LGBMRegressor(
        n_estimators=rounds,
        learning_rate=cfg.lgbm_learning_rate,
        num_leaves=cfg.lgbm_num_leaves,
        min_child_samples=cfg.lgbm_min_child_samples,
        subsample=0.8,
        subsample_freq=1,
        colsample_bytree=0.8,
        random_state=cfg.seed,
        n_jobs=0,
        verbose=-1,
    )


def _lightgbm_stopped(train: pd.DataFrame, validation: pd.DataFrame, cfg: BaselineConfig):
    """LightGBM fit on `train`, its rounds cut at the best validation l2 (patience 30 rounds)."""
    import lightgbm as lgb

    features = list(FEATURE_NAMES)
    model = _lightgbm(cfg, cfg.lgbm_estimators)
    model.fit(
        train[features],
        train["label"],
        sample_weight=_weights(train),
        eval_X=validation[features],  # `eval_set` is deprecated since lightgbm 4.7
        eval_y=validation["label"],
        callbacks=[lgb.early_stopping(30, verbose=False)],
    )
    return model


def fit_lightgbm(train: pd.DataFrame, validation: pd.DataFrame | None, cfg: BaselineConfig, horizon: int = 1):
    """Early-stopped on `validation`, or (None) on the train rows' last dates and then refit on them all."""
    features = list(FEATURE_NAMES)
    if validation is not None:
        model = _lightgbm_stopped(train, validation, cfg)
        return lambda frame: model.predict(frame[features], num_iteration=model.best_iteration_)
    fit, held = early_stopping_split(train, cfg.early_stopping_fraction, horizon)
    rounds = _lightgbm_stopped(fit, held, cfg).best_iteration_ or cfg.lgbm_estimators
    model = _lightgbm(cfg, rounds)
    model.fit(train[features], train["label"], sample_weight=_weights(train))
    return lambda frame: model.predict(frame[features])


def fit_mlp_features(
    train: pd.DataFrame,
    validation: pd.DataFrame | None,
    scaler: FeatureScaler,
    cfg: BaselineConfig,
    loss: str = "mse",
    huber_delta: float = 1.0,
    horizon: int = 1,
):
    """The regressor's head on the standardised features, trained with the same weighted loss, its epochs
    stopped on `validation`, or (None) on the train rows' last dates and then refit on them all. The same
    rows and `cfg.seed` give the same forecasts, whatever ran before in the process."""
    if validation is None:
        fit, held = early_stopping_split(train, cfg.early_stopping_fraction, horizon)
        _, best_epoch = _train_mlp(fit, held, FeatureScaler.fit(fit, cfg.clip_z), cfg, loss, huber_delta)
        head, _ = _train_mlp(train, None, scaler, replace(cfg, mlp_epochs=best_epoch + 1), loss, huber_delta)
    else:
        head, _ = _train_mlp(train, validation, scaler, cfg, loss, huber_delta)

    def predict(frame: pd.DataFrame) -> np.ndarray:
        with torch.no_grad():
            return head(torch.tensor(scaler.transform(frame), dtype=torch.float32)).numpy().astype(float)

    return predict


def _train_mlp(
    train: pd.DataFrame,
    validation: pd.DataFrame | None,
    scaler: FeatureScaler,
    cfg: BaselineConfig,
    loss: str,
    huber_delta: float,
) -> tuple[RegressionHead, int]:
    """The feature MLP's training loop (weighted loss; early stopping on validation RankIC, or every
    epoch when `validation` is None), in eval mode, with the epoch it stopped at (0-based).

    The seed alone decides the fit: initialisation and dropout draw from the global generator, so the
    whole fit runs on a forked one seeded with `cfg.seed` (before, dropout followed whatever had drawn
    from the process's generator earlier, and two fits of the same rows differed)."""
    from modeling.losses import weighted_loss

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        head = RegressionHead(len(FEATURE_NAMES), replace(cfg.mlp_head, feature_bottleneck=0))
        generator = torch.Generator().manual_seed(cfg.seed)
        x = torch.tensor(scaler.transform(train), dtype=torch.float32)
        y = torch.tensor(train["label"].to_numpy(float), dtype=torch.float32)
        w = torch.tensor(_weights(train), dtype=torch.float32)
        x_val = None
        if validation is not None:
            x_val = torch.tensor(scaler.transform(validation), dtype=torch.float32)
        optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.mlp_learning_rate)
        tracker, best_state = BestTracker(patience=cfg.mlp_patience), None
        for epoch in range(cfg.mlp_epochs):
            head.train()
            order = torch.randperm(len(x), generator=generator)
            for start in range(0, len(x), cfg.mlp_batch_size):
                idx = order[start : start + cfg.mlp_batch_size]
                batch_loss = weighted_loss(head(x[idx]), y[idx], w[idx], loss, huber_delta)
                optimizer.zero_grad(set_to_none=True)
                batch_loss.backward()
                optimizer.step()
            if x_val is None:
                continue
            head.eval()
            with torch.no_grad():
                score = rank_ic(validation.assign(prediction=head(x_val).numpy()))
            if tracker.update(score, epoch):
                best_state = {k: v.clone() for k, v in head.state_dict().items()}
            elif tracker.should_stop:
                break
        if best_state is not None:
            head.load_state_dict(best_state)
    best_epoch = cfg.mlp_epochs - 1 if tracker.best_step is None else int(tracker.best_step)
    return head.eval(), best_epoch


def fit_predict_baselines(
    train: pd.DataFrame,
    validation: pd.DataFrame | None,
    evaluate_on: Mapping[str, pd.DataFrame],
    cfg: BaselineConfig = BaselineConfig(),
    loss: str = "mse",
    huber_delta: float = 1.0,
    only: tuple[str, ...] = BASELINES,
    horizon: int = 1,
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, float]]:
    """Fit every baseline named in `only` on `train` (columns: date, the 16 features, label, weight), stop
    early on `validation` (or, None, on the train rows' last dates, purged by `horizon`: pass None when
    `evaluate_on` scores the validation split), and predict every frame of `evaluate_on` (e.g.
    {"validation": ..., "test": ...}). `loss` is the regressor's; the feature MLP trains on
    `mlp_baseline_loss(loss)`.

    Returns ({baseline: {name: predictions}}, {baseline: fit seconds}).
    """
    missing = [c for c in (*FEATURE_NAMES, "label") if c not in train.columns]
    if missing:
        raise KeyError(f"baseline train rows lack column(s) {missing}")
    scaler = FeatureScaler.fit(train, cfg.clip_z)
    fitters = {
        "zero": lambda: lambda frame: np.zeros(len(frame)),
        "ridge": lambda: fit_ridge(train, scaler, cfg),
        "lightgbm": lambda: fit_lightgbm(train, validation, cfg, horizon),
        "mlp_features": lambda: fit_mlp_features(
            train, validation, scaler, cfg, mlp_baseline_loss(loss), huber_delta, horizon
        ),
    }
    predictions: dict[str, dict[str, np.ndarray]] = {}
    seconds: dict[str, float] = {}
    unknown = set(only) - set(fitters)
    if unknown:
        raise ValueError(f"unknown baseline(s) {sorted(unknown)}; known: {BASELINES}")
    for name in only:
        fit = fitters[name]
        started = time.perf_counter()
        predict = fit()
        seconds[name] = round(time.perf_counter() - started, 3)
        predictions[name] = {
            split: np.asarray(predict(frame), dtype=float) for split, frame in evaluate_on.items()
        }
    return predictions, seconds
