"""Walk a run one tensor name at a time: statistics and drift as DataFrames.

Memory follows the largest tensor, not the run: for each tensor name the
checkpoints are visited in order, and only three versions of that tensor are
alive at once (the reference, the previous checkpoint's, the current one),
each with its sorted finite values. Checkpoints stay open as lazy readers
(safetensors headers, memory-mapped pickles), which cost file pages, not RAM.

A checkpoint that cannot be read is recorded in ``errors`` and skipped; the
rest of the run is still processed.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from .checkpoints import Checkpoint, Run, natural_key, open_run
from .distances import DRIFT_METRICS, compare, cosine, rel_change
from .errors import CheckpointError, InputError
from .readers import TensorInfo, TensorReader
from .selection import name_filter
from .stats import STAT_COLUMNS, STATS_COLUMNS, TensorSummary, describe, shape_text

DRIFT_COLUMNS: tuple[str, ...] = (
    "checkpoint", "step", "tensor", "baseline", "baseline_checkpoint", "status", *DRIFT_METRICS,
)
ERROR_COLUMNS: tuple[str, ...] = ("checkpoint", "error", "message")
ALL = "__all__"
BASELINES = ("previous", "reference")

#: ``progress(done, total)`` is called after each tensor name.
Progress = Callable[[int, int], None]
#: ``visit(checkpoint_label, tensor_name, tensor, summary)``
Visitor = Callable[[str, str, torch.Tensor, TensorSummary], None]
RunLike = Run | str | os.PathLike[str] | Iterable[str | os.PathLike[str]]


@dataclass
class AnalysisResult:
    """What :func:`analyze` returns: ``stats``, ``drift`` and ``errors`` DataFrames."""

    stats: pd.DataFrame
    drift: pd.DataFrame
    errors: pd.DataFrame
    run: Run
    tensors: list[str] = field(default_factory=list)
    reference: str | None = None  # label of the checkpoint the reference rows compare with


@dataclass
class _Version:
    """One checkpoint's version of the tensor being walked."""

    info: TensorInfo
    tensor: torch.Tensor | None = None  # None for integer/bool tensors, which are not analysed
    summary: TensorSummary | None = None


@dataclass
class _NameResult:
    """What walking one tensor name produced, merged by the caller in name order."""

    stats: list[tuple[tuple[int, int, int], dict]] = field(default_factory=list)
    drift: list[tuple[tuple[int, int, int], dict]] = field(default_factory=list)
    totals: list[tuple[int, TensorSummary, int]] = field(default_factory=list)
    sums: list[tuple[int, str, dict[str, float]]] = field(default_factory=list)


class _Totals:
    """Checkpoint-wide aggregates for the ``__all__`` rows."""

    def __init__(self) -> None:
        self.numel = self.n_finite = self.n_nan = self.n_inf = self.zeros = 0
        self.mean = self.m2 = self.sumsq = 0.0
        self.lo, self.hi = math.inf, -math.inf

    def add(self, s: TensorSummary, numel: int) -> None:
        st, n = s.stats, s.n_finite
        self.numel += numel
        self.n_nan += int(st["n_nan"])
        self.n_inf += int(st["n_inf"])
        if n == 0:
            return
        self.zeros += round(st["frac_zero"] * numel)
        # Chan et al.'s pairwise update: exact combination of per-tensor mean and variance.
        total = self.n_finite + n
        delta = st["mean"] - self.mean
        self.m2 += st["std"] ** 2 * n + delta**2 * self.n_finite * n / total
        self.mean += delta * n / total
        self.n_finite = total
        self.sumsq += st["l2_norm"] ** 2
        self.lo, self.hi = min(self.lo, st["min"]), max(self.hi, st["max"])

    def row(self) -> dict[str, float]:
        out = dict.fromkeys(STAT_COLUMNS, math.nan)
        out.update(n_nan=self.n_nan, n_inf=self.n_inf)
        if self.numel:
            out["frac_zero"] = self.zeros / self.numel
        if self.n_finite:
            out.update(
                mean=self.mean, std=math.sqrt(self.m2 / self.n_finite), min=self.lo, max=self.hi,
                abs_max=max(abs(self.lo), abs(self.hi)), l2_norm=math.sqrt(self.sumsq),
                rms=math.sqrt(self.sumsq / self.n_finite),
            )
        return out


