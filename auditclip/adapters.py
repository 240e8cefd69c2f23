"""The effective update of a LoRA adapter, ΔW = scaling · B @ A: statistics, drift, clipping.

A LoRA adapter stores two thin factors per adapted module, ``A`` (``[r, in]``) and
``B`` (``[out, r]``); what the model sees is the update ``ΔW = scaling · B @ A``
(``[out, in]``, transposed for ``fan_in_fan_out`` layers and embeddings, which no
statistic here depends on). Auditing A and B alone says little: A is random at
initialisation and B starts at zero, and either can be rescaled against the other
without changing ΔW. This module measures ΔW itself, from the factors:

* :func:`delta_stats`: ``l2_norm`` (Frobenius), ``spectral_norm``, ``stable_rank`` and
  ``rank`` from the r x r core ``R_B R_A^T`` (QR of ``B`` and ``A^T``: ΔW is never
  built whole), and the element statistics (``mean``, ``std``, ``min``, ``max``,
  ``abs_max``...) from ΔW built a block of rows at a time (at most :data:`BLOCK`
  float64 elements in memory);
* :func:`delta_drift`: how ΔW moved between two saves (``rel_l2_change``, ``cosine``,
  ``max_abs_change``), from the stacked factors ``[s1 B1, -s2 B2] @ [A1; A2]``
  (a rank r1 + r2 factorisation of ΔW2 - ΔW1, so no cancellation of large norms);
* :func:`clip_adapter_delta`: clip ΔW element-wise, then refactor the clipped update
  into rank-r factors by truncated SVD. The clipped update generally has rank above
  r, so the refactored ``scaling · B' @ A'`` is its best rank-r approximation, not the
  clipped update itself: the relative residual is reported so the cost is visible.
  Its elements exceed the bound by at most the residual's absolute norm.
* :func:`clip_adapter_folder`: a whole adapter folder (``adapter_config.json`` copied
  byte for byte, the weights file with the same keys and dtypes), with either ΔW
  clipped (``mode="delta"``) or A and B clipped as ordinary tensors (``mode="factors"``).

Where a folder's tensors are and what each means (pairs, scaling, rank_pattern...)
is :mod:`auditclip.formats.peft`'s business.

>>> A, B = torch.tensor([[1.0, 0.0, 2.0]]), torch.tensor([[1.0], [-3.0]])
>>> s = delta_stats(A, B, scaling=2.0)
>>> s["abs_max"], round(s["l2_norm"], 6), s["rank"]
(12.0, 14.142136, 1)
"""

from __future__ import annotations

import contextlib
import math
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from ._version import __version__
from .clipping import bounds, clip_tensor_outcome
from .config import ClipSettings, ClipSpec
from .distances import DRIFT_METRICS, ratio
from .formats.dtypes import dtype_name
from .errors import InputError
from .formats.peft import ADAPTER_CONFIG, AdapterIndex, LoraModule, adapter_weights_file, read_adapter_index
from .notices import note
from .output import atomic_path
from .formats.readers import open_checkpoint_file
from .formats.writers import save_torch, sha256_file, write_safetensors

#: Elements of ΔW built at once (a block of rows, float64): bounds the extra memory to 32 MiB.
BLOCK = 1 << 22

#: Largest min(out, in) for which the clipped update is refactored by a full SVD; above it,
#: randomized subspace iteration (``torch.svd_lowrank``) finds the top-r subspace. The
#: reported residual is computed from the factors written either way.
EXACT_SVD_MAX = 1024

#: Largest update (elements) clipped and refactored in float64; above it, float32 (half the memory).
EXACT_WORK_MAX = 1 << 24

DELTA_STAT_COLUMNS: tuple[str, ...] = (
    "mean", "std", "min", "max", "abs_max", "l2_norm", "rms", "frac_zero", "n_nan", "n_inf",
    "spectral_norm", "stable_rank", "rank",
)

DELTA_CLIP_COLUMNS: tuple[str, ...] = (
    "tensor", "module", "mode", "spec", "lo", "hi", "n_clipped", "frac_clipped", "abs_max_before",
    "abs_max_after", "rank", "residual", "residual_abs",
)


