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
    mode: str = "min",
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
        save_top_k=save_top_k, monitor=monitor, mode=mode,
    )
    trainer = L.Trainer(
        logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu", devices=1,
        max_epochs=max_epochs, callbacks=[checkpoint, *callbacks], num_sanity_val_steps=0,
        default_root_dir=dirpath.parent,
    )
    trainer.fit(module if module is not None else TinyModule(**hparams))
    return dirpath


def fit_hf_trainer(
    output_dir: str | os.PathLike[str], *, max_steps: int = 8, save_steps: int = 2, save_total_limit: int | None = 2,
    save_final: bool = True,
) -> Path:
    """Train a tiny GPT-2 (about 3k parameters) with a real ``transformers.Trainer`` on CPU.

    Checkpoints ``checkpoint-<step>/`` every ``save_steps``; with ``save_final`` the
    Trainer's ``save_model(output_dir)`` writes the final weights into the run root.
    Returns ``output_dir``.
    """
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments, set_seed

    set_seed(0)
    output_dir = Path(output_dir)
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 64, (16, 8), generator=g)
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=max_steps, save_strategy="steps", save_steps=save_steps,
        save_total_limit=save_total_limit, per_device_train_batch_size=4, learning_rate=1e-2, report_to=[],
        use_cpu=True, disable_tqdm=True, logging_strategy="no", seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    if save_final:
        trainer.save_model(str(output_dir))
    return output_dir


class _Critic(nn.Module):
    """A small WGAN critic (with BatchNorm, as DCGAN critics have)."""

    def __init__(self) -> None:
        super().__init__()
        self.main = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.LeakyReLU(0.2), nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


class _Generator(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.main = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 8))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.main(z)


def write_wgan(folder: str | os.PathLike[str], *, epochs: int = 4, clip: float = 0.01) -> Path:
    """A WGAN training folder as the PyTorch example writes it: ``netD_epoch_{i}.pth`` and ``netG_epoch_{i}.pth``.

    A few real WGAN steps per epoch (critic clamped to ``[-clip, clip]``), each epoch saved
    with ``torch.save(net.state_dict(), ...)``. Returns ``folder``.
    """
    torch.manual_seed(0)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    net_d, net_g = _Critic(), _Generator()
    opt_d = torch.optim.RMSprop(net_d.parameters(), lr=5e-4)
    opt_g = torch.optim.RMSprop(net_g.parameters(), lr=5e-4)
    real = torch.randn(64, 8) * 0.5 + 1.0
    for epoch in range(epochs):
        for batch in real.split(16):
            for p in net_d.parameters():
                p.data.clamp_(-clip, clip)
            opt_d.zero_grad()
            loss_d = net_d(net_g(torch.randn(16, 4)).detach()).mean() - net_d(batch).mean()
            loss_d.backward()
            opt_d.step()
            opt_g.zero_grad()
            loss_g = -net_d(net_g(torch.randn(16, 4))).mean()
            loss_g.backward()
            opt_g.step()
        torch.save(net_d.state_dict(), folder / f"netD_epoch_{epoch}.pth")
        torch.save(net_g.state_dict(), folder / f"netG_epoch_{epoch}.pth")
    return folder


