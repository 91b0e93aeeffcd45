"""Bucket re-balancing of a regression training set.

Daily return labels pile up near zero and have few extremes, so a plain MSE fit learns to predict
about zero. This module splits the label axis into ordered buckets and derives per-row training
weights that give the rare buckets more say; `modeling.rebalancing` turns them into the re-balanced
train set (the weights, or a weighted resample), its per-bucket tables and the diagnostic plot.

Everything is fitted on the train labels only: `fit_buckets` freezes sigma, the bucket edges, the
train counts (and the LDS density) into a `BucketModel`, whose `assign` then places any labels
(validation, test) with those train-fitted edges. Only train rows get weights; callers keep weight 1
elsewhere, so evaluation stays on the natural distribution.

Bucket layout, with `s` the std of the winsorised train labels, `z = zero_eps * s`, `K = extreme_k * s`:

    extreme_neg | neg_n ... neg_1 | zero | pos_1 ... pos_n | extreme_pos
       y < -K   |  z < |y| <= K   |y|<=z|   z < y <= K     |    y > K

Labels are assigned on their raw values; winsorising only feeds sigma and the edges, so a train
outlier clipped for the statistics is still an extreme.

Pure numpy / scipy: no dagster, no mlflow.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, NoReturn

import numpy as np
from scipy.ndimage import convolve1d, gaussian_filter1d

BINNINGS = ("equal_width", "quantile")
SCHEMES = ("inverse", "sqrt_inverse", "lds", "none")
MODES = ("weight", "resample")


def is_int(value: object) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


@dataclass(frozen=True)
class BucketConfig:
    """How to bucket the train labels and how to turn buckets into weights or draws."""

    zero_eps: float = 0.05
    """|label| <= zero_eps * sigma is bucket "zero" (sigma = std of the winsorised train labels)."""
    extreme_k: float = 3.0
    """label > extreme_k * sigma is "extreme_pos", label < -extreme_k * sigma is "extreme_neg"."""
    n_bins: int = 4
    """Magnitude buckets per sign between the zero and the extreme zones."""
    binning: str = "equal_width"
    """How the magnitude bins split (zero_eps*sigma, extreme_k*sigma] on each side, on the winsorised
    train labels: "quantile" (quantiles of |label| of that side's labels inside the zone, so the bins
    hold about equal counts) or "equal_width"."""
    winsor_quantile: float = 0.005
    """Train labels are clipped to their [q, 1-q] quantiles before sigma and the edges are computed,
    so a few outliers cannot inflate sigma and empty the extreme buckets. 0 disables."""
    scheme: str = "sqrt_inverse"
    """Weight scheme: "inverse" (1/count of the bucket), "sqrt_inverse" (1/sqrt(count)), "lds"
    (inverse of the label distribution smoothed with a gaussian kernel, per sample) or "none"."""
    clip: float = 10.0
    """Weights are normalised to mean 1, clipped to [1/clip, clip], then renormalised to mean 1.
    Bounds the influence of a handful of rows; use math.inf to disable."""
    lds_bins: int = 100
    """lds: number of equal-width bins over the winsorised train label range."""
    lds_kernel_size: int = 5
    """lds: size of the gaussian kernel window, in bins (odd)."""
    lds_sigma: float = 2.0
    """lds: standard deviation of the gaussian kernel, in bins."""
    mode: str = "weight"
    """Mode: "weight" = a per-row weight consumed by the loss; "resample" = seeded draws with replacement,
    probabilities proportional to the weights, up to target_size rows, each with weight 1."""
    target_size: int | None = None
    """resample: number of rows to draw (None = the number of train rows)."""
    seed: int = 0
    """resample: seed of numpy's default_rng, so a run's draws are reproducible."""

    def __post_init__(self) -> None:
        def fail(msg: str) -> NoReturn:
            raise ValueError(f"BucketConfig: {msg}")

        if not (math.isfinite(self.zero_eps) and self.zero_eps >= 0):
            fail(f"zero_eps must be a finite number >= 0, got {self.zero_eps!r}")
        if not (math.isfinite(self.extreme_k) and self.extreme_k > self.zero_eps):
            fail(f"extreme_k must be finite and > zero_eps ({self.zero_eps}), got {self.extreme_k!r}")
        if not (is_int(self.n_bins) and self.n_bins >= 1):
            fail(f"n_bins must be an integer >= 1, got {self.n_bins!r}")
        if self.binning not in BINNINGS:
            fail(f"binning must be one of {BINNINGS}, got {self.binning!r}")
        if not (0 <= self.winsor_quantile < 0.5):
            fail(f"winsor_quantile must be in [0, 0.5), got {self.winsor_quantile!r}")
        if self.scheme not in SCHEMES:
            fail(f"scheme must be one of {SCHEMES}, got {self.scheme!r}")
        if not self.clip >= 1:  # also rejects NaN
            fail(f"clip must be >= 1 (math.inf disables clipping), got {self.clip!r}")
        if not (is_int(self.lds_bins) and self.lds_bins >= 1):
            fail(f"lds_bins must be an integer >= 1, got {self.lds_bins!r}")
        if not (is_int(self.lds_kernel_size) and self.lds_kernel_size >= 1 and self.lds_kernel_size % 2 == 1):
            fail(f"lds_kernel_size must be an odd integer >= 1, got {self.lds_kernel_size!r}")
        if not (math.isfinite(self.lds_sigma) and self.lds_sigma > 0):
            fail(f"lds_sigma must be a finite number > 0, got {self.lds_sigma!r}")
        if self.mode not in MODES:
            fail(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.target_size is not None and not (is_int(self.target_size) and self.target_size >= 1):
            fail(f"target_size must be None or an integer >= 1, got {self.target_size!r}")
        if not (is_int(self.seed) and self.seed >= 0):
            fail(f"seed must be an integer >= 0, got {self.seed!r}")

    @property
    def bucket_names(self) -> list[str]:
        """Bucket names from the most negative to the most positive, the order of tables and plots."""
        n = self.n_bins
        return (
            ["extreme_neg"]
            + [f"neg_{j}" for j in range(n, 0, -1)]
            + ["zero"]
            + [f"pos_{j}" for j in range(1, n + 1)]
            + ["extreme_pos"]
        )


def as_labels(labels: np.ndarray, what: str, allow_empty: bool) -> np.ndarray:
    """Labels as a 1-D float array; non-finite values are an upstream bug, so they raise."""
    y = np.asarray(labels, dtype=float)
    if y.ndim != 1:
        raise ValueError(f"{what} must be 1-D, got shape {y.shape}")
    if y.size == 0 and not allow_empty:
        raise ValueError(f"{what} is empty: buckets and weights need at least one train label")
    if not np.isfinite(y).all():
        bad = int((~np.isfinite(y)).sum())
        raise ValueError(f"{what} contains {bad} non-finite value(s) (NaN or inf); drop them first")
    return y


def lds_kernel_window(kernel_size: int, sigma: float) -> np.ndarray:
    """Gaussian LDS kernel of Yang et al. 2021 (`get_lds_kernel_window`): a delta of length
    kernel_size filtered by `gaussian_filter1d` (its default reflect mode) and scaled to a peak of 1."""
    half = (kernel_size - 1) // 2
    delta = np.zeros(kernel_size)
    delta[half] = 1.0
    window = gaussian_filter1d(delta, sigma=sigma)
    return window / window.max()


def _lds_bin(y: np.ndarray, lo: float, hi: float, n_bins: int) -> np.ndarray:
    """Equal-width bin of each label over [lo, hi]; labels outside fall into the edge bins."""
    width = (hi - lo) / n_bins
    return np.clip(np.floor((y - lo) / width), 0, n_bins - 1).astype(np.intp)


def _magnitude_edges(mags: np.ndarray, z: float, k: float, n_bins: int, binning: str) -> tuple[float, ...]:
    """n_bins + 1 increasing magnitudes from z to k. Quantile edges fall back to equal width when
    no train label of that side lies in the zone (nothing to take quantiles of); tied quantiles give
    empty bins rather than an error."""
    if binning == "equal_width" or mags.size == 0:
        edges = np.linspace(z, k, n_bins + 1)
    else:
        inner = np.quantile(mags, np.arange(1, n_bins) / n_bins)
        edges = np.concatenate([[z], inner, [k]])
    return tuple(float(e) for e in np.maximum.accumulate(edges))


def _bucket_codes(
    y: np.ndarray, z: float, k: float, neg_edges: tuple[float, ...], pos_edges: tuple[float, ...]
) -> np.ndarray:
    """Position of each label's bucket in `bucket_names` (0 = extreme_neg ... 2n+2 = extreme_pos)."""
    n = len(pos_edges) - 1
    mag = np.abs(y)
    codes = np.full(y.shape, n + 1, dtype=np.intp)  # zero
    in_zone = (mag > z) & (mag <= k)
    # side="left" gives j with edges[j-1] < mag <= edges[j], i.e. bins closed on the right.
    pos_bin = np.clip(np.searchsorted(np.asarray(pos_edges), mag, side="left"), 1, n)
    neg_bin = np.clip(np.searchsorted(np.asarray(neg_edges), mag, side="left"), 1, n)
    pos = in_zone & (y > 0)
    neg = in_zone & (y < 0)
    codes[pos] = n + 1 + pos_bin[pos]
    codes[neg] = n + 1 - neg_bin[neg]
    codes[y > k] = 2 * n + 2
    codes[y < -k] = 0
    return codes


