"""Find the checkpoints of a training run and put them in step order.

A run is given as a directory of checkpoint files, a directory of checkpoint
folders (Hugging Face ``checkpoint-<step>/``, accelerate's ``checkpoints/checkpoint_<i>/``
under a ``project_dir``, ``torch.distributed.checkpoint`` folders of any name:
``step-100/``, Lightning's sharded ``epoch=0-step=23.ckpt/``, torchtitan's
``checkpoint/step-<n>/``; DeepSpeed tag folders ``global_step<N>/`` of a run folder
with ``latest``), a glob, or explicit paths. Each checkpoint gets a ``label``
(its path relative to the run; ``final`` for a Trainer's ``save_model()`` in the run
root) and a ``step``: the one the file stores (``global_step`` in a pickled ``.ckpt``,
read without unpickling; ``step``/``global_step`` in safetensors metadata;
``trainer_state.json``), else the one in its name (``step_900``, ``ckpt-0001000``,
``checkpoint-500``, ``epoch=3-step=48.ckpt``).

Duplicates (links, ``last.ckpt``, byte-identical copies) are folded into the
checkpoint they copy, and a folder holding several model series (``netD_epoch_*``
beside ``netG_epoch_*``) is refused with an :class:`InputError` naming a glob for each.

Nothing is dropped silently. Every weight-like file found either becomes a
:class:`Checkpoint` (one whose opening fails with a :class:`CheckpointError`
when discovery already knows it cannot be read: a broken or unsafe shard index,
a directory named ``model.safetensors``, a broken symlink), or is listed:
trainer state (``optimizer.pt``...) in :attr:`Run.ignored`, anything else in
:attr:`Run.notes` with the reason. Shard names read from an index are resolved
by :func:`auditclip.formats.readers.read_shard_index` (through :func:`auditclip.paths.member`), so a name leaving the index's folder is
never claimed nor followed. Steps outside the 64-bit range are unknown (with a
note), and ``**`` globs expand each real directory once, so symlink loops end.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import json
import math
import os
import pickletools
import re
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

from .errors import CheckpointError, InputError, NoCheckpointsError
from .formats.dcp import read_dcp_index, read_dcp_object, read_dcp_tensor
from .formats.index import read_checkpoint_metadata as read_safetensors_metadata
from .formats.index import read_shard_index
from .formats.readers import TensorReader, open_checkpoint_file
from .formats.remote import is_url, local_view, open_binary
from .formats.source import TORCH_SUFFIXES
from .formats.deepspeed import deepspeed_model_states, deepspeed_step, deepspeed_tags, is_deepspeed_run, latest_tag
from .formats.detect import (ACCELERATE_EXTRA_MODEL, ACCELERATE_FSDP_MODEL, DCP_OPTIMIZER_FOLDER, HF_WEIGHT_NAMES,
                             INDEX_SUFFIX, LIGHTNING_LAST, SHARD_SUFFIXES, TRAINER_STATE_FILES, describe_folder, detect,
                             is_weight_file, shard_name_pattern)

# Step-like tokens only, in two tiers: a word that starts a token (``-step=60``,
# ``/checkpoint-500``) wins over one glued to a name by ``_`` (``gpt2_step_1000``), so
# Lightning's ``epoch=2-step=60-train_loss_step=1`` is step 60; and a number followed by a
# decimal fraction (``train_loss_step=0.99``, ``val_loss=0.53``) is a metric, never a step.
_WHOLE = r"(\d+)(?![.,]\d)"
_WORDS = (r"(?:global_)?step[=_-]?", r"checkpoint[=_-]", r"ckpt[=_-]?", r"iter(?:ation)?[=_-]?")
_STEP_TIERS = tuple(
    tuple(re.compile(boundary + word + _WHOLE, re.IGNORECASE) for word in _WORDS)
    for boundary in (r"(?<![A-Za-z0-9_])", r"(?<![A-Za-z0-9])")
)

SORT_MODES = ("step", "name", "mtime")

#: The label of a Hugging Face Trainer's final ``save_model()`` output in the run root.
FINAL_LABEL = "final"
_GLOB_CHARS = re.compile(r"[*?\[]")

#: Steps are stored as 64-bit integers (pandas ``Int64``); anything outside is unknown.
STEP_MIN, STEP_MAX = -(2**63), 2**63 - 1


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint of a run.

    ``path`` is what the user sees (a file, a shard index or a folder);
    ``weights`` is the file actually opened (the folder's ``model.safetensors``...).
    ``problem`` is ``(kind, message)`` when listing the run already showed the
    checkpoint cannot be read (a broken or unsafe index...): :meth:`open` raises
    it as a :class:`CheckpointError`, so it is reported like any unreadable file.
    """

    path: Path
    weights: Path
    label: str
    step: int | None = None
    problem: tuple[str, str] | None = field(default=None, compare=False)
    duplicates: tuple[str, ...] = field(default=(), compare=False)

    def check(self) -> None:
        """Raise the :class:`CheckpointError` found while listing the run, if any."""
        if self.problem is not None:
            kind, message = self.problem
            raise CheckpointError(printable(str(self.weights)), printable(message), kind=kind)

    def open(self, key: str | None = None) -> TensorReader:
        """Open the checkpoint for lazy reading (see :func:`open_checkpoint_file`)."""
        self.check()
        try:
            return open_checkpoint_file(self.weights, key)
        except CheckpointError as exc:
            if printable(exc.message) == exc.message and printable(exc.path) == exc.path:
                raise
            # a name that is not valid UTF-8 must not make errors.csv unwritable
            raise CheckpointError(printable(exc.path), printable(exc.message), kind=exc.kind) from exc

    @property
    def format(self) -> str:
        """The format family (:func:`auditclip.formats.detect.detect`): ``dcp``, ``deepspeed``, ``peft``,
        ``safetensors``, ``pytorch``, or ``safetensors (sharded)`` / ``pytorch (sharded)`` for an index."""
        found = detect(self.weights)
        if found is not None and found.format in ("dcp", "deepspeed", "peft"):
            return found.format
        # a file named explicitly is read as a torch pickle whatever its name (.pt, .bin, .whatever)
        name = self.weights.name.lower()
        kind = "safetensors" if ".safetensors" in name else "pytorch"
        return f"{kind} (sharded)" if name.endswith(INDEX_SUFFIX) else kind


