"""Clip tensors after the fact, in their own dtype, protecting chosen elements.

Bounds are rounded *inward* to values the tensor's dtype can hold (a bf16 tensor
clipped to 0.01 gets 0.00997..., the largest bf16 not above 0.01), so every
output value is inside the bound as written, and every value that was inside
stays bit-identical. NaN stays NaN; +-Inf is clipped to the bound.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from .config import ClipSettings, ClipSpec
from .formats.dtypes import dtype_name, is_float_dtype
from .errors import InputError
from .stats import finite_sorted, percentile

#: (parameter names, buffer names) of a model, in the checkpoint's naming
Kinds = tuple[frozenset[str], frozenset[str]]

CLIP_REPORT_COLUMNS = (
    "checkpoint", "tensor", "kind", "kind_rule", "spec", "lo", "hi", "n_clipped", "frac_clipped", "n_protected",
    "abs_max_before", "abs_max_after",
)


def _analysed(t: torch.Tensor) -> bool:
    """True for the floating dtypes auditclip clips (not sub-byte floats, not integers)."""
    return is_float_dtype(dtype_name(t.dtype)) and t.layout == torch.strided


@dataclass
class ClipOutcome:
    """A clipped tensor and what clipping did to it."""

    tensor: torch.Tensor
    lo: float
    hi: float
    n_clipped: int
    n_protected: int
    #: (abs_max before, after) when measured during the clamp (an in-place clip has no "before" left)
    abs_max: tuple[float, float] | None = None

    def report(self, before: torch.Tensor) -> dict[str, Any]:
        n = before.numel()
        before_max, after_max = self.abs_max if self.abs_max is not None else (_abs_max(before), _abs_max(self.tensor))
        return {
            "lo": self.lo, "hi": self.hi, "n_clipped": self.n_clipped,
            "frac_clipped": self.n_clipped / n if n else 0.0, "n_protected": self.n_protected,
            "abs_max_before": before_max, "abs_max_after": after_max,
        }


def _abs_max(t: torch.Tensor) -> float:
    """Largest finite |x|, in the tensor's own dtype (no float64 copy of a large tensor)."""
    x = t.detach().reshape(-1)
    if not x.numel():
        return math.nan
    x = x if x.dtype.itemsize > 1 else x.to(torch.float32)
    lo, hi = torch.aminmax(x)  # one pass, no |x| temporary
    top = max(-float(lo), float(hi))
    if math.isfinite(top):
        return top
    x = x[torch.isfinite(x)]  # only when a NaN or Inf hides the answer
    return float(x.abs().max()) if x.numel() else math.nan


@lru_cache(maxsize=None)
def _representable(dtype: torch.dtype) -> np.ndarray:
    """Every finite value of an 8-bit float dtype, sorted (torch has no nextafter for them)."""
    raw = torch.arange(256, dtype=torch.uint8).view(dtype).to(torch.float64).numpy()
    return np.unique(raw[np.isfinite(raw)])


def inward(value: float, dtype: torch.dtype, down: bool) -> float:
    """The nearest value of ``dtype`` at or below (``down``) / above ``value``.

    >>> inward(0.01, torch.bfloat16, down=True) <= 0.01 < inward(0.01, torch.bfloat16, down=False)
    True
    """
    if dtype.itemsize == 1:
        table = _representable(dtype)
        i = np.searchsorted(table, value, side="right") - 1 if down else np.searchsorted(table, value, side="left")
        return float(table[min(max(i, 0), table.size - 1)])
    v = torch.tensor(value, dtype=torch.float64).to(dtype)
    if down and float(v) > value:
        v = torch.nextafter(v, torch.tensor(-math.inf, dtype=dtype))
    elif not down and float(v) < value:
        v = torch.nextafter(v, torch.tensor(math.inf, dtype=dtype))
    return float(v)


