"""Metrics over a whole held-out set, weighted by samples (not averaged per batch).

The task is inferred from the targets: integer class labels -> classification
(``loss`` = cross-entropy, ``accuracy``, ``top5_accuracy`` with more than 5
classes); float targets -> regression (``loss`` = MSE, ``mae``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from .errors import InputError

TASKS = ("auto", "classification", "regression")
CustomMetric = Callable[[torch.Tensor, torch.Tensor], Mapping[str, float]]


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
        self.sums: dict[str, float] = {}

    def _add(self, key: str, value: float) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + value

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        n = len(targets)
        outputs = outputs.detach().to(torch.float64)
        if self.task == "classification":
            if outputs.dim() != 2 or outputs.shape[0] != n:
                raise InputError(f"outputs of shape {list(outputs.shape)} do not fit {n} class labels "
                                 "(expected [batch, classes])")
            targets = targets.long()
            if int(targets.max()) >= outputs.shape[1] or int(targets.min()) < 0:
                raise InputError(f"a class label is outside the model's {outputs.shape[1]} outputs")
            self._add("loss", float(torch.nn.functional.cross_entropy(outputs, targets, reduction="sum")))
            self._add("accuracy", float((outputs.argmax(1) == targets).sum()))
            if outputs.shape[1] > 5:
                top5 = outputs.topk(5, dim=1).indices
                self._add("top5_accuracy", float((top5 == targets[:, None]).any(1).sum()))
        else:
            targets = targets.to(torch.float64).reshape(outputs.shape) if targets.numel() == outputs.numel() else None
            if targets is None:
                raise InputError(f"outputs of shape {list(outputs.shape)} do not fit the regression targets")
            per_sample = outputs.numel() // max(n, 1)
            self._add("loss", float(((outputs - targets) ** 2).sum()) / per_sample)
            self._add("mae", float((outputs - targets).abs().sum()) / per_sample)
        for fn in self.custom:
            for key, value in fn(outputs, targets).items():  # type: ignore[arg-type]
                self._add(key, float(value) * n)
        self.n += n

    def result(self) -> dict[str, float]:
        if self.n == 0:
            raise InputError("the held-out data is empty")
        return {k: v / self.n for k, v in self.sums.items()}


def infer_task(targets: torch.Tensor) -> str:
    """``classification`` for integer (or bool) labels, ``regression`` for floats.

    >>> infer_task(torch.tensor([0, 3])), infer_task(torch.tensor([0.5]))
    ('classification', 'regression')
    """
    return "regression" if targets.is_floating_point() else "classification"


def primary_metric(task: str) -> str:
    """The metric sweeps and recommendations judge by: accuracy, or loss for regression."""
    return "accuracy" if task == "classification" else "loss"


def load_custom_metric(ref: str) -> CustomMetric:
    """``module:fn`` or ``file.py:fn`` with ``fn(outputs, targets) -> dict[str, float]``."""
    from .modelref import load_factory

    return load_factory(ref, "--metric")
