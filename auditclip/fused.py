"""One pass over a large tensor: every statistic and both element-wise comparisons at once.

:func:`fused_pass` reads each element of a float32, float16 or bfloat16 tensor
once, block by block (:data:`BLOCK` elements), and returns what
:mod:`auditclip.stats`, :mod:`auditclip.sketch` and :mod:`auditclip.distances`
need of it:

* count, finite count, NaN count, zeros, min and max;
* power sums of ``x - shift`` to the 4th and the sum of squares, each block
  accumulated in float64 and the blocks merged in float64 in block order, so the
  moments match float64 numpy/scipy to ~1e-12 relative (the tests ask 1e-6);
* the counts of a histogram over the value-ordered 32-bit key of each float32
  value, cut to its top 20 bits (:data:`KEY_BITS`: sign, exponent and 11 mantissa
  bits, bins 0.05% wide in relative terms). float16 and bfloat16 values (10 and 7
  mantissa bits) each have a bin of their own, so their histogram *is* the exact
  distribution; for float32 a bin holding more than ``sketch.HEAVY`` of the values
  (a point mass such as exact zeros) is read exactly in a second pass
  (:func:`refine`), as the old sketch did;
* against each other version of the same tensor (previous, reference):
  Σ(a-b)², Σb², Σab and max|a-b| (Σa² is shared), products formed in float64.

Two implementations give the same numbers within float64 rounding: a numba
kernel (:mod:`auditclip._fused_numba`, used when numba is installed and the
tensors are on the CPU; a float32 block is read in place, a 16-bit one widened
to float32 a chunk at a time into a buffer that stays in cache), and torch
operations on float64 blocks, which run on any device (``--device cuda``: each
version is moved to the GPU once and the same pass runs there). Neither copies
a tensor whole. The result does not depend on the number of threads: blocks
are fixed, and partial sums are merged in block order.
"""

from __future__ import annotations

import math
import os
import sys
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

#: Elements per block: the unit of float64 accumulation (64K: a float64 block stays in L2).
BLOCK = 1 << 16
#: Top bits of the value-ordered key kept as the histogram bin (sign + 8 exponent + 11 mantissa).
KEY_BITS = 20
BINS = 1 << KEY_BITS
_SHIFT = 32 - KEY_BITS
_HALF = BINS >> 1
#: dtypes the fused pass reads (anything else goes through the float64 block path of stats).
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: 16-bit dtypes: every value has a histogram bin of its own.
EXACT_DTYPES = (torch.float16, torch.bfloat16)
_NCOL = 18
_CHUNK = 1 << 18  # 16-bit data is widened this many elements at a time (1 MB of float32: stays in L2)

_numba_state: dict[str, object] = {}
_numba_lock = threading.Lock()
_use_numba = os.environ.get("AUDITCLIP_NUMBA", "1") != "0"


def numba_available() -> bool:
    """Whether the numba kernel can run (numba installed, not disabled by ``AUDITCLIP_NUMBA=0``).

    >>> isinstance(numba_available(), bool)
    True
    """
    return _kernel() is not None


def set_numba(enabled: bool) -> bool:
    """Use the numba kernel when available (``True``) or always torch (``False``); returns the previous setting.

    >>> previous = set_numba(False); set_numba(previous)
    False
    """
    global _use_numba
    previous, _use_numba = _use_numba, enabled
    return previous


def numba_kernels(name: str):  # noqa: ANN201 - a numba dispatcher or None
    """A compiled kernel of :mod:`auditclip._fused_numba` by name, or None without numba.

    >>> numba_kernels("clamp_count") is None or callable(numba_kernels("clamp_count"))
    True
    """
    if _kernel() is None:
        return None
    from . import _fused_numba

    return getattr(_fused_numba, name)


def _kernel():  # noqa: ANN202 - a numba dispatcher or None
    if not _use_numba:
        return None
    with _numba_lock:
        if "kernel" not in _numba_state:
            try:
                from ._fused_numba import blocks_pass, blocks_pass16
            except ImportError:
                _numba_state["kernel"] = None
            else:
                _numba_state["kernel"] = (blocks_pass, blocks_pass16)
    return _numba_state["kernel"]


