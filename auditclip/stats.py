"""Distribution statistics of one tensor.

Every statistic is exact, computed in float64 whatever the storage dtype:
NaN and Inf are counted, then left out; the remaining values are sorted once
(in their own precision: fp16/bf16/fp8 widen exactly to float32), and the
moments, percentiles and, later, the KS and Wasserstein distances between two
checkpoints are all read off that sorted copy.

* ``std`` is the population standard deviation (ddof=0);
* ``skew`` and ``kurtosis`` match ``scipy.stats.skew`` / ``scipy.stats.kurtosis``
  (biased, Fisher: excess kurtosis, 0 for a normal);
* percentiles match ``numpy.percentile`` (linear interpolation).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch

from .formats.readers import TensorInfo
from .fused import DTYPES as FUSED_DTYPES, fused_pass, refine
from .sketch import EXACT_MAX, HEAVY, Sketch, blocks, build, from_histogram, from_sorted

PERCENTILES: tuple[tuple[str, float], ...] = (
    ("p0_1", 0.1), ("p1", 1.0), ("p5", 5.0), ("p50", 50.0), ("p95", 95.0), ("p99", 99.0), ("p99_9", 99.9),
)

STAT_COLUMNS: tuple[str, ...] = (
    "mean", "std", "min", "max", "abs_max", "l2_norm", "rms", "frac_zero", "n_nan", "n_inf",
    "skew", "kurtosis", *(name for name, _ in PERCENTILES), "spectral_norm", "stable_rank",
)

STATS_COLUMNS: tuple[str, ...] = ("checkpoint", "step", "tensor", "kind", "dtype", "shape", "numel", *STAT_COLUMNS)

#: Elements per float64 block: bounds the extra memory of a pass to 8 MiB.
CHUNK = 1 << 20

#: Largest min(rows, cols) for which the spectral norm comes from a full SVD;
#: above it, randomized subspace iteration (``torch.svd_lowrank``) is used.
EXACT_SVD_MAX = 256


@dataclass
class TensorSummary:
    """Statistics of one tensor, plus its sorted finite values for drift.

    ``values`` is the sorted array of finite elements (float32, or float64 for
    fp64 tensors); it is what KS and Wasserstein distances are computed from.
    """

    info: TensorInfo
    values: np.ndarray | None
    stats: dict[str, float]
    sketch: Sketch | None = None  # for tensors above EXACT_MAX elements, instead of ``values``
    n_finite: int = 0
    #: element-wise sums against other versions measured in the same pass (:func:`describe`'s
    #: ``against``), by ``id`` of the other version's summary; :func:`auditclip.distances.compare` reads them
    pairs: dict[int, dict[str, float]] = field(default_factory=dict)

    def cdf_sketch(self) -> Sketch:
        """The value distribution as a sketch (exact steps for small tensors)."""
        return self.sketch if self.sketch is not None else from_sorted(self.values)  # type: ignore[arg-type]


def shape_text(shape: tuple[int, ...]) -> str:
    """``(64, 10)`` -> ``"[64, 10]"``, the form used in every CSV."""
    return "[" + ", ".join(str(d) for d in shape) + "]"


def finite_sorted(t: torch.Tensor) -> tuple[np.ndarray, int, int]:
    """Sorted finite values of ``t`` as float32 (float64 for fp64), with NaN and Inf counts.

    >>> v, nan, inf = finite_sorted(torch.tensor([2.0, float("nan"), -1.0, float("inf")]))
    >>> v.tolist(), nan, inf
    ([-1.0, 2.0], 1, 1)
    """
    flat = t.detach().reshape(-1)
    work = flat if flat.dtype in (torch.float32, torch.float64) else flat.to(torch.float32)
    arr = work.numpy()
    finite = np.isfinite(arr)
    n_finite = int(np.count_nonzero(finite))
    n_nan = n_inf = 0
    if n_finite < arr.size:
        n_nan = int(np.count_nonzero(np.isnan(arr)))
        n_inf = arr.size - n_finite - n_nan
        arr = arr[finite]
    return np.sort(arr), n_nan, n_inf


def _small_sorted(t: torch.Tensor) -> tuple[np.ndarray, int, int]:
    """:func:`finite_sorted` with less per-call overhead for the common all-finite case.

    Sorting first and looking at the ends tells whether every value is finite (NaN
    sorts last, -Inf first, +Inf last); only then are NaN and Inf counted and removed.
    """
    if t.requires_grad:
        t = t.detach()
    if t.dtype not in _NATIVE:
        t = t.to(torch.float32)
    values = np.sort(t.numpy().reshape(-1))
    if values.size and math.isfinite(values[0]) and math.isfinite(values[-1]):
        return values, 0, 0
    return finite_sorted(t)


_NATIVE = (torch.float32, torch.float64)
#: ``np.add.reduce``: what ndarray.sum() calls, without its Python wrapper (shared with distances).
add_reduce = np.add.reduce
_dot = np.dot


@lru_cache(maxsize=4096)
def _percentile_plan(n: int) -> tuple[np.ndarray, tuple[tuple[str, int, int, float], ...]]:
    """For ``n`` sorted values: the positions :func:`percentile` reads, and how to combine them."""
    plan, wanted = [], []
    for name, q in PERCENTILES:
        pos = q / 100.0 * (n - 1)
        lo = int(math.floor(pos))
        hi = min(lo + 1, n - 1)
        plan.append((name, len(wanted), len(wanted) + 1, pos - lo))
        wanted += [lo, hi]
    return np.array(wanted, dtype=np.intp), tuple(plan)


def _percentiles(values: np.ndarray) -> dict[str, float]:
    """Every :data:`PERCENTILES` entry of sorted ``values``: :func:`percentile`'s arithmetic, one gather."""
    where, plan = _percentile_plan(values.size)
    picked = values[where].tolist()
    out = {}
    for name, i, j, frac in plan:
        a, b = picked[i], picked[j]
        out[name] = b - (b - a) * (1.0 - frac) if frac >= 0.5 else a + (b - a) * frac
    return out


