"""TensorBoard event files after the fact: per tensor a histogram at each checkpoint's step, and scalars.

The histograms are the ones :class:`auditclip.histograms.HistogramCollector` counted
during the walk (bins fixed per tensor across the run, exact counts of the finite
values), written as raw histogram summaries (bucket limits and counts given, as
``SummaryWriter.add_histogram_raw`` takes them), so nothing is read twice. Wall
time is the checkpoint file's modification time, so TensorBoard's "relative" and
"wall" axes show when the trainer wrote each checkpoint.

Tags are grouped by module path, so TensorBoard's tag filter finds a module in every
section: ``weights/net.0/weight`` (histogram), ``l2_norm/net.0/weight``,
``abs_max/...``, ``rel_l2_change_vs_previous/...``, ``rel_l2_change_vs_reference/...``,
``frac_at_bound/...`` (with a bound); model-wide ``model/l2_norm``,
``model/rel_l2_change_vs_previous``, ``model/rel_l2_change_vs_reference``,
``model/frac_at_bound``; with flags ``flags/error``, ``flags/warning``, ``flags/info``
and ``flags/<rule>`` (findings per checkpoint). W&B reads the same directory
(``wandb sync DIR``).
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from ..errors import InputError
from ..histograms import TensorHistograms
from ..notices import note

#: Event files auditclip writes end with this, so a later export into the same folder
#: replaces its own earlier one instead of doubling every curve.
SUFFIX = ".auditclip"
HINT = "--tensorboard needs the tensorboard package: pip install 'auditclip[tensorboard]'"


def check_available() -> None:
    """Raise :class:`InputError` (before any long work) when tensorboard is not installed."""
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as exc:
        raise InputError(HINT) from exc


def tag_of(name: str, section: str) -> str:
    """The tag of tensor ``name`` in ``section``: the module path, then the parameter.

    >>> tag_of("net.0.weight", "weights"), tag_of("scale", "l2_norm")
    ('weights/net.0/weight', 'l2_norm/scale')
    """
    module, _, param = name.rpartition(".")
    return f"{section}/{module}/{param}" if module else f"{section}/{param}"


@dataclass
class TensorBoardExport:
    """What :func:`write_tensorboard` wrote: the event file, and each checkpoint's step and wall time."""

    path: Path
    steps: dict[str, int] = field(default_factory=dict)
    walltimes: dict[str, float] = field(default_factory=dict)
    histograms: int = 0
    scalars: int = 0
    #: the walk behind it (its ``errors`` list unreadable checkpoints), when :func:`export_tensorboard` made it
    analysis: Any = None


def _steps_and_times(run: Any, labels: list[str]) -> tuple[dict[str, int], dict[str, float]]:
    by_label = {c.label: c for c in run}
    steps: dict[str, int] = {}
    times: dict[str, float] = {}
    unknown = []
    for i, label in enumerate(labels):
        ckpt = by_label[label]
        if ckpt.step is None:
            unknown.append(label)
        steps[label] = int(ckpt.step) if ckpt.step is not None else i
        try:
            times[label] = os.stat(ckpt.weights).st_mtime
        except (OSError, TypeError, ValueError):
            times[label] = time.time()
    if unknown:
        note(f"TensorBoard: no step known for {len(unknown)} checkpoint(s) ({unknown[0]}...): "
             "their position in the run is used as the step")
    if len(set(steps.values())) < len(steps):
        note("TensorBoard: several checkpoints share a step; their points overlap on the step axis")
    return steps, times


def write_tensorboard(
    log_dir: str | os.PathLike[str],
    analysis: Any,
    histograms: dict[str, TensorHistograms],
    flags: pd.DataFrame | None = None,
) -> TensorBoardExport:
    """Write one event file into ``log_dir``: histograms and scalars per checkpoint step.

    ``analysis``: an :class:`auditclip.analysis.AnalysisResult` (its ``stats``, ``drift``
    and ``run``); ``histograms``: :meth:`auditclip.histograms.HistogramCollector.result`;
    ``flags``: ``flags.csv`` rows, for the per-checkpoint finding counts. The file is
    written beside and renamed into ``log_dir`` once complete; an earlier auditclip
    event file there is replaced.

    >>> from auditclip.analysis import analyze
    >>> from auditclip.histograms import HistogramCollector
    >>> c = HistogramCollector()
    >>> a = analyze("sample_checkpoints/high_lr", visit=c.visit)
    >>> import tempfile
    >>> out = write_tensorboard(tempfile.mkdtemp(), a, c.result())
    >>> out.histograms, out.steps["epoch_12.safetensors"]
    (72, 540)
    """
    check_available()
    from torch.utils.tensorboard import SummaryWriter

    stats = analysis.stats
    failed = set(analysis.errors.checkpoint) if len(analysis.errors) else set()
    labels = [c.label for c in analysis.run if c.label not in failed]
    steps, times = _steps_and_times(analysis.run, labels)
    out = Path(log_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"--tensorboard {out} is a file; give a directory for the event files")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".auditclip-tensorboard-", dir=out))
    export = TensorBoardExport(path=out)
    try:
        writer = SummaryWriter(log_dir=str(work), filename_suffix=SUFFIX, max_queue=1000, flush_secs=3600)
        try:
            export.histograms = _histograms(writer, stats, histograms, steps, times)
            export.scalars = _scalars(writer, stats, analysis.drift, flags, steps, times)
        finally:
            writer.close()
        written = sorted(work.glob("events.out.tfevents.*"))
        for old in out.glob(f"events.out.tfevents.*{SUFFIX}"):
            old.unlink()  # our own earlier export: TensorBoard would draw both
        for f in written:
            os.replace(f, out / f.name)
        export.path = out / written[-1].name
    except OSError as exc:
        raise InputError(f"cannot write TensorBoard files in {out}: {exc.strerror or exc}") from exc
    finally:
        shutil.rmtree(work, ignore_errors=True)
    export.steps, export.walltimes = steps, times
    return export


