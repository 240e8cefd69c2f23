"""Walk a run one tensor name at a time: statistics and drift as DataFrames.

Memory follows the largest tensor, not the run: for each tensor name the
checkpoints are visited in order, and only three versions of that tensor are
alive at once (the reference, the previous checkpoint's, the current one),
each with its sorted finite values. Checkpoints stay open as lazy readers
(a parsed header and an open file), which read each tensor only when asked.

Tiny tensors (up to :data:`auditclip.stats.TINY_MAX` elements in every checkpoint,
the bulk of a mixture-of-experts model) are walked a chunk of names at a time,
checkpoint by checkpoint, and described and compared in stacks: three versions of
at most :data:`CHUNK_NAMES` of them are alive (a few MB), and every value is the
one the name-by-name walk gives, bit for bit.

A checkpoint that cannot be read is recorded in ``errors`` and skipped; the
rest of the run is still processed.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from operator import itemgetter
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .adapters import DeltaVersion, compare_deltas, read_delta
from .checkpoints import Checkpoint, Run, natural_key, open_run
from .distances import DRIFT_METRICS, compare_values, cosine, rel_change
from .errors import CheckpointError, InputError
from .formats.peft import AdapterIndex, adapter_index_for
from .notices import note
from .formats.readers import TensorInfo, TensorReader, is_float_dtype
from .selection import name_filter
from .fused import DTYPES as FUSED_DTYPES, bound_heap, stats_device
from .stats import STAT_COLUMNS, STATS_COLUMNS, TINY_MAX, TensorSummary, count_at_bound, describe, describe_many, shape_text

DRIFT_COLUMNS: tuple[str, ...] = (
    "checkpoint", "step", "tensor", "kind", "baseline", "baseline_checkpoint", "status", *DRIFT_METRICS,
)
ERROR_COLUMNS: tuple[str, ...] = ("checkpoint", "error", "message")
ALL = "__all__"
BASELINES = ("previous", "reference")

#: ``progress(done, total)`` is called after each chunk of tensor names (``done`` of ``total`` walked).
Progress = Callable[[int, int], None]
#: ``visit(checkpoint_label, tensor_name, tensor, summary)``
Visitor = Callable[[str, str, torch.Tensor, TensorSummary], None]
#: ``bounds(tensor_name)``: the tensor's ``(lo, hi)`` clip bound, or None (see ``frac_at_bound``)
Bounds = Callable[[str], "tuple[float, float] | None"]
#: The ``stats.csv`` column added when a bound is given (:func:`analyze`'s ``bounds``).
FRAC_AT_BOUND = "frac_at_bound"
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


class _Version:
    """One checkpoint's version of the tensor being walked."""

    __slots__ = ("info", "tensor", "summary", "numel", "dev")

    def __init__(self, info: TensorInfo, tensor: torch.Tensor | None = None) -> None:
        self.info = info
        self.tensor = tensor  # None for integer/bool tensors, which are not analysed
        self.summary: TensorSummary | None = None
        self.numel = info.numel
        self.dev: torch.Tensor | None = None  # the tensor on --device, moved there once (None: on the CPU)


class _Totals:
    """Checkpoint-wide aggregates for the ``__all__`` rows."""

    def __init__(self) -> None:
        self.numel = self.n_finite = self.n_nan = self.n_inf = self.zeros = 0
        self.mean = self.m2 = self.sumsq = 0.0
        self.lo, self.hi = math.inf, -math.inf

    def add(self, st: dict[str, float], n: int, numel: int) -> None:
        """Fold in one tensor: its statistics, finite count and element count."""
        self.add_many([(st, n, numel)])

    def add_many(self, entries: list[tuple[dict[str, float], int, int]]) -> None:
        """:meth:`add` of each ``(stats, n_finite, numel)`` in order, with the state in local variables.

        Chan et al.'s pairwise update: exact combination of per-tensor mean and variance.
        """
        numel_t, n_finite_t, n_nan, n_inf, zeros = self.numel, self.n_finite, self.n_nan, self.n_inf, self.zeros
        mean, m2, sumsq, lo, hi = self.mean, self.m2, self.sumsq, self.lo, self.hi
        for st, n, numel in entries:
            numel_t += numel
            n_nan += int(st["n_nan"])
            n_inf += int(st["n_inf"])
            if n == 0:
                continue
            zeros += round(st["frac_zero"] * numel)
            total = n_finite_t + n
            delta = st["mean"] - mean
            m2 += st["std"] ** 2 * n + delta**2 * n_finite_t * n / total
            mean += delta * n / total
            n_finite_t = total
            sumsq += st["l2_norm"] ** 2
            lo, hi = min(lo, st["min"]), max(hi, st["max"])
        self.numel, self.n_finite, self.n_nan, self.n_inf, self.zeros = numel_t, n_finite_t, n_nan, n_inf, zeros
        self.mean, self.m2, self.sumsq, self.lo, self.hi = mean, m2, sumsq, lo, hi

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


def _accumulate(acc: dict[str, float], found: list[tuple[float, ...]]) -> None:
    """Add element-wise sums ``(delta_sq, base_sq, cur_sq, dot, max_abs)`` to ``acc`` one after
    another, in order (``np.add.accumulate`` is that loop). The maximum is NaN once any NaN came by."""
    table = np.array(found, dtype=np.float64).reshape(len(found), 5)
    for j, k in enumerate(("delta_sq", "base_sq", "cur_sq", "dot")):
        acc[k] = float(np.add.accumulate(np.concatenate(([acc[k]], table[:, j])))[-1])
    top = np.concatenate(([acc["max_abs"]], table[:, 4]))
    acc["max_abs"] = math.nan if np.isnan(top).any() else float(top.max())


def _open_readers(
    checkpoints: Sequence[Checkpoint], key: str | None, errors: list[dict[str, str]], raise_errors: bool = False,
    adapters: dict[str, AdapterIndex] | None = None,
) -> list[tuple[Checkpoint, TensorReader]]:
    """Open each checkpoint; ``adapters`` receives the index of each that is a PEFT adapter folder
    (a folder whose adapter config cannot be read is unreadable as a whole: its factors mean nothing alone)."""
    readers: list[tuple[Checkpoint, TensorReader]] = []
    for ckpt in checkpoints:
        try:
            reader = ckpt.open(key)
        except CheckpointError as exc:
            if raise_errors:  # a run of one: its error is the answer, not a line in a report
                raise
            errors.append(exc.row(ckpt.label))
            continue
        try:
            index = adapter_index_for(ckpt.weights)
        except CheckpointError as exc:
            reader.close()
            if raise_errors:
                raise
            errors.append(exc.row(ckpt.label))
            continue
        if index is not None and adapters is not None:
            adapters[ckpt.label] = index
        readers.append((ckpt, reader))
    return readers