@dataclass
class Run:
    """The checkpoints of one training run, in order.

    ``ignored`` lists the trainer-state files (``optimizer.pt``...) found beside
    the weights; ``notes`` has one line per other thing that was left out, and
    why (an extra weight file in a checkpoint folder, a step out of range...),
    or that the user should know about the run (duplicates folded, stored steps
    that disagree with names, checkpoints deleted by ``save_total_limit``).
    ``duplicates`` is ``(duplicate label, label of the checkpoint kept, how)`` for
    each file folded (``("last.ckpt", "epoch=2-step=12.ckpt", "a link to")``).

    >>> run = open_run("sample_checkpoints/high_lr")  # doctest: +SKIP
    >>> [c.step for c in run][:3]  # doctest: +SKIP
    [23, 46, 69]
    """

    checkpoints: list[Checkpoint]
    root: Path
    key: str | None = None
    ignored: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    duplicates: list[tuple[str, str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.checkpoints)

    def __iter__(self) -> Iterator[Checkpoint]:
        return iter(self.checkpoints)

    def __getitem__(self, i: int) -> Checkpoint:
        return self.checkpoints[i]

    @property
    def labels(self) -> list[str]:
        return [c.label for c in self.checkpoints]


def printable(text: str) -> str:
    """``text`` with bytes that are not UTF-8 and unprintable characters as backslash escapes.

    File names that are not valid UTF-8 reach Python as lone surrogates, which
    no UTF-8 file (``errors.csv``...) can hold.

    >>> printable(os.fsdecode(b"step_1\\xff.pt")), printable("a\\nb"), printable("checkpoint-500")
    ('step_1\\\\xff.pt', 'a\\\\nb', 'checkpoint-500')
    """
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a lone surrogate that is no escaped byte (from JSON "\ud800")
        raw = text.encode("utf-8", "backslashreplace")
    text = raw.decode("utf-8", "backslashreplace")
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def natural_key(text: str) -> tuple[tuple[int, int, str], ...]:
    """Sort key putting ``step_9`` before ``step_10``.

    >>> sorted(["step_10", "step_9", "step_1"], key=natural_key)
    ['step_1', 'step_9', 'step_10']
    """
    return tuple(
        (0, int(part), "") if part.isdecimal() and len(part) < 1000 else (1, 0, part.lower())
        for part in re.split(r"(\d+)", text)
        if part
    )


def _name_step(label: str) -> tuple[int | None, str | None]:
    """The step in a name, and the digits of one found but outside the 64-bit range."""
    best: tuple[int, str] | None = None
    for tier in _STEP_TIERS:
        for pattern in tier:
            for m in pattern.finditer(label):
                if best is None or m.start() > best[0]:
                    best = (m.start(), m.group(1))
        if best is not None:
            break
    if best is None:
        return None, None
    digits = best[1]
    step = int(digits) if len(digits.lstrip("0")) <= 20 else None  # int() of huge strings is slow or refused
    if step is None or not STEP_MIN <= step <= STEP_MAX:
        return None, digits
    return step, None


def parse_step(label: str) -> int | None:
    """The training step a checkpoint's name carries, or None.

    The match nearest the end of the label wins, so ``run3/checkpoint-500`` is 500.
    A step beyond the 64-bit integer range is unknown (None).

    Only step-like tokens count: a metric in a Lightning file name is never a step.

    >>> [parse_step(n) for n in ["step_900.pt", "ckpt-0001000", "checkpoint-500/model.safetensors",
    ...                          "epoch=3-step=48.ckpt", "final.pt", "step_123456789012345678901.pt"]]
    [900, 1000, 500, 48, None, None]
    >>> [parse_step(n) for n in ["epoch=2-step=60-train_loss_step=0.99.ckpt", "val_loss=0.530-epoch=1.ckpt",
    ...                          "global_step_300.pt", "gpt2_step_1000.pt", "epoch=2-step=60-train_loss_step=1.ckpt"]]
    [60, None, 300, 1000, 60]
    """
    return _name_step(label)[0]


def _as_step(value: object) -> tuple[int | None, bool]:
    """A metadata value as a step, and whether it was an integer outside the 64-bit range."""
    number: int | None = None
    if isinstance(value, bool):
        return None, False
    if isinstance(value, int):
        number = value
    elif isinstance(value, float):
        number = int(value) if math.isfinite(value) and value.is_integer() else None
    elif isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"[+-]?[0-9]+", text):
            if len(text.lstrip("+-").lstrip("0")) > 20:
                return None, True
            number = int(text)
        elif len(text) <= 100:
            try:
                f = float(text)
            except ValueError:
                return None, False
            number = int(f) if math.isfinite(f) and f.is_integer() else None
    if number is None:
        return None, False
    if not STEP_MIN <= number <= STEP_MAX:
        return None, True
    return number, False


def _step_from(doc: dict[Any, Any], where: str, notes: list[str]) -> tuple[int | None, bool]:
    """The step in ``doc``, and whether one was there but unusable (then a note says why)."""
    for key in ("step", "global_step"):
        if key not in doc:
            continue
        step, too_big = _as_step(doc[key])
        if too_big:
            shown = str(doc[key]) if isinstance(doc[key], (str, int)) and len(str(doc[key])) <= 40 else "a huge number"
            notes.append(f"ignored {key} = {shown} in {where}: beyond the 64-bit integer range")
            return None, True
        if step is not None:
            return step, False
    return None, False


def _metadata_step(weights: Path, notes: list[str] | None = None) -> int | None:
    """The step in ``trainer_state.json`` beside HF weights, else in the safetensors metadata.

    Why a step that was there could not be used is appended to ``notes``.
    """
    notes = [] if notes is None else notes
    state = weights.parent / "trainer_state.json"
    if weights.name in HF_WEIGHT_NAMES and state.is_file():
        doc: object = None
        try:
            doc = json.loads(state.read_text(encoding="utf-8"))
        except Exception as exc:  # OSError, bad JSON, nesting too deep (RecursionError), huge integers
            notes.append(f"trainer_state.json not read for the step: {_json_problem(exc)}")
        if isinstance(doc, dict):
            step, unusable = _step_from(doc, "trainer_state.json", notes)
            if step is not None or unusable:
                return step
        elif doc is not None:
            notes.append(f"trainer_state.json not read for the step: it holds a JSON {type(doc).__name__}, "
                         "not an object")
    try:
        meta = dict(read_safetensors_metadata(weights))
    except Exception:  # a broken file is reported when it is read, not while listing the run
        meta = {}
    return _step_from(meta, f"the metadata of {weights.name}", notes)[0]


# --- the step a pickled checkpoint stores, read without unpickling --------------------------

_MARK = object()  # a MARK on the simulated pickle stack
_INT_OPS = frozenset({"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4"})
_STR_OPS = frozenset({"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "SHORT_BINUNICODE", "BINUNICODE",
                      "BINUNICODE8"})
_PUT_OPS = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_GET_OPS = frozenset({"GET", "BINGET", "LONG_BINGET"})
_STEP_KEYS = ("global_step", "step")
#: Opcodes read at most while looking for the step: Lightning writes ``global_step`` second,
#: so it is found within a few opcodes; a pickle that hides it deeper is not worth reading whole.
_MAX_OPCODES = 200_000


class _Value(NamedTuple):
    """An object on the simulated stack: a str or int value when known, and whether it is the top-level one."""

    value: object
    top: bool


def _pickle_top_level_step(stream: Any) -> tuple[int | None, str | None]:
    """The int stored under ``global_step`` (else ``step``) in the top-level dict of a pickle, and its key.

    The pickle is never executed: its opcodes are walked with :func:`pickletools.genops`
    on a simulated stack that only remembers strings, ints and which object is the
    top-level one (the first object pushed onto the empty stack). A foreign class
    (``__main__.Config``) is just a ``GLOBAL`` opcode here, so it is never imported.
    An item is top-level when the stack holds the top-level dict, a MARK, then
    key/value pairs (``SETITEMS``) or just the key (``SETITEM``).

    >>> import io, pickle
    >>> _pickle_top_level_step(io.BytesIO(pickle.dumps({"epoch": 2, "global_step": 60, "hp": {"step": 1}}, 2)))
    (60, 'global_step')
    >>> _pickle_top_level_step(io.BytesIO(pickle.dumps({"hp": {"global_step": 5}}, 2)))
    (None, None)
    """
    stack: list[Any] = []
    memo: dict[int, Any] = {}
    found: dict[str, int] = {}
    marks = 0  # MARKs on the stack, so that "only the top-level dict's MARK" is checked in O(1)

    def push(value: object = None) -> None:
        stack.append(_Value(value, not stack))

    def pop_to_mark() -> None:
        nonlocal marks
        i = len(stack) - 1
        while i >= 0 and stack[i] is not _MARK:
            i -= 1
        if i < 0:
            raise ValueError("no MARK on the stack")
        del stack[i:]
        marks -= 1

    def top_level_key() -> str | None:
        """The key just pushed, when it is a key of the top-level dict."""
        if not stack or not isinstance(stack[0], _Value) or not stack[0].top:
            return None
        key = stack[-1].value if isinstance(stack[-1], _Value) else None
        if not isinstance(key, str):
            return None
        if len(stack) == 2:  # SETITEM: [dict, key]
            return key
        if len(stack) >= 3 and marks == 1 and stack[1] is _MARK and (len(stack) - 3) % 2 == 0:
            return key  # SETITEMS: [dict, MARK, k, v, ..., key]
        return None

    for n_ops, (op, arg, _) in enumerate(pickletools.genops(stream)):
        if n_ops >= _MAX_OPCODES or "global_step" in found:
            break
        name = op.name
        if name in _INT_OPS and not isinstance(arg, bool):
            key = top_level_key()
            if key in _STEP_KEYS and isinstance(arg, int):
                found.setdefault(key, arg)
            push(arg)
        elif name in _STR_OPS:
            push(arg.decode("utf-8", "replace") if isinstance(arg, bytes) else arg)
        elif name == "MARK":
            stack.append(_MARK)
            marks += 1
        elif name in _PUT_OPS or name == "MEMOIZE":
            if stack:
                memo[len(memo) if name == "MEMOIZE" else arg] = stack[-1]
        elif name in _GET_OPS:
            got = memo.get(arg)
            push(got.value if isinstance(got, _Value) else None)
        elif name == "STOP":
            break
        else:
            before = op.stack_before
            if pickletools.markobject in before:
                pop_to_mark()
                count = before.index(pickletools.markobject)
            else:
                count = len(before)
            if count > len(stack) or any(x is _MARK for x in stack[len(stack) - count:]):
                raise ValueError("stack underflow")  # pickle itself refuses to pop a MARK as an object
            del stack[len(stack) - count:]
            for _ in op.stack_after:
                push()
    for key in _STEP_KEYS:
        if key in found:
            return found[key], key
    return None, None


