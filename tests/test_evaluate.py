"""evaluate, sweep and audit on the real sample run."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from auditclip import InputError, audit, evaluate, sweep
from auditclip.cli import cli

from conftest import SAMPLES, save_safetensors

MODEL = str(SAMPLES / "digits_mlp.py") + ":make_model"
DATA = str(SAMPLES / "digits_test.safetensors")


def invoke(*args: object):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(cli, [str(a) for a in args])


def _sample_model() -> torch.nn.Module:
    spec = importlib.util.spec_from_file_location("digits_mlp_by_hand", SAMPLES / "digits_mlp.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module.make_model()


def test_accuracy_matches_a_hand_computation() -> None:
    df = evaluate(SAMPLES / "high_lr", MODEL, DATA)
    last = df[df.checkpoint == "epoch_12.safetensors"].iloc[0]
    model = _sample_model()
    model.load_state_dict(load_file(str(SAMPLES / "high_lr" / "epoch_12.safetensors")))
    model.eval()
    data = load_file(DATA)
    with torch.no_grad():
        logits = model(data["x"])
    assert last.accuracy == pytest.approx((logits.argmax(1) == data["y"]).double().mean().item(), abs=1e-6)
    assert last.loss == pytest.approx(torch.nn.functional.cross_entropy(logits.double(), data["y"]).item(), abs=1e-6)
    assert last.top5_accuracy == pytest.approx(
        (logits.topk(5, 1).indices == data["y"][:, None]).any(1).double().mean().item(), abs=1e-6)
    assert df.step.tolist() == [45 * e for e in range(1, 13)]


def test_tiny_bound_kills_the_model_and_a_loose_one_changes_nothing() -> None:
    # 1e-6, not 1e-4: the model's LayerNorms undo the scale of hidden weights until eps (1e-5) dominates
    df = evaluate(SAMPLES / "high_lr" / "epoch_12.safetensors", MODEL, DATA, clips=["max_abs=1e-6", "max_abs=100"])
    rows = df.set_index("variant")
    assert rows.loc["original", "accuracy"] > 0.9
    assert rows.loc["max_abs=1e-06", "accuracy"] < 0.2  # ten classes: chance is 0.1
    assert rows.loc["max_abs=1e-06", "frac_clipped"] > 0.99
    loose = rows.loc["max_abs=100"]
    assert loose.n_clipped == 0 and loose.frac_clipped == 0.0
    assert (loose.delta_loss, loose.delta_accuracy, loose.delta_top5_accuracy) == (0.0, 0.0, 0.0)


def test_sweep_recommends_the_tightest_setting_within_tolerance() -> None:
    ckpt = SAMPLES / "wgan_clip" / "epoch_12.safetensors"
    result = sweep(ckpt, MODEL, DATA, "max_abs", [0.001, 0.005, 0.0095, 0.02])
    t = result.table.set_index("variant")
    base = t.loc["original", "accuracy"]
    within = [v for v in ("max_abs=0.001", "max_abs=0.005", "max_abs=0.0095", "max_abs=0.02")
              if (base - t.loc[v, "accuracy"]) * 100 <= 0.5]
    assert t.recommended.sum() == 1 and t.index[t.recommended].tolist() == [within[0]]
    none = sweep(ckpt, MODEL, DATA, "max_abs", [0.0001, 0.001], tolerance=0.0).table
    assert not none.recommended.any()


def test_sweep_cli_prints_the_recommendation(tmp_path: Path) -> None:
    result = invoke("sweep", SAMPLES / "wgan_clip" / "epoch_12.safetensors", "--model", MODEL, "--data", DATA,
                    "--max-abs", "0.002,0.01", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    # 0.01 clips nothing in a run trained at +-0.01 (it is the original), 0.002 costs accuracy
    assert ("recommended for epoch_12.safetensors: none (no tested setting both changes weights and stays "
            "within tolerance)") in result.output
    table = pd.read_csv(tmp_path / "sweep.csv")
    assert table.variant.tolist() == ["original", "max_abs=0.002", "max_abs=0.01"]
    assert (tmp_path / "sweep.png").stat().st_size > 1000


def test_audit_writes_every_file(tmp_path: Path) -> None:
    result = invoke("audit", SAMPLES / "high_lr", "--model", MODEL, "--data", DATA, "--clip", "max_abs=1.5",
                    "--clip", "max_abs=10", "--out", tmp_path / "r")
    assert result.exit_code == 0, result.output
    names = {p.name for p in (tmp_path / "r").iterdir()}
    assert names == {"stats.csv", "drift.csv", "flags.csv", "evaluation.csv", "summary.md", "report.html",
                     "drift_heatmap.png", "histograms.png", "sweep.png"}
    summary = (tmp_path / "r" / "summary.md").read_text()
    assert "## Top drifting tensors" in summary and "## Flags" in summary and "## Recommendation" in summary
    # max_abs=10 is above every weight: it changes nothing, so it is no recommendation
    assert "recommended clip: none: no tested clip both changes weights and stays within tolerance" in result.output
    ev = pd.read_csv(tmp_path / "r" / "evaluation.csv")
    assert list(ev.columns[:5]) == ["checkpoint", "step", "variant", "n_clipped", "frac_clipped"]
    # the gate works as in flag
    assert invoke("audit", SAMPLES / "high_lr", "--max-abs", "1", "--out", tmp_path / "g").exit_code == 1


def test_audit_without_matplotlib_still_writes_reports(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    audit_module = importlib.import_module("auditclip.audit")  # the package attribute is the function

    monkeypatch.setattr(audit_module, "have_matplotlib", lambda: False)
    result = audit(SAMPLES / "wgan_clip", tmp_path, model=MODEL, data=DATA)
    assert {p.name for p in tmp_path.iterdir()} == {"stats.csv", "drift.csv", "flags.csv", "evaluation.csv", "summary.md",
                                                    "report.html"}
    assert any("pip install 'auditclip[plot]'" in n for n in result.notes)
    assert "pip install 'auditclip[plot]'" in (tmp_path / "summary.md").read_text()


def test_exported_program_and_csv_data(tmp_path: Path) -> None:
    model = _sample_model().eval()
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(model, (torch.zeros(2, 64),), dynamic_shapes={"x": {0: batch}})
    torch.export.save(program, str(tmp_path / "digits.pt2"))
    data = load_file(DATA)
    frame = pd.DataFrame(data["x"].numpy(), columns=[f"px{i}" for i in range(64)])
    frame["label"] = data["y"].numpy()
    frame.to_csv(tmp_path / "heldout.csv", index=False)
    ckpt = SAMPLES / "wgan_clip" / "epoch_12.safetensors"
    via_export = evaluate(ckpt, str(tmp_path / "digits.pt2"), str(tmp_path / "heldout.csv"), target="label")
    via_factory = evaluate(ckpt, MODEL, DATA)
    assert via_export.accuracy.iloc[0] == pytest.approx(via_factory.accuracy.iloc[0], abs=1e-9)
    assert via_export.loss.iloc[0] == pytest.approx(via_factory.loss.iloc[0], rel=1e-6)
    result = invoke("evaluate", ckpt, "--model", tmp_path / "digits.pt2", "--data", tmp_path / "heldout.csv",
                    "--target", "label", "--out", tmp_path / "e")
    assert result.exit_code == 0, result.output


def test_regression_metrics_and_factory_data(tmp_path: Path) -> None:
    (tmp_path / "reg.py").write_text(
        "import torch\n"
        "def make():\n    return torch.nn.Linear(3, 1)\n"
        "def data():\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    x = torch.randn(50, 3, generator=g)\n"
        "    return torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))\n")
    save_safetensors(tmp_path / "ckpt.safetensors", {"weight": torch.ones(1, 3), "bias": torch.zeros(1)})
    df = evaluate(tmp_path / "ckpt.safetensors", f"{tmp_path}/reg.py:make", f"{tmp_path}/reg.py:data", batch_size=7)
    assert df.loss.iloc[0] == pytest.approx(0.0, abs=1e-10) and df.mae.iloc[0] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("setup, message", [
    ("factory_raises", "the factory raised RuntimeError: no GPU here"),
    ("bad_shapes", "the model cannot take inputs of shape [256, 64]"),
    ("bad_keys", "missing: net.0.bias"),
    ("prefixed_keys", "try --strip-prefix model."),
    ("not_a_module", "not a torch.nn.Module"),
    ("missing_data_key", "no inputs key 'x'"),
    ("no_import", "cannot import"),
])
def test_model_and_data_errors_are_one_line_exit_2(tmp_path: Path, setup: str, message: str) -> None:
    (tmp_path / "m.py").write_text(
        "import torch\n"
        "def raises():\n    raise RuntimeError('no GPU here')\n"
        "def wrong_input():\n    return torch.nn.Sequential(torch.nn.Linear(10, 10))\n"
        "def nothing():\n    return 42\n")
    (tmp_path / "broken.py").write_text("import not_a_real_module_xyz\n")
    model, data, run = MODEL, DATA, SAMPLES / "wgan_clip" / "epoch_12.safetensors"
    if setup == "factory_raises":
        model = f"{tmp_path}/m.py:raises"
    elif setup == "bad_shapes":
        model = f"{tmp_path}/m.py:wrong_input"
        save_safetensors(tmp_path / "lin.safetensors", {"0.weight": torch.zeros(10, 10), "0.bias": torch.zeros(10)})
        run = tmp_path / "lin.safetensors"
    elif setup == "bad_keys":
        sd = load_file(str(run))
        del sd["net.0.bias"]
        run = save_safetensors(tmp_path / "k.safetensors", sd)
    elif setup == "prefixed_keys":
        run = save_safetensors(tmp_path / "p.safetensors", {f"model.{k}": v for k, v in load_file(str(run)).items()})
    elif setup == "not_a_module":
        model = f"{tmp_path}/m.py:nothing"
    elif setup == "missing_data_key":
        data = str(save_safetensors(tmp_path / "d.safetensors", {"inputs": torch.zeros(3, 64), "y": torch.zeros(3)}))
    elif setup == "no_import":
        model = f"{tmp_path}/broken.py:make"
    result = invoke("evaluate", run, "--model", model, "--data", data, "--out", tmp_path / "o")
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:") and message in lines[0], result.output
    assert "Traceback" not in result.output


def test_prefix_fix_loads(tmp_path: Path) -> None:
    src = SAMPLES / "wgan_clip" / "epoch_12.safetensors"
    prefixed = save_safetensors(tmp_path / "p.safetensors", {f"model.{k}": v for k, v in load_file(str(src)).items()})
    fixed = evaluate(prefixed, MODEL, DATA, strip_prefix="model.")
    assert fixed.accuracy.iloc[0] == evaluate(src, MODEL, DATA).accuracy.iloc[0]


def test_audit_needs_model_and_data_together(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="go together"):
        audit(SAMPLES / "wgan_clip", tmp_path, model=MODEL)


def test_custom_metric_limit_checkpoint_factory_and_logits_mapping(tmp_path: Path) -> None:
    (tmp_path / "extra.py").write_text(
        "import torch\n"
        "class Wrapped(torch.nn.Module):\n"
        "    def __init__(self, inner):\n        super().__init__()\n        self.inner = inner\n"
        "    def forward(self, x):\n        return {'logits': self.inner(x), 'hidden': x}\n"
        "def make(checkpoint):\n"
        "    import importlib.util\n"
        f"    spec = importlib.util.spec_from_file_location('dm', {str(SAMPLES / 'digits_mlp.py')!r})\n"
        "    m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "    assert str(checkpoint).endswith('epoch_12.safetensors'), checkpoint  # the factory gets the path\n"
        "    return Wrapped(m.make_model())\n"
        "def margin(outputs, targets):\n"
        "    top2 = outputs.topk(2, dim=1).values\n"
        "    return {'margin': float((top2[:, 0] - top2[:, 1]).mean())}\n")
    ckpt = SAMPLES / "wgan_clip" / "epoch_12.safetensors"
    df = evaluate(ckpt, f"{tmp_path}/extra.py:make", DATA, metrics=[f"{tmp_path}/extra.py:margin"], limit=100,
                  batch_size=32, strip_prefix=None, add_prefix="inner.", device="cpu")
    row = df.iloc[0]
    model = _sample_model()
    model.load_state_dict(load_file(str(ckpt)))
    model.eval()
    data = load_file(DATA)
    with torch.no_grad():
        logits = model(data["x"][:100]).double()
    top2 = logits.topk(2, dim=1).values
    assert row.accuracy == pytest.approx((logits.argmax(1) == data["y"][:100]).double().mean().item(), abs=1e-12)
    # custom metrics are sample-weighted over the whole set, not averaged per batch (100 = 32+32+32+4)
    assert row.margin == pytest.approx(float((top2[:, 0] - top2[:, 1]).mean()), rel=1e-6)
    assert "delta_margin" in df.columns


def test_device_cuda_without_a_gpu_is_a_clean_error(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    result = invoke("evaluate", SAMPLES / "wgan_clip" / "epoch_12.safetensors", "--model", MODEL, "--data", DATA,
                    "--device", "cuda", "--out", tmp_path)
    assert result.exit_code == 2 and "Error: --device cuda: no CUDA device" in result.output
