"""Write a DeepSpeed tag folder with some tensors changed, so ``engine.load_checkpoint`` still loads it.

A DeepSpeed checkpoint keeps up to two copies of each trainable parameter
(:mod:`auditclip.formats.deepspeed` says where): the weights the model runs with in
``module`` (bf16/fp16/fp32; empty placeholders at ZeRO-3) and the fp32 master copy
spread over the ranks' ``*_optim_states.pt`` flat groups. ``engine.load_checkpoint``
loads ``module`` first, then (ZeRO 1-3, ``zero_load_from_fp32_weights`` on by default)
restores the master partitions and copies them back into the model. A clip written
into ``module`` alone would therefore be undone by the resume: both copies must
change together, and that is what :func:`rewrite_deepspeed_tag` does.

How: every file of the tag folder is copied byte for byte to a temporary file beside
its destination; then, one tensor at a time, the full tensor of each copy is read
(a ZeRO-3 parameter reassembled from every rank), handed to ``transform``, and the
changed copies are written back over the same bytes of the storage records (the
layout, pickles, optimizer moments and every other entry stay as they were); the
CRC-32 of each touched zip record is recomputed, streaming; then every file is renamed
into place. Memory is one tensor (and a storage record only for a strided module
tensor). A file changed since it was indexed, or while it is copied, is refused
(``changed``); nothing is left under the final names on failure.

Not written (refused by the caller, :mod:`auditclip.clip_files`): ZeRO-0 in bf16/fp16,
whose fp32 master copy is an unnamed list inside ``module``'s file.

>>> import tempfile, torch
>>> from pathlib import Path
>>> from auditclip.formats.deepspeed import read_deepspeed_index, read_deepspeed_tensor
>>> tag = Path(tempfile.mkdtemp()) / "global_step1"
>>> tag.mkdir()
>>> torch.save({"module": {"w": torch.tensor([3.0, -0.5])}, "buffer_names": [], "param_shapes": None},
...            tag / "mp_rank_00_model_states.pt")
>>> out = Path(tempfile.mkdtemp()) / "global_step1"
>>> def halve(entry, copies):
...     return {k: v / 2 for k, v in copies.items()}
>>> written = rewrite_deepspeed_tag(read_deepspeed_index(tag), out, halve)
>>> read_deepspeed_tensor(read_deepspeed_index(out), "w").tolist()
[1.5, -0.25]
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from contextlib import ExitStack
from pathlib import Path

import torch

from auditclip.errors import CheckpointError
from auditclip.formats.deepspeed import DeepSpeedIndex, DeepSpeedPiece, DeepSpeedTensor, read_deepspeed_tensor
from auditclip.formats.dtypes import torch_dtype
from auditclip.formats.torch_pickle import zip_byteorder
from auditclip.formats.torch_zip import ZipRecord, fix_crcs, zip_records
from auditclip.formats.writers import patchable_copies

__all__ = ["Transform", "copies_of", "rewrite_deepspeed_tag"]

#: ``transform(entry, copies)``: given a tensor's entry and its full copies by name
#: (``"master"``: the fp32 copy in the optimizer files; ``"module"``: the model's copy),
#: the copies to write back (same shapes and dtypes); a copy left out is kept as is.
Transform = Callable[[DeepSpeedTensor, Mapping[str, torch.Tensor]], Mapping[str, torch.Tensor]]


def copies_of(index: DeepSpeedIndex, entry: DeepSpeedTensor) -> dict[str, torch.Tensor]:
    """The copies of one tensor the checkpoint holds, read in full: ``master`` and/or ``module``.

    ZeRO-3 placeholders are no copy; a frozen parameter's fragments are its ``module`` copy.
    """
    copies: dict[str, torch.Tensor] = {}
    if entry.role == "parameter" and entry.master_dtype:
        copies["master"] = read_deepspeed_tensor(index, entry.name, "master")
    if entry.module_dtype is not None and (entry.module or not entry.numel):
        copies["module"] = read_deepspeed_tensor(index, entry.name, "module")
    return copies


def _bytes_of(t: torch.Tensor) -> memoryview:
    return memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


class _Outputs:
    """The temporary copies of a tag folder's files, written in place and renamed into place at the end."""

    def __init__(self, index: DeepSpeedIndex, dst: Path, stack: ExitStack) -> None:
        self.index, self.handles, self.records = index, {}, {}
        self.dirty: dict[str, set[int]] = {}
        for name, (f, out) in patchable_copies(index.folder, dst, index.files, stack, "DeepSpeed tag folder").items():
            self.handles[name] = out
            if name in index.files:  # a file the index reads tensors from: its zip records
                if zip_byteorder(f) not in (None, "little"):
                    raise CheckpointError(f.path, "records big-endian tensors; clip writes little-endian files only",
                                          kind="unsupported")
                self.records[name] = zip_records(f)

    def write(self, piece: DeepSpeedPiece, values: torch.Tensor) -> None:
        """Write ``values`` (the piece's elements, in order) over the piece's bytes."""
        out = self.handles[piece.file]
        record = self.records.get(piece.file, {}).get(piece.storage)
        if record is None:
            raise CheckpointError(self.index.folder / piece.file, "a tensor's storage is not a stored zip record")
        size = values.element_size()
        if piece.stride is None:
            start = piece.storage + piece.start * size
            data = _bytes_of(values)
            if start + len(data) > record.data + record.size:
                raise CheckpointError(self.index.folder / piece.file, "a tensor reaches beyond its storage")
            out.seek(start)
            out.write(data)
        else:  # a strided view: rewrite its storage record through the view
            raw = bytearray(record.size)
            out.seek(record.data)
            out.readinto(raw)
            storage = torch.frombuffer(raw, dtype=torch.uint8).view(values.dtype)
            storage.as_strided(piece.shape, piece.stride, piece.start).copy_(values.reshape(piece.shape))
            out.seek(record.data)
            out.write(raw)
        self.dirty.setdefault(piece.file, set()).add(piece.storage)

    def finish(self) -> None:
        for name, out in self.handles.items():
            records: list[ZipRecord] = [self.records[name][s] for s in sorted(self.dirty.get(name, ()))]
            fix_crcs(out, records)
            out.flush()
            os.fsync(out.fileno())


