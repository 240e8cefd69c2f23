"""Benchmark per-tensor overhead: checkpoints holding very many tiny tensors.

    python benchmarks/tensor_count.py [--tensors 100000] [--workers N] [--workdir DIR] [--phases inspect,drift,flag]

Writes two fp32 safetensors checkpoints of ``--tensors`` tiny tensors each
(shapes cycling through [8], [4, 4], [2, 3, 2], [16], [1]; names shaped like a
mixture-of-experts model's, ``layers.3.experts.117.w1.weight``), the second a
drifted copy of the first, then times, in-process:

* ``inspect``: :func:`auditclip.inspect_checkpoint` of the first checkpoint;
* ``drift``: :func:`auditclip.analysis.analyze` of the two (statistics + drift);
* ``flag``: :func:`auditclip.flags.flag` of the two (default rules).

Each phase runs in a fresh Python process so its peak RSS
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``, imports included) is its own
(the files are written by another child: a child's ru_maxrss starts at its
parent's RSS, so the parent never imports torch);
wall and CPU seconds exclude the imports. On a shared machine the CPU seconds
are the steadier figure. Prints a table; ``--profile PHASE`` writes a cProfile dump of one
phase instead (``python -m pstats FILE``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ((8,), (4, 4), (2, 3, 2), (16,), (1,))
PHASES = ("inspect", "drift", "flag")
TARGETS = {"inspect": 5.0, "drift": 15.0, "flag": None}
RSS_TARGET_MB = 500


def make_checkpoints(folder: Path, n: int) -> list[Path]:
    """Two checkpoints of ``n`` tiny fp32 tensors; the second drifted from the first."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    names = [f"layers.{i // 1000}.experts.{(i // 4) % 250}.w{i % 4}.weight" for i in range(n)]
    first = {name: torch.randn(SHAPES[i % len(SHAPES)], generator=g) * 0.02 for i, name in enumerate(names)}
    paths = []
    for step, sd in enumerate((first, {k: v + 0.001 * torch.randn(v.shape, generator=g) for k, v in first.items()})):
        path = folder / f"step_{step * 100}.safetensors"
        save_file(sd, str(path))
        paths.append(path)
    return paths


def run_phase(phase: str, files: list[str], workers: int | None, profile: str | None) -> dict[str, float]:
    """Time one phase in this process; returns seconds, peak RSS (MB) and the rows produced."""
    import resource

    from auditclip.analysis import analyze, inspect_checkpoint
    from auditclip.flags import flag

    options = {} if workers is None else {"workers": workers}
    calls = {
        "inspect": lambda: len(inspect_checkpoint(files[0], **options)),
        "drift": lambda: len(analyze(files, **options).drift),
        "flag": lambda: len(flag(files).flags),
    }
    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    rows = calls[phase]()
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = after.ru_utime + after.ru_stime - usage.ru_utime - usage.ru_stime
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(profile)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"seconds": seconds, "cpu_seconds": cpu, "peak_rss_mb": peak_kb / 1024, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tensors", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=None, help="analyze's workers (default: its own default)")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the generated files here")
    parser.add_argument("--phases", default=",".join(PHASES))
    parser.add_argument("--profile", metavar="PHASE", default=None, help="write tensor_count.PHASE.prof (cProfile)")
    parser.add_argument("--_child", nargs="+", help=argparse.SUPPRESS)  # PHASE FILE FILE: run one phase here
    parser.add_argument("--_make", nargs=2, help=argparse.SUPPRESS)  # DIR N: write the checkpoints
    args = parser.parse_args()

    if args._make:
        folder, n = args._make
        print("\n".join(map(str, make_checkpoints(Path(folder), int(n)))))
        return
    if args._child:
        phase, *files = args._child
        profile = f"tensor_count.{phase}.prof" if args.profile == phase else None
        print(json.dumps(run_phase(phase, files, args.workers, profile)))
        return

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        folder = Path(tmp)
        start = time.perf_counter()
        # Written by a child process too: a child's ru_maxrss starts from its parent's RSS at
        # fork, so this process must stay small (it never imports torch).
        made = subprocess.run([sys.executable, __file__, "--_make", str(folder), str(args.tensors)], check=True,
                              capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        files = [Path(line) for line in made.stdout.split()]
        print(f"wrote 2 checkpoints of {args.tensors:,} tensors ({files[0].stat().st_size / 1e6:.1f} MB each) "
              f"in {time.perf_counter() - start:.1f} s", flush=True)
        rows = []
        for phase in args.phases.split(","):
            cmd = [sys.executable, __file__, "--_child", phase, *map(str, files)]
            if args.workers is not None:
                cmd += ["--workers", str(args.workers)]
            if args.profile:
                cmd += ["--profile", args.profile]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT,
                                 env={**os.environ, "PYTHONPATH": str(ROOT)})
            result = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append((phase, result))
            print(f"  {phase}: {result['seconds']:.2f} s", file=sys.stderr, flush=True)

    print(f"\n| phase ({args.tensors:,} tensors) | wall s | CPU s | target | peak RSS | output rows |")
    print("| --- | --- | --- | --- | --- | --- |")
    for phase, r in rows:
        target = TARGETS.get(phase)
        verdict = "" if target is None else (f"< {target:g} s " + ("met" if r["seconds"] < target else "**missed**"))
        rss = f"{r['peak_rss_mb']:.0f} MB" + ("" if r["peak_rss_mb"] < RSS_TARGET_MB else " (**over 500 MB**)")
        print(f"| {phase} | {r['seconds']:.2f} | {r['cpu_seconds']:.2f} | {verdict} | {rss} | {r['rows']:,} |")


if __name__ == "__main__":
    main()
