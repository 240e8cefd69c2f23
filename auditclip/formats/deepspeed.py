"""Read DeepSpeed checkpoints (ZeRO stages 0 to 3) lazily, one parameter at a time.

What ``engine.save_checkpoint(run)`` writes (verified with DeepSpeed 0.19.8, default torch checkpoint engine)
--------------------------------------------------------------------------------------------------------------
* ``run/latest``: a text file holding the tag last saved (``global_step3``).
* ``run/<tag>/``: one folder per save; the tag defaults to ``global_step<N>``, N the
  engine's ``global_steps`` (a user may pass any tag).
* ``run/zero_to_fp32.py`` (and ``zero_to_torch.py``): DeepSpeed's consolidation script.

In a tag folder (``mp_rank_00``: the tensor-parallel rank; only ``00`` is read here):

* ZeRO 0, 1, 2: ``mp_rank_00_model_states.pt``, a ``torch.save`` dict whose ``module``
  entry is the model's full ``state_dict()`` in the dtype it trains in (fp32, or bf16/fp16
  weights with fp32 buffers), beside ``buffer_names``, ``param_shapes`` (one ordered
  ``{name: torch.Size}`` per optimizer group: the order of the flat fp32 groups; ``None``
  for ZeRO-0), ``frozen_param_shapes``, ``frozen_param_fragments``, ``shared_params``
  (``{alias: name}`` of tied parameters), ``global_steps``, ``dp_world_size``,
  ``ds_config``, ``ds_version``...; at ZeRO-0 also ``optimizer`` (the whole optimizer state).
* ZeRO-3: ``zero_pp_rank_<r>_mp_rank_00_model_states.pt``, one per data-parallel rank
  ``r``, with the same keys; but every partitioned parameter in ``module`` is an empty
  **placeholder of shape [0]**: the weights are not in these files at all. Buffers there
  are whole. ``frozen_param_fragments`` holds each rank's piece of each frozen parameter.
* ZeRO 1-3: ``zero_pp_rank_<r>_mp_rank_00_optim_states.pt``, one per rank (prefixed
  ``bf16_`` when bf16 is enabled), a dict whose ``optimizer_state_dict`` holds
  ``zero_stage`` (a DeepSpeed ``ZeroStageEnum``), ``partition_count``, the optimizer's
  moments and the fp32 master weights as flat 1-D tensors, one per optimizer group:

  - ZeRO 1/2, ``single_partition_of_fp32_groups``: rank ``r``'s slice of each group;
    the ranks' slices of a group, concatenated in rank order, are the group's flat
    vector, in which the parameters of ``param_shapes[group]`` lie one after the other,
    each followed by ``param_alignment_paddings[group][i]`` padding elements (with
    ``zero_optimization.parameter_alignment``; files without that entry, from older
    DeepSpeed, are read with none, as ``zero_to_fp32.py`` reads them); the vector ends
    with padding up to a multiple of ``2 * world_size``. ``param_shapes`` is already in
    the flat order (``round_robin_gradients`` reorders it away from the module's).
  - ZeRO-3, ``fp32_flat_groups``: rank ``r``'s groups, concatenated, hold rank ``r``'s
    part of every parameter, in the order of ``param_shapes`` (all groups merged): a
    parameter of ``n`` elements takes ``ceil(n / world_size)`` elements on every rank,
    at the same offset on each; rank 0's part, then rank 1's..., is the flattened
    parameter followed by ``ceil(n / world) * world - n`` padding elements.

  DeepSpeed pickles its own classes there (``ZeroStageEnum``, ``LossScaler``,
  ``fragment_address``), so the files are read with the gated unpickler of
  :mod:`auditclip.formats.safe_pickle` (through :mod:`auditclip.formats.readers`): they become inert
  placeholders, nothing is imported or run, and a pickle that needs code is refused
  (``unsafe``).

What is read, and which copy
----------------------------
:func:`read_deepspeed_index` unpickles the model-states and optimizer-states files onto
the ``meta`` device (which records where each tensor's bytes lie and reads none of them)
and lays out where every parameter lives. :func:`read_deepspeed_tensor` then reads one
tensor's bytes with ``pread``:

* ``source="module"`` (the default at ZeRO 0-2): the weights as the model runs with
  them, from ``module`` (bf16/fp16 in mixed precision).
* ``source="master"``: the fp32 master copy from the optimizer files (ZeRO 1-3), what
  ``zero_to_fp32.py`` consolidates; this is the default at ZeRO-3, where it is the only
  copy (the bf16/fp16 weights of a ZeRO-3 run are the master copy rounded). Buffers and
  frozen parameters have no master copy: they come from ``module`` (buffers) or the
  frozen fragments, in their saved dtype.

:func:`iter_deepspeed_tensors` reads them all, one at a time. :func:`deepspeed_tags` lists a
run's tags in step order, :func:`latest_tag` the tag ``latest`` names and
:func:`deepspeed_step` a tag's step; :func:`is_deepspeed_run`, :func:`is_deepspeed_tag_folder`
and :func:`is_deepspeed_file` recognise the layout from names alone (for discovery: a file
named like these is part of its tag folder and is never read alone).

Wired in: :mod:`auditclip.checkpoints` makes a run folder's tag folders a run (one
checkpoint per tag, format ``deepspeed``, known by :func:`deepspeed_model_states`) and a
model- or optimizer-states file given or globbed its tag folder; :mod:`auditclip.formats.readers`
opens any of them with :class:`DeepSpeedSource` (below) (``--key master`` / ``--key module`` pick the
copy; one note names the copy read). A ZeRO-3 model-states dict renamed out of its folder
reaches the generic torch reader, which refuses it (``param_shapes`` beside empty tensors).

A ZeRO-3 parameter is reassembled from every rank's file without building the model:
memory is the one parameter. The placeholders are never returned: a ZeRO-3 folder whose
optimizer files are missing is refused (``missing_shard``) with the consolidation command.

Refused (``unsupported``, naming the layout and ``python zero_to_fp32.py``): tensor- or
pipeline-parallel saves (``mp_rank_01``, ``layer_*-model_states.pt``), MoE expert files
(``expp_rank_*``, ``layer_*_expert_*``), AutoEP partitioned experts, optimizer files
written with different partition counts per group, and ``source="master"`` at ZeRO-0
(its fp32 copy is a list without names).

>>> import tempfile, torch
>>> from pathlib import Path
>>> run = Path(tempfile.mkdtemp())
>>> (run / "global_step5").mkdir()
>>> torch.save({"module": {"w": torch.arange(4.0), "n": torch.tensor(3)}, "buffer_names": ["n"],
...             "param_shapes": None, "global_steps": 5}, run / "global_step5" / "mp_rank_00_model_states.pt")
>>> _ = (run / "latest").write_text("global_step5")
>>> index = read_deepspeed_index(run)
>>> index.tag, index.step, index.zero_stage, [(t.name, t.role, t.shape) for t in index.tensors.values()]
('global_step5', 5, 0, [('w', 'parameter', (4,)), ('n', 'buffer', ())])
>>> read_deepspeed_tensor(index, "w")
tensor([0., 1., 2., 3.])
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from auditclip.formats.dtypes import dtype_name, torch_dtype
from auditclip.errors import CheckpointError, InputError
from auditclip.notices import note
from auditclip.formats.pinned import PinnedFile, read_strided
from auditclip.formats.source import Source, one_line
from auditclip.formats.torch_pickle import load_torch_meta
from auditclip.formats.safe_pickle import Placeholder

__all__ = [
    "DeepSpeedSource", "LATEST_FILE", "DeepSpeedIndex", "DeepSpeedPiece", "DeepSpeedTag", "DeepSpeedTensor", "consolidate_command",
    "deepspeed_model_states", "deepspeed_step", "deepspeed_tags", "is_deepspeed_file", "is_deepspeed_optim_file", "is_deepspeed_run",
    "is_deepspeed_tag_folder", "iter_deepspeed_tensors", "latest_tag", "read_deepspeed_index", "read_deepspeed_tensor",
]

#: The file in a run folder naming the tag last saved.
LATEST_FILE = "latest"
#: A ``latest`` file larger than this is not DeepSpeed's (it holds one tag).
MAX_LATEST_BYTES = 4096

_STEP_TAG = re.compile(r"global_step(\d+)")
_MODEL_STATES = re.compile(r"mp_rank_(\d+)_model_states\.pt")
_ZERO3_MODEL_STATES = re.compile(r"zero_pp_rank_(\d+)_mp_rank_(\d+)_model_states\.pt")
_OPTIM_STATES = re.compile(r"(bf16_)?zero_pp_rank_(\d+)_mp_rank_(\d+)_optim_states\.pt")
# layouts recognised as DeepSpeed's but not read here (see the module docstring)
_PIPELINE = re.compile(r"layer_\d+-model_\d+-model_states\.pt")
_EXPERT = re.compile(r"(layer_\d+_)?expert_\d+_mp_rank_\d+_model_states\.pt|expp_rank_\d+_mp_rank_\d+_optim_states\.pt")


@dataclass(frozen=True)
class DeepSpeedPiece:
    """A run of a tensor's elements stored in one file: read with ``read_strided``."""

    file: str                            #: file name in the tag folder
    storage: int                         #: byte offset of the storage's data in the file
    storage_bytes: int                   #: bytes of that storage
    start: int                           #: element offset of the piece in the storage
    shape: tuple[int, ...]               #: the piece's shape (1-D runs for flat groups)
    stride: tuple[int, ...] | None = None  #: None: contiguous

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class DeepSpeedTensor:
    """One tensor of a DeepSpeed checkpoint and where its copies live; no data is held."""

    name: str                             #: the model's name (``encoder.layer.0.weight``)
    #: ``parameter`` (in the optimizer's flat groups), ``frozen`` (listed in ``frozen_param_shapes``),
    #: ``buffer`` (in ``buffer_names``) or ``other``: in ``module`` but listed nowhere, e.g. a frozen
    #: parameter at ZeRO-1, which saves no ``frozen_param_shapes`` (``zero_to_fp32.py`` drops those)
    role: str
    shape: tuple[int, ...]                #: the full (unpartitioned) shape
    module_dtype: str | None              #: dtype in ``module``; None where it is a placeholder (ZeRO-3)
    module: tuple[DeepSpeedPiece, ...]    #: the ``module`` copy, or the frozen fragments; empty if none
    master_dtype: str | None              #: dtype of the fp32 master copy; None if there is none
    master: tuple[DeepSpeedPiece, ...]    #: the master copy's pieces across ranks' optimizer files

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class DeepSpeedIndex:
    """Where every tensor of one DeepSpeed tag folder lives; built by :func:`read_deepspeed_index`."""

    folder: Path                       #: the tag folder (``run/global_step3``)
    tag: str                           #: its name
    step: int | None                   #: from ``global_step<N>``, else the saved ``global_steps``
    latest: str | None                 #: the tag the run's ``latest`` file names (None: no such file)
    zero_stage: int                    #: 0 to 3
    world_size: int                    #: data-parallel ranks (optimizer files) the weights are spread over
    bf16_files: bool                   #: optimizer files carry the ``bf16_`` prefix
    ds_version: str | None
    tensors: dict[str, DeepSpeedTensor]   #: by name, in ``module`` order
    shared: dict[str, str]             #: tied alias -> the name holding the data (read through the latter)
    default_source: str                #: ``module`` (ZeRO 0-2) or ``master`` (ZeRO-3)
    #: file -> (size, mtime_ns, inode) when indexed: a file rewritten since is refused (``changed``)
    files: dict[str, tuple[int, int, int]] = field(default_factory=dict)

    def tensor(self, name: str) -> DeepSpeedTensor:
        """The entry of ``name`` (a tied alias gives its source's); ``KeyError`` naming a few names."""
        name = self.shared.get(name, name)
        if name in self.tensors:
            return self.tensors[name]
        some = ", ".join(list(self.tensors)[:5])
        raise KeyError(f"{name!r} is not a tensor of the DeepSpeed checkpoint {self.folder} (it has {some}...)")


