"""Property tests (hypothesis) and mutation fuzzing of safetensors files."""

from __future__ import annotations

import json
import math
import random
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from auditclip import CheckpointError, InputError, analyze, clip_state_dict, flag, open_checkpoint_file
from auditclip.config import ClipSettings, ClipSpec

FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
OTHERS = [torch.int64, torch.int32, torch.bool]
SPECIALS = [float("nan"), float("inf"), float("-inf"), 0.0, -0.0]


@st.composite
def tensors(draw):  # type: ignore[no-untyped-def]
    dtype = draw(st.sampled_from(FLOATS + OTHERS))
    shape = tuple(draw(st.lists(st.integers(0, 4), min_size=0, max_size=3)))
    n = math.prod(shape)
    if dtype in OTHERS:
        values = draw(st.lists(st.integers(-5, 5), min_size=n, max_size=n))
        return torch.tensor(values, dtype=torch.int64).reshape(shape).to(dtype)
    values = draw(st.lists(st.floats(-100, 100, width=16) | st.sampled_from(SPECIALS), min_size=n, max_size=n))
    return torch.tensor(values, dtype=torch.float64).reshape(shape).to(dtype)


state_dicts = st.dictionaries(st.sampled_from(["a.weight", "a.bias", "b.weight", "norm.weight", "steps"]), tensors(),
                              min_size=1, max_size=4)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(first=state_dicts, second=state_dicts)
def test_stats_drift_flag_never_crash_and_agree(tmp_path_factory: pytest.TempPathFactory, first, second) -> None:  # type: ignore[no-untyped-def]
    folder = tmp_path_factory.mktemp("prop")
    # the step in the metadata too: when first == second the files still differ (byte copies are folded)
    save_file({k: v.contiguous() for k, v in first.items()}, str(folder / "step_1.safetensors"), metadata={"step": "1"})
    save_file({k: v.contiguous() for k, v in second.items()}, str(folder / "step_2.safetensors"), metadata={"step": "2"})
    result = analyze(folder, workers=1)
    stats = result.stats.set_index(["step", "tensor"])
    for step, sd in ((1, first), (2, second)):
        for name, t in sd.items():
            row = stats.loc[(step, name)]
            assert row["numel"] == t.numel() and row["shape"] == "[" + ", ".join(map(str, t.shape)) + "]"
            if not t.is_floating_point():
                assert math.isnan(row["mean"])
                continue
            x = t.double().numpy().ravel()
            finite = x[np.isfinite(x)]
            assert row["n_nan"] == np.isnan(x).sum() and row["n_inf"] == np.isinf(x).sum()
            if finite.size:
                scale = max(np.abs(finite).max(), 1e-300)
                assert abs(row["mean"] - finite.mean()) <= 1e-9 * scale
                assert abs(row["std"] - finite.std()) <= 1e-9 * scale
                assert (row["min"], row["max"]) == (finite.min(), finite.max())
    assert set(result.drift.status) <= {"ok", "added", "removed", "shape_changed"}
    checkable = any(t.is_floating_point() and t.numel() for sd in (first, second) for t in sd.values())
    if checkable:
        flag(folder, max_abs=1.0)  # every rule on arbitrary tensors: no crash
    else:  # nothing a rule could look at: the gate refuses to pass rather than pass unchecked
        with pytest.raises(InputError, match="nothing was checked"):
            flag(folder, max_abs=1.0)


@settings(max_examples=40, deadline=None)
@given(sd=state_dicts, bound=st.sampled_from([0.01, 0.5, 3.0, 70.0]))
def test_clip_properties(sd, bound: float) -> None:  # type: ignore[no-untyped-def]
    settings_ = ClipSettings(spec=ClipSpec("max_abs", bound), exclude=("norm.*",))
    once, report = clip_state_dict(sd, settings_)
    twice, _ = clip_state_dict(once, settings_)
    assert list(once) == list(sd)
    for name, before in sd.items():
        after = once[name]
        assert after.dtype == before.dtype and after.shape == before.shape
        assert _bits(twice[name]) == _bits(after)  # idempotent
        if not before.is_floating_point() or name.startswith("norm."):
            assert _bits(after) == _bits(before)  # unselected: bit-identical
            continue
        x, y = before.double(), after.double()
        finite = torch.isfinite(y)
        assert bool((y[finite].abs() <= bound).all())
        assert bool(torch.isinf(y).sum() == 0)  # infinities are clipped to the bound
        assert bool(torch.isnan(y).eq(torch.isnan(x)).all())  # NaN stays NaN
        inside = x.abs() <= bound
        assert _bits(after[inside]) == _bits(before[inside])


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _mutations(data: bytes, rng: random.Random) -> list[bytes]:
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + size])
    out = [b"", data[:4], data[:8], data[: 8 + size // 2], data[:-1], data[: len(data) // 2], data + b"\x00" * 13]
    for _ in range(40):
        flipped = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(flipped))
            flipped[i] ^= 1 << rng.randrange(8)
        out.append(bytes(flipped))
    names = [k for k in header if k != "__metadata__"]
    for _ in range(40):
        h = json.loads(json.dumps(header))
        entry = h[rng.choice(names)]
        choice = rng.randrange(6)
        if choice == 0:
            entry["data_offsets"][1] += rng.choice([1, 4, 10**9])
        elif choice == 1:
            entry["data_offsets"] = [rng.randint(0, 10**6), rng.randint(0, 10)]
        elif choice == 2:
            entry["dtype"] = rng.choice(["F32", "BF16", "I8", "XX", 7])
        elif choice == 3:
            entry["shape"] = rng.choice([[10**12], [-1], [3, "a"], []])
        elif choice == 4:
            h["__metadata__"] = {"step": 5}
        else:
            del entry["dtype"]
        blob = json.dumps(h).encode()
        blob += b" " * (-len(blob) % 8)
        out.append(struct.pack("<Q", len(blob)) + blob + data[8 + size:])
    out.append(struct.pack("<Q", 2**62) + data[8:])
    return out


def test_mutated_safetensors_give_only_clean_errors(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    save_file({"w": torch.randn(8, 8, generator=g), "b": torch.randn(8, generator=g).bfloat16(),
               "n": torch.arange(4)}, str(tmp_path / "good.safetensors"), metadata={"step": "1"})
    data = (tmp_path / "good.safetensors").read_bytes()
    outcomes = {"ok": 0, "error": 0}
    for i, mutated in enumerate(_mutations(data, random.Random(0))):
        path = tmp_path / f"m{i}.safetensors"
        path.write_bytes(mutated)
        try:
            with open_checkpoint_file(path) as reader:
                for name in reader.names():
                    info = reader.info(name)
                    t = reader.get(name)
                    assert tuple(t.shape) == info.shape
            analyze([path], workers=1)
            outcomes["ok"] += 1
        except CheckpointError:
            outcomes["error"] += 1
    assert outcomes["error"] >= 10 and sum(outcomes.values()) >= 80
