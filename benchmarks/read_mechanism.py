"""What reading with ``pread`` (no SIGBUS, change detection) costs against a memory map.

    python benchmarks/read_mechanism.py [--mb 400] [--repeats 3]

Writes one safetensors file of fp32 matrices, warms the page cache, then in this
one process times, per repeat, reading every tensor and summing it:

* ``mmap``: ``torch.frombuffer`` over a private map of the file (what auditclip
  did before: zero-copy, but a file truncated under it kills the process with SIGBUS);
* ``pread``: :class:`auditclip.formats.readers.TensorReader` (a fresh buffer per tensor,
  ``pread`` into it, ``fstat`` after each read to detect a change);

and prints the best time of each and their ratio. Sums are compared so both read the same bytes.
"""

from __future__ import annotations

import argparse
import json
import mmap
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from auditclip.formats.readers import open_checkpoint_file


def by_mmap(path: Path) -> float:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    total = 0.0
    for name, e in header.items():
        if name == "__metadata__":
            continue
        begin, end = e["data_offsets"]
        t = torch.frombuffer(mapped, dtype=torch.float32, count=(end - begin) // 4, offset=8 + n + begin)
        total += float(t.sum(dtype=torch.float64))
    return total


def by_pread(path: Path) -> float:
    total = 0.0
    with open_checkpoint_file(path) as reader:
        for name in reader.names():
            total += float(reader.get(name).sum(dtype=torch.float64))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        d = 1024
        count = max(1, int(args.mb * 1e6 / (d * d * 4)))
        g = torch.Generator().manual_seed(0)
        save_file({f"layer{i:03d}.weight": torch.randn(d, d, generator=g) for i in range(count)}, str(path))
        path.read_bytes()  # warm the page cache
        best: dict[str, float] = {}
        sums: dict[str, float] = {}
        for _ in range(args.repeats):
            for label, fn in (("mmap", by_mmap), ("pread", by_pread)):
                start = time.perf_counter()
                sums[label] = fn(path)
                best[label] = min(best.get(label, float("inf")), time.perf_counter() - start)
        assert abs(sums["mmap"] - sums["pread"]) <= 1e-9 * max(1.0, abs(sums["mmap"]))
        mb = path.stat().st_size / 1e6
        print(f"{mb:.0f} MB, {count} tensors of {d}x{d} fp32, best of {args.repeats}:")
        for label in ("mmap", "pread"):
            print(f"  {label:5s} {best[label]:.3f} s  {mb / best[label]:.0f} MB/s")
        print(f"  pread / mmap time: {best['pread'] / best['mmap']:.2f}x")


if __name__ == "__main__":
    main()
