"""Flag out-of-range parameters across a run.

Element rules look at each tensor version while it is in memory during the
streaming walk (:func:`auditclip.analysis.analyze`); run rules read the drift
and statistics tables afterwards.

=============  ========  ================================================================
rule           severity  fires when
=============  ========  ================================================================
range          error     a finite value lies outside [LO, HI] (``--range`` / ``--max-abs``)
nonfinite      error     any NaN or Inf (always on)
outlier        warning   z = |x - median| / scale above K (``--zscore``), scale from :func:`outlier_scale`; with a range, outside it only
jump           warning   step-to-step rel_l2_change above K x the tensor's median step change (needs 4 checkpoints)
norm_growth    warning   L2 norm above F x its value at the reference checkpoint (strictly above: exactly F passes)
spike          info      |w| above K x the tensor's 99.99th percentile of |w| (``--spike``)
dead           info      every element zero, or all equal
frozen         info      identical at every checkpoint while the model changes (needs 2 checkpoints)
=============  ========  ================================================================

A bound is met when a value is inside it as the tensor's dtype can write it:
a bf16 weight clamped to 0.01 in bf16 (0.01001) passes ``--max-abs 0.01``.

A run rule that a run is too short for is not a silent pass: :func:`flag` says so with
:func:`auditclip.notices.note` and a ``skipped`` row in ``flags.csv`` (which never fails the gate).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import pandas as pd
import torch

from .analysis import AnalysisResult, RunLike, analyze
from .checkpoints import Run, open_run
from .config import RULES, FlagRules, FlagSettings, flag_settings, severity_at_least
from .formats.dtypes import is_float_dtype
from .errors import InputError
from . import notices, sketch
from .stats import TensorSummary, percentile

FLAG_COLUMNS = ("checkpoint", "step", "tensor", "rule", "severity", "count", "fraction", "worst_value",
                "worst_index", "threshold", "message")
SEVERITY = {"range": "error", "nonfinite": "error", "outlier": "warning", "jump": "warning",
            "norm_growth": "warning", "spike": "info", "dead": "info", "frozen": "info"}
#: Fewest step-to-step changes whose median makes a meaningful yardstick for ``jump``
#: (with two, ``change > 5 x median`` cannot happen: the median is their mean).
MIN_STEPS_FOR_JUMP = 3
#: 1.4826 x MAD estimates a normal distribution's standard deviation (1 / Phi^-1(3/4)).
MAD_SCALE = 1.4826
#: IQR / 1.349 estimates a normal distribution's standard deviation (2 Phi^-1(3/4)).
IQR_SCALE = 1.349
#: A robust scale below this share of the next wider one has collapsed onto a pile of
#: (nearly) equal values, as a WGAN critic's weights piled at +c (see :func:`outlier_scale`).
COLLAPSE = 0.25
#: The percentile of |w| the spike rule measures a weight against.
SPIKE_PERCENTILE = 99.99
#: ``severity`` of a row saying a rule could not be applied (never fails the gate).
SKIPPED = "skipped"


@dataclass
class FlagResult:
    """What :func:`flag` returns: the findings, unreadable checkpoints, and the analysis behind them."""

    flags: pd.DataFrame
    errors: pd.DataFrame
    analysis: AnalysisResult
    fail_on: str = "error"

    @property
    def failed(self) -> bool:
        """True when a finding reaches ``fail_on`` (the CLI then exits 1); a ``skipped`` row never does."""
        return any(s != SKIPPED and severity_at_least(s, self.fail_on) for s in self.flags.severity)


def index_text(flat_index: int, shape: tuple[int, ...]) -> str:
    """Flat position -> ``"[3, 17]"``, the multi-dimensional index in ``flags.csv``.

    >>> index_text(7, (2, 5))
    '[1, 2]'
    """
    if not shape:
        return "[]"
    return "[" + ", ".join(str(int(i)) for i in np.unravel_index(flat_index, shape)) + "]"


@lru_cache(maxsize=256)
def _dtype_edge(value: float, dtype: torch.dtype) -> float:
    """``value`` as the dtype rounds it: the loosest reading of a bound for that dtype."""
    try:
        return float(torch.tensor(value, dtype=torch.float64).to(dtype))
    except (RuntimeError, TypeError):
        return value


def outlier_scale(mad: float, iqr: float, std: float) -> tuple[float, str]:
    """The scale of the outlier rule's z-score, and its name: the first that has not collapsed.

    1. ``1.4826 x MAD``, unless it is 0 or below :data:`COLLAPSE` (1/4) of ``IQR/1.349``.
       For any symmetric distribution the two are equal (the MAD is half the IQR), and a
       few outliers move neither; the MAD falls far below the IQR only when about half
       the values pile up at the median: a WGAN critic clamped to +-c, most weights at +c.
    2. ``IQR / 1.349``, unless it is 0 or below 1/4 of the standard deviation (three
       quarters of the values piled up).
    3. the standard deviation (0 for a constant tensor: no outlier then; see ``dead``).

    >>> outlier_scale(0.002, 0.004, 0.2)  # a bulk of small values and one far away: the MAD
    (0.0029652, '1.4826*MAD')
    >>> s, name = outlier_scale(0.0, 0.02, 0.009)  # half the weights at +c: MAD 0
    >>> round(s, 6), name
    (0.014826, 'IQR/1.349')
    >>> outlier_scale(0.0, 0.0, 0.008)  # 80% at +c, 20% at -c
    (0.008, 'std')
    """
    scale = MAD_SCALE * mad
    wider = iqr / IQR_SCALE
    if scale > 0 and scale >= COLLAPSE * wider:
        return scale, "1.4826*MAD"
    if wider > 0 and wider >= COLLAPSE * std:
        return wider, "IQR/1.349"
    return std, "std"


def _quantile(summary: TensorSummary, q: float) -> float:
    """The q-th percentile of the finite values: exact for small tensors, sketched for large."""
    if summary.values is not None:
        return percentile(summary.values, q)
    return summary.cdf_sketch().quantile(q) if summary.n_finite else math.nan


def _scale(summary: TensorSummary, mad: float) -> tuple[float, str]:
    """:func:`outlier_scale` of one tensor, its MAD being known."""
    iqr = _quantile(summary, 75.0) - _quantile(summary, 25.0)
    return outlier_scale(mad, iqr, summary.stats["std"])


def _abs_quantile(summary: TensorSummary, x: torch.Tensor, center: float, q: float) -> float:
    """The q-th percentile of |x - center| over finite values: exact for small tensors, sketched for large."""
    if summary.values is not None:
        return float(np.percentile(np.abs(summary.values.astype(np.float64) - center), q))
    dev = (x - center).abs()
    dev = dev[torch.isfinite(dev)]
    if not dev.numel():
        return math.nan
    return sketch.build(dev, float(dev.min()), float(dev.max()), dev.numel()).quantile(q)


def _quiet(t: torch.Tensor, summary: TensorSummary, rules: FlagRules) -> bool:
    """True when no element rule can fire on a tensor whose sorted finite values are at hand.

    Decided from the statistics and two sorted copies (|x - median| for the MAD,
    |x| for the 99.99th percentile), exactly as :func:`element_findings` decides:
    the largest deviation of any element is the larger of ``max - median`` and
    ``median - min`` (rounding is monotonic), the largest magnitude is ``abs_max``;
    the scales and percentiles are the same functions of the same constants.
    A range check passes when ``min``/``max`` are inside the bounds as the dtype
    writes them. Anything less clear-cut is left to the element-wise code.
    """
    st, n = summary.stats, summary.n_finite
    if n != t.numel() or n == 0:  # NaN/Inf: the nonfinite rule fires
        return False
    lo, hi = st["min"], st["max"]
    if rules.on("range"):
        a, b = rules.range  # type: ignore[misc]
        if not (min(a, _dtype_edge(a, t.dtype)) <= lo and hi <= max(b, _dtype_edge(b, t.dtype))):
            return False
    if rules.on("dead") and n > 1 and st["std"] == 0:
        return False
    # every value inside the explicit bound: no outlier can fire (see element_findings)
    outlier = rules.on("outlier") and n > 2 and not rules.on("range")
    spike = rules.on("spike") and n > 1
    if outlier or spike:
        wide = summary.values.astype(np.float64)  # type: ignore[union-attr]
        median = st["p50"]
        if outlier:
            scale, _ = _scale(summary, percentile(np.sort(np.abs(wide - median)), 50.0))
            if scale > 0 and max(hi - median, median - lo) > rules.zscore * scale:
                return False
        if spike:
            p9999 = percentile(np.sort(np.abs(wide - 0.0)), SPIKE_PERCENTILE)
            if p9999 > 0 and st["abs_max"] > rules.spike * p9999:
                return False
    return True


def element_findings(name: str, t: torch.Tensor, summary: TensorSummary, settings: FlagSettings, *,
                     rules: FlagRules | None = None) -> list[dict[str, Any]]:
    """Findings of the element rules (range, nonfinite, outlier, spike, dead) for one tensor.

    ``rules``: the tensor's rules when already known (``settings.rules_for(name)``).
    Here 0.5 is outside ``--max-abs 0.01`` and, against the other values (median 0.001,
    MAD 0.002), a robust z-score of 168 makes it an outlier as well:

    >>> from auditclip.stats import describe
    >>> t = torch.tensor([0.0, 0.5, -0.002, 0.001, 0.003])
    >>> found = element_findings("w", t, describe(t), flag_settings(options={"max_abs": 0.01}, search=False))
    >>> [f["rule"] for f in found], found[1]["message"].split("(max ")[1]
    (['range', 'outlier'], 'z=168; median 0.001, scale 1.4826*MAD = 0.00297)')
    """
    rules = settings.rules_for(name) if rules is None else rules
    if summary.values is not None and _quiet(t, summary, rules):
        return []
    shape = tuple(t.shape)
    numel = t.numel()
    x = t.detach().reshape(-1)
    x = x if x.dtype in (torch.float32, torch.float64) else x.to(torch.float32)
    finite = torch.isfinite(x)
    out: list[dict[str, Any]] = []

    def add(rule: str, count: int, worst: int, threshold: str, message: str) -> None:
        out.append({"tensor": name, "rule": rule, "severity": SEVERITY[rule], "count": count,
                    "fraction": count / numel if numel else 0.0, "worst_value": float(x[worst]),
                    "worst_index": index_text(worst, shape), "threshold": threshold, "message": message})

    n_bad = numel - summary.n_finite
    if n_bad:
        first = int(torch.nonzero(~finite)[0])
        add("nonfinite", n_bad, first, "finite",
            f"{int(summary.stats['n_nan'])} NaN and {int(summary.stats['n_inf'])} Inf values")
    if summary.n_finite == 0:
        return out
    if rules.on("range"):
        lo, hi = rules.range  # type: ignore[misc]
        lo_e, hi_e = min(lo, _dtype_edge(lo, t.dtype)), max(hi, _dtype_edge(hi, t.dtype))
        excess = torch.maximum(lo_e - x, x - hi_e).nan_to_num(nan=-math.inf)
        count = int((excess > 0).sum())
        if count:
            worst = int(excess.argmax())
            add("range", count, worst, f"[{lo:g}, {hi:g}]",
                f"{count} value(s) outside [{lo:g}, {hi:g}]; worst {float(x[worst]):.6g}")
    median = summary.stats["p50"]
    if rules.on("outlier") and summary.n_finite > 2:
        scale, scale_name = _scale(summary, _abs_quantile(summary, x, median, 50.0))
        if scale > 0:
            limit = rules.zscore * scale
            dev = (x.to(torch.float64) - median).abs().nan_to_num(nan=-1.0, posinf=-1.0)
            if rules.on("range"):  # a value inside the explicit bound is what the user allows: never an outlier
                lo_r, hi_r = rules.range  # type: ignore[misc]
                inside = (x >= min(lo_r, _dtype_edge(lo_r, t.dtype))) & (x <= max(hi_r, _dtype_edge(hi_r, t.dtype)))
                dev = dev.masked_fill(inside, -1.0)
            count = int((dev > limit).sum())
            if count:
                worst = int(dev.argmax())
                z = float(dev[worst]) / scale
                add("outlier", count, worst, f"z>{rules.zscore:g}",
                    f"{count} value(s) with robust z-score above {rules.zscore:g} "
                    f"(max z={z:.3g}; median {median:.3g}, scale {scale_name} = {scale:.3g})")
    if rules.on("spike") and summary.n_finite > 1:
        p9999 = _abs_quantile(summary, x, 0.0, SPIKE_PERCENTILE)
        if p9999 > 0:
            limit = rules.spike * p9999
            mag = x.abs().to(torch.float64).nan_to_num(nan=-1.0, posinf=-1.0)
            count = int((mag > limit).sum())
            if count:
                worst = int(mag.argmax())
                add("spike", count, worst, f">{rules.spike:g}x p{SPIKE_PERCENTILE:g}(|w|)={p9999:.3g}",
                    f"{count} weight(s) above {rules.spike:g}x the {SPIKE_PERCENTILE:g}th percentile of |w|: "
                    "possible super weight(s). "
                    "Such weights can carry a model (zeroing one in a 7B LLM sends perplexity up by orders of "
                    f"magnitude): protect them (clip --protect '{name}{index_text(worst, shape)}' or --protect-top) rather than clip")
    if rules.on("dead") and numel > 1 and summary.n_finite == numel and summary.stats["std"] == 0:
        value = summary.stats["mean"]
        what = "all zeros" if value == 0 else f"constant ({value:.6g})"
        add("dead", numel, 0, "std=0", f"tensor is {what}")
    return out


def bounds_of(settings: FlagSettings, siblings: Collection[str] | None = None,
              kinds: tuple[frozenset[str], frozenset[str]] | None = None,
              ) -> Callable[[str], tuple[float, float] | None]:
    """Each tensor's bound for ``frac_at_bound``: its ``range`` rule's ``(lo, hi)``, None where that is off.

    The same tensors the range rule checks: parameters, buffers only with ``--buffers``
    (``siblings``, ``kinds``: as :func:`_rules_cache` takes them).

    >>> bound = bounds_of(flag_settings(options={"max_abs": 0.01}, search=False))
    >>> bound("critic.weight"), bound("bn.running_var")
    ((-0.01, 0.01), None)
    """
    rules_for = _rules_cache(settings, siblings, kinds)

    def bound(name: str) -> tuple[float, float] | None:
        rules = rules_for(name)
        return rules.range if rules.on("range") else None

    return bound


def run_bounds(run: Run, settings: FlagSettings) -> Callable[[str], tuple[float, float] | None]:
    """:func:`bounds_of` for the tensors of ``run``: what sits beside each and what its format records
    (DeepSpeed's ``buffer_names``) decide, as ``flag`` decides them, which tensors the bound applies to.

    >>> from auditclip.checkpoints import open_run
    >>> bound = run_bounds(open_run("sample_checkpoints/wgan_clip"), flag_settings(options={"max_abs": 0.01}, search=False))
    >>> bound("net.0.weight"), bound("net.0.running_var")
    ((-0.01, 0.01), None)
    """
    names, kinds = _tensor_names(run)
    return bounds_of(settings, names, kinds)


def _rules_cache(settings: FlagSettings, siblings: Collection[str] | None = None,
                 kinds: tuple[frozenset[str], frozenset[str]] | None = None) -> Callable[[str], FlagRules]:
    """``settings.rules_for``, once per tensor name (matching overrides is glob work).

    ``siblings``: the run's tensor names, which tell what a ``weight_v`` is (kinds.tensor_kind);
    ``kinds``: the parameters and buffers the format records (DeepSpeed's ``buffer_names``).
    """
    cache: dict[str, FlagRules] = {}

    def rules_for(name: str) -> FlagRules:
        rules = cache.get(name)
        if rules is None:
            rules = cache[name] = settings.rules_for(name, siblings, kinds)
        return rules

    return rules_for


def _group_medians(codes: np.ndarray, values: np.ndarray, groups: int) -> np.ndarray:
    """``np.nanmedian`` of ``values`` in each group of ``codes`` (NaN for a group with no number).

    The same arithmetic: the middle value, or the two middle values' sum halved.
    """
    order = np.lexsort((values, codes))  # by group, then value, NaN last
    ordered = values[order]
    counts = np.bincount(codes, minlength=groups)
    numbers = np.bincount(codes, weights=~np.isnan(values), minlength=groups).astype(np.int64)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1])).astype(np.int64)
    out = np.full(groups, np.nan)
    has = numbers > 0
    mid = starts + numbers // 2
    odd = has & (numbers % 2 == 1)
    even = has & (numbers % 2 == 0)
    out[odd] = ordered[mid[odd]]
    out[even] = (ordered[mid[even] - 1] + ordered[mid[even]]) / 2.0
    return out


def _run_findings(result: AnalysisResult, settings: FlagSettings, norms: dict[tuple[str, str], float],
                  rules_for: Callable[[str], FlagRules] | None = None) -> list[dict[str, Any]]:
    """Findings of the run rules (jump, frozen, norm_growth), read off the drift table column by column."""
    rules_for = rules_for or _rules_cache(settings)
    out: list[dict[str, Any]] = []
    d = result.drift
    unreadable = set(result.errors.checkpoint)
    labels = [c.label for c in result.run if c.label not in unreadable]
    steps = {c.label: c.step for c in result.run}
    previous = d.baseline == "previous"
    prev = d[previous & (d.tensor != "__all__") & (d.status == "ok")]
    model_moved = bool((d[previous & (d.tensor == "__all__")].rel_l2_change > 0).any())
    codes, tensors = pd.factorize(prev.tensor.to_numpy(dtype=object), sort=False)
    groups = len(tensors)
    changes = prev.rel_l2_change.to_numpy(dtype=float)
    counts = np.bincount(codes, minlength=groups)
    rules = [rules_for(str(name)) for name in tensors]
    jump_on = np.array([r.on("jump") for r in rules], dtype=bool) & (counts >= MIN_STEPS_FOR_JUMP)
    if jump_on.any():
        yardsticks = _group_medians(codes, changes, groups)
        limits = np.array([r.jump for r in rules], dtype=float) * yardsticks
        with np.errstate(invalid="ignore"):
            hits = np.flatnonzero(jump_on[codes] & (changes > limits[codes]))
        checkpoints, since = prev.checkpoint.to_numpy(dtype=object), prev.baseline_checkpoint.to_numpy(dtype=object)
        for row in hits:
            g = codes[row]
            yardstick, change, jump = float(yardsticks[g]), changes[row], rules[g].jump
            ratio = change / yardstick if yardstick > 0 else math.inf
            out.append({"checkpoint": checkpoints[row], "tensor": tensors[g], "rule": "jump", "severity": "warning",
                        "count": 1, "fraction": math.nan, "worst_value": change, "worst_index": "",
                        "threshold": f">{jump:g}x median {yardstick:.3g}",
                        "message": f"step change {change:.3g} is {ratio:.3g}x the tensor's median "
                                   f"step change ({yardstick:.3g}) since {since[row]}"})
    if model_moved and labels:
        moving = np.bincount(codes, weights=prev.max_abs_change.to_numpy(dtype=float) != 0, minlength=groups)
        for g in np.flatnonzero((moving == 0) & (counts == len(labels) - 1) & (counts >= 1)):
            if rules[g].on("frozen"):
                out.append({"checkpoint": labels[-1], "tensor": tensors[g], "rule": "frozen", "severity": "info",
                            "count": 1, "fraction": math.nan, "worst_value": math.nan, "worst_index": "",
                            "threshold": "identical",
                            "message": f"identical in all {len(labels)} checkpoints while the model changed"})
    reference = result.reference
    for (label, name), norm in norms.items():
        rule = rules_for(name)
        base = norms.get((reference, name)) if reference else None
        if label not in steps or not rule.on("norm_growth") or not base:
            continue
        growth = norm / base
        if growth > rule.norm_growth:  # type: ignore[operator]
            out.append({"checkpoint": label, "tensor": name, "rule": "norm_growth", "severity": "warning",
                        "count": 1, "fraction": math.nan, "worst_value": norm, "worst_index": "",
                        "threshold": f">{rule.norm_growth:g}x", "message": f"L2 norm {norm:.4g} is {growth:.3g}x "
                                                                           f"its value at {reference} ({base:.4g})"})
    return out


class ElementChecker:
    """The element rules of ``flag``, called on each tensor version :func:`analyze` reads (its ``visit``).

    ``found[(checkpoint, tensor)]``: that version's findings; ``norms``: the L2 norms
    ``norm_growth`` compares; ``checked``: versions whose elements were looked at.
    :meth:`fresh` and :meth:`absorb` let copies run where the tensors are (Dask workers).

    >>> import torch
    >>> from auditclip.stats import describe
    >>> check = ElementChecker(flag_settings(options={"max_abs": 0.01}, search=False), ["w"])
    >>> t = torch.tensor([0.001, 0.5, -0.002])
    >>> copy = check.fresh()
    >>> copy("step_1", "w", t, describe(t))
    >>> check.absorb(copy)
    >>> [f["rule"] for f in check.found[("step_1", "w")]], check.checked
    (['range'], 1)
    """

    def __init__(self, settings: FlagSettings, names: Collection[str],
                 kinds: tuple[frozenset[str], frozenset[str]] | None = None) -> None:
        self.settings, self.names, self.kinds = settings, names, kinds
        self.rules_for = _rules_cache(settings, names, kinds)
        self.found: dict[tuple[str, str], list[dict[str, Any]]] = {}
        self.norms: dict[tuple[str, str], float] = {}
        self.checked = 0  # tensor versions with elements the rules looked at

    def __call__(self, label: str, name: str, tensor: torch.Tensor, summary: TensorSummary) -> None:
        rules = self.rules_for(name)
        findings = element_findings(name, tensor, summary, self.settings, rules=rules)  # type: ignore[arg-type]
        if findings:
            self.found[(label, name)] = findings
        if rules.on("norm_growth"):
            self.norms[(label, name)] = summary.stats["l2_norm"]
        if tensor.numel():
            self.checked += 1  # ints and the GIL make this safe across walker threads

    def fresh(self) -> ElementChecker:
        """An empty checker with the same settings."""
        return ElementChecker(self.settings, self.names, self.kinds)

    def absorb(self, other: ElementChecker) -> None:
        """Take what a copy found (a version seen by two tasks, as a baseline, gives the same findings)."""
        self.found.update(other.found)
        self.norms.update(other.norms)
        self.checked += other.checked


def flag(
    run: RunLike,
    settings: FlagSettings | None = None,
    *,
    reference: str | os.PathLike[str] | None = None,
    sort: str = "step",
    key: str | None = None,
    progress: Any = None,
    visit: Any = None,
    device: str | None = None,
    scheduler: str | None = None,
    **options: Any,
) -> FlagResult:
    """Check every tensor of a run against the rules; one row per finding (``flags.csv``).

    ``settings`` from :func:`auditclip.config.flag_settings`, or rule options
    directly: ``max_abs``, ``range``, ``zscore``, ``jump``, ``norm_growth``,
    ``spike``, ``include``, ``exclude``, ``fail_on``. ``visit``: a further
    :data:`auditclip.analysis.Visitor`, called on every tensor version read, as the rules are.
    ``device``: where the statistics pass runs (:func:`auditclip.analysis.analyze`). ``scheduler``: a Dask cluster walks
    the run (see :func:`auditclip.analysis.analyze`); ``visit`` then is not called (the tensors
    are read on the workers).

    The sample WGAN critic, clipped to +-0.01 after every step, stays inside the bound;
    the run trained with too high a learning rate does not:

    >>> result = flag("sample_checkpoints/wgan_clip", max_abs=0.01)
    >>> result.failed
    False
    >>> high = flag("sample_checkpoints/high_lr", max_abs=1.5)
    >>> high.failed, high.flags[high.flags.rule == "range"].checkpoint.iloc[0]
    (True, 'epoch_09.safetensors')
    """
    if settings is None:
        settings = flag_settings(options=options, search=False)
    run = open_run(run, sort=sort, key=key)
    names, kinds = _tensor_names(run)
    checker = ElementChecker(settings, names, kinds)
    found, norms, rules_for = checker.found, checker.norms, checker.rules_for
    also = visit

    def check(label: str, name: str, tensor: torch.Tensor, summary: TensorSummary) -> None:
        also(label, name, tensor, summary)  # type: ignore[misc]
        checker(label, name, tensor, summary)

    bound = bounds_of(settings, names, kinds)
    bounded = settings.rules.range is not None or any("range" in changes for _, changes in settings.overrides)
    result = analyze(run, include=settings.include, exclude=settings.exclude, reference=reference, sort=sort,
                     key=key, progress=progress, bounds=bound if bounded else None, device=device, scheduler=scheduler,
                     # the element rules run where the tensors are (Dask workers too); a further visitor only here
                     visit=check if also is not None and scheduler is None else checker)
    if not checker.checked:
        raise InputError(f"nothing was checked, so the gate cannot pass: {_why_nothing(result, settings)}")
    order = {c.label: i for i, c in enumerate(result.run)}
    steps = {c.label: c.step for c in result.run}
    rows = [{"checkpoint": label, **f} for (label, _), fs in found.items() if label in order for f in fs]
    rows += _run_findings(result, settings, norms, rules_for)
    rows += not_applied(result, rules_for)
    names = {n: i for i, n in enumerate(result.tensors)}
    rows.sort(key=lambda r: (order[r["checkpoint"]], names.get(r["tensor"], -1), RULES.index(r["rule"])))
    for r in rows:
        r["step"] = steps[r["checkpoint"]]
    flags = pd.DataFrame(rows, columns=list(FLAG_COLUMNS))
    flags["step"] = flags["step"].astype("Int64")
    flags["count"] = flags["count"].astype("Int64")
    return FlagResult(flags=flags, errors=result.errors, analysis=result, fail_on=settings.fail_on)


def _tensor_names(run: Run) -> tuple[frozenset[str], tuple[frozenset[str], frozenset[str]] | None]:
    """The tensor names of the run's first readable checkpoint (headers only), for the rules
    that depend on what sits beside a tensor, and the (parameters, buffers) its format records
    (None where it records none); empty when none opens (reported by the walk)."""
    for ckpt in run:
        try:
            with ckpt.open(run.key) as reader:
                return frozenset(reader.names()), reader.format_kinds()
        except Exception:  # unreadable: the walk reports it in errors.csv
            continue
    return frozenset(), None


def not_applied(result: AnalysisResult, rules_for: Callable[[str], FlagRules]) -> list[dict[str, Any]]:
    """``skipped`` rows (and notes) for the run rules this run is too short for.

    ``jump`` needs 4 readable checkpoints of a tensor (3 step changes to take the median
    of), ``frozen`` 2, ``norm_growth`` a readable reference and a checkpoint besides it.
    Each rule that is on but could not be applied, to the whole run or to some of its
    tensors, gets one row (tensor ``__all__``, on the last checkpoint) and one
    :func:`auditclip.notices.note`, so a short run never passes in silence.

    >>> rows = flag("sample_checkpoints/high_lr/epoch_01.safetensors").flags
    >>> rows[["rule", "severity"]].values.tolist()
    [['jump', 'skipped'], ['frozen', 'skipped']]
    """
    unreadable = set(result.errors.checkpoint)
    labels = [c.label for c in result.run if c.label not in unreadable]
    if not labels:
        return []
    stats = result.stats
    floats = stats[(stats.tensor != "__all__") & (stats.numel > 0) & stats.dtype.map(lambda d: is_float_dtype(str(d)))]
    names = list(dict.fromkeys(floats.tensor))
    rules = {name: rules_for(name) for name in names}
    out: list[dict[str, Any]] = []

    def skip(rule: str, needs: str, message: str) -> None:
        notices.note(message)
        out.append({"checkpoint": labels[-1], "tensor": "__all__", "rule": rule, "severity": SKIPPED, "count": 0,
                    "fraction": math.nan, "worst_value": math.nan, "worst_index": "", "threshold": needs,
                    "message": message})

    need_jump = MIN_STEPS_FOR_JUMP + 1
    jumpers = [n for n in names if rules[n].on("jump")]
    if jumpers and len(labels) < need_jump:
        skip("jump", f"{need_jump} checkpoints", f"jump not applied: the run has {len(labels)} readable checkpoint(s); "
             f"the rule needs {need_jump} ({MIN_STEPS_FOR_JUMP} step changes to take a median of)")
    elif jumpers:
        d = result.drift
        ok = d[(d.baseline == "previous") & (d.status == "ok")].tensor.value_counts()
        short = [n for n in jumpers if ok.get(n, 0) < MIN_STEPS_FOR_JUMP]
        if short:
            skip("jump", f"{need_jump} checkpoints", f"jump not applied to {len(short)} tensor(s) compared in fewer "
                 f"than {need_jump} checkpoints (added, removed or reshaped during the run): "
                 + ", ".join(short[:5]) + (", ..." if len(short) > 5 else ""))
    if any(rules[n].on("frozen") for n in names) and len(labels) < 2:
        skip("frozen", "2 checkpoints", "frozen not applied: the run has 1 readable checkpoint; the rule needs 2")
    if any(rules[n].on("norm_growth") for n in names):
        reference = result.reference
        if reference in unreadable:
            skip("norm_growth", "a readable reference",
                 f"norm_growth not applied: the reference checkpoint {reference} could not be read")
        elif not any(label != reference for label in labels):
            skip("norm_growth", "2 checkpoints", "norm_growth not applied: no checkpoint besides the reference "
                 f"{reference} to compare with")
    return out


def _why_nothing(result: AnalysisResult, settings: FlagSettings) -> str:
    """Why a flag run looked at no element: the reason a user can act on."""
    where = f" (settings from {settings.source})" if getattr(settings, "source", "") else ""
    if len(result.errors) == len(result.run):
        return "no checkpoint could be read (" + "; ".join(
            f"{e.checkpoint}: {e.message}" for e in result.errors.head(3).itertuples()) + ")"
    if not result.tensors:
        if settings.include or settings.exclude:
            return (f"every tensor is excluded by --include {list(settings.include)} / --exclude "
                    f"{list(settings.exclude)}{where}; widen the selection")
        return "the checkpoints hold no tensors"
    stats = result.stats[result.stats.tensor != "__all__"]
    floats = stats[stats.dtype.map(lambda d: is_float_dtype(str(d)))]
    if floats.empty:
        return f"none of the {stats.tensor.nunique()} tensor(s) is floating point (dtypes: " + ", ".join(
            sorted(set(map(str, stats.dtype)))) + ")"
    return (f"every floating tensor is empty (a 0 in its shape, e.g. {floats['shape'].iloc[0]}): placeholders such as "
            "DeepSpeed ZeRO-3 writes; audit the consolidated weights (zero_to_fp32.py) instead")


def summary_table(flags: pd.DataFrame) -> pd.DataFrame:
    """Findings grouped by rule and tensor: checkpoints hit, total count, worst value, first step.

    >>> summary_table(pd.DataFrame(columns=list(FLAG_COLUMNS))).columns.tolist()
    ['rule', 'severity', 'tensor', 'checkpoints', 'count', 'worst_value', 'first_checkpoint']
    """
    columns = ["rule", "severity", "tensor", "checkpoints", "count", "worst_value", "first_checkpoint"]
    if flags.empty:
        return pd.DataFrame(columns=columns)
    grouped = flags.groupby(["rule", "severity", "tensor"], sort=False).agg(
        checkpoints=("checkpoint", "nunique"), count=("count", "sum"),
        worst_value=("worst_value", lambda v: v.iloc[int(np.nanargmax(np.abs(v.to_numpy(float))))] if v.notna().any() else math.nan),
        first_checkpoint=("checkpoint", "first"),
    ).reset_index()
    rank = {s: i for i, s in enumerate(("error", "warning", "info"))}
    grouped["_r"] = grouped.severity.map(rank)
    return grouped.sort_values(["_r", "rule"], kind="stable").drop(columns="_r")[columns]


__all__: Sequence[str] = ("FLAG_COLUMNS", "FlagResult", "bounds_of", "element_findings", "flag", "not_applied", "outlier_scale",
                         "summary_table")