def _torch_stored_step(path: Path) -> tuple[int | None, str | None]:
    """``global_step`` (else ``step``) stored at the top level of a ``torch.save`` zip file (a Lightning ``.ckpt``...).

    Anything unreadable is (None, None): a broken file is reported when it is opened.
    """
    try:
        with open_binary(path) as fh:
            if not zipfile.is_zipfile(fh):
                return None, None  # the legacy (non-zip) format: no cheap way to its step
        with open_binary(path) as fh, zipfile.ZipFile(fh) as archive:
            names = [i for i in archive.infolist() if i.filename.endswith("data.pkl") and i.filename.count("/") <= 1]
            if len(names) != 1:
                return None, None
            with archive.open(names[0]) as stream:
                return _pickle_top_level_step(stream)
    except Exception:  # a broken zip, a malformed pickle: the step is unknown, the read reports the file
        return None, None


def _stored_step(weights: Path, notes: list[str]) -> tuple[int | None, str]:
    """The step the checkpoint itself stores, and where it was found (for notes).

    ``trainer_state.json`` beside Hugging Face weights, the ``step``/``global_step``
    safetensors metadata, or the top-level ``global_step`` of a pickled checkpoint.
    """
    kind = detect(weights)  # the format layer says which family stores the step where
    if kind is not None and kind.format == "dcp":
        return _dcp_stored_step(weights)
    if kind is not None and kind.format == "deepspeed":
        # global_step<N> is DeepSpeed's own tag; another tag: the global_steps its model states store
        return deepspeed_step(weights if weights.is_dir() else weights.parent), "global_steps in its model states"
    name = weights.name.lower()
    if name.endswith(TORCH_SUFFIXES):
        state = weights.parent / "trainer_state.json"
        if not (weights.name in HF_WEIGHT_NAMES and state.is_file()):
            step, key = _torch_stored_step(weights)
            return step, f"{key} in the file"
    beside = weights.name in HF_WEIGHT_NAMES and (weights.parent / "trainer_state.json").is_file()
    where = "trainer_state.json" if beside else "its metadata"
    return _metadata_step(weights, notes), where


#: Where a DCP checkpoint may store its step: top-level entries, and torchtitan's ``train_state``.
_DCP_STEP_KEYS = ("global_step", "step", "train_state.step", "train_state.global_step")


def _dcp_stored_step(folder: Path) -> tuple[int | None, str]:
    """The step a DCP checkpoint stores: ``global_step`` in Lightning's ``meta.pt`` beside it
    (read without unpickling), else a small ``step`` entry of the checkpoint itself.

    Anything unreadable is None: a broken checkpoint is reported when it is opened.
    """
    meta = folder / "meta.pt"
    if meta.is_file():
        step, key = _torch_stored_step(meta)
        if step is not None:
            return step, f"{key} in meta.pt"
    try:
        index = read_dcp_index(folder)
        for key in _DCP_STEP_KEYS:
            value: object = None
            if key in index.objects:
                value = read_dcp_object(index, key)
            elif key in index.tensors and index.tensors[key].numel == 1 and "int" in index.tensors[key].dtype:
                value = read_dcp_tensor(index, key).item()
            step = _as_step(value)[0] if isinstance(value, int) else None
            if step is not None:
                return step, f"{key} in the checkpoint"
    except Exception:  # reported when the checkpoint is opened
        pass
    return None, ""


def _json_problem(exc: Exception) -> str:
    if isinstance(exc, RecursionError):
        return "not valid JSON: nested too deeply"
    if isinstance(exc, OSError):
        return f"cannot be read: {exc.strerror or exc}"
    return f"not valid JSON: {' '.join(str(exc).split())[:200] or type(exc).__name__}"


# --- listing one directory -------------------------------------------------------------------


class _Found(NamedTuple):
    """A checkpoint found: what the user sees, the file opened, a problem already known."""

    path: Path
    weights: Path
    problem: tuple[str, str] | None = None
    label: str | None = None  # a label that is not the path: ``final`` for a Trainer's save_model()


@dataclass
class _Listing:
    """The weight-like entries directly in one directory."""

    weights: list[Path] = field(default_factory=list)  # files (and broken links...) not claimed by an index
    weight_dirs: list[Path] = field(default_factory=list)  # directories named like weight files
    dcp_dirs: list[Path] = field(default_factory=list)  # torch.distributed.checkpoint folders (any name)
    ds_dirs: list[Path] = field(default_factory=list)  # DeepSpeed tag folders (global_step<N>/, or any tag)
    dirs: list[Path] = field(default_factory=list)  # every subdirectory
    problems: dict[Path, tuple[str, str]] = field(default_factory=dict)
    ignored: list[Path] = field(default_factory=list)  # trainer state
    notes: list[tuple[Path, str]] = field(default_factory=list)


def _entry_problem(path: Path) -> tuple[str, str] | None:
    """Why a weight-like entry that is not a regular file cannot be read, or None."""
    if path.is_file():
        return None
    if path.is_dir():
        return "unreadable", ("a directory named like a weight file, not a checkpoint file; "
                              "if it holds a checkpoint, pass the folder that holds its weights")
    if path.is_symlink() and not path.exists():
        return "unreadable", "a broken symlink: the file it points to does not exist"
    return "unreadable", "not a regular file"


def _read_index(index: Path) -> tuple[set[Path], tuple[str, str] | None]:
    """The shard files an index names inside its folder, and what is wrong with it, if anything."""
    read = read_shard_index(index, lenient=True)
    return set(read.shards.values()), read.problem


