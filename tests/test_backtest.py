"""Walk-forward backtest: the window plan is purged; portfolio arithmetic matches a hand computation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from modeling.backtest import (
    PortfolioSpec,
    WindowSpec,
    paired_rank_ic,
    plan_windows,
    portfolio_metrics,
    portfolio_returns,
    rank_ic_by_month,
    risk_analysis,
    signal_summary,
    topk_dropout_holdings,
)
from modeling.metrics import per_date_correlation

SYMBOLS = list("ABCDEF")
SCORES = [  # forecasts of days 1..3
    [6, 5, 4, 3, 2, 1],
    [1, 6, 5, 4, 3, 2],
    [2, 3, 6, 5, 4, 1],
]
RETURNS = [  # next-day returns of days 1..3
    [0.01, 0.03, -0.01, 0.00, 0.02, -0.03],
    [0.02, -0.01, 0.04, 0.01, 0.00, -0.02],
    [0.00, 0.01, -0.02, 0.03, -0.01, 0.05],
]
SPEC = PortfolioSpec(topk=2, n_drop=1, open_cost=0.001, close_cost=0.002)


def _frames() -> tuple[pd.DataFrame, pd.DataFrame]:
    dates = pd.bdate_range("2024-01-01", periods=3)
    scores = pd.DataFrame(
        [(d, s, float(SCORES[i][j])) for i, d in enumerate(dates) for j, s in enumerate(SYMBOLS)],
        columns=["date", "symbol", "m"],
    )
    returns = pd.DataFrame(
        [(d, s, RETURNS[i][j]) for i, d in enumerate(dates) for j, s in enumerate(SYMBOLS)],
        columns=["date", "symbol", "ret"],
    )
    return scores, returns


def test_topk_dropout_follows_qlib_rule_by_hand() -> None:
    scores, _ = _frames()
    ranked = [g.set_index("symbol")["m"] for _, g in scores.groupby("date")]
    held = topk_dropout_holdings(ranked, SPEC)
    # day 1: buy the 2 best (A, B). Day 2: held A(1), B(6) + best candidate C(5): A is the worst of the
    # three -> sell A, buy C. Day 3: held C(6), B(3) + candidate D(5): B is the worst -> sell B, buy D.
    assert [sorted(h) for h in held] == [["A", "B"], ["B", "C"], ["C", "D"]]
    # holdings all better than every candidate: nothing is sold
    assert topk_dropout_holdings([ranked[0], ranked[0]], SPEC)[1] == ["A", "B"]


def test_portfolio_returns_costs_turnover_and_drawdown_by_hand() -> None:
    scores, returns = _frames()
    daily = portfolio_returns(scores, returns, "m", SPEC)
    bench = [0.02 / 6, 0.04 / 6, 0.06 / 6]
    topk = [(0.01 + 0.03) / 2, (-0.01 + 0.04) / 2, (-0.02 + 0.03) / 2]
    cost = [1.0 * 0.001, 0.5 * 0.001 + 0.5 * 0.002, 0.5 * 0.001 + 0.5 * 0.002]
    np.testing.assert_allclose(daily["benchmark"], bench, atol=1e-15)
    np.testing.assert_allclose(daily["excess_return_without_cost"], np.subtract(topk, bench), atol=1e-15)
    with_cost = np.subtract(topk, bench) - cost  # 0.0156667, 0.0068333, -0.0065
    np.testing.assert_allclose(daily["excess_return_with_cost"], with_cost, atol=1e-15)
    np.testing.assert_allclose(daily["topk_turnover"], [0.5, 0.5, 0.5])  # one-way: (bought + sold) / 2
    # long-short with 6 names: one name each side. Long A, B, C; short F, A, F
    ls = [0.01 - (-0.03), -0.01 - 0.02, -0.02 - 0.05]
    ls_cost = [0.001 + 0.001, 0.003 + 0.003, 0.003 + 0.003]  # enter both; then swap both (0.1% + 0.2%)
    np.testing.assert_allclose(daily["long_short_without_cost"], ls, atol=1e-15)
    np.testing.assert_allclose(daily["long_short_with_cost"], np.subtract(ls, ls_cost), atol=1e-15)
    np.testing.assert_allclose(daily["long_short_turnover"], [0.5, 1.0, 1.0])

    metrics = portfolio_metrics(daily)
    mean = with_cost.mean()
    std = np.sqrt(((with_cost - mean) ** 2).sum() / 2)
    assert metrics["excess_return_with_cost.mean"] == pytest.approx(mean, abs=1e-15)
    assert metrics["excess_return_with_cost.std"] == pytest.approx(std, abs=1e-15)
    assert metrics["excess_return_with_cost.annualized_return"] == pytest.approx(mean * 252, abs=1e-12)
    assert metrics["excess_return_with_cost.information_ratio"] == pytest.approx(mean / std * np.sqrt(252))
    # cumsum 0.0156667, 0.0225, 0.016: the drawdown is the last day's -0.0065
    assert metrics["excess_return_with_cost.max_drawdown"] == pytest.approx(-0.0065, abs=1e-15)
    assert metrics["topk_turnover.mean"] == pytest.approx(0.5)
    assert metrics["missing_returns"] == 0


def test_a_held_name_without_a_return_earns_zero_and_is_counted() -> None:
    scores, returns = _frames()
    returns = returns[~((returns["date"] == returns["date"].min()) & (returns["symbol"] == "B"))]
    daily = portfolio_returns(scores, returns, "m", SPEC)
    assert daily["topk_return"].iloc[0] == pytest.approx(0.01 / 2)  # B's missing return counts as 0
    assert daily["benchmark"].iloc[0] == pytest.approx(-0.01 / 5)  # the benchmark: names with a return
    assert portfolio_metrics(daily)["missing_returns"] == 1


def test_a_held_name_without_a_forecast_still_earns_its_return() -> None:
    """Day 2 has no forecast of A or B (they left the universe): TopkDropout (n_drop 1) sells one of the
    two, keeps A, and A earns its known return (0.02), not 0; the benchmark stays the forecast names'."""
    scores, returns = _frames()
    day2 = scores["date"] == scores["date"].unique()[1]
    scores = scores[~(day2 & scores["symbol"].isin(["A", "B"]))]
    daily = portfolio_returns(scores, returns, "m", SPEC)
    assert topk_dropout_holdings([g.set_index("symbol")["m"] for _, g in scores.groupby("date")], SPEC)[
        1
    ] == ["A", "C"]
    assert daily["topk_return"].iloc[1] == pytest.approx((0.02 + 0.04) / 2)
    assert daily["benchmark"].iloc[1] == pytest.approx((0.04 + 0.01 + 0.00 - 0.02) / 4)
    assert portfolio_metrics(daily)["missing_returns"] == 0