@dataclass(frozen=True)
class DeepSpeedTag:
    """A tag folder of a run, with the step its name gives (``global_step<N>``), if any."""

    name: str
    folder: Path
    step: int | None


# --------------------------------------------------------------------------- recognising

def is_deepspeed_tag_folder(path: str | os.PathLike[str]) -> bool:
    """True for a folder holding DeepSpeed ``*model_states.pt`` files (names only are read).

    >>> import tempfile
    >>> is_deepspeed_tag_folder(tempfile.mkdtemp())
    False
    """
    try:
        names = os.listdir(path)
    except OSError:
        return False
    return any(_MODEL_STATES.fullmatch(n) or _ZERO3_MODEL_STATES.fullmatch(n) or _PIPELINE.fullmatch(n)
               for n in names)


def deepspeed_tags(run: str | os.PathLike[str]) -> list[DeepSpeedTag]:
    """The tag folders of a run folder, ordered by the step their name gives, then by name.

    Tags not named ``global_step<N>`` (a user's own ``tag=``) come last, in name
    order; their step is in :attr:`DeepSpeedIndex.step` once indexed.

    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> run = Path(tempfile.mkdtemp())
    >>> for tag in ("global_step10", "global_step9", "best"):
    ...     (run / tag).mkdir()
    ...     torch.save({"module": {}}, run / tag / "mp_rank_00_model_states.pt")
    >>> [(t.name, t.step) for t in deepspeed_tags(run)]
    [('global_step9', 9), ('global_step10', 10), ('best', None)]
    """
    run = Path(run)
    try:
        children = sorted(p for p in run.iterdir() if p.is_dir())
    except OSError:
        return []
    tags = [DeepSpeedTag(p.name, p, _tag_step(p.name)) for p in children if is_deepspeed_tag_folder(p)]
    return sorted(tags, key=lambda t: (t.step is None, t.step or 0, t.name))


