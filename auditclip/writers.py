"""Writing checkpoints: a streaming safetensors writer and atomic PyTorch saves.

The safetensors writer lays out the header from names, dtypes and shapes alone
(they do not change when clipping), then writes one tensor at a time, so a
checkpoint is never held whole in memory. Tensors are ordered by element size,
then name, so each starts at an offset aligned to its own size; metadata keys
are written sorted, so the same input gives the same bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .output import atomic_path

_CODES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2", "float8_e8m0fnu": "F8_E8M0",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8",
    "uint64": "U64", "uint32": "U32", "uint16": "U16", "uint8": "U8", "bool": "BOOL", "complex64": "C64",
}

Entry = tuple[str, torch.dtype, tuple[int, ...]]


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_safetensors(
    dest: str | os.PathLike[str],
    entries: Sequence[Entry],
    produce: Callable[[str], torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write a safetensors file tensor by tensor, atomically.

    ``entries`` lists (name, dtype, shape); ``produce(name)`` returns each tensor
    when its turn comes, and must match the announced dtype and shape.

    >>> t = {"w": torch.ones(2, 2)}
    >>> write_safetensors("/tmp/x.safetensors", [("w", torch.float32, (2, 2))], t.__getitem__)  # doctest: +SKIP
    """
    ordered = sorted(entries, key=lambda e: (-e[1].itemsize, e[0]))
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
    offset = 0
    for name, dtype, shape in ordered:
        size = dtype.itemsize * int(torch.Size(shape).numel())
        header[name] = {"dtype": _CODES[str(dtype).removeprefix("torch.")], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    dest = Path(dest)
    with atomic_path(dest) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, dtype, shape in ordered:
            t = produce(name)
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise ValueError(f"{name}: produced {t.dtype} {tuple(t.shape)}, announced {dtype} {tuple(shape)}")
            if t.numel():  # the tensor's own bytes, written without another copy
                f.write(memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()))
        f.flush()
        os.fsync(f.fileno())
    return dest


def save_torch(obj: object, dest: str | os.PathLike[str]) -> Path:
    """``torch.save`` to a temporary file beside ``dest``, then rename it into place."""
    dest = Path(dest)
    with atomic_path(dest) as tmp:
        torch.save(obj, tmp)
    return dest


def write_json(doc: object, dest: str | os.PathLike[str]) -> Path:
    dest = Path(dest)
    with atomic_path(dest) as tmp:
        tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return dest