def _resolve_reference(
    reference: str | os.PathLike[str] | Checkpoint | None, readers: list[tuple[Checkpoint, TensorReader]], key: str | None
) -> tuple[int | None, Checkpoint, TensorReader]:
    """Index of the reference inside the run (None if outside), its checkpoint and reader."""
    if reference is None:
        return 0, readers[0][0], readers[0][1]
    ref_run = [reference] if isinstance(reference, Checkpoint) else open_run(reference, key=key)
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
    bounds: Bounds | None = None,
    device: str | None = None,
    scheduler: str | None = None,
    _block: Block | None = None,
) -> AnalysisResult:
    """Statistics of every tensor at every checkpoint, and drift between checkpoints.

    ``run``: a :class:`Run` or anything :func:`open_run` takes. ``include`` /
    ``exclude``: glob patterns on tensor names. ``spectral``: fill
    ``spectral_norm``/``stable_rank`` for tensors of 2+ dimensions.
    ``reference``: the checkpoint drift is measured against (default: the first).
    ``workers``: threads walking tensors in parallel (default: the number of
    cores); results do not depend on it.
    ``device``: where the one pass over each large tensor runs (:mod:`auditclip.fused`):
    ``cpu`` (default; ``auto`` too) or ``cuda`` (each version moved to the GPU once; an
    :class:`InputError` when there is none); the numbers agree within the documented bounds.
    ``scheduler``: walk the tensors as tasks of a Dask cluster instead of threads:
    ``tcp://HOST:PORT`` (a running ``dask.distributed`` scheduler), ``local`` or
    ``local:N`` (a local cluster of N processes for this call); needs ``auditclip[dask]``
    (:mod:`auditclip.walk_dask`). The frames are the same, bit for bit.
    ``visit(label, name, tensor, summary)`` is called for every floating tensor
    version read, while it is in memory (``flag`` checks elements this way).
    ``bounds(name)``: the tensor's clip bound ``(lo, hi)`` or None; when given, ``stats``
    gains ``frac_at_bound``, the fraction of elements within one ulp of the tensor's dtype
    of either end (:func:`auditclip.stats.count_at_bound`), NaN where a tensor has no bound;
    the ``__all__`` row pools the tensors that have one.

    The sample run whose learning rate jumps 8x after epoch 8: by the last epoch the
    whole model has moved four times its initial norm away from epoch 1.

    >>> result = analyze("sample_checkpoints/high_lr")
    >>> whole = result.drift.query("tensor == '__all__' and baseline == 'reference'")
    >>> round(float(whole.rel_l2_change.iloc[-1]), 2)
    4.01
    """
    on = stats_device(device)  # a GPU asked for and absent is an error before anything is read
    bound_heap()  # memory follows the live tensors (see auditclip.fused.bound_heap)
    run = open_run(run, sort=sort, key=key)
    key = key if key is not None else run.key
    errors: list[dict[str, str]] = []
    adapters: dict[str, AdapterIndex] = {}  # label -> index, for the checkpoints that are PEFT adapter folders
    readers = _open_readers(run.checkpoints, key, errors, adapters=adapters)
    if _block is not None and not readers:  # a task of a scheduler whose checkpoints all failed to open
        return _block.rows(_Part(0), [], errors, [])  # type: ignore[return-value]
    if not readers and len(run) == 1:
        readers = _open_readers(run.checkpoints, key, [], raise_errors=True)
    if not readers:
        raise InputError(
            "no checkpoint of the run could be read: "
            + "; ".join(f"{e['checkpoint']}: {e['message']}" for e in errors)
        )
    if _block is not None:
        reference = _block.reference
    ref_index, ref_ckpt, ref_reader = _resolve_reference(reference, readers, key) if drift else (0, None, None)
    ref_adapter = adapters.get(ref_ckpt.label) if ref_ckpt is not None and ref_index is not None else None
    if ref_ckpt is not None and ref_index is None:
        try:
            ref_adapter = adapter_index_for(ref_ckpt.weights)
        except CheckpointError as exc:
            raise InputError(f"cannot read the reference checkpoint: {exc}") from exc
    keep = name_filter(include, exclude) if include or exclude else None
    if _block is not None:  # a task of a scheduler walks the names it is given
        names = list(_block.names)
    else:
        found = {n for _, r in readers for n in r.names()}
        if ref_reader is not None and ref_index is None:
            found.update(ref_reader.names())
        names = _natural_sorted(found if keep is None else {n for n in found if keep(n)})
        del found

    totals = [_Totals() for _ in readers]
    change_sums = [{b: dict(delta_sq=0.0, base_sq=0.0, cur_sq=0.0, dot=0.0, max_abs=0.0) for b in BASELINES}
                   for _ in readers]
    n_rows = len(names) + 1  # most rows one checkpoint can have: one per name, and __all__
    stats_store = _Store([n_rows] * len(readers), len(STAT_COLUMNS))
    drift_store = _Store([(2 * n_rows if i else n_rows) if drift else 0 for i in range(len(readers))],
                         len(DRIFT_METRICS))
    stats_tables = [_StatsTable(stats_store, i) for i in range(len(readers))]
    drift_tables = [_DriftTable(drift_store, i) for i in range(len(readers))]
    failed: set[int] = set()
    is_float = _is_float_dtype
    at_bound: list[dict[str, int]] = [{} for _ in readers]  # per checkpoint: name -> elements at the bound

    def count_bound(i: int, name: str, tensor: torch.Tensor) -> None:
        bound = bounds(name) if bounds is not None and i >= 0 else None
        if bound is not None:
            at_bound[i][name] = count_at_bound(tensor, *bound)

    def record(i: int, ckpt: Checkpoint, exc: CheckpointError) -> None:
        if i not in failed:
            failed.add(i)
            errors.append(exc.row(ckpt.label))

    def read(i: int, ckpt: Checkpoint, reader: TensorReader, name: str, info: _Probe) -> _Version | None:
        """One version, not yet described: None when absent or unreadable, no tensor when not floating."""
        if info is None:
            return None
        try:
            if isinstance(info, CheckpointError):
                raise info
            if not is_float(info.dtype):
                return _Version(info)
            tensor = reader.get(name)
            if tensor.dtype == torch.float64:
                _check_float64_range(tensor, ckpt, name)
            return _Version(info, tensor)
        except CheckpointError as exc:
            record(i, ckpt, exc)
            return None

    def version(i: int, ckpt: Checkpoint, reader: TensorReader, name: str, info: _Probe,
                against: tuple[_Version | None, ...] = ()) -> _Version | None:
        """One version, described; its one pass also measures the element-wise sums against ``against``."""
        v = read(i, ckpt, reader, name, info)
        if v is not None and v.tensor is not None:
            t = v.tensor
            if on is not None and v.numel > TINY_MAX and t.dtype in FUSED_DTYPES:
                v.dev = t = t.to(on)
            bases = [(b.summary, b.dev if b.dev is not None else b.tensor) for b in dict.fromkeys(against)
                     if b is not None and b.summary is not None and b.tensor is not None and b is not v]
            v.summary = describe(t, v.info, spectral=spectral, against=bases, threads=fused_threads(v.numel))
            count_bound(i, name, v.tensor)
            if visit is not None:
                visit(ckpt.label, name, v.tensor, v.summary)
        return v

    def versions(i: int, ckpt: Checkpoint, reader: TensorReader, run: list[str], infos: list[_Probe]) -> list[_Version | None]:
        """:func:`version` of many tiny tensors: read one by one, described together."""
        found = [read(i, ckpt, reader, name, info) for name, info in zip(run, infos)]
        todo = [(name, v) for name, v in zip(run, found) if v is not None and v.tensor is not None]
        if todo:
            summaries = describe_many([v.tensor for _, v in todo], [v.info for _, v in todo], spectral=spectral)
            for (name, v), summary in zip(todo, summaries):
                v.summary = summary
                count_bound(i, name, v.tensor)  # type: ignore[arg-type]
                if visit is not None:
                    visit(ckpt.label, name, v.tensor, summary)  # type: ignore[arg-type]
        return found

    def walk(name: str, infos: list[_Probe], ext: _Probe, out: _Part) -> None:
        """Every checkpoint's version of one tensor; touches no shared state but ``errors``.

        A tensor of :data:`BIG_TENSOR` elements or more is walked by one worker at a time
        (its pass uses every worker's thread), so at most three versions of the largest
        tensor are alive, whatever ``workers``.
        """
        sizes = [p.numel for p in (ext, *infos) if isinstance(p, TensorInfo)]
        if workers > 1 and max(sizes, default=0) >= BIG_TENSOR:
            with big:
                _walk(name, infos, ext, out)
        else:
            _walk(name, infos, ext, out)

    def _walk(name: str, infos: list[_Probe], ext: _Probe, out: _Part) -> None:
        ref_version = None
        if drift and ref_index is None:
            ref_version = version(-1, ref_ckpt, ref_reader, name, ext)
        prev: _Version | None = None
        done: dict[tuple[int, int], tuple[tuple | None, dict | None]] = {}
        for i, (ckpt, reader) in enumerate(readers):
            cur = version(i, ckpt, reader, name, infos[i], (prev, ref_version) if drift else ())
            if i == ref_index:
                ref_version = cur
            if cur is not None:
                out.stats[i].add(name, cur)
                if cur.summary is not None:
                    out.totals[i].append((cur.summary.stats, cur.summary.n_finite, cur.numel))
            if drift:
                if ref_version is None and ref_index is not None and ref_index > i:
                    ref_version = version(ref_index, *readers[ref_index], name, infos[ref_index])
                for baseline, base, base_label in (
                    ("previous", prev, labels[i - 1] if i else None),
                    ("reference", ref_version, ref_label),
                ):
                    if baseline == "previous" and i == 0:
                        continue
                    pair = (id(cur), id(base))
                    if pair in done and cur is not None and base is not None:
                        # previous and reference are the same checkpoint: measure once
                        row, sums = done[pair]
                    else:
                        status = _drift_status(cur, base)
                        if status == "compare":
                            row, sums = _drift_row(*compare_values([(cur.summary, cur.tensor, base.summary, base.tensor)])[0])  # type: ignore[union-attr, list-item]
                        else:
                            row, sums = (None if status is None else (status, *_NO_DRIFT)), None
                        done = {pair: (row, sums)}
                    if row is not None:
                        out.drift[i].add(name, baseline, base_label, row)
                    if sums is not None:
                        out.sums[i][baseline].append(sums)
            prev = cur

    def walk_tiny(run: list[str], infos: list[list[_Probe]], ext: list[_Probe], out: _Part) -> None:
        """:func:`walk` of consecutive names whose every version is tiny, checkpoint by checkpoint.

        Up to three versions of each of these names are alive at once (reference,
        previous, current): a few MB at most, for :data:`CHUNK_NAMES` names of up to
        :data:`TINY_MAX` elements. Rows come out in the same order as from :func:`walk`.
        """
        m = len(run)
        refs: list[_Version | None] = [None] * m
        if drift and ref_index is None:
            refs = versions(-1, ref_ckpt, ref_reader, run, ext)
        prevs: list[_Version | None] = [None] * m
        for i, (ckpt, reader) in enumerate(readers):
            curs = versions(i, ckpt, reader, run, infos[i])
            if i == ref_index:
                refs = list(curs)
            out.stats[i].add_many(run, curs)
            out.totals[i].extend([(cur.summary.stats, cur.summary.n_finite, cur.numel)
                                  for cur in curs if cur is not None and cur.summary is not None])
            if not drift:
                prevs = curs
                continue
            if ref_index is not None and ref_index > i:
                need = [j for j in range(m) if refs[j] is None]
                if need:
                    got = versions(ref_index, *readers[ref_index], [run[j] for j in need],
                                   [infos[ref_index][j] for j in need])
                    for j, v in zip(need, got):
                        refs[j] = v
            # what each drift row needs, in walk() order: a status, a comparison, or the row before it again
            plan: list[tuple[int, str, str | None, object]] = []
            jobs: list[tuple] = []
            for j in range(m):
                cur = curs[j]
                for baseline, base, base_label in (
                    ("previous", prevs[j], labels[i - 1] if i else None),
                    ("reference", refs[j], ref_label),
                ):
                    if baseline == "previous" and i == 0:
                        continue
                    if baseline == "reference" and i and cur is not None and base is not None and base is prevs[j]:
                        plan.append((j, baseline, base_label, plan[-1][3]))  # measured once, as in walk()
                        continue
                    status = _drift_status(cur, base)
                    if status == "compare":
                        jobs.append((cur.summary, cur.tensor, base.summary, base.tensor))  # type: ignore[union-attr]
                        plan.append((j, baseline, base_label, len(jobs) - 1))
                    else:
                        plan.append((j, baseline, base_label, status))
            results = [_drift_row(*r) for r in compare_values(jobs)] if jobs else []
            jobs.clear()  # let the versions before the previous one go before the next checkpoint is read
            tensor, base_column, base_ckpt, status = out.drift[i].text
            values, sums_out = out.drift[i].values, out.sums[i]
            for j, baseline, base_label, what in plan:
                if isinstance(what, int):
                    row, sums = results[what]
                    if sums is not None:
                        sums_out[baseline].append(sums)
                elif what is None:
                    continue
                else:
                    row = (what, *_NO_DRIFT)
                tensor.append(run[j])  # _DriftTable.add, inlined
                base_column.append(baseline)
                base_ckpt.append(base_label)
                status.append(row[0])
                values.append(row[1:])
            prevs = curs

    def probe(reader: TensorReader | None, name: str) -> _Probe:
        if reader is None or name not in reader:
            return None
        try:
            return reader.info(name)
        except CheckpointError as exc:
            return exc

    def probe_chunk(chunk: range) -> tuple[list[str], list[list[_Probe]], list[_Probe], list[bool]]:
        """The names of a chunk, every version's header, and which names are tiny in every version."""
        run = [names[k] for k in chunk]
        infos = [[probe(reader, name) for name in run] for _, reader in readers]
        ext = [probe(ref_reader, name) if drift and ref_index is None else None for name in run]
        tiny = [all(_is_tiny(p) for p in (ext[j], *(column[j] for column in infos))) for j in range(len(run))]
        return run, infos, ext, tiny

    def walk_chunk(probed: tuple[list[str], list[list[_Probe]], list[_Probe], list[bool]]) -> _Part:
        run, infos, ext, tiny = probed
        out = _Part(len(readers))
        start = 0
        while start < len(run):  # consecutive names of one kind, in name order
            end = start + 1
            while end < len(run) and tiny[end] == tiny[start]:
                end += 1
            if tiny[start] and end - start > 1:
                with python_lock:
                    walk_tiny(run[start:end], [column[start:end] for column in infos], ext[start:end], out)
            else:
                for j in range(start, end):
                    walk(run[j], [column[j] for column in infos], ext[j], out)
            start = end
        out.count = len(run)
        return out

    def merge(part: _Part) -> None:
        nonlocal done_names
        for i in range(len(readers)):
            stats_tables[i].extend(part.stats[i])
            drift_tables[i].extend(part.drift[i])
            totals[i].add_many(part.totals[i])
            for baseline, found in part.sums[i].items():
                if found:
                    _accumulate(change_sums[i][baseline], found)
        done_names += part.count
        if progress is not None:
            progress(done_names, len(names))

    labels = [ckpt.label for ckpt, _ in readers]
    ref_label = ref_ckpt.label if ref_ckpt is not None else None
    # Chunks holding a tensor above TINY_MAX are walked in parallel threads (torch and numpy
    # release the GIL on large arrays); chunks of tiny tensors only, nearly all Python work,
    # are walked here: two threads doing that at once only trade the GIL back and forth
    # (30-50% slower), so one thread at a time does it (``python_lock``). Parts are merged
    # in name order, so the sums come out the same for any --workers.
    workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
    if _block is not None or scheduler is not None:
        workers = 1  # the cluster's tasks are the parallelism

    def fused_threads(numel: int) -> int:
        # a large tensor's pass is shared by every worker's core, one such tensor at a time
        # (see ``big``): its three versions, not each worker's three, bound the memory
        return workers if numel >= BIG_TENSOR else 1
    chunks = _name_chunks(len(names), workers)
    # torch's thread count is per OS thread (OpenMP): the walker threads are set to one, as the
    # main thread is below, or their sums would differ in the last bit from --workers 1 and Dask's
    pool = ThreadPoolExecutor(max_workers=workers, initializer=torch.set_num_threads,
                              initargs=(1 if on is None else torch.get_num_threads(),)) \
        if workers > 1 and len(chunks) > 1 else None
    python_lock: threading.Lock | contextlib.nullcontext = threading.Lock() if pool else contextlib.nullcontext()
    big = threading.Lock()
    pending: deque[Future[_Part]] = deque()
    done_names = 0
    # The walk's parallelism is its own (workers, and the threads sharing a large tensor's pass):
    # torch's intra-op threads on top of it only wait for each other. On a busy 2-core machine a
    # float64 torch.dot of 6,000 elements took 4-16 ms through MKL's threads against 4 us in one
    # thread. The setting is restored when the walk ends.
    torch_threads = torch.get_num_threads()
    if on is None:
        torch.set_num_threads(1)
    if _block is not None:  # one task of a scheduler: its rows, for the client to merge
        try:  # one thread, as the threaded walk below runs: the same sums, bit for bit
            rows = _block.rows(walk_chunk(probe_chunk(range(len(names)))), labels, errors, at_bound)
        finally:
            torch.set_num_threads(torch_threads)
        for _, reader in readers:
            reader.close()
        if ref_index is None and ref_reader is not None:
            ref_reader.close()
        return rows  # type: ignore[return-value]
    if scheduler is not None:  # tasks of a Dask cluster walk the names (auditclip.walk_dask), merged in order
        from .walk_dask import walk_parts

        job = Block([c for c, _ in readers], names, ref_ckpt, key=key, drift=drift, spectral=spectral,
                    bounds=bounds, visit=visit)
        chunks = []
        for found_rows in walk_parts(scheduler, job):
            merge(found_rows.part)
            found_rows.add_to(errors, at_bound, visit)
    try:
        for chunk in chunks:
            with python_lock:
                probed = probe_chunk(chunk)
            if pool is not None and not all(probed[3]):
                pending.append(pool.submit(walk_chunk, probed))
            else:
                ready: Future[_Part] = Future()
                ready.set_result(walk_chunk(probed))
                pending.append(ready)
            while pending and (pending[0].done() or len(pending) > 2 * workers):
                merge(pending.popleft().result())
        while pending:
            merge(pending.popleft().result())
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        torch.set_num_threads(torch_threads)

    for i, (ckpt, _) in enumerate(readers):
        stats_tables[i].add_all(totals[i])
        if drift:
            for baseline in BASELINES:
                if baseline == "previous" and i == 0:
                    continue
                sums = change_sums[i][baseline]
                base_label = labels[i - 1] if baseline == "previous" else ref_label
                drift_tables[i].add(ALL, baseline, base_label, (
                    "ok", rel_change(sums), cosine(sums), sums["max_abs"], *(math.nan,) * (len(DRIFT_METRICS) - 3)))
    delta_rows: tuple[list[dict], list[dict]] = ([], [])
    if adapters or ref_adapter is not None:  # each adapted module's update ΔW, beside its factors
        delta_rows = _delta_rows(readers, [adapters.get(c.label) for c, _ in readers], keep, drift, ref_index,
                                 (ref_ckpt, ref_reader, ref_adapter), record)
    format_kinds: dict[str, tuple[str, str]] = {}  # what the format records (DeepSpeed's buffer_names)
    for pair in readers:
        format_kinds.update(pair[1].format_kind_rules())
        pair[1].close()
    if ref_index is None and ref_reader is not None:
        format_kinds = {**ref_reader.format_kind_rules(), **format_kinds}
        ref_reader.close()
    ckpts = [ckpt for ckpt, _ in readers]
    del pair
    readers.clear()  # a header of 100,000 entries is 100 MB: let it go before the tables are built
    ref_reader = None
    order = {c.label: i for i, c in enumerate(run)}
    errors = sorted({e["checkpoint"]: e for e in errors}.values(), key=lambda e: order.get(e["checkpoint"], -1))
    stats_frame = _StatsTable.frame(ckpts, stats_tables)
    stats_tables.clear()
    drift_frame = _DriftTable.frame(ckpts, drift_tables)
    drift_tables.clear()
    if adapters or ref_adapter is not None:
        stats_frame = _with_rows(stats_frame, delta_rows[0], ckpts)
        drift_frame = _with_rows(drift_frame, delta_rows[1], ckpts)
    adapter_kinds = {n: k for index in (*adapters.values(), ref_adapter) if index is not None
                     for n, k in index.kinds().items()}
    adapter_kinds = {**format_kinds, **adapter_kinds}  # both decide the names they hold, before the name rule
    _add_kind(stats_frame, adapter_kinds)
    _add_kind(drift_frame, adapter_kinds)
    if bounds is not None:
        _add_frac_at_bound(stats_frame, {c.label: counts for c, counts in zip(ckpts, at_bound)})
    return AnalysisResult(
        stats=stats_frame,
        drift=drift_frame,
        errors=pd.DataFrame(errors, columns=list(ERROR_COLUMNS)),
        run=run,
        tensors=names,
        reference=ref_label,
    )


