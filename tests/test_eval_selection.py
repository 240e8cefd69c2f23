"""Evaluation that cannot lie: a scored clipped variant is the file ``clip`` writes, the model
says what a buffer is, compiled / DataParallel models load, and the deciding metric is named."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from auditclip.cli import cli

from conftest import SAMPLES

MODEL = str(SAMPLES / "digits_mlp.py") + ":make_model"
DATA = str(SAMPLES / "digits_test.safetensors")
CKPT = SAMPLES / "high_lr" / "epoch_12.safetensors"


def invoke(*args: object):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(cli, [str(a) for a in args])


def _scores(state: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(accuracy, loss) of the sample model with ``state``, by torch alone."""
    spec = importlib.util.spec_from_file_location("digits_mlp_for_selection", SAMPLES / "digits_mlp.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    model = module.make_model()
    model.load_state_dict(state)
    model.eval()
    data = load_file(DATA)
    with torch.no_grad():
        logits = model(data["x"]).double()
    return float((logits.argmax(1) == data["y"]).double().mean()), float(
        torch.nn.functional.cross_entropy(logits, data["y"]))


@pytest.mark.parametrize("where", ["--config", "pyproject"])
def test_evaluated_variant_is_the_file_clip_writes_with_the_same_config(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, where: str) -> None:
    """A config-file exclude is honoured by evaluate --clip as by clip: same weights, same score,
    same count; without the exclude the count is larger (so the exclude was applied, not ignored)."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(CKPT, run / CKPT.name)
    table = '[tool.auditclip]\nexclude = ["net.0.*"]\n\n[tool.auditclip.clip]\nprotect_top = 1\n'
    work = tmp_path / "work"
    work.mkdir()
    if where == "pyproject":
        (work / "pyproject.toml").write_text(table)
        config: list[str] = []
    else:
        (tmp_path / "audit.toml").write_text(table)
        config = ["--config", str(tmp_path / "audit.toml")]
    monkeypatch.chdir(work)
    bound = 0.3
    clipped = invoke("clip", run, "--max-abs", bound, *config, "--out", tmp_path / "clipped")
    assert clipped.exit_code == 0, clipped.output
    evaluated = invoke("evaluate", run, "--model", MODEL, "--data", DATA, "--clip", f"max_abs={bound}", *config,
                       "--out", tmp_path / "e")
    assert evaluated.exit_code == 0, evaluated.output
    assert "note: settings from" in evaluated.output

    report = pd.read_csv(tmp_path / "clipped" / "clip_report.csv")
    ev = pd.read_csv(tmp_path / "e" / "evaluation.csv").set_index("variant")
    written = load_file(str(tmp_path / "clipped" / CKPT.name))
    original = load_file(str(CKPT))
    assert torch.equal(written["net.0.weight"], original["net.0.weight"])  # excluded: untouched
    assert float(written["net.3.weight"].abs().max()) > bound  # protect_top = 1 kept the largest
    accuracy, loss = _scores(written)
    row = ev.loc[f"max_abs={bound:g}"]
    assert row.accuracy == pytest.approx(accuracy, abs=1e-9) and row.loss == pytest.approx(loss, abs=1e-6)
    assert row.n_clipped == report.n_clipped.sum() > 0
    assert row.kind_rule == "model"

    (tmp_path / "empty.toml").write_text("")
    everything = invoke("evaluate", run, "--model", MODEL, "--data", DATA, "--clip", f"max_abs={bound}",
                        "--config", tmp_path / "empty.toml", "--out", tmp_path / "e2")
    assert everything.exit_code == 0, everything.output
    wider = pd.read_csv(tmp_path / "e2" / "evaluation.csv").set_index("variant").loc[f"max_abs={bound:g}"]
    assert wider.n_clipped > row.n_clipped


BUFFER_MODEL = """import torch

class Scaled(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)
        self.register_buffer("scale", torch.ones(3))  # a buffer no name rule knows

    def forward(self, x):
        return self.fc(x) * self.scale

def make():
    return Scaled()

def make_compiled():
    return torch.compile(Scaled())

def make_parallel():
    return torch.nn.DataParallel(Scaled())
"""


@pytest.fixture(scope="module")
def scaled_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, dict[str, torch.Tensor]]:
    """One checkpoint of the Scaled model: fc weights up to ~2, a custom buffer of 5s, and data."""
    root = tmp_path_factory.mktemp("scaled")
    (root / "scaled_model.py").write_text(BUFFER_MODEL)
    g = torch.Generator().manual_seed(3)
    state = {"fc.weight": torch.randn(3, 4, generator=g), "fc.bias": torch.randn(3, generator=g) * 0.1,
             "scale": torch.tensor([5.0, 4.0, 6.0])}
    run = root / "run"
    run.mkdir()
    torch.save(state, run / "step_1.pt")
    x = torch.randn(64, 4, generator=g)
    y = (x @ state["fc.weight"].T).argmax(1)
    save_file({"x": x, "y": y}, str(root / "data.safetensors"))
    return run, root / "scaled_model.py", root / "data.safetensors", state


def _scaled_scores(state: dict[str, torch.Tensor], data: Path) -> tuple[float, float]:
    d = load_file(str(data))
    logits = ((d["x"] @ state["fc.weight"].T + state["fc.bias"]) * state["scale"]).double()
    return float((logits.argmax(1) == d["y"]).double().mean()), float(torch.nn.functional.cross_entropy(logits, d["y"]))


@pytest.mark.parametrize("factory", ["make", "make_compiled", "make_parallel"])
def test_the_model_says_what_a_buffer_is(scaled_run, tmp_path: Path, factory: str) -> None:  # type: ignore[no-untyped-def]
    """register_buffer("scale") is a buffer although its name says nothing: not clipped by default,
    clipped with --buffers. Also through torch.compile (_orig_mod.) and DataParallel (module.) wrappers:
    the compiled model is evaluated through its eager _orig_mod (compiling on CPU needs a C++ toolchain
    and minutes), which the note says."""
    run, model_file, data, state = scaled_run
    bound = 1.0
    result = invoke("evaluate", run, "--model", f"{model_file}:{factory}", "--data", data,
                    "--clip", f"max_abs={bound}", "--out", tmp_path / "e")
    assert result.exit_code == 0, result.output
    assert "1 buffer(s) left unclipped (model rule; --buffers clips them): scale" in result.output
    assert "named_buffers() and the name rule disagree on scale" in result.output  # clip would differ: said
    if factory != "make":
        assert "evaluating the module it wraps" in result.output
    ev = pd.read_csv(tmp_path / "e" / "evaluation.csv").set_index("variant")
    weights_outside = int((state["fc.weight"].abs() > bound).sum() + (state["fc.bias"].abs() > bound).sum())
    assert weights_outside > 0
    row = ev.loc["max_abs=1"]
    assert row.n_clipped == weights_outside and row.kind_rule == "model"
    assert ev.loc["original", "n_loaded"] == ev.loc["original", "n_model_tensors"] == 3
    expected = {k: (v.clamp(-bound, bound) if k != "scale" else v) for k, v in state.items()}
    accuracy, loss = _scaled_scores(expected, data)
    assert row.accuracy == pytest.approx(accuracy, abs=1e-9) and row.loss == pytest.approx(loss, rel=1e-5)
    assert ev.loc["original", "loss"] == pytest.approx(_scaled_scores(state, data)[1], rel=1e-5)

    opted = invoke("evaluate", run, "--model", f"{model_file}:{factory}", "--data", data, "--buffers",
                   "--clip", f"max_abs={bound}", "--out", tmp_path / "b")
    assert opted.exit_code == 0, opted.output
    with_buffers = pd.read_csv(tmp_path / "b" / "evaluation.csv").set_index("variant").loc["max_abs=1"]
    assert with_buffers.n_clipped == weights_outside + 3  # the three scales of 4..6
    clipped_all = {k: v.clamp(-bound, bound) for k, v in state.items()}
    assert with_buffers.loss == pytest.approx(_scaled_scores(clipped_all, data)[1], rel=1e-5)


def test_clip_with_the_model_writes_the_file_evaluate_scored(scaled_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """clip --model: named_buffers() decide for clip as for evaluate, so the scored variant is clip's file."""
    run, model_file, data, state = scaled_run
    result = invoke("clip", run, "--max-abs", 1.0, "--model", f"{model_file}:make", "--out", tmp_path / "c")
    assert result.exit_code == 0, result.output
    report = pd.read_csv(tmp_path / "c" / "clip_report.csv").set_index("tensor")
    assert report.loc["scale", "kind"] == "buffer" and report.loc["scale", "kind_rule"] == "model: named_buffers()"
    clipped = torch.load(tmp_path / "c" / "step_1.pt", weights_only=True)
    assert torch.equal(clipped["scale"], state["scale"])  # the custom buffer is left alone
    ev = invoke("evaluate", run, "--model", f"{model_file}:make", "--data", data, "--clip", "max_abs=1",
                "--out", tmp_path / "e")
    assert ev.exit_code == 0, ev.output
    row = pd.read_csv(tmp_path / "e" / "evaluation.csv").set_index("variant").loc["max_abs=1"]
    assert row.n_clipped == report.n_clipped.sum()
    assert row.accuracy == pytest.approx(_scaled_scores(clipped, data)[0], abs=1e-9)
    assert row.loss == pytest.approx(_scaled_scores(clipped, data)[1], rel=1e-5)
    without = invoke("clip", run, "--max-abs", 1.0, "--out", tmp_path / "n")  # the names alone clip it
    assert without.exit_code == 0
    assert pd.read_csv(tmp_path / "n" / "clip_report.csv").set_index("tensor").loc["scale", "n_clipped"] == 3


def test_a_compiled_factory_is_a_real_compiled_module(scaled_run) -> None:  # type: ignore[no-untyped-def]
    """The fixture's compiled factory really returns torch.compile's wrapper, prefixes and all."""
    _, model_file, _, _ = scaled_run
    spec = importlib.util.spec_from_file_location("scaled_model_check", model_file)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    compiled = module.make_compiled()
    assert type(compiled).__name__ == "OptimizedModule"
    assert set(compiled.state_dict()) == {"_orig_mod.fc.weight", "_orig_mod.fc.bias", "_orig_mod.scale"}
    assert set(module.make_parallel().state_dict()) == {"module.fc.weight", "module.fc.bias", "module.scale"}


def test_primary_metric_chooses_what_the_tolerance_applies_to(tmp_path: Path) -> None:
    values = [0.3, 0.6, 1.0, 2.0]
    args = ("sweep", CKPT, "--model", MODEL, "--data", DATA, "--max-abs", ",".join(map(str, values)))
    by_loss = invoke(*args, "--primary-metric", "loss", "--out", tmp_path / "l")
    assert by_loss.exit_code == 0, by_loss.output
    assert "Decided by loss (lower is better), tolerance 1 % of the original" in by_loss.output
    table = pd.read_csv(tmp_path / "l" / "sweep.csv")
    assert set(table.primary_metric) == {"loss"}
    # the documented rule, by hand: the tightest setting that clips something and keeps loss within 1 %
    base = table[table.variant == "original"].loss.iloc[0]
    ok = table[(table.variant != "original") & (table.n_clipped > 0) & (table.loss <= base * 1.01)]
    expected = ok.sort_values("setting").variant.iloc[0] if len(ok) else None
    assert table[table.recommended].variant.tolist() == ([expected] if expected else [])

    by_accuracy = invoke(*args, "--out", tmp_path / "a")
    assert "Decided by accuracy (higher is better), tolerance 0.5 percentage points" in by_accuracy.output
    acc = pd.read_csv(tmp_path / "a" / "sweep.csv")
    base_acc = acc[acc.variant == "original"].accuracy.iloc[0]
    ok = acc[(acc.variant != "original") & (acc.n_clipped > 0) & ((base_acc - acc.accuracy) * 100 <= 0.5)]
    assert acc[acc.recommended].variant.tolist() == ([ok.sort_values("setting").variant.iloc[0]] if len(ok) else [])
    assert set(acc.primary_metric) == {"accuracy"}

    unknown = invoke(*args, "--primary-metric", "f1", "--out", tmp_path / "u")
    assert unknown.exit_code == 2 and "Traceback" not in unknown.output
    errors = [ln for ln in unknown.output.splitlines() if ln.startswith("Error:")]
    assert errors == ["Error: --primary-metric f1: not a metric of this evaluation; "
                      "available: loss, accuracy, top5_accuracy"]


def test_a_custom_primary_metric_needs_its_direction(tmp_path: Path) -> None:
    (tmp_path / "margin.py").write_text(
        "import torch\n"
        "def margin(outputs, targets):\n"
        "    top2 = outputs.topk(2, 1).values\n"
        "    return {'margin': float((top2[:, 0] - top2[:, 1]).mean())}\n")
    args = ("evaluate", CKPT, "--model", MODEL, "--data", DATA, "--metric", f"{tmp_path / 'margin.py'}:margin")
    vague = invoke(*args, "--primary-metric", "margin", "--out", tmp_path / "v")
    assert vague.exit_code == 2 and "margin:higher or margin:lower" in vague.output
    wrong = invoke(*args, "--primary-metric", "loss:higher", "--out", tmp_path / "w")
    assert wrong.exit_code == 2 and "loss is better when lower" in wrong.output
    ok = invoke(*args, "--primary-metric", "margin:higher", "--out", tmp_path / "o")
    assert ok.exit_code == 0, ok.output
    assert set(pd.read_csv(tmp_path / "o" / "evaluation.csv").primary_metric) == {"margin"}


def test_audit_selection_overrides_and_notes_in_summary(scaled_run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """audit: one --override feeds the rules (off=) and the clipped variants (skip=); the notes said
    during the audit (a buffer left alone, the run's own notes) are in summary.md under Notes."""
    run, model_file, data, state = scaled_run
    (run / "checkpoint-9").mkdir()  # a folder without weights: the run says it left it out
    (run / "checkpoint-9" / "config.json").write_text("{}")
    try:
        result = invoke("audit", run, "--model", f"{model_file}:make", "--data", data, "--clip", "max_abs=1",
                        "--override", "fc.bias:skip=true,off=outlier", "--primary-metric", "loss",
                        "--out", tmp_path / "r")
    finally:
        shutil.rmtree(run / "checkpoint-9")
    assert result.exit_code == 0, result.output
    ev = pd.read_csv(tmp_path / "r" / "evaluation.csv").set_index("variant")
    assert ev.loc["max_abs=1", "n_clipped"] == int((state["fc.weight"].abs() > 1).sum())  # bias skipped
    summary = (tmp_path / "r" / "summary.md").read_text()
    assert "Primary metric (decides the recommendation): loss (lower is better)" in summary
    notes = summary.split("## Notes\n", 1)[1]
    assert "1 buffer(s) left unclipped (model rule; --buffers clips them): scale" in notes
    assert "- checkpoint-9/: ignored: looks like a checkpoint folder but holds no model weights" in notes


def test_the_same_clip_variant_given_twice_is_evaluated_once() -> None:
    from auditclip.evaluation import clip_variants

    variants = clip_variants(["max_abs=0.5", "max_abs=0.5", "max_abs=1"])
    assert [name for name, _ in variants] == ["max_abs=0.5", "max_abs=1"]
