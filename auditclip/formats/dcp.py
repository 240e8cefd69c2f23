"""Read ``torch.distributed.checkpoint`` (DCP) folders lazily, without a process group.

What the folder holds (as torch's ``FileSystemWriter`` writes it, torch 2.2 to 2.13)
------------------------------------------------------------------------------------
* ``.metadata``: a pickle of ``torch.distributed.checkpoint.metadata.Metadata``.
  ``state_dict_metadata`` maps each flattened key to ``TensorStorageMetadata``
  (dtype, full ``size``, ``chunks``: the ``offsets``/``sizes`` box each saved piece
  covers) or ``BytesStorageMetadata`` (any other object); ``storage_data`` maps
  ``MetadataIndex(fqn, offset)`` (one per chunk; ``offset=None`` for bytes entries) to
  ``_StorageInfo(relative_path, offset, length[, transform_descriptors])``.
* ``__<rank>_<i>.distcp``: each rank's storage file(s), ``i`` numbering them (one per
  writer thread with ``thread_count``; one per entry with ``single_file_per_rank=False``).
  Every chunk is an independent ``torch.save`` of that rank's local piece (a zip
  archive, the piece's bytes stored uncompressed) at ``[offset, offset + length)``;
  every bytes entry is a ``torch.save`` of the object; nothing else is in the file.
  A replicated tensor is stored once (DCP de-duplicates it across ranks).

Not read (refused by name, kind ``unsupported``): records written through DCP's
experimental stream transforms (``_extensions=[ZStandard()]``, listed in
``transform_descriptors``), ``serialization_format=SAFETENSORS`` tensor records (torch's
own ``FileSystemReader`` cannot load those either), and folders with only per-rank
``__<rank>.metadata`` files (``use_collectives=False``).

The pickle is read with :class:`_MetadataUnpickler`, which admits only the DCP
metadata classes (rebuilt as inert records made here, never torch's classes),
``torch`` dtypes, ``torch.Size``, the layout/memory-format codes and path objects;
anything else (``os.system``...) refuses the folder with a :class:`CheckpointError`
of kind ``unsafe`` before it runs. Chunk records are loaded with
``torch.load(weights_only=True)`` from an in-memory copy of their span.

Model, optimizer and other keys
-------------------------------
DCP flattens nested state dicts with dots, so a key's first segment is the name the
writer gave its top-level entry. :func:`read_dcp_index` gives every entry a ``role``
and a ``name``:

* ``optimizer``: the first segment is ``optim``, ``optimizer``, ``optimizers``, or one
  of those with ``_<n>`` (``dcp.save({"optim": opt.state_dict()})``; torch's
  ``get_state_dict`` and torchtitan: ``optimizer.state.<param fqn>.exp_avg``;
  accelerate: ``optimizer.state...`` in its own ``optimizer_0/`` folder; Lightning:
  ``optimizer_0.state...``). ``name`` is the key without that segment.
* ``model``: when the model's tensors sit under one wrapper entry, ``model``
  (user code, accelerate's ``pytorch_model_fsdp_0/``, Lightning ``FSDPStrategy`` and
  Fabric with the key ``"model"``) or ``state_dict`` (Lightning
  ``ModelParallelStrategy``), ``name`` is the key without it. torchtitan puts the
  model's keys at the top level (no wrapper): then every tensor outside the optimizer
  and the training-state entries below is a model tensor, named by its full key.
  Bytes entries under the wrapper (a module's ``_extra_state``) are the model's too.
  The wrapper is taken only if *every* such tensor is under it, and, where the
  optimizer names its parameters (``state.<fqn>.<stat>``), only if those names match
  the stripped keys better than the full ones: an HF-style model saved by torchtitan
  (``model.layers.0...`` beside ``lm_head.weight``) keeps its full names.
* ``other``: tensors under ``lr_scheduler``, ``scheduler``, ``dataloader``,
  ``data_loader``, ``train_state``, ``rng_state``, ``random_states`` (and, under a
  wrapper, anything outside it), and every bytes entry that is not the optimizer's.

A model saved with a wrapper and nothing else looks exactly like a torchtitan model
whose every parameter is under a submodule called ``model`` and that was saved
without optimizer state; :attr:`DcpIndex.model_prefix` says which reading was made.

>>> import tempfile, warnings, torch, torch.distributed.checkpoint as dcp
>>> folder = tempfile.mkdtemp()
>>> with warnings.catch_warnings():
...     warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
...     _ = dcp.save({"model": {"w": torch.arange(6.0).reshape(2, 3)}, "step": 7}, checkpoint_id=folder)
>>> index = read_dcp_index(folder)
>>> index.model_prefix, sorted(index.model_tensors()), sorted(index.objects)
('model', ['w'], ['step'])
>>> read_dcp_tensor(index, "model.w")
tensor([[0., 1., 2.],
        [3., 4., 5.]])
"""

