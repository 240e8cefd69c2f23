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
from collections.abc import Sequence
from operator import itemgetter

import numpy as np
import torch

from . import sketch
from .stats import CHUNK, TINY_MAX, TensorSummary, add_reduce

DRIFT_METRICS: tuple[str, ...] = (
    "rel_l2_change", "cosine", "max_abs_change", "mean_shift", "std_ratio", "ks", "wasserstein",
)


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic of two *sorted* samples.

    The supremum of ``|F_a - F_b|`` is reached at a data point, where it is the
    exact fraction ``|count_a * n_b - count_b * n_a| / (n_a * n_b)``: counted in
    integers and divided once, it is the nearest double to the true value, as
    ``scipy.stats.ks_2samp(...).statistic`` reports it (subtracting the two
    rounded CDFs could land one unit in the last place off: 1 - 2/3 is not 1/3).

    >>> ks_statistic(np.array([1.0, 2.0, 3.0]), np.array([2.0, 3.0, 4.0]))
    0.3333333333333333
    """
    if a.size == 0 or b.size == 0:
        return math.nan
    na, nb = a.size, b.size
    best = 0
    for sample in (a, b):
        for start in range(0, sample.size, CHUNK):
            z = sample[start:start + CHUNK]
            gap = np.abs(np.searchsorted(a, z, side="right") * nb - np.searchsorted(b, z, side="right") * na)
            best = max(best, int(gap.max()))
    return best / (na * nb)


def wasserstein(a: np.ndarray, b: np.ndarray) -> float:
    """Wasserstein-1 distance between two *sorted* samples.

    For equal sizes it is the mean absolute difference of the order statistics;
    otherwise the integral of |F_a - F_b| over the merged support.

    >>> wasserstein(np.array([0.0, 1.0]), np.array([1.0, 2.0]))
    1.0
    """
    if a.size == 0 or b.size == 0:
        return math.nan
    if a.size == b.size and a.size <= CHUNK:
        return (0.0 + float(np.abs(a.astype(np.float64) - b.astype(np.float64)).sum())) / a.size
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
        sums = cur.pairs.get(id(base)) or elementwise(cur_t, base_t)  # measured with cur's statistics, if so
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
    nan, st = math.nan, s.stats
    clean = s.n_finite == s.info.numel
    sq = st["l2_norm"] ** 2 if clean else nan  # element-wise sums propagate NaN/Inf
    sums = {"delta_sq": 0.0 if clean else nan, "base_sq": sq, "cur_sq": sq, "dot": sq, "max_abs": 0.0 if clean else nan}
    some, finite = bool(s.info.numel), bool(s.n_finite)
    metrics = {
        "rel_l2_change": rel_change(sums) if some else nan, "cosine": cosine(sums) if some else nan,
        "max_abs_change": sums["max_abs"] if some else nan, "mean_shift": 0.0 if finite else nan,
        "std_ratio": ratio(st["std"], st["std"]), "ks": 0.0 if finite else nan, "wasserstein": 0.0 if finite else nan,
    }
    return metrics, sums


def _self_values(s: TensorSummary) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """:func:`_self_compare` as ``compare_values`` tuples, the same arithmetic without the dicts."""
    nan, st = math.nan, s.stats
    if s.n_finite != s.info.numel or not s.n_finite:
        metrics, sums = _self_compare(s)
        return _METRIC_VALUES(metrics), _SUM_VALUES(sums)
    sq = st["l2_norm"] ** 2
    root = math.sqrt(sq)
    rel = nan if math.isnan(root) else 0.0  # ratio(sqrt(0.0), sqrt(sq)): 0/0 and 0/x are 0
    den = math.sqrt(sq) * math.sqrt(sq)
    std = st["std"]
    return ((rel, sq / den if den > 0 else nan, 0.0, 0.0, ratio(std, std), 0.0, 0.0),
            (0.0, sq, sq, sq, 0.0))


#: Largest tensor whose KS statistic :func:`compare_many` finds by comparing every pair of values.
_KS_BROADCAST_MAX = 64


def compare_many(
    pairs: Sequence[tuple[TensorSummary, torch.Tensor, TensorSummary, torch.Tensor]],
) -> list[tuple[dict[str, float], dict[str, float] | None]]:
    """:func:`compare` of many ``(cur, cur_t, base, base_t)`` pairs: the same values, bit for bit.

    Pairs of tiny tensors (up to :data:`auditclip.stats.TINY_MAX` elements, finite,
    same shape, neither stored as float64) are compared in batches of one shape
    and dtype: every element-wise step runs once per batch, and each float64 dot
    product is still one ``torch.dot`` per pair, on a row padded to start on a
    64-byte boundary like a freshly allocated tensor (MKL's dot rounds differently
    by alignment). Everything else goes through :func:`compare`.

    >>> from auditclip.stats import describe
    >>> a, b, c = torch.tensor([1.0, 2.0]), torch.tensor([1.0, 4.0]), torch.tensor([0.0, 2.0])
    >>> pairs = [(describe(b), b, describe(a), a), (describe(c), c, describe(a), a)]
    >>> compare_many(pairs) == [compare(*p) for p in pairs]
    True
    """
    return [(dict(zip(DRIFT_METRICS, m)), None if sums is None else dict(zip(_SUMS, sums)))
            for m, sums in compare_values(pairs)]


def compare_values(
    pairs: Sequence[tuple[TensorSummary, torch.Tensor, TensorSummary, torch.Tensor]],
) -> list[tuple[tuple[float, ...], tuple[float, ...] | None]]:
    """:func:`compare_many` as tuples: metrics in :data:`DRIFT_METRICS` order, sums as
    ``(delta_sq, base_sq, cur_sq, dot, max_abs)`` (None when shapes differ)."""
    out: list[tuple[tuple[float, ...], tuple[float, ...] | None] | None] = [None] * len(pairs)
    groups: dict[tuple[tuple[int, ...], torch.dtype, torch.dtype], list[int]] = {}
    for k, (cur, cur_t, base, base_t) in enumerate(pairs):
        if cur_t is base_t:
            out[k] = _self_values(cur)
            continue
        n = cur.n_finite
        if (0 < n <= TINY_MAX and n == base.n_finite and cur.values is not None and base.values is not None
                and not cur.stats["n_nan"] and not cur.stats["n_inf"] and not base.stats["n_nan"]
                and not base.stats["n_inf"] and cur_t.shape == base_t.shape
                and cur_t.dtype != torch.float64 and base_t.dtype != torch.float64
                and not cur_t.requires_grad and not base_t.requires_grad):
            groups.setdefault((tuple(cur_t.shape), cur_t.dtype, base_t.dtype), []).append(k)
        else:
            metrics, sums = compare(*pairs[k])
            out[k] = (_METRIC_VALUES(metrics), None if sums is None else _SUM_VALUES(sums))
    for ks in groups.values():
        if len(ks) == 1:
            metrics, sums = compare(*pairs[ks[0]])
            out[ks[0]] = (_METRIC_VALUES(metrics), None if sums is None else _SUM_VALUES(sums))
            continue
        for k, result in zip(ks, _compare_rows([pairs[k] for k in ks])):
            out[k] = result
    return out  # type: ignore[return-value]


def _compare_rows(
    pairs: Sequence[tuple[TensorSummary, torch.Tensor, TensorSummary, torch.Tensor]],
) -> list[tuple[tuple[float, ...], tuple[float, ...]]]:
    """:func:`compare` of same-shape, all-finite tiny pairs, one batch."""
    k, n = len(pairs), pairs[0][1].numel()
    stride = -(-n // 8) * 8  # float64 rows starting on 64-byte boundaries
    wide = torch.empty((3, k, stride), dtype=torch.float64)
    x, y, d = wide[0, :, :n], wide[1, :, :n], wide[2, :, :n]
    x.copy_(torch.stack([p[1] for p in pairs]).reshape(k, n))
    y.copy_(torch.stack([p[3] for p in pairs]).reshape(k, n))
    d.copy_(x - y)
    max_abs = d.abs().amax(dim=1).numpy()
    a = np.stack([p[0].values for p in pairs])  # type: ignore[misc]
    b = np.stack([p[2].values for p in pairs])  # type: ignore[misc]
    # wasserstein(): equal sizes, one block
    w = ((0.0 + add_reduce(np.abs(a.astype(np.float64) - b.astype(np.float64)), axis=1)) / n).tolist()
    if n <= _KS_BROADCAST_MAX:  # ks_statistic(): counts of each sample at every data point, all rows at once
        z = np.concatenate((a, b), axis=1).astype(np.float64)
        gap = (np.count_nonzero(a[:, None, :] <= z[:, :, None], axis=2)
               - np.count_nonzero(b[:, None, :] <= z[:, :, None], axis=2))
        ks_values = np.abs(gap).max(axis=1) / n  # n|ca - cb| / (n n), the same fraction, rounded once
    else:
        ks_values = np.array([ks_statistic(p[0].values, p[2].values) for p in pairs])  # type: ignore[arg-type]
    dot = torch.dot
    x_rows, y_rows, d_rows = x.unbind(0), y.unbind(0), d.unbind(0)
    # elementwise(): one block per row, so each sum is 0.0 + one dot product
    delta_sq = 0.0 + np.array([float(dot(r, r)) for r in d_rows])
    base_sq = 0.0 + np.array([float(dot(r, r)) for r in y_rows])
    cur_sq = 0.0 + np.array([float(dot(r, r)) for r in x_rows])
    dots = 0.0 + np.array([float(dot(p, q)) for p, q in zip(x_rows, y_rows)])
    max_abs = np.where(np.isnan(max_abs), math.nan, np.maximum(0.0, max_abs))
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = _ratios(np.sqrt(delta_sq), np.sqrt(base_sq))  # rel_change()
        den = np.sqrt(cur_sq) * np.sqrt(base_sq)
        cos = np.where(den > 0, dots / den, math.nan)  # cosine()
        mean_shift = (np.array([p[0].stats["mean"] for p in pairs]) - np.array([p[2].stats["mean"] for p in pairs]))
        std_ratio = _ratios(np.array([p[0].stats["std"] for p in pairs]), np.array([p[2].stats["std"] for p in pairs]))
    metrics = zip(rel.tolist(), cos.tolist(), max_abs.tolist(), mean_shift.tolist(), std_ratio.tolist(),
                  ks_values.tolist(), w)
    sums = zip(delta_sq.tolist(), base_sq.tolist(), cur_sq.tolist(), dots.tolist(), max_abs.tolist())
    return list(zip(metrics, sums))


_SUMS = ("delta_sq", "base_sq", "cur_sq", "dot", "max_abs")
_METRIC_VALUES = itemgetter(*DRIFT_METRICS)
_SUM_VALUES = itemgetter(*_SUMS)


def _ratios(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """:func:`ratio`, element-wise (call under ``np.errstate(divide="ignore", invalid="ignore")``)."""
    out = np.where(den == 0, np.where(num == 0, 0.0, math.inf), num / den)
    return np.where(np.isnan(num) | np.isnan(den), math.nan, out)
