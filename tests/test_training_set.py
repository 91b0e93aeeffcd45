"""Training set: purged splits, live rows, label transforms, bucket weights fit on train only."""

import duckdb
import numpy as np
import pandas as pd
import pytest

from modeling.buckets import BucketConfig
from modeling.data.features import LabelSpec as HorizonSpec
from modeling.data.features import build_features
from modeling.data.ingest import ingest_market_data
from modeling.data.synthetic import SyntheticMarketConfig, generate_synthetic_market
from modeling.data.training_set import LabelSpec, SplitSpec, build_training_set, plan_splits
from modeling.data.universe import UniverseSpec, build_universe


def _features(horizon: int) -> pd.DataFrame:
    con = duckdb.connect()
    ingest_market_data(
        con, frame=generate_synthetic_market(SyntheticMarketConfig(n_symbols=100, n_years=1.5, seed=5)).frame
    )
    build_universe(con, UniverseSpec(top_n=40))
    build_features(con, HorizonSpec(horizon=horizon))
    return con.execute("SELECT * FROM features").df()


@pytest.fixture(scope="module")
def features_h1() -> pd.DataFrame:
    return _features(1)


@pytest.fixture(scope="module")
def features_h5() -> pd.DataFrame:
    return _features(5)


def _calendar(features: pd.DataFrame) -> dict:
    dates = np.sort(features["date"].unique())
    return {pd.Timestamp(d): i for i, d in enumerate(dates)}


@pytest.mark.parametrize("horizon", [1, 5])
@pytest.mark.parametrize("explicit", [False, True])
def test_no_train_label_window_reaches_validation_or_test(features_h1, features_h5, horizon, explicit):
    features = features_h1 if horizon == 1 else features_h5
    spec = SplitSpec(validation_start="2020-01-02", test_start="2020-03-02") if explicit else SplitSpec()
    out, report = build_training_set(features, horizon, spec)
    pos = _calendar(features)
    idx = out["date"].map(pos)
    train, val, test = (idx[out["split"] == s] for s in ("train", "validation", "test"))
    # a label at t covers (t, t+h]: it must end before the next segment's first date
    assert train.max() + horizon < val.min()
    assert val.max() + horizon < test.min()
    # and the purge is exactly h dates, not more
    assert val.min() - train.max() == horizon + 1 and test.min() - val.max() == horizon + 1
    in_gap = features["date"].isin(report.plan.purged_dates) & features["fwd_ret"].notna()
    assert report.dropped["purged"] == in_gap.sum() > 0
    if explicit:
        assert str(out.loc[out["split"] == "test", "date"].min().date()) >= "2020-03-02"


def test_default_fractions_and_row_accounting(features_h1):
    out, report = build_training_set(features_h1, 1)
    labelled_dates = features_h1.loc[features_h1["fwd_ret"].notna(), "date"].nunique()
    per_split_dates = out.groupby("split")["date"].nunique()
    assert per_split_dates["test"] == round(0.20 * labelled_dates)
    assert per_split_dates["validation"] == round(0.15 * labelled_dates) - 1  # minus the purge
    # nothing lost silently: every input row is in the output or counted as dropped (weight mode)
    assert len(out) + sum(report.dropped.values()) == len(features_h1)
    assert (
        report.rows_by_split
        == out["split"]
        .value_counts()
        .reindex(["train", "validation", "test", "live"])
        .fillna(0)
        .astype(int)
        .to_dict()
    )


def test_live_rows_are_the_unlabelled_last_dates(features_h5):
    out, _ = build_training_set(features_h5, 5)
    live = out[out["split"] == "live"]
    last_dates = np.sort(features_h5["date"].unique())[-5:]
    assert set(live["date"]) == set(pd.to_datetime(last_dates))
    assert live["label"].isna().all() and (live["weight"] == 1.0).all() and live["bucket"].isna().all()
    assert out.loc[out["split"] != "live", "label"].notna().all()


def test_label_transforms_and_train_only_scale(features_h1):
    raw, r_raw = build_training_set(features_h1, 1, label_spec=LabelSpec("raw"))
    exc, r_exc = build_training_set(features_h1, 1, label_spec=LabelSpec("excess"))
    z, _ = build_training_set(features_h1, 1, label_spec=LabelSpec("cs_zscore", scale_to_unit_std=False))
    train = raw["split"] == "train"
    np.testing.assert_allclose(raw.loc[train, "label"] * r_raw.label_scale, raw.loc[train, "fwd_ret"])
    np.testing.assert_allclose(r_raw.label_scale, raw.loc[train, "fwd_ret"].std(ddof=0))
    np.testing.assert_allclose(exc.loc[train, "label"].std(ddof=0), 1.0)
    np.testing.assert_allclose(exc["label"] * r_exc.label_scale, exc["fwd_ret_excess"], equal_nan=True)
    per_date = z[z["split"].isin(["train", "test"])].groupby("date")["label"]
    np.testing.assert_allclose(per_date.mean(), 0, atol=1e-12)
    np.testing.assert_allclose(per_date.std(ddof=0), 1, rtol=1e-9)


def test_scale_buckets_and_weights_are_fit_on_train_only(features_h1):
    cfg = BucketConfig(scheme="inverse")
    base, r_base = build_training_set(features_h1, 1, bucket_cfg=cfg)
    changed = features_h1.copy()
    later = changed["date"] >= r_base.plan.validation[0]
    changed.loc[later, ["fwd_ret", "fwd_ret_excess"]] *= 25.0  # wild validation/test labels
    other, r_other = build_training_set(changed, 1, bucket_cfg=cfg)
    assert r_other.label_scale == r_base.label_scale
    assert r_other.bucket_model.to_dict() == r_base.bucket_model.to_dict()
    pd.testing.assert_frame_equal(base[base["split"] == "train"], other[other["split"] == "train"])
    evaluation = other[other["split"].isin(["validation", "test"])]
    assert (evaluation["weight"] == 1.0).all()
    assert evaluation["bucket"].isin(["extreme_neg", "extreme_pos"]).mean() > 0.5  # natural, unweighted
    assert np.isclose(base.loc[base["split"] == "train", "weight"].mean(), 1.0)


