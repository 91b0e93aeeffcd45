"""Each metric against a hand computation on a small frame."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.stats import pearsonr, spearmanr

from modeling.metrics import (
    assign_quantiles,
    directional_accuracy,
    evaluate,
    information_ratio,
    long_short_returns,
    per_date_correlation,
    rank_ic,
)


@pytest.fixture
def frame() -> pd.DataFrame:
    rng = np.random.default_rng(7)
    rows = []
    for d, n in zip(pd.bdate_range("2024-01-01", periods=4), (20, 20, 30, 2), strict=True):
        pred = rng.normal(size=n)
        label = 0.3 * pred + rng.normal(size=n)
        label[: min(3, n - 1)] = label[n - 1]  # ties in the label
        rows.append(pd.DataFrame({"date": d, "prediction": pred, "label": label, "fwd_ret": label / 100}))
    return pd.concat(rows, ignore_index=True)


def test_ic_and_rank_ic_per_date_match_scipy(frame: pd.DataFrame) -> None:
    ic = per_date_correlation(frame, method="pearson")
    rank = per_date_correlation(frame, method="spearman")
    dates = sorted(frame["date"].unique())
    assert list(ic.index) == dates[:3]  # the date with 2 names has no correlation
    for d in dates[:3]:
        part = frame[frame["date"] == d]
        assert ic[d] == pytest.approx(pearsonr(part["prediction"], part["label"])[0], abs=1e-12)
        assert rank[d] == pytest.approx(spearmanr(part["prediction"], part["label"])[0], abs=1e-12)
    assert rank_ic(frame) == pytest.approx(rank.mean())


def test_information_ratio_is_mean_over_sample_std() -> None:
    series = pd.Series([0.02, 0.05, -0.01, 0.04])
    assert information_ratio(series) == pytest.approx(0.025 / np.std(series, ddof=1))
    assert np.isnan(information_ratio(pd.Series([0.1])))
    assert np.isnan(information_ratio(pd.Series([0.1, 0.1])))


def test_deciles_and_long_short_by_hand() -> None:
    date = pd.Timestamp("2024-01-02")
    frame = pd.DataFrame(
        {"date": date, "prediction": np.arange(20.0)[::-1], "fwd_ret": np.arange(20.0) / 100}
    )
    deciles = assign_quantiles(frame)
    # 20 names: 2 per decile; the two highest predictions (rows 0, 1) are decile 10
    assert deciles.tolist() == [10, 10, 9, 9, 8, 8, 7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1]
    spread = long_short_returns(frame)
    # top decile fwd_ret mean (0 + 1)/2 / 100, bottom (18 + 19)/2 / 100
    assert spread[date] == pytest.approx((0.5 - 18.5) / 100)


def test_directional_accuracy_skips_zeros() -> None:
    frame = pd.DataFrame({"prediction": [1.0, -2.0, 0.5, 0.0, 3.0], "label": [2.0, 1.0, 0.0, 1.0, 4.0]})
    # rows kept: 0 (hit), 1 (miss), 4 (hit); row 2 has a zero label, row 3 a zero prediction
    assert directional_accuracy(frame) == pytest.approx(2 / 3)


def test_evaluate_collects_everything(frame: pd.DataFrame) -> None:
    result = evaluate(frame)
    labelled = frame
    err = labelled["prediction"] - labelled["label"]
    assert result["mse"] == pytest.approx(float((err**2).mean()))
    assert result["mae"] == pytest.approx(float(err.abs().mean()))
    assert result["rank_ic"] == pytest.approx(rank_ic(frame))
    assert result["n_rows"] == len(frame) and result["n_dates"] == 4 and result["n_dates_skipped"] == 1
    spread = long_short_returns(frame)
    assert result["top_bottom_decile"] == pytest.approx(spread.mean())
    assert result["top_bottom_decile"] > 0  # the prediction carries signal
    with pytest.raises(ValueError, match="non-finite"):
        evaluate(frame.assign(prediction=np.where(frame.index == 3, np.nan, frame["prediction"])))


def test_constant_predictions_have_no_ic(frame: pd.DataFrame) -> None:
    result = evaluate(frame.assign(prediction=0.0))
    assert np.isnan(result["rank_ic"]) and result["n_dates_skipped"] == 4