def as_matrices(A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors as float64 matrices ``A [r, in]`` and ``B [out, r]``.

    Convolution adapters store ``A`` as ``[r, in, *kernel]`` and ``B`` as ``[out, r, 1...]``;
    their update is ``B @ A.reshape(r, -1)`` laid out as the base kernel.

    >>> a, b = as_matrices(torch.ones(2, 3, 1, 1), torch.ones(4, 2, 1, 1))
    >>> tuple(a.shape), tuple(b.shape), a.dtype
    ((2, 3), (4, 2), torch.float64)
    """
    if A.dim() < 2 or B.dim() < 2:
        raise ValueError(f"LoRA factors must have 2 or more dimensions, got A {list(A.shape)}, B {list(B.shape)}")
    if any(d != 1 for d in B.shape[2:]):
        raise ValueError(f"lora_B of shape {list(B.shape)}: only 1x1 kernels beyond [out, r] are a plain product")
    if B.shape[1] != A.shape[0]:
        raise ValueError(f"lora_B {list(B.shape)} does not multiply lora_A {list(A.shape)}")
    return (A.detach().reshape(A.shape[0], -1).to(torch.float64),
            B.detach().reshape(B.shape[0], B.shape[1]).to(torch.float64))


def materialise_delta(A: torch.Tensor, B: torch.Tensor, scaling: float) -> torch.Tensor:
    """ΔW = scaling · B @ A as one float64 ``[out, in]`` matrix (the size of the base weight).

    For callers that need every value (percentiles, ``stats.describe``); the statistics
    here never build it whole.

    >>> materialise_delta(torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0]]), 0.5).tolist()
    [[1.5, 3.0]]
    """
    a, b = as_matrices(A, B)
    return (b @ a) * scaling


def _row_blocks(a: torch.Tensor, b: torch.Tensor, scaling: float):  # noqa: ANN202 - a generator of blocks
    """ΔW, a block of rows at a time (at most BLOCK elements each)."""
    rows = max(1, BLOCK // max(1, a.shape[1]))
    for start in range(0, b.shape[0], rows):
        yield (b[start:start + rows] @ a) * scaling


def _core(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A small matrix with the singular values of ``b @ a``: ``R_B R_A^T`` from QR of ``b`` and ``a^T``."""
    if a.numel() == 0 or b.numel() == 0:
        return torch.zeros(0, 0, dtype=torch.float64)
    r_b = torch.linalg.qr(b, mode="r").R
    r_a = torch.linalg.qr(a.T, mode="r").R
    return r_b @ r_a.T


def _finite(*ts: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in ts)


def delta_stats(A: torch.Tensor, B: torch.Tensor, scaling: float) -> dict[str, float]:
    """Statistics of ΔW = scaling · B @ A (see :data:`DELTA_STAT_COLUMNS`), computed in float64.

    ``l2_norm``, ``spectral_norm``, ``stable_rank`` (||ΔW||_F² / ||ΔW||_2²) and ``rank``
    (singular values above ``max(out, in) · eps`` of the factors' dtype, relative to the
    largest) come from the r x r core; ``mean``, ``std`` (population), ``min``, ``max``,
    ``abs_max``, ``frac_zero`` and the NaN/Inf counts from ΔW built a block of rows at a
    time. Non-finite factors give NaN norms and count the non-finite elements of ΔW.

    >>> A = torch.tensor([[1.0, 0.0], [0.0, 1.0]]); B = torch.tensor([[3.0, 0.0], [0.0, 4.0]])
    >>> s = delta_stats(A, B, scaling=0.5)
    >>> s["spectral_norm"], s["l2_norm"], s["stable_rank"], s["max"], s["mean"]
    (2.0, 2.5, 1.5625, 2.0, 0.875)
    """
    a, b = as_matrices(A, B)
    n = b.shape[0] * a.shape[1]
    out = dict.fromkeys(DELTA_STAT_COLUMNS, math.nan)
    # Chan et al.'s pairwise merge of (count, mean, M2): exact std without a second pass
    count, mean, m2 = 0, 0.0, 0.0
    lo, hi, zeros, n_nan, n_inf = math.inf, -math.inf, 0, 0, 0
    for block in _row_blocks(a, b, scaling):
        nan, inf = torch.isnan(block), torch.isinf(block)
        n_nan, n_inf = n_nan + int(nan.sum()), n_inf + int(inf.sum())
        x = block[~(nan | inf)]
        if not x.numel():
            continue
        zeros += int((x == 0).sum())
        lo, hi = min(lo, float(x.min())), max(hi, float(x.max()))
        k, bm = x.numel(), float(x.mean())
        bm2 = float(((x - bm) ** 2).sum())
        total = count + k
        d = bm - mean
        mean += d * k / total
        m2 += bm2 + d * d * count * k / total
        count = total
    out.update(n_nan=float(n_nan), n_inf=float(n_inf))
    if count:
        out.update(mean=mean, std=math.sqrt(max(m2, 0.0) / count), min=lo, max=hi, abs_max=max(-lo, hi),
                   frac_zero=zeros / count)
    if n and _finite(a, b) and math.isfinite(scaling):
        sv = torch.linalg.svdvals(_core(a, b) * scaling)
        top = float(sv[0]) if sv.numel() else 0.0
        fro = float(torch.linalg.vector_norm(sv))
        eps = torch.finfo(A.dtype if A.dtype.is_floating_point else torch.float32).eps
        out.update(l2_norm=fro, rms=fro / math.sqrt(n), spectral_norm=top,
                   stable_rank=ratio(fro * fro, top * top) if top else 0.0,
                   rank=float(int((sv > top * max(b.shape[0], a.shape[1]) * eps).sum())) if top else 0.0)
    if not math.isnan(out["rank"]):
        out["rank"] = int(out["rank"])
    return out