def test_risk_analysis_matches_qlib_formulas() -> None:
    r = pd.Series([0.01, -0.02, 0.005, 0.0])
    out = risk_analysis(r)
    assert out["max_drawdown"] == pytest.approx(-0.02)  # from 0.01 down to -0.01
    assert out["annualized_return"] == pytest.approx(r.mean() * 252)
    assert out["information_ratio"] == pytest.approx(r.mean() / r.std(ddof=1) * np.sqrt(252))


def test_windows_are_purged_and_cover_the_period() -> None:
    calendar = pd.bdate_range("2020-01-01", periods=300)
    period = calendar[200:]
    for horizon in (1, 5):
        for spec in (WindowSpec(step=30, val_dates=20), WindowSpec(step=30, mode="sliding", train_dates=60)):
            windows = plan_windows(calendar, period, horizon, spec)
            assert [w.index for w in windows] == list(range(4))  # 100 dates in steps of 30: 30, 30, 30, 10
            assert sum(w.n_predict_dates for w in windows) == 100
            assert windows[0].predict[0] == period[0] and windows[-1].predict[1] == period[-1]
            pos = {d: i for i, d in enumerate(calendar)}
            for w in windows:
                # no training or validation label window (d, d+h] reaches the window's first predicted date
                assert pos[w.train[1]] + horizon < pos[w.validation[0]]
                assert pos[w.validation[1]] + horizon < pos[w.predict[0]]
                assert pos[w.validation[1]] - pos[w.validation[0]] + 1 == 20
                if spec.mode == "sliding":
                    assert pos[w.train[1]] - pos[w.train[0]] + 1 == 60
                else:
                    assert w.train[0] == calendar[0]
    with pytest.raises(ValueError, match="too little history"):
        plan_windows(calendar, calendar[10:40], 5, WindowSpec(step=10, val_dates=20))
    with pytest.raises(ValueError, match="sliding"):
        WindowSpec(mode="sliding")


