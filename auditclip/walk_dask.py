"""The statistics pass as tasks of a Dask cluster (``--scheduler``; the ``auditclip[dask]`` extra).

:func:`auditclip.analysis.analyze` lists the run and its tensor names on the client, as
it does for threads; here the names are cut into runs of names and the checkpoints
into blocks, and each (run of names, block of checkpoints) is one task,
:func:`auditclip.analysis.walk_block`: it opens its checkpoints where it runs (a
filesystem every worker sees), reads and describes the tensors there and returns
small rows. The client merges the rows in name order, checkpoint order within, exactly
as the threads' parts are merged, so the frames are the same bit for bit whatever the
number of workers. Tensors never travel: not through the scheduler, not to the client.
Workers get absolute paths (a worker runs in a folder of its own; the labels stay the
user's), use the client's torch thread count, and the notes they say while reading
(:mod:`auditclip.notices`) are said again by the client, so they reach summary.md.

A block after the first also reads the checkpoint before it (its ``previous``
baseline) and the reference, so a block of B checkpoints reads up to B + 2 versions
of each tensor: blocks are only cut when the run of names alone gives too few tasks.

Failures: a worker that dies has its tasks run again elsewhere (the scheduler's own
rescheduling, up to ``distributed.scheduler.allowed-failures`` times); a checkpoint that
cannot be read is an ``errors.csv`` row, as without Dask; a cluster left without any
worker for :data:`NO_WORKER_TIMEOUT` seconds stops the command with an error instead
of waiting for ever.
"""

from __future__ import annotations

import contextlib
import math
import os
import uuid
from dataclasses import replace
from collections.abc import Iterator
from typing import Any

from .analysis import CHUNK_NAMES, Block, BlockRows, walk_block
from .checkpoints import Checkpoint
from .errors import AuditclipError, InputError
from .notices import collect, note

#: What ``pip`` installs for ``--scheduler``.
INSTALL_HINT = "pip install 'auditclip[dask]'"
#: Seconds the client waits for a cluster that has no worker at all before it gives up.
NO_WORKER_TIMEOUT = 120.0
#: Seconds to connect to a running scheduler.
CONNECT_TIMEOUT = 30.0
#: Checkpoints per task (None: the whole run, unless that leaves workers idle); tests set it.
BLOCK_CHECKPOINTS: int | None = None
_POLL = 2.0  # seconds between looks at the cluster while a task runs


def parse_scheduler(spec: str) -> tuple[str | None, int | None]:
    """``(address, None)`` for a running scheduler, ``(None, n_workers)`` for a local cluster.

    >>> parse_scheduler("tcp://10.0.0.5:8786"), parse_scheduler("local:4")
    (('tcp://10.0.0.5:8786', None), (None, 4))
    >>> parse_scheduler("local")[1] == (os.cpu_count() or 1)
    True
    """
    text = spec.strip()
    if text == "local":
        return None, os.cpu_count() or 1
    if text.startswith("local:"):
        n = text[len("local:"):]
        if not n.isdigit() or int(n) < 1:
            raise InputError(f"--scheduler {spec!r}: local:N takes a number of worker processes >= 1, e.g. local:4")
        return None, int(n)
    if "://" in text and text.split("://", 1)[1]:
        return text, None
    raise InputError(f"--scheduler {spec!r}: give a scheduler address (tcp://HOST:PORT) or local / local:N")


def _distributed() -> Any:
    try:
        import distributed
    except ImportError as exc:
        raise InputError(f"--scheduler needs Dask's distributed scheduler, which is not installed: {INSTALL_HINT}") from exc
    return distributed


@contextlib.contextmanager
def connect(spec: str) -> Iterator[Any]:
    """A ``distributed.Client`` of the scheduler ``spec`` names (see :func:`parse_scheduler`);
    a local cluster is started for the block and closed after it.

    The spec is checked before anything starts:

    >>> with connect("local:0") as client:
    ...     pass
    Traceback (most recent call last):
    auditclip.errors.InputError: --scheduler 'local:0': local:N takes a number of worker processes >= 1, e.g. local:4
    """
    address, n_workers = parse_scheduler(spec)
    distributed = _distributed()
    if address is None:
        import dask

        # processes, not threads: the statistics hold the GIL in places, and a crash stays in its worker.
        # Without the nanny's usual environment: its MALLOC_TRIM_THRESHOLD_ makes every large temporary
        # array a fresh mmap (2-3x slower statistics, measured), and the thread counts are the client's.
        with dask.config.set({"distributed.nanny.pre-spawn-environ": {}}), distributed.LocalCluster(n_workers=n_workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                                      dashboard_address="127.0.0.1:0", silence_logs=40) as cluster, \
                distributed.Client(cluster) as client:
            yield client
        return
    try:
        client = distributed.Client(address, timeout=CONNECT_TIMEOUT)
    except (OSError, TimeoutError) as exc:
        raise InputError(f"cannot reach the Dask scheduler at {address}: {exc}") from exc
    with client:
        yield client


