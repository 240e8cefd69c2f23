"""The numba kernel of :mod:`auditclip.fused` (imported only when numba is installed).

One call walks a range of blocks of a float32 array (and, when given, the same
range of the previous and reference versions) once: per block, float64 shifted
power sums, the float64 sum of squares, min/max, zeros, finite and NaN counts,
the element-wise sums against each other version, and the counts of the
20-bit value-ordered key histogram. Every product is formed in float64
registers (a float32 times a float32 is exact in float64); nothing is copied.

The fast loops assume finite values and are compiled with reassociation so the
float64 accumulators vectorise; a block whose sums come out non-finite holds a
NaN or Inf and is walked again by the careful loop, which counts and skips them
(the element-wise sums keep NaN/Inf: they propagate by contract).
"""

from __future__ import annotations

import numpy as np
from numba import njit

# Reassociation lets the float64 sums vectorise; no-NaN/no-Inf assumptions are NOT
# made (a non-finite block must show up as a non-finite sum).
_FAST = {"reassoc", "nsz", "contract", "arcp"}
NCOL = 18
_HALF = 1 << 19  # bins below this index hold negative values


@njit(nogil=True, cache=True, fastmath=_FAST)
def _moments(x, shift, start, stop, o):  # pragma: no cover - compiled
    s1 = s2 = s3 = s4 = q = 0.0
    lo = np.inf
    hi = -np.inf
    zeros = 0
    for i in range(start, stop):
        v = np.float64(x[i])
        y = v - shift
        y2 = y * y
        s1 += y
        s2 += y2
        s3 += y2 * y
        s4 += y2 * y2
        q += v * v
        lo = v if v < lo else lo
        hi = v if v > hi else hi
        zeros += v == 0.0
    o[0] = s1
    o[1] = s2
    o[2] = s3
    o[3] = s4
    o[4] = q
    o[5] = lo
    o[6] = hi
    o[7] = zeros
    o[8] = stop - start
    o[9] = 0.0


@njit(nogil=True, cache=True)
def _careful(x, shift, start, stop, o, hist):  # pragma: no cover - compiled
    """The block again, skipping NaN/Inf for the statistics and the histogram."""
    s1 = s2 = s3 = s4 = q = 0.0
    lo = np.inf
    hi = -np.inf
    zeros = nfin = nnan = 0
    bits = x.view(np.int32)
    for i in range(start, stop):
        v = np.float64(x[i])
        q += v * v
        if v - v == 0.0:
            nfin += 1
            y = v - shift
            y2 = y * y
            s1 += y
            s2 += y2
            s3 += y2 * y
            s4 += y2 * y2
            if v < lo:
                lo = v
            if v > hi:
                hi = v
            if v == 0.0:
                zeros += 1
            k = bits[i]
            hist[((k ^ ((k >> 31) & 0x7FFFFFFF)) >> 12) + _HALF] += 1
        elif v != v:
            nnan += 1
    o[0] = s1
    o[1] = s2
    o[2] = s3
    o[3] = s4
    o[4] = q
    o[5] = lo
    o[6] = hi
    o[7] = zeros
    o[8] = nfin
    o[9] = nnan


@njit(nogil=True, cache=True, fastmath=_FAST)
def _pair(x, p, start, stop, o):  # pragma: no cover - compiled
    d2 = b2 = dot = m = 0.0
    for i in range(start, stop):
        v = np.float64(x[i])
        a = np.float64(p[i])
        d = v - a
        d2 += d * d
        b2 += a * a
        dot += v * a
        ad = abs(d)
        m = ad if ad > m else m
    o[0] = d2
    o[1] = b2
    o[2] = dot
    o[3] = m if d2 == d2 else np.nan  # a NaN difference makes the maximum NaN, as torch's max does


