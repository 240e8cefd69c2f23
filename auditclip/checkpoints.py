"""Find the checkpoints of a training run and put them in step order.

A run is given as a directory of checkpoint files, a directory of checkpoint
folders (Hugging Face ``checkpoint-<step>/``), a glob, or explicit paths. Each
checkpoint gets a ``label`` (its path relative to the run) and a ``step``
parsed from its name (``step_900``, ``ckpt-0001000``, ``checkpoint-500``,
``epoch=3-step=48.ckpt``), else from a ``step``/``global_step`` entry in its
safetensors metadata or ``trainer_state.json``.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError, NoCheckpointsError
from .readers import SAFETENSORS_SUFFIXES, TORCH_SUFFIXES, TensorReader, open_checkpoint_file, read_safetensors_metadata

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

# Trainer state saved beside the weights: never model weights, never analysed.
_TRAINER_STATE = re.compile(
    r"^(optimizer|scheduler|scaler|training_args|lr_scheduler)(\.\w+)?\.(pt|bin|pth)$"
    r"|^rng_state(_\d+)?\.pth$|^.*optim_states\.pt$",
    re.IGNORECASE,
)

_STEP_PATTERNS = (
    re.compile(r"step[=_-]?(\d+)", re.IGNORECASE),
    re.compile(r"checkpoint[=_-](\d+)", re.IGNORECASE),
    re.compile(r"ckpt[=_-]?(\d+)", re.IGNORECASE),
    re.compile(r"iter(?:ation)?[=_-]?(\d+)", re.IGNORECASE),
)

SORT_MODES = ("step", "name", "mtime")
_GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint of a run.

    ``path`` is what the user sees (a file, a shard index or a folder);
    ``weights`` is the file actually opened (the folder's ``model.safetensors``...).
    """

    path: Path
    weights: Path
    label: str
    step: int | None = None

    def open(self, key: str | None = None) -> TensorReader:
        """Open the checkpoint for lazy reading (see :func:`open_checkpoint_file`)."""
        return open_checkpoint_file(self.weights, key)

    @property
    def format(self) -> str:
        name = self.weights.name.lower()
        kind = "safetensors" if ".safetensors" in name else "pytorch"
        return f"{kind} (sharded)" if name.endswith(".index.json") else kind


@dataclass
class Run:
    """The checkpoints of one training run, in order.

    >>> run = open_run("sample_checkpoints/high_lr")  # doctest: +SKIP
    >>> [c.step for c in run][:3]  # doctest: +SKIP
    [23, 46, 69]
    """

    checkpoints: list[Checkpoint]
    root: Path
    key: str | None = None
    ignored: list[Path] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.checkpoints)

    def __iter__(self) -> Iterator[Checkpoint]:
        return iter(self.checkpoints)

    def __getitem__(self, i: int) -> Checkpoint:
        return self.checkpoints[i]

    @property
    def labels(self) -> list[str]:
        return [c.label for c in self.checkpoints]


def natural_key(text: str) -> tuple[tuple[int, int, str], ...]:
    """Sort key putting ``step_9`` before ``step_10``.

    >>> sorted(["step_10", "step_9", "step_1"], key=natural_key)
    ['step_1', 'step_9', 'step_10']
    """
    return tuple(
        (0, int(part), "") if part.isdigit() else (1, 0, part.lower())
        for part in re.split(r"(\d+)", text)
        if part
    )


def parse_step(label: str) -> int | None:
    """The training step a checkpoint's name carries, or None.

    The match nearest the end of the label wins, so ``run3/checkpoint-500`` is 500.

    >>> [parse_step(n) for n in ["step_900.pt", "ckpt-0001000", "checkpoint-500/model.safetensors",
    ...                          "epoch=3-step=48.ckpt", "final.pt"]]
    [900, 1000, 500, 48, None]
    """
    best: tuple[int, int] | None = None
    for pattern in _STEP_PATTERNS:
        for m in pattern.finditer(label):
            if best is None or m.start() > best[0]:
                best = (m.start(), int(m.group(1)))
    return None if best is None else best[1]


