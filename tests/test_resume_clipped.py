"""Clipped runs resume with the library's own resume call (issue 11, acceptance 4).

A Hugging Face ``Trainer`` run and an accelerate ``save_state`` project, both written by
the real library, are clipped with ``auditclip clip``; the clipped folder is then resumed
with ``Trainer.train(resume_from_checkpoint=...)`` / ``Accelerator.load_state``. What the
resumed objects hold is compared with an independent computation: numpy's clamp of the
input weights, and the optimizer state read back from the input's own files.
"""

from __future__ import annotations

import copy
import filecmp
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from auditclip.cli import cli

C = 0.05  # below the largest |w| of the tiny models after a few steps, so the clip changes weights


def invoke(*args: Any) -> Any:
    return CliRunner().invoke(cli, [str(a) for a in args])


def clamped(path: Path) -> dict[str, np.ndarray]:
    """The input's weights clamped to [-C, C] by numpy (floating tensors only); some lie beyond C."""
    from safetensors.numpy import load_file

    weights = {k: v for k, v in load_file(str(path)).items() if v.dtype.kind == "f"}
    assert sum(int((np.abs(v) > C).sum()) for v in weights.values()) > 0  # else the clip changes nothing
    out = {}
    for k, v in weights.items():
        # auditclip rounds the bound inward to the dtype (float32(0.05) is above 0.05: one ulp below it)
        bound = v.dtype.type(C)
        bound = np.nextafter(bound, v.dtype.type(0)) if float(bound) > C else bound
        out[k] = np.clip(v, -bound, bound)
    return out


# --- Hugging Face Trainer -----------------------------------------------------------------------

HF_STATE = ["optimizer.pt", "rng_state.pth", "scheduler.pt", "training_args.bin"]


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    pytest.importorskip("transformers")
    from realruns import fit_hf_trainer

    root = tmp_path_factory.mktemp("hf_resume")
    run = fit_hf_trainer(root / "run", max_steps=4, save_steps=2, save_total_limit=None, save_final=False)
    kept = invoke("clip", run, "--max-abs", C, "--out", root / "clipped")
    dropped = invoke("clip", run, "--max-abs", C, "--out", root / "dropped", "--drop-trainer-state")
    assert kept.exit_code == 0, kept.output
    assert dropped.exit_code == 0, dropped.output
    return {"run": run, "clipped": root / "clipped", "dropped": root / "dropped", "root": root,
            "kept_output": kept.output, "dropped_output": dropped.output}  # type: ignore[dict-item]


def _resume_trainer(checkpoint: Path, output_dir: Path, max_steps: int) -> tuple[Any, dict[str, Any]]:
    """A new Trainer on a freshly initialised tiny GPT-2, resumed from ``checkpoint``; what it held at train begin."""
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments, set_seed

    seen: dict[str, Any] = {}

    class Capture(TrainerCallback):
        # on_train_begin runs after the weights, optimizer and scheduler were loaded, before the first new step
        def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                           **kw: Any) -> None:
            seen["weights"] = {k: v.detach().clone() for k, v in model.state_dict().items()}
            seen["optimizer"] = copy.deepcopy(optimizer.state_dict())  # the next steps update it in place
            seen["step"] = state.global_step

    set_seed(1)  # other initial weights than the run's: only the loaded ones can match
    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0)
    ids = torch.randint(0, 64, (16, 8), generator=torch.Generator().manual_seed(0))
    args = TrainingArguments(output_dir=str(output_dir), max_steps=max_steps, save_strategy="no",
                             per_device_train_batch_size=4, learning_rate=1e-2, report_to=[], use_cpu=True,
                             disable_tqdm=True, logging_strategy="no", seed=0)
    trainer = Trainer(model=GPT2LMHeadModel(config), args=args, train_dataset=[{"input_ids": r, "labels": r} for r in ids],
                      callbacks=[Capture()])
    trainer.train(resume_from_checkpoint=str(checkpoint))
    return trainer, seen


