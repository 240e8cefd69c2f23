"""One command for the whole job: stats, drift, flags, evaluation, summary, pictures."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from .analysis import RunLike
from .config import ClipSpec, FlagSettings, flag_settings
from .errors import InputError
from .evaluation import EvalOptions, evaluate_rows, clip_variants, recommend
from .flags import FlagResult, flag, summary_table
from .notices import collect
from .output import atomic_path, prepare_out_dir, write_csv
from .plots import PLOT_HINT, drift_heatmap, have_matplotlib, histograms, sweep_plot


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

    @property
    def failed(self) -> bool:
        return self.flags.failed or len(self.errors) > 0


def _tightness(spec_text: str) -> float:
    """Smaller is tighter: the range's width, or the spec's number (max_abs, percentile, sigma)."""
    spec = ClipSpec.parse(spec_text)
    if spec.kind == "range":
        return float(spec.b) - float(spec.a)  # type: ignore[arg-type]
    return float(spec.a)  # type: ignore[arg-type]


def md_table(df: pd.DataFrame, floatfmt: str = "{:.4g}") -> str:
    """A GitHub-flavoured markdown table (no extra dependency).

    >>> print(md_table(pd.DataFrame({"a": [1.0], "b": ["x"]})))
    | a | b |
    | --- | --- |
    | 1 | x |
    """
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "" if math.isnan(v) else floatfmt.format(v)
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "| " + " | ".join("---" for _ in df.columns) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


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
    scheduler: str | None = None,
) -> AuditResult:
    """Audit a run end to end and write every report into ``out``.

    Writes ``stats.csv``, ``drift.csv``, ``flags.csv``, with ``model`` and ``data``
    ``evaluation.csv``, and ``summary.md``; with matplotlib ``drift_heatmap.png``,
    ``histograms.png`` and (with ``clips``) ``sweep.png``. The clipped variants take
    their tensor selection from ``eval_options`` (include/exclude/overrides/config/buffers),
    as ``clip`` would. Every note said during the audit (:mod:`auditclip.notices`) and the
    run's own notes are in summary.md under "Notes". ``scheduler``: a Dask cluster walks the
    run's statistics pass (see :func:`auditclip.analysis.analyze`).

    >>> result = audit("sample_checkpoints/high_lr", "report/", model="sample_checkpoints/digits_mlp.py:make_model",
    ...                data="sample_checkpoints/digits_test.safetensors", clips=["max_abs=1.5"])  # doctest: +SKIP
    """
    if (model is None) != (data is None):
        raise InputError("--model and --data go together: give both to evaluate, or neither")
    if clips and model is None:
        raise InputError("--clip needs --model and --data to evaluate the clipped variants")
    with collect() as said:
        result = _audit(run, out, model, data, clips, settings, eval_options, tolerance, reference, sort, key, top,
                        progress, scheduler)
        result.notes = _unique([*said, *getattr(result.flags.analysis.run, "notes", []), *result.notes])
    result.files.append(_write_summary(result, result.flags.analysis, tolerance, top, result.out))
    return result


def _unique(notes: list[Any]) -> list[str]:
    return list(dict.fromkeys(str(n) for n in notes))


def _audit(run: RunLike, out: str | os.PathLike[str], model: str | None, data: str | None, clips: Any,
           settings: FlagSettings | None, eval_options: EvalOptions | None, tolerance: float | None,
           reference: Any, sort: str, key: str | None, top: int, progress: Any,
           scheduler: str | None = None) -> AuditResult:
    settings = settings or flag_settings(search=False)
    # without options of their own, the clipped variants take the rules' tensor selection
    options = eval_options or EvalOptions(sort=sort, key=key, include=settings.include, exclude=settings.exclude,
                                          buffers=settings.buffers)
    variants = clip_variants(list(clips), options)  # parse before the long work, so a bad spec fails fast
    out_dir = prepare_out_dir(out)
    flagged = flag(run, settings, reference=reference, sort=sort, key=key, progress=progress, scheduler=scheduler)
    analysis = flagged.analysis
    result = AuditResult(out=out_dir, flags=flagged)
    for name, df in (("stats.csv", analysis.stats), ("drift.csv", analysis.drift), ("flags.csv", flagged.flags)):
        result.files.append(write_csv(df, out_dir / name))
    errors = [analysis.errors]
    primary = None
    if model is not None:
        evaluation, eval_errors, primary, _ = evaluate_rows(analysis.run, model, data, variants, options)  # type: ignore[arg-type]
        order = sorted((v for v, _ in variants), key=_tightness)
        evaluation["recommended"] = recommend(evaluation, primary, tolerance, order)
        result.evaluation = evaluation
        result.decided_by = primary.describe(tolerance)
        result.files.append(write_csv(evaluation, out_dir / "evaluation.csv"))
        errors.append(eval_errors)
        last = evaluation[evaluation.checkpoint == evaluation.checkpoint.iloc[-1]]
        chosen = last[last.recommended]
        if clips:
            result.recommendation = (
                f"{chosen.variant.iloc[0]} for {chosen.checkpoint.iloc[0]}" if len(chosen)
                else f"none: no tested clip both changes weights and stays within tolerance on "
                     f"{last.checkpoint.iloc[0]}")
    result.errors = pd.concat([e for e in errors if len(e)] or [errors[0]]).drop_duplicates("checkpoint")
    if len(result.errors):
        result.files.append(write_csv(result.errors, out_dir / "errors.csv"))
    if have_matplotlib():
        result.files += _pictures(analysis, result, out_dir, key, primary.name if primary else "accuracy", top)
    else:
        result.notes.append(PLOT_HINT)
    return result


def _top_tensors(drift: pd.DataFrame, n: int) -> pd.DataFrame:
    ref = drift[(drift.baseline == "reference") & (drift.tensor != "__all__")]
    if ref.empty:
        return ref
    last = ref[ref.checkpoint == ref.checkpoint.iloc[-1]]
    return last.sort_values("rel_l2_change", ascending=False, na_position="last").head(n)


def _pictures(analysis: Any, result: AuditResult, out: Path, key: str | None, metric: str, top: int) -> list[Path]:
    files = [drift_heatmap(analysis.drift, out / "drift_heatmap.png")]
    stored = analysis.drift[analysis.drift.kind != "adapter_delta"]  # a LoRA update ΔW has no stored values to draw
    top_names = _top_tensors(stored, min(top, 4)).tensor.tolist()
    if top_names:
        files.append(histograms(analysis.run, top_names, out / "histograms.png", key))
    if result.evaluation is not None and (result.evaluation.variant != "original").any():
        files.append(sweep_plot(result.evaluation, metric, out / "sweep.png"))
    return files


def _write_summary(result: AuditResult, analysis: Any, tolerance: float | None, top: int, out: Path) -> Path:
    run = analysis.run
    readable = [c for c in run if c.label not in set(result.errors.get("checkpoint", pd.Series(dtype=str)))]
    steps = [c.step for c in readable if c.step is not None]
    lines = [
        "# auditclip audit", "",
        f"- run: `{run.root}`, {len(readable)} checkpoint(s) read"
        + (f", steps {min(steps)}..{max(steps)}" if steps else "")
        + f", {len(analysis.tensors)} tensor(s)",
        f"- formats: {', '.join(sorted({c.format for c in readable}))}",
        f"- drift reference: `{analysis.reference}`",
    ]
    if len(result.errors):
        lines.append(f"- unreadable, skipped: {', '.join(f'`{c}`' for c in result.errors.checkpoint)} (see errors.csv)")
    lines += ["", f"## Top drifting tensors (by the last checkpoint, vs `{analysis.reference}`)", ""]
    top_df = _top_tensors(analysis.drift, top)
    lines.append(md_table(top_df[["tensor", "status", "rel_l2_change", "cosine", "max_abs_change", "ks", "wasserstein"]])
                 if len(top_df) else "No drift: the run has one checkpoint.")
    flags = result.flags.flags
    counts = flags.severity.value_counts()
    lines += ["", "## Flags", "",
              ", ".join(f"{counts.get(s, 0)} {s}" for s in ("error", "warning", "info"))
              + f" (fail on: {result.flags.fail_on}; {'FAILED' if result.flags.failed else 'passed'})", ""]
    if len(flags):
        lines.append(md_table(summary_table(flags).head(30)))
    if result.evaluation is not None:
        ev = result.evaluation
        metric = str(ev.primary_metric.iloc[0])
        lines += ["", "## Evaluation", "", f"Primary metric (decides the recommendation): {result.decided_by}", ""]
        lines.append(md_table(ev.drop(columns=[c for c in ev.columns if c.startswith("delta_") and c != f"delta_{metric}"])))
        if result.recommendation:
            lines += ["", "## Recommendation", "", f"Tightest clip that keeps {metric}: **{result.recommendation}**."]
    lines += ["", "## Files", ""] + [f"- `{p.name}`" for p in result.files] + ["- `summary.md`"]
    if result.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in result.notes]
    path = out / "summary.md"
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
