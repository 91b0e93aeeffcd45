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
    newey_west_se,
    paired_difference,
    paired_series_difference,
    per_date_correlation,
    rank_ic,
    rank_ic_stats,
    seed_paired_difference,
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


def test_tied_forecasts_share_a_quantile_whatever_the_row_order(frame: pd.DataFrame) -> None:
    """A constant forecast has no decile spread (it used to get one from the row order, of either sign);
    tied rows share a quantile; without ties the quantiles are the ordinal ones."""
    constant = frame.assign(prediction=0.0)
    assert np.isnan(evaluate(constant)["top_bottom_decile"])
    assert np.isnan(evaluate(constant.iloc[::-1])["top_bottom_decile"])
    date = pd.Timestamp("2024-01-02")
    tied = pd.DataFrame({"date": date, "prediction": [0.0] * 4 + [1.0] * 6 + [2.0] * 10})
    # average ranks 2.5, 7.5, 15.5 of 20 -> floor((r - 1) * 10 / 20) + 1 = 1, 4, 8
    assert assign_quantiles(tied).tolist() == [1] * 4 + [4] * 6 + [8] * 10
    assert assign_quantiles(tied.iloc[::-1]).tolist() == [8] * 10 + [4] * 6 + [1] * 4


# --- statistics over dates -------------------------------------------------------------------------------
def test_newey_west_lag0_is_the_classic_standard_error() -> None:
    x = np.array([0.02, 0.05, -0.01, 0.04, 0.00])
    assert newey_west_se(x, 0) == pytest.approx(np.std(x, ddof=1) / np.sqrt(len(x)))
    assert np.isnan(newey_west_se(np.array([0.1]), 0))


def test_newey_west_with_lag_by_hand() -> None:
    x = np.array([1.0, 2.0, 4.0, 3.0])  # mean 2.5; deviations -1.5, -0.5, 1.5, 0.5
    n = 4
    g0 = (2.25 + 0.25 + 2.25 + 0.25) / n  # 1.25
    g1 = ((-0.5 * -1.5) + (1.5 * -0.5) + (0.5 * 1.5)) / n  # 0.1875
    g2 = ((1.5 * -1.5) + (0.5 * -0.5)) / n  # -0.625
    lrv1 = g0 + 2 * (1 - 1 / 2) * g1
    lrv2 = g0 + 2 * (1 - 1 / 3) * g1 + 2 * (1 - 2 / 3) * g2
    assert newey_west_se(x, 1) == pytest.approx(np.sqrt(lrv1 / (n - 1)))
    assert newey_west_se(x, 2) == pytest.approx(np.sqrt(lrv2 / (n - 1)))
    # positively autocorrelated series: the lag widens the standard error
    trend = np.repeat([0.01, 0.03, -0.02, 0.04, 0.0], 4)
    assert newey_west_se(trend, 3) > newey_west_se(trend, 0)


def test_thinned_horizon_counts_the_overlap_in_positions() -> None:
    """Labels over h days overlap h - 1 dates ahead; on every k-th date they overlap ceil(h / k) - 1
    positions ahead (hand counts on evenly spaced subsets of 181 dates: spacing (181 - 1) / (n - 1))."""
    from modeling.data.corpus import evenly_spaced_dates
    from modeling.metrics import thinned_horizon

    assert thinned_horizon(5, 181, 181) == 5  # every date
    assert thinned_horizon(1, 10, 181) == 1
    assert thinned_horizon(5, 91, 181) == 3  # every 2nd date: t and t+2, t+4 share label days
    assert thinned_horizon(5, 37, 181) == 1  # every 5th: t+5's label starts after t's ends
    assert thinned_horizon(20, 37, 181) == 4  # every 5th: t+5, t+10, t+15 overlap t's 20 days
    kept = evenly_spaced_dates(np.arange(181), 37)
    assert set(np.diff(kept)) == {5}
    # a spacing of 2.5 (7 of 16 dates): the rounded picks sit 2 or 3 days apart, so two positions ahead
    # can be 4 days, and a 5-day label still overlaps there; the mean spacing says ceil(5 / 2.5) = 2
    picks = evenly_spaced_dates(np.arange(16), 7)
    assert (picks[2:] - picks[:-2]).min() == 4 and (picks[3:] - picks[:-3]).min() >= 5
    assert thinned_horizon(5, 7, 16) == 3
    for kept, total, h in ((10, 23, 5), (16, 179, 20), (24, 240, 5), (7, 50, 10), (90, 179, 3), (13, 16, 5)):
        picks = evenly_spaced_dates(np.arange(total), kept)
        k = thinned_horizon(h, kept, total)  # labels k positions apart never share a day; k - 1 apart can
        assert (picks[k:] - picks[:-k]).min() >= h and (k == 1 or (picks[k - 1 :] - picks[: 1 - k]).min() < h)