def _chunks(values: np.ndarray) -> Iterator[np.ndarray]:
    for start in range(0, values.size, CHUNK):
        yield values[start:start + CHUNK].astype(np.float64)


def moments(values: np.ndarray) -> dict[str, float]:
    """Mean, population std, skew, excess kurtosis, L2 norm and RMS in float64.

    Two passes over float64 blocks (sum, then central moments about the exact
    mean) keep the error at float64 rounding even for fp16 data with a large offset.

    >>> m = moments(np.array([1.0, 2.0, 3.0, 10.0]))
    >>> round(m["mean"], 6), round(m["std"], 6)
    (4.0, 3.535534)
    """
    n = values.size
    if n == 0:
        return dict.fromkeys(("mean", "std", "skew", "kurtosis", "l2_norm", "rms"), math.nan)
    if n <= CHUNK:  # one block: the loops below, unrolled (the same operations in the same order)
        block = values.astype(np.float64)
        total = 0.0 + float(add_reduce(block))
        sumsq = 0.0 + float(_dot(block, block))
        mean = total / n
        d = block - mean
        d2 = d * d
        c2 = 0.0 + float(add_reduce(d2))
        c3 = 0.0 + float(_dot(d2, d))
        c4 = 0.0 + float(_dot(d2, d2))
    else:
        total = sumsq = 0.0
        for block in _chunks(values):
            total += float(block.sum())
            sumsq += float(np.dot(block, block))
        mean = total / n
        c2 = c3 = c4 = 0.0
        for block in _chunks(values):
            d = block - mean
            d2 = d * d
            c2 += float(d2.sum())
            c3 += float(np.dot(d2, d))
            c4 += float(np.dot(d2, d2))
    m2, m3, m4 = c2 / n, c3 / n, c4 / n
    # scipy returns NaN for a (numerically) constant sample, with this same test:
    # the shape of a point mass is undefined.
    constant = m2 <= (np.finfo(np.float64).resolution * 10 * mean) ** 2
    return {
        "mean": mean,
        "std": math.sqrt(m2),
        "skew": math.nan if constant else m3 / m2**1.5,
        "kurtosis": math.nan if constant else m4 / m2**2 - 3.0,
        "l2_norm": math.sqrt(sumsq),
        "rms": math.sqrt(sumsq / n),
    }


def percentile(values: np.ndarray, q: float) -> float:
    """The q-th percentile of sorted ``values``, as ``numpy.percentile`` computes it.

    >>> percentile(np.array([0.0, 1.0, 2.0, 3.0]), 50)
    1.5
    """
    n = values.size
    if n == 0:
        return math.nan
    pos = q / 100.0 * (n - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, n - 1)
    a, b, frac = float(values[lo]), float(values[hi]), pos - lo
    # numpy's lerp: interpolate from the nearer end so the result is monotone in q.
    return b - (b - a) * (1.0 - frac) if frac >= 0.5 else a + (b - a) * frac