def _planted(seed: int, shuffle: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A market where the forecast column `m` *is* the next return (up to noise-free ranking), or the
    same with the returns permuted within each date (the shuffled-label control)."""
    rng = np.random.default_rng(seed)
    dates = pd.bdate_range("2021-01-01", periods=120)
    symbols = [f"S{i:03d}" for i in range(200)]
    frame = pd.DataFrame([(d, s) for d in dates for s in symbols], columns=["date", "symbol"])
    frame["ret"] = rng.normal(0, 0.02, len(frame))
    frame["m"] = frame["ret"]
    frame["noise"] = rng.normal(size=len(frame))
    if shuffle:
        frame["ret"] = frame.groupby("date")["ret"].transform(
            lambda s: s.sample(frac=1, random_state=seed).values
        )
    return frame.rename(columns={"ret": "label"}).assign(ret=lambda f: f["label"]), frame


def test_planted_signal_scores_near_one_and_earns_a_large_excess_return() -> None:
    frame, _ = _planted(0, shuffle=False)
    summary = signal_summary(frame, ["m", "noise"])
    assert summary.loc["m", "RankIC"] > 0.99 and summary.loc["m", "n_dates"] == 120
    assert abs(summary.loc["noise", "RankIC"]) < 0.02
    paired = paired_rank_ic(frame, "m", "noise")
    assert paired["delta"] > 0.95 and paired["t"] > 50
    metrics = portfolio_metrics(
        portfolio_returns(frame, frame[["date", "symbol", "ret"]], "m", PortfolioSpec())
    )
    assert metrics["excess_return_with_cost.annualized_return"] > 1.0
    assert metrics["excess_return_with_cost.information_ratio"] > 5
    by_month = rank_ic_by_month(frame, ["m"])
    assert len(by_month) == 6 and (by_month["m"] > 0.99).all()
    # the reader's table: each month's mean with its SE and dates, by hand from the daily RankICs
    cells = rank_ic_by_month(frame, ["m"], cells=True)
    ric = per_date_correlation(frame, "m", "label", "spearman")
    month = ric[ric.index.to_period("M") == pd.Period(cells.index[0])]
    se = np.std(month, ddof=1) / np.sqrt(len(month))
    assert cells.loc[cells.index[0], "m"] == f"{month.mean():.4f} ± {se:.4f} ({len(month)} dates)"


def test_shuffled_labels_have_no_rank_ic_and_no_excess_return_after_cost() -> None:
    frame, _ = _planted(1, shuffle=True)
    summary = signal_summary(frame, ["m"])
    assert abs(summary.loc["m", "RankIC"]) < 0.01
    metrics = portfolio_metrics(
        portfolio_returns(frame, frame[["date", "symbol", "ret"]], "m", PortfolioSpec())
    )
    assert metrics["excess_return_with_cost.mean"] <= 0.0


def test_window_corpus_relabels_splits_and_weighs_later_rows_by_their_train_bucket() -> None:
    from modeling.backtest import Window, window_corpus

    dates = pd.bdate_range("2022-01-03", periods=10)
    split = ["train"] * 4 + ["validation"] * 3 + ["test"] * 3
    keys = pd.DataFrame(
        [(d, s, split[i]) for i, d in enumerate(dates) for s in ("X", "Y")],
        columns=["date", "symbol", "split"],
    )
    keys["bucket"] = np.where(keys["symbol"] == "X", "low", "high")
    keys["weight"] = np.where(keys["split"] != "train", 1.0, np.where(keys["bucket"] == "low", 0.5, 2.0))
    corpus = keys.drop(columns="bucket").assign(label=0.1, prompt="p")
    corpus.loc[19, "label"] = np.nan  # an unlabelled row is never part of a window
    window = Window(
        index=0,
        train=(dates[0], dates[5]),
        validation=(dates[6], dates[7]),
        predict=(dates[8], dates[9]),
        n_predict_dates=2,
    )
    out = window_corpus(corpus, keys, window)
    assert out.groupby("split")["date"].nunique().to_dict() == {"train": 6, "validation": 2, "test": 2}
    assert len(out) == 19
    # dates 4-5 were validation rows (weight 1): in this window's train they carry their bucket's weight
    later = out[(out["split"] == "train") & (out["date"] >= dates[4])]
    assert later.groupby("symbol")["weight"].unique().map(list).to_dict() == {"X": [0.5], "Y": [2.0]}
    assert set(out.loc[out["split"] == "test", "weight"]) == {0.5, 2.0}


def _feature_market(seed: int, shuffle: bool) -> pd.DataFrame:
    """A market whose first feature *is* the next return (up to tiny noise), or the same with the labels
    permuted within each date (the shuffled-label control); the other 15 features are noise."""
    from modeling.feature_registry import FEATURE_NAMES

    rng = np.random.default_rng(seed)
    dates = pd.bdate_range("2021-01-01", periods=200)
    symbols = [f"S{i:03d}" for i in range(300)]
    frame = pd.DataFrame([(d, s) for d in dates for s in symbols], columns=["date", "symbol"])
    ret = rng.normal(0, 0.02, len(frame))
    for i, name in enumerate(FEATURE_NAMES):
        frame[name] = ret + rng.normal(0, 1e-4, len(frame)) if i == 0 else rng.normal(size=len(frame))
    frame["ret"] = ret
    frame["label"] = ret / 0.02
    frame["weight"] = 1.0
    if shuffle:
        order = frame.groupby("date")["label"].transform(lambda s: s.sample(frac=1, random_state=seed).values)
        frame["label"] = order
        frame["ret"] = order * 0.02
    return frame


@pytest.mark.parametrize("shuffle", [False, True])
def test_walk_forward_baselines_find_a_planted_signal_and_nothing_in_shuffled_labels(shuffle: bool) -> None:
    """The backtest's loop with the real baseline fitting: windows planned and purged, every baseline
    trained per window on the rows before it, forecasts out of sample, then the analysis."""
    from modeling.backtest import analyse, window_rows
    from modeling.baselines import BaselineConfig
    from modeling.walk_forward import FEATURE_BASELINES, forecast_with_baselines

    frame = _feature_market(3, shuffle)
    calendar = pd.DatetimeIndex(sorted(frame["date"].unique()))
    windows = plan_windows(calendar, calendar[140:], horizon=1, spec=WindowSpec(step=30, val_dates=10))
    cfg = BaselineConfig(lgbm_estimators=60, mlp_epochs=3, seed=0)
    forecasts = []
    for window in windows:
        train, validation = window_rows(frame, window, "train"), window_rows(frame, window, "validation")
        predict = window_rows(frame, window, "predict")
        fitted, _ = forecast_with_baselines(train, validation, predict, cfg)
        forecasts.append(predict[["date", "symbol"]].assign(window=window.index, **fitted))
    oos = pd.concat(forecasts, ignore_index=True)
    assert len(oos) == 60 * 300 and not oos.duplicated(["date", "symbol"]).any()
    models = list(FEATURE_BASELINES)
    result = analyse(
        oos, frame[["date", "symbol", "label"]], frame[["date", "symbol", "ret"]], models, ["ridge"]
    )
    costs = [result.portfolio[m]["excess_return_with_cost.annualized_return"] for m in models]
    if not shuffle:
        assert (result.signal["RankIC"] > 0.9).all(), result.signal
        assert min(costs) > 1.0  # more than 100% a year over the universe, after costs
    else:
        assert (result.signal["RankIC"].abs() < 0.01).all(), result.signal
        # no edge after costs: no model's mean daily excess return is 2 standard errors above zero, and
        # none is positive at all (every baseline is a deterministic function of its rows and seed, so
        # this is one fixed outcome, not a draw that fails now and then: before the feature MLP's
        # dropout was seeded, its shuffled book once made +0.5% a year)
        edge = {
            m: result.portfolio[m]["excess_return_with_cost.mean"]
            / result.portfolio[m]["excess_return_with_cost.std"]
            * np.sqrt(oos["date"].nunique())
            for m in models
        }
        assert max(edge.values()) < 2.0, (edge, costs)
        assert max(costs) <= 0.0, costs


def test_the_feature_mlp_is_a_function_of_its_rows_and_seed_alone() -> None:
    """Two fits on the same rows with the same seed give the same forecasts whatever the process's global
    generator holds (its dropout used to draw from it), and another seed gives other forecasts."""
    import torch

    from modeling.baselines import BaselineConfig, FeatureScaler, fit_mlp_features

    frame = _feature_market(5, shuffle=False)
    dates = sorted(frame["date"].unique())
    train, validation = frame[frame["date"] < dates[150]], frame[frame["date"] >= dates[150]]
    cfg = BaselineConfig(mlp_epochs=2, seed=0)
    scaler = FeatureScaler.fit(train, cfg.clip_z)
    forecasts = []
    for global_seed, seed in ((1, 0), (2, 0), (1, 1)):
        torch.manual_seed(global_seed)
        fitted = fit_mlp_features(train, validation, scaler, BaselineConfig(mlp_epochs=2, seed=seed))
        forecasts.append(fitted(validation))
    np.testing.assert_array_equal(forecasts[0], forecasts[1])
    assert np.abs(forecasts[0] - forecasts[2]).max() > 1e-3


def test_the_signal_summary_gives_each_rank_ic_its_standard_error() -> None:
    frame, _ = _planted(2, shuffle=True)
    summary = signal_summary(frame, ["m"])
    daily = per_date_correlation(frame, "m", "label", "spearman")
    assert summary.loc["m", "RankIC_se"] == pytest.approx(daily.std(ddof=1) / np.sqrt(len(daily)), rel=1e-9)


@pytest.fixture(scope="module")
def reading_backbone(tmp_path_factory):
    """An embedded Llama a little wider than the session's tiny one (hidden 64, 2 layers): wide enough to
    learn to read a number from its digits in a few hundred steps."""
    from tests.conftest import build_tiny_backbone

    return build_tiny_backbone(tmp_path_factory.mktemp("reading") / "base_model", hidden_size=64)


@pytest.mark.slow
@pytest.mark.parametrize("shuffle", [False, True])
def test_walk_forward_llm_reads_a_planted_signal_and_finds_nothing_in_shuffled_labels(
    reading_backbone, tmp_path, shuffle: bool
) -> None:
    """The LLM regressor through a backtest window's real path (window corpus -> `TrainJob` with
    `backtest_output` -> `train_regressor` -> `run_window`, what the window's child process runs), on a
    market of 200 names whose label is a number in the prompt, with the profiles' recipe (rank-gaussian
    targets, the feature probe). A fresh 2-layer, 64-wide backbone learns to read the number digit by
    digit: 2,000 steps at lr 1e-3 take it to a RankIC of about 0.9 (`bench/bench_planted.py`: 0.906 ±
    0.005; 128 wide, 3,000 steps 0.970 ± 0.004; 40 names and 400 steps at lr 3e-3, this test's size
    before, 0.77-0.81), where the feature baselines, handed the number, reach 1.
    The shuffled control, same config: no model's RankIC or mean daily excess return after cost is beyond
    noise (|t| < 3 and t < 2 over the 40 predicted dates)."""
    from modeling.backtest import analyse
    from modeling.walk_forward import FEATURE_BASELINES, LLM_MODEL
    from tests.conftest import planted_prompt_market, planted_walk_forward

    n_symbols = 200
    frame = planted_prompt_market(shuffle, n_symbols=n_symbols)
    run = planted_walk_forward(reading_backbone, frame, tmp_path, steps=2000, lr=1e-3, eval_every=500)
    assert [(r["rows"], r["dates"]) for r in run["reports"]] == [(20 * n_symbols, 20)] * 2  # two windows
    oos, calendar = run["oos"], run["calendar"]
    assert len(oos) == 40 * n_symbols and oos["date"].min() == calendar[60]  # every name of every date
    models = [LLM_MODEL, *FEATURE_BASELINES]
    returns = frame[["date", "symbol"]].assign(ret=frame["fwd_ret"])
    result = analyse(oos, frame[["date", "symbol", "label"]], returns, models, ["ridge"])
    excess = {m: result.portfolio[m]["excess_return_with_cost.annualized_return"] for m in models}
    if not shuffle:
        assert result.signal.loc[LLM_MODEL, "RankIC"] > 0.85, result.signal
        assert (result.signal.loc[list(FEATURE_BASELINES), "RankIC"] > 0.95).all(), result.signal
        assert min(excess.values()) > 0.8, excess  # more than 80% a year over the universe, after costs
    else:
        t = result.signal["RankIC"] / result.signal["RankIC_se"]
        assert (t.abs() < 3).all(), result.signal
        # no edge after costs: no model's mean daily excess return is 2 standard errors above zero
        edge = {
            m: result.portfolio[m]["excess_return_with_cost.mean"]
            / result.portfolio[m]["excess_return_with_cost.std"]
            * np.sqrt(40)
            for m in models
        }
        assert max(edge.values()) < 2.0, (edge, excess)


def test_a_windows_baselines_stop_on_the_target_they_train_on(tiny_data, tmp_path) -> None:
    """The baselines fit the training target (rank-gaussian per date under cs_rank); LightGBM stops at
    its best l2 against the window's validation labels, so those must be on the same scale, not the
    stored label's."""
    from modeling.experiment import feature_rows
    from modeling.feature_registry import FEATURE_NAMES
    from modeling.job import TrainConfig
    from modeling.targets import training_targets
    from modeling.train import TrainJob
    from modeling.walk_forward import stopping_rows

    training_set, corpus = tiny_data
    train = TrainConfig(target_transform="cs_rank")
    job = TrainJob("base", str(corpus), str(tmp_path), {}, train=train, training_set_path=str(training_set))
    rows = stopping_rows(job, feature_rows(training_set))
    raw = pd.read_parquet(corpus, columns=["date", "symbol", "split", "label"]).query("split == 'validation'")
    raw = raw.assign(target=training_targets(raw, "cs_rank"))
    both = rows.merge(raw, on=["date", "symbol"], suffixes=("", "_stored"), validate="one_to_one")
    assert len(both) == len(rows) == len(raw) and both[list(FEATURE_NAMES)].notna().all().all()
    np.testing.assert_allclose(both["label"], both["target"], rtol=1e-6)
    assert np.allclose(both.groupby("date")["label"].mean(), 0.0, atol=1e-6)  # rank-gaussian per date
    assert not np.allclose(both["label"], both["label_stored"])
