"""Shared helpers: build real checkpoint files in a temporary directory."""

from __future__ import annotations

import json
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