def spectral_norm(t: torch.Tensor) -> float:
    """Largest singular value of ``t`` reshaped to ``(shape[0], -1)``.

    Exact (SVD in float64) for small matrices; above :data:`EXACT_SVD_MAX`, ARPACK's
    Lanczos iteration (``scipy.sparse.linalg.svds``, tolerance 1e-4, fixed start
    vector): within 0.01% of ``torch.linalg.matrix_norm(ord=2)`` and 10-30x faster
    on a 4096 x 11008 matrix. Randomized SVD was tried and missed by >1% on
    random matrices, whose top singular values cluster.

    >>> round(spectral_norm(torch.diag(torch.tensor([3.0, 1.0]))), 6)
    3.0
    """
    m = t.detach().reshape(t.shape[0], -1)
    if m.numel() == 0 or not bool(torch.isfinite(m).all()):
        return math.nan
    if min(m.shape) <= EXACT_SVD_MAX:
        return float(torch.linalg.matrix_norm(m.to(torch.float64), ord=2))
    from scipy.sparse.linalg import svds

    work = m.to(torch.float32).numpy() if m.dtype != torch.float64 else m.numpy()
    start = np.random.default_rng(0).standard_normal(min(work.shape))
    return float(svds(work, k=1, tol=1e-4, v0=start, return_singular_vectors=False)[0])


def describe(t: torch.Tensor, info: TensorInfo | None = None, *, spectral: bool = False,
             against: Sequence[tuple[TensorSummary, torch.Tensor]] = (), threads: int = 1) -> TensorSummary:
    """Statistics of one floating tensor (see :data:`STAT_COLUMNS`).

    A tensor above :data:`auditclip.sketch.EXACT_MAX` elements stored as float32, float16
    or bfloat16 is read once by :func:`auditclip.fused.fused_pass`, on the device it is on
    (a CUDA tensor is measured on its GPU). ``against``: ``(summary, tensor)`` of other
    versions of the same tensor (previous, reference: at most two); that same pass also measures the
    element-wise sums against each, kept in ``pairs`` for :func:`auditclip.distances.compare`.
    ``threads``: CPU threads sharing that pass (the numbers do not depend on it).

    >>> s = describe(torch.tensor([[1.0, -2.0], [0.0, 4.0]]), spectral=True)
    >>> s.stats["abs_max"], s.stats["frac_zero"], round(s.stats["spectral_norm"], 4)
    (4.0, 0.25, 4.4954)
    """
    if info is None:
        info = TensorInfo("", str(t.dtype).removeprefix("torch."), tuple(t.shape))
    numel = t.numel()
    stats: dict[str, float] = dict.fromkeys(STAT_COLUMNS, math.nan)
    if numel > EXACT_MAX and t.dtype in FUSED_DTYPES:
        summary = _describe_fused(t, info, stats, against, threads)
    elif t.device.type != "cpu":
        return describe(t.cpu(), info, spectral=spectral)
    elif numel > EXACT_MAX:
        summary = _describe_large(t, info, stats)
    else:
        values, n_nan, n_inf = _small_sorted(t) if numel else finite_sorted(t)
        stats.update(moments(values))
        stats["n_nan"], stats["n_inf"] = n_nan, n_inf
        if values.size:
            lo, hi = float(values[0]), float(values[-1])
            stats.update(min=lo, max=hi, abs_max=max(abs(lo), abs(hi)))
            if lo > 0.0 or hi < 0.0:  # no value can be zero: skip the two binary searches
                zeros = 0
            else:
                zeros = int(np.searchsorted(values, 0.0, "right") - np.searchsorted(values, 0.0, "left"))
            stats["frac_zero"] = zeros / numel
            stats.update(_percentiles(values))
        elif numel:
            stats["frac_zero"] = 0.0
        summary = TensorSummary(info=info, values=values, stats=stats, n_finite=int(values.size))
    if spectral and t.dim() >= 2 and numel:
        _add_spectral(stats, t)
    return summary


def _add_spectral(stats: dict[str, float], t: torch.Tensor) -> None:
    sigma = spectral_norm(t.cpu())
    stats["spectral_norm"] = sigma
    frob2 = stats["l2_norm"] ** 2
    stats["stable_rank"] = frob2 / sigma**2 if sigma > 0 else math.nan


