"""The safetensors family: a header parsed and validated here, each tensor read with ``pread`` when asked for.

The header is checked before any tensor is read: offsets inside the file, tensors
contiguous and not overlapping, sizes matching dtype and shape; headers above
safetensors' own 100 MB limit are refused before they are read.

>>> import tempfile, torch
>>> from safetensors.torch import save_file
>>> path = Path(tempfile.mkdtemp()) / "w.safetensors"
>>> save_file({"w": torch.ones(2)}, path, metadata={"step": "3"})
>>> source = SafetensorsSource(path)
>>> source.raw_info("w"), source.raw_get("w").tolist(), read_safetensors_metadata(path)
(('float32', (2,)), [1.0, 1.0], {'step': '3'})
>>> source.close()
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import NamedTuple

import torch

from ..errors import CheckpointError
from .dtypes import SAFETENSORS, torch_dtype
from .pinned import PinnedFile, read_strided
from .source import Source, one_line

__all__ = ["MAX_HEADER_BYTES", "SafetensorsSource", "read_safetensors_header", "read_safetensors_metadata"]

#: safetensors refuses headers above 100 MB; so do we, before reading one.
MAX_HEADER_BYTES = 100_000_000


class _Entry(NamedTuple):
    dtype: str  # torch dtype name, or the lower-case safetensors code for sub-byte floats
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int


def read_safetensors_header(f: PinnedFile) -> tuple[dict[str, _Entry], dict[str, str]]:
    """Parse and validate a safetensors header: every tensor's dtype, shape and byte span.

    The checks are the format's own: a header inside the file, JSON naming a known
    dtype, non-negative integer shapes, and byte spans that match dtype x shape,
    follow each other without gap or overlap and end where the file ends.
    """
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f.path, f"not a readable safetensors file: {why}")

    if f.size < 8:
        raise bad(f"only {f.size} bytes")
    n = int.from_bytes(f.read(0, 8), "little")
    if n > MAX_HEADER_BYTES or 8 + n > f.size:
        raise bad(f"header length {n} does not fit the file ({f.size} bytes)")
    try:
        doc = json.loads(f.read(8, n).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise bad(f"header is not valid JSON ({one_line(exc)[:100]})") from None
    if not isinstance(doc, dict):
        raise bad("header is not a JSON object")
    meta = doc.pop("__metadata__", None)
    meta = {} if meta is None else meta
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise bad("__metadata__ must map names to strings")
    base, data_size = 8 + n, f.size - 8 - n
    entries: dict[str, _Entry] = {}
    spans = []
    for name, e in doc.items():  # written for speed: MoE checkpoints hold 100,000 entries
        if type(e) is not dict:
            raise bad(f"entry {name[:80]!r} is not an object")
        code, shape, offsets = e.get("dtype"), e.get("shape"), e.get("data_offsets")
        if type(code) is not str or code not in SAFETENSORS:
            raise bad(f"tensor {name[:80]!r} has unknown dtype {str(code)[:20]!r}")
        if type(shape) is not list or not all(type(d) is int and d >= 0 for d in shape):
            raise bad(f"tensor {name[:80]!r} has an invalid shape")
        if (type(offsets) is not list or len(offsets) != 2 or type(offsets[0]) is not int
                or type(offsets[1]) is not int or not 0 <= offsets[0] <= offsets[1] <= data_size):
            raise bad(f"tensor {name[:80]!r} has data offsets outside the file")
        torch_name, bits = SAFETENSORS[code]
        bits *= math.prod(shape)
        if bits % 8 or bits // 8 != offsets[1] - offsets[0]:
            raise bad(f"tensor {name[:80]!r}: {offsets[1] - offsets[0]} bytes do not hold {code} of shape {shape}")
        entries[name] = _Entry(torch_name, tuple(shape), base + offsets[0], base + offsets[1])
        spans.append(offsets)
    spans.sort()  # lists of two ints: sorted by begin, then end
    position = 0
    for begin, end in spans:
        if begin != position:
            raise bad("tensor data overlaps or leaves a gap")
        position = end
    if position != data_size:
        raise bad(f"{data_size - position} bytes after the last tensor")
    return entries, {str(k): v for k, v in meta.items()}


class SafetensorsSource(Source):
    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = PinnedFile(path)
        try:
            self._entries, self.metadata = read_safetensors_header(self._file)
        except BaseException:
            self._file.close()
            raise

    def raw_names(self) -> list[str]:
        return list(self._entries)

    def raw_info(self, raw: str) -> tuple[str, tuple[int, ...]]:
        e = self._entries[raw]
        return e.dtype, e.shape

    def raw_get(self, raw: str) -> torch.Tensor:
        e = self._entries[raw]
        dtype = torch_dtype(e.dtype)
        if dtype is None:
            raise CheckpointError(self.path, f"tensor {raw!r} has dtype {e.dtype}, which torch cannot hold",
                                  kind="unsupported")
        try:
            return read_strided(self._file, e.begin, e.end - e.begin, dtype, e.shape)
        except CheckpointError:
            raise
        except (RuntimeError, ValueError, OverflowError, MemoryError) as exc:
            raise CheckpointError(self.path, f"cannot read tensor {raw!r}: {one_line(exc)}") from exc

    def raw_bytes(self, raw: str) -> bytes:
        e = self._entries[raw]
        return self._file.read(e.begin, e.end - e.begin)

    def close(self) -> None:
        self._file.close()


def _metadata_only(f: PinnedFile) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file without decoding its (maybe 100,000-entry) header.

    Writers put ``__metadata__`` first; then only that object is decoded. Otherwise the
    whole header is. Listing a run needs nothing more; the file is validated when read.
    """
    n = int.from_bytes(f.read(0, 8), "little") if f.size >= 8 else 0
    if not 0 < n <= min(MAX_HEADER_BYTES, f.size - 8):
        return {}
    raw = f.read(8, n)
    if b'"__metadata__"' not in raw:
        return {}
    prefix = b'{"__metadata__":'
    meta = None
    try:
        if raw.startswith(prefix):
            meta, _ = json.JSONDecoder().raw_decode(raw.decode("utf-8"), len(prefix))
        else:
            doc = json.loads(raw.decode("utf-8"))
            meta = doc.get("__metadata__") if isinstance(doc, dict) else None
    except (ValueError, RecursionError):
        return {}
    return {str(k): v for k, v in meta.items() if isinstance(v, str)} if isinstance(meta, dict) else {}


def read_safetensors_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of one safetensors file, or {} (a broken file is reported when it is read)."""
    try:
        f = PinnedFile(path)
        try:
            return _metadata_only(f)
        finally:
            f.close()
    except Exception:  # a broken file is reported when it is read, not while listing the run
        return {}