_SPLIT_DIGITS = re.compile(r"(\d+)").split


def _without_kind(columns: Sequence[str]) -> tuple[str, ...]:
    """The columns the tables are built with; ``kind`` is added from the names afterwards."""
    return tuple(c for c in columns if c != "kind")


def _add_kind(frame: pd.DataFrame, adapter: dict[str, tuple[str, str]] | None = None) -> None:
    """Insert the ``kind`` column after ``tensor``: parameter, buffer or unknown (empty for ``__all__``);
    ``adapter`` and ``adapter_delta`` where a PEFT adapter's config decides. ``adapter``: (kind, rule) by
    name where the file itself says (a PEFT config, DeepSpeed's ``buffer_names``), before the name rule."""
    from .kinds import tensor_kind

    names = frame["tensor"].unique()
    siblings = {str(n) for n in names}  # weight_v is told by what sits beside it (kinds.tensor_kind)
    kinds = {name: ("" if name == ALL else tensor_kind(str(name), siblings=siblings, adapter=adapter)[0])
             for name in names}
    frame.insert(frame.columns.get_loc("tensor") + 1, "kind", frame["tensor"].map(kinds).astype(object))


def _delta_rows(
    readers: list[tuple[Checkpoint, TensorReader]], indexes: list[AdapterIndex | None], keep: Callable[[str], bool] | None,
    drift: bool, ref_index: int | None, ref: tuple[Checkpoint | None, TensorReader | None, AdapterIndex | None],
    record: Callable[[int, Checkpoint, CheckpointError], None],
) -> tuple[list[dict], list[dict]]:
    """The ``adapter_delta`` rows of a run with PEFT LoRA checkpoints: ΔW's statistics and drift.

    Walked one module at a time, checkpoint by checkpoint, as :func:`analyze` walks a
    tensor: three versions of one module's factors are alive at once (reference,
    previous, current), and ΔW itself is never built whole (:mod:`auditclip.adapters`).
    A module is matched across checkpoints by its name; one a checkpoint lacks is
    ``added``/``removed`` as a tensor would be. Returns (stats rows, drift rows), each
    with the index of its checkpoint in ``_i`` (-1: none, for an outside reference).
    """
    ref_ckpt, ref_reader, ref_index_of = ref
    outside = drift and ref_index is None and ref_index_of is not None
    modules: dict[str, str] = {}  # stored module prefix -> its ΔW row name
    for index in (*indexes, ref_index_of if outside else None):
        for m in index.modules if index is not None else ():
            if m.problem is None and (keep is None or keep(m.delta_name)):
                modules[m.module] = m.delta_name
    if not modules:
        return [], []
    lora = sum(index is not None and index.peft_type == "LORA" for index in indexes)
    note(f"{lora} of {len(readers)} checkpoint(s) are PEFT LoRA adapter folders: their lora_A/lora_B rows have kind "
         "'adapter'; each adapted module's update ΔW = scaling · B @ A (scaling = lora_alpha / r, or / sqrt(r) with "
         "rslora) has a row '<module>.delta_weight' of kind 'adapter_delta' in stats.csv and drift.csv, left out of "
         "'__all__'; its skew, kurtosis, percentiles, ks and wasserstein are empty (they need every value of ΔW)")
    labels = [c.label for c, _ in readers]
    ref_label = labels[ref_index] if ref_index is not None else (ref_ckpt.label if ref_ckpt is not None else None)
    stats_rows: list[dict] = []
    drift_rows: list[dict] = []

    def version(i: int, ckpt: Checkpoint, reader: TensorReader, index: AdapterIndex | None,
                module: str) -> DeltaVersion | None:
        m = next((m for m in index.modules if m.module == module and m.problem is None), None) if index else None
        if m is None:
            return None
        try:
            return read_delta(reader, m)
        except CheckpointError as exc:
            record(i, ckpt, exc)
            return None

    for module in _natural_sorted(modules):
        name = modules[module]
        ref_version = version(-1, ref_ckpt, ref_reader, ref_index_of, module) if outside else None
        prev: DeltaVersion | None = None
        done: dict[tuple[int, int], tuple] = {}
        for i, (ckpt, reader) in enumerate(readers):
            cur = ref_version if i == ref_index and ref_version is not None else \
                version(i, ckpt, reader, indexes[i], module)
            if i == ref_index:
                ref_version = cur
            if cur is not None:
                stats_rows.append({"_i": i, "tensor": name, "dtype": cur.dtype, "shape": _shape_text(cur.shape),
                                   "numel": cur.numel, **{k: cur.stats.get(k, math.nan) for k in STAT_COLUMNS}})
            if drift:
                if ref_version is None and ref_index is not None and ref_index > i:
                    ref_version = version(ref_index, *readers[ref_index], indexes[ref_index], module)
                for baseline, base, base_label in (("previous", prev, labels[i - 1] if i else None),
                                                   ("reference", ref_version, ref_label)):
                    if baseline == "previous" and i == 0:
                        continue
                    if cur is None and base is None:
                        continue
                    pair = (id(cur), id(base))
                    if pair not in done:  # previous and reference are the same checkpoint: measure once
                        done = {pair: (("added", dict.fromkeys(DRIFT_METRICS, math.nan)) if base is None else
                                       ("removed", dict.fromkeys(DRIFT_METRICS, math.nan)) if cur is None else
                                       compare_deltas(cur, base))}
                    status, metrics = done[pair]
                    drift_rows.append({"_i": i, "tensor": name, "baseline": baseline, "baseline_checkpoint": base_label,
                                       "status": status, **metrics})
            prev = cur
    return stats_rows, drift_rows