def _normalise(raw: np.ndarray, clip: float) -> np.ndarray:
    """Mean 1, clip to [1/clip, clip], mean 1 again. The last step rescales every weight by the same
    factor, so a clipped weight can end slightly past the bound; the ratio max/min stays <= clip**2."""
    w = raw / raw.mean()
    w = np.clip(w, 1.0 / clip, clip)
    return w / w.mean()


@dataclass(frozen=True)
class BucketModel:
    """Bucket edges and weight statistics fitted on the train labels; `assign` applies them anywhere."""

    cfg: BucketConfig
    n_train: int
    """Number of train labels the model was fitted on."""
    sigma: float
    """Population std (ddof=0) of the winsorised train labels."""
    winsor_lo: float
    winsor_hi: float
    zero_threshold: float
    """zero_eps * sigma: |label| at or below it is "zero"."""
    extreme_threshold: float
    """extreme_k * sigma: |label| above it is an extreme."""
    edges: dict[str, tuple[float, ...]]
    """Magnitude edges per side ("neg", "pos"): n_bins + 1 values from zero_threshold to
    extreme_threshold; bin j (neg_j / pos_j) is edges[j-1] < |label| <= edges[j]."""
    counts: dict[str, int]
    """Train rows per bucket, in bucket order (0 for empty buckets)."""
    bucket_weights: dict[str, float | None]
    """Mean normalised train weight per bucket (None for an empty bucket)."""
    lds_bin_edges: tuple[float, ...] | None = None
    """lds: lds_bins + 1 equal-width edges over [winsor_lo, winsor_hi]."""
    lds_counts: tuple[int, ...] | None = None
    """lds: empirical histogram of the (clipped) train labels."""
    lds_density: tuple[float, ...] | None = None
    """lds: the histogram convolved with the LDS kernel; a train row's raw weight is 1 / its bin's value."""

    @property
    def order(self) -> list[str]:
        """Bucket names in table / plot order."""
        return self.cfg.bucket_names

    def _codes(self, y: np.ndarray) -> np.ndarray:
        return _bucket_codes(
            y, self.zero_threshold, self.extreme_threshold, self.edges["neg"], self.edges["pos"]
        )

    def assign(self, labels: np.ndarray) -> np.ndarray:
        """Bucket name of each label (object array), with the train-fitted edges; any split."""
        y = as_labels(labels, "labels", allow_empty=True)
        return np.asarray(self.order, dtype=object)[self._codes(y)]

    def _raw_weights(self, y: np.ndarray, codes: np.ndarray) -> np.ndarray:
        scheme = self.cfg.scheme
        if scheme == "none":
            return np.ones(y.size)
        if scheme == "lds":
            assert self.lds_bin_edges is not None and self.lds_density is not None
            bins = _lds_bin(y, self.winsor_lo, self.winsor_hi, self.cfg.lds_bins)
            density = np.asarray(self.lds_density)[bins]
        else:
            count = np.asarray(list(self.counts.values()), dtype=float)[codes]
            density = count if scheme == "inverse" else np.sqrt(count)
        if not (density > 0).all():  # cannot happen for the train labels themselves
            raise ValueError(
                "labels fall where the train set has no rows; weights exist for train labels only"
            )
        return 1.0 / density

    def train_weights(self, train_labels: np.ndarray) -> np.ndarray:
        """Per-row weights of the train labels this model was fitted on: scheme, then mean 1, clip,
        mean 1. Other labels raise (their weight is 1 by convention, and normalising over them would
        be meaningless); the check compares the row count and the per-bucket counts."""
        y = as_labels(train_labels, "train_labels", allow_empty=False)
        codes = self._codes(y)
        counts = np.bincount(codes, minlength=len(self.order))
        if y.size != self.n_train or counts.tolist() != list(self.counts.values()):
            raise ValueError(
                "train_weights must be given the train labels the model was fitted on "
                f"({self.n_train} rows with bucket counts {list(self.counts.values())}); "
                f"got {y.size} rows with bucket counts {counts.tolist()}"
            )
        return _normalise(self._raw_weights(y, codes), self.cfg.clip)

    def to_dict(self) -> dict:
        """JSON-serialisable description for run metadata."""
        out: dict = {
            "config": asdict(self.cfg),
            "n_train": self.n_train,
            "sigma": self.sigma,
            "winsor_lo": self.winsor_lo,
            "winsor_hi": self.winsor_hi,
            "zero_threshold": self.zero_threshold,
            "extreme_threshold": self.extreme_threshold,
            "edges": {side: list(e) for side, e in self.edges.items()},
            "order": self.order,
            "counts": dict(self.counts),
            "bucket_weights": dict(self.bucket_weights),
        }
        if self.lds_bin_edges is not None:
            out["lds"] = {
                "bin_edges": list(self.lds_bin_edges),
                "counts": list(self.lds_counts or ()),
                "density": list(self.lds_density or ()),
            }
        return out