from __future__ import annotations

import io
import math
import os
import pickle
import re
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from auditclip.formats.dtypes import dtype_name, torch_dtype
from auditclip.errors import CheckpointError
from auditclip.formats.remote import open_binary, remote_file
from auditclip.formats.source import Source, one_line
from auditclip.notices import note

__all__ = [
    "DcpSource", "METADATA_FILE", "DcpChunk", "DcpIndex", "DcpObject", "DcpTensor", "dcp_folder", "is_dcp_folder",
    "iter_dcp_chunks", "read_dcp_index", "read_dcp_object", "read_dcp_tensor",
]

#: The file that makes a folder a DCP checkpoint.
METADATA_FILE = ".metadata"
#: A ``.metadata`` larger than this is refused before it is read (a 70B model's is a few MB).
MAX_METADATA_BYTES = 1 << 30

#: Top-level entries that wrap a model's state dict (see the module docstring).
MODEL_WRAPPERS = ("model", "state_dict")
#: Top-level entries holding training state, never model weights.
TRAINING_STATE = frozenset({
    "lr_scheduler", "lr_schedulers", "scheduler", "schedulers", "dataloader", "data_loader",
    "train_state", "rng_state", "rng_states", "random_states",
})
_OPTIMIZER = re.compile(r"optim(izer)?s?(_\d+)?")

# A torch.save zip archive starts with a local file header.
_ZIP_MAGIC = b"PK\x03\x04"


@dataclass(frozen=True)
class DcpChunk:
    """One saved piece of a tensor: where its record lies and which box of the tensor it covers."""

    file: str                        #: storage file, relative to the folder (``__0_0.distcp``)
    offset: int                      #: first byte of the record in ``file``
    length: int                      #: bytes in the record
    offsets: tuple[int, ...]         #: where the piece starts in the full tensor, per dimension
    sizes: tuple[int, ...]           #: the piece's shape
    transforms: tuple[str, ...] = ()  #: DCP stream transforms (``stream.zstd/1``...); none by default

    @property
    def numel(self) -> int:
        return math.prod(self.sizes)


@dataclass(frozen=True)
class DcpTensor:
    """A tensor entry of a DCP folder, known without reading its data."""

    key: str                  #: the flattened key as stored (``model.layer.weight``)
    name: str                 #: ``key`` without its model wrapper or optimizer entry
    role: str                 #: ``model``, ``optimizer`` or ``other``
    dtype: str                #: dtype name (``float32``, ``bfloat16``...)
    shape: tuple[int, ...]    #: the full (unsharded) shape
    chunks: tuple[DcpChunk, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class DcpObject:
    """A non-tensor entry (``BytesStorageMetadata``): a ``torch.save`` of any object."""

    key: str
    name: str
    role: str
    file: str
    offset: int
    length: int
    transforms: tuple[str, ...] = ()


@dataclass(frozen=True)
class DcpIndex:
    """Where every entry of one DCP folder lives; built by :func:`read_dcp_index` from ``.metadata`` only."""

    folder: Path
    tensors: dict[str, DcpTensor]   #: by stored key
    objects: dict[str, DcpObject]   #: bytes entries, by stored key
    model_prefix: str | None        #: the model wrapper that was stripped (``model``...), or None
    version: str | None             #: DCP's metadata version (``1.0.0``), None before torch 2.4
    #: storage file -> (size, mtime_ns, inode) when indexed: a file rewritten since is refused
    files: dict[str, tuple[int, int, int]] = field(default_factory=dict)

    def model_tensors(self) -> dict[str, DcpTensor]:
        """The model's tensors by ``name`` (wrapper stripped), in stored order."""
        return {t.name: t for t in self.tensors.values() if t.role == "model"}

    def tensor(self, key: str) -> DcpTensor:
        """The entry of a stored key or of a model tensor's name; ``KeyError`` naming a few keys if none."""
        if key in self.tensors:
            return self.tensors[key]
        model = self.model_tensors()
        if key in model:
            return model[key]
        some = ", ".join(list(self.tensors)[:5])
        raise KeyError(f"{key!r} is not a tensor of the DCP checkpoint {self.folder} (it has {some}...)")


def is_dcp_folder(path: str | os.PathLike[str]) -> bool:
    """True for a folder holding a DCP ``.metadata`` file (nothing is read).

    >>> import tempfile
    >>> is_dcp_folder(tempfile.mkdtemp())
    False
    """
    return (Path(path) / METADATA_FILE).is_file()


def dcp_folder(path: str | os.PathLike[str]) -> Path | None:
    """The DCP folder ``path`` names, or None: the folder, or its ``.metadata`` file.

    A folder holding only per-rank ``__<rank>.metadata`` files (``use_collectives=False``)
    counts too, so that :func:`read_dcp_index` says by name why it is not read.
    Only names are looked at; nothing is read.

    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> dcp_folder(folder) is None
    True
    >>> _ = (folder / ".metadata").write_bytes(b"")
    >>> dcp_folder(folder) == folder == dcp_folder(folder / ".metadata")
    True
    """
    path = Path(path)
    if path.name == METADATA_FILE and path.is_file():
        return path.parent
    if path.is_dir() and (is_dcp_folder(path) or next(path.glob("__*.metadata"), None) is not None):
        return path
    return None


# --------------------------------------------------------------------------- .metadata

class _Record:
    """An inert stand-in for one DCP metadata class: attributes only, set by the pickle's BUILD."""

    _defaults: dict[str, Any] = {}

    def __getattr__(self, name: str) -> Any:
        # Fields a writer left out (``_StorageInfo`` drops ``transform_descriptors`` when None).
        defaults = type(self)._defaults
        if name in defaults:
            return defaults[name]
        raise AttributeError(name)

    # No __setstate__: pickle's BUILD then fills the instance's own __dict__ (or setattr for the
    # slot part), in C, which keeps a 100,000-chunk index fast; nothing but this record changes.


class _Properties(_Record):
    """``TensorProperties``: its ``__getstate__`` pickles a tuple whose first item is the dtype."""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and state and not isinstance(state[0], dict | None):
            self.__dict__["dtype"] = state[0]
        elif isinstance(state, dict):
            self.__dict__.update(state)
        else:
            raise pickle.UnpicklingError(f"unexpected state for TensorProperties: {type(state).__name__}")


_RECORDS: dict[str, tuple[type[_Record], dict[str, Any]]] = {
    "Metadata": (_Record, {"planner_data": None, "storage_data": None, "storage_meta": None, "version": None}),
    "TensorStorageMetadata": (_Record, {}),
    "BytesStorageMetadata": (_Record, {}),
    "ChunkStorageMetadata": (_Record, {}),
    "TensorProperties": (_Properties, {"dtype": None}),
    "MetadataIndex": (_Record, {"offset": None, "index": None}),
    "StorageMeta": (_Record, {"checkpoint_id": None, "save_id": None, "load_id": None, "modules": ()}),
    "_StorageInfo": (_Record, {"transform_descriptors": None}),
}
_RECORD_MODULES = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                              "ChunkStorageMetadata", "TensorProperties", "MetadataIndex",
                                              "StorageMeta"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
}
_PATH_MODULES = frozenset({"pathlib", "pathlib._local"})
_PATH_CLASSES = frozenset({"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"})
_LAYOUTS = frozenset({"torch.strided", "torch.sparse_coo", "torch.sparse_csr", "torch.sparse_csc",
                      "torch.sparse_bsr", "torch.sparse_bsc", "torch._mkldnn", "torch.jagged"})


