"""Buffers are not weights: a real BatchNorm model's running statistics are never clipped or gated by default."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from auditclip.cli import cli

MODEL = """import torch

def make():
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
                               torch.nn.Linear(16, 3))
"""


def invoke(*args: object):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture
def bn_run(tmp_path: Path) -> tuple[Path, float, Path, Path]:
    """Three checkpoints of a BatchNorm MLP trained by torch on inputs of scale 30,
    so its running variances (hundreds) dwarf every parameter."""
    (tmp_path / "bn_model.py").write_text(MODEL)
    namespace: dict = {}
    exec(MODEL, namespace)
    torch.manual_seed(0)
    model = namespace["make"]()
    x = torch.randn(240, 8) * 30
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    run = tmp_path / "run"
    run.mkdir()
    for epoch in (1, 2, 3):
        model.train()
        for i in range(0, 240, 40):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x[i:i + 40]), y[i:i + 40]).backward()
            optimizer.step()
        torch.save(model.state_dict(), run / f"epoch_{epoch}.pt")
    save_file({"x": x[:120].contiguous(), "y": y[:120].contiguous()}, str(tmp_path / "heldout.safetensors"))
    bound = max(float(p.detach().abs().max()) for p in model.parameters()) * 1.5
    assert float(model[1].running_var.max()) > 10 * bound
    return run, bound, tmp_path / "bn_model.py", tmp_path / "heldout.safetensors"


def test_clip_above_every_parameter_changes_no_weight_and_leaves_running_stats(bn_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    run, bound, model_file, _ = bn_run
    result = invoke("clip", run, "--max-abs", bound, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    report = pd.read_csv(tmp_path / "out" / "clip_report.csv")
    assert report.n_clipped.sum() == 0
    buffers = report[report.kind == "buffer"]
    assert set(buffers.tensor) == {"1.running_mean", "1.running_var"}  # num_batches_tracked is an integer
    assert buffers.spec.eq("none (buffer; --buffers clips it)").all()
    assert buffers.kind_rule.str.startswith("name: running_").all()
    assert set(report[report.kind == "parameter"].tensor) == {"0.weight", "0.bias", "1.weight", "1.bias",
                                                             "3.weight", "3.bias"}
    for path in run.iterdir():  # every tensor bit for bit: the framework's own loader agrees
        original = torch.load(path, weights_only=True)
        clipped = torch.load(tmp_path / "out" / path.name, weights_only=True)
        assert original.keys() == clipped.keys()
        assert all(torch.equal(original[k], clipped[k]) for k in original)

    opted = invoke("clip", run, "--max-abs", bound, "--buffers", "--out", tmp_path / "with_buffers")
    assert opted.exit_code == 0, opted.output
    report = pd.read_csv(tmp_path / "with_buffers" / "clip_report.csv")
    assert report.set_index(["checkpoint", "tensor"]).loc[("epoch_3.pt", "1.running_var"), "n_clipped"] > 0
    clipped = torch.load(tmp_path / "with_buffers" / "epoch_3.pt", weights_only=True)
    assert float(clipped["1.running_var"].max()) <= bound


def test_flag_max_abs_ignores_running_statistics_unless_asked(bn_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    run, bound, _, _ = bn_run
    gate = invoke("flag", run, "--max-abs", bound, "--out", tmp_path / "f")
    assert gate.exit_code == 0, gate.output
    assert "range" not in set(pd.read_csv(tmp_path / "f" / "flags.csv").rule)
    strict = invoke("flag", run, "--max-abs", bound, "--buffers", "--out", tmp_path / "g")
    assert strict.exit_code == 1, strict.output
    flags = pd.read_csv(tmp_path / "g" / "flags.csv")
    flagged = set(flags[flags.rule == "range"].tensor)
    assert "1.running_var" in flagged and flagged <= {"1.running_var", "1.running_mean"}


def test_stats_and_drift_mark_each_tensor_kind(bn_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    run, _, _, _ = bn_run
    assert invoke("drift", run, "--out", tmp_path / "d").exit_code == 0
    stats = pd.read_csv(tmp_path / "d" / "stats.csv", keep_default_na=False)
    kinds = dict(zip(stats.tensor, stats.kind))
    assert kinds["1.running_var"] == kinds["1.num_batches_tracked"] == "buffer"
    assert kinds["0.weight"] == kinds["1.bias"] == "parameter" and kinds["__all__"] == ""
    drift = pd.read_csv(tmp_path / "d" / "drift.csv", keep_default_na=False)
    assert set(drift[drift.tensor == "1.running_mean"].kind) == {"buffer"}


def test_evaluated_clipped_variant_keeps_the_models_accuracy(bn_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    run, bound, model_file, data = bn_run
    result = invoke("evaluate", run, "--model", f"{model_file}:make", "--data", data,
                    "--clip", f"max_abs={bound}", "--out", tmp_path / "e")
    assert result.exit_code == 0, result.output
    ev = pd.read_csv(tmp_path / "e" / "evaluation.csv")
    clipped = ev[ev.variant != "original"]
    assert clipped.n_clipped.eq(0).all()
    assert clipped.delta_accuracy.eq(0).all() and clipped.delta_loss.eq(0).all()


def test_no_strict_that_loads_nothing_is_an_error_not_a_random_model(bn_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    run, _, model_file, data = bn_run
    (tmp_path / "other.py").write_text(
        "import torch\n"
        "class Head(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.head = torch.nn.Linear(8, 3)\n"
        "    def forward(self, x):\n"
        "        return self.head(x)\n"
        "def make():\n"
        "    return Head()\n")
    result = invoke("evaluate", run, "--model", f"{tmp_path / 'other.py'}:make", "--data", data, "--no-strict",
                    "--out", tmp_path / "e")
    assert result.exit_code == 2, result.output
    assert "--no-strict would load only 0 of the model's 2 tensors" in result.output
    ok = invoke("evaluate", run, "--model", f"{model_file}:make", "--data", data, "--out", tmp_path / "e2")
    assert ok.exit_code == 0, ok.output
    ev = pd.read_csv(tmp_path / "e2" / "evaluation.csv")
    # two Linear layers' weight and bias, BatchNorm's weight, bias and three buffers
    assert ev.n_loaded.eq(9).all() and ev.n_model_tensors.eq(9).all()


def test_a_factory_gets_the_checkpoints_real_path_from_any_directory(bn_run, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    run, _, _, data = bn_run
    (tmp_path / "reads_config.py").write_text(
        "import json, pathlib, torch\n"
        "def make(checkpoint):\n"
        "    config = json.loads((pathlib.Path(checkpoint).parent / 'config.json').read_text())\n"
        "    return torch.nn.Sequential(torch.nn.Linear(8, config['hidden']), torch.nn.BatchNorm1d(config['hidden']),\n"
        "                               torch.nn.ReLU(), torch.nn.Linear(config['hidden'], 3))\n")
    (run / "config.json").write_text('{"hidden": 16}')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = invoke("evaluate", run, "--model", f"{tmp_path / 'reads_config.py'}:make", "--data", data,
                    "--out", tmp_path / "e3")
    assert result.exit_code == 0, result.output


def test_values_inside_an_explicit_bound_are_never_outliers(tmp_path: Path) -> None:
    """A WGAN critic clipped to +-0.01: most weights sit at the bound, the MAD collapses, and
    a value at 0.008 would have a huge robust z-score. Inside --max-abs it is never flagged."""
    from auditclip import flag

    run = tmp_path / "run"
    run.mkdir()
    w = torch.full((200,), 0.01)
    w[:100] = -0.01
    w[5] = 0.0001  # the MAD is 0: only this one sits off the bound
    w[7] = 0.008
    for step in (1, 2):
        save_file({"critic.weight": w.clone()}, str(run / f"step_{step}.safetensors"))
    free = flag(run)  # no bound given: the robust rule sees what it sees
    bounded = flag(run, max_abs=0.01)
    assert "outlier" not in set(bounded.flags.rule) and not bounded.failed
    # the MAD (0.001) collapsed onto the pile at +c: the IQR is the scale, so no bound is needed either
    assert "outlier" not in set(free.flags.rule)  # (flags.outlier_scale; tests/test_rules_constants.py)
    w[9] = 0.5  # outside the bound: a range error (and may be an outlier)
    save_file({"critic.weight": w.clone()}, str(run / "step_3.safetensors"))
    assert flag(run, max_abs=0.01).flags.query("rule == 'range'").shape[0] == 1


def test_config_buffers_true_clips_running_stats_in_clip_and_evaluate_alike(bn_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """``buffers = true`` under [tool.auditclip.clip] reaches the evaluated variants as it reaches clip:
    the variant clips the same values and scores as the model loaded from clip's file."""
    run, bound, model_file, data = bn_run
    config = tmp_path / "audit.toml"
    config.write_text("[clip]\nbuffers = true\n")
    last = run / "epoch_3.pt"
    assert invoke("clip", last, "--max-abs", bound, "--config", config, "--out", tmp_path / "c").exit_code == 0
    report = pd.read_csv(tmp_path / "c" / "clip_report.csv")
    assert report.set_index("tensor").loc["1.running_var", "n_clipped"] > 0
    result = invoke("evaluate", last, "--model", f"{model_file}:make", "--data", data, "--config", config,
                    "--clip", f"max_abs={bound}", "--out", tmp_path / "e")
    assert result.exit_code == 0, result.output
    row = pd.read_csv(tmp_path / "e" / "evaluation.csv").iloc[1]
    assert row.n_clipped == report.n_clipped.sum()
    namespace: dict = {}
    exec(MODEL, namespace)
    model = namespace["make"]()
    model.load_state_dict(torch.load(tmp_path / "c" / "epoch_3.pt", weights_only=True))
    model.eval()
    heldout = load_file(str(data))
    with torch.no_grad():
        logits = model(heldout["x"]).double()
    assert row.loss == pytest.approx(float(torch.nn.functional.cross_entropy(logits, heldout["y"])), rel=1e-6)
    assert row.accuracy == pytest.approx(float((logits.argmax(1) == heldout["y"]).double().mean()), abs=1e-9)