def _histograms(writer: Any, stats: pd.DataFrame, histograms: dict[str, TensorHistograms],
                steps: dict[str, int], times: dict[str, float]) -> int:
    moments = {(c, t): (m, l2) for c, t, m, l2 in zip(stats.checkpoint, stats.tensor, stats["mean"], stats.l2_norm)}
    n = 0
    for name, h in histograms.items():
        for label, counts in h.counts.items():
            if label not in steps or not counts.sum():
                continue
            total = int(counts.sum())
            mean, l2 = (float(v) for v in moments.get((label, name), (math.nan, math.nan)))
            writer.add_histogram_raw(
                tag_of(name, "weights"), min=h.lo[label], max=h.hi[label], num=total,
                sum=mean * total if math.isfinite(mean) else 0.0, sum_squares=l2 * l2 if math.isfinite(l2) else 0.0,
                bucket_limits=h.edges[1:].tolist(), bucket_counts=counts.tolist(),
                global_step=steps[label], walltime=times[label])
            n += 1
    return n


def _scalars(writer: Any, stats: pd.DataFrame, drift: pd.DataFrame, flags: pd.DataFrame | None,
             steps: dict[str, int], times: dict[str, float]) -> int:
    n = 0

    def add(tag: str, value: Any, label: str) -> None:
        nonlocal n
        if label in steps and value is not None and not pd.isna(value):
            writer.add_scalar(tag, float(value), global_step=steps[label], walltime=times[label])
            n += 1

    columns = [c for c in ("l2_norm", "abs_max", "frac_at_bound") if c in stats]
    for row in stats.itertuples(index=False):
        for column in columns:
            value = getattr(row, column)
            tag = f"model/{column}" if row.tensor == "__all__" else tag_of(row.tensor, column)
            add(tag, value, row.checkpoint)
    if len(drift):
        for row in drift[drift.baseline.isin(["previous", "reference"])].itertuples(index=False):
            section = f"rel_l2_change_vs_{row.baseline}"
            value = row.rel_l2_change
            if value is not None and not pd.isna(value) and math.isinf(float(value)):
                continue  # a zero baseline: TensorBoard cannot draw an infinite point
            tag = f"model/{section}" if row.tensor == "__all__" else tag_of(row.tensor, section)
            add(tag, value, row.checkpoint)
    if flags is not None:
        found = flags[flags.severity != "skipped"]
        for label in steps:
            mine = found[found.checkpoint == label]
            for severity in ("error", "warning", "info"):
                add(f"flags/{severity}", int((mine.severity == severity).sum()), label)
            for rule in sorted(set(found.rule)):
                add(f"flags/{rule}", int((mine.rule == rule).sum()), label)
    return n


def export_tensorboard(run: Any, log_dir: str | os.PathLike[str], **options: Any) -> TensorBoardExport:
    """Walk ``run`` once (:func:`auditclip.analysis.analyze`, whose options ``options`` are) and
    write its histograms and scalars into ``log_dir`` (``auditclip tensorboard RUN DIR``).

    >>> import tempfile
    >>> export = export_tensorboard("sample_checkpoints/wgan_clip", tempfile.mkdtemp(), include=["*.weight"])
    >>> export.histograms, len(export.steps)
    (36, 12)
    """
    from ..analysis import analyze
    from ..histograms import HistogramCollector, chain

    check_available()
    collector = HistogramCollector()
    options["visit"] = chain(collector.visit, options.get("visit"))
    analysis = analyze(run, **options)
    export = write_tensorboard(log_dir, analysis, collector.result([c.label for c in analysis.run]))
    export.analysis = analysis
    return export