class _Unsafe(pickle.UnpicklingError):
    """The pickle names a global that is not DCP metadata."""


class _UnknownDtype(pickle.UnpicklingError):
    """The pickle names a ``torch.<name>`` dtype this torch does not have."""


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP ``.metadata`` admitting only its own classes; nothing else can be named.

    Each instance makes fresh record classes and helper callables, so a pickle that
    sets attributes on what it was given (BUILD on a class) changes nothing outside
    this one load.
    """

    def __init__(self, file: Any) -> None:
        super().__init__(file)
        self.classes: dict[str, type[_Record]] = {
            name: type(name, (base,), {"_defaults": dict(defaults), "__module__": __name__})
            for name, (base, defaults) in _RECORDS.items()
        }

    def find_class(self, module: str, name: str) -> Any:
        if name in _RECORD_MODULES.get(module, ()):
            return self.classes[name]
        if module == "torch":
            if name == "Size":
                return torch.Size
            value = getattr(torch, name, None) if name.isidentifier() else None
            if isinstance(value, torch.dtype | torch.layout | torch.memory_format):  # plain constants
                return value
            if value is None and re.fullmatch(r"u?int\d+|float\w*|bfloat\w*|complex\w*|bits\w*|qu?int\w*", name):
                raise _UnknownDtype(f"torch.{name}")
        if module == "torch.serialization" and name == "_get_layout":
            def layout(text: str) -> str:
                if text not in _LAYOUTS:
                    raise _Unsafe(f"torch.serialization._get_layout({text!r})")
                return text
            return layout
        if module == "torch.distributed.checkpoint.metadata" and name == "_MEM_FORMAT_ENCODING":
            def memory_format(code: int) -> int:
                if not isinstance(code, int):
                    raise pickle.UnpicklingError("memory format code is not an int")
                return code
            return memory_format
        if module in _PATH_MODULES and name in _PATH_CLASSES:
            def path(*parts: str) -> str:
                if not all(isinstance(p, str) for p in parts):
                    raise pickle.UnpicklingError("path parts are not strings")
                return str(PurePosixPath(*parts)) if parts else "."
            return path
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        raise _Unsafe(f"{module}.{name}")


def _load_metadata(path: Path) -> tuple[Any, dict[str, type[_Record]]]:
    """The unpickled Metadata record of ``path`` and the record classes of that one load."""
    try:
        size = path.stat().st_size
        if size > MAX_METADATA_BYTES:
            raise CheckpointError(path, f"DCP .metadata of {size} bytes is larger than {MAX_METADATA_BYTES}; refused")
        with open_binary(path) as f:
            unpickler = _MetadataUnpickler(f)
            metadata = unpickler.load()
    except CheckpointError:
        raise
    except _Unsafe as exc:
        raise CheckpointError(path, f"DCP .metadata names {exc}, which is not DCP metadata: refused, nothing "
                                    "in it was run", kind="unsafe") from None
    except _UnknownDtype as exc:
        raise CheckpointError(path, f"DCP .metadata uses the dtype {exc}, unknown to this torch "
                                    f"{torch.__version__}: upgrade torch to read it", kind="unsupported") from None
    except OSError as exc:
        raise CheckpointError(path, f"cannot read DCP .metadata: {exc.strerror or exc}") from None
    except Exception as exc:  # truncated/garbled pickles raise anything from EOFError to TypeError
        raise CheckpointError(path, f"not a readable DCP .metadata (truncated or not a pickle of "
                                    f"torch.distributed.checkpoint Metadata): {type(exc).__name__}: {exc}") from None
    if not isinstance(metadata, unpickler.classes["Metadata"]):
        raise CheckpointError(path, f"not a DCP .metadata: it holds a {type(metadata).__name__}, not Metadata")
    return metadata, unpickler.classes


# --------------------------------------------------------------------------- index

def _ints(value: Any, what: str, path: Path) -> tuple[int, ...]:
    # torch.Size holds only ints (torch checks); anything else is checked element by element.
    if type(value) is torch.Size or (isinstance(value, tuple | list) and all(type(v) is int for v in value)):
        values = tuple(value)
        if not values or min(values) >= 0:
            return values
    raise CheckpointError(path, f"inconsistent DCP .metadata: {what} is {value!r}, not a tuple of "
                                "non-negative integers")


def _storage_file(name: Any, path: Path) -> str:
    # A record must name a file inside the folder: no separators, no "..", no absolute path.
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise CheckpointError(path, f"DCP .metadata points at the storage file {name!r}, outside the "
                                    "checkpoint folder: refused", kind="unsafe")
    return name


def _span(info: Any, what: str, path: Path, classes: dict[str, type[_Record]]) -> tuple[str, int, int, tuple[str, ...]]:
    if not isinstance(info, classes["_StorageInfo"]):
        raise CheckpointError(path, f"inconsistent DCP .metadata: the storage record of {what} is a "
                                    f"{type(info).__name__}")
    file = _storage_file(getattr(info, "relative_path", None), path)
    offset, length = getattr(info, "offset", None), getattr(info, "length", None)
    if type(offset) is not int or type(length) is not int or offset < 0 or length < 0:
        raise CheckpointError(path, f"inconsistent DCP .metadata: {what} has the span {offset!r}+{length!r}")
    transforms = getattr(info, "transform_descriptors", None) or ()
    if transforms and (not isinstance(transforms, tuple | list) or not all(isinstance(t, str) for t in transforms)):
        raise CheckpointError(path, f"inconsistent DCP .metadata: {what} has transforms {transforms!r}")
    return file, offset, length, tuple(transforms)


def _check_tiling(key: str, shape: tuple[int, ...], chunks: list[DcpChunk], path: Path) -> None:
    """Chunks must lie inside the tensor, not overlap, and cover it: the full tensor is their union."""
    if len(chunks) == 1 and chunks[0].sizes == shape and not any(chunks[0].offsets):
        return  # the usual unsharded tensor: one chunk, the whole of it
    for c in chunks:
        if len(c.offsets) != len(shape) or len(c.sizes) != len(shape):
            raise CheckpointError(path, f"inconsistent DCP .metadata: a chunk of {key} has {len(c.sizes)} "
                                        f"dimensions, the tensor {len(shape)}")
        if any(o + s > n for o, s, n in zip(c.offsets, c.sizes, shape)):
            raise CheckpointError(path, f"inconsistent DCP .metadata: the chunk of {key} at {list(c.offsets)} "
                                        f"(size {list(c.sizes)}) reaches outside its shape {list(shape)}")
    full = sorted((c for c in chunks if c.numel), key=lambda c: c.offsets)
    if shape:
        # Sweep along dimension 0: a chunk can only overlap the ones whose rows it shares, so a
        # 1024-rank FSDP tensor costs 1024 comparisons, not half a million.
        active: list[DcpChunk] = []
        for b in full:
            active = [a for a in active if a.offsets[0] + a.sizes[0] > b.offsets[0]]
            for a in active:
                if all(ao < bo + bs and bo < ao + as_
                       for ao, as_, bo, bs in zip(a.offsets, a.sizes, b.offsets, b.sizes)):
                    raise CheckpointError(path, f"inconsistent DCP .metadata: chunks of {key} at "
                                                f"{list(a.offsets)} and {list(b.offsets)} overlap")
            active.append(b)
    covered = sum(c.numel for c in full)
    if covered != math.prod(shape):
        raise CheckpointError(path, f"inconsistent DCP .metadata: the chunks of {key} cover {covered} of its "
                                    f"{math.prod(shape)} elements (shape {list(shape)})")


def _roles(tensor_keys: list[str], object_keys: list[str]) -> tuple[dict[str, tuple[str, str]], str | None]:
    """``key -> (role, name)`` for every key, and the model wrapper stripped (rules: module docstring)."""
    def first(key: str) -> str:
        return key.split(".", 1)[0]

    def rest(key: str) -> str:
        return key.split(".", 1)[1] if "." in key else key

    optimizer = {k for k in (*tensor_keys, *object_keys) if _OPTIMIZER.fullmatch(first(k))}
    candidates = [k for k in tensor_keys if k not in optimizer and first(k) not in TRAINING_STATE]
    wrapper: str | None = None
    for w in MODEL_WRAPPERS:
        if candidates and all(first(k) == w and "." in k for k in candidates):
            wrapper = w
    if wrapper is not None:
        # Parameter names the optimizer keys its state by (get_state_dict, torchtitan, FSDP):
        # ``<optim>.state.<fqn>.<stat>``; integer ids (a plain optimizer.state_dict()) say nothing.
        named = {rest(rest(k)).rsplit(".", 1)[0] for k in tensor_keys
                 if k in optimizer and rest(k).startswith("state.") and rest(rest(k)).count(".") >= 1}
        named = {n for n in named if not n.isdigit()}
        if named:
            stripped = {rest(k) for k in candidates}
            if len(named & set(candidates)) > len(named & stripped):
                wrapper = None
    roles: dict[str, tuple[str, str]] = {}
    for k in (*tensor_keys, *object_keys):
        if k in optimizer:
            roles[k] = ("optimizer", rest(k))
        elif wrapper is not None and first(k) == wrapper and "." in k:
            roles[k] = ("model", rest(k))  # a bytes entry here is the model's extra state
        elif wrapper is None and k in candidates:
            roles[k] = ("model", k)
        else:
            roles[k] = ("other", k)
    return roles, wrapper


def read_dcp_index(folder: str | os.PathLike[str]) -> DcpIndex:
    """Index a DCP folder (or its ``.metadata`` file) from the metadata alone: no tensor data is read.

    Checks, without reading the storage files, that every chunk has a record, that
    every record lies inside its file (``os.stat``) and is no shorter than its data,
    and that each tensor's chunks tile its full shape. A missing storage file is a
    :class:`CheckpointError` of kind ``missing_shard``; a hostile ``.metadata`` one of
    kind ``unsafe``; anything truncated or inconsistent one of kind ``unreadable``.

    >>> import tempfile, warnings, torch, torch.distributed.checkpoint as dcp
    >>> folder = tempfile.mkdtemp()
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")
    ...     _ = dcp.save({"model": {"fc.weight": torch.ones(2, 3, dtype=torch.bfloat16)},
    ...                   "optim": {"state": {0: {"exp_avg": torch.zeros(2, 3)}}}}, checkpoint_id=folder)
    >>> index = read_dcp_index(folder)
    >>> t = index.tensors["model.fc.weight"]
    >>> t.name, t.role, t.dtype, t.shape, len(t.chunks), t.chunks[0].file
    ('fc.weight', 'model', 'bfloat16', (2, 3), 1, '__0_0.distcp')
    >>> index.tensors["optim.state.0.exp_avg"].role
    'optimizer'
    """
    folder = Path(folder)
    if folder.name == METADATA_FILE and folder.is_file():  # the metadata file itself was named
        folder = folder.parent
    path = folder / METADATA_FILE
    if not path.is_file():
        ranked = sorted(p.name for p in folder.glob("__*.metadata")) if folder.is_dir() else []
        if ranked:
            raise CheckpointError(path, f"DCP folder with per-rank metadata only ({', '.join(ranked[:3])}; "
                                        "saved with use_collectives=False): not supported", kind="unsupported")
        raise CheckpointError(path, "no DCP .metadata file here: not a torch.distributed.checkpoint folder")
    metadata, classes = _load_metadata(path)
    try:
        return _build_index(folder, path, metadata, classes)
    except (AttributeError, TypeError, ValueError) as exc:  # records a crafted pickle left malformed
        raise CheckpointError(path, f"inconsistent DCP .metadata: {type(exc).__name__}: {exc}") from None


def _build_index(folder: Path, path: Path, metadata: Any, classes: dict[str, type[_Record]]) -> DcpIndex:
    entries = getattr(metadata, "state_dict_metadata", None)
    storage = getattr(metadata, "storage_data", None)
    if not isinstance(entries, dict) or not isinstance(storage, dict):
        raise CheckpointError(path, "inconsistent DCP .metadata: state_dict_metadata or storage_data is not a "
                                    "mapping (written by a storage writer other than FileSystemWriter?)")
    records: dict[tuple[str, tuple[int, ...] | None], Any] = {}
    for where, info in storage.items():
        if not isinstance(where, classes["MetadataIndex"]) or not isinstance(getattr(where, "fqn", None), str):
            raise CheckpointError(path, f"inconsistent DCP .metadata: a storage key is a {type(where).__name__}, "
                                        "not a MetadataIndex with a string fqn")
        offset = getattr(where, "offset", None)
        records[(where.fqn, None if offset is None else _ints(offset, f"the offset of {where.fqn}", path))] = info

    tensor_keys: list[str] = []
    object_keys: list[str] = []
    for key, entry in entries.items():
        if not isinstance(key, str):
            raise CheckpointError(path, f"inconsistent DCP .metadata: the key {key!r} is not a string")
        if isinstance(entry, classes["TensorStorageMetadata"]):
            tensor_keys.append(key)
        elif isinstance(entry, classes["BytesStorageMetadata"]):
            object_keys.append(key)
        else:
            raise CheckpointError(path, f"inconsistent DCP .metadata: {key} is described by a "
                                        f"{type(entry).__name__}")
    roles, wrapper = _roles(tensor_keys, object_keys)

    stats: dict[str, tuple[int, int, int]] = {}

    def file_size(name: str) -> int:
        if name not in stats:
            try:
                st = os.stat(folder / name)
            except OSError:
                raise CheckpointError(folder / name, f"DCP storage file {name} named by .metadata is missing",
                                      kind="missing_shard") from None
            stats[name] = (st.st_size, st.st_mtime_ns, st.st_ino)
        return stats[name][0]

    def check_span(name: str, offset: int, length: int, what: str) -> None:
        size = file_size(name)
        if offset + length > size:
            raise CheckpointError(folder / name, f"truncated: the record of {what} lies at bytes "
                                                 f"{offset}..{offset + length}, the file has {size}")

    tensors: dict[str, DcpTensor] = {}
    for key in tensor_keys:
        entry = entries[key]
        dtype = getattr(getattr(entry, "properties", None), "dtype", None)
        if not isinstance(dtype, torch.dtype):
            raise CheckpointError(path, f"inconsistent DCP .metadata: {key} has no torch dtype ({dtype!r})")
        shape = _ints(getattr(entry, "size", None), f"the size of {key}", path)
        raw_chunks = getattr(entry, "chunks", None)
        if not isinstance(raw_chunks, list | tuple) or not raw_chunks and math.prod(shape):
            raise CheckpointError(path, f"inconsistent DCP .metadata: {key} lists no chunks")
        chunks: list[DcpChunk] = []
        for c in raw_chunks:
            if not isinstance(c, classes["ChunkStorageMetadata"]):
                raise CheckpointError(path, f"inconsistent DCP .metadata: a chunk of {key} is a "
                                            f"{type(c).__name__}")
            offsets = _ints(getattr(c, "offsets", None), f"a chunk offset of {key}", path)
            sizes = _ints(getattr(c, "sizes", None), f"a chunk size of {key}", path)
            info = records.get((key, offsets))
            if info is None:
                raise CheckpointError(path, f"inconsistent DCP .metadata: no storage record for the chunk of "
                                            f"{key} at {list(offsets)}")
            what = f"{key} at {list(offsets)}"
            file, offset, length, transforms = _span(info, what, path, classes)
            check_span(file, offset, length, what)
            nbytes = math.prod(sizes) * dtype.itemsize
            if not transforms and length < nbytes:
                raise CheckpointError(folder / file, f"inconsistent DCP .metadata: the record of {what} has "
                                                     f"{length} bytes, its data {nbytes}")
            chunks.append(DcpChunk(file, offset, length, offsets, sizes, transforms))
        _check_tiling(key, shape, chunks, path)
        role, name = roles[key]
        tensors[key] = DcpTensor(key, name, role, dtype_name(dtype), shape, tuple(chunks))

    objects: dict[str, DcpObject] = {}
    for key in object_keys:
        info = records.get((key, None))
        if info is None:
            raise CheckpointError(path, f"inconsistent DCP .metadata: no storage record for {key}")
        file, offset, length, transforms = _span(info, key, path, classes)
        check_span(file, offset, length, key)
        role, name = roles[key]
        objects[key] = DcpObject(key, name, role, file, offset, length, transforms)

    version = getattr(metadata, "version", None)
    return DcpIndex(folder, tensors, objects, wrapper, version if isinstance(version, str) else None, stats)


# --------------------------------------------------------------------------- data

def _read_span(index: DcpIndex, file: str, offset: int, length: int) -> bytes:
    """The bytes of one record, read with ``os.pread``; the file must be the one indexed."""
    path = index.folder / file
    remote = remote_file(path)
    if remote is not None:  # a remote run's placeholder: ranged reads of its object
        if offset + length > remote.size:
            raise CheckpointError(path, f"truncated: a record lies at bytes {offset}..{offset + length}, the file "
                                        f"has {remote.size}")
        return remote.read(offset, length)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        kind = "missing_shard" if isinstance(exc, FileNotFoundError) else "unreadable"
        raise CheckpointError(path, f"cannot open DCP storage file: {exc.strerror or exc}", kind=kind) from None
    try:
        st = os.fstat(fd)
        if index.files.get(file, (st.st_size, st.st_mtime_ns, st.st_ino)) != (st.st_size, st.st_mtime_ns, st.st_ino):
            raise CheckpointError(path, "changed since the checkpoint was indexed (size, time or inode differ): "
                                        "a trainer is probably still writing it", kind="changed")
        if offset + length > st.st_size:
            raise CheckpointError(path, f"truncated: a record lies at bytes {offset}..{offset + length}, the file "
                                        f"has {st.st_size}")
        parts: list[bytes] = []
        done = 0
        while done < length:  # pread may return less than asked (huge reads are split by the kernel)
            part = os.pread(fd, length - done, offset + done)
            if not part:
                raise CheckpointError(path, f"ended at byte {offset + done} inside a record (truncated)")
            parts.append(part)
            done += len(part)
        return parts[0] if len(parts) == 1 else b"".join(parts)
    except OSError as exc:
        raise CheckpointError(path, f"read failed: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def _refuse_transforms(path: Path, what: str, transforms: tuple[str, ...]) -> None:
    if transforms:
        raise CheckpointError(path, f"the record of {what} is stored through the DCP stream transform(s) "
                                    f"{', '.join(transforms)} (compression extension); auditclip reads only "
                                    "untransformed records: re-save without _extensions", kind="unsupported")


def _load_record(index: DcpIndex, file: str, offset: int, length: int, what: str) -> Any:
    """Read one record's span and ``torch.load(weights_only=True)`` it from memory."""
    path = index.folder / file
    blob = _read_span(index, file, offset, length)
    if not blob.startswith(_ZIP_MAGIC):
        size = index.files.get(file, (offset + length,))[0]
        head = blob if len(blob) >= 9 else _read_span(index, file, offset, min(9, size - offset))
        if len(head) >= 9 and head[8:9] == b"{":  # u64 header length, then the JSON header
            raise CheckpointError(path, f"the record of {what} is a safetensors block: the checkpoint was saved "
                                        "with FileSystemWriter(serialization_format=SAFETENSORS), whose tensor "
                                        "records torch's own FileSystemReader cannot load either; not supported",
                                  kind="unsupported")
        raise CheckpointError(path, f"the record of {what} is not a torch.save archive (written by another "
                                    "storage writer, or the file was overwritten)")
    try:
        return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(path, f"the record of {what} needs more than plain tensors and containers to "
                                    f"load (refused by torch.load(weights_only=True)): {first}",
                              kind="unsafe") from None
    except Exception as exc:
        raise CheckpointError(path, f"the record of {what} is not readable: {type(exc).__name__}: "
                                    f"{str(exc).strip()[:200]}") from None