def ulp(value: float, dtype: torch.dtype) -> float:
    """One unit in the last place of ``value`` as ``dtype`` writes it: the gap to the next larger magnitude.

    ``value`` is first rounded to the dtype; subnormals have the fixed smallest gap;
    a value the dtype cannot hold (beyond its largest finite number) has none (``inf``).

    >>> ulp(0.01, torch.float32) == float(np.spacing(np.float32(0.01)))
    True
    >>> ulp(0.01, torch.bfloat16), ulp(1.0, torch.float16), ulp(0.0, torch.float16)
    (6.103515625e-05, 0.0009765625, 5.960464477539063e-08)
    """
    info = torch.finfo(dtype)
    written = abs(float(torch.tensor(value, dtype=torch.float64).to(dtype)))
    if not math.isfinite(written):
        return math.inf
    if written < info.smallest_normal:
        return info.smallest_normal * info.eps
    _, exponent = math.frexp(written)  # written = m * 2**exponent, 0.5 <= m < 1
    return math.ldexp(info.eps, exponent - 1)


def count_at_bound(t: torch.Tensor, lo: float, hi: float) -> int:
    """Elements within one ulp (of the tensor's dtype) of either end of ``[lo, hi]``: ``|w - b| <= ulp(b)``.

    What ``frac_at_bound`` counts: the weights a clip holds at its edge. Compared in
    float64 against the bound as given (0.01, not its float32 rounding); NaN never counts.

    >>> count_at_bound(torch.tensor([0.01, -0.01, 0.005, 0.0099, float("nan")]), -0.01, 0.01)
    2
    """
    if not t.is_floating_point() or not t.numel():
        return 0
    gaps = [(b, ulp(b, t.dtype)) for b in ((lo, hi) if lo != hi else (lo,))]
    count = 0
    for block in blocks(t.detach().reshape(-1)):
        wide = block.to(torch.float64)
        near = torch.zeros(wide.shape, dtype=torch.bool)
        for b, gap in gaps:
            if math.isfinite(gap):
                near |= (wide - b).abs() <= gap
        count += int(near.sum())
    return count


#: Tensors up to this many elements are described together by :func:`describe_many`.
TINY_MAX = 1024
_RESOLUTION = np.finfo(np.float64).resolution


def describe_many(tensors: Sequence[torch.Tensor], infos: Sequence[TensorInfo], *,
                  spectral: bool = False) -> list[TensorSummary]:
    """:func:`describe` of many tensors at once: the same values, bit for bit.

    A checkpoint of 100,000 tiny tensors spends its time in per-call overhead, not
    arithmetic. Tensors of up to :data:`TINY_MAX` elements that share a shape and
    dtype are stacked into one matrix and every step of :func:`describe` runs once
    per matrix, row-wise: the sort, the float64 widening, the pairwise sums
    (``np.add.reduce`` along rows runs numpy's pairwise sum on each row, exactly as
    on a 1-D array), the dot products (``np.vecdot`` calls the BLAS dot that
    ``np.dot`` calls, once per row) and the percentile interpolation (the same
    float64 operations, element-wise). The few steps whose rounding could differ
    between numpy and Python (powers) stay per tensor, in Python, as in :func:`moments`.
    Rows holding NaN or Inf, lone shapes and everything larger go through :func:`describe`.

    >>> ts = [torch.tensor([3.0, -1.0, 2.0]), torch.tensor([0.5, 0.0, 0.25])]
    >>> infos = [TensorInfo(f"t{i}", "float32", (3,)) for i in range(2)]
    >>> [s.stats == describe(t, i).stats for s, t, i in zip(describe_many(ts, infos), ts, infos)]
    [True, True]
    """
    out: list[TensorSummary | None] = [None] * len(tensors)
    groups: dict[tuple[tuple[int, ...], str], list[int]] = {}
    for k, info in enumerate(infos):
        groups.setdefault((info.shape, info.dtype), []).append(k)
    for (shape, _), ks in groups.items():
        first = tensors[ks[0]]
        if (len(ks) == 1 or not 0 < first.numel() <= TINY_MAX or not first.is_floating_point()
                or any(t.requires_grad or t.dtype != first.dtype or t.shape != shape for t in map(tensors.__getitem__, ks))):
            for k in ks:
                out[k] = describe(tensors[k], infos[k], spectral=spectral)
            continue
        dtype = first.dtype
        stacked = torch.stack([tensors[k] for k in ks])
        if dtype not in _NATIVE:
            stacked = stacked.to(torch.float32)
        values = np.sort(stacked.numpy().reshape(len(ks), -1), axis=1)
        finite = np.isfinite(values[:, 0]) & np.isfinite(values[:, -1])
        if not finite.all():  # NaN or Inf in some rows: those are described one by one
            for k in (k for k, ok in zip(ks, finite.tolist()) if not ok):
                out[k] = describe(tensors[k], infos[k], spectral=spectral)
            ks = [k for k, ok in zip(ks, finite.tolist()) if ok]
            values = values[finite]
            if not ks:
                continue
        for k, stats, row in zip(ks, _rows_stats(values), values):
            if spectral and len(shape) >= 2:
                _add_spectral(stats, tensors[k])
            out[k] = TensorSummary(info=infos[k], values=row, stats=stats, n_finite=row.size)
    return out  # type: ignore[return-value]


