"""Finding checkpoints and ordering them by training step."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from auditclip import NoCheckpointsError, InputError, open_run, parse_step
from auditclip.checkpoints import natural_key

from conftest import save_safetensors, save_sharded, state_dict


@pytest.mark.parametrize("label, step", [
    ("step_900.safetensors", 900),
    ("step_9.pt", 9),
    ("ckpt-0001000.pt", 1000),
    ("checkpoint-500", 500),
    ("checkpoint-500/model.safetensors", 500),
    ("epoch=3-step=48.ckpt", 48),
    # Lightning names carry metrics: never read as a step
    ("epoch=2-step=60-train_loss_step=0.99.ckpt", 60),
    ("epoch=2-step=60-train_loss_step=1.ckpt", 60),
    ("val_loss=0.530-epoch=1.ckpt", None),
    ("gpt2_step_1000.pt", 1000),
    ("global_step1200/mp_rank_00_model_states.pt", 1200),
    ("iter_300.pth", 300),
    ("model-00001-of-00002.safetensors", None),
    ("final.pt", None),
    ("epoch_03.safetensors", None),
])
def test_parse_step(label: str, step: int | None) -> None:
    assert parse_step(label) == step


def test_natural_order_of_names() -> None:
    names = ["step_10", "step_9", "step_100", "step_1"]
    assert sorted(names, key=natural_key) == ["step_1", "step_9", "step_10", "step_100"]


def _touch_run(folder: Path, names: list[str]) -> None:
    # distinct weights: byte-identical copies would be folded into one checkpoint
    for i, name in enumerate(names):
        save_safetensors(folder / name, state_dict(i))


def test_step_order_beats_name_order(tmp_path: Path) -> None:
    _touch_run(tmp_path, ["step_10.safetensors", "step_9.safetensors", "step_100.safetensors"])
    run = open_run(tmp_path)
    assert run.labels == ["step_9.safetensors", "step_10.safetensors", "step_100.safetensors"]
    assert [c.step for c in run] == [9, 10, 100]


def test_lightning_names_order_by_step_not_epoch(tmp_path: Path) -> None:
    for i, name in enumerate(["epoch=10-step=110.ckpt", "epoch=2-step=30.ckpt", "epoch=9-step=100.ckpt"]):
        torch.save({"state_dict": state_dict(i), "epoch": 1, "global_step": parse_step(name)}, tmp_path / name)
    run = open_run(tmp_path)
    assert [c.step for c in run] == [30, 100, 110]
    assert run.labels[0] == "epoch=2-step=30.ckpt"


def test_hf_checkpoint_folders_are_one_checkpoint_each(tmp_path: Path) -> None:
    out = tmp_path / "output_dir"
    for step in [1000, 500, 1500]:
        folder = out / f"checkpoint-{step}"
        save_safetensors(folder / "model.safetensors", state_dict(step))
        torch.save({"state": {}}, folder / "optimizer.pt")
        torch.save({"x": 1}, folder / "scheduler.pt")
        torch.save({"rng": torch.zeros(3)}, folder / "rng_state.pth")
        torch.save({"a": 1}, folder / "training_args.bin")
        (folder / "config.json").write_text("{}")
    run = open_run(out)
    assert run.labels == ["checkpoint-500", "checkpoint-1000", "checkpoint-1500"]
    assert [c.weights.name for c in run] == ["model.safetensors"] * 3
    assert {p.name for p in run.ignored} == {"optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"}
    # a single checkpoint folder is a run of one
    single = open_run(out / "checkpoint-500")
    assert single.labels == ["checkpoint-500"] and single[0].step == 500


def test_hf_folder_with_sharded_safetensors(tmp_path: Path) -> None:
    save_sharded(tmp_path / "checkpoint-20", state_dict(1))
    run = open_run(tmp_path)
    assert len(run) == 1
    assert run[0].weights.name == "model.safetensors.index.json" and run[0].format == "safetensors (sharded)"


def test_step_from_safetensors_metadata_then_name(tmp_path: Path) -> None:
    save_safetensors(tmp_path / "b.safetensors", state_dict(0), {"step": "200"})
    save_safetensors(tmp_path / "a.safetensors", state_dict(0), {"global_step": "300"})
    save_safetensors(tmp_path / "c.safetensors", state_dict(0), {"step": "100"})
    save_safetensors(tmp_path / "z.safetensors", state_dict(0))  # no step at all: last
    run = open_run(tmp_path)
    assert run.labels == ["c.safetensors", "b.safetensors", "a.safetensors", "z.safetensors"]
    assert [c.step for c in run] == [100, 200, 300, None]


def test_sort_overrides(tmp_path: Path) -> None:
    _touch_run(tmp_path, ["step_2.safetensors", "step_10.safetensors", "a_step_5.safetensors"])
    now = time.time()
    for age, name in enumerate(["step_10.safetensors", "a_step_5.safetensors", "step_2.safetensors"]):
        os.utime(tmp_path / name, (now - 100 + age, now - 100 + age))
    assert open_run(tmp_path, sort="step").labels == ["step_2.safetensors", "a_step_5.safetensors", "step_10.safetensors"]
    assert open_run(tmp_path, sort="name").labels == ["a_step_5.safetensors", "step_2.safetensors", "step_10.safetensors"]
    assert open_run(tmp_path, sort="mtime").labels == ["step_10.safetensors", "a_step_5.safetensors", "step_2.safetensors"]


def test_glob_and_explicit_list(tmp_path: Path) -> None:
    _touch_run(tmp_path / "r", ["step_1.safetensors", "step_2.safetensors", "step_3.safetensors"])
    torch.save(state_dict(0), tmp_path / "r" / "step_4.pt")
    assert open_run(str(tmp_path / "r" / "*.safetensors")).labels == [
        "step_1.safetensors", "step_2.safetensors", "step_3.safetensors"]
    run = open_run([tmp_path / "r" / "step_3.safetensors", tmp_path / "r" / "step_1.safetensors"])
    assert run.labels == ["step_1.safetensors", "step_3.safetensors"]
    assert len(open_run(tmp_path / "r")) == 4


def test_sharded_files_in_flat_run_are_one_checkpoint(tmp_path: Path) -> None:
    save_sharded(tmp_path, state_dict(0), stem="step_5")
    save_safetensors(tmp_path / "step_10.safetensors", state_dict(0))
    run = open_run(tmp_path)
    assert run.labels == ["step_5.safetensors.index.json", "step_10.safetensors"]


@pytest.mark.parametrize("make, error", [
    (lambda p: p / "missing", InputError),
    (lambda p: str(p / "*.nothing"), NoCheckpointsError),
    (lambda p: p, NoCheckpointsError),  # an empty directory
])
def test_nothing_to_read_is_a_clear_error(tmp_path: Path, make, error) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error):
        open_run(make(tmp_path))


def test_lightning_names_with_metrics_are_ordered_by_step(tmp_path: Path) -> None:
    """``{epoch}-{step}-{train_loss_step:.2f}``: the loss would order these backwards."""
    names = ["epoch=0-step=20-train_loss_step=0.91.ckpt", "epoch=1-step=40-train_loss_step=0.52.ckpt",
             "epoch=2-step=60-train_loss_step=0.18.ckpt"]
    for i, name in enumerate(reversed(names)):
        torch.save({"state_dict": state_dict(i), "global_step": 20 * (3 - i)}, tmp_path / name)
    run = open_run(tmp_path)
    assert run.labels == names and [c.step for c in run] == [20, 40, 60]


def test_same_size_files_differing_between_the_sampled_blocks_are_not_folded(tmp_path: Path) -> None:
    """Same size, same sampled blocks, one different byte elsewhere: the full hash keeps them apart."""
    w = torch.arange(40_000, dtype=torch.float32)
    save_safetensors(tmp_path / "step_1.safetensors", {"w": w})
    other = w.clone()
    other[1500] += 1  # about 6 kB in: between the first and second sampled blocks
    save_safetensors(tmp_path / "step_2.safetensors", {"w": other})
    a, b = (tmp_path / "step_1.safetensors").read_bytes(), (tmp_path / "step_2.safetensors").read_bytes()
    assert len(a) == len(b) and sum(x != y for x, y in zip(a, b)) == 1
    assert open_run(tmp_path).labels == ["step_1.safetensors", "step_2.safetensors"]
    save_safetensors(tmp_path / "step_3.safetensors", {"w": w})  # a true copy of step_1
    run = open_run(tmp_path)
    assert run.labels == ["step_1.safetensors", "step_2.safetensors"]
    assert run.duplicates == [("step_3.safetensors", "step_1.safetensors", "byte-identical to")]
    assert run[0].duplicates == ("step_3.safetensors",)
    assert [n for n in run.notes if n.startswith("folded 1 duplicate(s)")]


def test_a_broken_pickle_has_no_stored_step_and_is_still_listed(tmp_path: Path) -> None:
    import zipfile

    with zipfile.ZipFile(tmp_path / "step_5.ckpt", "w") as z:
        z.writestr("archive/data.pkl", b"\x80\x02}q\x00(X\x0b\x00\x00\x00global_stepq")  # cut mid-pickle
    torch.save({"global_step": 3, "state_dict": state_dict(1)}, tmp_path / "step_30.ckpt")
    run = open_run(tmp_path)
    assert [(c.label, c.step) for c in run] == [("step_30.ckpt", 3), ("step_5.ckpt", 5)]
