"""Sharded checkpoints: one ``*.index.json`` naming the shard that holds each tensor.

:func:`read_shard_index` reads and checks the index alone (no shard is opened): every
shard name must stay inside the index's folder (:mod:`auditclip.paths`), every shard
must exist. :class:`ShardedSource` opens each shard on first use, through the opener
the reader layer gives it, so shards of any family (safetensors or torch) work.

>>> import json, tempfile, torch
>>> from safetensors.torch import save_file
>>> folder = Path(tempfile.mkdtemp())
>>> save_file({"a": torch.ones(1)}, folder / "model-00001-of-00001.safetensors")
>>> _ = (folder / "model.safetensors.index.json").write_text(json.dumps(
...     {"metadata": {}, "weight_map": {"a": "model-00001-of-00001.safetensors"}}))
>>> index = read_shard_index(folder / "model.safetensors.index.json")
>>> index.weight_map, sorted(index.shards)
({'a': 'model-00001-of-00001.safetensors'}, ['model-00001-of-00001.safetensors'])
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from ..paths import member
from .safetensors import MAX_HEADER_BYTES
from .safetensors import read_safetensors_metadata as _file_metadata
from .source import SAFETENSORS_SUFFIXES, TORCH_SUFFIXES, Source, one_line

__all__ = ["ShardIndex", "ShardedSource", "read_checkpoint_metadata", "read_shard_index"]


@dataclass(frozen=True)
class ShardIndex:
    """A validated ``*.index.json``: which shard file holds each tensor.

    Every shard name stays inside the index's folder (else ``unsafe``), names a
    weight file (``.safetensors``/``.bin``/``.pt``...) that is a regular file, and
    exists (else ``missing_shard``). ``problem`` is ``(kind, message)`` of what is
    wrong, only ever set by ``read_shard_index(..., lenient=True)``.
    """

    path: Path
    weight_map: dict[str, str]  # tensor name -> shard name as written in the index
    shards: dict[str, Path]  # shard name -> its file (lenient: the valid, existing ones)
    metadata: dict[str, str]
    doc: dict[str, Any]
    problem: tuple[str, str] | None = None


def _index_doc_problem(exc: BaseException) -> str:
    if isinstance(exc, RecursionError):
        return "not valid JSON: nested too deeply"
    if isinstance(exc, OSError):
        return f"cannot be read: {exc.strerror or exc}"
    if isinstance(exc, UnicodeDecodeError | json.JSONDecodeError):
        return f"not valid JSON: {one_line(exc)[:200]}"
    return one_line(exc)[:200]


def read_shard_index(index: str | os.PathLike[str], *, lenient: bool = False) -> ShardIndex:
    """Read and validate a shard index (see :class:`ShardIndex`).

    Strict (the default): the first problem (an unsafe name first, then an invalid
    one, then missing shards) is raised as a :class:`CheckpointError`. ``lenient``:
    for listing a run, the problem is returned in :attr:`ShardIndex.problem` beside
    the shards that are valid, so the files an index claims are known even when it
    is broken; the checkpoint fails with that problem when it is opened.

    >>> read_shard_index("no/such/model.safetensors.index.json")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    auditclip.errors.CheckpointError: no/such/model.safetensors.index.json: not a valid shard index: ...
    >>> read_shard_index("no/such/model.safetensors.index.json", lenient=True).problem[0]
    'unreadable'
    """
    index = Path(index)

    def done(shards: dict[str, Path], problem: tuple[str, str] | None, weight_map: dict[str, str] | None = None,
             metadata: dict[str, str] | None = None, doc: dict[str, Any] | None = None) -> ShardIndex:
        if problem is not None and not lenient:
            raise CheckpointError(index, problem[1], kind=problem[0])
        return ShardIndex(index, weight_map or {}, shards, metadata or {}, doc or {}, problem)

    try:
        size = index.stat().st_size
        if size > MAX_HEADER_BYTES:
            raise ValueError(f"{size} bytes is too large for an index")
        doc = json.loads(index.read_bytes().decode("utf-8"))
        if not isinstance(doc, dict):
            raise TypeError(f"it holds a JSON {type(doc).__name__}, not an object")
        weight_map = doc.get("weight_map")
        if not isinstance(weight_map, dict):
            raise TypeError("no weight_map object" if "weight_map" not in doc
                            else f"weight_map is a JSON {type(weight_map).__name__}, not an object")
    except (OSError, UnicodeDecodeError, ValueError, TypeError, RecursionError) as exc:
        return done({}, ("unreadable", f"not a valid shard index: {_index_doc_problem(exc)}"))
    meta = doc.get("metadata") or {}
    shards: dict[str, Path] = {}
    unsafe: tuple[str, str] | None = None
    invalid: list[str] = []
    missing: list[str] = []
    if not isinstance(meta, dict):
        invalid.append(f"metadata as a JSON {type(meta).__name__}, not an object")
        meta = {}
    for name in dict.fromkeys(v if isinstance(v, str) else None for v in weight_map.values()):
        if name is None:
            bad = next(v for v in weight_map.values() if not isinstance(v, str))
            invalid.append(f"a JSON {type(bad).__name__} where a shard file name belongs")
            continue
        try:
            path = member(index.parent, name, source=index, what="shard")
        except CheckpointError as exc:
            unsafe = unsafe or (exc.kind, exc.message)
            continue
        except (OSError, ValueError, RuntimeError) as exc:  # an undecodable name, a symlink loop...
            invalid.append(f"the shard name {name!r} that cannot be resolved ({type(exc).__name__})")
            continue
        if not name.lower().endswith(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES):
            invalid.append(f"{name!r}, which is not a weight file (.safetensors, .bin, .pt, .pth, .ckpt)")
        elif path.is_file():
            shards[name] = path
        elif path.exists() or path.is_symlink():
            invalid.append(f"{name!r}, which is not a regular file")
        else:
            missing.append(name)
    problem: tuple[str, str] | None = None
    if unsafe is not None:
        problem = unsafe
    elif invalid:
        problem = ("unreadable", "not a valid shard index: it names " + "; ".join(invalid[:3]))
    elif missing:
        problem = ("missing_shard", f"index names missing shard(s): {', '.join(sorted(missing))}")
    metadata = {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
    return done(shards, problem, {str(k): v for k, v in weight_map.items() if isinstance(v, str)}, metadata, doc)


class ShardedSource(Source):
    """Many shard files behind one ``*.index.json``; shards open on first use."""

    def __init__(self, index: Path, key: str | None, opener: Callable[[Path, str | None], Source]) -> None:
        self.path = index
        self._key = key
        self._opener = opener  # the reader layer's: a shard may be of any family
        self.index = read_shard_index(index)
        self.metadata = dict(self.index.metadata)
        self._where = {name: self.index.shards[shard] for name, shard in self.index.weight_map.items()}
        self._open: dict[Path, Source] = {}
        self._lock = threading.Lock()

    def shard_files(self) -> list[Path]:
        return sorted(set(self._where.values()))

    def _shard(self, raw: str) -> Source:
        path = self._where[raw]
        with self._lock:  # walker threads ask for shards concurrently
            if path not in self._open:
                self._open[path] = self._opener(path, self._key)
            return self._open[path]

    def raw_names(self) -> list[str]:
        return list(self._where)

    def raw_info(self, raw: str) -> tuple[str, tuple[int, ...]]:
        shard = self._shard(raw)
        if raw not in shard.raw_names():
            raise CheckpointError(self.path, f"the index puts {raw!r} in {shard.path.name}, which does not hold it")
        return shard.raw_info(raw)

    def raw_get(self, raw: str) -> torch.Tensor:
        self.raw_info(raw)
        return self._shard(raw).raw_get(raw)

    def raw_bytes(self, raw: str) -> bytes:
        return self._shard(raw).raw_bytes(raw)

    def close(self) -> None:
        for source in self._open.values():
            source.close()
        self._open = {}



def read_checkpoint_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file, or of an index (its own, over its first shard's), or {}."""
    try:
        if path.name.endswith(".index.json"):
            index = read_shard_index(path)
            meta = dict(index.metadata)
            shards = sorted(index.shards)
            if shards and shards[0].endswith(".safetensors"):
                meta = {**_file_metadata(index.shards[shards[0]]), **meta}
            return meta
        if path.name.endswith(".safetensors"):
            return _file_metadata(path)
    except Exception:  # a broken file is reported when it is read, not while listing the run
        return {}
    return {}
