"""Run discovery on runs written by the real libraries: step order, duplicates, several models.

Every run here is written by Lightning's ``ModelCheckpoint``, a ``transformers.Trainer``,
``accelerate``'s ``save_state()`` or ``torch.save`` of two GAN networks (builders in
``realruns.py``). The expected steps are read back independently: ``torch.load`` of the
Lightning file, ``trainer_state.json`` of the Trainer, the folder names accelerate chose.
"""

from __future__ import annotations

import csv
import filecmp
import json
import os
import re
import shutil
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from auditclip import InputError, open_run
from auditclip.checkpoints import natural_key
from auditclip.cli import cli

import realruns


def _stored_global_step(path: Path) -> int:
    """The independent source: Lightning's own ``global_step``, unpickled by torch."""
    return int(torch.load(path, map_location="cpu", weights_only=False)["global_step"])


def _drift(args: list[str], out: Path) -> object:
    return CliRunner().invoke(cli, ["drift", *args, "--out", str(out), "-q"])


def _stats_steps(out: Path) -> dict[str, str]:
    with (out / "stats.csv").open(encoding="utf-8") as f:
        return {row["checkpoint"]: row["step"] for row in csv.DictReader(f)}


# --- Lightning -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lightning_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    pytest.importorskip("lightning")
    from lightning.pytorch.callbacks import ModelCheckpoint

    base = tmp_path_factory.mktemp("lightning")
    return {
        # every 2 steps, metric in the name, save_last=True (a second save of the last checkpoint)
        "metrics": realruns.fit_lightning(base / "metrics", filename="{epoch}-{step}-{train_loss_step:.2f}",
                                          every_n_train_steps=2, save_last=True),
        # once per epoch, the loss first in the name: name order is not step order; last.ckpt is a link
        "val_loss": realruns.fit_lightning(base / "val_loss", filename="{val_loss:.3f}-{epoch}", save_last="link"),
        # the best epoch (mode=max: the worst loss, epoch 0) kept; last.ckpt is saved with it (Lightning
        # saves last.ckpt whenever it saves a checkpoint) but its pickled callback state differs
        "top1": realruns.fit_lightning(base / "top1", filename="{val_loss:.3f}-{epoch}", save_top_k=1,
                                       monitor="val_loss", mode="max", save_last=True),
        # a last.ckpt of every epoch (save_top_k=0), and a second callback keeping every other epoch:
        # last.ckpt ends at a step no other file has
        # two callbacks, one folder (Lightning's default dirpath is shared): every 3 steps, and every epoch
        "two_callbacks": realruns.fit_lightning(base / "two_callbacks", filename="{epoch}-{step}", every_n_train_steps=3,
                                                callbacks=[ModelCheckpoint(dirpath=base / "two_callbacks",
                                                                           filename="best-{epoch}-{val_loss:.3f}",
                                                                           save_top_k=-1)]),
        "unique_last": realruns.fit_lightning(base / "unique_last", filename="unused", save_top_k=0, save_last=True,
                                              callbacks=[ModelCheckpoint(dirpath=base / "unique_last",
                                                                         filename="{epoch}-{step}", every_n_epochs=2,
                                                                         save_top_k=-1)]),
    }


def test_lightning_metric_names_in_global_step_order(lightning_runs: dict[str, Path]) -> None:
    folder = lightning_runs["metrics"]
    run = open_run(folder)
    files = sorted(p for p in folder.iterdir() if p.name != "last.ckpt")
    stored = {p.name: _stored_global_step(p) for p in files}
    assert len(run) == len(files) == 6
    assert [c.step for c in run] == [stored[c.label] for c in run] == [2, 4, 6, 8, 10, 12]
    # last.ckpt is the same save as the step-12 checkpoint: folded, said once
    assert "last.ckpt" not in run.labels
    assert filecmp.cmp(folder / "last.ckpt", folder / run[-1].label, shallow=False)
    assert run[-1].duplicates == ("last.ckpt",)
    assert run.duplicates == [("last.ckpt", run[-1].label, "byte-identical to")]
    assert sum("last.ckpt" in n for n in run.notes) == 1


