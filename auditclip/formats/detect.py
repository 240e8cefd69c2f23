"""Is this a checkpoint, and of which kind? The file-name knowledge of every format family.

Run discovery (:mod:`auditclip.checkpoints`) and clipping (:mod:`auditclip.clip_files`)
ask this module instead of matching names themselves, so that a new format (or a new
trainer-state file name) is taught in one place. Only names are looked at (and whether
a path is a folder); no tensor data is read.

>>> detect("run/checkpoint-5/optimizer.pt") is None
True
>>> detect("run/step_10.safetensors").format
'safetensors'
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from .dcp import dcp_folder
from .deepspeed import deepspeed_model_states, is_deepspeed_file, is_deepspeed_tag_folder
from .source import SAFETENSORS_SUFFIXES, TORCH_SUFFIXES

#: File names a Hugging Face (or DeepSpeed) checkpoint folder keeps its model weights in,
#: in order of preference when a folder holds more than one.
HF_WEIGHT_NAMES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
    "adapter_model.safetensors",
    "adapter_model.bin",
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin",
    "mp_rank_00_model_states.pt",
)

#: A PEFT adapter folder: its config, and the weights files peft writes, in the order it looks for them.
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")

#: Trainer state saved beside the weights: never model weights, never analysed.
TRAINER_STATE_FILES = re.compile(
    r"^(optimizer|scheduler|scaler|sampler|training_args|lr_scheduler)(_\d+)?(\.\w+)?\.(pt|bin|pth)$"
    r"|^rng_state(_\d+)?\.pth$|^.*optim_states\.pt$",
    re.IGNORECASE,
)

# What else a trainer saves to resume, beyond TRAINER_STATE_FILES: accelerate's RNG, custom
# objects and dataloader states, torchtune-style per-rank optimizer files. Not weight-like names,
# so discovery never meets them; clipping copies (or drops) them with the trainer state.
RESUME_STATE_FILES = re.compile(r"^(random_states|custom_checkpoint)_\d+\.pkl$|^dl_state_dict(_\d+)?\.bin$"
                                r"|^rank\d+-of-\d+-optimizer\.pt$", re.IGNORECASE)

# DeepSpeed's optimizer partitions: they hold the fp32 master weights, which a resume loads over
# the module's weights, so a copy beside clipped weights would silently undo the clip.
_MASTER_WEIGHTS = re.compile(r"optim_states\.pt$", re.IGNORECASE)

#: Lightning's ``last.ckpt``, ``last-v1.ckpt``: a copy (or link) of another checkpoint, or one more save.
LIGHTNING_LAST = re.compile(r"^last(?:-v\d+)?\.", re.IGNORECASE)

#: accelerate's ``save_state()`` names the weights of its 2nd, 3rd... prepared model ``model_1.safetensors``...
ACCELERATE_EXTRA_MODEL = re.compile(r"^(?:model|pytorch_model)_(\d+)\.(?:safetensors|bin)$")
#: accelerate's ``save_state()`` with FSDP ``SHARDED_STATE_DICT``: a DCP folder per model...
ACCELERATE_FSDP_MODEL = re.compile(r"^pytorch_model_fsdp_\d+$")
#: ... and one per optimizer: optimizer state only.
DCP_OPTIMIZER_FOLDER = re.compile(r"^optimizer(_\d+)?$")

#: Weight files of other frameworks, recognised by name and not read: (pattern, what it is and what to do).
FOREIGN_FORMATS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\.msgpack$", re.I), "Flax weights: convert them with transformers (FlaxModel weights load in "
                                       "PyTorch with from_pretrained(DIR, from_flax=True); save_pretrained() "
                                       "writes model.safetensors)"),
    (re.compile(r"\.(h5|keras)$", re.I), "TensorFlow/Keras weights: convert them with transformers "
                                          "(from_pretrained(DIR, from_tf=True), then save_pretrained())"),
    (re.compile(r"\.(index|data-\d+-of-\d+)$", re.I), "a TensorFlow checkpoint: convert it to PyTorch first"),
    (re.compile(r"\.gguf$", re.I), "GGUF (llama.cpp): quantised for inference, not read; audit the checkpoint "
                                   "it was converted from"),
    (re.compile(r"\.onnx$", re.I), "ONNX: not read; audit the PyTorch checkpoint it was exported from"),
    (re.compile(r"\.(npz|npy)$", re.I), "NumPy arrays: write them with safetensors.numpy.save_file(...) to audit them"),
    (re.compile(r"\.pdparams$", re.I), "PaddlePaddle weights: not read; convert them to safetensors"),
    (re.compile(r"\.distcp$", re.I), "a torch.distributed.checkpoint storage file: the checkpoint is its folder, "
                                     "which needs the .metadata file that indexes it (missing: the save did not "
                                     "finish, or .metadata was not copied)"),
)


def foreign_format(name: str) -> str | None:
    """What a file of a format auditclip recognises but does not read is, and what to do; else None.

    >>> foreign_format("model.gguf")
    'GGUF (llama.cpp): quantised for inference, not read; audit the checkpoint it was converted from'
    >>> foreign_format("model.safetensors") is None
    True
    """
    return next((what for pattern, what in FOREIGN_FORMATS if pattern.search(name)), None)


def describe_folder(folder: str | os.PathLike[str], limit: int = 4) -> str:
    """What a folder holding no checkpoint holds, by name (nothing is read): for "no checkpoints" errors.

    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> for name in ("optimizer.pt", "flax_model.msgpack", "notes.txt"):
    ...     _ = (folder / name).write_bytes(b"")
    >>> print(describe_folder(folder))
    flax_model.msgpack (Flax weights: convert them with transformers (FlaxModel weights load in PyTorch with from_pretrained(DIR, from_flax=True); save_pretrained() writes model.safetensors)); optimizer.pt (trainer state, not model weights); 1 other entry (notes.txt)
    >>> describe_folder(Path(tempfile.mkdtemp()))
    'nothing (an empty folder)'
    """
    folder = Path(folder)
    try:
        entries = sorted(folder.iterdir())
    except OSError as exc:
        return f"nothing readable ({exc.strerror or exc})"
    if not entries:
        return "nothing (an empty folder)"
    said: list[str] = []
    others: list[str] = []
    foreign_seen: set[str] = set()
    for entry in entries:
        name = entry.name
        what = foreign_format(name) if entry.is_file() else None
        if what is not None:
            if what not in foreign_seen:  # many .distcp files: one explanation
                foreign_seen.add(what)
                said.append(f"{name} ({what})")
        elif entry.is_file() and (is_trainer_state(name) or RESUME_STATE_FILES.match(name)):
            said.append(f"{name} (trainer state, not model weights)")
        elif entry.is_dir() and _optimizer_states_only(entry):
            said.append(f"{name}/ (a DeepSpeed tag folder with optimizer states but no model states "
                        "(*model_states.pt): the save did not finish, or was copied in part)")
        else:
            others.append(name + ("/" if entry.is_dir() else ""))
    if len(said) > limit:
        said = said[:limit] + [f"{len(said) - limit} more"]
    if others:
        shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
        said.append(f"{len(others)} other {'entry' if len(others) == 1 else 'entries'} ({shown})")
    return "; ".join(said)


def _optimizer_states_only(folder: Path) -> bool:
    try:
        names = [p.name for p in folder.iterdir()]
    except OSError:
        return False
    return any(_MASTER_WEIGHTS.search(n) for n in names) and not any(n.endswith("model_states.pt") for n in names)


#: Suffixes of a file that holds tensors itself (a shard, or a single-file checkpoint).
SHARD_SUFFIXES = SAFETENSORS_SUFFIXES + TORCH_SUFFIXES
INDEX_SUFFIX = ".index.json"


def is_trainer_state(name: str) -> bool:
    """True for a file a trainer saves beside the weights to resume (optimizer, scheduler, RNG, sampler...).

    Hugging Face ``Trainer`` (``optimizer.pt``, ``scheduler.pt``, ``scaler.pt``, ``rng_state*.pth``,
    ``training_args.bin``), accelerate's ``save_state`` (``optimizer*.bin``, ``scheduler*.bin``,
    ``sampler*.bin``, ``dl_state_dict*.bin``, ``random_states_<i>.pkl``, ``custom_checkpoint_<i>.pkl``)
    and DeepSpeed's ``*optim_states.pt``. ``trainer_state.json`` is the run's record (steps, logs) and
    is not counted: ``clip`` always keeps it.

    >>> [is_trainer_state(n) for n in ("optimizer.pt", "random_states_0.pkl", "trainer_state.json", "config.json")]
    [True, True, False, False]
    """
    return bool(TRAINER_STATE_FILES.match(name) or RESUME_STATE_FILES.match(name))


def is_master_weights(name: str) -> bool:
    """True for a DeepSpeed optimizer partition, which holds the fp32 master copy of the weights.

    >>> is_master_weights("zero_pp_rank_0_mp_rank_00_optim_states.pt"), is_master_weights("optimizer.pt")
    (True, False)
    """
    return bool(_MASTER_WEIGHTS.search(name))


def is_weight_file(path: str | os.PathLike[str]) -> bool:
    """True for a name that may hold model weights: a tensor file or a shard index, not trainer state.

    >>> [is_weight_file(n) for n in ("model.safetensors", "model.safetensors.index.json", "optimizer.pt", "a.txt")]
    [True, True, False, False]
    """
    name = Path(path).name
    if TRAINER_STATE_FILES.match(name):
        return False
    return name.lower().endswith(SHARD_SUFFIXES + (INDEX_SUFFIX,))


def index_stem(name: str) -> str:
    """The shard name prefix of a shard index's file name.

    >>> index_stem("model.safetensors.index.json"), index_stem("pytorch_model.bin.index.json")
    ('model', 'pytorch_model')
    """
    stem = name[: -len(INDEX_SUFFIX)]
    for suffix in SHARD_SUFFIXES:
        if stem.lower().endswith(suffix):
            return stem[: -len(suffix)]
    return stem


def shard_name_pattern(index_name: str) -> re.Pattern[str]:
    """The names Hugging Face gives the shards of an index (``model-00001-of-00002.safetensors``).

    >>> bool(shard_name_pattern("model.safetensors.index.json").match("model-00001-of-00002.safetensors"))
    True
    >>> bool(shard_name_pattern("model.safetensors.index.json").match("step_10.safetensors"))
    False
    """
    return re.compile(re.escape(index_stem(index_name)) + r"-\d+-of-\d+\.\w+$", re.IGNORECASE)


@dataclass(frozen=True)
class Detected:
    """What :func:`detect` found: the format family and the file (or folder) a reader opens.

    ``format`` is one of ``dcp`` (a ``torch.distributed.checkpoint`` folder), ``deepspeed`` (a
    tag folder, known by its rank 0 model states), ``peft`` (an adapter's weights beside its
    ``adapter_config.json``), ``sharded`` (a shard index), ``safetensors`` or ``torch``.
    ``container`` is the file family the tensors are stored in (``safetensors`` or ``torch``)
    where it applies, so a sharded index says which.
    """

    format: str
    weights: Path
    container: str | None = None


def _container(name: str) -> str:
    return "safetensors" if ".safetensors" in name.lower() else "torch"


def detect(path: str | os.PathLike[str]) -> Detected | None:
    """Whether ``path`` is a checkpoint, and of which kind; None for anything else.

    A folder is a checkpoint when it is a DCP folder or a DeepSpeed tag folder (a Hugging
    Face folder is not one by itself: discovery picks its weights with :data:`HF_WEIGHT_NAMES`).
    A file is one when named like weights and not like trainer state; a DeepSpeed states file
    or a DCP ``.metadata`` file stands for its folder. Only names are looked at.

    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> detect(folder) is None
    True
    >>> _ = (folder / ".metadata").write_bytes(b"")
    >>> detect(folder) == Detected("dcp", folder) == detect(folder / ".metadata")
    True
    >>> detect("run/model.safetensors.index.json")
    Detected(format='sharded', weights=PosixPath('run/model.safetensors.index.json'), container='safetensors')
    >>> detect("run/global_step3/mp_rank_00_model_states.pt").format
    'deepspeed'
    >>> [detect(n).format for n in ("epoch=1.ckpt", "w.bin")]
    ['torch', 'torch']
    >>> (folder / "adapter_config.json").write_text("{}") and (folder / "adapter_model.safetensors").touch()
    >>> detect(folder / "adapter_model.safetensors").format
    'peft'
    """
    path = Path(path)
    if path.is_dir():
        if dcp_folder(path) is not None:
            return Detected("dcp", path)
        if is_deepspeed_tag_folder(path):
            return Detected("deepspeed", deepspeed_model_states(path) or path)
        return None
    if is_deepspeed_file(path):  # one part of its tag folder, whatever the rank or the file
        return Detected("deepspeed", path)
    if TRAINER_STATE_FILES.match(path.name):
        return None
    folder = dcp_folder(path)
    if folder is not None:  # a DCP folder's .metadata: the folder is the checkpoint
        return Detected("dcp", folder)
    name = path.name.lower()
    if name.endswith(INDEX_SUFFIX):
        return Detected("sharded", path, _container(name))
    if not name.endswith(SHARD_SUFFIXES):
        return None
    if path.name in ADAPTER_WEIGHTS and (path.parent / ADAPTER_CONFIG).is_file():
        return Detected("peft", path, _container(name))
    return Detected(_container(name), path, _container(name))
