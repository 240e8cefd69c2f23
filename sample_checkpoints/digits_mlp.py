"""The model of the sample runs: an MLP on scikit-learn's 8x8 digits (inputs are pixels / 16).

>>> from digits_mlp import make_model  # doctest: +SKIP
>>> make_model()(torch.zeros(1, 64)).shape  # doctest: +SKIP
torch.Size([1, 10])
"""

from __future__ import annotations

import torch
from torch import nn


class DigitsMLP(nn.Module):
    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        # LayerNorm without affine parameters keeps the hidden activations at unit
        # scale, so the network still learns when every weight is clipped to +-0.01.
        self.net = nn.Sequential(
            nn.Linear(64, hidden), nn.LayerNorm(hidden, elementwise_affine=False), nn.ReLU(),
            nn.Linear(hidden, hidden), nn.LayerNorm(hidden, elementwise_affine=False), nn.ReLU(),
            nn.Linear(hidden, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def make_model() -> nn.Module:
    """Factory used by ``--model sample_checkpoints/digits_mlp.py:make_model``."""
    return DigitsMLP()
