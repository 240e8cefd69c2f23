"""Benchmark auditclip drift against the reference pipeline and the read floor.

    python benchmarks/bench.py [--checkpoints 4] [--mb 200] [--dtype fp32|bf16|fp16] [--workdir DIR]
                               [--skip-reference] [--repeat 3] [--keep]

Generates a synthetic transformer-like run (a few large matrices, many small
vectors, drifting from step to step), then times whole processes: (a)
``auditclip drift``, (b) ``benchmarks/reference.py`` (numpy/scipy, exact), (c)
``benchmarks/floor.py`` (read and sum every tensor), and (d) ``auditclip clip``
writing a clipped copy of the run, beside (e) the write floor (the same bytes
written and fsynced by plain Python), and the start-up of ``auditclip --version``
and ``--help``. Reports wall seconds, GB/s net of start-up, peak anonymous
memory (RssAnon sampled from /proc), the ratios a/b and a/c, each issue-15
target met or missed, and whether (a)'s numbers agree with (b)'s within the
documented bounds. ``--repeat N`` times every process N times on the same run
(one line each: the machine is shared, timings vary run to run).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_run(folder: Path, checkpoints: int, mb: float, dtype: torch.dtype) -> int:
    """Write the run; returns the number of elements of its largest tensor."""
    itemsize = torch.tensor([], dtype=dtype).element_size()
    d = max(64, int(math.sqrt(mb * 1e6 / itemsize / 12 / 2)))  # 2 layers x (4 d^2 attn + 8 d^2 mlp)
    shapes: dict[str, tuple[int, ...]] = {}
    for layer in range(2):
        for name, shape in (("attn.qkv.weight", (3 * d, d)), ("attn.out.weight", (d, d)), ("mlp.up.weight", (4 * d, d)),
                            ("mlp.down.weight", (d, 4 * d))):
            shapes[f"layers.{layer}.{name}"] = shape
        for name in ("ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias", "attn.qkv.bias", "mlp.up.bias"):
            shapes[f"layers.{layer}.{name}"] = (d if "qkv" not in name and "up" not in name else 3 * d,)
    g = torch.Generator().manual_seed(0)
    state = {n: torch.randn(s, generator=g) * (0.02 if len(s) > 1 else 0.1) for n, s in shapes.items()}
    folder.mkdir(parents=True, exist_ok=True)
    for step in range(checkpoints):
        for n, t in state.items():
            t.add_(torch.randn(t.shape, generator=g), alpha=0.002 * (1 + step))
        save_file({n: t.to(dtype).contiguous() for n, t in state.items()}, str(folder / f"step_{step * 100}.safetensors"))
    return max(math.prod(s) for s in shapes.values())


def timed(cmd: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RssAnon (bytes) of a whole process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0

    def sample() -> None:
        nonlocal peak
        status = Path(f"/proc/{proc.pid}/status")
        while proc.poll() is None:
            try:
                for line in status.read_text().splitlines():
                    if line.startswith("RssAnon:"):
                        peak = max(peak, int(line.split()[1]) * 1024)
            except OSError:
                break
            time.sleep(0.005)

    thread = threading.Thread(target=sample)
    thread.start()
    _, err = proc.communicate()
    thread.join()
    if proc.returncode not in (0,):
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}): {err.decode()[-2000:]}")
    return time.perf_counter() - start, peak


def write_floor(run: Path, dest: Path) -> None:
    """(e): copy every file of the run with plain reads and writes, fsynced (what any writer pays)."""
    dest.mkdir(parents=True, exist_ok=True)
    for p in sorted(run.glob("*.safetensors")):
        with open(p, "rb") as src, open(dest / p.name, "wb") as out:
            while block := src.read(64 << 20):
                out.write(block)
            out.flush()
            os.fsync(out.fileno())


def net(mb: float, secs: float, bare_s: float) -> float:
    """GB/s of ``mb`` over ``secs`` less the bare start-up; NaN when start-up noise swamps the work."""
    return mb / 1e3 / (secs - bare_s) if secs - bare_s > 0.1 * secs else math.nan


def best(cmd: list[str], n: int = 3) -> float:
    return min(timed(cmd)[0] for _ in range(n))


def agree(ours: Path, ref: Path) -> list[str]:
    stats = pd.read_csv(ours / "stats.csv")
    drift = pd.read_csv(ours / "drift.csv")
    reference = pd.read_csv(ref)
    merged = reference.merge(stats, on=["checkpoint", "tensor"], suffixes=("_ref", ""))
    problems = []
    for col in ("mean", "std", "skew", "kurtosis", "min", "max"):
        err = np.abs(merged[col] - merged[f"{col}_ref"]) / np.maximum(np.abs(merged[f"{col}_ref"]), 1e-12)
        if err.max() > 1e-6:
            problems.append(f"{col}: max relative error {err.max():.2e}")
    prev = drift[(drift.baseline == "previous")].merge(reference.dropna(subset=["ks"]), on=["checkpoint", "tensor"],
                                                       suffixes=("", "_ref"))
    ks_err = float(np.abs(prev.ks - prev.ks_ref).max())
    w_err = float((np.abs(prev.wasserstein - prev.wasserstein_ref) / prev.wasserstein_ref).max())
    if ks_err > 0.005:
        problems.append(f"ks: max abs error {ks_err:.2e} > 0.005")
    if w_err > 0.01:
        problems.append(f"wasserstein: max relative error {w_err:.2e} > 1%")
    problems.append(f"(ks max abs error {ks_err:.2e}, wasserstein max rel error {w_err:.2e})")
    return problems


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoints", type=int, default=4)
    ap.add_argument("--mb", type=float, default=200.0)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--skip-reference", action="store_true", help="only (a), (c), (d), (e) and the bare import")
    ap.add_argument("--workers", type=int, help="passed to auditclip drift --workers")
    ap.add_argument("--repeat", type=int, default=1, help="time each process this many times")
    ap.add_argument("--keep", action="store_true", help="keep the generated run (deleted by default)")
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="auditclip-bench-"))
    run = work / "run"
    if run.exists():
        shutil.rmtree(run)
    largest = make_run(run, args.checkpoints, args.mb, DTYPES[args.dtype])
    total_mb = sum(p.stat().st_size for p in run.glob("*.safetensors")) / 1e6
    for p in run.glob("*.safetensors"):  # warm page cache
        p.read_bytes()
    py = sys.executable
    cli = [py, "-m", "auditclip.cli", "drift", str(run), "--out", str(work / "ours"), "-q"]
    if args.workers:
        cli += ["--workers", str(args.workers)]
    itemsize = torch.tensor([], dtype=DTYPES[args.dtype]).element_size()
    print(f"run: {args.checkpoints} checkpoints x {total_mb / args.checkpoints:.0f} MB ({args.dtype}), "
          f"largest tensor {largest * itemsize / 1e6:.0f} MB; machine: {os.cpu_count()} cores; "
          f"load average before: {os.getloadavg()[0]:.2f}")
    startup = {flag: best([py, "-m", "auditclip.cli", flag]) for flag in ("--version", "--help")}
    print("start-up: " + ", ".join(f"auditclip {k} {v:.3f} s" for k, v in startup.items())
          + f" (target < 0.5 s: {'met' if max(startup.values()) < 0.5 else 'MISSED'})")
    clip_out, copy_out = work / "clipped", work / "copied"
    for attempt in range(args.repeat):
        rows = {}
        rows["bare import"] = timed([py, "-c", "import torch, pandas, scipy.stats, safetensors"])
        rows["(a) auditclip drift"] = timed(cli)
        rows["(c) floor: read+sum"] = timed([py, str(ROOT / "benchmarks" / "floor.py"), str(run), str(work / "floor_s")])
        floor_loop = float((work / "floor_s").read_text())
        for folder in (clip_out, copy_out):
            if folder.exists():
                shutil.rmtree(folder)
        rows["(d) auditclip clip"] = timed([py, "-m", "auditclip.cli", "clip", str(run), "--max-abs", "0.05",
                                            "--out", str(clip_out)])
        start = time.perf_counter()
        write_floor(run, copy_out)
        rows["(e) floor: write+fsync"] = (time.perf_counter() - start, 0)
        if not args.skip_reference and attempt == 0:
            rows["(b) reference numpy/scipy"] = timed([py, str(ROOT / "benchmarks" / "reference.py"), str(run),
                                                       str(work / "ref.csv")])
        bare_s, bare_mem = rows["bare import"]
        print(f"\n[{attempt + 1}/{args.repeat}] load average {os.getloadavg()[0]:.2f}")
        print(f"{'':28} {'wall s':>8} {'GB/s':>7} {'GB/s net':>9} {'peak anon MB':>13}")
        for name, (secs, mem) in rows.items():
            if name.startswith("(c)"):
                print(f"{name:28} {secs:8.2f} {total_mb / 1e3 / secs:7.2f} {total_mb / 1e3 / floor_loop:9.2f} "
                      f"{mem / 1e6:13.0f}  (net: its loop alone, {floor_loop:.2f} s)")
                continue
            if name == "bare import" or name.startswith("(e)"):
                print(f"{name:28} {secs:8.2f} {total_mb / 1e3 / secs if name != 'bare import' else math.nan:7.2f} "
                      f"{'':>9} {mem / 1e6 if mem else math.nan:13.0f}")
                continue
            print(f"{name:28} {secs:8.2f} {total_mb / 1e3 / secs:7.2f} "
                  f"{net(total_mb, secs, bare_s):9.2f} {mem / 1e6:13.0f}")
        a = rows["(a) auditclip drift"]
        a_net = net(total_mb, a[0], bare_s)
        floor_rate = total_mb / 1e3 / floor_loop  # its read-and-sum loop alone: net of start-up
        clip_mb = sum(p.stat().st_size for p in clip_out.glob("*.safetensors")) / 1e6
        d = rows["(d) auditclip clip"]
        clip_net = net(clip_mb, d[0], bare_s)
        budget = bare_mem + 4 * largest * itemsize
        print(f"targets: drift {a_net:.2f} GB/s net (>= 1.0: {'met' if a_net >= 1.0 else 'MISSED'}); "
              f"floor {floor_rate:.2f} GB/s net, drift/floor rate {a_net / floor_rate:.3f} "
              f"(>= 0.1: {'met' if a_net >= 0.1 * floor_rate else 'MISSED'}); "
              f"clip wrote {clip_mb:.0f} MB at {clip_net:.2f} GB/s net (>= 0.5: {'met' if clip_net >= 0.5 else 'MISSED'}; "
              f"write floor {total_mb / 1e3 / rows['(e) floor: write+fsync'][0]:.2f} GB/s); "
              f"memory: drift peak {a[1] / 1e6:.0f} MB vs bare + 4 x largest = {budget / 1e6:.0f} MB "
              f"({'within' if a[1] <= budget else 'OVER'})")
        if "(b) reference numpy/scipy" in rows:
            b = rows["(b) reference numpy/scipy"]
            print(f"b/a speed-up: {b[0] / a[0]:.1f}x (>= 100: {'met' if b[0] >= 100 * a[0] else 'MISSED'})")
            problems = agree(work / "ours", work / "ref.csv")
            print("agreement with the reference: " + ("; ".join(problems)))
    for folder in (clip_out, copy_out):
        shutil.rmtree(folder, ignore_errors=True)
    if not args.keep:
        shutil.rmtree(run, ignore_errors=True)


if __name__ == "__main__":
    main()