def delta_drift(prev: tuple[torch.Tensor, torch.Tensor, float],
                cur: tuple[torch.Tensor, torch.Tensor, float]) -> dict[str, float]:
    """How ΔW moved from ``prev`` to ``cur``, each ``(A, B, scaling)``; ranks may differ.

    Returns ``rel_l2_change`` (||ΔW2 - ΔW1||_F / ||ΔW1||_F, 0/0 -> 0), ``cosine`` (NaN when
    either is zero), ``max_abs_change`` and the float64 sums ``delta_sq``, ``base_sq``,
    ``cur_sq``, ``dot`` that :func:`auditclip.distances.elementwise` gives for the
    materialised matrices (to add into a checkpoint-wide total). Norms come from the
    stacked factors ``[s2 B2, -s1 B1] @ [A2; A1]``; ``max_abs_change`` from its rows in
    blocks. Different ΔW shapes give NaN everywhere.

    >>> A = torch.tensor([[1.0, 0.0]]); B = torch.tensor([[2.0]])
    >>> d = delta_drift((A, B, 1.0), (A, B, 1.5))
    >>> d["rel_l2_change"], d["cosine"], d["max_abs_change"]
    (0.5, 1.0, 1.0)
    >>> same = delta_drift((A, B, 1.5), (A.clone(), B.clone(), 1.5))
    >>> same["rel_l2_change"], same["cosine"], same["max_abs_change"]
    (0.0, 1.0, 0.0)
    """
    (a1, b1), s1 = as_matrices(*prev[:2]), float(prev[2])
    (a2, b2), s2 = as_matrices(*cur[:2]), float(cur[2])
    keys = ("rel_l2_change", "cosine", "max_abs_change", "delta_sq", "base_sq", "cur_sq", "dot")
    out = dict.fromkeys(keys, math.nan)
    if (b1.shape[0], a1.shape[1]) != (b2.shape[0], a2.shape[1]):
        return out
    same = s1 == s2 and torch.equal(a1, a2) and torch.equal(b1, b2) and _finite(a1, b1)
    b_diff = torch.cat([b2 * s2, -b1 * s1], dim=1)
    a_diff = torch.cat([a2, a1], dim=0)
    top = 0.0
    for block in () if same else _row_blocks(a_diff, b_diff, 1.0):
        block_max = float(block.abs().max()) if block.numel() else 0.0
        top = math.nan if math.isnan(block_max) or math.isnan(top) else max(top, block_max)
    out["max_abs_change"] = top if b1.shape[0] * a1.shape[1] else math.nan
    if not (_finite(a1, b1, a2, b2) and math.isfinite(s1) and math.isfinite(s2)):
        return out

    def sq(a: torch.Tensor, b: torch.Tensor) -> float:
        return float(torch.linalg.matrix_norm(_core(a, b))) ** 2 if a.numel() and b.numel() else 0.0

    out["base_sq"] = sq(a1, b1) * s1 * s1
    if same:  # the same update: exactly no change (the stacked factors would give ~1e-16, not 0)
        out.update(delta_sq=0.0, cur_sq=out["base_sq"], dot=out["base_sq"])
    else:
        out["delta_sq"] = sq(a_diff, b_diff)
        out["cur_sq"] = sq(a2, b2) * s2 * s2
        # <ΔW2, ΔW1> = s1 s2 tr(A2^T B2^T B1 A1) = s1 s2 Σ (B2^T B1) ∘ (A2 A1^T)
        out["dot"] = float(((b2.T @ b1) * (a2 @ a1.T)).sum()) * s1 * s2
    out["rel_l2_change"] = ratio(math.sqrt(out["delta_sq"]), math.sqrt(out["base_sq"]))
    den = math.sqrt(out["cur_sq"] * out["base_sq"])
    out["cosine"] = out["dot"] / den if den > 0 else math.nan
    return out


@dataclass
class DeltaClip:
    """What :func:`clip_adapter_delta` did to one module's update.

    ``A``/``B``: the new factors, in the dtypes and shapes of the old ones (the old tensors
    themselves when nothing was outside the bound). ``residual``: ||ΔWc - s·B'A'||_F /
    ||ΔWc||_F with ΔWc the clipped update and B', A' as stored (after rounding to their
    dtype); ``residual_abs`` the same norm unscaled, a bound on how far any element of the
    refactored update lies outside [lo, hi]. ``abs_max_after`` is max |s·B'A'|.
    """

    A: torch.Tensor
    B: torch.Tensor
    lo: float
    hi: float
    n_clipped: int
    numel: int
    abs_max_before: float
    abs_max_after: float
    rank: int
    residual: float
    residual_abs: float

    def report(self) -> dict[str, Any]:
        """The clip-report fields of this module (see :data:`DELTA_CLIP_COLUMNS`)."""
        return {"lo": self.lo, "hi": self.hi, "n_clipped": self.n_clipped,
                "frac_clipped": self.n_clipped / self.numel if self.numel else 0.0,
                "abs_max_before": self.abs_max_before, "abs_max_after": self.abs_max_after, "rank": self.rank,
                "residual": self.residual, "residual_abs": self.residual_abs}


def _abs_max(t: torch.Tensor) -> float:
    return float(t.abs().max()) if t.numel() else math.nan


