"""Shared helpers: build real checkpoint files in a temporary directory."""

from __future__ import annotations

import json
from typing import Any
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_checkpoints"


def state_dict(seed: int = 0, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """A small real-looking state dict: fp32 matrices and biases, plus an int buffer."""
    g = torch.Generator().manual_seed(seed)
    return {
        "fc1.weight": torch.randn(16, 8, generator=g) * scale,
        "fc1.bias": torch.randn(16, generator=g) * scale,
        "fc2.weight": torch.randn(4, 16, generator=g) * scale,
        "fc2.bias": torch.zeros(4),
        "bn.num_batches_tracked": torch.tensor(7),
    }


def save_safetensors(path: Path, sd: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return path


def save_sharded(folder: Path, sd: dict[str, torch.Tensor], stem: str = "model", n_shards: int = 2) -> Path:
    """Write ``stem-0000i-of-0000n.safetensors`` shards and ``stem.safetensors.index.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(sd)
    weight_map = {}
    for i in range(n_shards):
        shard = f"{stem}-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {n: sd[n].contiguous() for n in names[i::n_shards]}
        save_file(part, str(folder / shard))
        weight_map.update(dict.fromkeys(part, shard))
    index = folder / f"{stem}.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return index


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """Four safetensors checkpoints step_0..step_30 that drift a little at each step."""
    base = state_dict(0)
    for i, step in enumerate([0, 10, 20, 30]):
        sd = {k: (v + 0.05 * i * torch.ones_like(v) if v.is_floating_point() else v) for k, v in base.items()}
        save_safetensors(tmp_path / "run" / f"step_{step}.safetensors", sd)
    return tmp_path / "run"


def record_live_tensors(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Count the tensors read through ``TensorReader.get`` still alive; ``["peak"]`` is the most at once."""
    import weakref

    from auditclip.formats.readers import TensorReader

    live: set[int] = set()
    counts = {"peak": 0}
    real_get = TensorReader.get

    def recording_get(self: TensorReader, name: str) -> torch.Tensor:
        t = real_get(self, name)
        key = id(t)
        live.add(key)
        weakref.finalize(t, live.discard, key)
        counts["peak"] = max(counts["peak"], len(live))
        return t

    monkeypatch.setattr(TensorReader, "get", recording_get)
    return counts


#: The stats.csv columns two reads of the same weights must agree on (to 1e-6 relative).
MOMENTS = ("mean", "std", "abs_max", "l2_norm")


def invoke_cli(*args: Any) -> Any:
    """Run the CLI in-process (arguments given as text: paths and numbers too); any exception but a
    clean exit, or a traceback in the output, fails."""
    from click.testing import CliRunner

    from auditclip.cli import cli

    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    return result


def csv_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a CSV auditclip wrote, as text (empty cells stay ``""``)."""
    import csv

    with path.open(encoding="utf-8") as f:
        return list(csv.DictReader(f))


def rows_by_step(path: Path) -> dict[tuple[int, str], dict[str, str]]:
    """A stats.csv/drift.csv as {(step, tensor): row}."""
    return {(int(r["step"]), r["tensor"]): r for r in csv_rows(path)}


def assert_same_stats(got_out: Path, want_out: Path) -> None:
    """Two ``drift`` outputs of the same weights read two ways agree: moments to 1e-6, drift too."""
    got, want = rows_by_step(got_out / "stats.csv"), rows_by_step(want_out / "stats.csv")
    assert got.keys() == want.keys() and len(want) > 2
    for where, row in want.items():
        assert (got[where]["dtype"], got[where]["shape"]) == (row["dtype"], row["shape"]), where
        for column in MOMENTS:
            if row[column] == "":  # std of a one-element tensor
                assert got[where][column] == "", (where, column)
            else:
                assert float(got[where][column]) == pytest.approx(float(row[column]), rel=1e-6, abs=1e-12), \
                    (where, column)
    got_drift, want_drift = rows_by_step(got_out / "drift.csv"), rows_by_step(want_out / "drift.csv")
    assert got_drift.keys() == want_drift.keys() and len(want_drift) > 0
    for where, row in want_drift.items():
        if row["rel_l2_change"]:
            assert float(got_drift[where]["rel_l2_change"]) == pytest.approx(float(row["rel_l2_change"]), rel=1e-6)
        else:
            assert got_drift[where]["rel_l2_change"] == ""
