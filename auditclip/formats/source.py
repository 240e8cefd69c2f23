"""What every format family's reader gives the :class:`~auditclip.formats.readers.TensorReader`: a :class:`Source`.

A source is raw access to one checkpoint's tensors by their stored names (no name
cleaning, no selection): the safetensors, torch-pickle, sharded-index, DCP and
DeepSpeed families each implement one in their own module. :func:`normalize_names`
is the one name-cleaning rule they all share: the same model saved by different
wrappers compares equal (a leading ``module.`` (DDP) is dropped when every name has
it, ``_orig_mod.`` (``torch.compile``) segments wherever they occur).
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["SAFETENSORS_SUFFIXES", "Source", "TORCH_SUFFIXES", "normalize_names", "one_line"]

#: The file families by suffix (``formats.detect`` builds its rules on them).
SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


class Source:
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


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (its type's name when it has none).

    >>> one_line(ValueError("a\\n  b"))
    'a b'
    """
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


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
