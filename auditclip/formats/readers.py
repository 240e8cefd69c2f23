"""Lazy readers for the checkpoint formats trainers write.

A :class:`TensorReader` gives one checkpoint's tensors by name, one at a time:

* ``.safetensors``: the header is parsed and validated here (offsets inside the
  file, contiguous, sizes matching dtype and shape); each tensor is read when
  asked for, with ``pread`` into a fresh buffer;
* sharded checkpoints through their ``*.index.json`` (``model.safetensors.index.json``
  or ``pytorch_model.bin.index.json``): many files, one checkpoint; every shard
  name must stay inside the index's folder (:mod:`auditclip.paths`);
* PyTorch pickles (``.pt/.pth/.bin/.ckpt``) through ``torch.load(weights_only=True)``.
  Zip-format files (every ``torch.save`` since 1.6) are unpickled onto the meta
  device, which records where each storage lies in the file and reads no data;
  each tensor is then read with ``pread`` like a safetensors one. Code in a
  pickle is never run: ``weights_only=True`` refuses any global that is not a
  plain tensor type; a zip-format file it refuses is read again with the gated
  unpickler of :mod:`auditclip.formats.safe_pickle` (foreign objects such as Lightning
  hyper-parameters become inert placeholders; code-like globals are refused).
  Tensors that are one region of one storage (tied weights) are listed once.
  A dict carrying DeepSpeed's ``param_shapes``/``ds_config`` whose parameters are
  empty (a ZeRO-3 model-states file out of its folder) is refused: placeholders;
* ``torch.distributed.checkpoint`` folders and DeepSpeed checkpoints (a tag folder, a
  file of one, a run folder with ``latest``) through :mod:`auditclip.formats`.

Why ``pread`` and not a memory map: a mapped file that is truncated while it is
read (``torch.save`` over an existing name during a live run does exactly that)
kills the process with SIGBUS. A short ``pread`` is an ordinary error instead,
and the file's size, mtime and inode are compared after every tensor, so a file
rewritten in place (even at the same size) is reported as ``changed``, never
read half old, half new.

Containers are walked iteratively with a depth limit and a node budget, so a
tiny pickle whose dicts share their children 60 levels deep, or a cyclic one,
is reported as unreadable instead of hanging or overflowing the stack.

Names are normalised so the same model saved by different wrappers compares
equal: a leading ``module.`` (DDP) is dropped when every name has it, and
``_orig_mod.`` (``torch.compile``) segments are dropped wherever they occur.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import threading
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ..errors import CheckpointError
from ..notices import note
from ..paths import member
from .dcp import dcp_folder, read_dcp_index, read_dcp_tensor
from .dtypes import SAFETENSORS, dtype_name, is_float_dtype, torch_dtype

#: Keys under which trainers nest the model's state dict, tried in this order.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module")

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")

#: safetensors refuses headers above 100 MB; so do we, before reading one.
MAX_HEADER_BYTES = 100_000_000
#: Deepest nesting of dicts walked inside a pickle, and most entries visited in all.
MAX_DEPTH = 64
MAX_NODES = 1_000_000
MAX_SHARED = 10_000

__all__ = ["TensorInfo", "TensorReader", "dtype_name", "is_float_dtype", "open_checkpoint_file"]


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


class PinnedFile:
    """One open file read with ``pread``, and the size/mtime/inode it had when opened.

    Every read checks it is inside the size seen at open, and afterwards that the
    file has not changed: a checkpoint rewritten while auditclip reads it is a
    :class:`CheckpointError` of kind ``changed``, never a crash or a mixed read.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise CheckpointError(path, f"cannot open: {exc.strerror or exc}") from exc
        st = os.fstat(self.fd)
        self.size = st.st_size
        self._stamp = (st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)

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

    def raw_bytes(self, raw: str) -> bytes:
        """The stored bytes of a tensor (for dtypes torch cannot hold, copied as they are)."""
        t = self.raw_get(raw)
        return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()

    def raw_kinds(self) -> dict[str, tuple[str, str]] | None:
        """(kind, the record that says so) by stored name, where the format records which
        tensors are parameters and which buffers; None where it does not (the names decide)."""
        return None

    def close(self) -> None:
        pass


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
        raise bad(f"header is not valid JSON ({_one_line(exc)[:100]})") from None
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


class _SafetensorsSource(_Source):
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
            raise CheckpointError(self.path, f"cannot read tensor {raw!r}: {_one_line(exc)}") from exc

    def raw_bytes(self, raw: str) -> bytes:
        e = self._entries[raw]
        return self._file.read(e.begin, e.end - e.begin)

    def close(self) -> None:
        self._file.close()


