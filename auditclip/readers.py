"""Lazy readers for the checkpoint formats trainers write.

A :class:`TensorReader` gives one checkpoint's tensors by name, one at a time:

* ``.safetensors`` through ``safe_open`` (the header is parsed, tensors are read
  only when asked for, metadata is kept);
* sharded checkpoints through their ``*.index.json`` (``model.safetensors.index.json``
  or ``pytorch_model.bin.index.json``): many files, one checkpoint;
* PyTorch pickles (``.pt/.pth/.bin/.ckpt``) through ``torch.load(weights_only=True)``,
  memory-mapped when the file is in the zip format (every ``torch.save`` since 1.6),
  so tensors stay file pages until they are used. Code in a pickle is never run:
  ``weights_only=True`` refuses any global that is not a plain tensor type.

Names are normalised so the same model saved by different wrappers compares
equal: a leading ``module.`` (DDP) is dropped when every name has it, and
``_orig_mod.`` (``torch.compile``) segments are dropped wherever they occur.
"""

from __future__ import annotations

import json
import math
import pickle
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError

#: Keys under which trainers nest the model's state dict, tried in this order.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module")

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")

# safetensors' dtype codes -> torch dtype names (only those this torch knows are usable).
_SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8",
    "BOOL": "bool", "C64": "complex64",
}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"float32"``."""
    return str(dtype).removeprefix("torch.")


def is_float_dtype(name: str) -> bool:
    """True for the floating dtypes auditclip analyses (fp64/32/16, bf16, fp8).

    >>> is_float_dtype("bfloat16"), is_float_dtype("int64")
    (True, False)
    """
    dtype = getattr(torch, name, None)
    return isinstance(dtype, torch.dtype) and dtype.is_floating_point


@dataclass(frozen=True)
class TensorInfo:
    """Name, dtype and shape of one tensor, known without reading its data."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def is_float(self) -> bool:
        return is_float_dtype(self.dtype)


class _Source:
    """Raw access to one file's tensors by their stored names."""

    path: Path
    metadata: dict[str, str]

    def raw_names(self) -> list[str]:
        raise NotImplementedError

    def raw_info(self, raw: str) -> tuple[str, tuple[int, ...]]:
        raise NotImplementedError

    def raw_get(self, raw: str) -> torch.Tensor:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _SafetensorsSource(_Source):
    def __init__(self, path: Path) -> None:
        from safetensors import safe_open

        self.path = path
        self._layout: tuple[int, dict[str, Any]] | None = None
        self._map: Any = None
        try:
            self._file = safe_open(str(path), framework="pt", device="cpu")
            self._names = list(self._file.keys())
            self.metadata = dict(self._file.metadata() or {})
        except Exception as exc:  # safetensors raises its own error types and OSError
            raise CheckpointError(path, f"not a readable safetensors file: {_one_line(exc)}") from exc

    def raw_names(self) -> list[str]:
        return self._names

    def raw_info(self, raw: str) -> tuple[str, tuple[int, ...]]:
        part = self._file.get_slice(raw)
        code = part.get_dtype()
        return _SAFETENSORS_DTYPES.get(code, code.lower()), tuple(part.get_shape())

    def raw_get(self, raw: str) -> torch.Tensor:
        mapped = self._mapped(raw)
        if mapped is not None:
            return mapped
        try:
            return self._file.get_tensor(raw)
        except Exception as exc:
            raise CheckpointError(self.path, f"cannot read tensor {raw!r}: {_one_line(exc)}") from exc

    def _mapped(self, raw: str) -> torch.Tensor | None:
        """The tensor as a view of the memory-mapped file: file pages, not a copy in RAM.

        The header was validated by ``safe_open``; the map is private (copy on
        write), so nothing done to the tensor can ever reach the file.
        """
        try:
            if self._layout is None:
                import mmap

                with open(self.path, "rb") as f:
                    size = int.from_bytes(f.read(8), "little")
                    header = json.loads(f.read(size))
                    self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if f.seek(0, 2) else None
                self._layout = (8 + size, header)
            base, header = self._layout
            entry = header[raw]
            dtype = getattr(torch, _SAFETENSORS_DTYPES.get(entry["dtype"], ""), None)
            begin, end = entry["data_offsets"]
            shape = tuple(entry["shape"])
            if not isinstance(dtype, torch.dtype) or self._map is None or (base + begin) % dtype.itemsize:
                return None
            count = math.prod(shape)
            if count == 0 or (end - begin) != count * dtype.itemsize:
                return None
            return torch.frombuffer(self._map, dtype=dtype, count=count, offset=base + begin).reshape(shape)
        except Exception:  # anything unusual: let safe_open read it the ordinary way
            return None

    def close(self) -> None:
        # Dropping the references (not mmap.close()) lets tensors still in use keep their pages.
        self._file = None  # type: ignore[assignment]
        self._map = None
        self._layout = None


