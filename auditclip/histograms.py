"""Value histograms of every tensor at every checkpoint, on bins shared across the run.

A histogram per step is only comparable across steps when every step uses the same
bins, but the run's range of a tensor is known only once its last checkpoint was
read, and the walk reads each tensor version once (:func:`auditclip.analysis.analyze`).
So each version is counted, while it is in memory, on a fine *lattice*: bins of width
``2**e`` whose edges are the integer multiples of ``2**e``, with ``e`` chosen so the
version's own [min, max] spans :data:`FINE_BINS` to ``2 x FINE_BINS`` bins. That is
at most 1 KB per version (int32 counts), whatever the tensor's size.

Once the run is walked, the tensor's run-wide buckets have width ``2**E``, the
smallest power of two that covers the run's range in :data:`BUCKETS` buckets or
fewer (plus at most two), and never finer than any version's lattice. Every bucket
edge (a multiple of ``2**E``) is then an edge of every version's lattice, because
``2**E`` is a multiple of each ``2**e``: re-binning sums whole fine bins. The
counts are exact, integers, and sum to the version's number of finite values
(``numel - n_nan - n_inf``); nothing is interpolated and no file is read twice.

A value ``x`` lies in lattice bin ``floor(x / 2**e)``; the division by a power of
two is exact in float64, so each value's bin is decided without rounding.

>>> import torch
>>> collector = HistogramCollector()
>>> for label, t in (("a", torch.linspace(0, 1, 1001)), ("b", torch.linspace(-1, 3, 1001))):
...     collector.add(label, "w", t)
>>> h = collector.result()["w"]
>>> bool((h.edges[0] <= -1) and (h.edges[-1] > 3)), [int(h.counts[k].sum()) for k in ("a", "b")]
(True, [1001, 1001])
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import torch

#: Fine bins per tensor version, at least (at most twice as many): the lattice it is counted on.
FINE_BINS = 128
#: Run-wide buckets per tensor, at most (plus two: the range rarely starts on a bucket edge).
BUCKETS = 64
#: Elements per block when counting a large tensor (bounds the float64 copy to 8 MiB).
BLOCK = 1 << 20
#: Largest |x| / 2**e: below 2**52 every lattice index is an exact float64 integer.
_INDEX_LIMIT = 2.0 ** 52


@dataclass(frozen=True)
class Fine:
    """One tensor version counted on the lattice of width ``2**exp``: ``counts[i]`` values
    lie in ``[(start + i) * 2**exp, (start + i + 1) * 2**exp)``; ``lo``/``hi`` are the
    finite min and max, ``n`` the finite count."""

    exp: int
    start: int
    counts: np.ndarray
    lo: float
    hi: float
    n: int


def lattice_exponent(lo: float, hi: float, bins: int = FINE_BINS) -> int:
    """``e`` such that ``[lo, hi]`` spans ``bins`` to ``2 x bins`` bins of width ``2**e``.

    A constant tensor (``lo == hi``) gets bins far finer than its value; the exponent
    is raised where needed so every lattice index is an exact float64 integer.

    >>> lattice_exponent(0.0, 1.0), lattice_exponent(-0.01, 0.01)
    (-7, -13)
    """
    span = hi - lo
    top = max(abs(lo), abs(hi))
    if span > 0 and math.isfinite(span):
        e = math.frexp(span / bins)[1] - 1  # floor(log2(span / bins))
    elif top > 0:
        e = math.frexp(top)[1] - 21  # a constant: bins a millionth of its magnitude
    else:
        e = 0  # every value is zero
    if top > 0:
        e = max(e, math.frexp(top)[1] - 52)  # |x| / 2**e < 2**52
    return e


def count_fine(t: torch.Tensor, lo: float | None = None, hi: float | None = None, all_finite: bool = False) -> Fine:
    """Count the finite values of ``t`` on its lattice (see :func:`lattice_exponent`).

    ``lo``/``hi``: the finite min and max when already known (the walk's statistics);
    ``all_finite``: no NaN or Inf is there (known from the walk's counts), so none is looked for.

    ``x * 2**-e`` is exact in the tensor's own precision (float32, or float64 for fp64;
    fp16/bf16 widen exactly to float32), except where it underflows to zero: a negative
    value then still belongs to bin -1 or below, and is put there.

    >>> f = count_fine(torch.tensor([0.0, 0.5, 1.0, float("nan")]))
    >>> f.exp, int(f.counts.sum()), f.n
    (-7, 3, 3)
    """
    flat = t.detach().reshape(-1)
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        finite = flat[torch.isfinite(flat)] if flat.numel() else flat
        if not finite.numel():
            return Fine(0, 0, np.zeros(0, dtype=np.int64), math.nan, math.nan, 0)
        lo, hi = float(finite.min()), float(finite.max())
    exp = lattice_exponent(lo, hi)
    scale = math.ldexp(1.0, -exp)
    start = math.floor(lo * scale)
    size = math.floor(hi * scale) - start + 1
    counts = torch.zeros(size, dtype=torch.int64)
    work = torch.float64 if flat.dtype == torch.float64 else torch.float32
    for begin in range(0, flat.numel(), BLOCK):
        block = flat[begin:begin + BLOCK].to(work)
        if not all_finite:
            ok = torch.isfinite(block)
            if not bool(ok.all()):
                block = block[ok]
        index = torch.floor(block * scale)  # exact: scale is a power of two and |index| < 2**52
        if exp > 0:  # scale < 1: a tiny negative value can underflow to -0.0, yet it lies below 0
            index = torch.where(block < 0, index.clamp(max=-1.0), index)
        counts += torch.bincount(index.to(torch.int64) - start, minlength=size)
    out = counts.numpy()
    n = int(out.sum())
    # int32 halves what the run's histograms hold in memory; a count above 2**31 keeps int64
    return Fine(exp, start, out.astype(np.int32) if n < 2**31 else out, float(lo), float(hi), n)


@dataclass
class TensorHistograms:
    """One tensor across the run: shared bucket ``edges`` (``len(counts) + 1`` of them) and,
    per checkpoint label in run order, the integer ``counts`` of its finite values."""

    name: str
    edges: np.ndarray
    counts: dict[str, np.ndarray] = field(default_factory=dict)
    lo: dict[str, float] = field(default_factory=dict)
    hi: dict[str, float] = field(default_factory=dict)

    def density(self, label: str) -> np.ndarray:
        """Counts divided by (total x bucket width): integrates to 1 over the edges."""
        counts = self.counts[label].astype(np.float64)
        total = counts.sum()
        return counts / (total * np.diff(self.edges)) if total else counts


def rebin(fines: Iterable[Fine], buckets: int = BUCKETS) -> tuple[np.ndarray, list[np.ndarray]]:
    """Shared bucket edges for versions counted on their lattices, and each one's counts on them.

    Exact: every bucket edge is an edge of every version's lattice.

    >>> a, b = count_fine(torch.tensor([0.0, 1.0])), count_fine(torch.tensor([2.0, 3.0, 3.0]))
    >>> edges, (ca, cb) = rebin([a, b], buckets=4)
    >>> edges.tolist(), ca.tolist(), cb.tolist()
    ([0.0, 1.0, 2.0, 3.0, 4.0], [1, 1, 0, 0], [0, 0, 1, 2])
    """
    fines = list(fines)
    present = [f for f in fines if f.n]
    if not present:
        return np.array([0.0, 1.0]), [np.zeros(1, dtype=np.int64) for _ in fines]
    lo, hi = min(f.lo for f in present), max(f.hi for f in present)
    span = hi - lo
    # An all-zero version (a bias at initialisation) fits every lattice: 0 is an edge of each,
    # so its own (arbitrary) width must not coarsen the run's buckets.
    sized = [f for f in present if not _zero(f)]
    exp = max((f.exp for f in sized), default=0)
    if span > 0:
        mantissa, ex = math.frexp(span / buckets)
        exp = max(exp, ex - 1 if mantissa == 0.5 else ex)  # the smallest 2**E >= span / buckets
    first = min(0 if _zero(f) else f.start >> (exp - f.exp) for f in present)
    last = max(0 if _zero(f) else (f.start + len(f.counts) - 1) >> (exp - f.exp) for f in present)
    size = last - first + 1
    edges = np.ldexp(np.arange(first, last + 2, dtype=np.float64), exp)
    out = []
    for f in fines:
        counts = np.zeros(size, dtype=np.int64)
        if f.n and _zero(f):
            counts[-first] += f.n  # every value is 0, in the bucket starting at 0
        elif f.n:
            coarse = ((f.start + np.arange(len(f.counts), dtype=np.int64)) >> (exp - f.exp)) - first
            np.add.at(counts, coarse, f.counts.astype(np.int64))
        out.append(counts)
    return edges, out


def _zero(f: Fine) -> bool:
    return f.n > 0 and f.lo == 0.0 and f.hi == 0.0


class HistogramCollector:
    """Gathers :class:`Fine` counts during the walk: pass :meth:`visit` as ``analyze(visit=...)``
    (or ``flag(visit=...)``), then :meth:`result` gives every tensor's :class:`TensorHistograms`.

    Safe to call from the walker's threads.
    """

    def __init__(self, buckets: int = BUCKETS) -> None:
        self.buckets = buckets
        self._fine: dict[str, dict[str, Fine]] = {}
        self._lock = threading.Lock()

    def add(self, label: str, name: str, tensor: torch.Tensor, lo: float | None = None,
            hi: float | None = None) -> None:
        """Count one tensor version (``lo``/``hi``: its finite min and max, when known)."""
        fine = count_fine(tensor, lo, hi)
        with self._lock:
            self._fine.setdefault(name, {})[label] = fine

    def visit(self, label: str, name: str, tensor: torch.Tensor, summary: object) -> None:
        """The :data:`auditclip.analysis.Visitor` signature; min and max come from the walk's statistics."""
        stats = getattr(summary, "stats", {}) or {}
        clean = stats.get("n_nan") == 0 and stats.get("n_inf") == 0
        fine = count_fine(tensor, stats.get("min"), stats.get("max"), all_finite=clean)
        with self._lock:
            self._fine.setdefault(name, {})[label] = fine

    def result(self, order: Iterable[str] | None = None) -> dict[str, TensorHistograms]:
        """Every tensor's histograms on its run-wide buckets; ``order``: checkpoint labels in run order."""
        rank = {label: i for i, label in enumerate(order)} if order is not None else None
        out: dict[str, TensorHistograms] = {}
        for name, versions in self._fine.items():
            labels = list(versions)
            if rank is not None:
                labels = sorted((lb for lb in labels if lb in rank), key=rank.__getitem__)
            edges, counts = rebin([versions[lb] for lb in labels], self.buckets)
            h = TensorHistograms(name, edges)
            for lb, c in zip(labels, counts):
                h.counts[lb], h.lo[lb], h.hi[lb] = c, versions[lb].lo, versions[lb].hi
            out[name] = h
        return out


def chain(*visitors: object) -> object:
    """One visitor calling each given one (None entries skipped) in order.

    >>> seen = []
    >>> chain(lambda *a: seen.append(1), None, lambda *a: seen.append(2))("c", "w", None, None); seen
    [1, 2]
    """
    active = [v for v in visitors if v is not None]

    def visit(label: str, name: str, tensor: torch.Tensor, summary: object) -> None:
        for v in active:
            v(label, name, tensor, summary)  # type: ignore[operator]

    return visit