def test_a_clipped_trainer_checkpoint_resumes_from_the_clipped_weights(hf_run: dict[str, Path]) -> None:
    src, out = hf_run["run"] / "checkpoint-4", hf_run["clipped"] / "checkpoint-4"
    # the trainer state is copied byte for byte, and said once
    for name in HF_STATE + ["trainer_state.json", "config.json"]:
        assert filecmp.cmp(src / name, out / name, shallow=False), name
    assert str(hf_run["kept_output"]).count("optimizer/scheduler state copied as is") == 1
    assert ("copied as is (optimizer.pt, rng_state.pth, scheduler.pt, training_args.bin): it describes the "
            "unclipped weights (Adam moments stay valid as statistics)") in str(hf_run["kept_output"])

    trainer, seen = _resume_trainer(out, hf_run["root"] / "resumed", max_steps=6)
    assert seen["step"] == 4 and trainer.state.global_step == 6
    expected = clamped(src / "model.safetensors")
    for name, value in expected.items():
        np.testing.assert_array_equal(seen["weights"][name].numpy(), value, err_msg=name)
    # the optimizer the Trainer resumed with is the input's (Adam moments of the unclipped weights)
    saved = torch.load(src / "optimizer.pt", weights_only=True)
    assert saved["state"] and seen["optimizer"]["state"].keys() == saved["state"].keys()
    for i, moments in saved["state"].items():
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(seen["optimizer"]["state"][i][k], moments[k]), (i, k)


def test_drop_trainer_state_leaves_it_out_and_says_so(hf_run: dict[str, Path]) -> None:
    out = hf_run["dropped"] / "checkpoint-4"
    names = sorted(p.name for p in out.iterdir())
    assert not set(HF_STATE) & set(names)
    assert {"model.safetensors", "config.json", "trainer_state.json"} <= set(names)
    assert ("--drop-trainer-state: not copied: optimizer.pt, rng_state.pth, scheduler.pt, training_args.bin"
            in str(hf_run["dropped_output"]))
    assert "copied as is" not in str(hf_run["dropped_output"])
    # still a resumable folder: the step from trainer_state.json, a fresh optimizer
    trainer, seen = _resume_trainer(out, hf_run["root"] / "resumed_fresh", max_steps=5)
    assert seen["step"] == 4 and trainer.state.global_step == 5 and not seen["optimizer"]["state"]


# --- accelerate save_state ----------------------------------------------------------------------

class _Counter:
    """A custom object registered for checkpointing (accelerate saves it as custom_checkpoint_0.pkl)."""

    def __init__(self) -> None:
        self.count = 0

    def state_dict(self) -> dict[str, int]:
        return {"count": self.count}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.count = state["count"]


def _prepared(project_dir: Path | None) -> tuple[Any, nn.Module, Any, Any, _Counter]:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    config = ProjectConfiguration(project_dir=str(project_dir), automatic_checkpoint_naming=True) if project_dir else None
    accelerator = Accelerator(cpu=True, project_config=config)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    net, opt, sched = accelerator.prepare(net, opt, sched)
    counter = _Counter()
    accelerator.register_for_checkpointing(counter)
    return accelerator, net, opt, sched, counter


@pytest.fixture(scope="module")
def accelerate_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    pytest.importorskip("accelerate")
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("accelerate_resume")
    accelerator, net, opt, sched, counter = _prepared(root / "project")
    x, y = torch.randn(32, 8), torch.randn(32)
    for _ in range(2):  # save_state twice: checkpoints/checkpoint_0, checkpoint_1
        for bx, by in zip(x.split(8), y.split(8)):
            opt.zero_grad()
            accelerator.backward(nn.functional.mse_loss(net(bx).squeeze(-1), by))
            opt.step()
            sched.step()
            counter.count += 1
        accelerator.save_state()
    accelerator.end_training()
    kept = invoke("clip", root / "project", "--max-abs", C, "--out", root / "clipped")
    dropped = invoke("clip", root / "project", "--max-abs", C, "--out", root / "dropped", "--drop-trainer-state")
    assert kept.exit_code == 0, kept.output
    assert dropped.exit_code == 0, dropped.output
    return {"src": root / "project" / "checkpoints" / "checkpoint_1", "out": root / "clipped" / "checkpoints" /
            "checkpoint_1", "dropped": root / "dropped" / "checkpoints" / "checkpoint_1", "kept": kept.output,
            "dropped_output": dropped.output}