def test_rank_ic_stats_and_evaluate_carry_se_and_dates(frame: pd.DataFrame) -> None:
    daily = per_date_correlation(frame, method="spearman")
    stats = rank_ic_stats(frame)
    assert stats.n_dates == 3 and stats.mean == pytest.approx(daily.mean())
    assert stats.se == pytest.approx(daily.std(ddof=1) / np.sqrt(3))
    assert stats.t == pytest.approx(stats.mean / stats.se)
    result = evaluate(frame)
    assert result["rank_ic_se"] == pytest.approx(stats.se)
    assert result["rank_ic_n_dates"] == 3 and result["rank_ic_t"] == pytest.approx(stats.t)
    assert evaluate(frame, horizon=2)["rank_ic_se"] == pytest.approx(newey_west_se(daily.to_numpy(), 1))


def test_paired_difference_by_hand(frame: pd.DataFrame) -> None:
    rng = np.random.default_rng(3)
    frame = frame.assign(other=frame["prediction"] + rng.normal(0, 1.0, len(frame)))
    a = per_date_correlation(frame, "prediction", method="spearman")
    b = per_date_correlation(frame, "other", method="spearman")
    diff = (a - b).to_numpy()
    paired = paired_difference(frame, "prediction", "other")
    assert paired.n_dates == 3
    assert paired.delta == pytest.approx(diff.mean())
    assert paired.se == pytest.approx(diff.std(ddof=1) / np.sqrt(3))
    assert paired.t == pytest.approx(diff.mean() / (diff.std(ddof=1) / np.sqrt(3)))
    assert paired.a.mean == pytest.approx(a.mean()) and paired.b.mean == pytest.approx(b.mean())
    # a forecast against itself: no difference, no spread
    same = paired_difference(frame, "prediction", "prediction")
    assert same.delta == 0 and same.se == 0 and np.isnan(same.t)


def test_paired_difference_uses_common_dates_only() -> None:
    a = pd.Series([0.1, 0.2, 0.3], index=pd.to_datetime(["2024-01-01", "2024-01-02", "2024-01-03"]))
    b = pd.Series(
        [0.0, np.nan, 0.1, 0.5],
        index=pd.to_datetime(["2024-01-01", "2024-01-02", "2024-01-03", "2024-01-04"]),
    )
    paired = paired_series_difference(a, b)
    assert paired.n_dates == 2 and paired.delta == pytest.approx((0.1 + 0.2) / 2)
    assert paired.se == pytest.approx(np.std([0.1, 0.2], ddof=1) / np.sqrt(2))


def test_paired_difference_is_on_the_rows_both_forecasts_have(frame: pd.DataFrame) -> None:
    """Where one forecast is missing on some rows (a model absent from a backtest window), both daily
    correlations are taken on the rows they share, not each on its own rows."""
    rng = np.random.default_rng(5)
    frame = frame.assign(other=frame["prediction"] + rng.normal(0, 1.0, len(frame)))
    gappy = frame.assign(other=frame["other"].where(frame.index % 2 == 0))
    shared = gappy.dropna(subset=["other"])
    a = per_date_correlation(shared, "prediction", method="spearman")
    b = per_date_correlation(shared, "other", method="spearman")
    paired = paired_difference(gappy, "prediction", "other")
    assert paired.n_dates == len(a) == 3
    assert paired.a.mean == pytest.approx(a.mean()) and paired.b.mean == pytest.approx(b.mean())
    assert paired.delta == pytest.approx((a - b).mean())
    full_a = per_date_correlation(frame, "prediction", method="spearman")
    assert paired.a.mean != pytest.approx(full_a.mean())  # the rows differ, so the number must too