def test_lightning_loss_names_sort_wrongly_but_the_run_is_in_global_step_order(
    lightning_runs: dict[str, Path],
) -> None:
    folder = lightning_runs["val_loss"]
    run = open_run(folder)
    assert (folder / "last.ckpt").is_symlink()
    files = [p for p in folder.iterdir() if not p.is_symlink()]
    by_step = sorted(files, key=_stored_global_step)
    # the names sort by loss, not by step: a name sort would reverse the run
    assert sorted((p.name for p in files), key=natural_key) != [p.name for p in by_step]
    assert run.labels == [p.name for p in by_step]
    assert [c.step for c in run] == [_stored_global_step(p) for p in by_step] == [4, 8, 12]
    assert run.duplicates == [("last.ckpt", by_step[-1].name, "a link to")]
    assert run[-1].duplicates == ("last.ckpt",)


def test_a_last_ckpt_saved_again_with_the_same_tensors_is_folded(lightning_runs: dict[str, Path]) -> None:
    folder = lightning_runs["top1"]
    run = open_run(folder)
    (best,) = [p for p in folder.iterdir() if p.name != "last.ckpt"]
    assert _stored_global_step(folder / "last.ckpt") == _stored_global_step(best) == 4
    assert not filecmp.cmp(folder / "last.ckpt", best, shallow=False)  # not a byte copy: the pickle differs
    assert run.labels == [best.name] and run[0].step == 4
    assert run.duplicates == [("last.ckpt", best.name, "the same step and tensor bytes as")]


def test_a_last_ckpt_that_copies_nothing_stays_in_step_order(lightning_runs: dict[str, Path]) -> None:
    folder = lightning_runs["unique_last"]
    run = open_run(folder)
    names = sorted(p.name for p in folder.iterdir())
    assert len(names) == 2 and "last.ckpt" in names
    assert run.labels[-1] == "last.ckpt" and run.duplicates == []
    assert [c.step for c in run] == [_stored_global_step(folder / c.label) for c in run] == [8, 12]


def test_two_callbacks_in_one_folder_are_one_model_in_step_order(lightning_runs: dict[str, Path]) -> None:
    """Two name patterns, one model (the same tensor names and shapes): one run, and a note says so."""
    folder = lightning_runs["two_callbacks"]
    files = sorted(folder.iterdir())
    run = open_run(folder)
    stored = {p.name: _stored_global_step(p) for p in files}
    assert [c.step for c in run] == [stored[c.label] for c in run] == [3, 4, 6, 8, 9, 12]
    # both callbacks saved step 12: another pickle (callback state), the same tensors; audited once
    (twelve,) = [c for c in run if c.step == 12]
    (best12,) = [n for n in stored if n.startswith("best-") and stored[n] == 12]
    assert twelve.label == "epoch=2-step=12.ckpt" and twelve.duplicates == (best12,)
    assert run.duplicates == [(best12, "epoch=2-step=12.ckpt", "the same step and tensor bytes as")]
    said = [n for n in run.notes if "hold the same model" in n]
    assert len(said) == 1 and "epoch=*-step=*.ckpt: 4 files" in said[0] and "best-epoch=*-val_loss=*.ckpt: 2 files" \
        in said[0], run.notes


def test_drift_says_once_what_it_folded(lightning_runs: dict[str, Path], tmp_path: Path) -> None:
    for name in ("metrics", "val_loss"):
        out = tmp_path / name
        result = _drift([str(lightning_runs[name])], out)
        assert result.exit_code == 0, result.output
        folded = [line for line in result.stderr.splitlines() if line.startswith("note: folded")]
        assert len(folded) == 1 and "last.ckpt" in folded[0], result.stderr
        steps = _stats_steps(out)
        assert "last.ckpt" not in steps
        assert steps == {label: str(_stored_global_step(lightning_runs[name] / label)) for label in steps}