def _with_rows(frame: pd.DataFrame, rows: list[dict], ckpts: Sequence[Checkpoint]) -> pd.DataFrame:
    """``frame`` with ``rows`` (each naming its checkpoint by index in ``_i``) added, every checkpoint's
    rows in natural name order (``__all__`` last), a tensor's baselines in the order they came."""
    if not rows:
        return frame
    extra = pd.DataFrame(rows)
    position = extra.pop("_i").to_numpy()
    extra.insert(0, "checkpoint", [ckpts[i].label for i in position])
    extra.insert(1, "step", [ckpts[i].step for i in position])
    extra = extra.reindex(columns=frame.columns)
    for column in frame.columns:  # the table's own dtypes (Int64 steps and counts, float64 numbers)
        extra[column] = extra[column].astype(frame[column].dtype)
    whole = pd.concat([frame, extra], ignore_index=True) if len(frame) else extra.reset_index(drop=True)
    order = {c.label: i for i, c in enumerate(ckpts)}
    rank = {n: k for k, n in enumerate(_natural_sorted(str(t) for t in whole["tensor"].unique()))}
    keys = (np.arange(len(whole)), whole["tensor"].map(lambda t: rank[str(t)]).to_numpy(),
            (whole["tensor"] == ALL).to_numpy(), whole["checkpoint"].map(order).to_numpy())
    return whole.iloc[np.lexsort(keys)].reset_index(drop=True)