def _list(directory: Path) -> _Listing:
    """Weight-like entries of ``directory``; shards are folded into the index that names them.

    Raises OSError when the directory cannot be listed.
    """
    out = _Listing()
    entries = sorted(directory.iterdir(), key=lambda p: natural_key(p.name))
    out.dirs = [p for p in entries if p.is_dir()]
    # a DCP folder is a checkpoint whatever its name (Lightning's epoch=0-step=23.ckpt/ is one)
    kinds = {p: detect(p) for p in out.dirs}
    out.dcp_dirs = [p for p, d in kinds.items() if d is not None and d.format == "dcp"]
    out.ds_dirs = [p for p, d in kinds.items() if d is not None and d.format == "deepspeed"]
    dirs = set(out.dirs)
    candidates = []
    for p in entries:
        if p in out.dcp_dirs:
            continue
        if TRAINER_STATE_FILES.match(p.name):
            out.ignored.append(p)
        elif is_weight_file(p):
            if p in dirs and is_deepspeed_run(p):
                continue  # Lightning's DeepSpeed strategy: epoch=0-step=10.ckpt/ is a DeepSpeed run (tag checkpoint/)
            (out.weight_dirs if p in dirs else candidates).append(p)
    claimed: set[Path] = set()
    for index in (p for p in candidates if p.name.lower().endswith(INDEX_SUFFIX) and p.is_file()):
        shards, problem = _read_index(index)
        claimed |= shards
        if problem is not None:
            out.problems[index] = problem
        # shards named like this index's (model-00001-of-00002.safetensors) belong to it even when
        # its weight_map cannot be read or forgets one: they are never models of their own
        pattern = shard_name_pattern(index.name)
        for shard in sorted(shards & set(candidates), key=lambda p: natural_key(p.name)):
            if not pattern.match(shard.name):  # step_10.safetensors read as a shard of step_5's index
                out.notes.append((shard, f"not audited on its own: {index.name} names it as one of its shards"))
        for p in candidates:
            if p not in claimed and p != index and pattern.match(p.name) and p.name.lower().endswith(SHARD_SUFFIXES):
                claimed.add(p)
                if problem is None:
                    out.notes.append((p, f"ignored: named like a shard of {index.name}, whose weight_map does not "
                                         "list it; audit it on its own by passing the file"))
    for p in candidates:
        if p in claimed:
            continue
        out.weights.append(p)
        problem = _entry_problem(p)
        if problem is not None:
            out.problems[p] = problem
    for p in out.weight_dirs:
        out.problems[p] = _entry_problem(p)  # type: ignore[assignment]
    return out