class _TorchSource(_Source):
    def __init__(self, path: Path, key: str | None = None) -> None:
        self.path = path
        self._file = PinnedFile(path)
        try:
            obj, self._lazy = load_torch_meta(self._file)
            state = find_state_dict(obj, path, key)
            tensors = tensors_of(state, path)
            _refuse_deepspeed_placeholders(obj, tensors, path)
            self._tensors = untie(tensors, self._lazy)
            #: stored name left out as a tied copy -> the stored name it is tied to
            self.tied = _tied_to(tensors, self._tensors, self._lazy)
            if key is None:
                note_copies(weight_copies(obj, path))
        except BaseException:
            self._file.close()
            raise
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
        if t.layout != torch.strided:
            raise CheckpointError(self.path, f"tensor {raw!r} is {str(t.layout).removeprefix('torch.')}, "
                                             "not a dense tensor; auditclip reads dense tensors only",
                                  kind="unsupported")
        return dtype_name(t.dtype), tuple(t.shape)

    def raw_get(self, raw: str) -> torch.Tensor:
        t = self._tensors[raw]
        if not self._lazy:
            return t
        self.raw_info(raw)
        storage = t.untyped_storage()
        offset = getattr(storage, "_checkpoint_offset", None)
        if offset is None:
            raise CheckpointError(self.path, f"tensor {raw!r} has no data in the file (saved on the meta device?)",
                                  kind="unsupported")
        try:
            stride = None if t.is_contiguous() else tuple(t.stride())
            return read_strided(self._file, int(offset), storage.nbytes(), t.dtype, tuple(t.shape),
                                stride, t.storage_offset())
        except CheckpointError:
            raise
        except (RuntimeError, ValueError, OverflowError, MemoryError) as exc:
            raise CheckpointError(self.path, f"cannot read tensor {raw!r}: {_one_line(exc)}") from exc

    def close(self) -> None:
        self._tensors = {}
        self._file.close()


