"""Tests of modeling.buckets and modeling.rebalancing: bucket edges, weight schemes against hand
computations, fit-on-train behaviour, resampling and the diagnostic plot."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy.ndimage import gaussian_filter1d

from modeling.buckets import BucketConfig, fit_buckets, lds_kernel_window
from modeling.rebalancing import bucket_table, histogram_png, rebalance, resample_indices

# 16 hand-picked labels, asymmetric (three +0.5, one -0.5) so that a sign mix-up shows.
# mean = 1/16, sigma = sqrt(mean((x - mean)^2)) ~= 3.249; with zero_eps=0.05, extreme_k=2, n_bins=2 and
# equal widths: z ~= 0.162, K ~= 6.499, the middle edge ~= 3.33, so the buckets below are known by hand.
LABELS = [0.0] * 6 + [0.5, 0.5, 0.5, -0.5, 2.0, -2.0, 4.0, -4.0, 8.0, -8.0]
EXPECTED_BUCKETS = ["zero"] * 6 + [
    "pos_1", "pos_1", "pos_1", "neg_1", "pos_1", "neg_1", "pos_2", "neg_2", "extreme_pos", "extreme_neg",
]  # fmt: skip
EXPECTED_COUNTS = {
    "extreme_neg": 1, "neg_2": 1, "neg_1": 2, "zero": 6, "pos_1": 4, "pos_2": 1, "extreme_pos": 1,
}  # fmt: skip


def small_cfg(**kw) -> BucketConfig:
    base = dict(zero_eps=0.05, extreme_k=2.0, n_bins=2, binning="equal_width", winsor_quantile=0.0)
    return BucketConfig(**{**base, **kw})


def hand_sigma(xs: list[float]) -> float:
    mean = sum(xs) / len(xs)
    return math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs))


def hand_normalise(raw: list[float], clip: float) -> list[float]:
    """mean 1 -> clip to [1/clip, clip] -> mean 1, in plain Python."""
    mean = sum(raw) / len(raw)
    clipped = [min(max(r / mean, 1 / clip), clip) for r in raw]
    mean2 = sum(clipped) / len(clipped)
    return [c / mean2 for c in clipped]


def heavy_tailed(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return 0.02 * rng.standard_t(3, size=n)


# --- bucket assignment -------------------------------------------------------------------------------


def test_bucket_names_order():
    assert BucketConfig(n_bins=3).bucket_names == [
        "extreme_neg", "neg_3", "neg_2", "neg_1", "zero", "pos_1", "pos_2", "pos_3", "extreme_pos",
    ]  # fmt: skip
    model = fit_buckets(np.array(LABELS), small_cfg())
    assert model.order == ["extreme_neg", "neg_2", "neg_1", "zero", "pos_1", "pos_2", "extreme_pos"]


def test_small_set_sigma_thresholds_edges_and_buckets():
    model = fit_buckets(np.array(LABELS), small_cfg())
    sigma = hand_sigma(LABELS)
    assert model.sigma == pytest.approx(sigma, rel=1e-12)
    assert model.zero_threshold == pytest.approx(0.05 * sigma)
    assert model.extreme_threshold == pytest.approx(2.0 * sigma)
    mid = (0.05 * sigma + 2.0 * sigma) / 2
    for side in ("neg", "pos"):
        assert model.edges[side] == pytest.approx((0.05 * sigma, mid, 2.0 * sigma))
    assert model.assign(np.array(LABELS)).tolist() == EXPECTED_BUCKETS
    assert model.counts == EXPECTED_COUNTS
    assert list(model.counts) == model.order


def test_zone_boundaries_are_inclusive_on_the_inside():
    model = fit_buckets(np.array(LABELS), small_cfg())
    z, k = model.zero_threshold, model.extreme_threshold
    labels = np.array([z, -z, np.nextafter(z, 1), k, -k, np.nextafter(k, np.inf), np.nextafter(-k, -np.inf)])
    assert model.assign(labels).tolist() == [
        "zero", "zero", "pos_1", "pos_2", "neg_2", "extreme_pos", "extreme_neg",
    ]  # fmt: skip


# zeros x10, positive zone magnitudes 1..5, negative zone magnitudes 1 and 3, and two extremes.
# mean = 11/19, sigma ~= 9.89: z = 0.05 sigma ~= 0.49 < 1 and 3 sigma ~= 29.7 < 30.
QLABELS = [0.0] * 10 + [1.0, 2.0, 3.0, 4.0, 5.0, -1.0, -3.0, 30.0, -30.0]


def test_quantile_edges_split_each_side_by_its_own_quantiles():
    cfg = BucketConfig(zero_eps=0.05, extreme_k=3.0, n_bins=4, binning="quantile", winsor_quantile=0.0)
    model = fit_buckets(np.array(QLABELS), cfg)
    sigma = hand_sigma(QLABELS)
    z, k = 0.05 * sigma, 3 * sigma
    # quartiles (linear interpolation) of [1,2,3,4,5] are 2, 3, 4; of [1,3] they are 1.5, 2, 2.5
    assert model.edges["pos"] == pytest.approx((z, 2.0, 3.0, 4.0, k))
    assert model.edges["neg"] == pytest.approx((z, 1.5, 2.0, 2.5, k))
    assert model.assign(np.array(QLABELS)).tolist() == ["zero"] * 10 + [
        "pos_1", "pos_1", "pos_2", "pos_3", "pos_4", "neg_1", "neg_4", "extreme_pos", "extreme_neg",
    ]  # fmt: skip


def test_equal_width_edges_on_the_same_labels():
    cfg = BucketConfig(zero_eps=0.05, extreme_k=3.0, n_bins=4, binning="equal_width", winsor_quantile=0.0)
    model = fit_buckets(np.array(QLABELS), cfg)
    sigma = hand_sigma(QLABELS)
    z, k = 0.05 * sigma, 3 * sigma
    width = (k - z) / 4
    expected = (z, z + width, z + 2 * width, z + 3 * width, k)
    assert model.edges["pos"] == pytest.approx(expected)
    assert model.edges["neg"] == pytest.approx(expected)
    # edges ~0.49, 7.79, 15.08, 22.38, 29.67: all of 1..5 land in bin 1, unlike the quantile edges
    assert model.assign(np.array([1.0, 5.0, 7.0, 8.0, 12.0, 20.0, 25.0, -3.0, -8.0])).tolist() == [
        "pos_1", "pos_1", "pos_1", "pos_2", "pos_2", "pos_3", "pos_4", "neg_1", "neg_2",
    ]  # fmt: skip


def test_quantile_edges_fall_back_to_equal_width_when_a_side_is_empty():
    labels = np.array([0.0] * 10 + [1.0, 2.0, 3.0, 4.0, 5.0, 30.0])  # no negative label at all
    model = fit_buckets(labels, BucketConfig(n_bins=2, binning="quantile", winsor_quantile=0.0))
    z, k = model.zero_threshold, model.extreme_threshold
    assert model.edges["neg"] == pytest.approx((z, (z + k) / 2, k))
    assert model.counts["neg_1"] == model.counts["neg_2"] == model.counts["extreme_neg"] == 0


def test_winsorising_feeds_sigma_but_labels_are_assigned_raw():
    labels = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 1000], dtype=float)
    model = fit_buckets(labels, BucketConfig(winsor_quantile=0.1, n_bins=2))
    # the 0.1 / 0.9 quantiles of 11 sorted values sit exactly on the 2nd and 10th: 1 and 9
    assert (model.winsor_lo, model.winsor_hi) == (1.0, 9.0)
    # winsorised: [1,1,2,...,9,9], mean 5, squared deviations sum to 92
    assert model.sigma == pytest.approx(math.sqrt(92 / 11))
    buckets = model.assign(labels)
    assert buckets[-1] == "extreme_pos"
    assert buckets[0] == "zero"


# --- weight schemes against hand computations ---------------------------------------------------------


@pytest.mark.parametrize("clip", [10.0, 2.0])
def test_inverse_weights_match_hand_computation(clip):
    model = fit_buckets(np.array(LABELS), small_cfg(scheme="inverse", clip=clip))
    raw = [1 / EXPECTED_COUNTS[b] for b in EXPECTED_BUCKETS]
    expected = hand_normalise(raw, clip)
    weights = model.train_weights(np.array(LABELS))
    assert weights.tolist() == pytest.approx(expected, rel=1e-12)
    if clip == 10.0:
        # no clipping: w = (1/count) * 16 / 7 (7 non-empty buckets, each summing to 1 before normalising)
        assert weights[EXPECTED_BUCKETS.index("zero")] == pytest.approx(16 / 7 / 6)
        assert weights[EXPECTED_BUCKETS.index("extreme_pos")] == pytest.approx(16 / 7)
    else:
        # clipping binds on both sides (16/7 > 2 and 16/42 < 1/2); the renormalisation moves the clipped
        # top weight slightly past the bound, while max/min stays exactly clip**2.
        # after clipping: 4 rows at 2 (extremes, bin 2), 2 at 8/7 (neg_1), 6 at 1/2 (zero), 4 at 4/7 (pos_1)
        top = weights.max()
        assert top == pytest.approx(2 * 16 / (4 * 2 + 2 * 8 / 7 + 6 * 0.5 + 4 * 4 / 7))
        assert top > 2.0
        assert top / weights.min() == pytest.approx(4.0)


def test_sqrt_inverse_weights_match_hand_computation():
    model = fit_buckets(np.array(LABELS), small_cfg(scheme="sqrt_inverse", clip=10.0))
    weights = model.train_weights(np.array(LABELS))
    # sum over rows of 1/sqrt(count) = sum over buckets of sqrt(count) = 1+1+sqrt2+sqrt6+2+1+1
    total = 6 + math.sqrt(2) + math.sqrt(6)
    expected = [16 / total / math.sqrt(EXPECTED_COUNTS[b]) for b in EXPECTED_BUCKETS]
    assert weights.tolist() == pytest.approx(expected, rel=1e-12)


def test_none_scheme_gives_ones():
    model = fit_buckets(np.array(LABELS), small_cfg(scheme="none"))
    assert model.train_weights(np.array(LABELS)).tolist() == [1.0] * 16


def test_lds_kernel_matches_reference_code():
    # verbatim logic of get_lds_kernel_window(kernel='gaussian', ks, sigma) from Yang et al. 2021
    def reference(ks, sigma):
        half_ks = (ks - 1) // 2
        base_kernel = [0.0] * half_ks + [1.0] + [0.0] * half_ks
        return gaussian_filter1d(base_kernel, sigma=sigma) / max(gaussian_filter1d(base_kernel, sigma=sigma))

    for ks, sigma in [(5, 2.0), (3, 1.0), (9, 1.5), (1, 1.0)]:
        np.testing.assert_allclose(lds_kernel_window(ks, sigma), reference(ks, sigma), rtol=1e-12)
    # with ks=5 and sigma=0.5 the gaussian's support (radius 2) fits the window: plain exp(-d^2 / (2 s^2))
    d = np.arange(-2, 3)
    np.testing.assert_allclose(lds_kernel_window(5, 0.5), np.exp(-(d**2) / (2 * 0.5**2)), rtol=1e-12)


@pytest.mark.parametrize("clip", [math.inf, 2.0])
def test_lds_weights_match_hand_computation(clip):
    cfg = small_cfg(scheme="lds", lds_bins=8, lds_kernel_size=5, lds_sigma=0.5, clip=clip)
    model = fit_buckets(np.array(LABELS), cfg)
    # range [-8, 8] in 8 bins of width 2; bin = floor((y + 8) / 2), the label 8 clipped into bin 7
    bins = [4] * 6 + [4, 4, 4, 3, 5, 3, 6, 2, 7, 0]
    hist = [1, 0, 1, 2, 9, 1, 1, 1]
    assert model.lds_counts == tuple(hist)
    assert model.lds_bin_edges == pytest.approx(tuple(range(-8, 9, 2)))
    # exp(-d^2 / (2 * 0.5^2)) = exp(-2 d^2); the peak is already 1
    kernel = {-2: math.exp(-8), -1: math.exp(-2), 0: 1.0, 1: math.exp(-2), 2: math.exp(-8)}
    density = [sum(hist[i + d] * kernel[d] for d in kernel if 0 <= i + d < 8) for i in range(8)]
    assert model.lds_density == pytest.approx(tuple(density), rel=1e-12)
    raw = [1 / density[b] for b in bins]
    expected = hand_normalise(raw, clip)
    weights = model.train_weights(np.array(LABELS))
    assert weights.tolist() == pytest.approx(expected, rel=1e-12)
    if clip == math.inf:
        # per sample, not per bucket: -8 and +8 are both extremes but sit in bins of different density
        assert weights[-1] != pytest.approx(weights[-2])
    else:
        assert weights.max() / weights.min() == pytest.approx(4.0)  # clipping binds on both sides


@pytest.mark.parametrize("scheme", ["inverse", "sqrt_inverse", "lds", "none"])
@pytest.mark.parametrize("clip", [1.0, 2.0, 10.0])
def test_weights_have_mean_one_and_respect_the_clip(scheme, clip):
    labels = heavy_tailed(3000, seed=3)
    model, reb = rebalance(labels, BucketConfig(scheme=scheme, clip=clip))
    w = reb.weights
    assert w.mean() == pytest.approx(1.0, abs=1e-12)
    # the final renormalisation rescales all weights by one factor, so max/min is still within clip**2
    assert w.max() / w.min() <= clip**2 * (1 + 1e-12)
    assert w.min() > 0
    if clip == 1.0:
        np.testing.assert_allclose(w, 1.0)
    # metadata per-bucket weights agree with the table
    table = reb.before
    for name, bw in model.bucket_weights.items():
        if table.loc[name, "count"] == 0:
            assert bw is None
        else:
            assert bw == pytest.approx(table.loc[name, "weight"])


def test_inverse_weights_equalise_effective_shares():
    """With inverse weights and no clipping every non-empty bucket carries the same share of the loss."""
    labels = heavy_tailed(4000, seed=5)
    _, reb = rebalance(labels, BucketConfig(scheme="inverse", clip=math.inf))
    eff = reb.before["effective_share"]
    nonempty = reb.before["count"] > 0
    np.testing.assert_allclose(eff[nonempty], 1 / nonempty.sum(), rtol=1e-9)


# --- fit on train only ------------------------------------------------------------------------------


def test_fit_on_train_apply_elsewhere():
    train = heavy_tailed(1000, seed=1)
    cfg = BucketConfig(scheme="lds")
    model = fit_buckets(train, cfg)
    before = json.dumps(model.to_dict(), sort_keys=True)
    weights = model.train_weights(train)

    val_wild = 50 * heavy_tailed(500, seed=2) + 0.3  # very different scale and location
    val_buckets = model.assign(val_wild)
    # assigned with the train edges: the shifted, widened labels are mostly positive extremes
    assert (val_buckets == "extreme_pos").mean() > 0.5
    assert model.assign(np.array([0.0]))[0] == "zero"
    # assigning other labels changed nothing in the model, and a fresh fit on train is identical
    assert json.dumps(model.to_dict(), sort_keys=True) == before
    assert fit_buckets(train, cfg) == model
    # the weights depend on the train labels only, whatever validation set is around
    model.assign(np.zeros(10))
    np.testing.assert_array_equal(model.train_weights(train), weights)
    # sanity of the test itself: fitting on train + val would have moved sigma a lot
    assert fit_buckets(np.concatenate([train, val_wild]), cfg).sigma > 5 * model.sigma


def test_train_weights_refuses_other_labels():
    train = heavy_tailed(500, seed=1)
    model = fit_buckets(train, BucketConfig())
    with pytest.raises(ValueError, match="train labels the model was fitted on"):
        model.train_weights(train[:-1])
    with pytest.raises(ValueError, match="train labels the model was fitted on"):
        model.train_weights(10 * train)


def test_to_dict_is_json_serialisable_and_complete():
    model = fit_buckets(heavy_tailed(800), BucketConfig(scheme="lds", lds_bins=20))
    d = json.loads(json.dumps(model.to_dict()))
    assert d["sigma"] == model.sigma
    assert list(d["counts"]) == model.order
    assert sum(d["counts"].values()) == 800
    assert len(d["edges"]["pos"]) == len(d["edges"]["neg"]) == 5
    assert len(d["lds"]["counts"]) == 20 and len(d["lds"]["bin_edges"]) == 21
    assert d["config"]["scheme"] == "lds"


# --- rebalance, resample, tables -----------------------------------------------------------------------


def test_weight_mode_rebalanced():
    labels = np.array(LABELS)
    model, reb = rebalance(labels, small_cfg(scheme="inverse"))
    np.testing.assert_array_equal(reb.indices, np.arange(16))
    np.testing.assert_allclose(reb.weights, model.train_weights(labels))
    assert reb.buckets.tolist() == EXPECTED_BUCKETS
    pd.testing.assert_frame_equal(reb.before, reb.after)
    assert reb.before["count"].to_dict() == EXPECTED_COUNTS
    # inverse weights without clipping: each of the 7 buckets carries 1/7 of the total weight
    np.testing.assert_allclose(reb.after["effective_share"], 1 / 7)


def test_resample_is_deterministic_and_hits_the_effective_shares():
    labels = heavy_tailed(3000, seed=11)
    cfg = BucketConfig(scheme="sqrt_inverse", mode="resample", target_size=5000, seed=7)
    model, a = rebalance(labels, cfg)
    _, b = rebalance(labels, cfg)
    _, c = rebalance(labels, BucketConfig(scheme="sqrt_inverse", mode="resample", target_size=5000, seed=8))
    np.testing.assert_array_equal(a.indices, b.indices)
    assert not np.array_equal(a.indices, c.indices)

    assert a.indices.shape == (5000,) and a.indices.min() >= 0 and a.indices.max() < 3000
    np.testing.assert_array_equal(a.weights, 1.0)
    np.testing.assert_array_equal(a.buckets, model.assign(labels[a.indices]))
    assert a.after["count"].sum() == 5000
    # 5000 draws: a share's binomial std is at most 0.5/sqrt(5000) ~= 0.007; 0.03 is > 4 std
    np.testing.assert_allclose(a.after["share"], a.before["effective_share"], atol=0.03)
    np.testing.assert_allclose(a.after["effective_share"], a.after["share"])
    # the draws really moved the distribution: the rare extremes are drawn more often than they occur
    assert a.before.loc["extreme_pos", "effective_share"] > 2 * a.before.loc["extreme_pos", "share"]
    assert a.after.loc["extreme_pos", "share"] > 1.5 * a.before.loc["extreme_pos", "share"]


def test_resample_target_size_defaults_to_train_rows():
    labels = heavy_tailed(700)
    _, reb = rebalance(labels, BucketConfig(mode="resample"))
    assert reb.indices.shape == (700,)


def test_resample_indices_follows_the_weights():
    w = np.array([0.0, 1.0, 3.0])
    idx = resample_indices(w, 4000, seed=0)
    np.testing.assert_array_equal(idx, resample_indices(w, 4000, seed=0))
    assert not (idx == 0).any()
    assert (idx == 2).mean() == pytest.approx(0.75, abs=0.03)
    with pytest.raises(ValueError):
        resample_indices(np.zeros(3), 10, seed=0)
    with pytest.raises(ValueError):
        resample_indices(np.array([1.0, -1.0]), 10, seed=0)
    with pytest.raises(ValueError):
        resample_indices(w, 0, seed=0)


def test_bucket_table_hand_numbers():
    t = bucket_table(np.array(["a", "b", "a"], dtype=object), np.array([1.0, 2.0, 3.0]), ["a", "b", "c"])
    assert t.index.tolist() == ["a", "b", "c"]
    assert t["count"].tolist() == [2, 1, 0]
    np.testing.assert_allclose(t["share"], [2 / 3, 1 / 3, 0])
    np.testing.assert_allclose(t["weight"], [2.0, 2.0, np.nan])
    np.testing.assert_allclose(t["effective_share"], [4 / 6, 2 / 6, 0])
    with pytest.raises(ValueError, match="not in order"):
        bucket_table(np.array(["x"], dtype=object), np.array([1.0]), ["a"])


# --- validation -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"scheme": "focal"}, "scheme"),
        ({"binning": "kmeans"}, "binning"),
        ({"mode": "oversample"}, "mode"),
        ({"n_bins": 0}, "n_bins"),
        ({"n_bins": 2.0}, "n_bins"),
        ({"zero_eps": -0.1}, "zero_eps"),
        ({"extreme_k": 0.01}, "extreme_k"),
        ({"winsor_quantile": 0.5}, "winsor_quantile"),
        ({"clip": 0.5}, "clip"),
        ({"clip": float("nan")}, "clip"),
        ({"lds_bins": 0}, "lds_bins"),
        ({"lds_kernel_size": 4}, "lds_kernel_size"),
        ({"lds_sigma": 0.0}, "lds_sigma"),
        ({"target_size": 0}, "target_size"),
        ({"seed": -1}, "seed"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BucketConfig(**kwargs)


@pytest.mark.parametrize(
    ("labels", "match"),
    [
        (np.array([]), "empty"),
        (np.array([0.1, np.nan, 0.2]), "non-finite"),
        (np.array([0.1, np.inf, 0.2]), "non-finite"),
        (np.zeros((3, 2)), "1-D"),
        (np.full(10, 0.01), "zero spread"),
    ],
)
def test_bad_train_labels_raise(labels, match):
    with pytest.raises(ValueError, match=match):
        fit_buckets(labels, BucketConfig())
    with pytest.raises(ValueError, match=match):
        rebalance(labels, BucketConfig())


def test_assign_rejects_nan_but_accepts_empty():
    model = fit_buckets(np.array(LABELS), small_cfg())
    assert model.assign(np.array([])).shape == (0,)
    with pytest.raises(ValueError, match="non-finite"):
        model.assign(np.array([np.nan]))


# --- plot ------------------------------------------------------------------------------------------------


def test_histogram_png_writes_a_png(tmp_path):
    import matplotlib.pyplot as plt

    open_before = plt.get_fignums()
    labels = heavy_tailed(2000)
    model, reb = rebalance(labels, BucketConfig(mode="resample", seed=1))
    out = histogram_png(labels, model, reb, tmp_path / "sub" / "buckets.png")
    assert out == tmp_path / "sub" / "buckets.png"
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 10_000
    assert plt.get_fignums() == open_before  # no figure left in pyplot's global state
