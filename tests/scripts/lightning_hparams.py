"""A Lightning training script whose hyper-parameters are classes of its own ``__main__``.

Run as a program, as a user's ``train.py`` is, so the checkpoint's pickle names
``__main__.RunConfig`` and ``__main__.Mode``, which no other process can import:

* ``python lightning_hparams.py train OUTDIR``: 2 epochs of :class:`TinyModule`,
  ``save_hyperparameters`` with an ``argparse.Namespace``, a ``pathlib.Path``, a
  dataclass and an ``Enum`` member; checkpoints in ``OUTDIR/ckpts``.
* ``python lightning_hparams.py verify INPUT CLIPPED OUTDIR``: what the user's own
  code sees (this process has the classes): ``torch.load(weights_only=False)`` of
  INPUT saved as ``input.safetensors``; ``TinyModule.load_from_checkpoint(CLIPPED, weights_only=False)``,
  its weights as ``loaded.safetensors``; one more epoch resumed with
  ``trainer.fit(model, ckpt_path=CLIPPED)``; facts in ``result.json``.
* ``python lightning_hparams.py session OUTDIR``: ``train``, print ``TRAINED``, then
  ``verify`` the tab-separated ``INPUT CLIPPED OUTDIR`` read from stdin (one Lightning import).
"""

from __future__ import annotations

import argparse
import enum
import json
import pathlib
import sys
from dataclasses import dataclass, field

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # tests/, for realruns

import torch  # noqa: E402


@dataclass
class RunConfig:
    width: int = 16
    tags: list[str] = field(default_factory=lambda: ["a", "b"])


class Mode(enum.Enum):
    FAST = "fast"
    SLOW = "slow"


def hparams(outdir: str) -> dict[str, object]:
    return {"args": argparse.Namespace(batch=8, name="tiny"), "data_dir": pathlib.Path(outdir) / "data",
            "config": RunConfig(), "run_mode": Mode.SLOW}


def train(outdir: str) -> None:
    from realruns import fit_lightning

    fit_lightning(pathlib.Path(outdir) / "ckpts", filename="{epoch}-{step}", max_epochs=2, **hparams(outdir))


def verify(original: str, clipped: str, outdir: str) -> None:
    import lightning as L
    from safetensors.torch import save_file

    from realruns import TinyModule

    out = pathlib.Path(outdir)
    raw = torch.load(original, weights_only=False, map_location="cpu")
    save_file({k: v.contiguous() for k, v in raw["state_dict"].items()}, str(out / "input.safetensors"))
    # the user's own checkpoint, loaded the way Lightning documents for pickled hyper-parameters
    model = TinyModule.load_from_checkpoint(clipped, weights_only=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "loaded.safetensors"))
    hp = model.hparams
    result = {
        "types": {k: type(hp[k]).__qualname__ for k in ("args", "data_dir", "config", "run_mode")},
        "mode_is_slow": hp["run_mode"] is Mode.SLOW, "config_width": hp["config"].width,
        "args_batch": hp["args"].batch, "clipped_step": torch.load(clipped, weights_only=False)["global_step"],
    }
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                        devices=1, max_epochs=raw["epoch"] + 2, enable_checkpointing=False,
                        num_sanity_val_steps=0, default_root_dir=out)
    trainer.fit(model, ckpt_path=clipped, weights_only=False)
    result["resumed_step"] = trainer.global_step
    (out / "result.json").write_text(json.dumps(result))


def session(outdir: str) -> None:
    """``train``, then ``verify`` the clipped file whose path arrives on stdin: Lightning is imported once."""
    train(outdir)
    print("TRAINED", flush=True)
    original, clipped, verify_dir = sys.stdin.readline().split("\t")
    verify(original, clipped, verify_dir.strip())


if __name__ == "__main__":
    command, *rest = sys.argv[1:]
    {"train": train, "verify": verify, "session": session}[command](*rest)