def blocks_of(n_checkpoints: int, n_name_runs: int, n_workers: int, size: int | None = None) -> list[range]:
    """Consecutive blocks of checkpoints: the whole run, unless the runs of names give fewer
    than two tasks per worker; blocks hold two checkpoints at least (each re-reads the one before it).

    >>> blocks_of(12, 40, 4), blocks_of(12, 1, 4), blocks_of(5, 1, 4, size=2)
    ([range(0, 12)], [range(0, 2), range(2, 4), range(4, 6), range(6, 8), range(8, 10), range(10, 12)], [range(0, 2), range(2, 4), range(4, 5)])
    """
    if size is None:
        wanted = math.ceil(2 * n_workers / max(1, n_name_runs))
        n_blocks = max(1, min(wanted, n_checkpoints // 2))
        size = math.ceil(n_checkpoints / n_blocks)
    size = max(1, size)
    return [range(start, min(start + size, n_checkpoints)) for start in range(0, n_checkpoints, size)]


def name_runs(n_names: int, n_workers: int) -> list[range]:
    """Consecutive runs of name indices, as the threads get them (a task costs milliseconds, so keep them few).

    >>> name_runs(5, 2), len(name_runs(100_000, 8))
    ([range(0, 1), range(1, 2), range(2, 3), range(3, 4), range(4, 5)], 196)
    """
    size = max(1, min(CHUNK_NAMES, n_names // (8 * n_workers)))
    return [range(start, min(start + size, n_names)) for start in range(0, n_names, size)]


def _absolute(ckpt: Checkpoint) -> Checkpoint:
    return replace(ckpt, path=ckpt.path.absolute(), weights=ckpt.weights.absolute())


def _same(job: Block) -> Block:
    """The job as a task of its own: the scheduler keeps it (small: paths, names, settings), and
    recomputes it if the worker holding it dies, which a scattered value would not survive."""
    return job


def _threads() -> tuple[int, int | None]:
    """This process's torch threads and numpy's BLAS threads (None: unknown, threadpoolctl absent)."""
    import numpy  # noqa: F401  (loads the BLAS threadpoolctl looks for)
    import torch

    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return torch.get_num_threads(), None
    blas = [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]
    return torch.get_num_threads(), max(blas) if blas else None


def _walk(job: Block, names: list[str], start: int, stop: int, threads: tuple[int, int | None]
          ) -> tuple[BlockRows, list[str]]:
    """One task: its rows, and the notes said while it read (the client says them again, so they
    reach its stderr and summary.md).

    torch and numpy's BLAS split a long sum across their threads, and the last bit of the sum
    follows the split: the task runs with the client's thread counts, so its rows are the
    threaded run's, bit for bit (a Dask worker starts with OMP_NUM_THREADS=OPENBLAS_NUM_THREADS=1).
    """
    import torch

    torch_threads, blas_threads = threads
    before = torch.get_num_threads()
    torch.set_num_threads(torch_threads)
    try:
        with contextlib.ExitStack() as stack:
            if blas_threads is not None:
                from threadpoolctl import threadpool_limits

                stack.enter_context(threadpool_limits(blas_threads, user_api="blas"))
            with collect() as said:
                rows = walk_block(job.part(names, start, stop))
        return rows, said
    finally:
        torch.set_num_threads(before)


def walk_parts(spec: str, job: Block) -> Iterator[BlockRows]:
    """Run ``job`` on the cluster ``spec`` names; yield the rows of each run of names, in name order.

    Each yielded :class:`BlockRows` holds every checkpoint of ``job`` (in order), as one
    part of :func:`auditclip.analysis.analyze`'s threads would.
    """
    if job.visit is not None and not hasattr(job.visit, "absorb"):
        raise InputError("a visit function cannot run on a Dask cluster: give an object with fresh() and absorb() "
                         "(as auditclip.flags.ElementChecker)")
    labels = [c.label for c in job.checkpoints]
    # a worker runs in a folder of its own: it gets absolute paths (the labels stay the user's)
    job = replace(job, checkpoints=[_absolute(c) for c in job.checkpoints],
                  reference=_absolute(job.reference) if job.reference is not None else None)
    with connect(spec) as client:
        n_workers = max(1, sum(client.nthreads().values()))
        runs = name_runs(len(job.names), n_workers)
        blocks = blocks_of(len(job.checkpoints), len(runs), n_workers, BLOCK_CHECKPOINTS)
        token = uuid.uuid4().hex
        shared = client.submit(_same, job, key=f"auditclip-job-{token}", pure=False)
        threads = _threads()
        futures = [[client.submit(_walk, shared, job.names[r.start:r.stop], b.start, b.stop, threads,
                                  key=f"auditclip-walk-{token}-{k}-{b.start}", pure=False) for b in blocks]
                   for k, r in enumerate(runs)]
        try:
            for run_futures in futures:
                done = [_result(client, f, spec) for f in run_futures]
                for message in dict.fromkeys(m for _, said in done for m in said):
                    note(message)
                yield BlockRows.join([rows for rows, _ in done], labels)
                for f in run_futures:
                    f.release()
        finally:
            client.cancel([f for fs in futures for f in fs] + [shared])


def _result(client: Any, future: Any, spec: str) -> tuple[BlockRows, list[str]]:
    """The task's rows; an error if it failed or the cluster has had no worker for :data:`NO_WORKER_TIMEOUT`."""
    distributed = _distributed()
    idle = 0.0
    while True:
        try:
            distributed.wait(future, timeout=_POLL)
            break
        except TimeoutError:
            idle = 0.0 if client.nthreads() else idle + _POLL
            if idle >= NO_WORKER_TIMEOUT:
                raise InputError(f"the Dask cluster at {spec} has had no worker for {NO_WORKER_TIMEOUT:g} s: "
                                 "start workers (dask-worker ADDRESS) or check the scheduler's log") from None
    try:
        return future.result()
    except distributed.KilledWorker as exc:
        raise _TaskError("a task of the statistics pass killed every worker that ran it (a checkpoint that "
                         f"crashes its reader, or workers short of memory): {exc}")from None


class _TaskError(AuditclipError):
    """A task that could not finish on the cluster, however often it was run."""


__all__ = ["INSTALL_HINT", "blocks_of", "connect", "name_runs", "parse_scheduler", "walk_parts"]
