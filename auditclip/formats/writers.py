"""Writing checkpoints: a streaming safetensors writer and atomic PyTorch saves.

The safetensors writer lays out the header from names, dtypes and shapes alone
(they do not change when clipping), then writes one tensor at a time, so a
checkpoint is never held whole in memory. Tensors are ordered by element size,
then name, so each starts at an offset aligned to its own size; metadata keys
are written sorted, so the same input gives the same bytes.
"""

from __future__ import annotations

import hashlib
import math
import json
import os
import shutil
import struct
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any, BinaryIO

import torch

from ..errors import CheckpointError, InputError
from ..output import atomic_path
from .dtypes import CODE_OF, SAFETENSORS, dtype_name
from .pinned import PinnedFile
from .remote import open_binary


Entry = tuple[str, "torch.dtype | str", tuple[int, ...]]


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open_binary(path) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def copy_file(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Copy ``src`` to ``dst`` byte for byte, streamed, with its permissions and times; a
    remote run's file is copied from its object (:func:`~auditclip.formats.remote.open_binary`).

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp()); _ = (d / "a").write_bytes(b"xy"); copy_file(d / "a", d / "b")
    >>> (d / "b").read_bytes()
    b'xy'
    """
    with open_binary(src) as f, open(dst, "wb") as out:
        shutil.copyfileobj(f, out, 1 << 20)
    shutil.copystat(src, dst, follow_symlinks=True)


def write_safetensors(
    dest: str | os.PathLike[str],
    entries: Sequence[Entry],
    produce: Callable[[str], torch.Tensor | bytes],
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write a safetensors file tensor by tensor, atomically.

    ``entries`` lists (name, dtype, shape), the dtype a torch dtype or a name from
    :data:`auditclip.formats.dtypes.SAFETENSORS` (``"f4"`` for packed sub-byte floats);
    ``produce(name)`` returns each tensor when its turn comes, matching the
    announced dtype and shape, or its stored bytes.

    >>> import tempfile
    >>> dest = Path(tempfile.mkdtemp()) / "x.safetensors"
    >>> _ = write_safetensors(dest, [("w", torch.float32, (2, 2))], {"w": torch.ones(2, 2)}.__getitem__)
    >>> from safetensors.torch import load_file
    >>> load_file(str(dest))["w"].sum().item()
    4.0
    """
    def code_bits(dtype: torch.dtype | str) -> tuple[str, int]:
        name = dtype if isinstance(dtype, str) else dtype_name(dtype)
        if name not in CODE_OF:
            raise InputError(f"safetensors cannot hold dtype {name}")
        return CODE_OF[name], SAFETENSORS[CODE_OF[name]][1]

    ordered = sorted(entries, key=lambda e: (-code_bits(e[1])[1], e[0]))
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
    offset = 0
    for name, dtype, shape in ordered:
        code, bits = code_bits(dtype)
        size = (bits * math.prod(shape) + 7) // 8
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned
    dest = Path(dest)
    with atomic_path(dest) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, dtype, shape in ordered:
            t = produce(name)
            size = header[name]["data_offsets"][1] - header[name]["data_offsets"][0]  # type: ignore[index]
            if isinstance(t, (bytes, bytearray, memoryview)):
                if len(t) != size:
                    raise ValueError(f"{name}: produced {len(t)} bytes, announced {size}")
                f.write(t)
                continue
            if dtype_name(t.dtype) != (dtype if isinstance(dtype, str) else dtype_name(dtype)) or tuple(t.shape) != tuple(shape):
                raise ValueError(f"{name}: produced {t.dtype} {tuple(t.shape)}, announced {dtype} {tuple(shape)}")
            if t.numel():  # the tensor's own bytes, written without another copy
                f.write(memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()))
        f.flush()
        os.fsync(f.fileno())
    return dest


def save_torch(obj: object, dest: str | os.PathLike[str]) -> Path:
    """``torch.save`` to a temporary file beside ``dest``, then rename it into place."""
    dest = Path(dest)
    # Through a Python file object, so a full disk raises OSError (a path gives torch's
    # RuntimeError), which atomic_path turns into a one-line error.
    with atomic_path(dest) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
    return dest


