"""Training targets, the per-date correlation loss and date-grouped batches, against hand computations."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import norm, pearsonr

from modeling.data.corpus import epoch_batches, read_corpus_split, sample_rows_by_date, train_sample
from modeling.losses import ic_loss, ic_mse_loss, per_group_correlation
from modeling.targets import tempered_weights, training_targets
from modeling.train import TrainConfig


@pytest.fixture
def frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "date": pd.to_datetime(["2024-01-02"] * 4 + ["2024-01-03"] * 3),
            "label": [1.0, -2.0, 30.0, 0.5, 0.0, 6.0, -1.0],
        }
    )


def test_clip_and_cross_sectional_targets_by_hand(frame: pd.DataFrame) -> None:
    assert training_targets(frame, "none").tolist() == frame["label"].tolist()
    np.testing.assert_allclose(training_targets(frame, "clip", 3.0), [1, -2, 3, 0.5, 0, 3, -1])
    # cs_zscore: per date (x - mean) / std (ddof=1), then clipped
    day1 = np.array([1.0, -2.0, 30.0, 0.5])
    z1 = (day1 - day1.mean()) / day1.std(ddof=1)
    day2 = np.array([0.0, 6.0, -1.0])
    z2 = (day2 - day2.mean()) / day2.std(ddof=1)
    np.testing.assert_allclose(
        training_targets(frame, "cs_zscore", 1.2), np.clip([*z1, *z2], -1.2, 1.2), atol=1e-6
    )
    # cs_rank: the normal quantile of (rank - 0.5) / n within each date
    ranks = np.array([3, 1, 4, 2, 2, 3, 1], dtype=float)
    n = np.array([4, 4, 4, 4, 3, 3, 3], dtype=float)
    np.testing.assert_allclose(training_targets(frame, "cs_rank"), norm.ppf((ranks - 0.5) / n), atol=1e-6)
    # the extreme 30 is just the top rank: its target is the same as any other day-top's
    assert training_targets(frame, "cs_rank")[2] == pytest.approx(norm.ppf(3.5 / 4))
    with pytest.raises(ValueError, match="target transform"):
        training_targets(frame, "log")


def test_cross_sectional_targets_refuse_repeated_rows(frame: pd.DataFrame) -> None:
    """A resampled training set repeats rows: a per-date rank or z-score over the draws is not the row's
    place in its cross-section (the live rows'), so it is refused; row-wise transforms do not care."""
    keyed = frame.assign(symbol=["A", "B", "C", "D", "A", "B", "C"])
    np.testing.assert_allclose(training_targets(keyed, "cs_rank"), training_targets(frame, "cs_rank"))
    drawn = pd.concat([keyed, keyed.iloc[[0, 0]]], ignore_index=True)
    for transform in ("cs_rank", "cs_zscore"):
        with pytest.raises(ValueError, match="2 rows repeat a \\(date, symbol\\)"):
            training_targets(drawn, transform)
    assert training_targets(drawn, "clip", 3.0).tolist()[-2:] == [1.0, 1.0]


def test_tempered_weights() -> None:
    w = np.array([0.5, 1.0, 2.0, 0.5])
    assert tempered_weights(w, 1.0).tolist() == w.tolist()
    assert tempered_weights(w, 0.0).tolist() == [1.0] * 4
    half = np.sqrt(w) / np.sqrt(w).mean()
    np.testing.assert_allclose(tempered_weights(w, 0.5), half, rtol=1e-6)


def test_train_sample_carries_the_tempered_bucket_weights(tiny_data) -> None:
    """What the model and the baselines train on: the corpus's bucket weights raised to `weight_power`
    over the whole train split and rescaled to mean 1 (0.5 halves their log spread; 1 keeps them)."""
    _, corpus = tiny_data
    stored = read_corpus_split(corpus, "train", ["date", "symbol", "weight"])
    assert stored["weight"].std() > 0.2  # uneven, so each power gives different weights
    for power in (1.0, 0.5, 0.0):
        rows = train_sample(
            corpus, TrainConfig(weight_power=power), columns=["date", "symbol", "label", "weight"]
        )
        both = rows.merge(stored, on=["date", "symbol"], suffixes=("", "_stored"), validate="one_to_one")
        assert len(both) == len(stored)
        expected = both["weight_stored"].to_numpy() ** power
        if power != 1.0:  # power 1 keeps the weights exactly as the training set built them
            expected = expected / expected.mean()
        np.testing.assert_allclose(both["weight"], expected, rtol=1e-5)
    half = train_sample(corpus, TrainConfig(weight_power=0.5), columns=["date", "symbol", "label", "weight"])
    ratio = half["weight"].max() / half["weight"].min()
    assert ratio == pytest.approx(np.sqrt(stored["weight"].max() / stored["weight"].min()), rel=1e-5)


def test_per_group_correlation_and_ic_loss_by_hand() -> None:
    rng = np.random.default_rng(0)
    pred, target = rng.normal(size=12), rng.normal(size=12)
    weight = np.ones(12)
    corr = per_group_correlation(
        torch.tensor(pred), torch.tensor(target), torch.tensor(weight), group_size=4
    ).numpy()
    expected = [pearsonr(pred[i : i + 4], target[i : i + 4])[0] for i in (0, 4, 8)]
    np.testing.assert_allclose(corr, expected, atol=1e-5)
    loss = ic_loss(torch.tensor(pred), torch.tensor(target), torch.tensor(weight), 4)
    assert float(loss) == pytest.approx(-np.mean(expected), abs=1e-5)
    # weighted: a weight of 2 counts a row twice
    w = np.array([2.0, 1, 1, 1])
    p, y = pred[:4], target[:4]
    dup_p, dup_y = np.r_[p, p[0]], np.r_[y, y[0]]
    weighted = per_group_correlation(torch.tensor(p), torch.tensor(y), torch.tensor(w), 4)
    assert float(weighted[0]) == pytest.approx(pearsonr(dup_p, dup_y)[0], abs=1e-5)
    # blind to level and scale: 3 x pred + 5 has the same loss
    shifted = ic_loss(torch.tensor(3 * pred + 5), torch.tensor(target), torch.tensor(weight), 4)
    assert float(shifted) == pytest.approx(float(loss), abs=1e-5)
    with pytest.raises(ValueError, match="groups of 5"):
        per_group_correlation(torch.tensor(pred), torch.tensor(target), torch.tensor(weight), 5)


def test_ic_loss_sees_cs_zscore_targets_as_the_raw_label_clipped() -> None:
    """Under the per-date IC loss, `cs_zscore` is the raw label with only its clip: a per-date affine map
    leaves each date group's correlation unchanged (why the route measures the clip, BENCHMARKS.md)."""
    rng = np.random.default_rng(1)
    dates = np.repeat(pd.date_range("2024-01-02", periods=3), 8)
    label = rng.standard_t(3, size=24) * 2.0 + np.repeat([0.5, -1.0, 3.0], 8)
    frame = pd.DataFrame({"date": dates, "label": label})
    pred, weight = torch.tensor(rng.normal(size=24)), torch.tensor(rng.uniform(0.5, 2.0, size=24))
    raw = ic_loss(pred, torch.tensor(training_targets(frame, "none")), weight, 8)
    unclipped = ic_loss(pred, torch.tensor(training_targets(frame, "cs_zscore", 1e6)), weight, 8)
    assert float(unclipped) == pytest.approx(float(raw), abs=1e-6)
    # a clip that binds changes it: the only difference between the two targets under this loss
    clipped = ic_loss(pred, torch.tensor(training_targets(frame, "cs_zscore", 0.5)), weight, 8)
    assert abs(float(clipped) - float(raw)) > 1e-3


def test_ic_loss_gradient_pushes_towards_the_target() -> None:
    torch.manual_seed(0)
    target = torch.randn(32)
    pred = torch.zeros(32, requires_grad=True)
    opt = torch.optim.SGD([pred], lr=0.5)
    with torch.no_grad():
        pred.add_(0.01 * torch.randn(32))
    for _ in range(50):
        loss = ic_loss(pred, target, torch.ones(32), 8)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < -0.95


def test_ic_mse_loss_by_hand() -> None:
    rng = np.random.default_rng(1)
    pred, target = rng.normal(size=8), rng.normal(size=8)
    weight = rng.uniform(0.5, 2.0, size=8)
    args = [torch.tensor(pred), torch.tensor(target), torch.tensor(weight), 4]

    def weighted_corr(p: np.ndarray, y: np.ndarray, w: np.ndarray) -> float:
        w = w / w.sum()
        dp, dy = p - w @ p, y - w @ y
        return float((w * dp * dy).sum() / np.sqrt((w * dp * dp).sum() * (w * dy * dy).sum()))

    correlation = np.mean(
        [weighted_corr(pred[i : i + 4], target[i : i + 4], weight[i : i + 4]) for i in (0, 4)]
    )
    squared = float((weight * (pred - target) ** 2).sum() / weight.sum())
    assert float(ic_mse_loss(*args, 0.5)) == pytest.approx(-correlation + 0.5 * squared, abs=1e-5)
    assert float(ic_mse_loss(*args, 0.0)) == float(ic_loss(*args))  # weight 0: the correlation alone
    # under DDP (2 processes): the squared error is normalised by the global weight sum, times 2
    half = ic_mse_loss(*args, 0.5, weight_total=torch.tensor(2 * weight.sum()), n_processes=2)
    assert float(half) == pytest.approx(-correlation + 0.5 * squared, abs=1e-5)
    # the squared error holds the scale the correlation leaves free: 3 x pred + 5 costs more
    scaled = ic_mse_loss(torch.tensor(3 * pred + 5), *args[1:], 0.5)
    assert float(scaled) > float(ic_mse_loss(*args, 0.5)) + 1.0


def test_ic_mse_loss_gradient_fits_rank_and_scale() -> None:
    torch.manual_seed(0)
    target = torch.randn(32)
    pred = (0.01 * torch.randn(32)).requires_grad_(True)
    opt = torch.optim.SGD([pred], lr=0.2)
    for _ in range(300):
        loss = ic_mse_loss(pred, target, torch.ones(32), 8, 1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < -0.95  # correlation near 1 and squared error near 0
    assert float(((pred - target) ** 2).mean()) < 0.01


def test_date_grouped_batches_hold_whole_groups_of_one_date() -> None:
    dates = np.repeat(np.arange(10), [20, 17, 16, 3, 40, 8, 8, 12, 16, 24])
    lengths = np.full(len(dates), 100)
    batches = epoch_batches(
        lengths, 16, seed=0, epoch=0, group_by_length=True, dates=dates, date_group_size=8
    )
    n_groups = sum(n // 8 for n in (20, 17, 16, 3, 40, 8, 8, 12, 16, 24))  # 2+2+2+0+5+1+1+1+2+3 = 19
    assert len(batches) == n_groups // 2
    for batch in batches:
        assert len(batch) == 16
        for g in (batch[:8], batch[8:]):
            assert len(set(dates[g])) == 1  # one date per group of 8
    flat = [i for b in batches for i in b]
    assert len(flat) == len(set(flat))  # no row twice
    assert batches == epoch_batches(lengths, 16, 0, 0, True, dates=dates, date_group_size=8)
    assert batches != epoch_batches(lengths, 16, 0, 1, True, dates=dates, date_group_size=8)


def test_sample_by_date_draws_whole_groups() -> None:
    frame = pd.DataFrame({"date": np.repeat(pd.bdate_range("2024-01-01", periods=200), 50), "x": 1})
    sample = sample_rows_by_date(frame, 2_000, group=16, seed=0)
    counts = sample.groupby("date").size()
    assert (counts % 16 == 0).all() and set(counts) <= {16, 32}
    assert abs(len(sample) - 2_000) < 300  # the share is kept in expectation (10 rows a date)
    everything = sample_rows_by_date(frame, None, group=16, seed=0)
    assert len(everything) == 200 * 48  # every date cut to a multiple of 16


def test_config_refuses_an_ic_loss_without_date_groups() -> None:
    with pytest.raises(ValueError, match="date_group_size"):
        TrainConfig(loss="ic")
    with pytest.raises(ValueError, match="multiple of date_group_size"):
        TrainConfig(loss="ic", date_group_size=12, batch_size=32)
    assert TrainConfig(loss="ic", date_group_size=16, batch_size=32).date_group_size == 16
    with pytest.raises(ValueError, match="ic_mse_weight"):
        TrainConfig(loss="mse", ic_mse_weight=1.0)  # the anchor belongs to the correlation loss
    with pytest.raises(ValueError, match="ic_mse_weight"):
        TrainConfig(loss="ic", date_group_size=16, ic_mse_weight=-0.1)
    assert TrainConfig(loss="ic", date_group_size=16, ic_mse_weight=0.5).ic_mse_weight == 0.5


def test_each_process_gets_whole_date_groups_or_the_run_stops_before_loading() -> None:
    """Under DDP a process correlates within the groups of its own share of the batch: a share that is
    not whole groups fails at setup, before the data and the model load."""
    from modeling.train_setup import process_share

    assert process_share(32, 2, 16) == 16 and process_share(128, 8, 16) == 16
    assert process_share(32, 4) == 8  # plain rows: any even split
    with pytest.raises(ValueError, match="not whole date groups of 16; set batch_size to a multiple of 128"):
        process_share(32, 8, 16)
    with pytest.raises(ValueError, match="does not split over 3 processes"):
        process_share(32, 3, 16)