def is_deepspeed_run(path: str | os.PathLike[str]) -> bool:
    """True for a folder with a ``latest`` file or a tag folder of DeepSpeed's (names only are read).

    >>> import tempfile
    >>> is_deepspeed_run(tempfile.mkdtemp())
    False
    """
    path = Path(path)
    if not path.is_dir():
        return False
    latest = _read_latest(path)
    return (latest is not None and is_deepspeed_tag_folder(path / latest)) or bool(deepspeed_tags(path))


def is_deepspeed_file(path: str | os.PathLike[str]) -> bool:
    """True for a file named as DeepSpeed names its model or optimizer states (nothing is read).

    Such a file is one part of its tag folder: read the folder with
    :func:`read_deepspeed_index`, never the file alone (a ZeRO-3 model-states file holds
    only empty placeholders).

    >>> is_deepspeed_file("run/global_step3/zero_pp_rank_0_mp_rank_00_model_states.pt"), is_deepspeed_file("model.pt")
    (True, False)
    """
    name = Path(path).name
    return any(p.fullmatch(name) for p in (_MODEL_STATES, _ZERO3_MODEL_STATES, _OPTIM_STATES, _PIPELINE, _EXPERT))


def is_deepspeed_optim_file(path: str | os.PathLike[str]) -> bool:
    """True for a file named as DeepSpeed names a rank's optimizer states (nothing is read).

    >>> is_deepspeed_optim_file("bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt")
    True
    >>> is_deepspeed_optim_file("zero_pp_rank_1_mp_rank_00_model_states.pt")
    False
    """
    return bool(_OPTIM_STATES.fullmatch(Path(path).name))


def latest_tag(run: str | os.PathLike[str]) -> str | None:
    """The tag a run folder's ``latest`` file names (what ``engine.load_checkpoint(run)`` resumes from), or None.

    None when there is no such file, or it does not hold one plausible tag (a name
    inside the run; it is not checked to exist).

    >>> import tempfile
    >>> from pathlib import Path
    >>> run = Path(tempfile.mkdtemp())
    >>> latest_tag(run)
    >>> _ = (run / "latest").write_text("global_step7")
    >>> latest_tag(run)
    'global_step7'
    """
    return _read_latest(Path(run))


def deepspeed_model_states(folder: str | os.PathLike[str]) -> Path | None:
    """The model-states file a tag folder is known by: ``mp_rank_00_model_states.pt`` (ZeRO 0-2), else
    rank 0's ``zero_pp_rank_0_mp_rank_00_model_states.pt`` (ZeRO-3); None if it has neither (names only).

    The file names the checkpoint; reading it alone is never right at ZeRO-3 (placeholders):
    :func:`read_deepspeed_index` takes it and reads its whole tag folder.

    >>> import tempfile
    >>> from pathlib import Path
    >>> tag = Path(tempfile.mkdtemp())
    >>> _ = (tag / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"")
    >>> deepspeed_model_states(tag).name
    'zero_pp_rank_0_mp_rank_00_model_states.pt'
    """
    folder = Path(folder)
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if (folder / name).is_file():
            return folder / name
    return None


def deepspeed_step(folder: str | os.PathLike[str]) -> int | None:
    """The step of a tag folder: from its name (``global_step<N>``), else the step its model states store.

    That is a ``global_step`` of the trainer's client state (Lightning's, whose DeepSpeed
    strategy saves every checkpoint under the tag ``checkpoint``), else DeepSpeed's own
    ``global_steps``.

    Only the pickle of the model-states file is read (onto the meta device: no
    tensor data); anything unreadable gives None (it is reported when the tag is read).

    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> tag = Path(tempfile.mkdtemp()) / "best"
    >>> tag.mkdir()
    >>> torch.save({"module": {}, "global_steps": 40}, tag / "mp_rank_00_model_states.pt")
    >>> deepspeed_step(tag), deepspeed_step(tag.parent / "global_step12")
    (40, 12)
    """
    folder = Path(folder)
    step = _tag_step(folder.name)
    if step is not None:
        return step
    try:
        model = deepspeed_model_states(folder)
        if model is None:
            return None
        state = _Loaded(folder, model.name).obj
    except Exception:  # a broken file: reported when the tag is read
        return None
    # Lightning's DeepSpeed strategy saves under the tag "checkpoint", its own global_step in the client state
    for key in ("global_step", "global_steps"):
        saved = state.get(key)
        if isinstance(saved, int) and not isinstance(saved, bool) and saved >= 0:
            return saved
    return None