def bounds(t: torch.Tensor, spec: ClipSpec) -> tuple[float, float]:
    """The [lo, hi] a spec means for this tensor (percentile and sigma look at its values).

    >>> bounds(torch.tensor([-3.0, 1.0]), ClipSpec.parse("max_abs=2"))
    (-2.0, 2.0)
    """
    if spec.kind == "range":
        return float(spec.a), float(spec.b)  # type: ignore[arg-type]
    if spec.kind == "max_abs":
        return -float(spec.a), float(spec.a)  # type: ignore[arg-type]
    values, _, _ = finite_sorted(t)
    if values.size == 0:
        return math.nan, math.nan
    if spec.kind == "percentile":
        p = float(spec.a)  # type: ignore[arg-type]
        return percentile(values, 100.0 - p), percentile(values, p)
    if spec.kind == "sigma":
        x = values.astype(np.float64)
        mean, std = float(x.mean()), float(x.std())
        return mean - float(spec.a) * std, mean + float(spec.a) * std  # type: ignore[arg-type]
    raise InputError(f"cannot clip with spec {spec}")


def parse_protect(text: str) -> tuple[str, tuple[int, ...]]:
    """``"net.0.weight[3, 17]"`` -> ``("net.0.weight", (3, 17))``.

    >>> parse_protect("fc.weight[3, 17]")
    ('fc.weight', (3, 17))
    """
    name, sep, rest = text.rpartition("[")
    try:
        if not sep or not name or not rest.endswith("]"):
            raise ValueError
        index = tuple(int(p) for p in rest[:-1].split(",") if p.strip())
    except ValueError:
        raise InputError(f"--protect {text!r}: expected NAME[i, j], e.g. 'net.0.weight[3, 17]'") from None
    return name, index


def _protected_positions(t: torch.Tensor, name: str, protect: tuple[str, ...], top: int) -> torch.Tensor:
    flat: list[int] = []
    for entry in protect:
        pname, index = parse_protect(entry)
        if pname != name:
            continue
        if len(index) != t.dim() or any(not -d <= i < d for i, d in zip(index, t.shape)):
            raise InputError(f"--protect {entry!r}: index out of range for shape {list(t.shape)}")
        flat.append(int(np.ravel_multi_index(tuple(i % d for i, d in zip(index, t.shape)), t.shape)) if t.dim() else 0)
    positions = torch.tensor(flat, dtype=torch.long)
    if top and t.numel():
        magnitude = t.detach().reshape(-1).to(torch.float32).abs().nan_to_num(nan=-1.0)
        positions = torch.cat([positions, magnitude.topk(min(top, t.numel())).indices])
    return positions.unique()


def clip_tensor_outcome(
    t: torch.Tensor, spec: ClipSpec, *, name: str = "", protect: tuple[str, ...] = (), protect_top: int = 0,
    inplace: bool = False,
) -> ClipOutcome:
    """Clip one tensor and count what changed (see :func:`clip_tensor`).

    ``inplace``: ``t`` is the caller's own buffer (``clip`` streaming a file): float32,
    float16 and bfloat16 are clamped in it, in one pass that also counts and measures,
    with no copy (:func:`_clamp_in_place`); the outcome's tensor is ``t`` itself.
    """
    if not _analysed(t):
        return ClipOutcome(t, math.nan, math.nan, 0, 0)
    lo, hi = bounds(t, spec)
    if math.isnan(lo):  # nothing finite to take percentiles of
        return ClipOutcome(t, lo, hi, 0, 0)
    lo_d, hi_d = inward(lo, t.dtype, down=False), inward(hi, t.dtype, down=True)
    if lo_d > hi_d:
        raise InputError(f"{name or 'tensor'}: no {t.dtype} value lies in [{lo:g}, {hi:g}]")
    if inplace and t.dtype in _IN_PLACE and t.is_contiguous() and t.device.type == "cpu" and not t.requires_grad:
        positions = _protected_positions(t, name, protect, protect_top)
        flat = t.reshape(-1)
        kept = flat[positions].clone() if positions.numel() else None  # the originals a protection puts back
        n_out, before, after = _clamp_in_place(flat, lo_d, hi_d)
        n_protected = 0
        if kept is not None:
            n_protected = int(torch.count_nonzero((kept < lo_d) | (kept > hi_d)))
            flat[positions] = kept
            after = _abs_max(t)
        return ClipOutcome(t, lo_d, hi_d, n_out - n_protected, n_protected, abs_max=(before, after))
    wide = t.dtype.itemsize == 1  # torch cannot clamp fp8: clamp exactly in float32 and come back
    work = t.to(torch.float32) if wide else t
    outside = (work < lo_d) | (work > hi_d)
    clipped = work.clamp(lo_d, hi_d)
    clipped = clipped.to(t.dtype) if wide else clipped
    n_protected = 0
    positions = _protected_positions(t, name, protect, protect_top)
    if positions.numel():
        flat_out, flat_in = clipped.reshape(-1), t.reshape(-1)
        if wide:  # torch cannot index fp8 tensors: move their bytes instead
            flat_out, flat_in = flat_out.view(torch.uint8), flat_in.view(torch.uint8)
        n_protected = int(torch.count_nonzero(outside.reshape(-1)[positions]))
        flat_out[positions] = flat_in[positions]
        flat_out = flat_out.view(t.dtype) if wide else flat_out
        clipped = flat_out.reshape(t.shape)
    return ClipOutcome(clipped, lo_d, hi_d, int(torch.count_nonzero(outside)) - n_protected, n_protected)


