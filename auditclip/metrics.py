"""Metrics over a whole held-out set, weighted by samples (not averaged per batch).

The task is inferred from the targets: integer class labels -> classification
(``loss`` = cross-entropy, ``accuracy``, ``top5_accuracy`` with more than 5
classes); float targets -> regression (``loss`` = MSE, ``mae``); logits
``[B, T, V]`` against token labels ``[B, T]`` -> ``lm`` (token-weighted ``loss``,
``perplexity``, next-token ``accuracy``: :mod:`auditclip.lm`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .errors import InputError

TASKS = ("auto", "classification", "regression", "lm")
CustomMetric = Callable[[torch.Tensor, torch.Tensor], Mapping[str, float]]
#: names a custom metric may not use: the built-in metrics and the columns of evaluation.csv/sweep.csv
RESERVED = frozenset({"loss", "perplexity", "accuracy", "top5_accuracy", "mae", "checkpoint", "step", "variant", "setting",
                      "n_clipped", "frac_clipped", "recommended", "n_loaded",
                      "n_model_tensors", "kind_rule", "primary_metric"})


class NamedMetric:
    """A custom metric with the ``--metric`` reference it came from, for messages."""

    def __init__(self, fn: CustomMetric, ref: str) -> None:
        self.fn, self.ref = fn, ref

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor) -> Mapping[str, float]:
        return self.fn(outputs, targets)


def metric_name(fn: Any) -> str:
    """How messages name a custom metric: its ``--metric`` reference, else its Python name."""
    return getattr(fn, "ref", None) or getattr(fn, "__qualname__", None) or repr(fn)


def _number(value: Any) -> float | None:
    """A metric value as a float, or None when it is not one number."""
    if isinstance(value, (str, bytes)):
        return None
    try:
        return float(value)
    except Exception:
        return None


def model_outputs(out: Any) -> torch.Tensor:
    """The prediction tensor inside what a model returned: tensor, tuple (first), or ``logits``."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping) or hasattr(out, "logits"):
        logits = out["logits"] if isinstance(out, Mapping) and "logits" in out else getattr(out, "logits", None)
        if isinstance(logits, torch.Tensor):
            return logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise InputError(f"the model returned a {type(out).__name__}; expected a tensor, a tuple or an output with logits")