def _add_frac_at_bound(frame: pd.DataFrame, at_bound: dict[str, dict[str, int]]) -> None:
    """Append ``frac_at_bound``: per tensor its count / numel; per checkpoint (``__all__``) pooled over bounded tensors."""
    pooled: dict[str, float] = {}
    if len(frame):
        numel = frame["numel"].astype("float64")
        for label, counts in at_bound.items():
            rows = (frame["checkpoint"] == label) & frame["tensor"].isin(list(counts))
            total = float(numel[rows].sum())
            if total:
                pooled[label] = sum(counts.values()) / total
    fractions = [
        pooled.get(label, math.nan) if name == ALL
        else (at_bound.get(label, {})[name] / n if name in at_bound.get(label, {}) and n else math.nan)
        for label, name, n in zip(frame["checkpoint"], frame["tensor"], frame["numel"])
    ]
    frame[FRAC_AT_BOUND] = pd.Series(fractions, index=frame.index, dtype="float64")


#: Largest finite |value| of a float64 tensor whose moments (sums of 4th powers) cannot overflow.
FLOAT64_LIMIT = 1e70


def _check_float64_range(t: torch.Tensor, ckpt: Checkpoint, name: str) -> None:
    """Refuse float64 values whose 4th powers would overflow the moments and the sketch's bins.

    No real weight comes near 1e70; such a value is corruption or an exploded run, and the
    checkpoint is reported (errors.csv) rather than given statistics that are inf or NaN.
    """
    flat = t.reshape(-1)
    finite = flat[torch.isfinite(flat)] if not bool(torch.isfinite(flat).all()) else flat
    if finite.numel():
        lo, hi = torch.aminmax(finite)
        top = max(-float(lo), float(hi))
        if top > FLOAT64_LIMIT:
            raise CheckpointError(ckpt.path, f"tensor {name!r} holds float64 values up to {top:.3g} in magnitude: "
                                             f"beyond {FLOAT64_LIMIT:g}, where its statistics overflow float64; "
                                             "the checkpoint is corrupt or the run diverged", kind="out_of_range")


