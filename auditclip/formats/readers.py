"""The reader layer: :func:`open_checkpoint_file` gives one checkpoint's tensors by clean name, one at a time.

Each format family reads its own files and gives a :class:`~auditclip.formats.source.Source`
(raw tensors by stored name); this module picks the family for a path and wraps its
source in a :class:`TensorReader` (clean names, infos, tied aliases, the kinds the
format records):

* ``.safetensors``: :mod:`auditclip.formats.safetensors` (header validated, ``pread``);
* sharded checkpoints through their ``*.index.json``: :mod:`auditclip.formats.index`;
* PyTorch pickles (``.pt/.pth/.bin/.ckpt``): :mod:`auditclip.formats.torch_pickle`
  (meta-device unpickling, never running code; the gated unpickler of
  :mod:`auditclip.formats.safe_pickle` for foreign objects);
* ``torch.distributed.checkpoint`` folders: :mod:`auditclip.formats.dcp`;
* DeepSpeed checkpoints (a tag folder, a file of one, a run folder with ``latest``):
  :mod:`auditclip.formats.deepspeed`.

Every read goes through :class:`~auditclip.formats.pinned.PinnedFile` (``pread``, a file
changed while read is ``changed``, never half old, half new). Names are normalised
(:func:`~auditclip.formats.source.normalize_names`) so the same model saved by
different wrappers compares equal.

The names other modules used to import from here (``PinnedFile``, ``load_torch_file``,
``read_shard_index``...) are re-exported; new code imports them from their family's module.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError
from .dcp import DcpSource, dcp_folder
from .detect import foreign_format
from .deepspeed import DeepSpeedSource, is_deepspeed_file, is_deepspeed_run, is_deepspeed_tag_folder
from .dtypes import dtype_name, is_float_dtype
from .index import ShardIndex, ShardedSource, read_shard_index
from .index import read_checkpoint_metadata as read_safetensors_metadata
from .pinned import PinnedFile, read_strided
from .safetensors import SafetensorsSource, read_safetensors_header
from .source import SAFETENSORS_SUFFIXES, TORCH_SUFFIXES, Source, normalize_names, one_line
from .torch_pickle import (TorchSource, allow_globals, find_state_dict, load_torch_file, load_torch_meta, note_copies,
                           note_tied, pickle_globals, storage_identity, tensor_slots, tensors_of, untie, weight_copies,
                           zip_byteorder)

__all__ = ["TensorInfo", "TensorReader", "dtype_name", "is_float_dtype", "open_checkpoint_file"]
#: re-exported for the modules that imported them from here (see the module docstring)
_REEXPORTED = (PinnedFile, read_strided, SAFETENSORS_SUFFIXES, TORCH_SUFFIXES, ShardIndex, read_shard_index,
               read_safetensors_metadata, read_safetensors_header, allow_globals, find_state_dict, load_torch_file,
               load_torch_meta, note_copies, note_tied, pickle_globals, storage_identity, tensor_slots, tensors_of,
               untie, weight_copies, zip_byteorder, normalize_names)


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


def _is_deepspeed(path: Path) -> bool:
    """A DeepSpeed checkpoint by its names: a model/optimizer-states file, a tag folder, a run folder."""
    if path.is_dir():
        return is_deepspeed_tag_folder(path) or is_deepspeed_run(path)
    return is_deepspeed_file(path)


def _open_source(path: Path, key: str | None) -> Source:
    folder = dcp_folder(path)
    if folder is not None:
        return DcpSource(folder, key)
    if _is_deepspeed(path):  # never the model-states file alone: ZeRO-3's holds only placeholders
        return DeepSpeedSource(path, key)
    name = path.name.lower()
    if name.endswith(".index.json"):
        return ShardedSource(path, key, _open_source)
    if name.endswith(SAFETENSORS_SUFFIXES):
        return SafetensorsSource(path)
    if name.endswith(TORCH_SUFFIXES):
        return TorchSource(path, key)
    foreign = foreign_format(path.name)
    if foreign is not None:  # a format recognised by name, not read: say which, and what to do
        raise CheckpointError(path, foreign, kind="unsupported")
    raise CheckpointError(path, "unknown checkpoint format (expected .safetensors, .pt, .pth, .bin, .ckpt or *.index.json)")


class TensorReader:
    """One checkpoint's tensors by clean name, read lazily one at a time.

    >>> with open_checkpoint_file("sample_checkpoints/high_lr/epoch_01.safetensors") as r:  # doctest: +SKIP
    ...     r.info("net.0.weight")
    TensorInfo(name='net.0.weight', dtype='float32', shape=(64, 64))
    """

    def __init__(self, source: Source) -> None:
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
            raise CheckpointError(self.path, f"cannot read the header of {name!r}: {one_line(exc)}") from exc
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
    tensors (:class:`DcpSource`). A DeepSpeed tag folder (``global_step<N>/``), a
    ``*model_states.pt``/``*optim_states.pt`` file in one, or a run folder with
    ``latest`` gives the model's tensors of that tag (:class:`DeepSpeedSource`;
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