def consolidate_command(run: str | os.PathLike[str], tag: str) -> str:
    """What to do with a DeepSpeed checkpoint auditclip does not read: DeepSpeed's own consolidation command.

    >>> print(consolidate_command("out/run", "global_step3"))
    consolidate it with DeepSpeed's own script, saved in the run folder: cd out/run && python zero_to_fp32.py . OUTPUT_DIR --tag global_step3, then audit OUTPUT_DIR
    """
    return _consolidate(Path(run), tag)


def _tag_step(name: str) -> int | None:
    m = _STEP_TAG.fullmatch(name)
    return int(m.group(1)) if m else None


def _read_latest(run: Path) -> str | None:
    """The tag named by ``run/latest``, or None when there is no such (plausible) file."""
    path = run / LATEST_FILE
    try:
        if not path.is_file() or path.stat().st_size > MAX_LATEST_BYTES:
            return None
        text = path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return None
    # one tag, a folder name inside the run (never a path out of it)
    if not text or "/" in text or "\\" in text or text in (".", "..") or "\n" in text:
        return None
    return text


def _consolidate(run: Path, tag: str) -> str:
    return (f"consolidate it with DeepSpeed's own script, saved in the run folder: cd {run} && "
            f"python zero_to_fp32.py . OUTPUT_DIR --tag {tag}, then audit OUTPUT_DIR")


# --------------------------------------------------------------------------- index

class _Loaded:
    """One file unpickled onto the meta device, with the stamp it had."""

    def __init__(self, folder: Path, name: str) -> None:
        self.name = name
        f = PinnedFile(folder / name)
        try:
            self.obj, lazy = load_torch_meta(f)
            self.stamp = f.stamp
        finally:
            f.close()
        if not lazy:
            raise CheckpointError(folder / name, "not a zip-format torch.save file (a legacy or foreign "
                                                 "serialisation); auditclip reads DeepSpeed files written "
                                                 "by torch.save", kind="unsupported")
        if not isinstance(self.obj, Mapping):
            raise CheckpointError(folder / name, f"holds a {type(self.obj).__name__}, not the dict DeepSpeed saves")
        self.path = folder / name

    def piece(self, t: Any, what: str) -> DeepSpeedPiece:
        """Where the meta tensor ``t`` of this file lies."""
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
            raise CheckpointError(self.path, f"{what} is a {type(t).__name__}, not a dense tensor")
        storage = t.untyped_storage()
        offset = getattr(storage, "_checkpoint_offset", None)
        if offset is None:
            raise CheckpointError(self.path, f"{what} has no data in the file", kind="unsupported")
        stride = None if t.is_contiguous() else tuple(t.stride())
        return DeepSpeedPiece(self.name, int(offset), storage.nbytes(), t.storage_offset(), tuple(t.shape), stride)


def _bad(path: Path, why: str) -> CheckpointError:
    return CheckpointError(path, f"inconsistent DeepSpeed checkpoint: {why}")


def _shape(value: Any, what: str, path: Path) -> tuple[int, ...]:
    if isinstance(value, torch.Size | tuple | list) and all(isinstance(d, int) and d >= 0 for d in value):
        return tuple(int(d) for d in value)
    raise _bad(path, f"{what} is {type(value).__name__}, not a shape")


def _stage(value: Any, path: Path) -> int:
    """``zero_stage`` as an int: DeepSpeed pickles a ``ZeroStageEnum`` (a placeholder here)."""
    if isinstance(value, Placeholder) and value.global_name.endswith(".ZeroStageEnum") and len(value.args) == 1:
        value = value.args[0]
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= int(value) <= 3:
        return int(value)
    raise _bad(path, f"zero_stage is {value!r}")


def _resolve(path: Path) -> tuple[Path, Path, str | None]:
    """(run folder, tag folder, tag in ``latest``) for a run folder, a tag folder or a file in one."""
    if path.is_file():
        path = path.parent
    if not path.is_dir():
        raise InputError(f"{path}: no such DeepSpeed checkpoint folder")
    if is_deepspeed_tag_folder(path):
        return path.parent, path, _read_latest(path.parent)
    latest = _read_latest(path)
    if latest is not None and is_deepspeed_tag_folder(path / latest):
        return path, path / latest, latest
    tags = deepspeed_tags(path)
    if not tags:
        if latest is not None:
            raise CheckpointError(path / LATEST_FILE, f"names the tag {latest!r}, but {path / latest} holds no "
                                                      "DeepSpeed model states", kind="missing_shard")
        raise InputError(f"{path}: not a DeepSpeed checkpoint (no latest file, no folder with "
                         "*model_states.pt files)")
    note(f"{path}: no usable 'latest' file; read the tag with the highest step, {tags[-1].name}")
    return path, tags[-1].folder, latest