def _metadata_step(weights: Path) -> int | None:
    folder = weights.parent
    state = folder / "trainer_state.json"
    candidates: dict[str, object] = {}
    if weights.name in HF_WEIGHT_NAMES and state.is_file():
        try:
            candidates = json.loads(state.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            candidates = {}
    if not candidates:
        candidates = dict(read_safetensors_metadata(weights))
    for key in ("step", "global_step"):
        try:
            value = float(str(candidates[key]))
        except (KeyError, ValueError):
            continue
        if value.is_integer():
            return int(value)
    return None


def _is_weight_file(path: Path) -> bool:
    name = path.name.lower()
    if _TRAINER_STATE.match(path.name):
        return False
    return name.endswith(SAFETENSORS_SUFFIXES + TORCH_SUFFIXES) or name.endswith(".index.json")


def _weight_files(directory: Path) -> tuple[list[Path], list[Path]]:
    """Checkpoint files directly in ``directory`` (shards folded into their index), and ignored ones."""
    files = sorted((p for p in directory.iterdir() if p.is_file()), key=lambda p: natural_key(p.name))
    claimed: set[Path] = set()
    for index in (p for p in files if p.name.endswith(".index.json")):
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map") or {}
            claimed.update(directory / str(shard) for shard in weight_map.values())
        except (OSError, ValueError, AttributeError):
            pass  # a broken index is reported when the checkpoint is read
    weights = [p for p in files if p not in claimed and _is_weight_file(p)]
    ignored = [p for p in files if _TRAINER_STATE.match(p.name)]
    return weights, ignored


def _folder_weights(directory: Path) -> Path | None:
    """The model weights of a Hugging Face style checkpoint folder, or None if it is not one."""
    weights, _ = _weight_files(directory)
    names = {p.name for p in weights}
    if not names or not names <= set(HF_WEIGHT_NAMES):
        return None
    return next(directory / n for n in HF_WEIGHT_NAMES if n in names)


def _expand_directory(directory: Path) -> tuple[list[tuple[Path, Path]], list[Path]]:
    subfolders = sorted((p for p in directory.iterdir() if p.is_dir()), key=lambda p: natural_key(p.name))
    found: list[tuple[Path, Path]] = []
    ignored: list[Path] = []
    for sub in subfolders:
        weights = _folder_weights(sub)
        if weights is not None:
            found.append((sub, weights))
            ignored += _weight_files(sub)[1]
    own = _folder_weights(directory)
    if not found and own is not None:  # the directory is itself one checkpoint folder
        return [(directory, own)], _weight_files(directory)[1]
    files, skipped = _weight_files(directory)
    found += [(p, p) for p in files]
    return found, ignored + skipped


def _expand(inputs: Sequence[str | os.PathLike[str]]) -> tuple[list[tuple[Path, Path]], list[Path], Path | None]:
    found: list[tuple[Path, Path]] = []
    ignored: list[Path] = []
    root: Path | None = None
    for raw in inputs:
        text = os.fspath(raw)
        path = Path(text)
        if path.exists():
            matches = [path]
        elif _GLOB_CHARS.search(text):
            matches = [Path(m) for m in sorted(glob.glob(text, recursive=True), key=natural_key)]
            if not matches:
                raise NoCheckpointsError(f"no file matches {text!r}; check the pattern (quote it so the shell leaves it alone)")
        else:
            raise InputError(f"no such file or directory: {text}")
        for match in matches:
            if match.is_dir():
                entries, skipped = _expand_directory(match)
                if not entries:
                    raise NoCheckpointsError(
                        f"no checkpoints in {match} (looked for .safetensors, .pt, .pth, .bin, .ckpt, "
                        "*.index.json and checkpoint-*/ folders); pass the folder that holds them or a glob"
                    )
                if len(inputs) == 1 and len(matches) == 1 and entries[0][0] != match:
                    root = match  # labels are relative to the run directory the user named
                found += entries
                ignored += skipped
            elif _TRAINER_STATE.match(match.name):
                ignored.append(match)  # optimizer.pt & co. from a glob such as checkpoint-*/*.pt
            else:
                found.append((match, match))
    return found, ignored, root


def open_run(
    paths: str | os.PathLike[str] | Iterable[str | os.PathLike[str]] | Run,
    *,
    sort: str = "step",
    key: str | None = None,
) -> Run:
    """Find the checkpoints of a run and order them.

    ``paths``: a directory, a glob, a checkpoint, or a list of those.
    ``sort``: ``step`` (parsed from names, then metadata; checkpoints without a
    step come last, by name), ``name`` (natural order) or ``mtime``.
    ``key``: the container entry holding the state dict (``ema``...).

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
    found, ignored, root = _expand(inputs)
    if not found:
        raise NoCheckpointsError(f"no checkpoints among {', '.join(map(str, inputs))}")
    unique = list(dict.fromkeys(found))
    if root is None:
        root = Path(os.path.commonpath([str(p.absolute().parent) for p, _ in unique]))
    checkpoints = []
    for path, weights in unique:
        label = Path(os.path.relpath(path.absolute(), root.absolute())).as_posix()
        step = parse_step(label)
        if step is None:
            step = _metadata_step(weights)
        checkpoints.append(Checkpoint(path=path, weights=weights, label=label, step=step))
    checkpoints.sort(key=_sort_key(sort))
    return Run(checkpoints=checkpoints, root=root, key=key, ignored=ignored)


def _sort_key(sort: str):  # type: ignore[no-untyped-def]
    if sort == "name":
        return lambda c: natural_key(c.label)
    if sort == "mtime":
        return lambda c: (c.weights.stat().st_mtime, natural_key(c.label))
    return lambda c: (c.step is None, c.step or 0, natural_key(c.label))