def test_paired_se_is_smaller_than_either_when_noise_is_shared() -> None:
    """Two forecasts that share most of their daily noise: the paired SE is far below the SE of either."""
    rng = np.random.default_rng(0)
    rows = []
    for d in pd.bdate_range("2024-01-01", periods=60):
        signal = rng.normal(size=200)
        label = 0.1 * signal + rng.normal(size=200)
        common = rng.normal(size=200)
        rows.append(pd.DataFrame({"date": d, "label": label, "a": signal + 3 * common, "b": 3 * common}))
    frame = pd.concat(rows, ignore_index=True)
    paired = paired_difference(frame, "a", "b")
    assert paired.se < 0.5 * min(paired.a.se, paired.b.se)
    assert paired.t > 3  # a carries the signal, b does not


def test_seed_paired_difference_by_hand() -> None:
    """Three seeds on three dates: the per-seed deltas, their SE over seeds, and the pooled date SE."""
    dates = pd.to_datetime(["2024-01-01", "2024-01-02", "2024-01-03"])
    a = [pd.Series(v, index=dates) for v in ([0.10, 0.20, 0.30], [0.00, 0.10, 0.50], [0.20, 0.20, 0.20])]
    b = [pd.Series(v, index=dates) for v in ([0.00, 0.10, 0.20], [0.10, 0.10, 0.10], [0.20, 0.30, 0.40])]
    paired = seed_paired_difference(a, b)
    # per seed: means of (0.1, 0.1, 0.1), (-0.1, 0, 0.4), (0, -0.1, -0.2)
    deltas = np.array([0.1, 0.1, -0.1])
    assert paired.n_seeds == 3
    np.testing.assert_allclose(paired.deltas, deltas, atol=1e-12)
    assert paired.delta == pytest.approx(0.1 / 3)
    se_seeds = np.sqrt(((deltas - deltas.mean()) ** 2).sum() / 2) / np.sqrt(3)
    assert paired.se_seeds == pytest.approx(se_seeds)
    assert paired.t_seeds == pytest.approx((0.1 / 3) / se_seeds)
    # pooled: the seeds' daily means, a = (0.1, 1/6, 1/3), b = (0.1, 1/6, 0.7/3): daily diff (0, 0, 0.1)
    pooled = np.array([0.0, 0.0, 0.1])
    assert paired.pooled.delta == pytest.approx(pooled.mean())
    assert paired.pooled.se == pytest.approx(pooled.std(ddof=1) / np.sqrt(3))
    assert paired.pooled.n_dates == 3
    # the decision t is the cautious one: the seeds' (0.5) here, not the dates' (1.0)
    assert paired.t == pytest.approx(min(paired.t_seeds, paired.pooled.t, key=abs))
    assert abs(paired.t) < abs(paired.pooled.t)
    assert "over 3 seeds" in str(paired) and "+0.1000 / +0.1000 / -0.1000" in str(paired)


def test_seed_paired_difference_one_seed_and_mismatch() -> None:
    dates = pd.to_datetime(["2024-01-01", "2024-01-02", "2024-01-03"])
    a, b = pd.Series([0.1, 0.3, 0.2], index=dates), pd.Series([0.0, 0.1, 0.1], index=dates)
    one = seed_paired_difference([a], [b])
    assert np.isnan(one.se_seeds) and one.t == pytest.approx(one.pooled.t)
    assert one.delta == pytest.approx(paired_series_difference(a, b).delta)
    assert str(one) == str(paired_series_difference(a, b))  # one seed: just its paired difference
    with pytest.raises(ValueError, match="same number"):
        seed_paired_difference([a, a], [b])