def iter_dcp_chunks(index: DcpIndex, key: str) -> Iterator[tuple[DcpChunk, torch.Tensor]]:
    """Each saved piece of one tensor, read one at a time, with the box it covers.

    For statistics that can be accumulated piece by piece without ever holding the
    full tensor. Pieces with no elements are skipped.

    >>> import tempfile, warnings, torch, torch.distributed.checkpoint as dcp
    >>> folder = tempfile.mkdtemp()
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")
    ...     _ = dcp.save({"w": torch.ones(2, 2)}, checkpoint_id=folder)
    >>> [(chunk.offsets, piece.sum().item()) for chunk, piece in iter_dcp_chunks(read_dcp_index(folder), "w")]
    [((0, 0), 4.0)]
    """
    entry = index.tensor(key)
    dtype = torch_dtype(entry.dtype)
    for chunk in entry.chunks:
        if not chunk.numel:
            continue
        path = index.folder / chunk.file
        what = f"{entry.key} at {list(chunk.offsets)}"
        _refuse_transforms(path, what, chunk.transforms)
        piece = _load_record(index, chunk.file, chunk.offset, chunk.length, what)
        if not isinstance(piece, torch.Tensor):
            raise CheckpointError(path, f"the record of {what} holds a {type(piece).__name__}, not a tensor")
        if piece.dtype != dtype or tuple(piece.shape) != chunk.sizes:
            raise CheckpointError(path, f"the record of {what} holds a {dtype_name(piece.dtype)} tensor of shape "
                                        f"{list(piece.shape)}; .metadata says {entry.dtype} {list(chunk.sizes)}")
        yield chunk, piece