def test_a_byte_identical_copy_is_folded(lightning_runs: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "run"
    shutil.copytree(lightning_runs["val_loss"], folder, symlinks=True)
    first = open_run(folder)[0]
    shutil.copyfile(first.path, folder / "backup.ckpt")
    run = open_run(folder)
    assert run.labels == open_run(lightning_runs["val_loss"]).labels
    assert ("backup.ckpt", first.label, "byte-identical to") in run.duplicates
    # one weight changed in the copy (at the same global_step): another run's checkpoint, never chained
    ckpt = torch.load(folder / "backup.ckpt", weights_only=False)
    ckpt["state_dict"]["net.0.bias"][0] += 1
    torch.save(ckpt, folder / "backup.ckpt")
    with pytest.raises(InputError, match=rf"step {first.step}: .*backup\.ckpt"):
        open_run(folder)


def test_a_second_lightning_run_into_the_same_folder_is_never_interleaved(tmp_path: Path) -> None:
    """Lightning names the re-run's files ``...-v1.ckpt``: same steps, other weights."""
    pytest.importorskip("lightning")
    folder = tmp_path / "checkpoints"
    realruns.fit_lightning(folder, filename="{epoch}-{step}", max_epochs=2, seed=0)
    realruns.fit_lightning(folder, filename="{epoch}-{step}", max_epochs=2, seed=1)
    assert sorted(p.name for p in folder.iterdir()) == [
        "epoch=0-step=4-v1.ckpt", "epoch=0-step=4.ckpt", "epoch=1-step=8-v1.ckpt", "epoch=1-step=8.ckpt"]
    with pytest.raises(InputError, match=r"2 step\(s\) each stored by two different checkpoints"):
        open_run(folder)
    result = _drift([str(folder)], tmp_path / "out")
    assert result.exit_code == 2 and "-v1" in result.output and "Traceback" not in result.output


def test_hard_links_and_last_v1_are_folded_and_lightning_logs_found_from_the_version_folder(
    lightning_runs: dict[str, Path], tmp_path: Path,
) -> None:
    version = tmp_path / "lightning_logs" / "version_0"
    shutil.copytree(lightning_runs["metrics"], version / "checkpoints")
    (version / "hparams.yaml").write_text("hidden: 16\n")
    newest = open_run(lightning_runs["metrics"])[-1].label
    os.link(version / "checkpoints" / newest, version / "checkpoints" / "last-v1.ckpt")
    run = open_run(version)
    assert run.labels == [f"checkpoints/{c.label}" for c in open_run(lightning_runs["metrics"])]
    assert sorted(run.duplicates) == [("checkpoints/last-v1.ckpt", f"checkpoints/{newest}", "the same file as"),
                                      ("checkpoints/last.ckpt", f"checkpoints/{newest}", "byte-identical to")]
    assert sorted(run[-1].duplicates) == ["checkpoints/last-v1.ckpt", "checkpoints/last.ckpt"]


def test_the_step_a_file_stores_wins_over_its_name(lightning_runs: dict[str, Path], tmp_path: Path) -> None:
    src = open_run(lightning_runs["metrics"])
    folder = tmp_path / "renamed"
    folder.mkdir()
    shutil.copyfile(src[0].path, folder / "step_900.ckpt")  # global_step 2
    shutil.copyfile(src[1].path, folder / "step_100.ckpt")  # global_step 4
    run = open_run(folder)
    assert run.labels == ["step_900.ckpt", "step_100.ckpt"]
    assert [c.step for c in run] == [_stored_global_step(folder / "step_900.ckpt"), 4]
    said = [n for n in run.notes if "other than the one in their name" in n]
    assert len(said) == 1 and "step_900.ckpt: 2" in said[0] and "not 900" in said[0]


def test_the_step_of_a_checkpoint_with_foreign_classes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hyper-parameters of classes the reader cannot import (a deleted training script's): the step is still read."""
    pytest.importorskip("lightning")
    from argparse import Namespace

    script = tmp_path / "train_script_gone.py"
    script.write_text("import dataclasses, enum\n"
                      "@dataclasses.dataclass\nclass Opt:\n    depth: int = 3\n"
                      "class Mode(enum.Enum):\n    FAST = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import train_script_gone  # noqa: E402 - the module exists only for this test

    folder = realruns.fit_lightning(tmp_path / "run", filename="model-{epoch}", max_epochs=2,
                                    cfg=Namespace(width=4), where=tmp_path, opt=train_script_gone.Opt(),
                                    mode_=train_script_gone.Mode.FAST)
    monkeypatch.delitem(sys.modules, "train_script_gone")
    script.unlink()
    files = sorted(folder.iterdir())
    with pytest.raises(ModuleNotFoundError):  # unpickling needs the gone script: the file really is foreign
        torch.load(files[0], weights_only=False)
    run = open_run(folder)
    with zipfile.ZipFile(files[-1]) as z:
        pkl = next(n for n in z.namelist() if n.endswith("data.pkl"))
        assert b"train_script_gone" in z.read(pkl)
    assert [c.step for c in run] == [4, 8]  # 4 batches an epoch


def test_a_hostile_pickle_gives_its_step_and_runs_nothing(tmp_path: Path) -> None:
    sentinel = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (Path.touch, (str(sentinel),))  # type: ignore[return-value]

    sd = {"w": torch.ones(3)}
    torch.save({"hyper_parameters": {"x": Evil()}, "global_step": 7, "state_dict": sd}, tmp_path / "a.ckpt")
    torch.save({"global_step": 3, "state_dict": {"w": torch.zeros(3)}}, tmp_path / "b.ckpt")
    assert not sentinel.exists()
    run = open_run(tmp_path)
    assert [(c.label, c.step) for c in run] == [("b.ckpt", 3), ("a.ckpt", 7)]
    assert not sentinel.exists()


def test_a_resaved_last_ckpt_with_the_same_tensors_is_folded(tmp_path: Path) -> None:
    """last.ckpt saved again at the same step: another pickle (callback state), the same tensor bytes."""
    sd = {"w": torch.arange(6.0), "b": torch.ones(2)}
    torch.save({"global_step": 12, "state_dict": sd, "callbacks": {"last_model_path": ""}}, tmp_path / "epoch=2-step=12.ckpt")
    torch.save({"global_step": 12, "state_dict": sd, "callbacks": {"last_model_path": "last.ckpt"}}, tmp_path / "last.ckpt")
    torch.save({"global_step": 6, "state_dict": {"w": torch.zeros(6), "b": torch.ones(2)}}, tmp_path / "epoch=1-step=6.ckpt")
    assert not filecmp.cmp(tmp_path / "last.ckpt", tmp_path / "epoch=2-step=12.ckpt", shallow=False)
    run = open_run(tmp_path)
    assert run.labels == ["epoch=1-step=6.ckpt", "epoch=2-step=12.ckpt"]
    assert run.duplicates == [("last.ckpt", "epoch=2-step=12.ckpt", "the same step and tensor bytes as")]
    # other tensors at the same step (a last.ckpt another run left behind): never chained, a clear stop
    torch.save({"global_step": 12, "state_dict": {"w": torch.arange(6.0) + 1, "b": torch.ones(2)}}, tmp_path / "last.ckpt")
    with pytest.raises(InputError, match=r"step 12: epoch=2-step=12\.ckpt, last\.ckpt"):
        open_run(tmp_path)


# --- Hugging Face Trainer ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("transformers")
    return realruns.fit_hf_trainer(tmp_path_factory.mktemp("hf") / "out", max_steps=8, save_steps=2,
                                   save_total_limit=2)


def _trainer_step(folder: Path) -> int:
    return int(json.loads((folder / "trainer_state.json").read_text())["global_step"])


def test_trainer_checkpoints_in_step_order_and_the_final_save_folded(trainer_run: Path) -> None:
    run = open_run(trainer_run)
    kept = sorted((p for p in trainer_run.glob("checkpoint-*")), key=_trainer_step)
    assert run.labels == [p.name for p in kept] == ["checkpoint-6", "checkpoint-8"]
    assert [c.step for c in run] == [_trainer_step(p) for p in kept]
    # save_model() wrote the step-8 weights again into the run root: folded into checkpoint-8
    assert filecmp.cmp(trainer_run / "model.safetensors", kept[-1] / "model.safetensors", shallow=False)
    assert run.duplicates == [("final", "checkpoint-8", "byte-identical to")]
    deleted = [n for n in run.notes if "save_total_limit" in n]
    assert len(deleted) == 1 and deleted[0].startswith("checkpoint-6 is the earliest checkpoint kept")
    assert "every 2 steps" in deleted[0]


def test_a_final_save_that_differs_is_its_own_entry(trainer_run: Path, tmp_path: Path) -> None:
    from transformers import GPT2LMHeadModel

    run_dir = tmp_path / "out"
    shutil.copytree(trainer_run, run_dir)
    model = GPT2LMHeadModel.from_pretrained(str(run_dir))  # a local folder: no network
    with torch.no_grad():
        model.lm_head.weight.mul_(0.5)  # e.g. weights averaged after training
    model.save_pretrained(str(run_dir))
    run = open_run(run_dir)
    assert run.labels == ["checkpoint-6", "checkpoint-8", "final"]
    assert run[-1].step is None and run[-1].path == run_dir and run[-1].weights == run_dir / "model.safetensors"
    assert run.duplicates == []
    # with the Trainer's state saved in the root too (trainer.save_state()), final has its step
    shutil.copyfile(run_dir / "checkpoint-8" / "trainer_state.json", run_dir / "trainer_state.json")
    run = open_run(run_dir)
    assert [(c.label, c.step) for c in run] == [("checkpoint-6", 6), ("checkpoint-8", 8), ("final", 8)]
    # every checkpoint kept from the first save on: no note about deleted checkpoints
    state = json.loads((run_dir / "checkpoint-6" / "trainer_state.json").read_text())
    state["save_steps"] = 6
    (run_dir / "checkpoint-6" / "trainer_state.json").write_text(json.dumps(state))
    assert not [n for n in open_run(run_dir).notes if "save_total_limit" in n]


def test_drift_of_a_trainer_run_notes_on_stderr(trainer_run: Path, tmp_path: Path) -> None:
    result = _drift([str(trainer_run)], tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert _stats_steps(tmp_path / "out") == {"checkpoint-6": "6", "checkpoint-8": "8"}
    notes = [line for line in result.stderr.splitlines() if line.startswith("note: ")]
    assert sum("save_total_limit" in n for n in notes) == 1
    assert sum("final (byte-identical to checkpoint-8)" in n for n in notes) == 1


# --- several models in one folder ----------------------------------------------------------------


def _suggested_globs(message: str) -> list[str]:
    return re.findall(r"'([^']+)'", message.split("audit one at a time", 1)[1])


@pytest.fixture(scope="module")
def wgan_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return realruns.write_wgan(tmp_path_factory.mktemp("wgan") / "run", epochs=4)


def test_a_wgan_folder_is_never_chained_into_one_run(wgan_run: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError) as caught:
        open_run(wgan_run)
    message = str(caught.value)
    assert "2 model series (netD_epoch_*.pth: 4 files, netG_epoch_*.pth: 4 files)" in message
    result = _drift([str(wgan_run)], tmp_path / "out")
    assert result.exit_code == 2 and result.output.startswith("Error: ") and len(result.output.splitlines()) == 1
    assert "Traceback" not in result.output
    globs = _suggested_globs(result.output)
    assert globs == [f"{wgan_run}/netD_epoch_*.pth", f"{wgan_run}/netG_epoch_*.pth"]
    for pattern, net in zip(globs, ("netD", "netG")):
        run = open_run(pattern)
        expected = sorted((p.name for p in wgan_run.glob(f"{net}_epoch_*.pth")), key=natural_key)
        assert run.labels == expected and len(expected) == 4
        # the file read is the network named: its keys are the state dict torch saved
        sd = torch.load(run[0].weights, weights_only=True)
        with run[0].open() as reader:
            assert sorted(reader.names()) == sorted(sd)
        result = _drift([pattern], tmp_path / net)
        assert result.exit_code == 0, result.output
        assert set(_stats_steps(tmp_path / net)) == set(expected)


def test_two_model_indices_in_file_names_are_two_series(tmp_path: Path) -> None:
    """``net1_epoch_{i}`` and ``net2_epoch_{i}``: the number that names the model is no step."""
    for i in range(3):
        torch.save({"w": torch.full((2,), float(i))}, tmp_path / f"net1_epoch_{i}.pt")
        torch.save({"v": torch.full((3,), float(i))}, tmp_path / f"net2_epoch_{i}.pt")
    with pytest.raises(InputError, match=r"net1_epoch_\*\.pt: 3 files, net2_epoch_\*\.pt: 3 files"):
        open_run(tmp_path)
    assert len(open_run(str(tmp_path / "net1_epoch_*.pt"))) == 3
    # a run with a final.pt beside it is still one run
    for f in tmp_path.glob("net2_*"):
        f.unlink()
    torch.save({"w": torch.full((2,), 9.0)}, tmp_path / "final.pt")
    assert open_run(tmp_path).labels == ["final.pt", "net1_epoch_0.pt", "net1_epoch_1.pt", "net1_epoch_2.pt"]


def test_two_runs_of_one_architecture_in_one_folder_are_never_joined(tmp_path: Path) -> None:
    """Same tensor names and shapes is no proof of one run: two seeds saved flat stay apart."""
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(4, 3, generator=g)
        for step in (100, 200, 300):  # both runs saved at the same steps, with other weights
            torch.save({"fc.weight": w + step / 1000}, tmp_path / f"seed{seed}_step_{step}.pt")
    with pytest.raises(InputError, match=r"2 model series"):
        open_run(tmp_path)
    for f in tmp_path.glob("seed2_*"):  # disjoint steps and no shared save: still no proof
        f.unlink()
    for step in (150, 250):
        torch.save({"fc.weight": torch.full((4, 3), step / 1000)}, tmp_path / f"other_step_{step}.pt")
    with pytest.raises(InputError, match=r"2 model series"):
        open_run(tmp_path)
    # a save both patterns made at one step, with the same bytes, is the proof two callbacks leave
    torch.save(torch.load(tmp_path / "seed1_step_300.pt"), tmp_path / "other_step_300.pt")
    run = open_run(tmp_path)
    assert [c.step for c in run] == [100, 150, 200, 250, 300]
    assert any("same model" in n for n in run.notes)


# --- accelerate ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def accelerate_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    pytest.importorskip("accelerate")
    base = tmp_path_factory.mktemp("accelerate")
    return {n: realruns.write_accelerate_project(base / f"models{n}", models=n, saves=3) for n in (1, 2)}


def test_an_accelerate_project_is_found_from_its_root(accelerate_runs: dict[int, Path], tmp_path: Path) -> None:
    project = accelerate_runs[1]
    run = open_run(project)
    folders = sorted((project / "checkpoints").iterdir(), key=lambda p: natural_key(p.name))
    assert run.labels == [f"checkpoints/{p.name}" for p in folders] == [f"checkpoints/checkpoint_{i}" for i in range(3)]
    assert [c.step for c in run] == [0, 1, 2]
    assert all(c.weights.name == "model.safetensors" for c in run)
    assert {p.name for p in run.ignored} >= {"optimizer.bin"}
    result = _drift([str(project)], tmp_path / "out")
    assert result.exit_code == 0, result.output


def test_an_accelerate_project_with_two_models_lists_both(accelerate_runs: dict[int, Path], tmp_path: Path) -> None:
    project = accelerate_runs[2]
    with pytest.raises(InputError) as caught:
        open_run(project)
    message = str(caught.value)
    assert "2 model series (checkpoints/checkpoint_*/model.safetensors: 3 files, " \
           "checkpoints/checkpoint_*/model_1.safetensors: 3 files)" in message
    result = _drift([str(project)], tmp_path / "out")
    assert result.exit_code == 2 and len(result.output.splitlines()) == 1
    for pattern, name in zip(_suggested_globs(message), ("model.safetensors", "model_1.safetensors")):
        run = open_run(pattern)
        assert [c.weights.name for c in run] == [name] * 3
        assert [c.step for c in run] == [0, 1, 2]
    # one checkpoint folder of the two models is refused as well
    with pytest.raises(InputError, match="2 model series"):
        open_run(project / "checkpoints" / "checkpoint_0")


def test_a_single_save_of_another_model_beside_a_series_is_never_a_later_step(tmp_path: Path) -> None:
    """``netD_epoch_{0,1,2}`` + ``netG_epoch_2``, and ``netD_epoch_0`` + ``netG_epoch_0``: two models."""
    critic = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 1))
    generator = torch.nn.Sequential(torch.nn.Linear(2, 8), torch.nn.Linear(8, 4))
    for epoch in range(3):
        torch.save(critic.state_dict(), tmp_path / f"netD_epoch_{epoch}.pth")
    torch.save(generator.state_dict(), tmp_path / "netG_epoch_2.pth")
    with pytest.raises(InputError, match=r"2 model series .*netG_epoch_\*\.pth: 1 file"):
        open_run(tmp_path)
    for epoch in (1, 2):
        (tmp_path / f"netD_epoch_{epoch}.pth").unlink()
    (tmp_path / "netG_epoch_2.pth").rename(tmp_path / "netG_epoch_0.pth")
    with pytest.raises(InputError, match=r"2 model series"):
        open_run(tmp_path)
    # a single file of the run's own model (a final save) stays in the run
    (tmp_path / "netG_epoch_0.pth").unlink()
    torch.save(critic.state_dict(), tmp_path / "netD_epoch_1.pth")
    torch.save(critic.state_dict(), tmp_path / "final.pth")
    assert len(open_run(tmp_path)) >= 1


def test_files_without_a_step_are_ordered_by_name_with_a_note(tmp_path: Path) -> None:
    for epoch, loss in ((0, 0.9), (1, 0.5), (2, 0.7)):
        torch.save({"w": torch.full((2,), float(epoch))}, tmp_path / f"val_loss={loss:.3f}-epoch={epoch}.pt")
    run = open_run(tmp_path)
    assert any("no step stored in or named by" in n for n in run.notes)