@njit(nogil=True, cache=True, fastmath=_FAST)
def _pair2(x, p, r, start, stop, o, q):  # pragma: no cover - compiled
    """:func:`_pair` against ``p`` into ``o`` and against ``r`` into ``q``, reading ``x`` once
    (1.6 ns an element against 2.5 for two passes)."""
    d2 = b2 = dot = m = 0.0
    e2 = c2 = dot2 = n = 0.0
    for i in range(start, stop):
        v = np.float64(x[i])
        a = np.float64(p[i])
        c = np.float64(r[i])
        d = v - a
        e = v - c
        d2 += d * d
        b2 += a * a
        dot += v * a
        e2 += e * e
        c2 += c * c
        dot2 += v * c
        ad = abs(d)
        m = ad if ad > m else m
        ae = abs(e)
        n = ae if ae > n else n
    o[0] = d2
    o[1] = b2
    o[2] = dot
    o[3] = m if d2 == d2 else np.nan
    q[0] = e2
    q[1] = c2
    q[2] = dot2
    q[3] = n if e2 == e2 else np.nan


@njit(nogil=True, cache=True)
def _hist(x, start, stop, hist):  # pragma: no cover - compiled
    bits = x.view(np.int32)
    for i in range(start, stop):
        k = bits[i]
        hist[((k ^ ((k >> 31) & 0x7FFFFFFF)) >> 12) + _HALF] += 1


@njit(nogil=True, cache=True)
def blocks_pass(x, shift, p, r, block, first, out, hist):  # pragma: no cover - compiled
    """Rows ``out[first + b]`` for the blocks of ``x`` (a chunk starting at block ``first``)."""
    n = x.size
    nb = (n + block - 1) // block
    hp = p.size == n
    hr = r.size == n
    for b in range(nb):
        start = b * block
        stop = min(n, start + block)
        o = out[first + b]
        _moments(x, shift, start, stop, o)
        if np.isfinite(o[0]) and np.isfinite(o[3]):
            _hist(x, start, stop, hist)
        else:
            _careful(x, shift, start, stop, o, hist)
        if hp and hr:
            _pair2(x, p, r, start, stop, o[10:14], o[14:18])
        elif hp:
            _pair(x, p, start, stop, o[10:14])
        elif hr:
            _pair(x, r, start, stop, o[14:18])


@njit(nogil=True, cache=True)
def _hist16(raw, start, stop, hist):  # pragma: no cover - compiled
    for i in range(start, stop):
        k = np.int32(raw[i])
        hist[(k ^ ((k >> 15) & 0x7FFF)) + 32768] += 1


@njit(nogil=True, cache=True)
def blocks_pass16(raw, x, p, r, block, first, out, hist):  # pragma: no cover - compiled
    """:func:`blocks_pass` for float16/bfloat16 data: the histogram of the raw 16-bit values
    (``raw``: their bits as int16; 65,536 bins, one per value, NaN and Inf included) and the
    element-wise sums of the widened ``x`` against ``p``/``r``; every statistic is read off the
    histogram (:func:`auditclip.fused.fused_pass`)."""
    n = raw.size
    nb = (n + block - 1) // block
    hp = p.size == n and x.size == n
    hr = r.size == n and x.size == n
    for b in range(nb):
        start = b * block
        stop = min(n, start + block)
        o = out[first + b]
        _hist16(raw, start, stop, hist)
        if hp and hr:
            _pair2(x, p, r, start, stop, o[10:14], o[14:18])
        elif hp:
            _pair(x, p, start, stop, o[10:14])
        elif hr:
            _pair(x, r, start, stop, o[14:18])


@njit(nogil=True, cache=True)
def clamp_count(x, lo, hi, o):  # pragma: no cover - compiled
    """Clamp float32 ``x`` into [lo, hi] in place, in one pass: ``o`` = (elements moved, finite
    min and max before, finite min and max after). NaN stays NaN and is not counted."""
    lo32 = np.float32(lo)
    hi32 = np.float32(hi)
    n = 0
    bmin = np.inf
    bmax = -np.inf
    amin = np.inf
    amax = -np.inf
    for i in range(x.size):
        v = x[i]
        w = v
        if v < lo32:
            w = lo32
            x[i] = w
            n += 1
        elif v > hi32:
            w = hi32
            x[i] = w
            n += 1
        if v - v == 0.0:
            if v < bmin:
                bmin = v
            if v > bmax:
                bmax = v
        if w - w == 0.0:
            if w < amin:
                amin = w
            if w > amax:
                amax = w
    o[0] = n
    o[1] = bmin
    o[2] = bmax
    o[3] = amin
    o[4] = amax