def read_dcp_tensor(index: DcpIndex, key: str) -> torch.Tensor:
    """The full tensor ``key`` (a stored key, or a model tensor's name), assembled from its chunks.

    Reads only this tensor's records, one chunk at a time (``os.pread`` of its span,
    ``torch.load(weights_only=True)`` of the bytes), and copies each into place, so
    a tensor sharded over several ranks' files comes back whole. Memory: the full
    tensor plus one chunk (its record's bytes and the loaded piece).

    >>> import tempfile, warnings, torch, torch.distributed.checkpoint as dcp
    >>> folder = tempfile.mkdtemp()
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")
    ...     _ = dcp.save({"model": {"scale": torch.tensor(0.5, dtype=torch.float16)}}, checkpoint_id=folder)
    >>> read_dcp_tensor(read_dcp_index(folder), "scale")
    tensor(0.5000, dtype=torch.float16)
    """
    entry = index.tensor(key)
    dtype = torch_dtype(entry.dtype)
    if dtype is None:  # _load_metadata admits only dtypes this torch has; kept for a hand-made index
        raise CheckpointError(index.folder / METADATA_FILE, f"{entry.key} has the dtype {entry.dtype}, unknown "
                                                            "to this torch", kind="unsupported")
    full = torch.empty(entry.shape, dtype=dtype)
    for chunk, piece in iter_dcp_chunks(index, entry.key):
        box = tuple(slice(o, o + s) for o, s in zip(chunk.offsets, chunk.sizes))
        full[box].copy_(piece)
    return full


