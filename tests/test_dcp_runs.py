"""Runs of torch.distributed.checkpoint folders, end to end through discovery, the reader and the CLI.

The folders are written by ``torch.distributed.checkpoint.save`` itself (one process,
no process group) and, for Lightning, by ``FSDPStrategy.save_checkpoint`` itself
(sharded state dict: its CPU-only refusal is in ``setup``, not in the save). The
same weights are saved as safetensors too: both runs must give the same statistics.
"""

from __future__ import annotations

import csv
import os
import pickle
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from auditclip.analysis import analyze
from auditclip.checkpoints import open_run
from auditclip.errors import CheckpointError
from auditclip.formats.readers import open_checkpoint_file
from conftest import assert_same_stats, csv_rows, invoke_cli, record_live_tensors, save_safetensors

dcp = pytest.importorskip("torch.distributed.checkpoint")

STEPS = (10, 20, 30)


def _save_dcp(state: dict[str, Any], folder: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        dcp.save(state, checkpoint_id=folder)
    return folder


def _net() -> nn.Module:
    # 9 tensors: weights, biases, BatchNorm's running statistics and its int64 counter
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(8, 6)).pow(2).mean().backward()
        opt.step()


def _clone(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``step-10/ step-20/ step-30/`` DCP folders holding model + Adam state, the same weights as safetensors."""
    base = tmp_path_factory.mktemp("dcp-runs")
    torch.manual_seed(0)
    model = _net()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    weights: dict[int, dict[str, torch.Tensor]] = {}
    done = 0
    for step in STEPS:
        _train(model, opt, step - done)
        done = step
        weights[step] = _clone(model)
        _save_dcp({"model": model.state_dict(), "optim": opt.state_dict()}, base / "dcp" / f"step-{step}")
        save_safetensors(base / "st" / f"step_{step}.safetensors", weights[step])
    return {"dcp": base / "dcp", "st": base / "st", "weights": weights,
            "parameters": [n for n, _ in model.named_parameters()]}



def test_drift_of_a_dcp_run_equals_the_same_weights_as_safetensors(runs: dict[str, Any], tmp_path: Path) -> None:
    result = invoke_cli("drift", str(runs["dcp"]), "--out", str(tmp_path / "dcp"))
    assert result.exit_code == 0, result.output
    assert invoke_cli("drift", str(runs["st"]), "--out", str(tmp_path / "st")).exit_code == 0
    assert_same_stats(tmp_path / "dcp", tmp_path / "st")

    rows = csv_rows(tmp_path / "dcp" / "stats.csv")
    # the model's tensors only, under their own names: no optimizer state (exp_avg...), no "model." prefix
    assert {r["tensor"] for r in rows} - {"__all__"} == set(runs["weights"][10])
    assert [r["checkpoint"] for r in rows if r["tensor"] == "__all__"] == ["step-10", "step-20", "step-30"]
    assert "note: DCP checkpoints: optim.* (optimizer or training state, not weights) left out" in result.output
    # an independent check of the values: numpy on the weights that were saved
    checked = 0
    for r in rows:
        saved = runs["weights"][int(r["step"])].get(r["tensor"])
        if saved is not None and saved.is_floating_point():
            checked += 1
            a = saved.double().numpy()
            assert float(r["abs_max"]) == pytest.approx(np.abs(a).max(), rel=1e-6)
            assert float(r["l2_norm"]) == pytest.approx(np.sqrt((a * a).sum()), rel=1e-6)
    assert checked == 3 * 8


def test_discovery_lists_dcp_folders_and_the_reader_reads_no_data_until_asked(
        runs: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[int] = []
    real_pread = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, off: reads.append(n) or real_pread(fd, n, off))
    run = open_run(runs["dcp"])
    assert [(c.label, c.step, c.format) for c in run] == [(f"step-{s}", s, "dcp") for s in STEPS]
    for c in run:
        with c.open() as reader:
            assert reader.names() == list(runs["weights"][c.step])
            infos = {n: reader.info(n) for n in reader.names()}
    assert reads == []  # names, dtypes and shapes come from .metadata alone
    assert infos["1.running_var"].shape == (16,) and infos["1.num_batches_tracked"].dtype == "int64"

    # the folder and its .metadata open the same checkpoint; a tensor is one record read
    for given in (runs["dcp"] / "step-30", runs["dcp"] / "step-30" / ".metadata"):
        with open_checkpoint_file(given) as reader:
            got = reader.get("0.weight")
        assert torch.equal(got, runs["weights"][30]["0.weight"])
    assert len(reads) == 2
    # --key reads another entry of the state dict: here, the optimizer's
    with open_checkpoint_file(runs["dcp"] / "step-10", key="optim") as reader:
        assert "state.0.exp_avg" in reader.names()
    with pytest.raises(CheckpointError, match="no tensors under the entry 'ema'.*entries: model, optim"):
        open_checkpoint_file(runs["dcp"] / "step-10", key="ema")


def test_the_reader_holds_one_tensor_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(3)
    names = [f"layer.{i}.weight" for i in range(6)]  # above TINY_MAX: walked one name at a time
    for step in (1, 2, 3, 4):
        _save_dcp({"model": {n: torch.randn(40, 40, generator=g) for n in names},
                   "optimizer": {"state": {n: {"exp_avg": torch.zeros(40, 40)} for n in names}}},
                  tmp_path / f"step-{step}")
    peak = record_live_tensors(monkeypatch)
    result = analyze(tmp_path, workers=1)
    assert len(result.stats) == 4 * (6 + 1)
    # the reference, the previous and the current version of one tensor: never a checkpoint's 6 (or 12)
    assert 1 <= peak["peak"] <= 3


def test_flag_max_abs_on_a_dcp_run_flags_what_numpy_says(runs: dict[str, Any], tmp_path: Path) -> None:
    values = np.concatenate([runs["weights"][s][n].abs().flatten().numpy() for s in STEPS for n in runs["parameters"]])
    limit = float(np.quantile(values, 0.97))
    result = invoke_cli("flag", str(runs["dcp"]), "--max-abs", f"{limit:.6g}", "--out", str(tmp_path / "out"))
    assert result.exit_code in (0, 1), result.output
    limit = float(f"{limit:.6g}")
    expected = {}
    for s in STEPS:
        for n in runs["parameters"]:
            a = runs["weights"][s][n].double().numpy()
            outside = np.abs(a) > limit
            if outside.any():
                expected[(s, n)] = (int(outside.sum()), float(a.flat[np.argmax(np.abs(a))]))
    assert 2 <= len(expected) < 3 * len(runs["parameters"])  # some flagged, some not
    flagged = {(int(r["step"]), r["tensor"]): (int(r["count"]), float(r["worst_value"]))
               for r in csv_rows(tmp_path / "out" / "flags.csv") if r["rule"] == "range"}
    assert flagged.keys() == expected.keys()
    for where, (count, worst) in expected.items():
        assert flagged[where][0] == count and flagged[where][1] == pytest.approx(worst, rel=1e-6)


class _System:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (self.command,)


@pytest.mark.parametrize("damage", ["truncated storage", "hostile metadata"])
def test_a_broken_dcp_folder_is_an_error_row_and_the_rest_is_audited(
        damage: str, runs: dict[str, Any], tmp_path: Path) -> None:
    run = shutil.copytree(runs["dcp"], tmp_path / "run")
    marker = tmp_path / "pwned"
    if damage == "truncated storage":
        storage = run / "step-20" / "__0_0.distcp"
        storage.write_bytes(storage.read_bytes()[:-100])
    else:  # listing the run (the stored step) and reading it both meet it: it never runs
        (run / "step-20" / ".metadata").write_bytes(pickle.dumps(_System(f"touch {marker}")))
    result = invoke_cli("drift", str(run), "--out", str(tmp_path / "out"))
    assert result.exit_code == 1
    errors = csv_rows(tmp_path / "out" / "errors.csv")
    kind, text = {"truncated storage": ("unreadable", "truncated"), "hostile metadata": ("unsafe", "refused")}[damage]
    assert [(r["checkpoint"], r["error"]) for r in errors] == [("step-20", kind)]
    assert text in errors[0]["message"] and not marker.exists()
    stats = csv_rows(tmp_path / "out" / "stats.csv")
    assert {(r["checkpoint"], r["tensor"]) for r in stats} == {
        (f"step-{s}", n) for s in (10, 30) for n in [*runs["weights"][10], "__all__"]}


def test_an_optimizer_only_folder_is_not_read_as_weights(tmp_path: Path) -> None:
    model = nn.Linear(2, 2)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(3, 2)).sum().backward()
    opt.step()
    folder = _save_dcp({"optimizer": opt.state_dict()}, tmp_path / "step-1")
    with pytest.raises(CheckpointError, match="holds no model tensors, only optimizer.*"):
        open_checkpoint_file(folder)


# --------------------------------------------------------------------------- Lightning FSDP

@pytest.fixture(scope="module")
def lightning_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``epoch=E-step=N.ckpt/`` folders and a ``last.ckpt/`` written by Lightning's FSDPStrategy (sharded)."""
    pl = pytest.importorskip("lightning.pytorch")
    from lightning.pytorch.strategies import FSDPStrategy

    base = tmp_path_factory.mktemp("lightning-fsdp")
    strategy = FSDPStrategy(state_dict_type="sharded")
    torch.manual_seed(1)
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    weights: dict[int, dict[str, torch.Tensor]] = {}
    done = 0
    for epoch, (step, name) in enumerate([(4, "epoch=0-step=4.ckpt"), (8, "epoch=1-step=8.ckpt"),
                                          (12, "epoch=2-step=12.ckpt"), (14, "last.ckpt")]):
        _train(model, opt, step - done)
        done = step
        weights[step] = _clone(model)
        # what Lightning's _CheckpointConnector.dump_checkpoint hands the strategy
        checkpoint = {"epoch": epoch, "global_step": step, "pytorch-lightning_version": pl.__version__,
                      "state_dict": model.state_dict(), "loops": {"fit_loop": {"epoch_progress": {}}},
                      "callbacks": {}, "optimizer_states": [opt.state_dict()], "lr_schedulers": []}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            strategy.save_checkpoint(checkpoint, base / "run" / name)
        save_safetensors(base / "st" / f"step_{step}.safetensors", weights[step])
    return {"run": base / "run", "st": base / "st", "weights": weights}


def test_a_lightning_fsdp_sharded_run_is_found_ordered_and_read(lightning_run: dict[str, Any], tmp_path: Path) -> None:
    run_dir = lightning_run["run"]
    first = run_dir / "epoch=0-step=4.ckpt"
    assert sorted(os.listdir(first)) == [".metadata", "__0_0.distcp", "meta.pt"]  # the layout the issue names

    run = open_run(run_dir)
    # last.ckpt/ has no step in its name: the one in its meta.pt (global_step) orders it
    assert [(c.label, c.step, c.format) for c in run] == [
        ("epoch=0-step=4.ckpt", 4, "dcp"), ("epoch=1-step=8.ckpt", 8, "dcp"),
        ("epoch=2-step=12.ckpt", 12, "dcp"), ("last.ckpt", 14, "dcp")]
    assert run.notes == []
    # one folder named on its own is one checkpoint, never "no tensors ... pick one with --key"
    single = open_run(first)
    assert [(c.label, c.step) for c in single] == [("epoch=0-step=4.ckpt", 4)]
    with single[0].open() as reader:
        assert reader.names() == list(lightning_run["weights"][4])

    result = invoke_cli("drift", str(run_dir), "--out", str(tmp_path / "dcp"))
    assert result.exit_code == 0, result.output
    assert "optimizer_0.* (optimizer or training state, not weights) left out" in result.output
    assert invoke_cli("drift", str(lightning_run["st"]), "--out", str(tmp_path / "st")).exit_code == 0
    assert_same_stats(tmp_path / "dcp", tmp_path / "st")


def test_inspect_and_audit_read_a_dcp_folder(lightning_run: dict[str, Any], tmp_path: Path) -> None:
    result = invoke_cli("inspect", str(lightning_run["run"] / "epoch=1-step=8.ckpt"), "--format", "csv")
    assert result.exit_code == 0, result.output
    rows = {r["tensor"]: r for r in csv.DictReader(line for line in result.output.splitlines()
                                                   if not line.startswith("note:"))}
    want = lightning_run["weights"][8]["3.weight"].double().numpy()
    assert float(rows["3.weight"]["abs_max"]) == pytest.approx(np.abs(want).max(), rel=1e-6)

    result = invoke_cli("audit", str(lightning_run["run"]), "--out", str(tmp_path / "audit"))
    assert result.exit_code == 0, result.output
    summary = (tmp_path / "audit" / "summary.md").read_text(encoding="utf-8")
    assert "- formats: dcp" in summary and "optimizer_0.*" in summary


def _load_dcp(state: dict[str, Any], folder: Path) -> dict[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(state, checkpoint_id=folder)
    return state


def _inward(c: float) -> np.float32:
    """The largest float32 not above ``c``: the bound auditclip clamps float32 weights to (never beyond ``c``)."""
    return np.nextafter(np.float32(c), np.float32(0)) if float(np.float32(c)) > c else np.float32(c)


def _fresh_state() -> dict[str, Any]:
    """A model and Adam state dict of the run's shapes, for dcp.load to fill in place."""
    model = _net()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    _train(model, opt, 1)  # Adam's state exists only after a step
    return {"model": model.state_dict(), "optim": opt.state_dict()}


def test_a_clipped_dcp_run_loads_with_dcp_load_as_numpys_clamp(runs: dict[str, Any], tmp_path: Path) -> None:
    """clip writes DCP folders torch's own dcp.load reads back: parameters clamped (numpy), buffers and the
    optimizer state as saved, .metadata byte for byte; the input untouched."""
    c = 0.3
    before = {p: p.read_bytes() for p in runs["dcp"].rglob("*") if p.is_file()}
    result = invoke_cli("clip", runs["dcp"], "--max-abs", c, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert before == {p: p.read_bytes() for p in runs["dcp"].rglob("*") if p.is_file()}
    bound = _inward(c)
    report = csv_rows(tmp_path / "out" / "clip_report.csv")
    for step in STEPS:
        src, out = runs["dcp"] / f"step-{step}", tmp_path / "out" / f"step-{step}"
        assert (out / ".metadata").read_bytes() == (src / ".metadata").read_bytes()
        clipped, original = _load_dcp(_fresh_state(), out), _load_dcp(_fresh_state(), src)
        for name, want in runs["weights"][step].items():
            got = clipped["model"][name].numpy()
            if name in runs["parameters"]:
                np.testing.assert_array_equal(got, np.clip(want.numpy(), -bound, bound), err_msg=name)
                row = next(r for r in report if r["checkpoint"] == f"step-{step}" and r["tensor"] == name)
                assert int(row["n_clipped"]) == int((np.abs(want.numpy()) > bound).sum())
            else:  # BatchNorm's running statistics: buffers, left alone
                np.testing.assert_array_equal(got, want.numpy(), err_msg=name)
        for i, moments in original["optim"]["state"].items():
            for k, v in moments.items():
                assert torch.equal(clipped["optim"]["state"][i][k], v), (step, i, k)
    assert any(int(r["n_clipped"]) for r in report)


def test_a_clipped_lightning_fsdp_folder_keeps_its_layout_and_loads(lightning_run: dict[str, Any], tmp_path: Path) -> None:
    c = 0.2
    result = invoke_cli("clip", lightning_run["run"], "--max-abs", c, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    for name, step in (("epoch=0-step=4.ckpt", 4), ("last.ckpt", 14)):
        src, out = lightning_run["run"] / name, tmp_path / "out" / name
        assert sorted(p.name for p in out.iterdir()) == [".metadata", ".metadata.auditclip.json", "__0_0.distcp",
                                                        "meta.pt"]
        assert (out / "meta.pt").read_bytes() == (src / "meta.pt").read_bytes()
        state = _load_dcp({"model": _net().state_dict()}, out)["model"]
        for key, want in lightning_run["weights"][step].items():
            if key.endswith(("running_mean", "running_var", "num_batches_tracked")):
                assert torch.equal(state[key], want), key
            else:
                np.testing.assert_array_equal(state[key].numpy(), np.clip(want.numpy(), -_inward(c), _inward(c)))
    assert [c_.step for c_ in open_run(tmp_path / "out")] == [4, 8, 12, 14]


def test_a_torchtitan_dump_folder_is_a_run_ordered_by_its_train_state(tmp_path: Path) -> None:
    """torchtitan: model keys at the top level, ``train_state.step`` a tensor, under ``checkpoint/step-N/``."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    torch.manual_seed(2)
    model = _net()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    for step, name in [(5, "step-5"), (10, "step-10"), (15, "latest")]:
        _train(model, opt, 5)
        msd, osd = get_state_dict(model, opt)
        _save_dcp({**msd, "optimizer": osd, "lr_scheduler": {"last_epoch": torch.tensor(step)},
                   "train_state": {"step": torch.tensor(step, dtype=torch.int32)}},
                  tmp_path / "dump" / "checkpoint" / name)
    run = open_run(tmp_path / "dump")
    # latest/ has no step in its name: train_state.step puts it last, at 15
    assert [(c.label, c.step, c.format) for c in run] == [
        ("checkpoint/step-5", 5, "dcp"), ("checkpoint/step-10", 10, "dcp"), ("checkpoint/latest", 15, "dcp")]
    with run[2].open() as reader:
        assert reader.names() == list(model.state_dict())
        assert torch.equal(reader.get("3.weight"), model.state_dict()["3.weight"])


def test_an_accelerate_fsdp_sharded_project_is_a_run(runs: dict[str, Any], tmp_path: Path) -> None:
    """accelerate's save_state() with FSDP SHARDED_STATE_DICT (accelerate/utils/fsdp_utils.py): per checkpoint
    ``pytorch_model_fsdp_0/`` = dcp.save({"model": ...}) and ``optimizer_0/`` = dcp.save({"optimizer": ...})."""
    for i, step in enumerate(STEPS):
        folder = tmp_path / "project" / "checkpoints" / f"checkpoint_{i}"
        _save_dcp({"model": runs["weights"][step]}, folder / "pytorch_model_fsdp_0")
        _save_dcp({"optimizer": {"state": {"0.weight": {"exp_avg": torch.zeros(2)}}}}, folder / "optimizer_0")
        torch.save({"step": step}, folder / "random_states_0.pkl")
    run = open_run(tmp_path / "project")
    assert [(c.label, c.step, c.format, c.weights.name) for c in run] == [
        (f"checkpoints/checkpoint_{i}", i, "dcp", "pytorch_model_fsdp_0") for i in range(3)]
    assert sorted(p.name for p in run.ignored) == ["optimizer_0"] * 3
    with run[2].open() as reader:
        assert torch.equal(reader.get("3.bias"), runs["weights"][30]["3.bias"])


def test_a_clipped_accelerate_fsdp_project_keeps_its_optimizer_folders(runs: dict[str, Any], tmp_path: Path) -> None:
    """accelerate's load_state needs optimizer_0/ beside pytorch_model_fsdp_0/: copied byte for byte
    (a note says the optimizer state is copied), the model's DCP folder clipped."""
    folder = tmp_path / "project" / "checkpoints" / "checkpoint_0"
    _save_dcp({"model": runs["weights"][30]}, folder / "pytorch_model_fsdp_0")
    _save_dcp({"optimizer": {"state": {"0.weight": {"exp_avg": torch.ones(2)}}}}, folder / "optimizer_0")
    torch.save({"step": 1}, folder / "random_states_0.pkl")
    result = invoke_cli("clip", tmp_path / "project", "--max-abs", 0.1, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    out = tmp_path / "out" / "checkpoints" / "checkpoint_0"
    for name in ("optimizer_0/.metadata", "optimizer_0/__0_0.distcp", "random_states_0.pkl"):
        assert (out / name).read_bytes() == (folder / name).read_bytes(), name
    assert "optimizer/scheduler state copied as is (optimizer_0/.metadata, optimizer_0/__0_0.distcp, " \
           "random_states_0.pkl)" in result.output
    state = _load_dcp({"model": _net().state_dict()}, out / "pytorch_model_fsdp_0")["model"]
    want = runs["weights"][30]["0.weight"].numpy()
    np.testing.assert_array_equal(state["0.weight"].numpy(), np.clip(want, -_inward(0.1), _inward(0.1)))


def test_drop_trainer_state_is_refused_for_dcp_folders(runs: dict[str, Any], tmp_path: Path) -> None:
    result = invoke_cli("clip", runs["dcp"], "--max-abs", 0.1, "--out", tmp_path / "out", "--drop-trainer-state")
    assert result.exit_code == 2 and "same storage files" in result.output and not (tmp_path / "out").exists()
