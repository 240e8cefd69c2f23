"""Scale-out row: ``auditclip drift`` on 1 and 2 Dask workers against the threaded run.

    python benchmarks/scaleout.py [--checkpoints 4] [--mb 400] [--workdir DIR]

Writes the synthetic run of ``bench.py``, then times whole processes: ``auditclip drift``
with its threads, with ``--scheduler local:1`` and with ``--scheduler local:2`` (each
starting and closing its cluster), checks the CSVs are identical, byte for byte, and
measures the cost of one task: the same small run walked as many one-name,
one-checkpoint tasks on a warm 1-worker cluster, against the same blocks walked in
this process (:func:`auditclip.analysis.walk_block`).
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import DTYPES, ROOT, make_run, timed  # noqa: E402


def task_overhead(run: Path) -> tuple[int, float]:
    """(tasks, seconds per task) for one-name, one-checkpoint tasks on a warm 1-worker cluster."""
    import distributed

    from auditclip import walk_dask
    from auditclip.analysis import Block, walk_block
    from auditclip.checkpoints import open_run

    ckpts = open_run(run).checkpoints
    names = sorted(ckpts[0].open().names())
    job = Block(ckpts, names, ckpts[0])
    parts = [(n, i) for n in names for i in range(len(ckpts))]
    start = time.perf_counter()
    for n, i in parts:
        walk_block(job.part([n], i, i + 1))
    here = time.perf_counter() - start
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address="127.0.0.1:0", silence_logs=40) as cluster, \
            distributed.Client(cluster) as client:
        client.run(lambda: __import__("auditclip.analysis"))  # warm: torch imported on the worker
        start = time.perf_counter()
        threads = walk_dask._threads()
        futures = [client.submit(walk_dask._walk, job, [n], i, i + 1, threads, pure=False) for n, i in parts]
        client.gather(futures)
        there = time.perf_counter() - start
    return len(parts), (there - here) / len(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoints", type=int, default=4)
    ap.add_argument("--mb", type=float, default=400.0)
    ap.add_argument("--workdir", type=Path)
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="auditclip-scaleout-"))
    run = work / "run"
    if not run.exists():
        make_run(run, args.checkpoints, args.mb, DTYPES["fp32"])
    size = sum(p.stat().st_size for p in run.iterdir()) / 1e6
    for p in run.iterdir():  # warm the page cache
        p.read_bytes()
    drift = [sys.executable, "-m", "auditclip.cli", "drift", str(run), "-q"]
    rows = []
    for label, extra in (("threads", []), ("local:1", ["--scheduler", "local:1"]),
                         ("local:2", ["--scheduler", "local:2"])):
        out = work / label.replace(":", "_")
        shutil.rmtree(out, ignore_errors=True)
        seconds, _ = timed([*drift, "--out", str(out), *extra])
        same = all(filecmp.cmp(work / "threads" / f, out / f, shallow=False) for f in ("stats.csv", "drift.csv"))
        rows.append((label, seconds, same))
    tasks, per_task = task_overhead(ROOT / "sample_checkpoints" / "high_lr")
    print(f"run: {args.checkpoints} x {args.mb:g} MB fp32 ({size:.0f} MB)")
    print("| engine | wall s | MB/s | CSVs identical to threads |")
    print("| --- | --- | --- | --- |")
    for label, seconds, same in rows:
        print(f"| {label} | {seconds:.2f} | {size / seconds:.0f} | {'yes' if same else 'NO'} |")
    print(f"overhead per task (warm 1-worker cluster, {tasks} one-name one-checkpoint tasks): {per_task * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