def write_accelerate_project(project_dir: str | os.PathLike[str], *, models: int = 1, saves: int = 3) -> Path:
    """An accelerate project: ``save_state()`` with automatic checkpoint naming after a few steps each.

    Writes ``project_dir/checkpoints/checkpoint_<i>/`` holding ``model.safetensors`` (and
    ``model_1.safetensors`` with ``models=2``), the optimizer and the RNG state. Returns ``project_dir``.
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    set_seed(0)
    project_dir = Path(project_dir)
    accelerator = Accelerator(
        cpu=True, project_config=ProjectConfiguration(project_dir=str(project_dir), automatic_checkpoint_naming=True,
                                                      total_limit=None),
    )
    nets = [nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1)) for _ in range(models)]
    optims = [torch.optim.SGD(n.parameters(), lr=0.05) for n in nets]
    prepared = accelerator.prepare(*nets, *optims)
    nets, optims = list(prepared[:models]), list(prepared[models:])
    x, y = _dataset().tensors
    for _ in range(saves):
        for batch_x, batch_y in zip(x.split(8), y.split(8)):
            for net, opt in zip(nets, optims):
                opt.zero_grad()
                loss = nn.functional.mse_loss(net(batch_x).squeeze(-1), batch_y)
                accelerator.backward(loss)
                opt.step()
        accelerator.save_state()
    accelerator.end_training()
    return project_dir


def fit_peft_trainer(
    root: str | os.PathLike[str], *, max_steps: int = 2, save_steps: int = 1, modules_to_save: Sequence[str] = (),
    seed: int = 0,
) -> tuple[Path, Path, Any]:
    """A LoRA (r=4, alpha=8, on ``c_attn``) tiny GPT-2 trained by a real ``transformers.Trainer`` with peft.

    Saves the base model with ``save_pretrained`` to ``root/base`` (what
    ``PeftModel.from_pretrained`` loads the checkpoints onto), then trains ``max_steps``
    steps at a high learning rate, saving ``root/run/checkpoint-<step>/`` (adapter weights
    only: ``save_only_model``) every ``save_steps``. Returns (base folder, run folder, the
    live PeftModel after training).
    """
    import warnings

    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    class Tokens(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 8

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            x = torch.randint(0, 64, (16,), generator=torch.Generator().manual_seed(i))
            return {"input_ids": x, "labels": x}

    root = Path(root)
    torch.manual_seed(seed)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32)).save_pretrained(
        str(root / "base"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(GPT2LMHeadModel.from_pretrained(str(root / "base")), LoraConfig(
            r=4, lora_alpha=8, target_modules=["c_attn"], lora_dropout=0.0, modules_to_save=list(modules_to_save)))
        args = TrainingArguments(output_dir=str(root / "run"), per_device_train_batch_size=4, max_steps=max_steps,
                                 save_steps=save_steps, learning_rate=5e-2, report_to=[], use_cpu=True,
                                 logging_steps=100, save_only_model=True, disable_tqdm=True, seed=seed)
        Trainer(model=model, args=args, train_dataset=Tokens()).train()
    return root / "base", root / "run", model


def word_texts(n: int, words: int = 15, vocab: int = 120, seed: int = 0) -> list[str]:
    """``n`` synthetic sentences of ``words`` words ``w0..w{vocab-1}``, each word mostly following
    from the one before (a pattern a tiny LM learns in a few dozen steps)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        w = int(torch.randint(0, vocab, (1,), generator=g))
        line = []
        for _ in range(words):
            line.append(f"w{w}")
            noisy = float(torch.rand(1, generator=g)) < 0.2
            w = int(torch.randint(0, vocab, (1,), generator=g)) if noisy else (w * 7 + 3) % vocab
        out.append(" ".join(line))
    return out


def save_word_tokenizer(folder: str | os.PathLike[str], vocab: int = 120) -> Any:
    """A word-level tokenizer over ``w0..w{vocab-1}`` (plus ``[UNK]``, ``[PAD]``), built locally with
    ``tokenizers`` and saved with ``PreTrainedTokenizerFast.save_pretrained``; returns it."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    table = {"[UNK]": 0, "[PAD]": 1, **{f"w{i}": i + 2 for i in range(vocab)}}
    core = Tokenizer(WordLevel(table, unk_token="[UNK]"))
    core.pre_tokenizer = WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]")
    tokenizer.save_pretrained(str(folder))
    return tokenizer


def fit_causal_lm(output_dir: str | os.PathLike[str], arch: str, input_ids: torch.Tensor, *, vocab: int,
                  max_steps: int = 24, save_steps: int = 12) -> Path:
    """Train a tiny ``gpt2`` (tied embeddings) or ``llama`` causal LM with a real ``transformers.Trainer``
    on CPU over ``input_ids`` [N, T] (labels = inputs), saving ``checkpoint-<step>/`` every ``save_steps``.
    Returns ``output_dir``."""
    import warnings

    from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Trainer,
                              TrainingArguments, set_seed)

    set_seed(0)
    if arch == "gpt2":
        model: Any = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                                bos_token_id=0, eos_token_id=0))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                             max_position_embeddings=32, bos_token_id=0, eos_token_id=0,
                                             pad_token_id=1, tie_word_embeddings=False))
    data = [{"input_ids": row, "labels": row.clone()} for row in input_ids]
    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=max_steps, save_strategy="steps", save_steps=save_steps,
        per_device_train_batch_size=8, learning_rate=1e-2, report_to=[], use_cpu=True, disable_tqdm=True,
        logging_strategy="no", seed=0, save_only_model=True,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Trainer(model=model, args=args, train_dataset=data).train()
    return Path(output_dir)