def read_deepspeed_index(path: str | os.PathLike[str]) -> DeepSpeedIndex:
    """Index one DeepSpeed checkpoint: a run folder (its ``latest`` tag), a tag folder, or a file in one.

    Reads the pickles of the model-states and optimizer-states files (onto the meta
    device: no tensor data) and works out where each parameter lies: in ``module``
    (ZeRO 0-2), and, at ZeRO 1-3, in the fp32 partitions of every rank's optimizer
    file. Raises :class:`CheckpointError` for a missing rank file (``missing_shard``),
    a hostile pickle (``unsafe``), or a layout it cannot read honestly (``unsupported``,
    naming the consolidation command); :class:`InputError` if ``path`` is no DeepSpeed
    checkpoint.

    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> tag = Path(tempfile.mkdtemp()) / "global_step2"
    >>> tag.mkdir()
    >>> torch.save({"module": {"w": torch.ones(3, dtype=torch.bfloat16)}, "buffer_names": [], "param_shapes": None},
    ...            tag / "mp_rank_00_model_states.pt")
    >>> index = read_deepspeed_index(tag / "mp_rank_00_model_states.pt")
    >>> index.step, index.latest, index.tensors["w"].module_dtype, index.tensors["w"].master_dtype
    (2, None, 'bfloat16', None)

    ZeRO-3 model states without their optimizer files hold only placeholders: refused.

    >>> z3 = Path(tempfile.mkdtemp()) / "global_step4"
    >>> z3.mkdir()
    >>> torch.save({"module": {"w": torch.empty(0)}, "param_shapes": [{"w": torch.Size([8])}], "buffer_names": []},
    ...            z3 / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    >>> try:
    ...     read_deepspeed_index(z3)
    ... except CheckpointError as exc:
    ...     print(exc.kind, "placeholders" in exc.message, "zero_to_fp32.py" in exc.message)
    missing_shard True True
    """
    run, folder, latest = _resolve(Path(path))
    tag = folder.name
    names = sorted(os.listdir(folder))
    for n in names:
        if _PIPELINE.fullmatch(n) or _EXPERT.fullmatch(n):
            kind = "pipeline-parallel layer" if _PIPELINE.fullmatch(n) else "mixture-of-experts"
            raise CheckpointError(folder / n, f"a DeepSpeed {kind} checkpoint: its layout is not read by auditclip; "
                                              f"{_consolidate(run, tag)}", kind="unsupported")
    ranks = {int(m.group(1)) for n in names if (m := _MODEL_STATES.fullmatch(n))}
    ranks |= {int(m.group(2)) for n in names if (m := _ZERO3_MODEL_STATES.fullmatch(n))}
    ranks |= {int(m.group(3)) for n in names if (m := _OPTIM_STATES.fullmatch(n))}
    if ranks - {0}:
        raise CheckpointError(folder, f"a DeepSpeed checkpoint saved with tensor (model) parallelism (mp_rank "
                                      f"{sorted(ranks)}): each rank holds a slice of the weights; not read by "
                                      "auditclip; merge the model-parallel slices with the trainer's own tools "
                                      "(e.g. DeepSpeed's ds_to_universal.py)", kind="unsupported")
    optim: dict[int, str] = {}
    prefixes: set[bool] = set()
    for n in names:
        if m := _OPTIM_STATES.fullmatch(n):
            optim[int(m.group(2))] = n
            prefixes.add(bool(m.group(1)))
    if len(prefixes) > 1:
        raise CheckpointError(folder, "holds optimizer files both with and without the bf16_ prefix (two saves "
                                      "under one tag?); which belong to this save cannot be told",
                              kind="unsupported")
    zero3_models = {int(m.group(1)): n for n in names if (m := _ZERO3_MODEL_STATES.fullmatch(n))}
    if "mp_rank_00_model_states.pt" in names and zero3_models:
        raise CheckpointError(folder, "holds both ZeRO 0-2 (mp_rank_00_model_states.pt) and ZeRO-3 "
                                      "(zero_pp_rank_*_model_states.pt) model states", kind="unsupported")
    model_name = "mp_rank_00_model_states.pt" if not zero3_models else zero3_models.get(0)
    if model_name is None:
        raise CheckpointError(folder / "zero_pp_rank_0_mp_rank_00_model_states.pt",
                              "missing: rank 0's model states of a ZeRO-3 checkpoint", kind="missing_shard")
    model = _Loaded(folder, model_name)
    files = {model.name: model.stamp}
    state = model.obj
    module = state.get("module")
    if not isinstance(module, Mapping) or not all(isinstance(k, str) for k in module):
        raise _bad(model.path, "no 'module' state dict")
    if _autoep(state):
        raise CheckpointError(model.path, "a DeepSpeed AutoEP checkpoint with partitioned experts; not read "
                                          f"by auditclip; {_consolidate(run, tag)}", kind="unsupported")
    buffer_names = state.get("buffer_names") or []
    if not isinstance(buffer_names, list | tuple) or not all(isinstance(b, str) for b in buffer_names):
        raise _bad(model.path, "buffer_names is not a list of names")
    param_groups = state.get("param_shapes")
    shared = state.get("shared_params") or {}
    if not isinstance(shared, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in shared.items()):
        raise _bad(model.path, "shared_params is not a {name: name} dict")
    shared = {k: v for k, v in shared.items() if k != v}
    ds_version = state.get("ds_version") if isinstance(state.get("ds_version"), str) else None

    # ---- the stage, and the optimizer files of every rank
    optims = [_Loaded(folder, optim[r]) for r in sorted(optim)]
    files.update({o.name: o.stamp for o in optims})
    zero3 = bool(zero3_models)
    if optims:
        states = []
        for o in optims:
            osd = o.obj.get("optimizer_state_dict")
            if not isinstance(osd, Mapping) or "zero_stage" not in osd:
                raise _bad(o.path, "no optimizer_state_dict with a zero_stage")
            states.append(osd)
        stage = _stage(states[0]["zero_stage"], optims[0].path)
        for o, osd in zip(optims, states):
            if _stage(osd["zero_stage"], o.path) != stage:
                raise _bad(o.path, "the ranks' optimizer files give different ZeRO stages")
        if (stage == 3) != zero3:
            raise _bad(folder, f"optimizer files of ZeRO stage {stage} beside {model_name}")
        count = states[0].get("partition_count")
        counts = count if isinstance(count, list | tuple) else [count]
        if not counts or not all(isinstance(c, int) and c > 0 for c in counts):
            raise _bad(optims[0].path, f"partition_count is {count!r}")
        if len(set(counts)) > 1:
            raise CheckpointError(optims[0].path, f"optimizer groups partitioned over different numbers of ranks "
                                                  f"({list(counts)}: expert parallelism); not read by auditclip; "
                                                  f"{_consolidate(run, tag)}", kind="unsupported")
        world = counts[0]
        missing = [r for r in range(world) if r not in optim]
        extra = sorted(set(optim) - set(range(world)))
        if missing or extra:
            prefix = "bf16_" if True in prefixes else ""
            name = f"{prefix}zero_pp_rank_{(missing or extra)[0]}_mp_rank_00_optim_states.pt"
            raise CheckpointError(folder / name,  # named in the message too: errors.csv has no path column
                                  f"{name} {'missing' if missing else 'unexpected'}: the checkpoint is partitioned over "
                                  f"{world} rank(s) and {len(optim)} optimizer file(s) are here (rank(s) "
                                  f"{missing or extra} {'absent' if missing else 'beyond them'}): a rank did not "
                                  "finish saving, or an older save was overwritten", kind="missing_shard")
    else:
        if zero3:
            raise CheckpointError(folder / model_name, "a DeepSpeed ZeRO-3 checkpoint without its "
                                  "zero_pp_rank_*_optim_states.pt files: the parameters in its model states are "
                                  "empty placeholders (shape [0]); the weights live only in the optimizer files. "
                                  f"Copy them back, or {_consolidate(run, tag)}", kind="missing_shard")
        stage, world, states = (0 if param_groups is None else _config_stage(state)), 1, []
        if param_groups is not None:
            note(f"{folder}: no zero_pp_rank_*_optim_states.pt files; the fp32 master weights are not available, "
                 "the module weights are read")

    # ---- parameter names and shapes in the optimizer's flat order
    groups: list[list[tuple[str, tuple[int, ...]]]] = []
    if param_groups is not None:
        if not isinstance(param_groups, list | tuple) or not all(isinstance(g, Mapping) for g in param_groups):
            raise _bad(model.path, "param_shapes is not a list of {name: shape} dicts")
        groups = [[(str(n), _shape(s, f"the shape of {n}", model.path)) for n, s in g.items()] for g in param_groups]
    frozen_shapes_raw = state.get("frozen_param_shapes") or {}
    if not isinstance(frozen_shapes_raw, Mapping):
        raise _bad(model.path, "frozen_param_shapes is not a dict")
    frozen_shapes = {str(n): _shape(s, f"the shape of {n}", model.path) for n, s in frozen_shapes_raw.items()}

    master: dict[str, tuple[DeepSpeedPiece, ...]] = {}
    master_dtype: dict[str, str] = {}
    if stage in (1, 2) and optims:
        _zero12_master(optims, states, groups, world, master, master_dtype)
    elif stage == 3:
        _zero3_master(optims, states, groups, world, master, master_dtype)

    # ---- ZeRO-3 frozen parameters: each rank's fragment, from each rank's model states
    frozen_pieces: dict[str, tuple[DeepSpeedPiece, ...]] = {}
    frozen_dtype: dict[str, str] = {}
    if zero3 and frozen_shapes:
        missing = [r for r in range(world) if r not in zero3_models]
        if missing:
            raise CheckpointError(folder / f"zero_pp_rank_{missing[0]}_mp_rank_00_model_states.pt",
                                  "missing: the frozen parameters of a ZeRO-3 checkpoint are spread over every "
                                  "rank's model states", kind="missing_shard")
        models = [model] + [_Loaded(folder, zero3_models[r]) for r in range(1, world)]
        files.update({m.name: m.stamp for m in models})
        for name, shape in frozen_shapes.items():
            pieces, dtypes = [], set()
            for m in models:
                fragments = m.obj.get("frozen_param_fragments")
                if not isinstance(fragments, Mapping) or name not in fragments:
                    raise _bad(m.path, f"no frozen fragment of {name}")
                t = fragments[name]
                piece = m.piece(t, f"the frozen fragment of {name}")
                if len(piece.shape) != 1 or piece.stride is not None:
                    raise _bad(m.path, f"the frozen fragment of {name} is not a flat 1-D tensor")
                pieces.append(piece)
                dtypes.add(t.dtype)
            if len(dtypes) != 1:
                raise _bad(folder, f"the ranks' fragments of {name} differ in dtype")
            # the fragments end to end, in rank order, are the parameter and its padding
            if sum(p.numel for p in pieces) < math.prod(shape):
                raise _bad(folder, f"the ranks' fragments of {name} hold {sum(p.numel for p in pieces)} elements, "
                                   f"its shape {list(shape)} needs {math.prod(shape)}")
            frozen_pieces[name] = _trim(pieces, math.prod(shape))
            frozen_dtype[name] = dtype_name(dtypes.pop())

    # ---- the entries, in module order
    trainable = {n: s for g in groups for n, s in g}
    tensors: dict[str, DeepSpeedTensor] = {}
    buffers = set(buffer_names)
    for name, t in module.items():
        if name in shared and (shared[name] in trainable or shared[name] in frozen_shapes or shared[name] in module):
            continue  # a tied alias: read through the name that holds the data
        if not isinstance(t, torch.Tensor):
            continue  # not a tensor (a module's _extra_state object): nothing to audit
        shape = tuple(t.shape)
        if name in trainable or name in frozen_shapes:
            role = "parameter" if name in trainable else "frozen"
            full = trainable.get(name) or frozen_shapes[name]
            if zero3:
                if t.numel():
                    raise _bad(model.path, f"ZeRO-3 module entry {name} is not an empty placeholder")
                pieces = frozen_pieces.get(name, ())
                tensors[name] = DeepSpeedTensor(name, role, full, None if role == "parameter" else frozen_dtype[name],
                                                pieces, master_dtype.get(name), master.get(name, ()))
                continue
            if shape != full:
                raise _bad(model.path, f"module entry {name} has shape {list(shape)}, param_shapes says {list(full)}")
            tensors[name] = DeepSpeedTensor(name, role, shape, dtype_name(t.dtype),
                                            (model.piece(t, name),) if t.numel() else (),
                                            master_dtype.get(name), master.get(name, ()))
            continue
        if zero3 and not t.numel() and name not in buffers:
            raise CheckpointError(model.path, f"ZeRO-3 module entry {name} is an empty placeholder that neither "
                                              "param_shapes nor frozen_param_shapes accounts for; its weights cannot "
                                              f"be found; {_consolidate(run, tag)}", kind="unsupported")
        role = "buffer" if name in buffers else ("other" if param_groups is not None else "parameter")
        tensors[name] = DeepSpeedTensor(name, role, shape, dtype_name(t.dtype),
                                        (model.piece(t, name),) if t.numel() else (), None, ())
    for name in [*trainable, *frozen_shapes]:
        if name not in tensors and name not in shared:
            raise _bad(model.path, f"{name} is in param_shapes but not in module")
    if zero3:
        empty = [n for n, e in tensors.items() if e.numel and not (e.master or e.module)]
        if empty:
            raise _bad(model.path, f"no data found for {', '.join(empty[:3])}")

    step = _tag_step(tag)
    saved = state.get("global_steps")
    if step is None and isinstance(saved, int) and not isinstance(saved, bool):
        step = saved
    elif step is not None and isinstance(saved, int) and saved != step:
        note(f"{folder}: the tag says step {step}, the saved global_steps {saved}; the tag's step is used")
    return DeepSpeedIndex(folder, tag, step, latest, stage, world, True in prefixes, ds_version, tensors,
                          {k: v for k, v in shared.items() if v in tensors}, "master" if zero3 else "module", files)