def _open_readers(
    checkpoints: Sequence[Checkpoint], key: str | None, errors: list[dict[str, str]], raise_errors: bool = False
) -> list[tuple[Checkpoint, TensorReader]]:
    readers: list[tuple[Checkpoint, TensorReader]] = []
    for ckpt in checkpoints:
        try:
            readers.append((ckpt, ckpt.open(key)))
        except CheckpointError as exc:
            if raise_errors:  # a run of one: its error is the answer, not a line in a report
                raise
            errors.append(exc.row(ckpt.label))
    return readers


def _resolve_reference(
    reference: str | os.PathLike[str] | None, readers: list[tuple[Checkpoint, TensorReader]], key: str | None
) -> tuple[int | None, Checkpoint, TensorReader]:
    """Index of the reference inside the run (None if outside), its checkpoint and reader."""
    if reference is None:
        return 0, readers[0][0], readers[0][1]
    ref_run = open_run(reference, key=key)
    if len(ref_run) != 1:
        raise InputError(f"--reference must name one checkpoint; {reference} holds {len(ref_run)}")
    ref = ref_run[0]
    for i, (ckpt, reader) in enumerate(readers):
        if ckpt.weights.resolve() == ref.weights.resolve():
            return i, ckpt, reader
    try:
        return None, ref, ref.open(key)
    except CheckpointError as exc:
        raise InputError(f"cannot read the reference checkpoint: {exc}") from exc