_IN_PLACE = (torch.float32, torch.float16, torch.bfloat16)
_CLAMP_CHUNK = 1 << 18  # 16-bit data is widened, clamped and narrowed back this many elements at a time


def _clamp_in_place(flat: torch.Tensor, lo: float, hi: float) -> tuple[int, float, float]:
    """Clamp a contiguous 1-D CPU tensor into [lo, hi] in place (lo/hi representable in its dtype).

    Returns (elements moved, largest finite |x| before, after). With numba, one pass per
    element (float32 in place; 16-bit widened a chunk at a time into a cached buffer,
    clamped, narrowed back exactly: the bounds and every other value are representable);
    without it, torch's comparisons and ``clamp_``. NaN is left alone and not counted.
    """
    from .fused import numba_kernels, widen

    clamp = numba_kernels("clamp_count")
    if not flat.numel():
        return 0, math.nan, math.nan
    if clamp is None:
        before = _abs_max(flat)
        moved = int(torch.count_nonzero(flat < lo)) + int(torch.count_nonzero(flat > hi))
        flat.clamp_(lo, hi)
        return moved, before, _abs_max(flat)
    o = np.zeros(5)
    moved, lows, highs = 0, [], []
    step = flat.numel() if flat.dtype == torch.float32 else _CLAMP_CHUNK
    scratch = None if flat.dtype == torch.float32 else np.empty(min(step, flat.numel()), dtype=np.float32)
    for start in range(0, flat.numel(), step):
        part = flat[start:start + step]
        x = widen(part, scratch).numpy()
        clamp(x, lo, hi, o)
        moved += int(o[0])
        lows.append(o[1:3].copy())
        highs.append(o[3:5].copy())
        if part.dtype != torch.float32 and o[0]:  # narrow back: exact, every value is representable
            raw = part.view(torch.int16).numpy()
            if part.dtype == torch.bfloat16:
                np.copyto(raw.view(np.uint16), x.view(np.uint32) >> 16, casting="unsafe")
            else:
                np.copyto(raw.view(np.float16), x, casting="same_kind")

    def top(pairs: list[np.ndarray]) -> float:
        lo_, hi_ = min(p[0] for p in pairs), max(p[1] for p in pairs)
        return max(-lo_, hi_) if lo_ <= hi_ else math.nan  # no finite value: NaN, as _abs_max says

    return moved, top(lows), top(highs)


def clip_tensor(t: torch.Tensor, spec: ClipSpec | str, **protection: Any) -> torch.Tensor:
    """A clipped copy of ``t``, same dtype and shape; values inside the bound unchanged.

    ``spec``: a :class:`ClipSpec` or its text (``max_abs=0.01``, ``range=-1:1``,
    ``percentile=99.9``, ``sigma=4``). ``protect_top=K`` keeps the K largest
    magnitudes, ``protect=("name[i, j]",)`` with ``name=`` keeps given elements.

    >>> clip_tensor(torch.tensor([0.5, -0.002, 0.03]), "max_abs=0.01").tolist()
    [0.009999999776482582, -0.0020000000949949026, 0.009999999776482582]
    """
    spec = spec if isinstance(spec, ClipSpec) else ClipSpec.parse(spec)
    return clip_tensor_outcome(t, spec, **protection).tensor


