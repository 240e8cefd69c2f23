"""auditclip: audit the weights of a neural network across a training run.

The public names below are imported when first used (PEP 562), so that
``auditclip --version`` and ``--help`` start without loading torch, pandas or scipy.

>>> import auditclip
>>> run = auditclip.open_run("sample_checkpoints/high_lr")  # doctest: +SKIP
>>> auditclip.drift(run).head()  # doctest: +SKIP
"""

from __future__ import annotations

import sys
import types
from importlib import import_module
from typing import TYPE_CHECKING, Any

from ._version import __version__

#: public name -> the module that defines it
_WHERE = {
    "AnalysisResult": "analysis", "analyze": "analysis", "drift": "analysis", "inspect_checkpoint": "analysis",
    "tensor_stats": "analysis", "inspect": "analysis",
    "Checkpoint": "checkpoints", "Run": "checkpoints", "open_run": "checkpoints", "parse_step": "checkpoints",
    "clip_checkpoint": "clip_files", "clip_run": "clip_files",
    "clip_state_dict": "clipping", "clip_tensor": "clipping",
    "ClipSettings": "config", "ClipSpec": "config", "FlagSettings": "config", "clip_settings": "config",
    "flag_settings": "config",
    "flag": "flags", "evaluate": "evaluation", "sweep": "evaluation", "audit": "audit",
    "AuditclipError": "errors", "CheckpointError": "errors", "InputError": "errors", "NoCheckpointsError": "errors",
    "TensorInfo": "formats.readers", "TensorReader": "formats.readers", "open_checkpoint_file": "formats.readers",
    "describe": "stats",
}

__all__ = [
    "AnalysisResult", "AuditclipError", "Checkpoint", "CheckpointError", "InputError", "NoCheckpointsError",
    "Run", "TensorInfo", "TensorReader", "__version__", "analyze", "describe", "drift", "inspect",
    "inspect_checkpoint", "open_checkpoint_file", "open_run", "parse_step", "tensor_stats",
    "ClipSettings", "ClipSpec", "FlagSettings", "clip_checkpoint", "clip_run", "clip_settings", "clip_state_dict",
    "clip_tensor", "flag", "flag_settings", "evaluate", "sweep", "audit",
]


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is None:
        try:  # a submodule (``auditclip.stats``), as when this package imported them all
            return import_module(f".{name}", __name__)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module 'auditclip' has no attribute {name!r}") from None
    value = getattr(import_module(f".{where}", __name__), "inspect_checkpoint" if name == "inspect" else name)
    globals()[name] = value  # found once; later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """The package module: a submodule named like a public function (``audit``) does not hide it."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _WHERE and isinstance(value, types.ModuleType):
            return  # importing auditclip.audit must not replace auditclip.audit(); the module stays in sys.modules
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


if TYPE_CHECKING:  # what type checkers and IDEs see: the same names, imported eagerly
    from .analysis import AnalysisResult, analyze, drift, inspect_checkpoint, tensor_stats
    from .analysis import inspect_checkpoint as inspect
    from .audit import audit
    from .checkpoints import Checkpoint, Run, open_run, parse_step
    from .clip_files import clip_checkpoint, clip_run
    from .clipping import clip_state_dict, clip_tensor
    from .config import ClipSettings, ClipSpec, FlagSettings, clip_settings, flag_settings
    from .errors import AuditclipError, CheckpointError, InputError, NoCheckpointsError
    from .evaluation import evaluate, sweep
    from .flags import flag
    from .formats.readers import TensorInfo, TensorReader, open_checkpoint_file
    from .stats import describe
