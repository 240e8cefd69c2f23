"""How far a tensor moved between two checkpoints.

Element-wise measures (``rel_l2_change``, ``cosine``, ``max_abs_change``) compare
the tensors position by position and need equal shapes; distribution measures
(``mean_shift``, ``std_ratio``, ``ks``, ``wasserstein``) compare the two value
distributions and work across a shape change too.

``ks`` and ``wasserstein`` are exact for tensors up to ``sketch.EXACT_MAX``
elements: they are computed from the sorted finite values that
:func:`auditclip.stats.describe` keeps, with the same formulas as
``scipy.stats.ks_2samp(...).statistic`` and ``scipy.stats.wasserstein_distance``.
Above that they come from :mod:`auditclip.sketch` (KS within 0.002 absolute).
Element-wise measures propagate NaN/Inf: a change involving a non-finite
weight is reported as NaN, not hidden.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from . import sketch
from .stats import CHUNK, TensorSummary

DRIFT_METRICS: tuple[str, ...] = (
    "rel_l2_change", "cosine", "max_abs_change", "mean_shift", "std_ratio", "ks", "wasserstein",
)


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic of two *sorted* samples.

    >>> ks_statistic(np.array([1.0, 2.0, 3.0]), np.array([2.0, 3.0, 4.0]))
    0.3333333333333333
    """
    if a.size == 0 or b.size == 0:
        return math.nan
    best = 0.0
    for sample in (a, b):  # the sup of |F_a - F_b| is reached at a data point
        for start in range(0, sample.size, CHUNK):
            z = sample[start:start + CHUNK]
            fa = np.searchsorted(a, z, side="right") / a.size
            fb = np.searchsorted(b, z, side="right") / b.size
            best = max(best, float(np.max(np.abs(fa - fb))))
    return best


def wasserstein(a: np.ndarray, b: np.ndarray) -> float:
    """Wasserstein-1 distance between two *sorted* samples.

    For equal sizes it is the mean absolute difference of the order statistics;
    otherwise the integral of |F_a - F_b| over the merged support.

    >>> wasserstein(np.array([0.0, 1.0]), np.array([1.0, 2.0]))
    1.0
    """
    if a.size == 0 or b.size == 0:
        return math.nan
    if a.size == b.size:
        total = 0.0
        for start in range(0, a.size, CHUNK):
            x = a[start:start + CHUNK].astype(np.float64)
            y = b[start:start + CHUNK].astype(np.float64)
            total += float(np.abs(x - y).sum())
        return total / a.size
    merged = np.sort(np.concatenate([a.astype(np.float64), b.astype(np.float64)]), kind="stable")
    total = 0.0
    for start in range(0, merged.size - 1, CHUNK):
        z = merged[start:min(start + CHUNK, merged.size - 1)]
        width = merged[start + 1:start + 1 + z.size] - z
        fa = np.searchsorted(a, z, side="right") / a.size
        fb = np.searchsorted(b, z, side="right") / b.size
        total += float(np.dot(np.abs(fa - fb), width))
    return total


def elementwise(cur: torch.Tensor, base: torch.Tensor) -> dict[str, float]:
    """Float64 sums for element-wise change between two same-shape tensors.

    Returns ``delta_sq`` (||cur-base||^2), ``base_sq``, ``cur_sq``, ``dot`` and
    ``max_abs`` (max |cur-base|), computed in blocks so memory stays bounded.
    """
    x_all, y_all = cur.detach().reshape(-1), base.detach().reshape(-1)
    sums = dict(delta_sq=0.0, base_sq=0.0, cur_sq=0.0, dot=0.0, max_abs=0.0)
    for start in range(0, x_all.numel(), CHUNK):
        x = x_all[start:start + CHUNK].to(torch.float64)
        y = y_all[start:start + CHUNK].to(torch.float64)
        d = x - y
        sums["delta_sq"] += float(torch.dot(d, d))
        sums["base_sq"] += float(torch.dot(y, y))
        sums["cur_sq"] += float(torch.dot(x, x))
        sums["dot"] += float(torch.dot(x, y))
        block_max = float(d.abs().max())  # torch's max propagates NaN, which we want
        sums["max_abs"] = math.nan if math.isnan(block_max) else max(sums["max_abs"], block_max)
    return sums