def _model_weights(listing: _Listing) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The model weights of a Hugging Face style folder (None if it has none), and notes on the rest."""
    entries = listing.weights + listing.weight_dirs
    named = [p for p in entries if p.name in HF_WEIGHT_NAMES]
    if not named:
        return None, []
    # a regular file first (a directory called model.safetensors is no weights), then by preference
    primary = min(named, key=lambda p: (p in listing.weight_dirs or not p.is_file(), HF_WEIGHT_NAMES.index(p.name)))
    notes = []
    for p in entries:
        if p != primary:
            what = "a directory named like a weight file" if p in listing.weight_dirs else "an extra weight file"
            notes.append((p, f"ignored: {what} beside the model weights {primary.name}; "
                             "audit it on its own by passing the file"))
    return primary, notes


def _expand_directory(
    directory: Path, descend: bool = True,
) -> tuple[list[_Found], list[Path], list[tuple[Path, str]]]:
    """The checkpoints in a directory the user named, the trainer state beside them, and notes.

    The directory is one checkpoint folder when it is a DCP folder (``.metadata``),
    or when all its weight files are model weights (``model.safetensors``...) and no
    subfolder is a checkpoint folder; otherwise each ``checkpoint-*/``-like subfolder,
    each DCP subfolder (``step-100/``, ``epoch=0-step=23.ckpt/``) and each weight file is one.
    """
    kind = detect(directory)
    if kind is not None and kind.format == "dcp":  # its other files (Lightning's meta.pt) are not weights
        return [_Found(directory, directory)], [], []
    if kind is not None and kind.format == "deepspeed":  # its model and optimizer states are one checkpoint
        return [_deepspeed_found(directory)], [], []
    try:
        own = _list(directory)
    except OSError as exc:
        raise InputError(f"cannot list {directory}: {exc.strerror or exc}") from exc
    found: list[_Found] = []
    ignored: list[Path] = []
    notes: list[tuple[Path, str]] = []
    here = _resolve(directory)
    for sub in own.dirs:
        if sub in own.weight_dirs:
            continue  # a directory named model.safetensors: decided below, with the files beside it
        if sub in own.dcp_dirs:
            if DCP_OPTIMIZER_FOLDER.match(sub.name):
                ignored.append(sub)  # accelerate's optimizer_0/: optimizer state only
            else:
                found.append(_Found(sub, sub))
            continue
        if sub in own.ds_dirs:  # a DeepSpeed tag folder: one checkpoint, read by formats.deepspeed
            found.append(_deepspeed_found(sub))
            continue
        there = _resolve(sub)
        if there is not None and here is not None and (there == here or there in here.parents):
            notes.append((sub, f"ignored: a link back to {'this folder' if there == here else 'a folder above it'}"))
            continue
        try:
            listing = _list(sub)
        except OSError as exc:
            notes.append((sub, f"ignored: cannot be listed: {exc.strerror or exc}"))
            continue
        weights, extra = _model_weights(listing)
        fsdp = [d for d in listing.dcp_dirs if ACCELERATE_FSDP_MODEL.match(d.name)]
        if weights is None and fsdp:  # accelerate FSDP: checkpoint_<i>/pytorch_model_fsdp_0/ holds the model
            found.append(_Found(sub, fsdp[0]))
            ignored += listing.ignored + [d for d in listing.dcp_dirs if DCP_OPTIMIZER_FOLDER.match(d.name)]
            notes += listing.notes + [(d, f"ignored: another model's DCP folder beside {fsdp[0].name}; audit it "
                                          "on its own by passing the folder") for d in fsdp[1:]]
        elif weights is not None:
            found.append(_Found(sub, weights, listing.problems.get(weights)))
            ignored += listing.ignored
            notes += listing.notes
            for p, message in extra:
                if ACCELERATE_EXTRA_MODEL.match(p.name) and p.is_file():  # accelerate's second model: its own series
                    found.append(_Found(p, p))
                else:
                    notes.append((p, message))
        elif listing.weights or listing.weight_dirs:
            names = ", ".join(p.name for p in (listing.weights + listing.weight_dirs)[:3])
            more = ", ..." if len(listing.weights) + len(listing.weight_dirs) > 3 else ""
            notes.append((sub, f"ignored: not a checkpoint folder: its weight files ({names}{more}) have none of "
                               "the model weight names (model.safetensors, pytorch_model.bin, ...); "
                               "pass the files or a glob to audit them"))
        elif listing.dcp_dirs:
            names = ", ".join(d.name for d in listing.dcp_dirs[:3]) + (", ..." if len(listing.dcp_dirs) > 3 else "")
            notes.append((sub, f"ignored: holds DCP checkpoint folders ({names}); pass {sub.name}/ to audit them"))
        elif len(listing.ds_dirs) == 1 and not (listing.weights or listing.weight_dirs):
            # a Hugging Face Trainer's checkpoint-<N>/ under DeepSpeed ZeRO-3 without gathered 16-bit weights
            # (no model.safetensors: the weights are its one tag folder, global_step<N>/), or a Lightning
            # DeepSpeed save, epoch=0-step=10.ckpt/ holding latest and the tag folder checkpoint/
            found.append(_deepspeed_found(listing.ds_dirs[0], sub))
            ignored += listing.ignored
            notes += listing.notes
        elif listing.ds_dirs and not (listing.weights or listing.weight_dirs):
            names = ", ".join(d.name for d in listing.ds_dirs[:3]) + (", ..." if len(listing.ds_dirs) > 3 else "")
            notes.append((sub, f"ignored: holds DeepSpeed checkpoint folders ({names}); pass {sub.name}/ to audit "
                               "them"))
        elif parse_step(sub.name) is not None or (sub / "trainer_state.json").exists():
            notes.append((sub, "ignored: looks like a checkpoint folder but holds no model weights "
                               "(model.safetensors, pytorch_model.bin, ...)"))
    if own.ds_dirs:
        notes += _latest_notes(directory, own.ds_dirs)
    own_weights, own_extra = _model_weights(own)
    all_model = all(p.name in HF_WEIGHT_NAMES for p in own.weights + own.weight_dirs)
    if not found and own_weights is not None and all_model:  # the directory is itself one checkpoint folder
        return [_Found(directory, own_weights, own.problems.get(own_weights))], own.ignored, \
            notes + own.notes + own_extra
    own_entries = own.weights + own.weight_dirs
    if found and own_weights is not None:
        # a Trainer's save_model() beside its checkpoint-*/ folders: the final weights, one entry labelled
        # "final", not an unnumbered step; other model-named files beside them are noted as in any folder
        found.append(_Found(directory, own_weights, own.problems.get(own_weights), label=FINAL_LABEL))
        notes += [(p, m) for p, m in own_extra if p.name in HF_WEIGHT_NAMES]
        own_entries = [p for p in own_entries if p.name not in HF_WEIGHT_NAMES]
    found += [_Found(p, p, own.problems.get(p)) for p in own_entries]
    for inner_name in ("checkpoints", "checkpoint"):
        inner_dir = directory / inner_name
        if not found and descend and inner_dir.is_dir() and not inner_dir.is_symlink():
            # an accelerate project_dir writes checkpoints/checkpoint_<i>/, torchtitan checkpoint/step-<n>/
            inner, inner_ignored, inner_notes = _expand_directory(inner_dir, descend=False)
            if inner or inner_name == "checkpoints":
                notes = [(p, m) for p, m in notes if p != inner_dir]
                return inner, ignored + own.ignored + inner_ignored, notes + own.notes + inner_notes
    return found, ignored + own.ignored, notes + own.notes


def _deepspeed_found(tag: Path, shown: Path | None = None) -> _Found:
    """A DeepSpeed tag folder as a checkpoint (shown as ``shown``, default the tag), known by its rank 0 model states.

    The file is what clip edits at ZeRO 0-2 (its ``module`` entry); opening it reads the
    whole tag folder (:class:`auditclip.formats.deepspeed.DeepSpeedSource`), never the file alone.
    A folder without rank 0's model states is opened as is: the reader says what is missing.
    """
    return _Found(shown or tag, deepspeed_model_states(tag) or tag)


def _latest_notes(run: Path, tag_dirs: list[Path]) -> list[tuple[Path, str]]:
    """A note when a DeepSpeed run's ``latest`` names another tag than the one with the highest step.

    ``engine.load_checkpoint(run)`` resumes from the tag ``latest`` names; every tag is
    audited in step order all the same, so a ``latest`` that points back (a resumed run
    that saved under an older tag, a hand edit) or at nothing is said, not followed.
    """
    latest = latest_tag(run)
    tags = [t for t in deepspeed_tags(run) if t.folder in tag_dirs]
    if latest is None or not tags or latest == tags[-1].name:
        return []
    if not any(t.name == latest for t in tags):
        return [(run / "latest", f"names the tag {latest!r}, which is no DeepSpeed checkpoint folder here; "
                                 f"the tags found ({', '.join(t.name for t in tags[:3])}"
                                 f"{', ...' if len(tags) > 3 else ''}) are audited in step order")]
    return [(run / "latest", f"names {latest}, not {tags[-1].name} (the tag with the highest step): DeepSpeed "
                             f"resumes from {latest}; every tag is audited in step order")]


def _resolve(path: Path) -> Path | None:
    try:
        return path.resolve()
    except (OSError, RuntimeError):  # a symlink loop
        return None


def _glob(pattern: str) -> list[str]:
    """``glob.glob(pattern, recursive=True)``, ending on directory symlink loops.

    ``**`` still follows symlinks (a run may link its checkpoints from elsewhere),
    but expands each real directory once, so ``loop -> .`` is walked once.
    """
    parts = pattern.split("/")
    if "**" not in parts:
        return glob.glob(pattern)  # no recursion: as deep as the pattern, loops or not
    first = 0
    while first < len(parts) and not _GLOB_CHARS.search(parts[first]):
        first += 1
    base = "/".join(parts[:first]) or ("/" if pattern.startswith("/") else "")
    comps: list[str] = []
    for part in parts[first:]:
        if not (part == "**" and comps and comps[-1] == "**"):
            comps.append(part)

    def join(path: str, name: str) -> str:
        return name if not path else os.path.join(path, name)

    def listdir(path: str) -> list[os.DirEntry[str]]:
        try:
            with os.scandir(path or ".") as it:
                return sorted(it, key=lambda e: e.name)
        except OSError:
            return []

    def visible(name: str, comp: str) -> bool:
        return not name.startswith(".") or comp.startswith(".")

    results: dict[str, None] = {}
    seen: set[tuple[int, int, int]] = set()
    stack: list[tuple[str, int]] = [(base, 0)]
    while stack:
        path, i = stack.pop()
        if i == len(comps):
            if path and os.path.lexists(path):
                results[path] = None
            continue
        comp, last = comps[i], i == len(comps) - 1
        if comp == "**":
            try:
                st = os.stat(path or ".")
            except OSError:
                continue
            if (st.st_dev, st.st_ino, i) in seen:
                continue  # this real directory was searched already: a symlink loop or a second link
            seen.add((st.st_dev, st.st_ino, i))
            stack.append((path, i + 1))  # ** matching no directory
            for entry in reversed(listdir(path)):
                if not visible(entry.name, comp):
                    continue
                if last:
                    results[join(path, entry.name)] = None
                if _is_dir(entry):
                    stack.append((join(path, entry.name), i))
        elif _GLOB_CHARS.search(comp):
            for entry in reversed(listdir(path)):
                if visible(entry.name, comp) and fnmatch.fnmatchcase(entry.name, comp):
                    if last:
                        results[join(path, entry.name)] = None
                    elif _is_dir(entry):
                        stack.append((join(path, entry.name), i + 1))
        else:
            child = join(path, comp)
            if last:
                if os.path.lexists(child):
                    results[child] = None
            elif os.path.isdir(child):
                stack.append((child, i + 1))
    return list(results)


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _expand(
    inputs: Sequence[str | os.PathLike[str]],
) -> tuple[list[_Found], list[Path], Path | None, list[tuple[Path, str]]]:
    found: list[_Found] = []
    ignored: list[Path] = []
    notes: list[tuple[Path, str]] = []
    root: Path | None = None
    for raw in inputs:
        text = os.fspath(raw)
        if is_url(text):  # a remote run: listed once into a local view whose weight files read the objects
            text = os.fspath(local_view(text))
        path = Path(text)
        if path.exists():
            matches = [path]
        elif _GLOB_CHARS.search(text):
            matches = [Path(m) for m in sorted(_glob(text), key=natural_key)]
            if not matches:
                raise NoCheckpointsError(f"no file matches {text!r}; check the pattern (quote it so the shell leaves it alone)")
        else:
            raise InputError(f"no such file or directory: {text}")
        for match in matches:
            if match.is_dir():
                entries, skipped, why = _expand_directory(match)
                notes += why
                if not entries and is_weight_file(match):
                    entries = [_Found(match, match, _entry_problem(match))]  # a directory named step_5.safetensors
                if not entries:
                    detail = "".join(f"; {_render(p, m, None)}" for p, m in why[:3])
                    raise NoCheckpointsError(printable(
                        f"no checkpoints in {match} (looked for .safetensors, .pt, .pth, .bin, .ckpt, "
                        f"*.index.json, checkpoint-*/ folders, DCP folders with a .metadata and DeepSpeed "
                        f"global_step*/ folders); it holds {describe_folder(match)}; pass the folder "
                        f"that holds them or a glob{detail}"
                    ))
                if len(inputs) == 1 and len(matches) == 1 and entries[0].path != match:
                    root = match  # labels are relative to the run directory the user named
                found += entries
                ignored += skipped
            elif (kind := detect(match)) is not None and kind.format == "deepspeed":
                # a model- or optimizer-states file is one part of its tag folder (ZeRO-3's model states hold
                # only placeholders): the folder is the checkpoint, found once however many files matched
                found.append(_deepspeed_found(match.parent))
            elif TRAINER_STATE_FILES.match(match.name):
                ignored.append(match)  # optimizer.pt & co. from a glob such as checkpoint-*/*.pt
            elif kind is not None and kind.format == "dcp":  # a DCP folder's .metadata named: the folder is it
                found.append(_Found(kind.weights, kind.weights))
            else:
                problem = _entry_problem(match)
                if problem is None and match.name.lower().endswith(".index.json"):
                    problem = _read_index(match)[1]  # an index named directly is checked like one found
                found.append(_Found(match, match, problem))
    return found, ignored, root, notes


def _render(path: Path, message: str, root: Path | None) -> str:
    """One note: the path (relative to the run when inside it), then why."""
    shown = str(path)
    if root is not None:
        try:
            rel = os.path.relpath(path.absolute(), root.absolute())
            shown = shown if rel.startswith("..") else Path(rel).as_posix()
        except ValueError:
            pass
    if path.is_dir() and not shown.endswith("/"):
        shown += "/"
    return printable(f"{shown}: {message}")


def open_run(
    paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]] | Run,
    *,
    sort: str = "step",
    key: str | None = None,
) -> Run:
    """Find the checkpoints of a run and order them.

    ``paths``: a directory, a glob, a checkpoint, or a list of those.
    ``sort``: ``step`` (the step stored in the file, else the one in its name;
    checkpoints without a step come last, by name), ``name`` (natural order) or ``mtime``.
    ``key``: the container entry holding the state dict (``ema``...).

    What was left out, and why, is in :attr:`Run.notes`; duplicates folded in
    :attr:`Run.duplicates`. Raises :class:`InputError` when the files hold more
    than one model series (the message lists them, with a glob for each).

    >>> run = open_run("sample_checkpoints/high_lr")  # doctest: +SKIP
    >>> run.labels[:2]  # doctest: +SKIP
    ['epoch_01.safetensors', 'epoch_02.safetensors']
    """
    if isinstance(paths, Run):
        return paths
    if sort not in SORT_MODES:
        raise InputError(f"unknown sort {sort!r}; use one of {', '.join(SORT_MODES)}")
    inputs = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not inputs:
        raise NoCheckpointsError("no checkpoint given; pass a directory, a glob or checkpoint files")
    found, ignored, root, found_notes = _expand(inputs)
    if not found:
        raise NoCheckpointsError(f"no checkpoints among {', '.join(printable(os.fspath(p)) for p in inputs)}")
    first: dict[tuple[Path, Path], _Found] = {}
    for f in found:
        first.setdefault((f.path, f.weights), f)
    unique = list(first.values())
    if root is None:
        root = Path(os.path.commonpath([str(f.path.absolute().parent) for f in unique]))
    notes = [_render(p, m, root) for p, m in found_notes]
    checkpoints = []
    disagree: list[tuple[str, int, int, str]] = []
    taken = {Path(os.path.relpath(f.path.absolute(), root.absolute())).as_posix() for f in unique}
    for f in unique:
        raw_label = Path(os.path.relpath(f.path.absolute(), root.absolute())).as_posix()
        if f.label is not None:  # the Trainer's final save_model() in the run root
            raw_label = f.label if f.label not in taken else f"{f.label} (run root)"
        label = printable(raw_label)
        named, too_big = _name_step(raw_label) if f.label is None else (None, None)
        why: list[str] = []
        if too_big is not None:
            shown = too_big if len(too_big) <= 40 else too_big[:40] + "..."
            why.append(f"ignored the step {shown} in its name: beyond the 64-bit integer range")
        stored, where = _stored_step(f.weights, why) if f.problem is None else (None, "")
        step = stored if stored is not None else named
        if stored is not None and named is not None and stored != named:
            disagree.append((label, stored, named, where))
        if why:
            notes.append(printable(f"{label}: {'; '.join(why)}" + ("; step unknown" if step is None else "")))
        checkpoints.append(Checkpoint(path=f.path, weights=f.weights, label=label, step=step, problem=f.problem))
    if disagree:
        shown = "; ".join(f"{label}: {stored} ({where}), not {named}" for label, stored, named, where in disagree[:3])
        more = f"; and {len(disagree) - 3} more" if len(disagree) > 3 else ""
        notes.append(printable(f"{len(disagree)} checkpoint(s) store a step other than the one in their name; "
                               f"the stored step is used ({shown}{more})"))
    checkpoints, duplicates = _fold_duplicates(checkpoints)
    if duplicates:
        shown = "; ".join(f"{dup} ({why} {kept})" for dup, kept, why in duplicates[:5])
        more = f"; and {len(duplicates) - 5} more" if len(duplicates) > 5 else ""
        notes.append(printable(f"folded {len(duplicates)} duplicate(s) into the checkpoint they copy, "
                               f"audited once: {shown}{more}"))
    notes += _refuse_several_series(checkpoints, inputs, root, key)
    _several_at_one_step(checkpoints)
    checkpoints.sort(key=_sort_key(sort))
    unknown = [c.label for c in checkpoints if c.step is None and c.label != FINAL_LABEL]
    if sort == "step" and len(checkpoints) > 1 and unknown:
        shown = ", ".join(unknown[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
        notes.append(printable(f"no step stored in or named by {shown}: ordered by name after the checkpoints with "
                               "steps; check the order (or pass --sort mtime)"))
    notes += _deleted_checkpoints_note(checkpoints)
    return Run(checkpoints=checkpoints, root=root, key=key, ignored=ignored, notes=list(dict.fromkeys(notes)),
               duplicates=duplicates)


# --- duplicates: links, last.ckpt, byte-identical copies --------------------------------------

_SAMPLE_BLOCK = 4096
_SAMPLES = 9


def _sample_digest(path: Path, size: int) -> bytes:
    """A digest of a few blocks spread over the file: two different checkpoints differ in one of them at once."""
    h = hashlib.blake2b(digest_size=16)
    with open_binary(path) as f:
        for i in range(_SAMPLES):
            f.seek(max(0, (size - _SAMPLE_BLOCK) * i // (_SAMPLES - 1)))
            h.update(f.read(_SAMPLE_BLOCK))
    return h.digest()


def _full_digest(path: Path) -> bytes:
    h = hashlib.sha256()
    with open_binary(path) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.digest()


def _tensor_records(path: Path) -> list[tuple[str, int, int]] | None:
    """The (name, CRC-32, size) of the tensor records of a ``torch.save`` zip, None if it is not one."""
    try:
        with open_binary(path) as fh:
            if not zipfile.is_zipfile(fh):
                return None
        with open_binary(path) as fh, zipfile.ZipFile(fh) as archive:
            return sorted((i.filename.split("/", 1)[-1], i.CRC, i.file_size) for i in archive.infolist()
                          if "/data/" in "/" + i.filename.split("/", 1)[-1])
    except Exception:  # a broken zip: not a duplicate of anything
        return None


def _same_tensor_data(a: Path, b: Path) -> bool:
    """Whether two ``torch.save`` zips hold byte-identical tensor records (their pickles may differ)."""
    records = _tensor_records(a)
    if not records or records != _tensor_records(b):
        return False
    try:  # the CRCs agree: compare the bytes, so a CRC collision never folds two checkpoints
        with open_binary(a) as fa_, open_binary(b) as fb_, zipfile.ZipFile(fa_) as za, zipfile.ZipFile(fb_) as zb:
            pa = {i.filename.split("/", 1)[-1]: i for i in za.infolist()}
            pb = {i.filename.split("/", 1)[-1]: i for i in zb.infolist()}
            for name, _, _ in records:
                with za.open(pa[name]) as fa, zb.open(pb[name]) as fb:
                    while True:
                        x, y = fa.read(1 << 20), fb.read(1 << 20)
                        if x != y:
                            return False
                        if not x:
                            break
        return True
    except Exception:
        return False


def _keep_rank(c: Checkpoint) -> tuple[bool, bool, bool, float, tuple[tuple[int, int, str], ...]]:
    """Which of identical checkpoints is kept: a real file with a step in its name, not last.ckpt or "final",
    then the oldest (a copy is written after its original), then by name."""
    linked = c.path.is_symlink() or c.weights.is_symlink()
    unnamed = bool(LIGHTNING_LAST.match(c.path.name)) or c.label == FINAL_LABEL
    return linked, unnamed, parse_step(c.label) is None, _mtime(c.weights), natural_key(c.label)


#: Formats whose weights file is one of many: never folded as a duplicate by its bytes. A shard
#: index names other files; DCP folders' .metadata match whenever two steps have one layout;
#: DeepSpeed's model states are one file of many (ZeRO-3's weights are all in the optimizer files).
MANY_FILES = frozenset({"sharded", "dcp", "deepspeed"})


def _fold_duplicates(checkpoints: list[Checkpoint]) -> tuple[list[Checkpoint], list[tuple[str, str, str]]]:
    """Checkpoints with each duplicate folded into the one it copies, and ``(duplicate, kept, how)`` for each.

    A duplicate is a symlink or hard link to another checkpoint's file, a byte-identical
    copy (sizes compared first, then a digest of a few blocks, then a hash of all the
    bytes, only among files of the same size), or a pickled checkpoint (``last.ckpt``, one
    saved by a second Lightning callback) that stores the same step and the same tensor
    bytes as another (only its pickled trainer state differs).
    Sharded checkpoints and files that cannot be read are never folded.
    """
    by_size: dict[int, list[tuple[Checkpoint, os.stat_result]]] = {}
    for c in checkpoints:
        kind = detect(c.weights)
        if c.problem is not None or c.weights.is_dir() or (kind is not None and kind.format in MANY_FILES):
            continue
        try:
            st = c.weights.stat()
        except OSError:
            continue
        by_size.setdefault(st.st_size, []).append((c, st))
    folded: dict[str, tuple[Checkpoint, str]] = {}  # duplicate label -> (kept, how)
    for size, group in by_size.items():
        if len(group) < 2:
            continue
        samples: dict[tuple[int, int], bytes | None] = {}  # by inode: a file linked twice is read once
        fulls: dict[tuple[int, int], bytes | None] = {}
        by_sample: dict[object, list[tuple[Checkpoint, os.stat_result]]] = {}
        for c, st in group:
            inode = (st.st_dev, st.st_ino)
            if inode not in samples:
                samples[inode] = _safe(_sample_digest, c.weights, size)
            by_sample.setdefault(samples[inode] or ("unread", c.label), []).append((c, st))
        classes: dict[object, list[tuple[Checkpoint, os.stat_result]]] = {}
        for key, members in by_sample.items():
            if len(members) < 2 or len({(st.st_dev, st.st_ino) for _, st in members}) == 1:
                classes[key] = members  # alone, or links to one file: nothing more to read
                continue
            for c, st in members:  # the samples agree: only now read every byte
                inode = (st.st_dev, st.st_ino)
                if inode not in fulls:
                    fulls[inode] = _safe(_full_digest, c.weights)
                classes.setdefault(("full", fulls[inode]) if fulls[inode] else ("unread", c.label), []).append((c, st))
        for members in classes.values():
            if len(members) < 2:
                continue
            kept, kept_st = min(members, key=lambda m: _keep_rank(m[0]))
            for c, st in members:
                if c is kept:
                    continue
                if (st.st_dev, st.st_ino) != (kept_st.st_dev, kept_st.st_ino):
                    how = "byte-identical to"
                elif c.path.is_symlink() or c.weights.is_symlink():
                    how = "a link to"
                else:
                    how = "the same file as"  # a hard link
                folded[c.label] = (kept, how)
    # a pickle saved twice at one step (last.ckpt, a second ModelCheckpoint callback): the same tensor
    # bytes under another pickle (callback state); only files storing the same step are compared
    by_step: dict[int, list[Checkpoint]] = {}
    for c in checkpoints:
        if c.label not in folded and c.problem is None and c.step is not None \
                and c.weights.name.lower().endswith(TORCH_SUFFIXES):
            by_step.setdefault(c.step, []).append(c)
    for same in by_step.values():
        same.sort(key=_keep_rank)
        for i, c in enumerate(same):
            if c.label in folded:
                continue
            for other in same[i + 1:]:
                if other.label not in folded and _same_tensor_data(c.weights, other.weights):
                    folded[other.label] = (c, "the same step and tensor bytes as")
    if not folded:
        return checkpoints, []
    extra: dict[str, list[str]] = {}
    for dup, (kept, _) in folded.items():
        extra.setdefault(kept.label, []).append(dup)
    out = [replace(c, duplicates=c.duplicates + tuple(extra.get(c.label, ())))
           for c in checkpoints if c.label not in folded]
    return out, [(dup, kept.label, how) for dup, (kept, how) in folded.items()]


def _safe(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except OSError:  # unreadable now: never a duplicate; reading it later reports why
        return None


# --- several models in one folder --------------------------------------------------------------

# a number in a name: 3, 0.456, 1e-05, and the sign of a metric (val_loss=-0.5)
_NUMBER = re.compile(r"(?:(?<==)[-+])?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


def _series_shape(c: Checkpoint, accelerate_dirs: set[Path]) -> tuple[str, tuple[str, ...], str]:
    """The checkpoint's name with its numbers taken out, the numbers, and a literal tail (glob-escaped).

    The name is its label. In a folder holding accelerate's several models, the weights file
    is added (``checkpoint_*/model.safetensors``) and kept literal: the number of
    ``model_1.safetensors`` names a model, not a step.
    Lightning's ``-v1`` (a name saved twice) is no part of a series' name.
    """
    label, tail = c.label, ""
    if c.weights.parent in accelerate_dirs:
        if c.path != c.weights:
            tail = "/" + glob.escape(c.weights.name)
        elif "/" in label:
            label, tail = label.rsplit("/", 1)[0], "/" + glob.escape(c.weights.name)
    label = re.sub(r"-v\d+(?=\.\w+$)", "", label)
    numbers = tuple(_NUMBER.findall(label))
    return _NUMBER.sub("\0", label), numbers, tail


def _series(checkpoints: list[Checkpoint], accelerate_dirs: set[Path]) -> list[tuple[str, list[Checkpoint]]]:
    """Checkpoints grouped into model series: ``(glob relative to the run, members)``, largest first.

    Names equal once their numbers are taken out are one series (``netD_epoch_*.pth``). When one
    number takes two or more values that each come with the same set of the other numbers
    (``net1_epoch_{1..5}`` and ``net2_epoch_{1..5}``), it names a model, not a step: one series each.
    """
    groups: dict[tuple[str, str], list[tuple[Checkpoint, tuple[str, ...]]]] = {}
    for c in checkpoints:
        shape, numbers, tail = _series_shape(c, accelerate_dirs)
        groups.setdefault((shape, tail), []).append((c, numbers))
    out: list[tuple[str, list[Checkpoint]]] = []
    for (shape, tail), members in groups.items():
        fixed: dict[int, str] = {}
        width = len(members[0][1])
        for pos in range(width):
            by_value: dict[str, list[tuple[Checkpoint, tuple[str, ...]]]] = {}
            for m in members:
                by_value.setdefault(m[1][pos], []).append(m)
            rests = {frozenset(n[:pos] + n[pos + 1:] for _, n in ms) for ms in by_value.values()}
            if len(by_value) >= 2 and all(len(ms) >= 2 for ms in by_value.values()) and len(rests) == 1:
                for value, ms in by_value.items():
                    out.append((_series_glob(shape, {pos: value}, tail), [c for c, _ in ms]))
                break
        else:
            out.append((_series_glob(shape, fixed, tail), [c for c, _ in members]))
    return sorted(out, key=lambda s: (-len(s[1]), natural_key(s[0])))


def _series_glob(shape: str, fixed: dict[int, str], tail: str) -> str:
    parts = shape.split("\0")
    text = glob.escape(parts[0])
    for i, part in enumerate(parts[1:]):
        text += (glob.escape(fixed[i]) if i in fixed else "*") + glob.escape(part)
    return text + tail  # the tail is escaped already


def _signature(members: list[Checkpoint], key: str | None) -> frozenset[tuple[str, tuple[int, ...]]] | None:
    """The tensor names and shapes of the first readable checkpoint of a series (None if none opens)."""
    for c in members:
        if c.problem is not None:
            continue
        try:
            with c.open(key) as reader:
                return frozenset((n, tuple(reader.info(n).shape)) for n in reader.names())
        except Exception:  # unreadable here: reported when the run is read; try the next one
            continue
    return None


def _other_models(series: list[tuple[str, list[Checkpoint]]], counted: list[tuple[str, list[Checkpoint]]],
                  key: str | None) -> list[tuple[str, list[Checkpoint]]]:
    """Single files that hold another model than the run beside them (``netG_epoch_2.pth`` beside
    ``netD_epoch_*.pth``, or ``netD_epoch_0`` + ``netG_epoch_0``): series of their own.

    A single file of the run's own model (``final.pt``, ``best.ckpt``) holds its tensor names and
    shapes; one holding other tensors is never a later step of the run.
    """
    singles = [(pattern, members) for pattern, members in series
               if len(members) == 1 and (pattern, members) not in counted]
    if not singles:
        return []
    known = {_signature(members, key) for _, members in counted} - {None}
    out: list[tuple[str, list[Checkpoint]]] = []
    for pattern, members in singles:
        signature = _signature(members, key)
        if signature is None:
            continue  # unreadable: an errors.csv row when the run is read
        if known and signature not in known:
            out.append((pattern, members))
        elif not known:
            known.add(signature)
            out.append((pattern, members))
    # with no series of two or more files, single files are separate models only when they differ
    if not counted and len({_signature(m, key) for _, m in out}) < 2:
        return []
    return out


def _several_at_one_step(checkpoints: list[Checkpoint]) -> None:
    """Stop when two different checkpoints store one step: two runs written into one folder.

    Lightning writes a second run into a taken folder as ``epoch=0-step=4-v1.ckpt``; byte- or
    tensor-identical saves at one step were folded already, so what is left at one step
    differs. Chaining them would compare one run's weights with the other's.
    """
    at: dict[int, list[str]] = {}
    for c in checkpoints:
        if c.step is not None and c.label != FINAL_LABEL and c.problem is None:
            at.setdefault(c.step, []).append(c.label)
    clashes = {step: labels for step, labels in at.items() if len(labels) > 1}
    if clashes:
        shown = "; ".join(f"step {step}: {', '.join(labels[:3])}" for step, labels in sorted(clashes.items())[:3])
        raise InputError(printable(
            f"{len(clashes)} step(s) each stored by two different checkpoints ({shown}): these files are more "
            "than one run (a re-run into the same folder, as Lightning's -v1 names show); audit one run at a "
            "time by naming its files or a glob"))


def _shown_to_be_one_run(counted: list[tuple[str, list[Checkpoint]]]) -> bool:
    """Whether the files themselves show two name patterns to be one run, not just one architecture.

    Two runs of one model saved flat into a folder (``a_step_*.pt``, ``b_step_*.pt``) hold the
    same tensor names and shapes too, so that alone never joins patterns. Two Lightning
    callbacks writing one run leave a trace: at a step both saved, their files hold the same
    tensor bytes (one was folded into the other). And one run never holds two different
    checkpoints at one step.
    """
    owner: dict[int, str] = {}
    for pattern, members in counted:
        for c in members:
            if c.step is not None and owner.setdefault(c.step, pattern) != pattern:
                return False
    return any(fnmatch.fnmatchcase(dup, other)
               for pattern, members in counted for c in members for dup in c.duplicates
               for other, _ in counted if other != pattern)


def _refuse_several_series(
    checkpoints: list[Checkpoint], inputs: Sequence[Any], root: Path, key: str | None = None,
) -> list[str]:
    """Stop with an :class:`InputError` when the checkpoints hold more than one model series.

    A series is two or more checkpoints of one name pattern, or accelerate's second model
    (``model_1.safetensors``) and the model beside it. A single unnumbered file beside a
    series (``final.pt``, ``best.ckpt``, a ``last.ckpt`` that copies nothing) belongs to the run.
    Name patterns whose checkpoints hold the same tensor names and shapes are one model
    saved under two names (two Lightning callbacks) when the files show it (see
    :func:`_shown_to_be_one_run`): one run, and the note returned says so.
    accelerate's several prepared models are always several series.
    """
    accelerate_dirs = {c.weights.parent for c in checkpoints if ACCELERATE_EXTRA_MODEL.match(c.weights.name)}
    series = _series(checkpoints, accelerate_dirs)
    counted = [(pattern, members) for pattern, members in series
               if len(members) >= 2 or any(c.weights.parent in accelerate_dirs for c in members)]
    counted += _other_models(series, counted, key)
    if len(counted) < 2:
        return []
    if not accelerate_dirs and _shown_to_be_one_run(counted):
        signatures = {_signature(members, key) for _, members in counted}
        if len(signatures) == 1 and None not in signatures:
            listing = ", ".join(f"{pattern}: {len(members)} files" for pattern, members in counted)
            return [printable(f"{len(counted)} file name patterns ({listing}) hold the same model (the same tensor "
                              "names and shapes), as two Lightning ModelCheckpoint callbacks writing into one "
                              "folder do: read as one run in step order; pass a glob to audit one pattern")]
    if len(inputs) == 1 and Path(os.fspath(inputs[0])).is_dir():
        base = os.fspath(inputs[0]).rstrip("/") or "/"
    else:
        rel = os.path.relpath(root.absolute())
        base = str(root.absolute()) if rel.startswith("..") else rel
    base = glob.escape(base)
    globs = [(base.rstrip("/") + "/" + pattern if base != "." else pattern) for pattern, _ in counted]
    listing = ", ".join(f"{pattern}: {len(members)} file{'s' if len(members) != 1 else ''}"
                        for pattern, members in counted)
    where = printable(os.fspath(inputs[0])) if len(inputs) == 1 else "the set of checkpoints given"
    picks = " or ".join(f"'{printable(g)}'" for g in globs[:3])
    raise InputError(f"{where} holds {len(counted)} model series ({printable(listing)}); they are never chained "
                     f"into one run: audit one at a time, e.g. auditclip drift {picks}")


# --- notes on what a run is missing -------------------------------------------------------------


def _deleted_checkpoints_note(checkpoints: list[Checkpoint]) -> list[str]:
    """A note when a Trainer run kept only its latest checkpoints (``save_total_limit``).

    The first kept ``checkpoint-N/`` is then not the first save: its ``trainer_state.json``
    says the Trainer saved every ``save_steps`` steps, and N is larger.
    """
    first = next((c for c in checkpoints if c.step is not None and c.path.is_dir() and c.label != FINAL_LABEL
                  and (c.weights.parent / "trainer_state.json").is_file()), None)
    if first is None:
        return []
    try:
        doc = json.loads((first.weights.parent / "trainer_state.json").read_text(encoding="utf-8"))
    except Exception:  # a broken trainer_state.json is noted where its step is read
        return []
    every = doc.get("save_steps") if isinstance(doc, dict) else None
    if isinstance(every, bool) or not isinstance(every, int) or every <= 0 or first.step is None \
            or first.step <= every:
        return []
    return [printable(f"{first.label} is the earliest checkpoint kept, but the Trainer saved every {every} steps "
                      f"(trainer_state.json): the earlier checkpoints were deleted (save_total_limit), so the run "
                      f"and its reference start at step {first.step}, not at the start of training")]


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        try:
            return path.lstat().st_mtime
        except OSError:
            return 0.0


def _sort_key(sort: str):  # type: ignore[no-untyped-def]
    if sort == "name":
        return lambda c: natural_key(c.label)
    if sort == "mtime":
        return lambda c: (_mtime(c.weights), natural_key(c.label))
    # unknown steps last, by name; a Trainer's "final" save without a stored step is the first of those
    return lambda c: (c.step is None, c.step or 0, (c.label == FINAL_LABEL) == (c.step is not None),
                      natural_key(c.label))