def clip_state_dict(
    state: dict[str, torch.Tensor], specs: ClipSettings | ClipSpec | str, kinds: Kinds | None = None,
    adapter: Mapping[str, tuple[str, str]] | None = None,
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Clip every selected floating tensor of a state dict; others are returned as they are.

    Returns the new state dict and one report row per clipped tensor
    (the ``clip_report.csv`` columns without ``checkpoint``). ``kinds``: the model's
    (parameter names, buffer names), which then decide what a buffer is (else the names do);
    ``adapter``: a PEFT adapter folder's kinds by name, as :func:`clip_selected` takes them.

    >>> sd, report = clip_state_dict({"w": torch.tensor([2.0, 0.0])}, "max_abs=1")
    >>> sd["w"].tolist(), report[0]["n_clipped"]
    ([1.0, 0.0], 1)
    """
    from .selection import name_filter

    settings = specs if isinstance(specs, ClipSettings) else ClipSettings(
        spec=specs if isinstance(specs, ClipSpec) else ClipSpec.parse(specs))
    keep = name_filter(settings.include, settings.exclude)
    out: dict[str, torch.Tensor] = {}
    report: list[dict[str, Any]] = []
    for name, t in state.items():
        out[name], row = clip_selected(name, t, settings, keep, kinds, siblings=state.keys(), adapter=adapter)
        if row is not None:
            report.append(row)
    return out, report


def clip_selected(name: str, t: Any, settings: ClipSettings, keep: Any = None, kinds: Kinds | None = None,
                  siblings: Collection[str] | None = None, adapter: Mapping[str, tuple[str, str]] | None = None,
                  inplace: bool = False) -> tuple[Any, dict[str, Any] | None]:
    """Clip one named tensor as the settings select it: (the result, its report row or None).

    The one place that decides what clipping touches, for ``clip`` and for the clipped
    variants of ``evaluate``/``sweep``/``audit`` alike: floating tensors selected by
    ``include``/``exclude`` with a spec, and parameters only unless ``settings.buffers``.
    A buffer left alone still gets a row saying so and which rule called it a buffer.
    With ``kinds`` (the model's parameter and buffer names) the model decides, so a
    custom ``register_buffer("scale", ...)`` is a buffer although its name says nothing.
    ``adapter``: a PEFT adapter folder's kinds by name (its config decides, kinds.tensor_kind).
    ``inplace``: ``t`` is the caller's own buffer and may be clamped in it (:func:`clip_tensor_outcome`).

    >>> s = ClipSettings(ClipSpec.parse("max_abs=1"))
    >>> clip_selected("bn.running_var", torch.tensor([5.0]), s)[1]["spec"]
    'none (buffer; --buffers clips it)'
    >>> clip_selected("bn.weight", torch.tensor([5.0]), s)[0].tolist()
    [1.0]
    >>> clip_selected("scale", torch.tensor([5.0]), s, kinds=(frozenset(), frozenset({"scale"})))[1]["kind_rule"]
    'model: named_buffers()'
    """
    from .kinds import tensor_kind
    from .selection import name_filter

    keep = keep or name_filter(settings.include, settings.exclude)
    spec = settings.spec_for(name) if keep(name) else None
    if spec is None or not isinstance(t, torch.Tensor) or not _analysed(t):
        return t, None
    kind, rule = tensor_kind(name, *(kinds or (None, None)), siblings=siblings, adapter=adapter)
    if kind == "buffer" and not settings.buffers:
        n = t.numel()
        return t, {"tensor": name, "kind": kind, "kind_rule": rule, "spec": "none (buffer; --buffers clips it)",
                   "lo": math.nan, "hi": math.nan, "n_clipped": 0, "frac_clipped": 0.0, "n_protected": 0,
                   "abs_max_before": _abs_max(t) if n else math.nan, "abs_max_after": _abs_max(t) if n else math.nan}
    outcome = clip_tensor_outcome(t, spec, name=name, protect=settings.protect, protect_top=settings.protect_top,
                                  inplace=inplace)
    return outcome.tensor, {"tensor": name, "kind": kind, "kind_rule": rule, "spec": str(spec), **outcome.report(t)}