def _rows_stats(values: np.ndarray) -> list[dict[str, float]]:
    """The statistics of each row of ``values`` (sorted, finite, non-empty rows of equal length).

    Sums, dots, divisions and square roots run on whole columns (numpy's are
    IEEE-exact like Python's); powers run per row in Python, as in :func:`moments`.
    """
    k, n = values.shape
    block = values.astype(np.float64)
    # moments(): one block per row, the same operations in the same order
    total = 0.0 + add_reduce(block, axis=1)
    sumsq = 0.0 + np.vecdot(block, block)
    mean = total / n
    d = block - mean[:, None]
    d2 = d * d
    m2 = (0.0 + add_reduce(d2, axis=1)) / n
    m3 = (0.0 + np.vecdot(d2, d)) / n
    m4 = (0.0 + np.vecdot(d2, d2)) / n
    lo, hi = block[:, 0], block[:, -1]
    columns: dict[str, list[float]] = {
        "mean": mean.tolist(), "std": np.sqrt(m2).tolist(), "min": lo.tolist(), "max": hi.tolist(),
        "abs_max": np.maximum(np.abs(lo), np.abs(hi)).tolist(), "l2_norm": np.sqrt(sumsq).tolist(),
        "rms": np.sqrt(sumsq / n).tolist(), "frac_zero": (np.count_nonzero(values == 0, axis=1) / n).tolist(),
        "n_nan": [0] * k, "n_inf": [0] * k,
    }
    skew, kurtosis = [], []
    for mean_r, m2_r, m3_r, m4_r in zip(columns["mean"], m2.tolist(), m3.tolist(), m4.tolist()):
        if m2_r <= (_RESOLUTION * 10 * mean_r) ** 2:  # constant: see moments()
            skew.append(math.nan)
            kurtosis.append(math.nan)
        else:
            skew.append(m3_r / m2_r**1.5)
            kurtosis.append(m4_r / m2_r**2 - 3.0)
    columns["skew"], columns["kurtosis"] = skew, kurtosis
    where, plan = _percentile_plan(n)
    picked = block[:, where]
    for name, i, j, frac in plan:  # percentile()'s interpolation, element-wise
        a, b = picked[:, i], picked[:, j]
        columns[name] = (b - (b - a) * (1.0 - frac) if frac >= 0.5 else a + (b - a) * frac).tolist()
    columns["spectral_norm"] = columns["stable_rank"] = [math.nan] * k
    return [dict(zip(STAT_COLUMNS, row)) for row in zip(*(columns[c] for c in STAT_COLUMNS))]


_PERCENTILE_NAMES = tuple(name for name, _ in PERCENTILES)