class MetricTotals:
    """Accumulates sample-weighted sums for one evaluation.

    >>> m = MetricTotals("classification")
    >>> m.update(torch.tensor([[2.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0]))
    >>> m.result()["accuracy"]
    0.5
    """

    def __init__(self, task: str, custom: tuple[CustomMetric, ...] = ()) -> None:
        self.task, self.custom = task, custom
        self.n = 0
        self.tokens = 0  # lm: scored tokens, the weight of loss and accuracy
        self.sums: dict[str, float] = {}
        self._keys: dict[int, set[str]] = {}  # position of a custom metric -> the names it returns

    def _add(self, key: str, value: float) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + value

    def update(self, outputs: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None,
               shift: bool = False) -> None:
        """Add one batch; ``mask`` (attention mask) and ``shift`` (causal LM) for the ``lm`` task only."""
        n = len(targets)
        if self.task == "lm":
            from .lm import token_sums

            sums = token_sums(outputs.detach(), targets, mask, shift)
            self._add("loss", sums.loss)
            self._add("accuracy", float(sums.correct))
            self.tokens += sums.tokens
        elif self.task == "classification":
            outputs = outputs.detach().to(torch.float64)
            if outputs.dim() != 2 or outputs.shape[0] != n:
                raise InputError(f"outputs of shape {list(outputs.shape)} do not fit {n} class labels "
                                 "(expected [batch, classes])")
            if targets.dim() != 1:
                raise InputError(f"class labels of shape {list(targets.shape)}: expected one label per sample "
                                 "(shape [batch]); for one-hot or multi-output targets use --task regression")
            targets = targets.long()
            if int(targets.max()) >= outputs.shape[1] or int(targets.min()) < 0:
                raise InputError(f"a class label is outside the model's {outputs.shape[1]} outputs")
            self._add("loss", float(torch.nn.functional.cross_entropy(outputs, targets, reduction="sum")))
            self._add("accuracy", float((outputs.argmax(1) == targets).sum()))
            if outputs.shape[1] > 5:
                top5 = outputs.topk(5, dim=1).indices
                self._add("top5_accuracy", float((top5 == targets[:, None]).any(1).sum()))
        else:
            outputs = outputs.detach().to(torch.float64)
            targets = targets.to(torch.float64).reshape(outputs.shape) if targets.numel() == outputs.numel() else None
            if targets is None:
                raise InputError(f"outputs of shape {list(outputs.shape)} do not fit the regression targets")
            per_sample = outputs.numel() // max(n, 1)
            self._add("loss", float(((outputs - targets) ** 2).sum()) / per_sample)
            self._add("mae", float((outputs - targets).abs().sum()) / per_sample)
        for i in range(len(self.custom)):
            for key, value in self._custom(i, outputs, targets).items():
                self._add(key, value * n)
        self.n += n

    def _custom(self, i: int, outputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        """Call custom metric ``i``; anything but a mapping of names to numbers is an InputError naming it."""
        fn = self.custom[i]
        name = metric_name(fn)
        try:
            got = fn(outputs, targets)
        except KeyboardInterrupt:
            raise
        except InputError:
            raise
        except BaseException as exc:  # the user's code may raise anything, SystemExit included
            from .modelref import raised

            raise InputError(f"--metric {name}: {raised(exc)}") from exc
        if not isinstance(got, Mapping):
            raise InputError(f"--metric {name}: returned a {type(got).__name__}; "
                             "expected a dict of metric names to numbers, e.g. {'margin': 0.3}")
        out: dict[str, float] = {}
        for key, value in got.items():
            if not isinstance(key, str) or not key:
                raise InputError(f"--metric {name}: metric name {key!r} is not a non-empty string")
            if key in RESERVED or key.startswith("delta_"):
                raise InputError(f"--metric {name}: metric name {key!r} is taken by auditclip; rename it")
            number = _number(value)
            if number is None:
                raise InputError(f"--metric {name}: {key!r} is a {type(value).__name__}, not a number")
            out[key] = number
        keys = self._keys.setdefault(i, set(out))
        if keys != set(out):  # a name missing from some batches would be averaged over the wrong count
            raise InputError(f"--metric {name}: returned names {sorted(out)} for one batch but {sorted(keys)} "
                             "for another; return the same names for every batch")
        for j, other in self._keys.items():  # two metrics must not add into the same column
            if j != i and other & keys:
                raise InputError(f"--metric {name}: {sorted(other & keys)[0]!r} is also returned by "
                                 f"--metric {metric_name(self.custom[j])}; rename one of them")
        return out

    def result(self) -> dict[str, float]:
        if self.n == 0:
            raise InputError("the held-out data is empty")
        if self.task == "lm":  # token-weighted; custom metrics stay sequence-weighted
            from .lm import lm_result

            built = lm_result(self.sums["loss"], self.tokens, int(self.sums["accuracy"]))
            return {**built, **{k: v / self.n for k, v in self.sums.items() if k not in built}}
        return {k: v / self.n for k, v in self.sums.items()}


def infer_task(targets: torch.Tensor, outputs: torch.Tensor | None = None) -> str:
    """``classification`` for integer (or bool) labels, ``regression`` for floats, ``lm`` for
    ``[B, T, V]`` outputs against integer ``[B, T]`` labels.

    >>> infer_task(torch.tensor([0, 3])), infer_task(torch.tensor([0.5]))
    ('classification', 'regression')
    >>> infer_task(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, 9))
    'lm'
    """
    from .lm import is_token_output

    if outputs is not None and is_token_output(outputs, targets):
        return "lm"
    return "regression" if targets.is_floating_point() else "classification"


def primary_metric(task: str) -> str:
    """The metric sweeps and recommendations judge by: accuracy, or loss for regression and language models."""
    return "accuracy" if task == "classification" else "loss"


#: built-in metrics and whether higher is better
DIRECTIONS = {"accuracy": True, "top5_accuracy": True, "loss": False, "perplexity": False, "mae": False}


@dataclass(frozen=True)
class Primary:
    """The metric a ``--tolerance`` applies to, and how.

    Accuracies (higher is better) are judged in percentage points, default 0.5; any
    other metric in percent of the original's magnitude, default 1.

    >>> p = Primary("loss", higher=False)
    >>> p.keeps(1.0, 1.009, None), p.keeps(1.0, 1.02, None), p.describe(None)
    (True, False, 'loss (lower is better), tolerance 1 % of the original')
    """

    name: str
    higher: bool

    @property
    def points(self) -> bool:
        return self.name in ("accuracy", "top5_accuracy")

    def tolerance(self, tolerance: float | None) -> float:
        return tolerance if tolerance is not None else (0.5 if self.points else 1.0)

    def keeps(self, base: float, value: float, tolerance: float | None) -> bool:
        """True when ``value`` is within the tolerance of the original ``base``."""
        tol = self.tolerance(tolerance)
        if math.isnan(value) or math.isnan(base):
            return False
        if self.points:
            return (base - value) * 100 <= tol + 1e-12
        room = abs(base) * tol / 100 + 1e-15
        return value >= base - room if self.higher else value <= base + room

    def describe(self, tolerance: float | None) -> str:
        unit = "percentage points" if self.points else "% of the original"
        return (f"{self.name} ({'higher' if self.higher else 'lower'} is better), "
                f"tolerance {self.tolerance(tolerance):g} {unit}")


def resolve_primary(choice: str | None, task: str, available: list[str]) -> Primary:
    """The ``--primary-metric`` choice among the ``available`` metrics (None: the task's default).

    A custom metric's direction is not known, so it is named ``NAME:higher`` or ``NAME:lower``.

    >>> resolve_primary(None, "regression", ["loss", "mae"]).name
    'loss'
    >>> resolve_primary("margin:higher", "classification", ["loss", "accuracy", "margin"]).higher
    True
    """
    name, _, direction = (choice or primary_metric(task)).partition(":")
    name = name.strip()
    if name not in available:
        raise InputError(f"--primary-metric {choice}: not a metric of this evaluation; "
                         f"available: {', '.join(available)}")
    if direction:
        if direction not in ("higher", "lower"):
            raise InputError(f"--primary-metric {choice}: write NAME:higher or NAME:lower (which is better)")
        if name in DIRECTIONS and DIRECTIONS[name] != (direction == "higher"):
            raise InputError(f"--primary-metric {choice}: {name} is better when "
                             f"{'higher' if DIRECTIONS[name] else 'lower'}")
        return Primary(name, direction == "higher")
    if name not in DIRECTIONS:
        raise InputError(f"--primary-metric {choice}: say which is better for a custom metric: "
                         f"{name}:higher or {name}:lower")
    return Primary(name, DIRECTIONS[name])


def load_custom_metric(ref: str) -> CustomMetric:
    """``module:fn`` or ``file.py:fn`` with ``fn(outputs, targets) -> dict[str, float]``."""
    from .modelref import load_factory

    return NamedMetric(load_factory(ref, "--metric"), ref)