def _natural_sorted(names: Iterable[str]) -> list[str]:
    """``sorted(names, key=natural_key)``, building :func:`natural_key` once per distinct piece of name.

    A natural sort key is the keys of the name's digit runs and the text between
    them, one after another: ``natural_key("layers.3.w")`` is
    ``natural_key("layers.") + natural_key("3") + natural_key(".w")``. A model of
    100,000 tensors repeats a few such pieces in every name, so each piece's key is
    computed once (tests/test_tensor_count.py checks the order is natural_key's).
    """
    pieces: dict[str, tuple] = {}

    def key(name: str) -> tuple:
        out: list = []
        for p in _SPLIT_DIGITS(name):
            if p:
                k = pieces.get(p)
                if k is None:
                    k = pieces[p] = natural_key(p)
                out += k
        return tuple(out)

    return sorted(names, key=key)


#: Elements from which a tensor's pass is shared by all workers and such tensors are walked one at a time.
BIG_TENSOR = 1 << 18

#: Most tensor names one task of the thread pool walks: enough that the pool's cost per
#: task vanishes next to a checkpoint of 100,000 tiny tensors.
CHUNK_NAMES = 512


def _name_chunks(n: int, workers: int) -> list[range]:
    """Consecutive runs of name indices; small enough to keep every worker busy on a short list."""
    size = CHUNK_NAMES if workers == 1 else max(1, min(CHUNK_NAMES, n // (8 * workers)))
    return [range(start, min(start + size, n)) for start in range(0, n, size)]


@lru_cache(maxsize=None)
def _is_float_dtype(dtype: str) -> bool:
    return is_float_dtype(dtype)


_STAT_VALUES = itemgetter(*STAT_COLUMNS)
_NO_STATS = (math.nan,) * len(STAT_COLUMNS)
_NO_DRIFT = (math.nan,) * len(DRIFT_METRICS)
#: :func:`shape_text`, one string per distinct shape (a MoE model repeats a few shapes many times)
_shape_text = lru_cache(maxsize=4096)(shape_text)


class _Store:
    """The numbers of one table for every checkpoint, in one float64 matrix written in place.

    Checkpoint ``i`` owns rows ``[offsets[i], offsets[i] + capacity[i])``; pages are
    committed only as rows are written. The DataFrame is built on this matrix
    itself, without a copy, once unused capacity is squeezed out.
    """

    def __init__(self, capacities: Sequence[int], width: int) -> None:
        self.capacities = list(capacities)
        self.offsets = [0]
        for c in self.capacities[:-1]:
            self.offsets.append(self.offsets[-1] + c)
        self.matrix = np.empty((sum(self.capacities), width))
        self.counts = [0] * len(self.capacities)

    def write(self, i: int, rows: list[tuple[float, ...]]) -> None:
        if not rows:
            return
        if self.counts[i] + len(rows) > self.capacities[i]:  # never with the bounds analyze gives; stay correct anyway
            self._grow(i, self.counts[i] + len(rows))
        start = self.offsets[i] + self.counts[i]
        self.matrix[start:start + len(rows)] = rows
        self.counts[i] += len(rows)

    def _grow(self, i: int, need: int) -> None:
        capacities = list(self.capacities)
        capacities[i] = max(need, 2 * capacities[i])
        grown = _Store(capacities, self.matrix.shape[1])
        for j, count in enumerate(self.counts):
            grown.matrix[grown.offsets[j]:grown.offsets[j] + count] = self.matrix[self.offsets[j]:self.offsets[j] + count]
        grown.counts = self.counts
        self.__dict__.update(grown.__dict__)

    def rows(self) -> np.ndarray:
        """Every checkpoint's rows, one after another (moved down over unused capacity)."""
        end = 0
        for start, count in zip(self.offsets, self.counts):
            if start != end:
                self.matrix[end:end + count] = self.matrix[start:start + count]
            end += count
        return self.matrix[:end]


class _StatsTable:
    """Rows of ``stats`` for one checkpoint: text columns as lists, numbers in a :class:`_Store`.

    A table of a chunk of names (no store) keeps its numbers as tuples until merged.
    """

    TEXT = ("tensor", "dtype", "shape", "numel")
    NUMBERS = STAT_COLUMNS

    def __init__(self, store: _Store | None = None, index: int = 0) -> None:
        self.text: tuple[list, ...] = tuple([] for _ in self.TEXT)
        self.values: list[tuple[float, ...]] = []
        self.store, self.index = store, index

    def add(self, name: str, v: _Version) -> None:
        tensor, dtype, shape, numel = self.text
        tensor.append(name)
        dtype.append(v.info.dtype)
        shape.append(_shape_text(v.info.shape))
        numel.append(v.numel)
        self.values.append(_STAT_VALUES(v.summary.stats) if v.summary is not None else _NO_STATS)

    def add_many(self, names: list[str], versions: list[_Version | None]) -> None:
        """:meth:`add` of every version that is not None, in order."""
        present = [(name, v) for name, v in zip(names, versions) if v is not None]
        tensor, dtype, shape, numel = self.text
        tensor += [name for name, _ in present]
        dtype += [v.info.dtype for _, v in present]
        shape += [_shape_text(v.info.shape) for _, v in present]
        numel += [v.numel for _, v in present]
        self.values += [_STAT_VALUES(v.summary.stats) if v.summary is not None else _NO_STATS for _, v in present]

    def add_all(self, totals: _Totals) -> None:
        for column, value in zip(self.text, (ALL, "", "", totals.numel)):
            column.append(value)
        self.values.append(_STAT_VALUES(totals.row()))
        self._flush()

    def extend(self, part: _StatsTable) -> None:
        """Take a chunk's rows, in order."""
        for mine, theirs in zip(self.text, part.text):
            mine += theirs
        self.values += part.values
        self._flush()

    def _flush(self) -> None:
        if self.store is not None:
            self.store.write(self.index, self.values)
            self.values = []

    @classmethod
    def frame(cls, ckpts: Sequence[Checkpoint], tables: Sequence[_StatsTable]) -> pd.DataFrame:
        return _frame(ckpts, tables, _without_kind(STATS_COLUMNS), cls.TEXT, cls.NUMBERS)


class _DriftTable(_StatsTable):
    """Rows of ``drift`` for one checkpoint: the status is text, the metrics are numbers."""

    TEXT = ("tensor", "baseline", "baseline_checkpoint", "status")
    NUMBERS = DRIFT_METRICS

    def add(self, name: str, baseline: str, base_label: str | None, row: tuple) -> None:  # type: ignore[override]
        tensor, base, base_ckpt, status = self.text
        tensor.append(name)
        base.append(baseline)
        base_ckpt.append(base_label)
        status.append(row[0])
        self.values.append(row[1:])
        self._flush()

    @classmethod
    def frame(cls, ckpts: Sequence[Checkpoint], tables: Sequence[_StatsTable]) -> pd.DataFrame:
        return _frame(ckpts, tables, _without_kind(DRIFT_COLUMNS), cls.TEXT, cls.NUMBERS)


@dataclass
class _Part:
    """What walking one chunk of tensor names produced, per checkpoint, merged by the caller in order."""

    n: int
    stats: list[_StatsTable] = field(init=False)
    drift: list[_DriftTable] = field(init=False)
    totals: list[list[tuple[dict[str, float], int, int]]] = field(init=False)
    sums: list[dict[str, list[dict[str, float]]]] = field(init=False)
    count: int = 0

    def __post_init__(self) -> None:
        self.stats = [_StatsTable() for _ in range(self.n)]
        self.drift = [_DriftTable() for _ in range(self.n)]
        self.totals = [[] for _ in range(self.n)]
        self.sums = [{b: [] for b in BASELINES} for _ in range(self.n)]


def _drift_status(cur: _Version | None, base: _Version | None) -> str | None:
    """``compare`` when both versions are analysed, else the row's status (None: no row)."""
    cur_ok = cur is not None and cur.summary is not None
    base_ok = base is not None and base.summary is not None
    if not cur_ok and not base_ok:
        return None
    if not base_ok:
        return "added"
    if not cur_ok:
        return "removed"
    return "compare"


def _drift_row(metrics: tuple[float, ...], sums: tuple[float, ...] | None) -> tuple[tuple, tuple[float, ...] | None]:
    """``(status, *metrics)`` of a compared pair (see :func:`compare_values`), and its element-wise sums."""
    return ("ok" if sums is not None else "shape_changed", *metrics), sums


_Probe = TensorInfo | CheckpointError | None  # a version's header: None when the checkpoint lacks the name


def _is_tiny(info: _Probe) -> bool:
    """Whether a version goes with the tiny tensors walked together (absent, unreadable and non-float ones do)."""
    return not isinstance(info, TensorInfo) or info.numel <= TINY_MAX or not _is_float_dtype(info.dtype)


def _frame(ckpts: Sequence[Checkpoint], tables: Sequence[_StatsTable], columns: Sequence[str],
           text: Sequence[str], numbers: Sequence[str]) -> pd.DataFrame:
    """One DataFrame from every checkpoint's table, in checkpoint order, on the store's matrix."""
    counts = [len(t.text[0]) for t in tables]
    if not sum(counts):
        df = pd.DataFrame([], columns=list(columns))
    else:
        store = tables[0].store
        assert store is not None and store.counts == counts
        data: dict[str, list] = {
            "checkpoint": [c.label for c, k in zip(ckpts, counts) for _ in range(k)],
            "step": [c.step for c, k in zip(ckpts, counts) for _ in range(k)],
        }
        for j, col in enumerate(text):
            data[col] = [v for t in tables for v in t.text[j]]
            for t in tables:
                t.text[j].clear()
        front = [c for c in columns if c not in numbers]
        assert list(columns) == [*front, *numbers]
        df = pd.DataFrame(store.rows(), columns=list(numbers), copy=False)  # the numbers as they are, not copied
        for position, col in enumerate(front):
            df.insert(position, col, data.pop(col))
    df["step"] = df["step"].astype("Int64")
    for col in ("numel", "n_nan", "n_inf"):
        if col in df:
            df[col] = df[col].astype("Int64")
    return df


def tensor_stats(run: RunLike, **options: object) -> pd.DataFrame:
    """One row per (checkpoint, tensor) with the columns of ``stats.csv``.

    Takes the options of :func:`analyze` except ``drift``.

    >>> df = tensor_stats("sample_checkpoints/high_lr")
    >>> df.columns[:7].tolist()
    ['checkpoint', 'step', 'tensor', 'kind', 'dtype', 'shape', 'numel']
    """
    return analyze(run, drift=False, **options).stats  # type: ignore[arg-type]


def drift(run: RunLike, **options: object) -> pd.DataFrame:
    """One row per (checkpoint, tensor, baseline) with the columns of ``drift.csv``.

    The tensors that moved most from the first checkpoint by the last one:

    >>> df = drift("sample_checkpoints/high_lr")
    >>> last = df[(df.baseline == "reference") & (df.checkpoint == "epoch_12.safetensors")]
    >>> last.nlargest(3, "rel_l2_change").tensor.tolist()
    ['net.3.bias', 'net.0.bias', 'net.0.weight']
    """
    return analyze(run, **options).drift  # type: ignore[arg-type]


def inspect_checkpoint(path: str | os.PathLike[str] | Checkpoint, **options: object) -> pd.DataFrame:
    """Statistics of every tensor of one checkpoint (the ``stats.csv`` columns).

    >>> inspect_checkpoint("sample_checkpoints/high_lr/epoch_01.safetensors").tensor.tolist()[:2]
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


@dataclass
class Block:
    """Some tensor names across consecutive checkpoints of a run: what one task of a scheduler walks.

    ``checkpoints[:first]`` (the checkpoint before the block, if any) are read only as the
    ``previous`` baseline of ``checkpoints[first]``: their own rows come from another block.
    ``reference``: the checkpoint the ``reference`` rows compare with, in the block or not
    (None without drift). ``visit``: an object with ``fresh()`` (an empty copy with the
    same settings) and ``absorb(other)`` (take a copy's findings), as
    :class:`auditclip.flags.ElementChecker`, since it runs where the tensors are.
    """

    checkpoints: list[Checkpoint]
    names: list[str]
    reference: Checkpoint | None
    key: str | None = None
    drift: bool = True
    spectral: bool = False
    bounds: Bounds | None = None
    visit: Visitor | None = None
    first: int = 0

    def part(self, names: Sequence[str], start: int, stop: int) -> Block:
        """The block of ``names`` at checkpoints ``[start, stop)``, the one before ``start`` as a baseline."""
        lo = max(0, start - 1)
        return replace(self, checkpoints=self.checkpoints[lo:stop], names=list(names), first=start - lo)

    def rows(self, part: _Part, labels: Sequence[str], errors: list[dict[str, str]],
             at_bound: list[dict[str, int]]) -> BlockRows:
        """The rows of the checkpoints this block owns, out of what walking it produced."""
        baselines_only = {c.label for c in self.checkpoints[:self.first]}
        kept = [i for i, label in enumerate(labels) if label not in baselines_only]
        out = _Part(len(kept))
        for j, i in enumerate(kept):
            out.stats[j], out.drift[j], out.totals[j], out.sums[j] = part.stats[i], part.drift[i], part.totals[i], part.sums[i]
        out.count = len(self.names)
        return BlockRows(out, [labels[i] for i in kept], [e for e in errors if e["checkpoint"] not in baselines_only],
                         [at_bound[i] for i in kept] if at_bound else [{} for _ in kept], self.visit)


@dataclass
class BlockRows:
    """What :func:`walk_block` returns: the rows of each checkpoint it owns (``labels``), the errors
    it met, the elements at the bound, and the ``visit`` object that saw its tensors."""

    part: _Part
    labels: list[str]
    errors: list[dict[str, str]]
    at_bound: list[dict[str, int]]
    visit: Visitor | None = None

    @classmethod
    def join(cls, pieces: Sequence[BlockRows], labels: Sequence[str]) -> BlockRows:
        """The blocks of one run of names, each checkpoint's rows at its place in ``labels`` (empty if
        no block has it: it could not be opened where the task ran); errors in block order."""
        where = {label: i for i, label in enumerate(labels)}
        part = _Part(len(labels))
        at_bound: list[dict[str, int]] = [{} for _ in labels]
        for piece in pieces:
            for j, label in enumerate(piece.labels):
                i = where[label]
                part.stats[i], part.drift[i], part.totals[i], part.sums[i] = \
                    piece.part.stats[j], piece.part.drift[j], piece.part.totals[j], piece.part.sums[j]
                at_bound[i] = piece.at_bound[j]
        part.count = pieces[0].part.count if pieces else 0
        visit = pieces[0].visit if pieces else None
        for piece in pieces[1:]:
            if visit is not None and piece.visit is not None:
                visit.absorb(piece.visit)  # type: ignore[attr-defined]
        return cls(part, list(labels), [e for piece in pieces for e in piece.errors], at_bound, visit)

    def add_to(self, errors: list[dict[str, str]], at_bound: list[dict[str, int]], visit: Visitor | None) -> None:
        """Fold into :func:`analyze`'s own: the first error of a checkpoint wins, as in a walk in name order."""
        seen = {e["checkpoint"] for e in errors}
        for e in self.errors:
            if e["checkpoint"] not in seen:
                seen.add(e["checkpoint"])
                errors.append(e)
        for mine, theirs in zip(at_bound, self.at_bound):
            mine.update(theirs)
        if visit is not None and self.visit is not None:
            visit.absorb(self.visit)  # type: ignore[attr-defined]


def walk_block(block: Block) -> BlockRows:
    """The rows :func:`analyze` gives ``block.names`` at the checkpoints of ``block``, for a client to merge.

    What one task of a scheduler runs, on a machine that can open the files
    (:mod:`auditclip.walk_dask`): it opens the checkpoints itself and hands back rows,
    never tensors. A checkpoint it cannot read is in ``errors``, as in :func:`analyze`.

    >>> run = open_run("sample_checkpoints/high_lr")
    >>> rows = walk_block(Block(run.checkpoints, ["net.0.bias"], run[0]).part(["net.0.bias"], 2, 4))
    >>> rows.labels, len(rows.part.drift[0].values)  # previous and reference rows of epoch_03
    (['epoch_03.safetensors', 'epoch_04.safetensors'], 2)
    """
    visit = block.visit.fresh() if block.visit is not None else None  # type: ignore[attr-defined]
    block = replace(block, visit=visit)
    run = Run(list(block.checkpoints), root=Path("."), key=block.key)
    return analyze(run, drift=block.drift, spectral=block.spectral, key=block.key, bounds=block.bounds,  # type: ignore[return-value]
                   visit=visit, _block=block)