ACCELERATE_STATE = ["custom_checkpoint_0.pkl", "optimizer.bin", "random_states_0.pkl", "scheduler.bin"]


def test_a_clipped_accelerate_state_loads_with_load_state(accelerate_run: dict[str, Any]) -> None:
    src, out = accelerate_run["src"], accelerate_run["out"]
    assert sorted(p.name for p in src.iterdir()) == sorted(ACCELERATE_STATE + ["model.safetensors"])
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in src.iterdir())
    for name in ACCELERATE_STATE:
        assert filecmp.cmp(src / name, out / name, shallow=False), name
    assert "copied as is (custom_checkpoint_0.pkl, optimizer.bin, random_states_0.pkl, scheduler.bin)" in \
        accelerate_run["kept"]

    torch.manual_seed(1)  # other initial weights: only the loaded ones can match
    accelerator, net, opt, sched, counter = _prepared(None)
    accelerator.load_state(str(out))
    expected = clamped(src / "model.safetensors")
    weights = accelerator.unwrap_model(net).state_dict()
    assert weights.keys() == expected.keys()
    for name, value in expected.items():
        np.testing.assert_array_equal(weights[name].numpy(), value, err_msg=name)
    saved = torch.load(src / "optimizer.bin", weights_only=True)
    loaded = opt.state_dict()
    assert saved["state"] and loaded["state"].keys() == saved["state"].keys()
    for i, moments in saved["state"].items():
        for k, v in moments.items():
            assert torch.equal(loaded["state"][i][k], v), (i, k)
    assert sched.state_dict()["last_epoch"] == torch.load(src / "scheduler.bin", weights_only=True)["last_epoch"] == 8
    assert counter.count == 8
    accelerator.end_training()


def test_drop_trainer_state_leaves_accelerate_state_out(accelerate_run: dict[str, Any]) -> None:
    assert sorted(p.name for p in accelerate_run["dropped"].iterdir()) == ["model.safetensors"]
    assert ("--drop-trainer-state: not copied: custom_checkpoint_0.pkl, optimizer.bin, random_states_0.pkl, "
            "scheduler.bin") in accelerate_run["dropped_output"]


# DeepSpeed: tests/test_deepspeed_clip.py (clipped runs resumed by engine.load_checkpoint)


# --- a PEFT adapter refactored by --adapter-mode delta ------------------------------------------

def test_refactored_adapter_says_the_copied_moments_describe_the_old_factors(tmp_path: Path) -> None:
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = get_peft_model(GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2)),
                           LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn"], init_lora_weights=False))
    folder = tmp_path / "run" / "checkpoint-1"
    model.save_pretrained(str(folder))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad])
    model(torch.arange(8)[None], labels=torch.arange(8)[None]).loss.backward()
    opt.step()
    torch.save(opt.state_dict(), folder / "optimizer.pt")

    delta = invoke("clip", tmp_path / "run", "--max-abs", 0.001, "--adapter-mode", "delta", "--out", tmp_path / "d")
    assert delta.exit_code == 0, delta.output
    assert filecmp.cmp(folder / "optimizer.pt", tmp_path / "d" / "checkpoint-1" / "optimizer.pt", shallow=False)
    assert "the copied optimizer state holds the moments of the original LoRA factors A and B" in delta.output
    # clipping the factors themselves keeps them (and their moments' coordinates): no such note
    factors = invoke("clip", tmp_path / "run", "--max-abs", 0.001, "--out", tmp_path / "f")
    assert factors.exit_code == 0, factors.output
    assert "copied as is (optimizer.pt)" in factors.output and "original LoRA factors" not in factors.output
