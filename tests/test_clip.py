"""clip: bounds in every dtype, bit-identical elsewhere, formats preserved, safe writes."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file

from auditclip.cli import cli
from auditclip.clip_files import clip_run
from auditclip.clipping import CLIP_REPORT_COLUMNS, clip_state_dict, clip_tensor
from auditclip.config import clip_settings
from auditclip.flags import flag

from conftest import save_safetensors, save_sharded, state_dict


def invoke(*args: object):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(cli, [str(a) for a in args])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.uint8) if a.dtype.itemsize == 1 else a.contiguous().view(torch.int16 if a.dtype.itemsize == 2 else torch.int32 if a.dtype.itemsize == 4 else torch.int64),
                       b.view(torch.uint8) if b.dtype.itemsize == 1 else b.contiguous().view(torch.int16 if b.dtype.itemsize == 2 else torch.int32 if b.dtype.itemsize == 4 else torch.int64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_clip_max_abs_every_dtype(tmp_path: Path, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    src = {"w": (torch.randn(300, 40, generator=g) * 0.02).to(dtype), "b": (torch.randn(40, generator=g) * 0.02).to(dtype),
           "steps": torch.tensor([3, 4], dtype=torch.int64), "mask": torch.tensor([True, False])}
    path = save_safetensors(tmp_path / "in" / "step_1.safetensors", src, {"step": "1", "note": "keep me"})
    before = sha256(path)
    result = invoke("clip", path, "--max-abs", "0.01", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert sha256(path) == before
    out_path = tmp_path / "out" / "step_1.safetensors"
    clipped = load_file(str(out_path))
    for name in ("w", "b"):
        x, y = src[name], clipped[name]
        assert y.dtype == dtype and y.shape == x.shape
        assert float(y.double().abs().max()) <= 0.01
        inside = x.double().abs() <= 0.01
        assert _bits_equal(x[inside], y[inside])
        assert int((~inside).sum()) > 0
    assert torch.equal(clipped["steps"], src["steps"]) and torch.equal(clipped["mask"], src["mask"])
    with safe_open(str(out_path), "pt") as f:
        meta = f.metadata()
    assert meta["note"] == "keep me" and meta["step"] == "1"
    assert meta["auditclip_source_sha256"] == before and meta["auditclip_spec"] == "max_abs=0.01"
    report = pd.read_csv(tmp_path / "out" / "clip_report.csv")
    assert list(report.columns) == list(CLIP_REPORT_COLUMNS)
    w = report.set_index("tensor").loc["w"]
    assert w.n_clipped == int((src["w"].double().abs() > 0.01).sum()) and w.abs_max_after <= 0.01
    # and the clipped checkpoint passes the gate it was clipped for
    assert flag(tmp_path / "out" / "step_1.safetensors", max_abs=0.01).flags.query("rule == 'range'").empty


def test_lightning_ckpt_keeps_every_other_entry(tmp_path: Path) -> None:
    sd = {f"model.{k}": v for k, v in state_dict(2).items()}
    ckpt = {"state_dict": sd, "optimizer_states": [{"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": [{"lr": 0.1}]}],
            "epoch": 3, "global_step": 48, "hyper_parameters": {"lr": 0.1, "hidden": 16}, "pytorch-lightning_version": "2.4.0"}
    src = tmp_path / "ckpts" / "epoch=3-step=48.ckpt"
    src.parent.mkdir()
    torch.save(ckpt, src)
    assert invoke("clip", src.parent, "--max-abs", "0.5", "--out", tmp_path / "out").exit_code == 0
    out = torch.load(tmp_path / "out" / "epoch=3-step=48.ckpt", weights_only=True)
    assert set(out) == set(ckpt)
    assert (out["epoch"], out["global_step"], out["hyper_parameters"]) == (3, 48, {"lr": 0.1, "hidden": 16})
    assert torch.equal(out["optimizer_states"][0]["state"][0]["exp_avg"], torch.ones(3))
    assert float(out["state_dict"]["model.fc1.weight"].abs().max()) <= 0.5
    assert torch.equal(out["state_dict"]["model.bn.num_batches_tracked"], sd["model.bn.num_batches_tracked"])
    # --to safetensors converts the model tensors
    assert invoke("clip", src, "--max-abs", "0.5", "--to", "safetensors", "--out", tmp_path / "st").exit_code == 0
    converted = load_file(str(tmp_path / "st" / "epoch=3-step=48.safetensors"))
    assert torch.equal(converted["model.fc1.weight"], out["state_dict"]["model.fc1.weight"])


def test_sharded_stays_sharded(tmp_path: Path) -> None:
    save_sharded(tmp_path / "run" / "checkpoint-10", state_dict(4), n_shards=2)
    (tmp_path / "run" / "checkpoint-10" / "config.json").write_text('{"hidden": 16}')
    torch.save({"state": {}}, tmp_path / "run" / "checkpoint-10" / "optimizer.pt")
    result = invoke("clip", tmp_path / "run", "--max-abs", "0.5", "--out", tmp_path / "out", "--drop-trainer-state")
    assert result.exit_code == 0, result.output
    assert "not copied" in result.output and "optimizer.pt" in result.output
    folder = tmp_path / "out" / "checkpoint-10"
    assert sorted(p.name for p in folder.iterdir()) == [
        "config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    for name, shard in index["weight_map"].items():
        with safe_open(str(folder / shard), "pt") as f:
            assert name in f.keys()
            if f.get_tensor(name).is_floating_point():
                assert float(f.get_tensor(name).abs().max()) <= 0.5


def test_protect_top_keeps_a_super_weight(tmp_path: Path) -> None:
    w = torch.randn(200, 200, generator=torch.Generator().manual_seed(3)) * 0.02
    w[7, 123] = 5.0
    save_safetensors(tmp_path / "run" / "step_1.safetensors", {"w": w})
    spike = flag(tmp_path / "run").flags.query("rule == 'spike'")
    assert spike[["tensor", "worst_index", "severity"]].values.tolist() == [["w", "[7, 123]", "info"]]
    assert "super weight" in spike.message.iloc[0]
    result = invoke("clip", tmp_path / "run", "--percentile", "99", "--protect-top", "1", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    out = load_file(str(tmp_path / "out" / "step_1.safetensors"))["w"]
    assert out[7, 123].item() == 5.0
    rest = torch.cat([out.flatten()[: 7 * 200 + 123], out.flatten()[7 * 200 + 124:]])
    assert float(rest.abs().max()) < 0.1
    report = pd.read_csv(tmp_path / "out" / "clip_report.csv").iloc[0]
    assert report.n_protected == 1 and report.n_clipped > 0
    # explicit protection of one element works the same way
    t = clip_tensor(w, "max_abs=0.01", name="w", protect=("w[7, 123]",))
    assert t[7, 123].item() == 5.0 and float(t.abs().flatten().topk(2).values[1]) <= 0.01


@pytest.mark.parametrize("spec, lo, hi", [("range=-0.5:0.25", -0.5, 0.25), ("sigma=2", None, None), ("percentile=90", None, None)])
def test_clip_specs(spec: str, lo: float | None, hi: float | None) -> None:
    import numpy as np

    x = torch.randn(5000, generator=torch.Generator().manual_seed(5))
    (out,), (report,) = [clip_state_dict({"x": x}, spec)[0]["x"]], clip_state_dict({"x": x}, spec)[1]
    v = x.double().numpy()
    if spec.startswith("sigma"):
        lo, hi = v.mean() - 2 * v.std(), v.mean() + 2 * v.std()
    elif spec.startswith("percentile"):
        lo, hi = np.percentile(v, 10), np.percentile(v, 90)
    assert float(out.min()) >= lo - 1e-6 and float(out.max()) <= hi + 1e-6
    assert report["n_clipped"] == int(((v < lo) | (v > hi)).sum())


def test_out_equal_to_or_inside_input_is_refused(run_dir: Path, tmp_path: Path) -> None:
    for out in (run_dir, run_dir / "clipped"):
        result = invoke("clip", run_dir, "--max-abs", "1", "--out", out)
        assert result.exit_code == 2 and "Error:" in result.output and "input" in result.output
    single = run_dir / "step_0.safetensors"
    result = invoke("clip", single, "--max-abs", "1", "--out", run_dir)
    assert result.exit_code == 2 and "overwrite the input" in result.output
    assert not (run_dir / "clipped").exists()


def test_existing_output_needs_force_and_dry_run_writes_nothing(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    dry = invoke("clip", run_dir, "--max-abs", "1", "--out", out, "--dry-run")
    assert dry.exit_code == 0 and "Would clip" in dry.output and not out.exists()
    assert invoke("clip", run_dir, "--max-abs", "1", "--out", out).exit_code == 0
    again = invoke("clip", run_dir, "--max-abs", "1", "--out", out)
    assert again.exit_code == 2 and "--force" in again.output
    assert invoke("clip", run_dir, "--max-abs", "1", "--out", out, "--force").exit_code == 0


def test_interrupted_clip_leaves_no_partial_file(run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import auditclip.clip_files as clip_files

    calls = {"n": 0}
    real = clip_files._Clipper.__call__

    def fault(self, name, t, **kw):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 2:  # after the first tensor has been written
            raise KeyboardInterrupt
        return real(self, name, t, **kw)

    monkeypatch.setattr(clip_files._Clipper, "__call__", fault)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        clip_run(run_dir, out, clip_settings(options={"max_abs": 1.0}, search=False))
    assert [p.name for p in out.iterdir()] == []  # neither the final file nor a temporary one


@pytest.mark.parametrize("args, message", [
    (["--max-abs", "1", "--percentile", "99"], "one of --range"),
    (["--percentile", "0"], "between 50 and 100"),
    (["--percentile", "150"], "between 50 and 100"),
    (["--sigma", "-1"], "positive"),
    ([], "no clipping asked for"),
    (["--max-abs", "1", "--protect", "w[1"], "expected NAME[i, j]"),
])
def test_bad_clip_options_exit_2(run_dir: Path, tmp_path: Path, args: list[str], message: str) -> None:
    result = invoke("clip", run_dir, "--out", tmp_path / "o", *args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_read_only_inputs_are_never_opened_for_writing(run_dir: Path, tmp_path: Path) -> None:
    for p in run_dir.iterdir():
        os.chmod(p, 0o444)
    before = {p.name: sha256(p) for p in run_dir.iterdir()}
    assert invoke("clip", run_dir, "--max-abs", "0.1", "--out", tmp_path / "o").exit_code == 0
    assert {p.name: sha256(p) for p in run_dir.iterdir()} == before


def test_python_api_clip_checkpoint(tmp_path: Path) -> None:
    import auditclip

    src = save_safetensors(tmp_path / "a.safetensors", {"w": torch.tensor([0.5, -2.0, 0.001])})
    report = auditclip.clip_checkpoint(src, tmp_path / "b.safetensors", "max_abs=0.1")
    assert report[["tensor", "n_clipped"]].values.tolist() == [["w", 2]]
    assert load_file(str(tmp_path / "b.safetensors"))["w"].tolist() == pytest.approx([0.1, -0.1, 0.001])


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_a_torch_output_records_its_provenance_beside_it(tmp_path: Path, legacy: bool) -> None:
    """A .pt has no metadata of its own: NAME.auditclip.json holds the source's digest and the settings;
    the pickle itself keeps only the user's entries (a strict load_state_dict still works)."""
    run = tmp_path / "run"
    run.mkdir()
    sd = {"fc.weight": torch.tensor([[2.0, -0.5]]), "fc.bias": torch.tensor([3.0])}
    for step in (1, 2):  # different values: identical files would be folded as one checkpoint
        torch.save({k: v * step for k, v in sd.items()}, run / f"step_{step}.pt", _use_new_zipfile_serialization=not legacy)
    result = CliRunner().invoke(cli, ["clip", str(run), "--max-abs", "1", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    for step in (1, 2):
        out = tmp_path / "out" / f"step_{step}.pt"
        record = json.loads((tmp_path / "out" / f"step_{step}.pt.auditclip.json").read_text())
        assert record["auditclip_source_sha256"] == hashlib.sha256((run / f"step_{step}.pt").read_bytes()).hexdigest()
        assert record["auditclip_spec"] == "max_abs=1" and record["auditclip_version"]
        loaded = torch.load(out, weights_only=True)
        assert sorted(loaded) == sorted(sd)
        torch.nn.Linear(2, 1).load_state_dict({k.split(".", 1)[1]: v for k, v in loaded.items()}, strict=True)
    # a clip of the clipped run records the clipped file as its source, never the old record
    again = CliRunner().invoke(cli, ["clip", str(tmp_path / "out"), "--max-abs", "0.5", "--out", str(tmp_path / "again")])
    assert again.exit_code == 0, again.output
    record = json.loads((tmp_path / "again" / "step_1.pt.auditclip.json").read_text())
    assert record["auditclip_source_sha256"] == hashlib.sha256((tmp_path / "out" / "step_1.pt").read_bytes()).hexdigest()
    assert record["auditclip_spec"] == "max_abs=0.5"
