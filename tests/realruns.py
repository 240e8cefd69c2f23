"""Builders of training runs written by the real libraries (Lightning, transformers, accelerate, torch).

Only run-writing helpers live here, shared by the tests that check auditclip on what
real trainers write (``from realruns import TinyModule, fit_lightning``). Every builder
trains a tiny model on CPU for a few steps, so a module-scoped fixture costs a second or two.
Each library is imported inside the function that needs it, so importing this module
never requires Lightning/transformers/accelerate; the tests guard with ``pytest.importorskip``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

try:  # a base class is needed at import time; without Lightning the tests using it skip
    import lightning as _L

    _LightningModule: Any = _L.LightningModule
except ImportError:  # pragma: no cover - exercised only where Lightning is absent
    _LightningModule = nn.Module


def _dataset(n: int = 32, features: int = 8, seed: int = 0) -> torch.utils.data.TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    y = (x[:, :1] * 0.5 - x[:, 1:2]).squeeze(1) + 0.1 * torch.randn(n, generator=g)
    return torch.utils.data.TensorDataset(x, y)


class TinyModule(_LightningModule):  # type: ignore[misc,valid-type]
    """Linear -> BatchNorm1d -> ReLU -> Linear regressor (a few hundred parameters) for Lightning runs.

    Keyword hyper-parameters are saved with ``save_hyperparameters()``, so a test can put
    foreign objects (Namespace, Path, dataclasses...) into the checkpoint's ``hyper_parameters``.
    """

    def __init__(self, features: int = 8, hidden: int = 16, lr: float = 0.05, **extra: Any) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, 1))
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y), on_step=False, on_epoch=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(_dataset(seed=0), batch_size=8)

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(_dataset(n=16, seed=1), batch_size=8)


def fit_lightning(
    dirpath: str | os.PathLike[str],
    *,
    filename: str,
    max_epochs: int = 3,
    every_n_train_steps: int | None = None,
    save_last: bool | str | None = None,
    save_top_k: int = -1,
    monitor: str | None = None,
    callbacks: Sequence[Any] = (),
    seed: int = 0,
    module: Any = None,
    **hparams: Any,
) -> Path:
    """Train :class:`TinyModule` on CPU with a real ``ModelCheckpoint`` writing into ``dirpath``.

    4 batches per epoch, so ``max_epochs=3`` is 12 optimizer steps. ``module`` replaces the
    default ``TinyModule(**hparams)``. Returns ``dirpath``.
    """
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    L.seed_everything(seed, verbose=False)
    dirpath = Path(dirpath)
    checkpoint = ModelCheckpoint(
        dirpath=dirpath, filename=filename, every_n_train_steps=every_n_train_steps, save_last=save_last,
        save_top_k=save_top_k, monitor=monitor,
    )
    trainer = L.Trainer(
        logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
        max_epochs=max_epochs, callbacks=[checkpoint, *callbacks], num_sanity_val_steps=0,
        default_root_dir=dirpath.parent,
    )
    trainer.fit(module if module is not None else TinyModule(**hparams))
    return dirpath
