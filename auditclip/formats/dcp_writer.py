"""Write a ``torch.distributed.checkpoint`` folder with some tensors changed, so ``dcp.load`` still loads it.

A DCP storage file (``__<rank>_<i>.distcp``) is a run of independent ``torch.save``
archives, one per saved piece of a tensor, at the offsets ``.metadata`` records
(:mod:`auditclip.formats.dcp`). A changed tensor keeps its dtype and shape, so every
piece keeps its length: :func:`rewrite_dcp_folder` copies every file of the folder
byte for byte to a temporary file beside its destination (``.metadata``, Lightning's
``meta.pt``, the optimizer's pieces...), then, one tensor at a time, reads the full
tensor (reassembled from every rank's pieces), hands it to ``transform``, and writes
each piece's new values over the storage record inside that piece's archive, updating
the archive's CRC-32 fields; ``.metadata`` stays valid as it is. Then every file is
renamed into place. Memory: one tensor and one piece's archive. A file changed since
it was indexed or while copied is refused (``changed``); nothing is left under the
final names on failure.

>>> import tempfile, warnings, torch, torch.distributed.checkpoint as dcp
>>> from pathlib import Path
>>> from auditclip.formats.dcp import read_dcp_index, read_dcp_tensor
>>> src, dst = Path(tempfile.mkdtemp()), Path(tempfile.mkdtemp()) / "out"
>>> with warnings.catch_warnings():
...     warnings.simplefilter("ignore")
...     _ = dcp.save({"model": {"w": torch.tensor([3.0, -0.5])}, "step": 7}, checkpoint_id=src)
>>> index = read_dcp_index(src)
>>> _ = rewrite_dcp_folder(index, dst, ["model.w"], lambda entry, t: t.clamp(-1, 1))
>>> read_dcp_tensor(read_dcp_index(dst), "w").tolist()
[1.0, -0.5]
"""

from __future__ import annotations

import io
import os
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from pathlib import Path
from typing import Any, BinaryIO

import torch

from auditclip.errors import CheckpointError
from auditclip.formats.dcp import DcpChunk, DcpIndex, DcpTensor, read_dcp_tensor
from auditclip.formats.torch_zip import zip_records
from auditclip.formats.writers import patchable_copies

__all__ = ["rewrite_dcp_folder"]

#: ``transform(entry, full)``: the new full tensor (same dtype and shape), or None to keep it.
Transform = Callable[[DcpTensor, torch.Tensor], "torch.Tensor | None"]


class _Archive:
    """One piece's ``torch.save`` archive held in memory, read like a ``PinnedFile`` by :func:`zip_records`."""

    def __init__(self, blob: bytearray, path: Path) -> None:
        self.blob, self.path, self.size = blob, path, len(blob)

    def read(self, offset: int, size: int) -> bytes:
        return bytes(self.blob[offset:offset + size])

    def dup(self) -> BinaryIO:
        return io.BytesIO(bytes(self.blob))


def _patch_piece(out: BinaryIO, chunk: DcpChunk, values: torch.Tensor, path: Path) -> None:
    """Write ``values`` over the tensor stored in the archive of ``chunk`` in ``out``, CRCs updated."""
    out.seek(chunk.offset)
    blob = bytearray(out.read(chunk.length))
    if len(blob) != chunk.length:
        raise CheckpointError(path, f"a piece at bytes {chunk.offset}..{chunk.offset + chunk.length} lies beyond "
                                    "the end of the file")
    archive = _Archive(blob, path)
    stored = torch.load(io.BytesIO(bytes(blob)), map_location="meta", weights_only=True)
    if not isinstance(stored, torch.Tensor):
        raise CheckpointError(path, f"the piece at byte {chunk.offset} is a {type(stored).__name__}, not a tensor")
    with zipfile.ZipFile(archive.dup()) as z:
        data = [i.filename for i in z.infolist() if "/data/" in i.filename and not i.filename.endswith("/")]
    records = [r for r in zip_records(archive).values() if r.name in data]
    if len(records) != 1:
        raise CheckpointError(path, f"the piece at byte {chunk.offset} stores {len(records)} tensor records; "
                                    "auditclip writes pieces of one storage", kind="unsupported")
    record = records[0]
    raw = blob[record.data:record.data + record.size]
    storage = torch.frombuffer(raw, dtype=torch.uint8).view(stored.dtype) if raw else torch.empty(0, dtype=stored.dtype)
    storage.as_strided(tuple(stored.shape), tuple(stored.stride()), stored.storage_offset()).copy_(values)
    blob[record.data:record.data + record.size] = raw
    crc = struct.pack("<I", zlib.crc32(raw))
    for at in record.crc_at:
        blob[at:at + 4] = crc
    out.seek(chunk.offset)
    out.write(blob)


def rewrite_dcp_folder(index: DcpIndex, dst: str | os.PathLike[str], keys: Iterable[str], transform: Transform,
                       dry_run: bool = False) -> list[Path]:
    """Copy the DCP folder ``index`` describes to ``dst``, the tensors ``keys`` (stored keys) replaced by ``transform``'s.

    Returns the files written (none with ``dry_run``, where ``transform`` still sees every
    tensor). Every other entry (optimizer state, bytes entries, files beside ``.metadata``)
    is copied byte for byte. See the module docstring.
    """
    dst = Path(dst)
    with ExitStack() as stack:
        handles: dict[str, Any] = {}
        if not dry_run:
            handles = {name: out for name, (_, out) in
                       patchable_copies(index.folder, dst, index.files, stack, "DCP folder").items()}
        for key in keys:
            entry = index.tensor(key)
            if not entry.numel:
                continue
            full = read_dcp_tensor(index, entry.key)
            new = transform(entry, full)
            if new is None:
                continue
            if new.shape != full.shape or new.dtype != full.dtype:
                raise ValueError(f"{entry.key}: the new tensor is {new.dtype} {list(new.shape)}, "
                                 f"not {full.dtype} {list(full.shape)}")
            # bytes, not values: a NaN stays "unchanged"
            if dry_run or torch.equal(new.reshape(-1).view(torch.uint8), full.reshape(-1).view(torch.uint8)):
                continue
            for chunk in entry.chunks:
                if not chunk.numel:
                    continue
                box = tuple(slice(o, o + s) for o, s in zip(chunk.offsets, chunk.sizes))
                _patch_piece(handles[chunk.file], chunk, new[box], index.folder / chunk.file)
        if dry_run:
            return []
        for out in handles.values():
            out.flush()
            os.fsync(out.fileno())
        written = [dst / name for name in handles]
    return written