def read_dcp_object(index: DcpIndex, key: str) -> Any:
    """A non-tensor entry (``optim.param_groups.0.lr``, ``step``...), loaded with ``weights_only=True``.

    >>> import tempfile, warnings, torch, torch.distributed.checkpoint as dcp
    >>> folder = tempfile.mkdtemp()
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")
    ...     _ = dcp.save({"step": 120, "lr": 0.001}, checkpoint_id=folder)
    >>> index = read_dcp_index(folder)
    >>> read_dcp_object(index, "step"), read_dcp_object(index, "lr")
    (120, 0.001)
    """
    if key not in index.objects:
        raise KeyError(f"{key!r} is not a non-tensor entry of the DCP checkpoint {index.folder}")
    entry = index.objects[key]
    path = index.folder / entry.file
    _refuse_transforms(path, key, entry.transforms)
    return _load_record(index, entry.file, entry.offset, entry.length, key)


class DcpSource(Source):
    """A ``torch.distributed.checkpoint`` folder (:mod:`auditclip.formats.dcp`): its model tensors.

    The index comes from ``.metadata`` alone; each tensor is read when asked for,
    chunk by chunk from the storage files, and assembled whole (memory: the largest
    tensor plus one chunk). Optimizer state and training state (scheduler, dataloader,
    ``train_state``...) are not weights: left out, with one note. ``key`` reads the
    tensors under another top-level entry instead (``--key ema``).
    """

    def __init__(self, folder: Path, key: str | None = None) -> None:
        self.path = folder
        self.metadata: dict[str, str] = {}
        self.index = read_dcp_index(folder)
        tensors = list(self.index.tensors.values())
        if key is not None:
            self._where = {t.key[len(key) + 1:]: t.key for t in tensors if t.key.startswith(key + ".")}
            if not self._where:
                entries = ", ".join(dict.fromkeys(t.key.split(".", 1)[0] for t in tensors))
                raise CheckpointError(folder, f"no tensors under the entry {key!r} of this DCP checkpoint "
                                              f"(entries: {entries or 'none'}); pick one with --key")
            return
        self._where = {t.name: t.key for t in tensors if t.role == "model"}
        left = sorted({t.key.split(".", 1)[0] + ".*" for t in tensors if t.role != "model"})
        if not self._where:
            raise CheckpointError(folder, "this DCP checkpoint holds no model tensors"
                                          + (f", only {', '.join(left)} (optimizer or training state)" if left else "")
                                          + "; pick an entry with --key")
        if left:
            note(f"DCP checkpoints: {', '.join(left)} (optimizer or training state, not weights) left out; "
                 "the model's tensors are audited")

    def raw_names(self) -> list[str]:
        return list(self._where)

    def raw_info(self, raw: str) -> tuple[str, tuple[int, ...]]:
        t = self.index.tensors[self._where[raw]]
        return t.dtype, t.shape

    def raw_get(self, raw: str) -> torch.Tensor:
        try:
            return read_dcp_tensor(self.index, self._where[raw])
        except CheckpointError:
            raise
        except (RuntimeError, ValueError, OverflowError, MemoryError) as exc:
            raise CheckpointError(self.path, f"cannot read tensor {raw!r}: {one_line(exc)}") from exc