def test_resample_mode_is_seeded_and_hits_the_target_shares(features_h1):
    cfg = BucketConfig(scheme="inverse", mode="resample", target_size=20_000, seed=11)
    out, report = build_training_set(features_h1, 1, bucket_cfg=cfg)
    again, _ = build_training_set(features_h1, 1, bucket_cfg=cfg)
    pd.testing.assert_frame_equal(out, again)
    train = out[out["split"] == "train"]
    assert len(train) == 20_000 and (train["weight"] == 1.0).all()
    target = report.rebalanced.before["effective_share"]
    drawn = train["bucket"].value_counts(normalize=True).reindex(target.index).fillna(0)
    assert np.abs(drawn - target).max() < 0.02
    other, _ = build_training_set(
        features_h1,
        1,
        bucket_cfg=BucketConfig(scheme="inverse", mode="resample", target_size=20_000, seed=12),
    )
    assert not other[other["split"] == "train"][["date", "symbol"]].equals(train[["date", "symbol"]])


def test_too_short_history_is_a_clear_error(features_h1):
    dates = np.sort(features_h1["date"].unique())[:6]
    with pytest.raises(ValueError, match="cannot hold non-empty train, validation and test"):
        plan_splits(pd.DatetimeIndex(dates), SplitSpec(), horizon=5)
    with pytest.raises(ValueError, match="both validation_start and test_start"):
        SplitSpec(validation_start="2020-01-01")


def test_purge_shorter_than_the_horizon_is_refused():
    """purge_days < h would let the last train labels read closes inside validation."""
    dates = pd.bdate_range("2020-01-01", periods=300)
    with pytest.raises(ValueError, match="shorter than the label horizon"):
        plan_splits(dates, SplitSpec(purge_days=2), horizon=5)
    plan = plan_splits(dates, SplitSpec(purge_days=7), horizon=5)  # a longer embargo is fine
    assert plan.purge_days == 7
    assert dates.get_loc(plan.validation[0]) - dates.get_loc(plan.train[1]) == 8


def test_prompt_percentiles_rank_each_dates_whole_universe(features_h1):
    """A name that stops trading at t+1 has no label at t and leaves the set, but it was part of t's
    cross-section: every other name's percentile at t is its rank among the whole universe, as at
    serving time, not among the survivors to t+h."""
    from modeling.prompt import PromptBuilder, PromptDataError

    features = features_h1.copy()
    day = features.loc[features["fwd_ret"].notna(), "date"].iloc[len(features) // 2]
    leaver = features.loc[features["date"] == day, "symbol"].iloc[0]
    features.loc[
        (features["date"] == day) & (features["symbol"] == leaver), ["fwd_ret", "fwd_ret_excess"]
    ] = np.nan
    out, report = build_training_set(features, 1)
    assert report.dropped["unlabelled"] >= 1
    kept = out[(out["date"] == day)].sort_values("symbol")
    assert leaver not in set(kept["symbol"]) and len(kept) == (features["date"] == day).sum() - 1
    whole = PromptBuilder(number_format="percentile").with_percentiles(features[features["date"] == day])
    whole = whole.set_index("symbol").loc[kept["symbol"]]
    survivors = PromptBuilder(number_format="percentile").with_percentiles(
        features[(features["date"] == day) & (features["symbol"] != leaver)]
    )
    for name in ("ret_5d", "vol_20d"):
        assert kept[f"{name}_pct"].astype(int).tolist() == whole[f"{name}_pct"].tolist()
        # ranked among the survivors, some name's percentile would differ: the test can tell them apart
        assert (
            kept[f"{name}_pct"].astype(int).tolist()
            != survivors.set_index("symbol").loc[kept["symbol"], f"{name}_pct"].tolist()
        )
    # the prompt builder takes the stored percentiles as they are
    builder = PromptBuilder(number_format="percentile")
    assert builder.with_percentiles(kept) is kept
    # a universe too thin to rank leaves them missing, and a percentile prompt refuses it by date
    thin, _ = build_training_set(
        features[features["symbol"].isin(sorted(features["symbol"].unique())[:15])], 1
    )
    assert thin["ret_5d_pct"].isna().all()
    with pytest.raises(PromptDataError, match="too few names in its universe"):
        builder.user_contents(thin.head(3))


def test_a_missing_feature_is_refused_by_name_and_does_not_shift_the_other_percentiles(features_h1):
    from modeling.prompt import PromptBuilder, PromptDataError

    features = features_h1.copy()
    day = features["date"].iloc[len(features) // 2]
    on_day = features.index[features["date"] == day]
    features.loc[on_day[0], "ret_5d"] = np.nan
    out, _ = build_training_set(features, 1)
    # the other names keep their rank among the values that exist: n counts the date's ret_5d values
    others = out[(out["date"] == day) & out["ret_5d"].notna()].set_index("symbol")["ret_5d_pct"].astype(int)
    values = features.loc[on_day].dropna(subset=["ret_5d"]).set_index("symbol")["ret_5d"]
    expected = np.floor(100 * (values.rank() - 0.5) / len(values)).clip(0, 99).astype(int)
    assert others.sort_index().tolist() == expected.loc[others.index].sort_index().tolist()
    with pytest.raises(PromptDataError, match="feature 'ret_5d' is nan"):
        PromptBuilder(number_format="percentile").with_percentiles(out[out["date"] == day])