def _autoep(state: Mapping[str, Any]) -> bool:
    """An AutoEP checkpoint whose experts are partitioned (zero_to_fp32.py refuses those too)."""
    for key in ("ds_autoep_layers", "autoep_layers"):
        layers = state.get(key)
        if isinstance(layers, list) and any(isinstance(d, Mapping) and d.get("checkpoint_format") == "zero3_partitioned"
                                            for d in layers):
            return True
    return False


def _config_stage(state: Mapping[str, Any]) -> int:
    """The stage a ZeRO 1-2 model-states file was saved with, from its ``ds_config`` (2 if unsaid)."""
    config = state.get("ds_config")
    zero = config.get("zero_optimization") if isinstance(config, Mapping) else None
    stage = zero.get("stage") if isinstance(zero, Mapping) else None
    return stage if isinstance(stage, int) and stage in (1, 2) else 2


def _flat_groups(optims: list[_Loaded], states: list[Mapping[str, Any]], key: str) -> list[list[DeepSpeedPiece]]:
    """Each rank's flat fp32 groups (``key``) as pieces, checked to be 1-D tensors of one dtype."""
    out = []
    for o, osd in zip(optims, states):
        groups = osd.get(key)
        if not isinstance(groups, list | tuple) or not groups:
            raise _bad(o.path, f"no {key} in optimizer_state_dict")
        pieces = [o.piece(t, f"{key}[{i}]") for i, t in enumerate(groups)]
        if any(len(p.shape) != 1 or p.stride is not None for p in pieces):
            raise _bad(o.path, f"{key} are not flat 1-D tensors")
        out.append(pieces)
    if len({len(g) for g in out}) != 1:
        raise _bad(optims[0].path.parent, f"the ranks' optimizer files hold different numbers of {key}")
    return out