def analyze(
    run: RunLike,
    *,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    spectral: bool = False,
    reference: str | os.PathLike[str] | None = None,
    drift: bool = True,
    sort: str = "step",
    key: str | None = None,
    progress: Progress | None = None,
    visit: Visitor | None = None,
    workers: int | None = None,
) -> AnalysisResult:
    """Statistics of every tensor at every checkpoint, and drift between checkpoints.

    ``run``: a :class:`Run` or anything :func:`open_run` takes. ``include`` /
    ``exclude``: glob patterns on tensor names. ``spectral``: fill
    ``spectral_norm``/``stable_rank`` for tensors of 2+ dimensions.
    ``reference``: the checkpoint drift is measured against (default: the first).
    ``workers``: threads walking tensors in parallel (default: the number of
    cores); results do not depend on it.
    ``visit(label, name, tensor, summary)`` is called for every floating tensor
    version read, while it is in memory (``flag`` checks elements this way).

    >>> result = analyze("sample_checkpoints/high_lr")  # doctest: +SKIP
    >>> result.drift.query("tensor == '__all__' and baseline == 'reference'").rel_l2_change.iloc[-1]  # doctest: +SKIP
    2.87...
    """
    run = open_run(run, sort=sort, key=key)
    key = key if key is not None else run.key
    errors: list[dict[str, str]] = []
    readers = _open_readers(run.checkpoints, key, errors)
    if not readers and len(run) == 1:
        readers = _open_readers(run.checkpoints, key, [], raise_errors=True)
    if not readers:
        raise InputError(
            "no checkpoint of the run could be read: "
            + "; ".join(f"{e['checkpoint']}: {e['message']}" for e in errors)
        )
    ref_index, ref_ckpt, ref_reader = _resolve_reference(reference, readers, key) if drift else (0, None, None)
    keep = name_filter(include, exclude)
    names = sorted({n for _, r in readers for n in r.names() if keep(n)}, key=natural_key)
    if ref_reader is not None and ref_index is None:
        names = sorted(set(names) | {n for n in ref_reader.names() if keep(n)}, key=natural_key)

    stats_rows: list[tuple[tuple[int, int, int], dict]] = []
    drift_rows: list[tuple[tuple[int, int, int], dict]] = []
    totals = [_Totals() for _ in readers]
    change_sums = [{b: dict(delta_sq=0.0, base_sq=0.0, cur_sq=0.0, dot=0.0, max_abs=0.0) for b in BASELINES}
                   for _ in readers]
    failed: set[int] = set()

    def version(i: int, ckpt: Checkpoint, reader: TensorReader, name: str) -> _Version | None:
        if name not in reader:
            return None
        try:
            info = reader.info(name)
            if not info.is_float:
                return _Version(info)
            tensor = reader.get(name)
        except CheckpointError as exc:
            if i not in failed:
                failed.add(i)
                errors.append(exc.row(ckpt.label))
            return None
        summary = describe(tensor, info, spectral=spectral)
        if visit is not None:
            visit(ckpt.label, name, tensor, summary)
        return _Version(info, tensor, summary)

    def walk(item: tuple[int, str]) -> _NameResult:
        """Every checkpoint's version of one tensor; touches no shared state but ``errors``."""
        name_i, name = item
        out = _NameResult()
        ref_version = None
        if drift and ref_index is None:
            ref_version = version(-1, ref_ckpt, ref_reader, name)
        prev: _Version | None = None
        done: dict[tuple[int, int], tuple[dict | None, dict | None]] = {}
        for i, (ckpt, reader) in enumerate(readers):
            cur = version(i, ckpt, reader, name)
            if i == ref_index:
                ref_version = cur
            if cur is not None:
                out.stats.append(((i, name_i, 0), _stats_row(ckpt, name, cur)))
                if cur.summary is not None:
                    out.totals.append((i, cur.summary, cur.info.numel))
            if drift:
                if ref_version is None and ref_index is not None and ref_index > i:
                    ref_version = version(ref_index, *readers[ref_index], name)
                for b_i, (baseline, base, base_label) in enumerate((
                    ("previous", prev, readers[i - 1][0].label if i else None),
                    ("reference", ref_version, ref_ckpt.label),
                )):
                    if baseline == "previous" and i == 0:
                        continue
                    pair = (id(cur), id(base))
                    if pair in done and cur is not None and base is not None:
                        # previous and reference are the same checkpoint: measure once
                        row, sums = done[pair]
                        row = {**row, "baseline": baseline} if row is not None else None  # type: ignore[dict-item]
                    else:
                        row, sums = _drift_row(ckpt, name, baseline, base_label, cur, base)
                        done = {pair: (row, sums)}
                    if row is not None:
                        out.drift.append(((i, name_i, b_i), row))
                    if sums is not None:
                        out.sums.append((i, baseline, sums))
            prev = cur
        return out

    # Tensors are walked in parallel threads (torch and numpy release the GIL), and
    # merged here in name order, so the sums come out the same for any --workers.
    workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
    pool = ThreadPoolExecutor(max_workers=workers) if workers > 1 else None
    try:
        results = pool.map(walk, enumerate(names)) if pool else map(walk, enumerate(names))
        for done, result in enumerate(results, start=1):
            stats_rows += result.stats
            drift_rows += result.drift
            for i, summary, numel in result.totals:
                totals[i].add(summary, numel)
            for i, baseline, sums in result.sums:
                acc = change_sums[i][baseline]
                for k in ("delta_sq", "base_sq", "cur_sq", "dot"):
                    acc[k] += sums[k]
                acc["max_abs"] = math.nan if math.isnan(sums["max_abs"]) else max(acc["max_abs"], sums["max_abs"])
            if progress is not None:
                progress(done, len(names))
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)

    for i, (ckpt, _) in enumerate(readers):
        stats_rows.append(((i, len(names), 0), {**_ids(ckpt, ALL), "dtype": "", "shape": "",
                                                "numel": totals[i].numel, **totals[i].row()}))
        if drift:
            for b_i, baseline in enumerate(BASELINES):
                if baseline == "previous" and i == 0:
                    continue
                sums = change_sums[i][baseline]
                base_label = readers[i - 1][0].label if baseline == "previous" else ref_ckpt.label
                drift_rows.append(((i, len(names), b_i), {
                    **_ids(ckpt, ALL), "baseline": baseline, "baseline_checkpoint": base_label, "status": "ok",
                    **dict.fromkeys(DRIFT_METRICS, math.nan),
                    "rel_l2_change": rel_change(sums), "cosine": cosine(sums), "max_abs_change": sums["max_abs"],
                }))
    for _, reader in readers:
        reader.close()
    if ref_index is None and ref_reader is not None:
        ref_reader.close()
    order = {c.label: i for i, c in enumerate(run)}
    errors = sorted({e["checkpoint"]: e for e in errors}.values(), key=lambda e: order.get(e["checkpoint"], -1))
    return AnalysisResult(
        stats=_frame(stats_rows, STATS_COLUMNS),
        drift=_frame(drift_rows, DRIFT_COLUMNS),
        errors=pd.DataFrame(errors, columns=list(ERROR_COLUMNS)),
        run=run,
        tensors=names,
        reference=ref_ckpt.label if ref_ckpt is not None else None,
    )