def _pieces(entry: DeepSpeedTensor, copy: str) -> tuple[DeepSpeedPiece, ...]:
    return entry.master if copy == "master" else entry.module


def _write_copy(outputs: _Outputs | None, entry: DeepSpeedTensor, copy: str, old: torch.Tensor,
                new: torch.Tensor) -> None:
    if new.shape != old.shape or new.dtype != old.dtype:
        raise ValueError(f"{entry.name}: the {copy} copy came back as {new.dtype} {list(new.shape)}, "
                         f"not {old.dtype} {list(old.shape)}")
    # bytes, not values: a NaN stays "unchanged", -0.0 vs 0.0 is a change
    if outputs is None or torch.equal(new.reshape(-1).view(torch.uint8), old.reshape(-1).view(torch.uint8)):
        return
    flat, pos = new.reshape(-1), 0
    for piece in _pieces(entry, copy):
        outputs.write(piece, flat[pos:pos + piece.numel])
        pos += piece.numel


def rewrite_deepspeed_tag(index: DeepSpeedIndex, dst: str | os.PathLike[str], transform: Transform,
                          dry_run: bool = False) -> list[Path]:
    """Copy the tag folder ``index`` describes to ``dst``, each tensor's copies replaced by ``transform``'s.

    Returns the files written (none with ``dry_run``, where ``transform`` still sees every
    tensor). Tied aliases are written through the tensor that holds their data. See the
    module docstring for what is kept and how the write stays atomic.
    """
    dst = Path(dst)
    with ExitStack() as stack:
        outputs = None
        if not dry_run:
            dst.mkdir(parents=True, exist_ok=True)
            outputs = _Outputs(index, dst, stack)
        for entry in index.tensors.values():
            if not entry.numel:
                continue
            copies = copies_of(index, entry)
            if not copies:
                continue
            changed = transform(entry, copies)
            for copy, new in changed.items():
                if copy not in copies:
                    raise ValueError(f"{entry.name} has no {copy} copy to write")
                dtype = torch_dtype(entry.master_dtype if copy == "master" else entry.module_dtype or "")
                if dtype is not None and new.dtype != dtype:
                    raise ValueError(f"{entry.name}: the {copy} copy must stay {dtype}")
                _write_copy(outputs, entry, copy, copies[copy], new)
        if outputs is None:
            return []
        outputs.finish()
        written = [dst / name for name in outputs.handles]
    return written