def _refuse_deepspeed_placeholders(obj: Any, tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    """Refuse a DeepSpeed ZeRO-3 model-states dict read as a plain state dict: its parameters are placeholders.

    Files named as DeepSpeed names them go to :class:`_DeepSpeedSource`; this catches one
    renamed or copied out of its tag folder. A dict carrying DeepSpeed's ``param_shapes`` or
    ``ds_config`` whose float tensors (buffers aside) are all empty, or where one is empty
    that ``param_shapes`` gives a size, holds no weights: auditing it would pass any gate.
    """
    if not isinstance(obj, Mapping) or not ("param_shapes" in obj or "ds_config" in obj):
        return
    names = obj.get("buffer_names")
    buffers = set(names) if isinstance(names, list | tuple) and all(isinstance(n, str) for n in names) else set()
    floats = {n: t for n, t in tensors.items() if t.is_floating_point() and n not in buffers}
    empty = [n for n, t in floats.items() if t.numel() == 0]
    if not empty:
        return
    sized: set[str] = set()
    groups = obj.get("param_shapes")
    for group in groups if isinstance(groups, list | tuple) else []:
        if isinstance(group, Mapping):
            sized |= {str(n) for n, shape in group.items()
                      if isinstance(shape, torch.Size | tuple | list) and math.prod(shape) > 0}
    if len(empty) < len(floats) and not sized & set(empty):
        return
    raise CheckpointError(path, f"a DeepSpeed ZeRO-3 model-states file: its parameters ({', '.join(empty[:3])}"
                                f"{', ...' if len(empty) > 3 else ''}) are empty placeholders of shape [0]; the "
                                "weights live in the zero_pp_rank_*_mp_rank_00_optim_states.pt files of its "
                                "global_step<N>/ tag folder. Audit the tag folder (or the run folder holding "
                                "`latest`) with this file in it under its DeepSpeed name, or consolidate the weights "
                                "with DeepSpeed's own script, saved in the run folder: python zero_to_fp32.py "
                                "RUN_DIR OUTPUT_DIR --tag global_step<N>, then audit OUTPUT_DIR", kind="unsupported")


def zip_byteorder(f: PinnedFile) -> str | None:
    """The byte order a zip-format torch file records (``little`` if none), or None if not a zip.

    >>> import os, tempfile, torch
    >>> path = os.path.join(tempfile.mkdtemp(), "w.pt")
    >>> torch.save({"w": torch.ones(2)}, path)
    >>> f = PinnedFile(Path(path))
    >>> zip_byteorder(f)
    'little'
    >>> obj, lazy = load_torch_meta(f)
    >>> lazy, obj["w"].device.type, list(obj["w"].shape)
    (True, 'meta', [2])
    >>> f.close()
    """
    try:
        with f.dup() as fh, zipfile.ZipFile(fh) as z:
            names = [n for n in z.namelist() if n.endswith("/byteorder") or n == "byteorder"]
            return z.read(names[0]).decode("ascii", "replace") if names else "little"
    except (zipfile.BadZipFile, OSError, ValueError, KeyError, EOFError, NotImplementedError):
        return None


def load_torch_meta(f: PinnedFile) -> tuple[Any, bool]:
    """Unpickle a torch file safely; (object, lazy): lazy means tensors are meta descriptions
    (a little-endian zip file), their data read later one at a time; otherwise tensors are loaded.
    Example: :func:`zip_byteorder`."""
    lazy = zip_byteorder(f) == "little"
    return _safe_torch_load(f, "meta" if lazy else "cpu", stubs=lazy), lazy


def _safe_torch_load(f: PinnedFile, map_location: str, stubs: bool) -> Any:
    """``torch.load(weights_only=True)``; when it refuses a zip-format file (``stubs``), the gated
    unpickler of :mod:`auditclip.formats.safe_pickle`, which reads the tensors and builds no foreign object.

    A pickle that needs a global which is plainly code (``os.system``...) is a
    :class:`CheckpointError` of kind ``unsafe`` either way; nothing of it runs.
    """
    from .safe_pickle import Refused, pickle_module

    try:
        try:
            with warnings.catch_warnings(), f.dup() as fh:
                warnings.simplefilter("ignore")  # torch's warnings would print before our one Error line
                obj = torch.load(fh, map_location=map_location, weights_only=True, mmap=False)
        except pickle.UnpicklingError as exc:
            if not stubs:  # legacy-format files: only what weights_only admits
                raise CheckpointError(f.path, _unsafe_message(f.path, exc), kind="unsafe") from exc
            module, reports = pickle_module()
            with warnings.catch_warnings(), f.dup() as fh:
                warnings.simplefilter("ignore")
                obj = torch.load(fh, map_location=map_location, weights_only=False, mmap=False,
                                 pickle_module=module)
            stubbed = list(dict.fromkeys(name for report in reports for name in report))
            if stubbed:
                note(f"read the weights without building the other objects the pickle holds: "
                     f"{', '.join(stubbed)} kept as inert placeholders (none of their code ran)")
        f.check()
        return obj
    except CheckpointError:
        raise
    except Refused as exc:
        raise CheckpointError(f.path, _unsafe_message(f.path, exc), kind="unsafe") from exc
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f.path, _unsafe_message(f.path, exc), kind="unsafe") from exc
    except Exception as exc:  # torch raises RuntimeError, zipfile, EOF, ... for damaged files
        raise CheckpointError(f.path, f"not a readable PyTorch file: {_one_line(exc)}") from exc


def allow_globals(names: list[str] | tuple[str, ...]) -> list[Any]:
    """Admit specific classes (``module.Class``) into ``torch.load(weights_only=True)``.

    For checkpoints that pickle a trusted class of your own; there is no blanket
    switch. Importing ``module`` runs it, which is the point: you name code you trust.

    >>> allow_globals(["collections.OrderedDict"])  # doctest: +ELLIPSIS
    [<class 'collections.OrderedDict'>]
    """
    import importlib

    from ..errors import InputError

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


def load_torch_file(path: Path, placeholders: bool = True) -> Any:
    """``torch.load`` a whole pickle safely, into memory.

    For rewriting a container (``clip`` of a legacy-format file, ``--to safetensors``),
    so every tensor is read; the file is read, never mapped, and a file that
    changes while it is read is a ``changed`` error. Foreign objects in a
    zip-format file are kept as inert placeholders (:mod:`auditclip.formats.safe_pickle`).
    Raises :class:`CheckpointError` naming the globals the file would need when
    unpickling it would run code: auditclip never loads such a file.
    ``placeholders=False``: only what ``weights_only=True`` admits (for an object that
    is saved again, where a placeholder could not be pickled back).

    >>> import tempfile
    >>> path = Path(tempfile.mkdtemp()) / "x.pt"
    >>> torch.save({"w": torch.ones(2)}, path)
    >>> load_torch_file(path)["w"].tolist()
    [1.0, 1.0]
    """
    f = PinnedFile(Path(path))
    try:
        return _safe_torch_load(f, "cpu", stubs=placeholders and zip_byteorder(f) is not None)
    finally:
        f.close()