def _dtype_of(optims: list[_Loaded], states: list[Mapping[str, Any]], key: str) -> str:
    dtypes = {t.dtype for osd in states for t in osd[key] if isinstance(t, torch.Tensor)}
    if len(dtypes) != 1:
        raise _bad(optims[0].path.parent, f"{key} mix dtypes {sorted(map(str, dtypes))}")
    return dtype_name(dtypes.pop())


def _take(segments: list[DeepSpeedPiece], start: int, count: int) -> list[DeepSpeedPiece]:
    """Elements ``[start, start + count)`` of the vector that ``segments`` (1-D pieces) form end to end."""
    out: list[DeepSpeedPiece] = []
    pos = 0
    for seg in segments:
        n = seg.numel
        lo, hi = max(start, pos), min(start + count, pos + n)
        if lo < hi:
            out.append(DeepSpeedPiece(seg.file, seg.storage, seg.storage_bytes, seg.start + lo - pos, (hi - lo,)))
        pos += n
    return out


def _trim(pieces: list[DeepSpeedPiece], count: int) -> tuple[DeepSpeedPiece, ...]:
    """The first ``count`` elements of ``pieces`` end to end (the rest is partition padding)."""
    return tuple(_take(pieces, 0, count))


def _zero12_master(optims: list[_Loaded], states: list[Mapping[str, Any]], groups: list[list[tuple[str, tuple[int, ...]]]],
                   world: int, master: dict[str, tuple[DeepSpeedPiece, ...]], master_dtype: dict[str, str]) -> None:
    """ZeRO 1/2: a group's vector is the ranks' partitions end to end; parameters lie in it in order."""
    key = "single_partition_of_fp32_groups"
    ranks = _flat_groups(optims, states, key)
    dtype = _dtype_of(optims, states, key)
    if len(ranks[0]) != len(groups):
        raise _bad(optims[0].path, f"{len(ranks[0])} fp32 groups but param_shapes lists {len(groups)}")
    paddings = states[0].get("param_alignment_paddings")
    if paddings is not None and (not isinstance(paddings, list | tuple) or len(paddings) != len(groups)):
        raise _bad(optims[0].path, "param_alignment_paddings does not list one entry per group")
    for g, shapes in enumerate(groups):
        segments = [ranks[r][g] for r in range(world)]
        avail = sum(s.numel for s in segments)
        pads = paddings[g] if paddings is not None else [0] * len(shapes)
        if not isinstance(pads, list | tuple) or len(pads) != len(shapes) or not all(
                isinstance(p, int) and p >= 0 for p in pads):
            raise _bad(optims[0].path, f"param_alignment_paddings[{g}] does not give one padding per parameter")
        offset = 0
        for (name, shape), pad in zip(shapes, pads):
            n = math.prod(shape)
            if offset + n > avail:
                raise _bad(optims[0].path, f"{name} lies beyond the {avail} fp32 elements of group {g}")
            master[name] = tuple(_take(segments, offset, n))
            master_dtype[name] = dtype
            offset += n + pad
        # DeepSpeed pads each group to a multiple of 2 * world size (as zero_to_fp32.py checks)
        align = 2 * world
        if math.ceil(offset / align) * align != math.ceil(avail / align) * align:
            raise CheckpointError(optims[0].path, f"the parameters of group {g} take {offset} fp32 elements, the "
                                                  f"partitions hold {avail}: a layout auditclip does not know; "
                                                  f"{_consolidate(optims[0].path.parent.parent, optims[0].path.parent.name)}",
                                  kind="unsupported")


def _zero3_master(optims: list[_Loaded], states: list[Mapping[str, Any]], groups: list[list[tuple[str, tuple[int, ...]]]],
                  world: int, master: dict[str, tuple[DeepSpeedPiece, ...]], master_dtype: dict[str, str]) -> None:
    """ZeRO-3: every parameter takes ceil(n / world) elements at one offset of every rank's flat groups."""
    key = "fp32_flat_groups"
    ranks = _flat_groups(optims, states, key)
    dtype = _dtype_of(optims, states, key)
    sizes = [[p.numel for p in r] for r in ranks]
    if any(s != sizes[0] for s in sizes):
        raise CheckpointError(optims[0].path.parent, f"the ranks' fp32 partitions differ in size ({sizes[:4]}): a "
                                                     "ZeRO-3 layout auditclip does not know; "
                                                     f"{_consolidate(optims[0].path.parent.parent, optims[0].path.parent.name)}",
                              kind="unsupported")
    per_rank = sum(sizes[0])
    offset = 0
    for name, shape in (p for g in groups for p in g):
        n = math.prod(shape)
        part = math.ceil(n / world)
        if offset + part > per_rank:
            raise _bad(optims[0].path, f"{name} lies beyond the {per_rank} fp32 elements of each rank")
        pieces = [p for r in range(world) for p in _take(ranks[r], offset, part)]
        master[name] = _trim(pieces, n)
        master_dtype[name] = dtype
        offset += part
    if offset != per_rank:  # zero_to_fp32.py's own check: every element accounted for
        raise CheckpointError(optims[0].path, f"the parameters take {offset} fp32 elements per rank, the partitions "
                                              f"hold {per_rank}: a ZeRO-3 layout auditclip does not know; "
                                              f"{_consolidate(optims[0].path.parent.parent, optims[0].path.parent.name)}",
                              kind="unsupported")