def write_patched_copy(source: BinaryIO, dest: str | os.PathLike[str],
                       patches: Iterable[tuple[int, bytes]]) -> Path:
    """Copy ``source`` (read from its start) to ``dest`` atomically, then overwrite byte ranges.

    ``patches`` yields (offset, bytes) pairs, each inside the copied file (the size never
    changes); it is consumed after the copy, so a caller can produce one patch at a time.

    >>> import io, tempfile
    >>> dest = Path(tempfile.mkdtemp()) / "x.bin"
    >>> write_patched_copy(io.BytesIO(b"abcdef"), dest, [(1, b"XY")]).read_bytes()
    b'aXYdef'
    """
    dest = Path(dest)
    with atomic_path(dest) as tmp, open(tmp, "wb") as f:
        shutil.copyfileobj(source, f, 1 << 20)
        size = f.tell()
        for offset, data in patches:
            if offset < 0 or offset + len(data) > size:
                raise ValueError(f"a patch of {len(data)} bytes at {offset} lies outside the {size}-byte copy")
            f.seek(offset)
            f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return dest


def write_json(doc: object, dest: str | os.PathLike[str]) -> Path:
    dest = Path(dest)
    with atomic_path(dest) as tmp:
        tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return dest


#: Beside an output whose format has no metadata of its own (torch pickles, DeepSpeed tag
#: folders), its provenance goes in ``NAME.auditclip.json``: adding an entry to the pickle
#: itself would change what the user's framework loads (strict ``load_state_dict`` fails).
PROVENANCE_SUFFIX = ".auditclip.json"


def provenance_file(dest: str | os.PathLike[str]) -> Path:
    """Where the provenance of the output ``dest`` is written when its format cannot hold it.

    >>> provenance_file("out/epoch=3.ckpt").as_posix()
    'out/epoch=3.ckpt.auditclip.json'
    """
    dest = Path(dest)
    return dest.with_name(dest.name + PROVENANCE_SUFFIX)


def write_provenance(dest: str | os.PathLike[str], fields: dict[str, Any]) -> Path:
    """Record where the output ``dest`` came from (source digest, settings, version) beside it, atomically.

    safetensors outputs keep these fields in their own ``__metadata__`` instead.

    >>> import json, tempfile
    >>> out = Path(tempfile.mkdtemp()) / "w.pt"
    >>> json.loads(write_provenance(out, {"auditclip_spec": "max_abs=1"}).read_text())
    {'auditclip_spec': 'max_abs=1'}
    """
    return write_json(fields, provenance_file(dest))


def patchable_copies(folder: Path, dst: Path, stamps: dict[str, tuple[int, ...]], stack: ExitStack,
                     what: str) -> dict[str, tuple[Any, BinaryIO]]:
    """Copy every file of ``folder`` to a temporary file in ``dst``, open for patching in place.

    For the writers that rewrite a multi-file checkpoint (a DeepSpeed tag, a DCP folder):
    each file is copied byte for byte through a ``PinnedFile`` (a file changed while copied,
    or since it was indexed, when ``stamps`` has its name, is ``changed``), and each copy is
    renamed into place when ``stack`` closes without error; on an error none is. A symlink
    is refused (``unsafe``); an input's provenance record is not copied (the caller writes
    the output's). Returns, by file name, the open source and the copy (``w+b``).

    >>> import tempfile
    >>> from contextlib import ExitStack
    >>> src, dst = Path(tempfile.mkdtemp()), Path(tempfile.mkdtemp())
    >>> _ = (src / "a.bin").write_bytes(b"abc")
    >>> with ExitStack() as stack:
    ...     files = patchable_copies(src, dst, {}, stack, "folder")
    ...     _ = files["a.bin"][1].seek(1), files["a.bin"][1].write(b"X")
    >>> (dst / "a.bin").read_bytes()
    b'aXc'
    """
    dst.mkdir(parents=True, exist_ok=True)
    copies: dict[str, tuple[Any, BinaryIO]] = {}
    for src in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.endswith(PROVENANCE_SUFFIX)):
        if src.is_symlink():
            raise CheckpointError(src, f"is a symlink; clip copies only the files of the {what}", kind="unsafe")
        f = PinnedFile(src)
        stack.callback(f.close)
        if src.name in stamps and stamps[src.name] != f.stamp:
            raise CheckpointError(src, "changed since the checkpoint was indexed: a trainer is probably still "
                                       "writing it", kind="changed")
        tmp = stack.enter_context(atomic_path(dst / src.name))
        out = stack.enter_context(open(tmp, "w+b"))
        with f.dup() as fh:
            shutil.copyfileobj(fh, out, 1 << 20)
        f.check()
        copies[src.name] = (f, out)
    return copies
