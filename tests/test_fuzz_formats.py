"""Structure-aware fuzzing: safetensors headers built field by field, and container bombs.

Every generated file must either read exactly as the format's own library reads
it, or be refused with a :class:`CheckpointError`; nothing else may escape, and
nothing may hang (each case is tiny, so the whole file runs in seconds).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from auditclip import CheckpointError, open_checkpoint_file
from auditclip.formats.dtypes import SAFETENSORS

CODES = sorted(SAFETENSORS) + ["F8", "X", "", "f32", "I128"]


@st.composite
def headers(draw):  # type: ignore[no-untyped-def]
    """A header that is mostly well formed, with one or more fields bent."""
    n = draw(st.integers(0, 4))
    entries, offset = {}, 0
    for i in range(n):
        code = draw(st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "F8_E4M3", "BOOL", "F4"]))
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        bits = SAFETENSORS[code][1]
        size = (int(np.prod(shape)) * bits + 7) // 8
        entries[f"t{i}"] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    data = draw(st.binary(min_size=offset, max_size=offset))
    mutation = draw(st.sampled_from(["none", "dtype", "shape", "offsets", "extra_data", "short_data", "metadata",
                                     "entry_type", "swap", "length"]))
    names = list(entries)
    if names and mutation == "dtype":
        entries[draw(st.sampled_from(names))]["dtype"] = draw(st.sampled_from(CODES) | st.integers() | st.none())
    elif names and mutation == "shape":
        entries[draw(st.sampled_from(names))]["shape"] = draw(
            st.lists(st.integers(-2, 2**70) | st.booleans() | st.floats(allow_nan=False) | st.text(max_size=2),
                     max_size=4) | st.integers() | st.none())
    elif names and mutation == "offsets":
        entries[draw(st.sampled_from(names))]["data_offsets"] = draw(
            st.lists(st.integers(-5, offset + 5) | st.integers() | st.none(), max_size=3))
    elif mutation == "extra_data":
        data += draw(st.binary(min_size=1, max_size=9))
    elif mutation == "short_data" and data:
        data = data[: draw(st.integers(0, len(data) - 1))]
    elif mutation == "metadata":
        entries["__metadata__"] = draw(st.dictionaries(st.text(max_size=3), st.text(max_size=3) | st.integers(),
                                                       max_size=2) | st.integers() | st.lists(st.integers()))
    elif names and mutation == "entry_type":
        entries[draw(st.sampled_from(names))] = draw(st.integers() | st.text(max_size=3) | st.lists(st.integers()))
    elif len(names) > 1 and mutation == "swap":
        a, b = names[0], names[1]
        entries[a]["data_offsets"], entries[b]["data_offsets"] = entries[b]["data_offsets"], entries[a]["data_offsets"]
    blob = json.dumps(entries).encode()
    length = len(blob)
    if mutation == "length":
        length = draw(st.sampled_from([0, 1, length - 1, length + 1, 2**63, 2**64 - 1]))
    return struct.pack("<Q", max(0, min(length, 2**64 - 1))) + blob + data


def _reference(path: Path) -> dict[str, torch.Tensor] | None:
    """What the safetensors library itself reads, or None when it refuses the file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception:
        return None


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=headers())
def test_structured_headers_read_as_safetensors_reads_them_or_fail_cleanly(
        tmp_path_factory: pytest.TempPathFactory, raw: bytes) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "x.safetensors"
    path.write_bytes(raw)
    reference = _reference(path)
    try:
        with open_checkpoint_file(path) as reader:
            got = {}
            for name in reader.names():
                info = reader.info(name)
                got[name] = reader.get(name) if info.dtype != "f4" else reader.raw_bytes(name)
    except CheckpointError:
        return  # refused with a message: fine, whatever safetensors thinks
    if reference is None:
        # we read what safetensors refuses only where it lacks a dtype we list (sub-byte floats)
        assert any(isinstance(v, bytes) for v in got.values()), raw[:200]
        return
    for name, t in reference.items():
        ours = got[name]
        if isinstance(ours, bytes):
            continue
        assert ours.dtype == t.dtype and ours.shape == t.shape
        assert ours.reshape(-1).view(torch.uint8).tolist() == t.reshape(-1).view(torch.uint8).tolist(), name


@st.composite
def containers(draw):  # type: ignore[no-untyped-def]
    """Nested dicts with sharing, cycles and depth: the shapes a hostile pickle can take."""
    depth = draw(st.integers(1, 90))
    fan = draw(st.integers(1, 3))
    share = draw(st.booleans())
    leaf: dict = {"w": torch.arange(3, dtype=torch.float32)}
    node = leaf
    for level in range(depth):
        if share:
            node = {f"k{j}": node for j in range(fan)}
        else:
            node = {f"k{j}": (node if j == 0 else {"b": torch.zeros(1)}) for j in range(fan)}
    if draw(st.booleans()):
        leaf["loop"] = node  # a cycle back to the top
    return node, depth, fan, share


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=containers())
def test_container_shapes_read_or_are_refused_never_hang(tmp_path_factory: pytest.TempPathFactory, case) -> None:  # type: ignore[no-untyped-def]
    node, depth, fan, share = case
    path = tmp_path_factory.mktemp("bomb") / "x.pt"
    torch.save({"state_dict": node}, path)
    try:
        with open_checkpoint_file(path) as reader:
            names = reader.names()
            shapes = [reader.info(n).shape for n in names[:5]]
    except CheckpointError as exc:
        assert "refused" in exc.message
        assert depth + 1 > 64 or (share and fan > 1 and fan**depth > 10_000)
        return
    # shared sub-dicts reach one tensor by many paths: tied, so listed once (auditclip.formats.readers.untie)
    paths = 1 if share else 1 + depth * (fan - 1)
    assert len(names) == paths
    assert all(shape in ((3,), (1,)) for shape in shapes)