@dataclass
class PairSums:
    """Element-wise sums of a tensor ``a`` against another version ``b`` of the same shape."""

    delta_sq: float
    base_sq: float
    cur_sq: float
    dot: float
    max_abs: float

    def as_dict(self) -> dict[str, float]:
        """The dict :func:`auditclip.distances.elementwise` returns."""
        return {"delta_sq": self.delta_sq, "base_sq": self.base_sq, "cur_sq": self.cur_sq, "dot": self.dot,
                "max_abs": self.max_abs}


@dataclass
class PassResult:
    """What one :func:`fused_pass` over a tensor found (sums in float64, counts exact)."""

    numel: int
    n_finite: int
    n_nan: int
    zeros: int
    shift: float
    s1: float
    s2: float
    s3: float
    s4: float
    lo: float
    hi: float
    bins: np.ndarray  # indices of the non-empty histogram bins, increasing
    counts: np.ndarray  # their counts (float64)
    exact_bins: bool  # every bin holds one value (16-bit dtypes)
    pairs: list[PairSums | None] = field(default_factory=list)

    @property
    def n_inf(self) -> int:
        return self.numel - self.n_finite - self.n_nan


_heap = {"bounded": False}


def bound_heap() -> None:
    """Have glibc give every freed block of 4 MB or more straight back to the system.

    By default glibc raises its mmap threshold each time a large block is freed (up to
    32 MB), so later tensors below that size come from the heap, and each thread's arena
    keeps what they free: on a 4 x 200 MB run that held 120 MB more than the three live
    versions of a tensor with two workers. A fixed threshold keeps the peak near what is
    alive. Nothing is done where the C library has no ``mallopt`` or the user set
    ``MALLOC_MMAP_THRESHOLD_`` themselves.

    >>> bound_heap()
    """
    if _heap["bounded"] or "MALLOC_MMAP_THRESHOLD_" in os.environ or not sys.platform.startswith("linux"):
        return
    _heap["bounded"] = True
    try:
        import ctypes

        ctypes.CDLL(None).mallopt(-3, 4 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def stats_device(name: str | None) -> torch.device | None:
    """The device the statistics pass runs on for ``--device NAME``; None for the CPU.

    ``auto`` (the shared option's default) is the CPU: the GPU only when asked for, with
    ``cuda`` (or ``cuda:N``), which is an :class:`~auditclip.errors.InputError` without CUDA.
    ``mps`` runs the statistics on the CPU (MPS has no float64, which every sum here is
    accumulated in), with a note.

    >>> stats_device(None), stats_device("cpu")
    (None, None)
    """
    from .errors import InputError

    if name in (None, "cpu", "auto"):
        return None
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(f"--device {name}: no CUDA device is available here (torch {torch.__version__} "
                             "sees none); leave --device out to run on the CPU")
        try:
            return torch.device(name)
        except RuntimeError as exc:
            raise InputError(f"--device {name}: {exc}") from exc
    if name == "mps":
        from .notices import note

        note("--device mps: the statistics run on the CPU (MPS has no float64 to accumulate in)")
        return None
    raise InputError(f"--device {name}: the statistics run on cpu or cuda")


def widen(block: torch.Tensor, out: np.ndarray | None = None) -> torch.Tensor:
    """``block.to(torch.float32)``, exactly; on the CPU through numpy, into ``out`` when given.

    torch's own bfloat16/float16 -> float32 conversion runs at 15-17 ns an element on this
    project's 2-core machine (it was most of the time of a bfloat16 run); a bfloat16 is the
    top half of a float32, so numpy widens it with one shift (0.3 ns), and a float16 with
    numpy's half-precision cast (2 ns).

    >>> widen(torch.tensor([1.5, -0.25], dtype=torch.bfloat16)).tolist()
    [1.5, -0.25]
    """
    if block.dtype == torch.float32:
        return block
    if block.device.type != "cpu" or block.dtype not in EXACT_DTYPES:
        return block.to(torch.float32)
    flat = block.reshape(-1)
    if out is None:
        out = np.empty(flat.numel(), dtype=np.float32)
    else:
        out = out[:flat.numel()]
    raw = flat.view(torch.int16).numpy()
    if block.dtype == torch.bfloat16:
        np.left_shift(raw.view(np.uint16), np.uint32(16), out=out.view(np.uint32), dtype=np.uint32)
    else:
        np.copyto(out, raw.view(np.float16))
    return torch.from_numpy(out).view(block.shape)


def _shift_of(flat: torch.Tensor) -> float:
    """Mean of the finite values of the first block: near the true mean, it keeps the shifted sums accurate."""
    head = widen(flat[:BLOCK])
    if head.device.type == "cpu":
        values = head.numpy()
        values = values[np.isfinite(values)]
        return float(np.mean(values, dtype=np.float64)) if values.size else 0.0
    head = head.to(torch.float64)
    head = head[torch.isfinite(head)]
    return float(head.mean()) if head.numel() else 0.0


def fused_pass(t: torch.Tensor, against: Sequence[torch.Tensor | None] = (), *, threads: int = 1) -> PassResult:
    """Statistics, histogram and element-wise sums of ``t`` in one pass (see the module docstring).

    ``against``: other versions of the same tensor (None entries and tensors of another
    shape or of a dtype outside :data:`DTYPES` get no sums: None in ``pairs``).
    ``threads``: CPU threads sharing the blocks (the numba kernel releases the GIL);
    the result does not depend on it.

    >>> r = fused_pass(torch.tensor([1.0, -2.0, 0.0, float("nan")]), [torch.tensor([1.0, 0.0, 0.0, 1.0])])
    >>> r.n_finite, r.n_nan, r.zeros, r.lo, r.hi, r.pairs[0].delta_sq != r.pairs[0].delta_sq
    (3, 1, 1, -2.0, 1.0, True)
    """
    flat = t.detach().reshape(-1)
    if flat.dtype not in DTYPES:
        raise TypeError(f"fused_pass reads {', '.join(map(str, DTYPES))}, not {flat.dtype}")
    if len(against) > 2:  # the kernels hold two comparisons (previous and reference)
        raise ValueError(f"fused_pass compares with at most two other versions, not {len(against)}")
    others = [o.detach().reshape(-1) if o is not None and tuple(o.shape) == tuple(t.shape)
              and o.dtype in DTYPES and o.device == t.device else None for o in against]
    shift = _shift_of(flat)
    kernel = _kernel() if flat.device.type == "cpu" else None
    if kernel is not None and flat.dtype in EXACT_DTYPES:
        rows, hist = _numba_rows(kernel[1], flat, others, None, threads)
        return _merge(rows, hist, flat, others, shift, from_hist=True)
    if kernel is not None:
        rows, hist = _numba_rows(kernel[0], flat, others, shift, threads)
    else:
        rows, hist = _torch_rows(flat, others, shift)
    return _merge(rows, hist, flat, others, shift)


def _merge(rows: np.ndarray, hist: np.ndarray, flat: torch.Tensor, others: list[torch.Tensor | None],
           shift: float, from_hist: bool = False) -> PassResult:
    """Block rows (in block order) and the histogram into one :class:`PassResult`.

    ``from_hist``: 16-bit data whose rows hold only the element-wise sums; every statistic
    comes from the histogram, where each bin is one value: sums over the distinct values
    times their counts, in float64 (no element is read again).
    """
    bins = np.flatnonzero(hist)
    if from_hist:  # 65,536 bins by the value-ordered 16-bit key: one value each
        values, bins = _values16(bins, flat.dtype)
        counts = hist[np.flatnonzero(hist)].astype(np.float64)
        fin = np.isfinite(values)
        v, c = values[fin], counts[fin]
        nfin, n_nan = int(c.sum()), int(counts[np.isnan(values)].sum())
        shift = float(np.dot(c, v) / nfin) if nfin else 0.0
        y = v - shift
        cy = c * y
        cy2 = cy * y
        sq = float(np.dot(c, v * v)) if fin.all() else float(np.dot(counts, values * values))  # NaN/Inf propagate
        sums = np.array([cy.sum(), cy2.sum(), np.dot(cy2, y), np.dot(cy2 * y, y), sq])
        lo, hi = (float(v[0]), float(v[-1])) if v.size else (math.inf, -math.inf)
        zeros = int(c[v == 0].sum())
        bins, counts = bins[fin], c
    else:
        counts = hist[bins].astype(np.float64)
        sums = rows[:, :5].sum(axis=0)  # numpy's pairwise sum over blocks, in block order
        nfin, n_nan, zeros = int(rows[:, 8].sum()), int(rows[:, 9].sum()), int(rows[:, 7].sum())
        lo = float(rows[:, 5].min()) if len(rows) else math.inf
        hi = float(rows[:, 6].max()) if len(rows) else -math.inf
    pairs: list[PairSums | None] = []
    for j, other in enumerate(others):
        if other is None:
            pairs.append(None)
            continue
        cols = rows[:, 10 + 4 * j:14 + 4 * j]
        tops = cols[:, 3]
        top = math.nan if np.isnan(tops).any() else (float(tops.max()) if tops.size else 0.0)
        d2, b2, dot = cols[:, :3].sum(axis=0).tolist()
        pairs.append(PairSums(d2, b2, float(sums[4]), dot, top))
    return PassResult(
        numel=flat.numel(), n_finite=nfin, n_nan=n_nan, zeros=zeros, shift=shift,
        s1=float(sums[0]), s2=float(sums[1]), s3=float(sums[2]), s4=float(sums[3]), lo=lo, hi=hi,
        bins=bins, counts=counts, exact_bins=flat.dtype in EXACT_DTYPES, pairs=pairs,
    )


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _threads_pool(n: int) -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None or _pool._max_workers < n:  # noqa: SLF001 - grow once, reuse
            _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="auditclip-fused")
        return _pool