def ratio(num: float, den: float) -> float:
    """num/den with the conventions drift uses: 0/0 -> 0 (nothing moved), x/0 -> inf.

    >>> ratio(0.0, 0.0), ratio(1.0, 0.0), ratio(1.0, 4.0)
    (0.0, inf, 0.25)
    """
    if math.isnan(num) or math.isnan(den):
        return math.nan
    if den == 0:
        return 0.0 if num == 0 else math.inf
    return num / den


def rel_change(sums: dict[str, float]) -> float:
    """||W - W_base|| / ||W_base|| from :func:`elementwise` sums (also summed over tensors)."""
    return ratio(math.sqrt(sums["delta_sq"]), math.sqrt(sums["base_sq"]))


def cosine(sums: dict[str, float]) -> float:
    """Cosine similarity from :func:`elementwise` sums; NaN when either tensor is zero."""
    den = math.sqrt(sums["cur_sq"]) * math.sqrt(sums["base_sq"])
    return sums["dot"] / den if den > 0 else math.nan


def compare(
    cur: TensorSummary, cur_t: torch.Tensor, base: TensorSummary, base_t: torch.Tensor
) -> tuple[dict[str, float], dict[str, float] | None]:
    """Drift metrics of ``cur`` against ``base`` (see :data:`DRIFT_METRICS`).

    Returns the metrics and the element-wise sums (None when shapes differ),
    which the caller adds up into the checkpoint-wide ``__all__`` row.

    >>> from auditclip.stats import describe
    >>> a, b = torch.tensor([1.0, 2.0]), torch.tensor([1.0, 4.0])
    >>> m, _ = compare(describe(b), b, describe(a), a)
    >>> round(m["rel_l2_change"], 6), m["max_abs_change"], m["mean_shift"]
    (0.894427, 2.0, 1.0)
    """
    metrics = dict.fromkeys(DRIFT_METRICS, math.nan)
    sums = None
    if cur_t is base_t:  # the reference against itself: nothing moved, no pass over the data
        return _self_compare(cur)
    if tuple(cur_t.shape) == tuple(base_t.shape):
        sums = elementwise(cur_t, base_t)
        metrics["rel_l2_change"] = rel_change(sums)
        metrics["cosine"] = cosine(sums)
        metrics["max_abs_change"] = sums["max_abs"] if cur_t.numel() else math.nan
    metrics["mean_shift"] = cur.stats["mean"] - base.stats["mean"]
    metrics["std_ratio"] = ratio(cur.stats["std"], base.stats["std"])
    if cur.values is not None and base.values is not None:
        metrics["ks"] = ks_statistic(cur.values, base.values)
        metrics["wasserstein"] = wasserstein(cur.values, base.values)
    else:  # a large tensor on either side: compare sketches (bounds in auditclip.sketch)
        a, b = cur.cdf_sketch(), base.cdf_sketch()
        metrics["ks"] = sketch.ks(a, b)
        metrics["wasserstein"] = sketch.wasserstein(a, b)
    return metrics, sums


def _self_compare(s: TensorSummary) -> tuple[dict[str, float], dict[str, float]]:
    """What :func:`compare` gives for a tensor against itself, read off its statistics."""
    clean = s.n_finite == s.info.numel
    sq = s.stats["l2_norm"] ** 2 if clean else math.nan  # element-wise sums propagate NaN/Inf
    sums = dict(delta_sq=0.0 if clean else math.nan, base_sq=sq, cur_sq=sq, dot=sq,
                max_abs=0.0 if clean else math.nan)
    metrics = dict.fromkeys(DRIFT_METRICS, math.nan)
    if s.info.numel:
        metrics.update(rel_l2_change=rel_change(sums), cosine=cosine(sums), max_abs_change=sums["max_abs"])
    metrics["mean_shift"] = 0.0 if s.n_finite else math.nan
    metrics["std_ratio"] = ratio(s.stats["std"], s.stats["std"])
    metrics["ks"] = 0.0 if s.n_finite else math.nan
    metrics["wasserstein"] = 0.0 if s.n_finite else math.nan
    return metrics, sums