class _TorchSource(_Source):
    def __init__(self, path: Path, key: str | None = None) -> None:
        self.path = path
        obj = load_torch_file(path)
        state = find_state_dict(obj, path, key)
        self._tensors = {name: t for name, t in _flatten(state).items()}
        # Entries beside the state dict (epoch, global_step, hyper-parameters) are
        # kept as metadata when they are plain scalars or strings.
        self.metadata = {
            str(k): str(v)
            for k, v in (obj.items() if isinstance(obj, Mapping) else [])
            if isinstance(v, (int, float, str, bool))
        }

    def raw_names(self) -> list[str]:
        return list(self._tensors)

    def raw_info(self, raw: str) -> tuple[str, tuple[int, ...]]:
        t = self._tensors[raw]
        return dtype_name(t.dtype), tuple(t.shape)

    def raw_get(self, raw: str) -> torch.Tensor:
        return self._tensors[raw]

    def close(self) -> None:
        self._tensors = {}


def allow_globals(names: list[str] | tuple[str, ...]) -> list[Any]:
    """Admit specific classes (``module.Class``) into ``torch.load(weights_only=True)``.

    For checkpoints that pickle a trusted class of your own; there is no blanket
    switch. Importing ``module`` runs it, which is the point: you name code you trust.

    >>> allow_globals(["collections.OrderedDict"])  # doctest: +ELLIPSIS
    [<class 'collections.OrderedDict'>]
    """
    import importlib

    from .errors import InputError

    found = []
    for name in names:
        module_name, _, attr = name.rpartition(".")
        try:
            obj = getattr(importlib.import_module(module_name), attr) if module_name else None
        except Exception as exc:
            raise InputError(f"--allow-global {name}: cannot import it: {_one_line(exc)}") from exc
        if obj is None:
            raise InputError(f"--allow-global {name!r}: expected module.Class")
        found.append(obj)
    if found:
        torch.serialization.add_safe_globals(found)
    return found


def load_torch_file(path: Path) -> Any:
    """``torch.load`` a pickle safely: ``weights_only=True``, memory-mapped if possible.

    Raises :class:`CheckpointError` naming the globals the file would need when
    unpickling it would run code: auditclip never loads such a file.
    """
    mmap = zipfile.is_zipfile(path)  # the legacy (pre-1.6) format cannot be mapped
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(path, _unsafe_message(path, exc), kind="unsafe") from exc
    except Exception as exc:
        raise CheckpointError(path, f"not a readable PyTorch file: {_one_line(exc)}") from exc


def _unsafe_message(path: Path, exc: Exception) -> str:
    names: list[str] = []
    try:
        names = list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # legacy-format files cannot be scanned; the load error names the global
        pass
    if not names:  # the unpickler's own message names the first global it refused
        import re

        names = re.findall(r"GLOBAL ([\w.]+)", str(exc))
    what = ", ".join(dict.fromkeys(names)) if names else "an unsupported object"
    return (
        f"refused: loading it would need Python globals that are not plain tensors ({what}); "
        "auditclip never runs code from a checkpoint. Re-save it as safetensors with code you trust, "
        "or admit a class you trust with --allow-global module.Class"
    )