def _numba_rows(kernel, flat: torch.Tensor, others: list[torch.Tensor | None], shift: float | None,  # noqa: ANN001
                threads: int) -> tuple[np.ndarray, np.ndarray]:
    n = flat.numel()
    nb = -(-n // BLOCK)
    rows = np.zeros((nb, _NCOL))
    pads = (others + [None, None])[:2]
    empty = np.empty(0, dtype=np.float32)
    # split the blocks into parts of whole chunks; each part is one thread's, with its own histogram
    per_part = -(-nb // max(1, threads))
    per_part = -(-per_part // (_CHUNK // BLOCK)) * (_CHUNK // BLOCK)
    parts = [(b, min(nb, b + per_part)) for b in range(0, nb, per_part)]

    def run(part: tuple[int, int]) -> np.ndarray:
        # int32 counts while a tensor has fewer than 2**31 elements: half the cache and memory of int64
        count_type = np.int32 if n < (1 << 31) else np.int64
        hist = np.zeros(BINS if shift is not None else 1 << 16, dtype=count_type)
        first, last = part
        start, stop = first * BLOCK, min(n, last * BLOCK)
        native = all(t.dtype == torch.float32 for t in (flat, *(o for o in pads if o is not None)))
        step = stop - start if native else _CHUNK
        scratch = [np.empty(min(step, stop - start), dtype=np.float32) for _ in range(3)]  # reused, stays in cache
        for s in range(start, stop, step):
            e = min(stop, s + step)
            p, r = (widen(o[s:e], buf).numpy() if o is not None else empty for o, buf in zip(pads, scratch[1:]))
            if shift is None:  # 16-bit: histogram of the raw values; widened only for element-wise sums
                x = widen(flat[s:e], scratch[0]).numpy() if p.size or r.size else empty
                kernel(flat[s:e].view(torch.int16).numpy(), x, p, r, BLOCK, s // BLOCK, rows, hist)
            else:
                x = widen(flat[s:e], scratch[0]).numpy()
                kernel(x, shift, p, r, BLOCK, s // BLOCK, rows, hist)
        return hist

    if len(parts) == 1:
        hist = run(parts[0])
    else:
        hists = list(_threads_pool(len(parts)).map(run, parts))
        hist = hists[0]
        for h in hists[1:]:
            hist += h
    return rows, hist


def _torch_rows(flat: torch.Tensor, others: list[torch.Tensor | None], shift: float) -> tuple[np.ndarray, np.ndarray]:
    """The block rows with torch operations (any device): float64 blocks, no host sync until the end."""
    dev = flat.device
    n = flat.numel()
    step = BLOCK * 4 if dev.type == "cpu" else BLOCK * 64  # GPU: fewer, larger launches; rows still per BLOCK
    rows = torch.zeros((-(-n // BLOCK), _NCOL), dtype=torch.float64, device=dev)
    hist = torch.zeros(BINS + 1, dtype=torch.int64, device=dev)  # the last bin collects NaN/Inf, dropped
    for s in range(0, n, step):
        e = min(n, s + step)
        full = (e - s) // BLOCK * BLOCK
        for a, b, width in ((s, s + full, BLOCK), (s + full, e, e - s - full)):
            if b > a:
                _torch_blocks(flat[a:b], [o[a:b] if o is not None else None for o in others], shift, width,
                              rows[a // BLOCK:a // BLOCK + (b - a) // width], hist)
    return rows.cpu().numpy(), hist[:BINS].cpu().numpy()


def _torch_blocks(x: torch.Tensor, others: list[torch.Tensor | None], shift: float, width: int,
                  out: torch.Tensor, hist: torch.Tensor) -> None:
    """Rows of consecutive blocks of ``width`` elements (``x.numel()`` a multiple of it)."""
    x = widen(x)
    w = x.to(torch.float64).view(-1, width)
    fin = torch.isfinite(w)
    y = torch.where(fin, w - shift, 0.0)
    y2 = y * y
    inf = math.inf
    out[:, 0] = y.sum(1)
    out[:, 1] = y2.sum(1)
    out[:, 2] = (y2 * y).sum(1)
    out[:, 3] = (y2 * y2).sum(1)
    out[:, 4] = (w * w).sum(1)
    out[:, 5] = torch.where(fin, w, inf).amin(1)
    out[:, 6] = torch.where(fin, w, -inf).amax(1)
    out[:, 7] = (w == 0).sum(1)
    out[:, 8] = fin.sum(1)
    out[:, 9] = torch.isnan(w).sum(1)
    bits = x.view(torch.int32)
    key = (bits ^ ((bits >> 31) & 0x7FFFFFFF)) >> _SHIFT
    if x.device.type == "cpu":  # count over the keys' own range: no 8 MB of zeros per block
        idx = key[torch.isfinite(x)].to(torch.int64) + _HALF
        if idx.numel():
            first = int(idx.min())
            counts = torch.bincount(idx - first)
            hist[first:first + counts.numel()] += counts
    else:  # no host sync: NaN/Inf go to the extra last bin
        idx = torch.where(torch.isfinite(x), key.to(torch.int64) + _HALF, BINS)
        hist += torch.bincount(idx, minlength=BINS + 1)
    for j, other in enumerate(others[:2]):
        if other is None:
            continue
        b = widen(other).to(torch.float64).view(-1, width)
        d = w - b
        c = 10 + 4 * j
        out[:, c] = (d * d).sum(1)
        out[:, c + 1] = (b * b).sum(1)
        out[:, c + 2] = (w * b).sum(1)
        out[:, c + 3] = d.abs().amax(1)  # torch's max propagates NaN, as elementwise() does


def refine(t: torch.Tensor, bins: np.ndarray) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Distinct finite values and their counts inside the given histogram bins (a second pass, float32 data).

    >>> x = torch.tensor([0.0, 0.0, 1.0, 0.0])
    >>> r = fused_pass(x)
    >>> zero_bin = int(r.bins[0]); refine(x, np.array([zero_bin]))[zero_bin]
    (array([0.]), array([3.]))
    """
    flat = t.detach().reshape(-1)
    dev = flat.device
    wanted = torch.zeros(BINS, dtype=torch.bool, device=dev)
    wanted[torch.from_numpy(bins.astype(np.int64)).to(dev)] = True
    found: dict[int, dict[float, float]] = {}
    for s in range(0, flat.numel(), _CHUNK):
        x = widen(flat[s:s + _CHUNK])
        x = x[torch.isfinite(x)]
        bits = x.view(torch.int32)
        idx = ((bits ^ ((bits >> 31) & 0x7FFFFFFF)) >> _SHIFT).to(torch.int64) + _HALF
        mine = wanted[idx]
        if not bool(mine.any()):
            continue
        values, counts = torch.unique(x[mine], return_counts=True)
        value_bins = ((values.view(torch.int32) ^ ((values.view(torch.int32) >> 31) & 0x7FFFFFFF)) >> _SHIFT).to(torch.int64) + _HALF
        for b, v, c in zip(value_bins.tolist(), values.tolist(), counts.tolist()):
            bucket = found.setdefault(int(b), {})
            v = v + 0.0  # -0.0 and 0.0 are one value
            bucket[v] = bucket.get(v, 0.0) + c
    return {b: (np.array(sorted(d)), np.array([d[v] for v in sorted(d)], dtype=np.float64)) for b, d in found.items()}


def _values16(keys: np.ndarray, dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Values (float64) and 20-bit bins of the float16/bfloat16 values with these 16-bit keys."""
    k = (keys.astype(np.int32) - 32768).astype(np.int16)
    bits = np.where(k < 0, k ^ np.int16(0x7FFF), k).astype(np.int16)
    if dtype == torch.bfloat16:
        f32 = (bits.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        f32 = bits.view(np.float16).astype(np.float32)
    b32 = f32.view(np.int32)
    return f32.astype(np.float64), ((b32 ^ ((b32 >> 31) & 0x7FFFFFFF)) >> _SHIFT).astype(np.int64) + _HALF


def bin_edges(bins: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lowest and next-bin-lowest float32 value of each histogram bin, as float64 (the upper edge is exclusive).

    >>> lo, hi = bin_edges(np.array([_HALF]))  # the bin holding +0.0
    >>> float(lo[0]), 0 < float(hi[0]) < 1e-38
    (0.0, True)
    """
    keys = (bins.astype(np.int64) - _HALF) << _SHIFT
    return _key_value(keys), _key_value(keys + (1 << _SHIFT))


def bin_values(bins: np.ndarray) -> np.ndarray:
    """The one float16/bfloat16 value of each bin (as float64; -0.0 given as 0.0).

    >>> r = fused_pass(torch.tensor([-1.5, 0.25, 0.25], dtype=torch.bfloat16))
    >>> bin_values(r.bins).tolist(), r.counts.tolist()
    ([-1.5, 0.25], [1.0, 2.0])
    """
    keys = (bins.astype(np.int64) - _HALF) << _SHIFT
    # a 16-bit value widened to float32 has its low 13 bits zero: in a negative bin that is the bin's top key
    keys = np.where(keys < 0, keys + (1 << _SHIFT) - 1, keys)
    return _key_value(keys) + 0.0


def _key_value(keys: np.ndarray) -> np.ndarray:
    """float64 of the float32 whose value-ordered key is ``keys`` (int64 within the int32 range, or 2**31)."""
    k = np.clip(keys, -(1 << 31), (1 << 31) - 1).astype(np.int32)
    bits = np.where(k < 0, k ^ np.int32(0x7FFFFFFF), k).astype(np.int32)
    return bits.view(np.float32).astype(np.float64)
