"""Paths taken from files stay inside the folder they belong to.

A shard name in an ``*.index.json``, an entry of a checkpoint folder, anything a
file we did not write tells us to open or to write: it is resolved against its
folder and refused (a :class:`CheckpointError` of kind ``unsafe``) when it would
leave that folder, by ``..``, an absolute path, or a symlink pointing out.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from .errors import CheckpointError


def is_inside(path: str | os.PathLike[str], folder: str | os.PathLike[str]) -> bool:
    """True when ``path`` resolves (symlinks followed) to ``folder`` or below it.

    >>> is_inside("/tmp/a/../b", "/tmp"), is_inside("/etc/passwd", "/tmp")
    (True, False)
    """
    p, f = Path(path).resolve(), Path(folder).resolve()
    return p == f or f in p.parents


def member(folder: Path, name: object, *, source: Path | None = None, what: str = "shard") -> Path:
    """``folder / name`` for a ``name`` read from a file, refused unless it stays inside ``folder``.

    ``name`` must be a relative path without ``..`` parts that resolves inside
    ``folder`` (a symlink to elsewhere is refused too). ``source`` is the file
    the name came from, for the error message.

    >>> member(Path("/ckpt"), "model-00001-of-00002.safetensors").as_posix()
    '/ckpt/model-00001-of-00002.safetensors'
    >>> member(Path("/ckpt"), "../other/model.safetensors")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    auditclip.errors.CheckpointError: ...: refused: the shard name '../other/model.safetensors' points outside ...
    """
    text = str(name)
    origin = source if source is not None else folder
    posix = PurePosixPath(text.replace("\\", "/"))
    bad = (not text or "\x00" in text or posix.is_absolute() or Path(text).is_absolute()
           or any(part == ".." for part in posix.parts) or (len(text) > 1 and text[1] == ":"))
    candidate = folder / text
    if bad or not is_inside(candidate, folder):
        raise CheckpointError(
            origin, f"refused: the {what} name {text!r} points outside {folder}; "
                    "auditclip reads and writes only inside a checkpoint's own folder", kind="unsafe")
    return candidate