def _describe_large(t: torch.Tensor, info: TensorInfo, stats: dict[str, float]) -> TensorSummary:
    """Streaming statistics: float64 moments over blocks, percentiles from a :mod:`sketch`.

    One pass accumulates power sums of ``x - shift`` in float64, the shift being the
    first block's mean: with it near the true mean, turning them into central
    moments loses only a few float64 digits (checked to 1e-6 against scipy in
    the tests). One to four more passes build the sketch. Nothing is copied whole.
    """
    flat = t.detach().reshape(-1)
    n = n_nan = zeros = 0
    s1 = s2 = s3 = s4 = 0.0
    shift: float | None = None
    lo, hi = math.inf, -math.inf
    for block in blocks(flat):
        wide = block.to(torch.float64)
        if not math.isfinite(float(wide.sum())):  # NaN/Inf propagate into the sum: only then filter
            finite = torch.isfinite(wide)
            n_nan += int(torch.isnan(wide).sum())
            wide, block = wide[finite], block[finite]
        if not block.numel():
            continue
        if shift is None:
            shift = float(wide.mean())
        n += block.numel()
        y = wide - shift
        y2 = y * y
        s1 += float(y.sum())
        s2 += float(y2.sum())
        s3 += float(torch.dot(y2, y))
        s4 += float(torch.dot(y2, y2))
        lo, hi = min(lo, float(block.min())), max(hi, float(block.max()))
        zeros += int((block == 0).sum())
    stats["n_nan"], stats["n_inf"] = n_nan, t.numel() - n - n_nan
    stats["frac_zero"] = zeros / t.numel()
    if n == 0 or shift is None:
        return TensorSummary(info=info, values=None, stats=stats, sketch=build(flat, 0.0, 0.0, 0), n_finite=0)
    e1, e2, e3, e4 = s1 / n, s2 / n, s3 / n, s4 / n
    mean = shift + e1
    m2 = max(e2 - e1 * e1, 0.0)
    m3 = e3 - 3 * e1 * e2 + 2 * e1**3
    m4 = e4 - 4 * e1 * e3 + 6 * e1 * e1 * e2 - 3 * e1**4
    sumsq = s2 + 2 * shift * s1 + n * shift * shift  # sum of x^2 from the shifted sums
    constant = m2 <= (np.finfo(np.float64).resolution * 10 * mean) ** 2
    stats.update(mean=mean, std=math.sqrt(m2), skew=math.nan if constant else m3 / m2**1.5,
                 kurtosis=math.nan if constant else m4 / m2**2 - 3.0, l2_norm=math.sqrt(max(sumsq, 0.0)),
                 rms=math.sqrt(max(sumsq, 0.0) / n), min=lo, max=hi, abs_max=max(abs(lo), abs(hi)))
    sketch = build(flat, lo, hi, n)
    for name, q in PERCENTILES:
        stats[name] = sketch.quantile(q)
    return TensorSummary(info=info, values=None, stats=stats, sketch=sketch, n_finite=n)


def _describe_fused(t: torch.Tensor, info: TensorInfo, stats: dict[str, float],
                    against: Sequence[tuple[TensorSummary, torch.Tensor]], threads: int) -> TensorSummary:
    """:func:`_describe_large` in one pass (:func:`auditclip.fused.fused_pass`), with the element-wise
    sums against ``against`` and the sketch from the pass's histogram (plus the exact values of heavy
    float32 bins, the only second pass, and only where a point mass is)."""
    r = fused_pass(t, [other for _, other in against], threads=threads)
    n = r.n_finite
    stats["n_nan"], stats["n_inf"] = r.n_nan, r.n_inf
    stats["frac_zero"] = r.zeros / t.numel()
    pairs = {id(base): p.as_dict() for (base, _), p in zip(against, r.pairs) if p is not None}
    if n == 0:
        return TensorSummary(info=info, values=None, stats=stats, sketch=build(t.reshape(-1)[:0].cpu(), 0.0, 0.0, 0),
                             n_finite=0, pairs=pairs)
    shift = r.shift
    e1, e2, e3, e4 = r.s1 / n, r.s2 / n, r.s3 / n, r.s4 / n
    mean = shift + e1
    m2 = max(e2 - e1 * e1, 0.0)
    m3 = e3 - 3 * e1 * e2 + 2 * e1**3
    m4 = e4 - 4 * e1 * e3 + 6 * e1 * e1 * e2 - 3 * e1**4
    sumsq = r.s2 + 2 * shift * r.s1 + n * shift * shift
    constant = m2 <= (np.finfo(np.float64).resolution * 10 * mean) ** 2
    lo, hi = r.lo, r.hi
    stats.update(mean=mean, std=math.sqrt(m2), skew=math.nan if constant else m3 / m2**1.5,
                 kurtosis=math.nan if constant else m4 / m2**2 - 3.0, l2_norm=math.sqrt(max(sumsq, 0.0)),
                 rms=math.sqrt(max(sumsq, 0.0) / n), min=lo, max=hi, abs_max=max(abs(lo), abs(hi)))
    atoms = None
    if not r.exact_bins:
        heavy = r.bins[r.counts > HEAVY * n]
        atoms = refine(t, heavy) if heavy.size else None
    sketch = from_histogram(r.bins, r.counts, lo, hi, n, exact=r.exact_bins, atoms=atoms)
    for name, q in PERCENTILES:
        stats[name] = sketch.quantile(q)
    return TensorSummary(info=info, values=None, stats=stats, sketch=sketch, n_finite=n, pairs=pairs)