def _unsafe_message(path: Path, exc: Exception) -> str:
    refused = list(getattr(exc, "names", []))  # safe_pickle.Refused: the globals that are code
    if refused:
        return (f"refused: it calls {', '.join(refused)}, which is code, not data; auditclip never runs code "
                "from a checkpoint. Re-save it as safetensors with code you trust, or admit a class you trust "
                "with --allow-global module.Class")
    names: list[str] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            names = list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:  # legacy-format files cannot be scanned; the load error names the global
        pass
    if not names:  # the unpickler's own message names the first global it refused
        import re

        names = re.findall(r"GLOBAL ([\w.]+)", str(exc))
    if not names:  # a raw or legacy pickle: read its opcodes (never run them) for the globals it names
        names = [n for n in pickle_globals(path) if not n.startswith(("torch.", "collections.OrderedDict"))]
    what = ", ".join(dict.fromkeys(names)) if names else "an unsupported object"
    return (
        f"refused: loading it would need Python globals that are not plain tensors ({what}); "
        "auditclip never runs code from a checkpoint. Re-save it as safetensors with code you trust, "
        "or admit a class you trust with --allow-global module.Class"
    )


#: Bytes of a pickle stream :func:`pickle_globals` reads at most.
SCAN_BYTES = 64 << 20