def _top_subspace(m: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The r largest singular triplets of ``m`` (exact SVD when small, randomized otherwise),
    and every singular value found (all of them when exact, the r + 10 largest otherwise)."""
    if min(m.shape) <= EXACT_SVD_MAX:
        u, s, vh = torch.linalg.svd(m, full_matrices=False)
        return u[:, :r], s[:r], vh[:r], s
    with torch.random.fork_rng(devices=[]):  # a fixed start, and the caller's generator untouched
        torch.manual_seed(0)
        u, s, v = torch.svd_lowrank(m, q=min(r + 10, min(m.shape)), niter=6)
    return u[:, :r], s[:r], v[:, :r].T, s


def clip_adapter_delta(A: torch.Tensor, B: torch.Tensor, scaling: float, spec: ClipSpec | str) -> DeltaClip:
    """Clip ΔW = scaling · B @ A element-wise to ``spec``, then refactor it into rank-r A', B'.

    ``spec`` is a clip spec as ``clip`` takes it (``max_abs=0.01``, ``range=-1:1``; a
    ``percentile``/``sigma`` spec is taken over ΔW's values). When no element lies outside the bound, A and B are
    returned unchanged. Otherwise the clipped update ΔWc, of rank generally above r, is
    replaced by its best rank-r approximation (truncated SVD ``U S V^T``, split evenly:
    ``B' = U sqrt(S/|s|) sign(s)``, ``A' = sqrt(S/|s|) V^T``), and the residual is reported.

    >>> A = torch.tensor([[1.0, 1.0]]); B = torch.tensor([[1.0], [4.0]])
    >>> c = clip_adapter_delta(A, B, 1.0, "max_abs=2")
    >>> c.n_clipped, round(c.abs_max_after, 4), round(c.residual, 4)
    (2, 2.0, 0.0)
    >>> (c.B @ c.A).tolist()
    [[1.0, 1.0], [2.0, 2.0]]
    """
    spec = spec if isinstance(spec, ClipSpec) else ClipSpec.parse(spec)
    if not math.isfinite(scaling) or scaling == 0:
        raise InputError(f"cannot refactor a clipped LoRA update with scaling {scaling}")
    a, b = as_matrices(A, B)
    r = a.shape[0]
    if not _finite(a, b):
        raise InputError("the LoRA factors hold NaN or Inf, so their update cannot be clipped and refactored; "
                         "clip the factors instead")
    work = torch.float64 if b.shape[0] * a.shape[1] <= EXACT_WORK_MAX else torch.float32
    delta = torch.empty(b.shape[0], a.shape[1], dtype=work)
    start = 0
    for block in _row_blocks(a, b, scaling):  # no float64 copy of the whole update
        delta[start:start + block.shape[0]] = block
        start += block.shape[0]
    numel = delta.numel()
    before = _abs_max(delta)
    if spec.kind == "none":
        return DeltaClip(A, B, math.nan, math.nan, 0, numel, before, before, r, 0.0, 0.0)
    lo, hi = bounds(delta, spec)
    if math.isnan(lo) or lo > hi:
        raise InputError(f"no bound for the LoRA update: {spec} gives [{lo:g}, {hi:g}]")
    outside = int(((delta < lo) | (delta > hi)).sum())
    if not outside:
        return DeltaClip(A, B, lo, hi, 0, numel, before, before, r, 0.0, 0.0)
    clipped = delta.clamp_(lo, hi)
    u, s, vh, found = _top_subspace(clipped, r)
    root = torch.sqrt(s / abs(scaling))
    b_new = (u * root) * math.copysign(1.0, scaling)
    a_new = root[:, None] * vh
    if s.numel() < r:  # ΔW smaller than the rank: pad with zero directions to keep the shapes
        b_new = torch.cat([b_new, b_new.new_zeros(b_new.shape[0], r - s.numel())], dim=1)
        a_new = torch.cat([a_new, a_new.new_zeros(r - s.numel(), a_new.shape[1])], dim=0)
    a_out = a_new.reshape(A.shape).to(A.dtype)
    b_out = b_new.reshape(B.shape).to(B.dtype)
    a_st, b_st = as_matrices(a_out, b_out)
    res_sq, total_sq, after, start = 0.0, 0.0, 0.0, 0
    for block in _row_blocks(a_st, b_st, scaling):  # the stored factors' update, against the clipped one
        target = clipped[start:start + block.shape[0]].to(torch.float64)
        start += block.shape[0]
        res_sq += float(((target - block) ** 2).sum())
        total_sq += float((target ** 2).sum())
        after = max(after, float(block.abs().max()))
    res = math.sqrt(res_sq)
    rank = int((found > found[0] * max(clipped.shape) * torch.finfo(torch.float32).eps).sum()) if found.numel() else 0
    return DeltaClip(a_out, b_out, lo, hi, outside, numel, before, after, rank, ratio(res, math.sqrt(total_sq)), res)


@dataclass
class AdapterClipResult:
    """What :func:`clip_adapter_folder` did: one report row per clipped tensor or module, files written."""

    report: pd.DataFrame
    written: list[Path] = field(default_factory=list)
    index: AdapterIndex | None = None


MODES = ("delta", "factors")


def clip_adapter_folder(src: str | Path, dst: str | Path, spec: ClipSpec | str, *, mode: str = "delta",
                        others: ClipSpec | str | None = None) -> AdapterClipResult:
    """Write a clipped copy of the PEFT LoRA adapter folder ``src`` into the folder ``dst``.

    ``mode="delta"``: each module's update ΔW is clipped to ``spec`` and refactored
    (:func:`clip_adapter_delta`); ``mode="factors"``: ``lora_A`` and ``lora_B`` are clipped
    as ordinary tensors, in their own dtype (what ``clip`` does to any weight; the bound
    then says nothing about ΔW). Other tensors (``modules_to_save`` copies, DoRA
    magnitudes, ``lora_B`` biases) are clipped with ``others`` when given, else copied as
    they are. ``adapter_config.json`` is copied byte for byte; the weights file keeps its
    name, keys, dtypes and shapes; both are written atomically. ``dst`` must not be ``src``.
    A DoRA adapter or a LoRA variant whose update is not ``scaling · B @ A`` is refused in
    delta mode (:class:`InputError`), as is a module whose update could not be read off its
    factors.

    >>> import json, tempfile
    >>> from safetensors.torch import save_file
    >>> src = Path(tempfile.mkdtemp())
    >>> _ = (src / "adapter_config.json").write_text(json.dumps(
    ...     {"peft_type": "LORA", "r": 1, "lora_alpha": 2, "target_modules": ["fc"]}))
    >>> save_file({"base_model.model.fc.lora_A.weight": torch.tensor([[1.0, 1.0]]),
    ...            "base_model.model.fc.lora_B.weight": torch.tensor([[1.0], [4.0]])},
    ...           str(src / "adapter_model.safetensors"))
    >>> res = clip_adapter_folder(src, src.parent / (src.name + "_clipped"), "max_abs=4")
    >>> row = res.report.iloc[0]
    >>> row["tensor"], int(row["n_clipped"]), float(row["abs_max_before"]), round(float(row["residual"]), 6)
    ('base_model.model.fc.delta_weight', 2, 8.0, 0.0)
    """
    if mode not in MODES:
        raise InputError(f"adapter clip mode {mode!r}: use one of {', '.join(MODES)}")
    spec = spec if isinstance(spec, ClipSpec) else ClipSpec.parse(spec)
    other_spec = None if others is None else others if isinstance(others, ClipSpec) else ClipSpec.parse(others)
    src, dst = Path(src), Path(dst)
    index = read_adapter_index(src)
    if dst.exists() and dst.resolve() == src.resolve():
        raise InputError(f"{dst}: the clipped adapter must go to another folder than its source")
    if mode == "delta":
        for m in index.modules:
            if m.problem:
                raise InputError(f"{src}: cannot clip the update of {m.module}: {m.problem}")
            if m.variant:
                raise InputError(f"{src}: cannot clip the update of {m.module} ({m.variant}): its merged update is "
                                 "not scaling · B @ A; clip the factors instead (mode 'factors')")
    try:
        dst.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create {dst}: {exc.strerror or exc}") from exc
    label = f"adapter {mode}: {spec}" + (f"; others: {other_spec}" if other_spec else "")
    rows: list[dict[str, Any]] = []
    factor_of = {n: m for m in index.modules for n in (m.a_name, m.b_name) if n is not None}
    kinds = index.kinds()
    pending: dict[str, dict[str, torch.Tensor]] = {}  # module -> factors clipped but not yet written

    with open_checkpoint_file(index.weights) as reader:

        def output(name: str) -> torch.Tensor | bytes:
            """The tensor written under ``name``: clipped when it must be, else as stored."""
            info = reader.info(name)
            m = factor_of.get(name)
            if m is not None and mode == "delta":
                if m.module not in pending:  # one module in flight at a time: writers go in name order
                    out = clip_adapter_delta(reader.get(m.a_name), reader.get(m.b_name), m.scaling, spec)
                    rows.append({"tensor": m.delta_name, "module": m.module, "mode": mode, "spec": str(spec),
                                 **out.report()})
                    pending[m.module] = {m.a_name: out.A, m.b_name: out.B}
                t = pending[m.module].pop(name)
                if not pending[m.module]:
                    del pending[m.module]
                return t
            chosen = spec if (m is not None and mode == "factors") else other_spec if m is None else None
            if m is None and kinds.get(name, ("",))[0] == "buffer":
                chosen = None  # a buffer a modules_to_save copy holds: left alone, as clip leaves buffers
            if chosen is None or not info.is_float:
                return reader.get(name) if info.is_float else reader.raw_bytes(name)
            t = reader.get(name)
            outcome = clip_tensor_outcome(t, chosen, name=name)
            rows.append({"tensor": name, "module": index.module_of(name), "mode": mode if m else "tensor",
                         "spec": str(chosen), **{k: v for k, v in outcome.report(t).items() if k != "n_protected"},
                         "rank": math.nan, "residual": math.nan, "residual_abs": math.nan})
            return outcome.tensor if outcome.n_clipped else t

        meta = {"auditclip_source_sha256": sha256_file(index.weights), "auditclip_spec": label,
                "auditclip_version": __version__}
        target = dst / index.weights.name
        # the weights first, the config last: a half-written output is never an adapter folder
        if index.weights.name.endswith(".safetensors"):
            entries = [(reader.raw_name(n), reader.info(n).dtype, reader.info(n).shape) for n in reader.names()]
            clean_of = {reader.raw_name(n): n for n in reader.names()}
            written = [write_safetensors(target, entries, lambda raw: output(clean_of[raw]),
                                         {**reader.metadata, **meta})]
        else:
            state = {}
            for n in reader.names():
                t = output(n)
                state[reader.raw_name(n)] = t.contiguous() if isinstance(t, torch.Tensor) else reader.get(n)
            written = [save_torch(state, target)]
    written.append(_copy_bytes(index.config_path, dst / ADAPTER_CONFIG))
    if mode == "delta" and any(r["residual"] > 0 for r in rows if r["mode"] == "delta"):
        worst = max(r["residual"] for r in rows if r["mode"] == "delta")
        note(f"clip: a clipped LoRA update has rank above r; it was refactored to rank r by truncated SVD "
             f"(largest relative residual {worst:.3g}; each module's is in the clip report)")
    report = pd.DataFrame(sorted(rows, key=lambda row: row["tensor"])).reindex(columns=[*DELTA_CLIP_COLUMNS])
    return AdapterClipResult(report, written, index)


def clip_adapter_checkpoint(folder: str | Path, dst: str | Path, settings: ClipSettings, *, label: str = "",
                            dry_run: bool = False) -> pd.DataFrame:
    """``clip --adapter-mode delta`` of one adapter folder: the ``clip_report.csv`` rows.

    Each LoRA module's update ΔW is clipped to ``settings.spec`` and refactored into rank-r
    factors (:func:`clip_adapter_folder`, ``mode="delta"``); other stored tensors
    (``modules_to_save`` copies, ``lora_B`` biases) are clipped to the same spec as
    ordinary tensors, buffers left alone. ``dst``: the output weights file; its folder
    receives the weights and ``adapter_config.json``. One spec for every update: per-pattern
    overrides, ``--include``/``--exclude`` and ``--protect`` are refused (:class:`InputError`),
    since an update is no stored tensor they could name element by element. A ΔW row's
    ``spec`` gives the relative residual of the refactoring (``on ΔW, residual 0.012``).

    >>> import json, tempfile
    >>> from safetensors.torch import save_file
    >>> src = Path(tempfile.mkdtemp())
    >>> _ = (src / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 1, "lora_alpha": 2}))
    >>> save_file({"base_model.model.fc.lora_A.weight": torch.tensor([[1.0, 1.0]]),
    ...            "base_model.model.fc.lora_B.weight": torch.tensor([[1.0], [4.0]])},
    ...           str(src / "adapter_model.safetensors"))
    >>> out = Path(tempfile.mkdtemp()) / "adapter_model.safetensors"
    >>> row = clip_adapter_checkpoint(src, out, ClipSettings(ClipSpec.parse("max_abs=4"))).iloc[0]
    >>> row["kind"], row["spec"].split(",")[0], int(row["n_clipped"]), round(float(row["abs_max_after"]), 6)
    ('adapter_delta', 'max_abs=4 on ΔW', 2, 4.0)
    """
    from .clipping import CLIP_REPORT_COLUMNS

    if settings.spec is None or settings.overrides or settings.include or settings.exclude or settings.protect \
            or settings.protect_top:
        raise InputError("--adapter-mode delta clips every LoRA module's update ΔW to one spec (--max-abs, --range, "
                         "--percentile or --sigma); per-pattern overrides, --include/--exclude and --protect name "
                         "stored tensors, which ΔW is not: use --adapter-mode factors with them")
    dst = Path(dst)
    weights = adapter_weights_file(folder)
    if weights is not None and dst.name != weights.name:
        raise InputError(f"--adapter-mode delta writes the adapter as peft saved it ({weights.name}); "
                         f"it cannot write {dst.name} (leave out --to)")
    with contextlib.ExitStack() as stack:
        target = Path(stack.enter_context(tempfile.TemporaryDirectory())) if dry_run else dst.parent
        result = clip_adapter_folder(folder, target, settings.spec, mode="delta",
                                     others=None if settings.spec.kind == "none" else settings.spec)
    kinds = result.index.kinds() if result.index is not None else {}
    rows = []
    for r in result.report.to_dict("records"):
        kind, rule = kinds.get(r["tensor"], ("adapter", ADAPTER_CONFIG))
        spec = f"{r['spec']} on ΔW, residual {r['residual']:.3g}" if r["mode"] == "delta" else r["spec"]
        rows.append({**r, "checkpoint": label, "kind": kind, "kind_rule": rule, "spec": spec, "n_protected": 0})
    return pd.DataFrame(rows, columns=list(CLIP_REPORT_COLUMNS))


def _copy_bytes(src: Path, dst: Path) -> Path:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
    return dst


@dataclass
class DeltaVersion:
    """One checkpoint's version of one module's update: its factors, scaling and :func:`delta_stats`.

    What :func:`auditclip.analysis.analyze` keeps per module while it walks a run: the two
    thin factors (``r x (in + out)`` elements), never ΔW itself.
    """

    module: LoraModule
    dtype: str
    A: torch.Tensor
    B: torch.Tensor
    stats: dict[str, float]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.module.delta_shape)  # type: ignore[return-value]

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape))


def read_delta(reader: Any, m: LoraModule) -> DeltaVersion:
    """Read one module's factors from an open reader and describe its update.

    ``reader``: a :class:`auditclip.formats.readers.TensorReader` of the adapter's weights file.

    >>> import json, tempfile
    >>> from safetensors.torch import save_file
    >>> d = Path(tempfile.mkdtemp())
    >>> _ = (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 1, "lora_alpha": 2}))
    >>> save_file({"base_model.model.fc.lora_A.weight": torch.tensor([[1.0, 1.0]]),
    ...            "base_model.model.fc.lora_B.weight": torch.tensor([[1.0], [4.0]])},
    ...           str(d / "adapter_model.safetensors"))
    >>> index = read_adapter_index(d)
    >>> with open_checkpoint_file(index.weights) as reader:
    ...     v = read_delta(reader, index.modules[0])
    >>> v.shape, v.dtype, v.stats["abs_max"]
    ((2, 2), 'float32', 8.0)
    """
    A, B = reader.get(m.a_name), reader.get(m.b_name)
    return DeltaVersion(m, dtype_name(A.dtype), A, B, delta_stats(A, B, m.scaling))


def compare_deltas(cur: DeltaVersion, base: DeltaVersion) -> tuple[str, dict[str, float]]:
    """(status, metrics) of one module's update against a baseline's, as drift.csv reports a tensor.

    ``ok``: ``rel_l2_change``, ``cosine``, ``max_abs_change`` from :func:`delta_drift` (from
    the factors); ``mean_shift`` and ``std_ratio`` from the two versions' statistics.
    ``shape_changed`` when the updates differ in shape (statistics only). ``ks`` and
    ``wasserstein`` need every value of both updates sorted: NaN.

    >>> A = torch.tensor([[1.0, 0.0]]); B = torch.tensor([[2.0]])
    >>> m = LoraModule("fc", "fc", "a", "b", 1, 1.0, 1.0, a_shape=(1, 2), b_shape=(1, 1))
    >>> status, d = compare_deltas(DeltaVersion(m, "float32", A, 1.5 * B, delta_stats(A, 1.5 * B, 1.0)),
    ...                            DeltaVersion(m, "float32", A, B, delta_stats(A, B, 1.0)))
    >>> status, d["rel_l2_change"], d["std_ratio"], math.isnan(d["ks"])
    ('ok', 0.5, 1.5, True)
    """
    out = dict.fromkeys(DRIFT_METRICS, math.nan)
    out["mean_shift"] = cur.stats["mean"] - base.stats["mean"]
    out["std_ratio"] = ratio(cur.stats["std"], base.stats["std"])
    if cur.shape != base.shape:
        return "shape_changed", out
    d = delta_drift((base.A, base.B, base.module.scaling), (cur.A, cur.B, cur.module.scaling))
    out.update(rel_l2_change=d["rel_l2_change"], cosine=d["cosine"], max_abs_change=d["max_abs_change"])
    return "ok", out



def adapter_delta_rows(folder: str | Path) -> list[dict[str, Any]]:
    """One row per adapted module of a LoRA adapter folder: ΔW's statistics, ``kind`` ``adapter_delta``.

    Each row names the update ``<module>.delta_weight`` (``tensor``), the base weight it
    adds to (``target``), ``shape`` ([out, in] as B @ A), ``dtype`` of the factors, ``numel``,
    ``rank``/``alpha``/``scaling`` from the config, and :func:`delta_stats`. A module whose
    update cannot be read off its factors (unpaired, rank contradicting the config) gets
    no row; :func:`auditclip.formats.peft.read_adapter_index` has said why.

    >>> import json, tempfile
    >>> from safetensors.torch import save_file
    >>> d = Path(tempfile.mkdtemp())
    >>> _ = (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 1, "lora_alpha": 2}))
    >>> save_file({"base_model.model.fc.lora_A.weight": torch.tensor([[1.0, 1.0]]),
    ...            "base_model.model.fc.lora_B.weight": torch.tensor([[1.0], [4.0]])},
    ...           str(d / "adapter_model.safetensors"))
    >>> [(r["tensor"], r["kind"], r["abs_max"]) for r in adapter_delta_rows(d)]
    [('base_model.model.fc.delta_weight', 'adapter_delta', 8.0)]
    """
    index = read_adapter_index(folder)
    rows = []
    with open_checkpoint_file(index.weights) as reader:
        for m in index.modules:
            if m.problem:
                continue
            A, B = reader.get(m.a_name), reader.get(m.b_name)
            rows.append({**_module_fields(m, A), **delta_stats(A, B, m.scaling)})
    return rows


def _module_fields(m: LoraModule, A: torch.Tensor) -> dict[str, Any]:
    return {"tensor": m.delta_name, "kind": "adapter_delta", "module": m.module, "target": m.target,
            "dtype": dtype_name(A.dtype), "shape": tuple(m.delta_shape), "numel": int(np.prod(m.delta_shape)),
            "lora_rank": m.rank, "lora_alpha": m.alpha, "scaling": m.scaling}


def adapter_delta_drift(prev: str | Path, cur: str | Path) -> list[dict[str, Any]]:
    """ΔW drift per module between two adapter folders of one run (:func:`delta_drift`).

    Modules are matched by name; a module in only one folder gets no row (and a note).

    >>> import json, tempfile
    >>> from safetensors.torch import save_file
    >>> def folder(b):
    ...     d = Path(tempfile.mkdtemp())
    ...     _ = (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 1, "lora_alpha": 1}))
    ...     save_file({"base_model.model.fc.lora_A.weight": torch.tensor([[1.0, 0.0]]),
    ...                "base_model.model.fc.lora_B.weight": torch.tensor([[b]])}, str(d / "adapter_model.safetensors"))
    ...     return d
    >>> [(r["tensor"], r["rel_l2_change"]) for r in adapter_delta_drift(folder(2.0), folder(3.0))]
    [('base_model.model.fc.delta_weight', 0.5)]
    """
    a_index, b_index = read_adapter_index(prev), read_adapter_index(cur)
    a_mods = {m.module: m for m in a_index.modules if not m.problem}
    b_mods = {m.module: m for m in b_index.modules if not m.problem}
    lonely = sorted(set(a_mods) ^ set(b_mods))
    if lonely:
        note(f"adapter drift: {len(lonely)} adapted module(s) are in only one of {prev} and {cur} "
             f"(e.g. {lonely[0]}); no ΔW drift for them")
    rows = []
    with open_checkpoint_file(a_index.weights) as ra, open_checkpoint_file(b_index.weights) as rb:
        for name in sorted(set(a_mods) & set(b_mods)):
            ma, mb = a_mods[name], b_mods[name]
            A2 = rb.get(mb.a_name)
            d = delta_drift((ra.get(ma.a_name), ra.get(ma.b_name), ma.scaling), (A2, rb.get(mb.b_name), mb.scaling))
            rows.append({**_module_fields(mb, A2), **d})
    return rows



def merged_weights(base: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor],
                   index: AdapterIndex) -> dict[str, torch.Tensor]:
    """The base model's weights with an adapter merged in, as peft's ``merge_and_unload`` gives them:
    each LoRA target ``W + scaling · B @ A`` (transposed for ``fan_in_fan_out`` layers and
    embeddings, reshaped for a convolution kernel), a ``lora_bias`` added to the base bias
    scaled likewise, and each ``modules_to_save`` copy in place of the base tensor. Names are
    the base model's; every tensor not adapted is the base's own. Computed in float64, stored
    in the base dtype. An adapter whose update is not scaling · B @ A (DoRA and other
    variants, a module with a problem, a tensor of unknown role) is an :class:`InputError`.

    >>> from auditclip.formats.peft import AdapterTensor
    >>> index = AdapterIndex(Path("a"), Path("a/adapter_config.json"), Path("a/adapter_model.safetensors"), {},
    ...                      "LORA", modules=[LoraModule("base_model.model.fc", "fc", "A", "B", 1, 2.0, 2.0)],
    ...                      tensors=[AdapterTensor("A", "lora_A", "fc", "float32", (1, 2)),
    ...                               AdapterTensor("B", "lora_B", "fc", "float32", (2, 1))])
    >>> merged_weights({"fc.weight": torch.zeros(2, 2)}, {"A": torch.tensor([[1.0, 0.0]]),
    ...                "B": torch.tensor([[1.0], [3.0]])}, index)["fc.weight"].tolist()
    [[2.0, 0.0], [6.0, 0.0]]
    """
    from .formats.peft import PREFIX

    out = dict(base)
    folder = index.folder
    for m in index.modules:
        if m.problem or m.variant:
            raise InputError(f"--clip-merged: {folder}: LoRA module {m.module} "
                             f"{'has ' + m.problem if m.problem else 'is ' + str(m.variant)}; its merged update is "
                             "not scaling · B @ A, so it cannot be merged here")
        if m.target not in base:
            raise InputError(f"--clip-merged: {folder}: the base model has no {m.target} for LoRA module {m.module}")
        weight = base[m.target]
        delta = materialise_delta(adapter[m.a_name], adapter[m.b_name], m.scaling)  # type: ignore[index]
        if m.fan_in_fan_out or m.embedding:
            delta = delta.T
        if delta.numel() != weight.numel():
            raise InputError(f"--clip-merged: {folder}: LoRA module {m.module}'s update {list(delta.shape)} does not "
                             f"fit {m.target} {list(weight.shape)}")
        out[m.target] = (weight.double() + delta.reshape(weight.shape)).to(weight.dtype)
        if m.bias_name is not None:
            bias_name = f"{m.key}.bias"
            bias = base.get(bias_name)
            if bias is None:
                raise InputError(f"--clip-merged: {folder}: lora_bias of {m.module} but the base has no {bias_name}")
            out[bias_name] = (bias.double() + m.scaling * adapter[m.bias_name].double()).to(bias.dtype)
    for t in index.tensors:
        if t.role == "modules_to_save":
            name = t.name[len(PREFIX):] if t.name.startswith(PREFIX) else t.name
            if name not in base:
                raise InputError(f"--clip-merged: {folder}: modules_to_save copy {t.name} has no base tensor {name}")
            out[name] = adapter[t.name]
        elif t.module is None:
            raise InputError(f"--clip-merged: {folder}: {t.name} is a {t.role} tensor auditclip cannot merge")
    return out
