"""The floor: read every tensor of the run once and sum it (one process).

    python benchmarks/floor.py RUN_DIR [SECONDS_FILE]

With SECONDS_FILE, the seconds of the read-and-sum loop alone (imports excluded) are
written there, so the benchmark can give the floor's rate net of start-up.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from safetensors import safe_open

start = time.perf_counter()
total = 0.0
for path in sorted(Path(sys.argv[1]).glob("*.safetensors")):
    with safe_open(str(path), "pt") as f:
        for name in f.keys():
            total += float(f.get_tensor(name).sum())
if len(sys.argv) > 2:
    Path(sys.argv[2]).write_text(f"{time.perf_counter() - start}\n")
print(total)
