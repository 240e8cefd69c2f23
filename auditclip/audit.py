"""One command for the whole job: stats, drift, flags, evaluation, summary, pictures."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from .analysis import RunLike
from .config import ClipSpec, FlagSettings, flag_settings
from .errors import InputError
from .evaluation import EvalOptions, evaluate_rows, clip_variants, recommend, recommendations
from .flags import FlagResult, flag
from .histograms import HistogramCollector, TensorHistograms
from .notices import collect, note
from .report.writer import Report
from .report.pictures import PLOT_HINT, drift_heatmap, have_matplotlib, histograms, sweep_plot
from .report.summary import md_table, top_tensors, write_summary

__all__ = ["AuditResult", "audit", "md_table"]


@dataclass
class AuditResult:
    """Everything ``audit`` produced; ``failed`` decides the exit code as for ``flag``."""

    out: Path
    flags: FlagResult
    evaluation: pd.DataFrame | None = None
    recommendation: str | None = None
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    errors: pd.DataFrame = field(default_factory=pd.DataFrame)
    #: the metric --tolerance applied to, with its direction and tolerance ("" without evaluation)
    decided_by: str = ""
    #: per tensor, its value histograms on bins shared across the run (see :mod:`auditclip.histograms`)
    histograms: dict[str, TensorHistograms] = field(default_factory=dict)
    #: the TensorBoard event file written (with ``tensorboard``)
    tensorboard: Path | None = None
    #: what the recommended clip costs, e.g. "max_abs=1 clips 0.4% of weights, loss +0.6% (within 1%)"
    recommendation_cost: str = ""

    @property
    def failed(self) -> bool:
        return self.flags.failed or len(self.errors) > 0


def _tightness(spec_text: str) -> float:
    """Smaller is tighter: the range's width, or the spec's number (max_abs, percentile, sigma)."""
    spec = ClipSpec.parse(spec_text)
    if spec.kind == "range":
        return float(spec.b) - float(spec.a)  # type: ignore[arg-type]
    return float(spec.a)  # type: ignore[arg-type]


def audit(
    run: RunLike,
    out: str | os.PathLike[str],
    *,
    model: str | None = None,
    data: str | None = None,
    clips: tuple[str, ...] | list[str] = (),
    settings: FlagSettings | None = None,
    eval_options: EvalOptions | None = None,
    tolerance: float | None = None,
    reference: str | os.PathLike[str] | None = None,
    sort: str = "step",
    key: str | None = None,
    top: int = 10,
    progress: Any = None,
    tensorboard: str | os.PathLike[str] | None = None,
    scheduler: str | None = None,
) -> AuditResult:
    """Audit a run end to end and write every report into ``out``.

    Writes ``stats.csv``, ``drift.csv``, ``flags.csv``, with ``model`` and ``data``
    ``evaluation.csv``, ``summary.md`` and ``report.html`` (one self-contained page); with
    matplotlib ``drift_heatmap.png``, ``histograms.png`` and (with ``clips``) ``sweep.png``;
    with ``tensorboard`` (a directory) TensorBoard event files: histograms and scalars per
    step (:mod:`auditclip.report.tensorboard`), counted in the same one read of the run. The clipped variants take
    their tensor selection from ``eval_options`` (include/exclude/overrides/config/buffers),
    as ``clip`` would. Every note said during the audit (:mod:`auditclip.notices`) and the
    run's own notes are in summary.md under "Notes". ``scheduler``: a Dask cluster walks the
    run's statistics pass (see :func:`auditclip.analysis.analyze`).

    >>> result = audit("sample_checkpoints/high_lr", "report/", model="sample_checkpoints/digits_mlp.py:make_model",
    ...                data="sample_checkpoints/digits_test.safetensors", clips=["max_abs=1.5"])  # doctest: +SKIP
    """
    if model is not None and data is None:
        raise InputError("--model and --data go together: give both to evaluate, or neither")
    if clips and data is None:
        raise InputError("--clip needs --model and --data to evaluate the clipped variants")
    if tensorboard is not None:
        from .report.tensorboard import check_available

        check_available()  # before the long work
    with collect() as said:
        result = _audit(run, out, model, data, clips, settings, eval_options, tolerance, reference, sort, key, top,
                        progress, tensorboard, scheduler)
        result.notes = _unique([*said, *getattr(result.flags.analysis.run, "notes", []), *result.notes])
    from .report.html import write_html

    result.files.append(write_html(result, result.out / "report.html", tolerance))
    result.files.append(write_summary(result, tolerance, top, result.out))
    return result


def _unique(notes: list[Any]) -> list[str]:
    return list(dict.fromkeys(str(n) for n in notes))


def _audit(run: RunLike, out: str | os.PathLike[str], model: str | None, data: str | None, clips: Any,
           settings: FlagSettings | None, eval_options: EvalOptions | None, tolerance: float | None,
           reference: Any, sort: str, key: str | None, top: int, progress: Any,
           tensorboard: str | os.PathLike[str] | None, scheduler: str | None = None) -> AuditResult:
    settings = settings or flag_settings(search=False)
    # without options of their own, the clipped variants take the rules' tensor selection
    options = eval_options or EvalOptions(sort=sort, key=key, include=settings.include, exclude=settings.exclude,
                                          buffers=settings.buffers)
    variants = clip_variants(list(clips), options)  # parse before the long work, so a bad spec fails fast
    report = Report(out)
    out_dir = report.out
    pictures = have_matplotlib()
    # counted while each tensor version is in memory: no second read for the pictures or TensorBoard
    collector = HistogramCollector() if (pictures or tensorboard is not None) and scheduler is None else None
    if scheduler is not None and (pictures or tensorboard is not None):
        note("--scheduler: the value histograms (histograms.png, TensorBoard histograms) are not drawn: the "
             "tensors are read on the Dask workers; the statistics, drift and flags are complete")
    flagged = flag(run, settings, reference=reference, sort=sort, key=key, progress=progress,
                   visit=collector.visit if collector is not None else None,
                   device=eval_options.device if eval_options is not None else None, scheduler=scheduler)
    analysis = flagged.analysis
    result = AuditResult(out=out_dir, flags=flagged, files=report.files)
    if collector is not None:
        result.histograms = collector.result([c.label for c in analysis.run])
    for name, df in (("stats.csv", analysis.stats), ("drift.csv", analysis.drift), ("flags.csv", flagged.flags)):
        report.csv(df, name)
    errors = [analysis.errors]
    primary = None
    if data is not None:  # without --model: hf where the checkpoints have config.json, else an error
        evaluation, eval_errors, primary, _ = evaluate_rows(analysis.run, model, data, variants, options)  # type: ignore[arg-type]
        order = sorted((v for v, _ in variants), key=_tightness)
        evaluation["recommended"] = recommend(evaluation, primary, tolerance, order)
        result.evaluation = evaluation
        result.decided_by = primary.describe(tolerance)
        report.csv(evaluation, "evaluation.csv")
        errors.append(eval_errors)
        last = evaluation[evaluation.checkpoint == evaluation.checkpoint.iloc[-1]]
        chosen = last[last.recommended]
        if clips and len(chosen):
            result.recommendation_cost = recommendations(last, primary, tolerance)[str(chosen.checkpoint.iloc[0])]
        if clips:
            result.recommendation = (
                f"{chosen.variant.iloc[0]} for {chosen.checkpoint.iloc[0]}" if len(chosen)
                else f"none: no tested clip both changes weights and stays within tolerance on "
                     f"{last.checkpoint.iloc[0]}")
    result.errors = pd.concat([e for e in errors if len(e)] or [errors[0]]).drop_duplicates("checkpoint")
    report.errors(result.errors)  # or remove a stale errors.csv of an earlier audit
    if pictures:
        result.files += _pictures(analysis, result, out_dir, primary, tolerance, top, _bound(settings))
    else:
        result.notes.append(PLOT_HINT)
    if tensorboard is not None:
        from .report.tensorboard import write_tensorboard

        result.tensorboard = write_tensorboard(tensorboard, analysis, result.histograms, flagged.flags).path
    return result


def _bound(settings: FlagSettings) -> Any:
    """Each tensor's clip bound for the pictures, as flag reads it; None without any bound."""
    from .flags import bounds_of

    bounded = settings.rules.range is not None or any("range" in changes for _, changes in settings.overrides)
    return bounds_of(settings) if bounded else None


def _pictures(analysis: Any, result: AuditResult, out: Path, primary: Any, tolerance: float | None, top: int,
              bound: Any) -> list[Path]:
    files = [drift_heatmap(analysis.drift, out / "drift_heatmap.png")]
    stored = analysis.drift[analysis.drift.kind != "adapter_delta"]  # a LoRA update ΔW has no stored values to draw
    names = [n for n in top_tensors(stored, min(top, 4)).tensor if n in result.histograms]
    if names:
        steps = {c.label: c.step for c in analysis.run if c.label not in set(result.errors.get("checkpoint", []))}
        files.append(histograms([result.histograms[n] for n in names], out / "histograms.png", steps, bound))
    if result.evaluation is not None and (result.evaluation.variant != "original").any():
        files.append(sweep_plot(result.evaluation, primary.name, out / "sweep.png", tolerance, primary.higher))
    return files
