"""The pipeline a user would write without auditclip (kept for the benchmark).

Loads each checkpoint whole; per tensor, moments and percentiles with numpy/scipy
(``scipy.stats.describe``, ``numpy.percentile``), and drift against the previous
checkpoint with scipy's exact ``ks_2samp`` and ``wasserstein_distance``.
Writes a CSV of its numbers so the benchmark can compare them with auditclip's.

    python benchmarks/reference.py RUN_DIR OUT_CSV
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.stats
from safetensors.torch import load_file

PCTS = [0.1, 1, 5, 50, 95, 99, 99.9]


def main(run: Path, out: Path) -> None:
    rows = []
    prev = None
    for path in sorted(run.glob("*.safetensors")):
        sd = {k: v.double().numpy().ravel() for k, v in load_file(str(path)).items()}  # bf16 too
        for name, x in sd.items():
            d = scipy.stats.describe(x)
            p = np.percentile(x, PCTS)
            row = {"checkpoint": path.name, "tensor": name, "mean": d.mean, "std": np.sqrt(d.variance * (d.nobs - 1) / d.nobs),
                   "skew": d.skewness, "kurtosis": d.kurtosis, "min": d.minmax[0], "max": d.minmax[1],
                   **{f"p{q}": v for q, v in zip(PCTS, p)}}
            if prev is not None and name in prev:
                row["ks"] = scipy.stats.ks_2samp(x, prev[name]).statistic
                row["wasserstein"] = scipy.stats.wasserstein_distance(x, prev[name])
            rows.append(row)
        prev = sd
    pd.DataFrame(rows).to_csv(out, index=False)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
