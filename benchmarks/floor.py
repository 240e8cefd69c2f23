"""The floor: read every tensor of the run once and sum it (one process).

    python benchmarks/floor.py RUN_DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

from safetensors import safe_open

total = 0.0
for path in sorted(Path(sys.argv[1]).glob("*.safetensors")):
    with safe_open(str(path), "pt") as f:
        for name in f.keys():
            total += float(f.get_tensor(name).sum())
print(total)
