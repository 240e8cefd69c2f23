"""Reading checkpoint bytes safely: one open file read with ``pread``, checked for changes after every read.

Why ``pread`` and not a memory map: a mapped file that is truncated while it is
read (``torch.save`` over an existing name during a live run does exactly that)
kills the process with SIGBUS. A short ``pread`` is an ordinary error instead,
and the file's size, mtime and inode are compared after every read, so a file
rewritten in place (even at the same size) is reported as ``changed``, never
read half old, half new. A placeholder of a remote run's local view opens as a
:class:`~auditclip.formats.remote.RemoteFile` (ranged reads, the same interface).

>>> import tempfile
>>> path = Path(tempfile.mkdtemp()) / "x.bin"
>>> _ = path.write_bytes(bytes(range(8)))
>>> f = PinnedFile(path)
>>> f.read(2, 3)
b'\\x02\\x03\\x04'
>>> read_strided(f, 0, 8, torch.uint8, (2, 2), (1, 2)).tolist()
[[0, 2], [1, 3]]
>>> f.close()
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError

__all__ = ["PinnedFile", "SMALL_BYTES", "read_strided"]


class PinnedFile:
    """One open file read with ``pread``, and the size/mtime/inode it had when opened.

    Every read checks it is inside the size seen at open, and afterwards that the
    file has not changed: a checkpoint rewritten while auditclip reads it is a
    :class:`CheckpointError` of kind ``changed``, never a crash or a mixed read.
    """

    def __new__(cls, path: Path) -> Any:
        # a placeholder of a remote run's local view is read from its object, never from the placeholder
        if cls is PinnedFile:
            from .remote import remote_file

            remote = remote_file(path)
            if remote is not None:
                return remote
        return super().__new__(cls)

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise CheckpointError(path, f"cannot open: {exc.strerror or exc}") from exc
        st = os.fstat(self.fd)
        self.size = st.st_size
        self._stamp = (st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)

    @property
    def stamp(self) -> tuple[int, ...]:
        """(size, mtime_ns, inode) when opened: what an index records to notice a file changed since."""
        return self._stamp[:3]

    def check(self) -> None:
        """Raise ``changed`` if the file is not the one opened (size, mtime or inode differ)."""
        st = os.fstat(self.fd)
        if (st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev) != self._stamp:
            raise CheckpointError(
                self.path, f"changed while being read (it was {self._stamp[0]} bytes, now {st.st_size}, "
                           "modified since it was opened): a trainer is probably still writing it; "
                           "audit it once it is complete", kind="changed")

    def read_into(self, buffer: Any, offset: int) -> None:
        """Fill the writable ``buffer`` from ``offset`` (all of it, or a ``changed`` error)."""
        size = buffer.nbytes if hasattr(buffer, "nbytes") else len(buffer)
        if offset < 0 or offset + size > self.size:
            raise CheckpointError(self.path, f"data at bytes {offset}..{offset + size} lies beyond the end "
                                             f"of the file ({self.size} bytes)")
        try:
            done = os.preadv(self.fd, [buffer], offset)
            if done < size:  # rare: a huge read split by the kernel, or a file cut short
                view = memoryview(buffer).cast("B")
                while done < size:
                    n = os.preadv(self.fd, [view[done:]], offset + done)
                    if n == 0:
                        self.check()  # a shorter file than at open: say so as a change
                        raise CheckpointError(self.path, "ended early while being read", kind="changed")
                    done += n
        except OSError as exc:
            raise CheckpointError(self.path, f"read failed: {exc.strerror or exc}") from exc
        self.check()

    def read(self, offset: int, size: int) -> bytes:
        buffer = bytearray(size)
        self.read_into(buffer, offset)
        return bytes(buffer)

    def dup(self) -> Any:
        """A Python file object on the same open file (for libraries that want one)."""
        f = os.fdopen(os.dup(self.fd), "rb")
        f.seek(0)
        return f

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


#: Tensors below this many bytes are read into a bytearray (cheapest to make, for models
#: with 100,000 tiny tensors); larger ones into ``torch.empty`` (not zero-filled first).
SMALL_BYTES = 1 << 16


def read_strided(f: PinnedFile, offset: int, storage_bytes: int | None, dtype: torch.dtype,
                 shape: tuple[int, ...], stride: tuple[int, ...] | None = None, start: int = 0) -> torch.Tensor:
    """A tensor read from ``f``: its storage begins at byte ``offset``, the tensor at element ``start``.

    ``stride`` None means contiguous (every safetensors tensor, most pickled ones).
    """
    numel = math.prod(shape)
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    item = dtype.itemsize
    if start < 0:
        raise CheckpointError(f.path, "a tensor with a negative offset")
    if stride is None:
        nbytes = numel * item
        if storage_bytes is not None and start * item + nbytes > storage_bytes:
            raise CheckpointError(f.path, f"a tensor of shape {list(shape)} reaches beyond its storage")
        if nbytes < SMALL_BYTES:
            raw = bytearray(nbytes)
            f.read_into(raw, offset + start * item)
            flat = torch.frombuffer(raw, dtype=dtype)
        else:
            flat = torch.empty(numel, dtype=dtype)
            f.read_into(flat.view(torch.uint8).numpy(), offset + start * item)
        return flat if len(shape) == 1 else flat.view(shape)
    if any(s < 0 for s in stride):
        raise CheckpointError(f.path, "a tensor with a negative stride")
    span = 1 + sum((d - 1) * s for d, s in zip(shape, stride))
    if storage_bytes is not None and (start + span) * item > storage_bytes:
        raise CheckpointError(f.path, f"a tensor of shape {list(shape)} reaches beyond its storage")
    buffer = torch.empty(span, dtype=dtype)
    f.read_into(buffer.view(torch.uint8).numpy(), offset + start * item)
    return buffer.as_strided(shape, stride)