def _ids(ckpt: Checkpoint, name: str) -> dict[str, object]:
    return {"checkpoint": ckpt.label, "step": ckpt.step, "tensor": name}


def _stats_row(ckpt: Checkpoint, name: str, v: _Version) -> dict[str, object]:
    row: dict[str, object] = {**_ids(ckpt, name), "dtype": v.info.dtype, "shape": shape_text(v.info.shape),
                              "numel": v.info.numel}
    row.update(v.summary.stats if v.summary is not None else dict.fromkeys(STAT_COLUMNS, math.nan))
    return row


def _drift_row(
    ckpt: Checkpoint, name: str, baseline: str, base_label: str | None, cur: _Version | None, base: _Version | None
) -> tuple[dict[str, object] | None, dict[str, float] | None]:
    cur_ok = cur is not None and cur.summary is not None
    base_ok = base is not None and base.summary is not None
    if not cur_ok and not base_ok:
        return None, None
    row: dict[str, object] = {**_ids(ckpt, name), "baseline": baseline, "baseline_checkpoint": base_label,
                              **dict.fromkeys(DRIFT_METRICS, math.nan)}
    sums = None
    if not base_ok:
        row["status"] = "added"
    elif not cur_ok:
        row["status"] = "removed"
    else:
        assert cur is not None and base is not None
        metrics, sums = compare(cur.summary, cur.tensor, base.summary, base.tensor)  # type: ignore[arg-type]
        row["status"] = "ok" if sums is not None else "shape_changed"
        row.update(metrics)
    return row, sums


def _frame(rows: list[tuple[tuple[int, int, int], dict]], columns: Sequence[str]) -> pd.DataFrame:
    rows.sort(key=lambda r: r[0])
    df = pd.DataFrame([r for _, r in rows], columns=list(columns))
    df["step"] = df["step"].astype("Int64")
    for col in ("numel", "n_nan", "n_inf"):
        if col in df:
            df[col] = df[col].astype("Int64")
    return df


def tensor_stats(run: RunLike, **options: object) -> pd.DataFrame:
    """One row per (checkpoint, tensor) with the columns of ``stats.csv``.

    Takes the options of :func:`analyze` except ``drift``.

    >>> df = tensor_stats("sample_checkpoints/high_lr")  # doctest: +SKIP
    >>> df.columns[:6].tolist()  # doctest: +SKIP
    ['checkpoint', 'step', 'tensor', 'dtype', 'shape', 'numel']
    """
    return analyze(run, drift=False, **options).stats  # type: ignore[arg-type]


def drift(run: RunLike, **options: object) -> pd.DataFrame:
    """One row per (checkpoint, tensor, baseline) with the columns of ``drift.csv``.

    >>> df = drift("sample_checkpoints/high_lr")  # doctest: +SKIP
    >>> df[df.baseline == "reference"].nlargest(3, "rel_l2_change").tensor.tolist()  # doctest: +SKIP
    ['net.4.weight', '__all__', 'net.2.weight']
    """
    return analyze(run, **options).drift  # type: ignore[arg-type]


def inspect_checkpoint(path: str | os.PathLike[str] | Checkpoint, **options: object) -> pd.DataFrame:
    """Statistics of every tensor of one checkpoint (the ``stats.csv`` columns).

    >>> inspect_checkpoint("sample_checkpoints/high_lr/epoch_01.safetensors").tensor.tolist()[:2]  # doctest: +SKIP
    ['net.0.bias', 'net.0.weight']
    """
    if isinstance(path, Checkpoint):
        run = Run([path], root=Path(path.path).parent)
    else:
        run = open_run(path, key=options.pop("key", None))  # type: ignore[arg-type]
        if len(run) != 1:
            raise InputError(f"inspect takes one checkpoint; {path} holds {len(run)} (use `auditclip drift` for a run)")
    result = analyze(run, drift=False, **options)  # type: ignore[arg-type]
    if len(result.errors):
        raise CheckpointError(run[0].path, str(result.errors.message.iloc[0]), kind=str(result.errors.error.iloc[0]))
    return result.stats