def fit_buckets(train_labels: np.ndarray, cfg: BucketConfig) -> BucketModel:
    """Fit sigma, edges, train counts (and the LDS density) on the train labels only."""
    y = as_labels(train_labels, "train_labels", allow_empty=False)
    q = cfg.winsor_quantile
    lo, hi = (float(v) for v in np.quantile(y, [q, 1.0 - q]))
    yw = np.clip(y, lo, hi)
    sigma = float(yw.std())
    if not (hi > lo and sigma > 0):
        raise ValueError(
            f"train_labels have zero spread after winsorising at q={q} (all equal to {lo!r}); "
            "cannot scale buckets by sigma"
        )
    z, k = cfg.zero_eps * sigma, cfg.extreme_k * sigma
    in_zone = (np.abs(yw) > z) & (np.abs(yw) <= k)
    edges = {
        "neg": _magnitude_edges(-yw[in_zone & (yw < 0)], z, k, cfg.n_bins, cfg.binning),
        "pos": _magnitude_edges(yw[in_zone & (yw > 0)], z, k, cfg.n_bins, cfg.binning),
    }
    codes = _bucket_codes(y, z, k, edges["neg"], edges["pos"])
    names = cfg.bucket_names
    counts = np.bincount(codes, minlength=len(names))

    lds: dict = {}
    if cfg.scheme == "lds":
        hist = np.bincount(_lds_bin(y, lo, hi, cfg.lds_bins), minlength=cfg.lds_bins)
        density = convolve1d(
            hist.astype(float), weights=lds_kernel_window(cfg.lds_kernel_size, cfg.lds_sigma), mode="constant"
        )
        lds = {
            "lds_bin_edges": tuple(float(e) for e in np.linspace(lo, hi, cfg.lds_bins + 1)),
            "lds_counts": tuple(int(c) for c in hist),
            "lds_density": tuple(float(d) for d in density),
        }

    model = BucketModel(
        cfg=cfg,
        n_train=int(y.size),
        sigma=sigma,
        winsor_lo=lo,
        winsor_hi=hi,
        zero_threshold=float(z),
        extreme_threshold=float(k),
        edges=edges,
        counts={name: int(c) for name, c in zip(names, counts, strict=True)},
        bucket_weights={},
        **lds,
    )
    weights = _normalise(model._raw_weights(y, codes), cfg.clip)
    sums = np.bincount(codes, weights=weights, minlength=len(names))
    mean_weights = {
        name: (float(s / c) if c else None) for name, c, s in zip(names, counts, sums, strict=True)
    }
    return replace(model, bucket_weights=mean_weights)


def bucket_weights(train_labels: np.ndarray, bucket_config: dict[str, Any]) -> np.ndarray:
    """Weights of every train row under another bucket scheme, fit on these train labels only."""
    cfg = BucketConfig(**bucket_config)
    if cfg.mode != "weight":
        raise ValueError("re-weighting needs bucket mode 'weight' (a resampled training set has no weights)")
    return fit_buckets(train_labels, cfg).train_weights(train_labels)