# --------------------------------------------------------------------------- data

def read_deepspeed_tensor(index: DeepSpeedIndex, name: str, source: str = "default") -> torch.Tensor:
    """The full tensor ``name``, read from the files (only its own bytes, with ``pread``).

    ``source``: ``"default"`` (:attr:`DeepSpeedIndex.default_source`: the module
    weights at ZeRO 0-2, the fp32 master copy at ZeRO-3), ``"module"`` (the weights the
    model runs with; refused for ZeRO-3 parameters, whose module entries are empty
    placeholders) or ``"master"`` (the fp32 master copy of a trainable parameter, as
    ``zero_to_fp32.py`` gives it; buffers and frozen parameters have none and come in
    their saved dtype, as there). A ZeRO-3 parameter is assembled from every rank's
    part; memory is this one tensor. A file changed since it was indexed is refused
    (``changed``).

    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> tag = Path(tempfile.mkdtemp()) / "global_step1"
    >>> tag.mkdir()
    >>> torch.save({"module": {"w": torch.tensor([1.5, 2.5], dtype=torch.float16)}, "buffer_names": [],
    ...             "param_shapes": None}, tag / "mp_rank_00_model_states.pt")
    >>> read_deepspeed_tensor(read_deepspeed_index(tag), "w", source="module")
    tensor([1.5000, 2.5000], dtype=torch.float16)
    """
    if source not in ("default", "module", "master"):
        raise InputError(f"source must be 'default', 'module' or 'master', not {source!r}")
    entry = index.tensor(name)
    if source == "default":
        source = index.default_source
    use_master = source == "master" and entry.role == "parameter"
    if use_master and not entry.master_dtype:
        raise CheckpointError(index.folder, f"{entry.name} has no fp32 master copy in this checkpoint (ZeRO stage "
                                            f"{index.zero_stage}, {index.world_size} optimizer file(s)): "
                                            + ("at ZeRO-0 DeepSpeed saves it as a list without names"
                                               if index.zero_stage == 0 else "the optimizer files are missing")
                                            + "; read the module weights", kind="unsupported")
    if not use_master and entry.role == "parameter" and entry.module_dtype is None:
        raise CheckpointError(index.folder, f"{entry.name} is an empty placeholder in the ZeRO-3 module states; its "
                                            "weights are the fp32 master copy (source='master')", kind="unsupported")
    pieces, dtype_text = (entry.master, entry.master_dtype) if use_master else (entry.module, entry.module_dtype)
    dtype = torch_dtype(dtype_text or "")
    if dtype is None:
        raise CheckpointError(index.folder, f"{entry.name} has the dtype {dtype_text}, unknown to this torch",
                              kind="unsupported")
    if sum(p.numel for p in pieces) != entry.numel:
        raise _bad(index.folder, f"the pieces of {entry.name} hold {sum(p.numel for p in pieces)} elements, "
                                 f"its shape {list(entry.shape)} {entry.numel}")
    if len(pieces) == 1 and pieces[0].shape == entry.shape:
        return _read_piece(index, pieces[0], dtype)
    full = torch.empty(entry.numel, dtype=dtype)
    pos = 0
    for piece in pieces:
        full[pos:pos + piece.numel].copy_(_read_piece(index, piece, dtype).reshape(-1))
        pos += piece.numel
    return full.view(entry.shape)


def _read_piece(index: DeepSpeedIndex, piece: DeepSpeedPiece, dtype: torch.dtype) -> torch.Tensor:
    path = index.folder / piece.file
    try:
        f = PinnedFile(path)
    except CheckpointError as exc:
        raise CheckpointError(path, exc.message, kind="missing_shard" if not path.exists() else "unreadable") from None
    try:
        stamp = f.stamp
        if index.files.get(piece.file, stamp) != stamp:
            raise CheckpointError(path, "changed since the checkpoint was indexed (size, time or inode differ): a "
                                        "trainer is probably still writing it", kind="changed")
        return read_strided(f, piece.storage, piece.storage_bytes, dtype, piece.shape, piece.stride, piece.start)
    finally:
        f.close()


def iter_deepspeed_tensors(index: DeepSpeedIndex, source: str = "default") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the checkpoint, in ``module`` order, read one at a time (see :func:`read_deepspeed_tensor`).

    With ``source="master"``, trainable parameters come as their fp32 master copy and
    buffers and frozen parameters as saved. Tied aliases are not repeated
    (:attr:`DeepSpeedIndex.shared`).

    >>> import tempfile, torch
    >>> from pathlib import Path
    >>> tag = Path(tempfile.mkdtemp()) / "global_step1"
    >>> tag.mkdir()
    >>> torch.save({"module": {"a": torch.ones(2), "b": torch.zeros(1)}, "buffer_names": [], "param_shapes": None},
    ...            tag / "mp_rank_00_model_states.pt")
    >>> [(name, t.tolist()) for name, t in iter_deepspeed_tensors(read_deepspeed_index(tag))]
    [('a', [1.0, 1.0]), ('b', [0.0])]
    """
    for name in index.tensors:
        yield name, read_deepspeed_tensor(index, name, source)


class DeepSpeedSource(Source):
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
        try:
            return read_deepspeed_tensor(self.index, raw, self._source)
        except CheckpointError:
            raise
        except (RuntimeError, ValueError, OverflowError, MemoryError) as exc:
            raise CheckpointError(self.path, f"cannot read tensor {raw!r}: {one_line(exc)}") from exc