def pickle_globals(path: Path, limit: int = SCAN_BYTES) -> list[str]:
    """``module.name`` of every global the pickles in a file ask for, read from opcodes only.

    Nothing is unpickled, so nothing runs. A legacy ``torch.save`` file holds several
    pickles in a row; each is scanned. ``STACK_GLOBAL`` takes its two names from the
    strings pushed just before it.

    >>> import io, os, pickle, tempfile
    >>> path = Path(tempfile.mkdtemp()) / "x.pt"
    >>> _ = path.write_bytes(pickle.dumps({"f": os.system}))
    >>> pickle_globals(path)
    ['posix.system']
    """
    import io
    import pickletools

    found: list[str] = []
    try:
        with open(path, "rb") as f:
            stream = io.BytesIO(f.read(limit))
        for _ in range(8):  # legacy torch files: magic, protocol, sys info, then the object
            strings: list[str] = []
            if stream.tell() >= len(stream.getbuffer()):
                break
            for op, arg, _pos in pickletools.genops(stream):
                if op.name in ("GLOBAL", "INST") and isinstance(arg, str):
                    found.append(arg.replace(" ", "."))
                elif op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8") and isinstance(arg, str):
                    strings = (strings + [arg])[-2:]
                elif op.name == "STACK_GLOBAL" and len(strings) == 2:
                    found.append(".".join(strings))
    except Exception:  # a damaged stream: report what was found before it
        pass
    return list(dict.fromkeys(found))


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
        if isinstance(value, Mapping) and _has_tensor(value, path):
            return value
    if not any(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(path, f"no tensors at the top level (entries: {_entries(obj)}); pick one with --key")
    # A bare state dict: nested mappings here are optimizer or trainer state, not weights.
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def weight_copies(obj: Any, path: Path, key: str | None = None) -> list[tuple[str | None, Mapping[str, Any]]]:
    """Every copy of the model's weights in a container: (entry, state dict), the one read first.

    The first is what :func:`find_state_dict` reads (``key``, else the first of
    :data:`WRAPPER_KEYS`; entry None for a bare state dict). Other top-level entries
    are copies when they are mappings whose tensors carry at least half of its names
    (after :func:`normalize_names`): Lightning's weight averaging (``state_dict`` = the
    average, ``current_model_state`` = the live weights), ``ema_state_dict``, ``model_ema``.
    Optimizer state (``param_groups``, integer keys) never matches.

    >>> w = {"fc.weight": torch.zeros(2)}
    >>> [e for e, _ in weight_copies({"state_dict": w, "current_model_state": dict(w), "epoch": 1}, Path("x.ckpt"))]
    ['state_dict', 'current_model_state']
    """
    state = find_state_dict(obj, path, key)
    first = next((k for k, v in obj.items() if v is state), None) if isinstance(obj, Mapping) else None
    copies: list[tuple[str | None, Mapping[str, Any]]] = [(None if first is None else str(first), state)]
    if first is None:
        return copies
    names = set(normalize_names([n for _, _, n in tensor_slots(state, path)]))
    for k, v in obj.items():
        if k == first or not isinstance(v, Mapping) or not names:
            continue
        theirs = set(normalize_names([n for _, _, n in tensor_slots(v, path)]))
        if len(names & theirs) * 2 >= len(names):
            copies.append((str(k), v))
    return copies


def note_copies(copies: list[tuple[str | None, Mapping[str, Any]]]) -> None:
    """Say which copy of the weights was read and which were left out (when there are several).

    >>> from auditclip.notices import collect
    >>> w = {"fc.weight": torch.zeros(1)}
    >>> with collect() as notes:
    ...     note_copies([("state_dict", w), ("current_model_state", w)])
    >>> notes[0].split(";")[0]
    "read the weights in 'state_dict'"
    """
    if len(copies) > 1:
        others = ", ".join(str(e) for e, _ in copies[1:])
        note(f"read the weights in '{copies[0][0]}'; the file holds other copies of them, left out: {others} "
             "(read one with --key NAME; clip clips every copy)")


def storage_identity(t: torch.Tensor, lazy: bool) -> tuple[Any, ...] | None:
    """What makes two tensors the same data: storage, offset in it, shape, stride and dtype.

    ``lazy``: meta tensors from a zip file, whose storage is known by its offset in the file.
    None for a tensor with no storage to compare (sparse, empty).

    >>> w = torch.zeros(4, 2)
    >>> storage_identity(w, False) == storage_identity(w.view(4, 2), False), storage_identity(w, False) == storage_identity(w.t(), False)
    (True, False)
    """
    if t.layout != torch.strided or t.numel() == 0:
        return None
    storage = t.untyped_storage()
    base = getattr(storage, "_checkpoint_offset", None) if lazy else storage.data_ptr()
    if base is None:
        return None
    return (base, storage.nbytes(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def untie(tensors: dict[str, torch.Tensor], lazy: bool = False) -> dict[str, torch.Tensor]:
    """``tensors`` with every tied copy left out (the first name in file order is kept), each said once.

    Two names are tied when their tensors are the same region of one storage
    (:func:`storage_identity`): a tied embedding and LM head are one tensor, counted,
    flagged and clipped once.

    >>> w = torch.zeros(2, 3)
    >>> list(untie({"wte.weight": w, "lm_head.weight": w, "b": torch.zeros(3)}))
    ['wte.weight', 'b']
    """
    first: dict[tuple[Any, ...], str] = {}
    kept: dict[str, torch.Tensor] = {}
    tied: list[tuple[str, str]] = []
    for name, t in tensors.items():
        ident = storage_identity(t, lazy)
        if ident is not None and ident in first:
            tied.append((name, first[ident]))
            continue
        if ident is not None:
            first[ident] = name
        kept[name] = t
    note_tied(tied)
    return kept


def note_tied(tied: list[tuple[str, str]], limit: int = 3) -> None:
    """Say which names were tied to which (one note each, or one summary for many).

    >>> from auditclip.notices import collect
    >>> with collect() as notes:
    ...     note_tied([("lm_head.weight", "wte.weight")])
    >>> notes
    ['lm_head.weight is tied to wte.weight (same storage); counted once']
    """
    if len(tied) <= limit:
        for name, to in tied:
            note(f"{name} is tied to {to} (same storage); counted once")
        return
    shown = ", ".join(f"{name} -> {to}" for name, to in tied[:limit])
    note(f"{len(tied)} tensor names are tied to others (same storage), each counted once: {shown}, ...")


def _tied_to(tensors: dict[str, torch.Tensor], kept: dict[str, torch.Tensor], lazy: bool) -> dict[str, str]:
    """Each name :func:`untie` left out -> the kept name it is tied to."""
    if len(kept) == len(tensors):
        return {}
    first = {storage_identity(t, lazy): name for name, t in kept.items()}
    return {name: first[storage_identity(t, lazy)] for name, t in tensors.items() if name not in kept}


def _entries(obj: Mapping[str, Any]) -> str:
    keys = [str(k) for k in obj]
    return ", ".join(keys[:12]) + (", ..." if len(keys) > 12 else "")


def iter_tensor_slots(m: Mapping[Any, Any], path: Path | str = "") -> Iterator[tuple[Any, Any, str]]:
    """(mapping, key, dotted name) of every tensor in nested mappings, in insertion order.

    Walked iteratively: a cycle is skipped, and more than :data:`MAX_DEPTH` levels or
    :data:`MAX_NODES` entries (a pickle whose dicts share their children many levels
    deep has billions of paths) is a :class:`CheckpointError`, not a hang.

    >>> [name for _, _, name in iter_tensor_slots({"a": {"w": torch.zeros(1)}, "b": torch.ones(1)})]
    ['a.w', 'b']
    """
    budget = MAX_NODES
    stack: list[tuple[Iterator[tuple[Any, Any]], Mapping[Any, Any], str]] = [(iter(m.items()), m, "")]
    on_path = {id(m)}
    entered: set[int] = set()
    shared = MAX_SHARED
    while stack:
        items, mapping, prefix = stack[-1]
        step = next(items, None)
        if step is None:
            stack.pop()
            on_path.discard(id(mapping))
            continue
        budget -= 1
        if budget < 0:
            raise CheckpointError(path, f"refused: nested containers with more than {MAX_NODES:,} entries "
                                        "(shared or repeated sub-dicts?); not a state dict auditclip can walk", kind="unsafe")
        k, v = step
        if isinstance(v, torch.Tensor):
            yield mapping, k, prefix + str(k)
        elif isinstance(v, Mapping) and id(v) not in on_path:
            if len(stack) >= MAX_DEPTH:
                raise CheckpointError(path, f"refused: containers nested more than {MAX_DEPTH} levels deep",
                                      kind="unsafe")
            if id(v) in entered:  # the same dict reached again by another path: fine a few times, a bomb often
                shared -= 1
                if shared < 0:
                    raise CheckpointError(path, f"refused: the same sub-containers are reached by more than "
                                                f"{MAX_SHARED:,} paths (a container bomb?); not a state dict", kind="unsafe")
            entered.add(id(v))
            on_path.add(id(v))
            stack.append((iter(v.items()), v, f"{prefix}{k}."))


def tensor_slots(m: Mapping[Any, Any], path: Path | str = "") -> list[tuple[Any, Any, str]]:
    """Every slot :func:`iter_tensor_slots` finds, as a list."""
    return list(iter_tensor_slots(m, path))


def tensors_of(m: Mapping[Any, Any], path: Path | str = "") -> dict[str, torch.Tensor]:
    """Every tensor in nested mappings by dotted name (see :func:`tensor_slots`).

    >>> list(tensors_of({"fc": {"weight": torch.zeros(2)}}))
    ['fc.weight']
    """
    return {name: mapping[k] for mapping, k, name in tensor_slots(m, path)}


def _has_tensor(m: Mapping[Any, Any], path: Path | str = "") -> bool:
    return next(iter_tensor_slots(m, path), None) is not None


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
        return f"not valid JSON: {_one_line(exc)[:200]}"
    return _one_line(exc)[:200]


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


class _ShardedSource(_Source):
    """Many shard files behind one ``*.index.json``; shards open on first use."""

    def __init__(self, index: Path, key: str | None = None) -> None:
        self.path = index
        self._key = key
        self.index = read_shard_index(index)
        self.metadata = dict(self.index.metadata)
        self._where = {name: self.index.shards[shard] for name, shard in self.index.weight_map.items()}
        self._open: dict[Path, _Source] = {}
        self._lock = threading.Lock()

    def shard_files(self) -> list[Path]:
        return sorted(set(self._where.values()))

    def _shard(self, raw: str) -> _Source:
        path = self._where[raw]
        with self._lock:  # walker threads ask for shards concurrently
            if path not in self._open:
                self._open[path] = _open_source(path, self._key)
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


class _DcpSource(_Source):
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
            raise CheckpointError(self.path, f"cannot read tensor {raw!r}: {_one_line(exc)}") from exc


class _DeepSpeedSource(_Source):
    """A DeepSpeed checkpoint (:mod:`auditclip.formats.deepspeed`): a tag folder, a file in one, or a run folder.

    The model's parameters and buffers with their full shapes, read one at a time:
    at ZeRO 0-2 the ``module`` weights (what the model runs with, bf16/fp16 in mixed
    precision), at ZeRO-3 the fp32 master copy reassembled from every rank's optimizer
    file (the module states hold only empty placeholders, never read). ``key``:
    ``master`` reads the fp32 master copy at ZeRO 1-2 too, ``module`` insists on the
    module weights (refused at ZeRO-3). One note names the copy read.
    """

    KEYS = ("module", "master")

    def __init__(self, path: Path, key: str | None = None) -> None:
        # imported here: formats.deepspeed reads its files through this module's PinnedFile
        from .deepspeed import read_deepspeed_index

        if key is not None and key not in self.KEYS:
            raise CheckpointError(path, f"a DeepSpeed checkpoint has no entry {key!r} to pick: --key module reads "
                                        "the weights the model runs with, --key master the fp32 master copy of "
                                        "the optimizer files (ZeRO 1-3)", kind="unsupported")
        self.index = read_deepspeed_index(path)
        self.path = self.index.folder
        self.metadata: dict[str, str] = {}
        self.tied = dict(self.index.shared)
        index = self.index
        self._source = key or index.default_source
        params = [e for e in index.tensors.values() if e.role == "parameter"]
        if self._source == "master":
            lacking = [e.name for e in params if not e.master_dtype]
            if lacking:
                raise CheckpointError(index.folder, f"--key master: {lacking[0]} has no fp32 master copy here (ZeRO "
                                                    f"stage {index.zero_stage}, {index.world_size} optimizer "
                                                    "file(s)): "
                                                    + ("ZeRO-0 saves it as a list without names"
                                                       if index.zero_stage == 0 else "the optimizer files are missing")
                                                    + "; read the module weights (no --key)", kind="unsupported")
        elif index.zero_stage == 3 and params:
            raise CheckpointError(index.folder, "--key module: the module states of a ZeRO-3 checkpoint hold only "
                                                "empty placeholders; its weights are the fp32 master copy (no --key)",
                                  kind="unsupported")
        note(self._which_copy())

    def _which_copy(self) -> str:
        """One note for every checkpoint of a run (no path in it): which copy of the weights was read."""
        index = self.index
        stage = f"DeepSpeed ZeRO-{index.zero_stage} checkpoints"
        if self._source == "master":
            how = ("reassembled from every rank's zero_pp_rank_*_optim_states.pt partitions"
                   if index.zero_stage == 3 else "from the zero_pp_rank_*_optim_states.pt files (--key master)")
            return (f"{stage}: the parameters are the fp32 master copy {how}, as zero_to_fp32.py gives them; "
                    "buffers and frozen parameters as saved")
        dtypes = sorted({e.module_dtype for e in index.tensors.values() if e.role == "parameter" and e.module_dtype})
        more = "; --key master reads the fp32 master copy" if index.zero_stage in (1, 2) else ""
        return (f"{stage}: the module weights are read (what the model runs with, "
                f"{'/'.join(dtypes) or 'as saved'}){more}")

    def _master(self, raw: str) -> bool:
        entry = self.index.tensor(raw)
        return self._source == "master" and entry.role == "parameter"

    def raw_names(self) -> list[str]:
        return list(self.index.tensors)

    def raw_kinds(self) -> dict[str, tuple[str, str]] | None:
        # the model states list the buffers (buffer_names) and the trained parameters (param_shapes,
        # frozen_param_shapes); a tensor listed nowhere (role "other") is left to the name rule
        rules = {"parameter": ("parameter", "format: deepspeed param_shapes"),
                 "frozen": ("parameter", "format: deepspeed frozen_param_shapes"),
                 "buffer": ("buffer", "format: deepspeed buffer_names")}
        return {name: rules[e.role] for name, e in self.index.tensors.items() if e.role in rules}

    def raw_info(self, raw: str) -> tuple[str, tuple[int, ...]]:
        entry = self.index.tensor(raw)
        dtype = entry.master_dtype if self._master(raw) else entry.module_dtype
        return dtype or "unknown", entry.shape

    def raw_get(self, raw: str) -> torch.Tensor:
        from .deepspeed import read_deepspeed_tensor

        try:
            return read_deepspeed_tensor(self.index, raw, self._source)
        except CheckpointError:
            raise
        except (RuntimeError, ValueError, OverflowError, MemoryError) as exc:
            raise CheckpointError(self.path, f"cannot read tensor {raw!r}: {_one_line(exc)}") from exc


def _is_deepspeed(path: Path) -> bool:
    """A DeepSpeed checkpoint by its names: a model/optimizer-states file, a tag folder, a run folder."""
    from .deepspeed import is_deepspeed_file, is_deepspeed_run, is_deepspeed_tag_folder

    if path.is_dir():
        return is_deepspeed_tag_folder(path) or is_deepspeed_run(path)
    return is_deepspeed_file(path)


def _open_source(path: Path, key: str | None) -> _Source:
    folder = dcp_folder(path)
    if folder is not None:
        return _DcpSource(folder, key)
    if _is_deepspeed(path):  # never the model-states file alone: ZeRO-3's holds only placeholders
        return _DeepSpeedSource(path, key)
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

    @property
    def tied(self) -> dict[str, str]:
        """Clean names left out because they are tied to another (``lm_head.weight``) -> that name.

        For loading a model whose state dict names both: the kept tensor serves both names.
        """
        raw_tied: dict[str, str] = getattr(self._source, "tied", {})
        if not raw_tied:
            return {}
        clean_of = {raw: clean for clean, raw in self._raw.items()}
        everything = normalize_names(list(self._raw.values()) + list(raw_tied))
        dropped = {raw: clean for clean, raw in everything.items() if raw in raw_tied}
        return {dropped.get(raw, raw): clean_of[kept] for raw, kept in raw_tied.items() if kept in clean_of}

    def format_kind_rules(self) -> dict[str, tuple[str, str]]:
        """(kind, rule) by clean name for the tensors whose kind the format itself records
        (DeepSpeed's ``buffer_names``/``param_shapes``); empty where the format records none,
        so the name rule decides (:func:`auditclip.kinds.tensor_kind`, as its ``adapter``).

        >>> import tempfile, torch
        >>> from safetensors.torch import save_file
        >>> path = tempfile.mkdtemp() + "/w.safetensors"; save_file({"scale": torch.ones(2)}, path)
        >>> with open_checkpoint_file(path) as r:
        ...     r.format_kind_rules(), r.format_kinds()
        ({}, None)
        """
        raw = self._source.raw_kinds()
        if not raw:
            return {}
        return {clean: raw[stored] for clean, stored in self._raw.items() if stored in raw}

    def format_kinds(self) -> tuple[frozenset[str], frozenset[str]] | None:
        """(parameter names, buffer names) as the format records them, None where it records
        none; the ``kinds`` that :func:`auditclip.clipping.clip_selected` takes. A name in
        neither set is left to the name rule."""
        rules = self.format_kind_rules()
        if not rules:
            return None
        return (frozenset(n for n, (k, _) in rules.items() if k == "parameter"),
                frozenset(n for n, (k, _) in rules.items() if k == "buffer"))

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

    def raw_bytes(self, name: str) -> bytes:
        """The tensor's stored bytes, whatever its dtype (sub-byte floats included)."""
        return self._source.raw_bytes(self._raw[name])

    def close(self) -> None:
        self._source.close()

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_checkpoint_file(path: str | Path, key: str | None = None) -> TensorReader:
    """Open one checkpoint file (or shard index, or DCP folder) for lazy reading.

    ``key`` selects the entry of a PyTorch container holding the state dict
    (for example ``ema``); without it the usual wrappers are searched. A
    ``torch.distributed.checkpoint`` folder (or its ``.metadata``) gives its model
    tensors (:class:`_DcpSource`). A DeepSpeed tag folder (``global_step<N>/``), a
    ``*model_states.pt``/``*optim_states.pt`` file in one, or a run folder with
    ``latest`` gives the model's tensors of that tag (:class:`_DeepSpeedSource`;
    ``key``: ``module`` or ``master``).

    >>> reader = open_checkpoint_file("run/step_100.safetensors")  # doctest: +SKIP
    >>> reader.names()[:2]  # doctest: +SKIP
    ['fc1.bias', 'fc1.weight']
    """
    path = Path(path)
    if dcp_folder(path) is None and not path.is_file() and not (path.is_dir() and _is_deepspeed(path)):
        what = ("a folder, not a checkpoint file (nor a torch.distributed.checkpoint folder: no .metadata in it; "
                "nor a DeepSpeed one: no latest file, no *model_states.pt)")
        raise CheckpointError(path, what if path.is_dir() else "no such file")
    return TensorReader(_open_source(path, key))


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
    """The ``__metadata__`` of a safetensors file (or the first shard of an index), or {}."""
    try:
        if path.name.endswith(".index.json"):
            index = read_shard_index(path)
            meta = dict(index.metadata)
            shards = sorted(index.shards)
            if shards and shards[0].endswith(".safetensors"):
                meta = {**read_safetensors_metadata(index.shards[shards[0]]), **meta}
            return meta
        if path.name.endswith(".safetensors"):
            f = PinnedFile(path)
            try:
                return _metadata_only(f)
            finally:
                f.close()
    except Exception:  # a broken file is reported when it is read, not while listing the run
        return {}
    return {}


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
