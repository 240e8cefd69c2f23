"""DeepSpeed runs written by DeepSpeed itself, trained once per test session and shared.

``tests/scripts/deepspeed_train.py`` trains a tiny model under each ``STAGE:DTYPE`` in one
subprocess (two data-parallel ranks on CPU, gloo); it takes some seconds, so every test
module that reads DeepSpeed runs asks :func:`deepspeed_runs` for the same set and the
first one pays. DeepSpeed is never imported in the test process (it sets up its
accelerator and torch.distributed globally): ``find_spec`` only.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "deepspeed_train.py"
#: ZeRO-2 in bf16, ZeRO-3 in fp32, ZeRO-0 in bf16: ``OUT/<stage>_<dtype>/run/`` each
RUNS = ("2:bf16", "3:fp32", "0:bf16")

_trained: dict[tuple[str, ...], Path | str] = {}  # the runs' folder, or why they could not be written


def deepspeed_runs(tmp_path_factory: pytest.TempPathFactory, runs: tuple[str, ...] = RUNS) -> Path:
    """The folder holding ``<stage>_<dtype>/run/`` and ``expected/`` of each of ``runs``; skips without DeepSpeed."""
    if runs not in _trained:
        _trained[runs] = _train(tmp_path_factory, runs)
    out = _trained[runs]
    if isinstance(out, str):
        pytest.skip(out)
    return out


def _train(tmp_path_factory: pytest.TempPathFactory, runs: tuple[str, ...]) -> Path | str:
    if importlib.util.find_spec("deepspeed") is None:
        return "deepspeed is not installed"
    out = tmp_path_factory.mktemp("deepspeed")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out), "2", *runs],
                          capture_output=True, text=True, timeout=600, env=env)
    skip = [line for line in proc.stdout.splitlines() if line.startswith("SKIP ")]
    if skip:
        return skip[0][5:]
    assert proc.returncode == 0 and "DONE" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
    return out
