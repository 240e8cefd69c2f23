"""auditclip: audit the weights of a neural network across a training run.

>>> import auditclip
>>> run = auditclip.open_run("sample_checkpoints/high_lr")  # doctest: +SKIP
>>> auditclip.drift(run).head()  # doctest: +SKIP
"""

from ._version import __version__
from .analysis import AnalysisResult, analyze, drift, inspect_checkpoint, tensor_stats
from .checkpoints import Checkpoint, Run, open_run, parse_step
from .clip_files import clip_checkpoint, clip_run
from .clipping import clip_state_dict, clip_tensor
from .config import ClipSettings, ClipSpec, FlagSettings, clip_settings, flag_settings
from .flags import flag
from .evaluation import evaluate, sweep
from .audit import audit
from .errors import AuditclipError, CheckpointError, InputError, NoCheckpointsError
from .formats.readers import TensorInfo, TensorReader, open_checkpoint_file
from .stats import describe

inspect = inspect_checkpoint

__all__ = [
    "AnalysisResult", "AuditclipError", "Checkpoint", "CheckpointError", "InputError", "NoCheckpointsError",
    "Run", "TensorInfo", "TensorReader", "__version__", "analyze", "describe", "drift", "inspect",
    "inspect_checkpoint", "open_checkpoint_file", "open_run", "parse_step", "tensor_stats",
    "ClipSettings", "ClipSpec", "FlagSettings", "clip_checkpoint", "clip_run", "clip_settings", "clip_state_dict",
    "clip_tensor", "flag", "flag_settings", "evaluate", "sweep", "audit",
]
