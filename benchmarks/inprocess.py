"""In-process timing of ``auditclip.analyze`` (imports, numba's kernel load and CSV writing excluded).

    python benchmarks/inprocess.py RUN_DIR [REPEATS]
    PYTHONPATH=/path/to/other/checkout python benchmarks/inprocess.py RUN_DIR   # the same for other code

Prints wall and CPU seconds of each call and the process's peak RSS. Alternating two
checkouts on the same files compares code on a shared machine better than whole-process
wall times: CPU seconds move much less with the load than wall seconds.
"""

from __future__ import annotations

import resource
import sys
import time

import auditclip
from auditclip import analyze

run = sys.argv[1]
analyze(run, include=["layers.0.ln1.*"])  # warm-up: imports, numba's cached kernels
out = []
for _ in range(int(sys.argv[2]) if len(sys.argv) > 2 else 2):
    t0, c0 = time.perf_counter(), time.process_time()
    analyze(run)
    out.append((time.perf_counter() - t0, time.process_time() - c0))
print(f"{auditclip.__file__.rsplit('/auditclip/', 1)[0]} {run}: "
      + "; ".join(f"wall {w:.2f} s, cpu {c:.2f} s" for w, c in out)
      + f"; peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3:.0f} MB", flush=True)
