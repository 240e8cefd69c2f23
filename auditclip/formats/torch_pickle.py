"""The torch pickle family (``.pt/.pth/.bin/.ckpt``): containers read without running their code.

Zip-format files (every ``torch.save`` since 1.6) are unpickled onto the meta device,
which records where each storage lies in the file and reads no data; each tensor is
then read with ``pread`` (:mod:`auditclip.formats.pinned`). Code in a pickle is never
run: ``weights_only=True`` refuses any global that is not a plain tensor type; a
zip-format file it refuses is read again with the gated unpickler of
:mod:`auditclip.formats.safe_pickle` (foreign objects such as Lightning
hyper-parameters become inert placeholders; code-like globals are refused).
Tensors that are one region of one storage (tied weights) are listed once. A dict
carrying DeepSpeed's ``param_shapes``/``ds_config`` whose parameters are empty (a
ZeRO-3 model-states file out of its folder) is refused: placeholders.

Containers are walked iteratively with a depth limit and a node budget, so a tiny
pickle whose dicts share their children 60 levels deep, or a cyclic one, is reported
as unreadable instead of hanging or overflowing the stack. The state dict is found
under the trainers' usual entries (:data:`WRAPPER_KEYS`) or the one ``--key`` names.

>>> import tempfile, torch
>>> path = Path(tempfile.mkdtemp()) / "w.pt"
>>> torch.save({"state_dict": {"fc.weight": torch.ones(2)}, "epoch": 3}, path)
>>> source = TorchSource(path)
>>> source.raw_names(), source.raw_get("fc.weight").tolist()
(['fc.weight'], [1.0, 1.0])
>>> source.close()
"""

from __future__ import annotations

import math
import pickle
import warnings
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from ..notices import note
from .dtypes import dtype_name
from .pinned import PinnedFile, read_strided
from .remote import open_binary
from .source import Source, normalize_names, one_line

__all__ = [
    "MAX_DEPTH", "MAX_NODES", "MAX_SHARED", "SCAN_BYTES", "TorchSource", "WRAPPER_KEYS", "allow_globals",
    "find_state_dict", "iter_tensor_slots", "load_torch_file", "load_torch_meta", "note_copies", "note_tied",
    "pickle_globals", "storage_identity", "tensor_slots", "tensors_of", "untie", "weight_copies", "zip_byteorder",
]

#: Keys under which trainers nest the model's state dict, tried in this order.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module")
#: Deepest nesting of dicts walked inside a pickle, and most entries visited in all.
MAX_DEPTH = 64
MAX_NODES = 1_000_000
MAX_SHARED = 10_000


class TorchSource(Source):
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
            raise CheckpointError(self.path, f"cannot read tensor {raw!r}: {one_line(exc)}") from exc

    def close(self) -> None:
        self._tensors = {}
        self._file.close()


def _refuse_deepspeed_placeholders(obj: Any, tensors: Mapping[str, torch.Tensor], path: Path) -> None:
    """Refuse a DeepSpeed ZeRO-3 model-states dict read as a plain state dict: its parameters are placeholders.

    Files named as DeepSpeed names them go to :class:`DeepSpeedSource`; this catches one
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
        raise CheckpointError(f.path, f"not a readable PyTorch file: {one_line(exc)}") from exc


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
            raise InputError(f"--allow-global {name}: cannot import it: {one_line(exc)}") from exc
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
        with open_binary(path) as f:
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