def find_state_dict(obj: Any, path: Path, key: str | None = None) -> Mapping[str, Any]:
    """Find the model's state dict inside a loaded checkpoint object.

    With ``key`` the entry of that name is used (``ema``, ``ema_state_dict``...).
    Otherwise the first of :data:`WRAPPER_KEYS` holding a mapping of tensors wins
    (``state_dict`` is what Lightning writes), else the object itself.

    >>> sd = {"epoch": 3, "state_dict": {"w": torch.zeros(2)}}
    >>> list(find_state_dict(sd, Path("x.ckpt")))
    ['w']
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(path, f"holds a {type(obj).__name__}, not a dict of tensors")
    if key is not None:
        if key not in obj:
            raise CheckpointError(path, f"no entry {key!r} (entries: {_entries(obj)}); pick one with --key")
        if not isinstance(obj[key], Mapping):
            raise CheckpointError(path, f"entry {key!r} is a {type(obj[key]).__name__}, not a state dict")
        return obj[key]
    for wrapper in WRAPPER_KEYS:
        value = obj.get(wrapper)
        if isinstance(value, Mapping) and _has_tensor(value):
            return value
    if not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(path, f"no tensors at the top level (entries: {_entries(obj)}); pick one with --key")
    # A bare state dict: nested mappings here are optimizer or trainer state, not weights.
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _entries(obj: Mapping[str, Any]) -> str:
    keys = [str(k) for k in obj]
    return ", ".join(keys[:12]) + (", ..." if len(keys) > 12 else "")


def _has_tensor(m: Mapping[str, Any]) -> bool:
    return any(isinstance(v, torch.Tensor) or (isinstance(v, Mapping) and _has_tensor(v)) for v in m.values())


def _flatten(m: Mapping[str, Any], prefix: str = "") -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for k, v in m.items():
        if isinstance(v, torch.Tensor):
            out[prefix + str(k)] = v
        elif isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
    return out


class _ShardedSource(_Source):
    """Many shard files behind one ``*.index.json``; shards open on first use."""

    def __init__(self, index: Path, key: str | None = None) -> None:
        self.path = index
        self._key = key
        try:
            doc = json.loads(index.read_text(encoding="utf-8"))
            weight_map = doc["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except Exception as exc:
            raise CheckpointError(index, f"not a valid shard index: {_one_line(exc)}") from exc
        self._where = {str(name): index.parent / str(shard) for name, shard in weight_map.items()}
        missing = sorted({str(p.name) for p in self._where.values() if not p.is_file()})
        if missing:
            raise CheckpointError(index, f"index names missing shard(s): {', '.join(missing)}", kind="missing_shard")
        meta = doc.get("metadata") or {}
        self.metadata = {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}
        self._open: dict[Path, _Source] = {}

    def shard_files(self) -> list[Path]:
        return sorted(set(self._where.values()))

    def _shard(self, raw: str) -> _Source:
        path = self._where[raw]
        if path not in self._open:
            self._open[path] = _open_source(path, self._key)
        return self._open[path]

    def raw_names(self) -> list[str]:
        return list(self._where)

    def raw_info(self, raw: str) -> tuple[str, tuple[int, ...]]:
        return self._shard(raw).raw_info(raw)

    def raw_get(self, raw: str) -> torch.Tensor:
        return self._shard(raw).raw_get(raw)

    def close(self) -> None:
        for source in self._open.values():
            source.close()
        self._open = {}


def _open_source(path: Path, key: str | None) -> _Source:
    name = path.name.lower()
    if name.endswith(".index.json"):
        return _ShardedSource(path, key)
    if name.endswith(SAFETENSORS_SUFFIXES):
        return _SafetensorsSource(path)
    if name.endswith(TORCH_SUFFIXES):
        return _TorchSource(path, key)
    raise CheckpointError(path, "unknown checkpoint format (expected .safetensors, .pt, .pth, .bin, .ckpt or *.index.json)")


def normalize_names(raw_names: list[str]) -> dict[str, str]:
    """Map clean tensor names to stored ones, dropping DDP and torch.compile prefixes.

    >>> normalize_names(["module.fc.weight", "module._orig_mod.fc.bias"])
    {'fc.weight': 'module.fc.weight', 'fc.bias': 'module._orig_mod.fc.bias'}
    """
    def clean(name: str) -> str:
        return ".".join(part for part in name.split(".") if part != "_orig_mod")

    names = [clean(n) for n in raw_names]
    while names and all(n.startswith("module.") for n in names):
        names = [n[len("module."):] for n in names]
    if len(set(names)) != len(names):  # stripping would merge two tensors: keep what was stored
        return {n: n for n in raw_names}
    return dict(zip(names, raw_names))


class TensorReader:
    """One checkpoint's tensors by clean name, read lazily one at a time.

    >>> with open_checkpoint_file("sample_checkpoints/high_lr/epoch_01.safetensors") as r:  # doctest: +SKIP
    ...     r.info("net.0.weight")
    TensorInfo(name='net.0.weight', dtype='float32', shape=(64, 64))
    """

    def __init__(self, source: _Source) -> None:
        self._source = source
        self.path = source.path
        self.metadata = source.metadata
        self._raw = normalize_names(source.raw_names())

    def names(self) -> list[str]:
        return list(self._raw)

    def __contains__(self, name: object) -> bool:
        return name in self._raw

    def __iter__(self) -> Iterator[str]:
        return iter(self._raw)

    def __len__(self) -> int:
        return len(self._raw)

    @property
    def name_map(self) -> dict[str, str]:
        """Clean name -> stored name, for every tensor."""
        return dict(self._raw)

    def raw_name(self, name: str) -> str:
        """The name the tensor is stored under (with any prefix stripped from ``name``)."""
        return self._raw[name]

    def info(self, name: str) -> TensorInfo:
        try:
            dtype, shape = self._source.raw_info(self._raw[name])
        except CheckpointError:
            raise
        except Exception as exc:
            raise CheckpointError(self.path, f"cannot read the header of {name!r}: {_one_line(exc)}") from exc
        return TensorInfo(name, dtype, shape)

    def get(self, name: str) -> torch.Tensor:
        return self._source.raw_get(self._raw[name])

    def close(self) -> None:
        self._source.close()

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_checkpoint_file(path: str | Path, key: str | None = None) -> TensorReader:
    """Open one checkpoint file (or shard index) for lazy reading.

    ``key`` selects the entry of a PyTorch container holding the state dict
    (for example ``ema``); without it the usual wrappers are searched.

    >>> reader = open_checkpoint_file("run/step_100.safetensors")  # doctest: +SKIP
    >>> reader.names()[:2]  # doctest: +SKIP
    ['fc1.bias', 'fc1.weight']
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "no such file")
    return TensorReader(_open_source(path, key))


def read_safetensors_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file (or the first shard of an index), or {}."""
    try:
        if path.name.endswith(".index.json"):
            doc = json.loads(path.read_text(encoding="utf-8"))
            meta = {str(k): str(v) for k, v in (doc.get("metadata") or {}).items()}
            shards = sorted(set((doc.get("weight_map") or {}).values()))
            if shards and str(shards[0]).endswith(".safetensors"):
                meta = {**read_safetensors_metadata(path.parent / str(shards[0])), **meta}
            return meta
        if path.name.endswith(".safetensors"):
            return _SafetensorsSource(path).metadata
    except Exception:  # a broken file is reported when it is read, not while listing the run
        return {}
    return {}


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
