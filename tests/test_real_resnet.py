"""A convolutional ResNet with BatchNorm, trained by torch and saved as torch saves it.

Its running variances are statistics of the activations, far above any weight; a
clip bound above every parameter must change nothing, in ``clip``, ``evaluate``
and ``sweep``, and the model must keep its accuracy bit for bit. Clipping the
running statistics too (``--buffers``) is what wrecks such a model: the test shows
that the difference is real, so the default protects something.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from auditclip.cli import cli

MODEL = '''import torch
from torch import nn


class Block(nn.Module):
    """A ResNet basic block: conv-BN-ReLU-conv-BN plus the identity."""

    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(y)))


class ResNet(nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.layer1 = nn.Sequential(Block(8), Block(8))
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer1(x)
        return self.fc(x.mean(dim=(2, 3)))


def make():
    return ResNet()
'''


def invoke(*args: object):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(cli, [str(a) for a in args])


def _images(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Three classes told apart by where a bright square sits; pixel scale 40, so the
    first BatchNorm's running variance is in the hundreds."""
    y = torch.randint(0, 3, (n,), generator=generator)
    x = torch.randn(n, 1, 8, 8, generator=generator)
    for i, cls in enumerate(y.tolist()):
        x[i, 0, 2 * cls:2 * cls + 3, 2:5] += 3.0
    return x * 40, y


@pytest.fixture(scope="module")
def resnet_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("resnet")
    model_file = root / "resnet.py"
    model_file.write_text(MODEL)
    spec = importlib.util.spec_from_file_location("resnet_model", model_file)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = module.make()
    x, y = _images(384, g)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    run = root / "run"
    run.mkdir()
    for epoch in (1, 2, 3):
        model.train()
        for i in range(0, 384, 32):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(x[i:i + 32]), y[i:i + 32]).backward()
            optimizer.step()
        torch.save(model.state_dict(), run / f"epoch_{epoch}.pt")
    x_test, y_test = _images(192, g)
    data = root / "heldout.safetensors"
    save_file({"x": x_test.contiguous(), "y": y_test.contiguous()}, str(data))
    model.eval()
    with torch.no_grad():
        accuracy = float((model(x_test).argmax(1) == y_test).float().mean())
    bound = max(float(p.detach().abs().max()) for p in model.parameters()) * 1.2
    running_var = max(float(b.max()) for n, b in model.named_buffers() if n.endswith("running_var"))
    return {"run": run, "model": f"{model_file}:make", "data": data, "bound": bound,
            "accuracy": accuracy, "running_var": running_var}


def test_the_fixture_is_a_model_worth_protecting(resnet_run: dict) -> None:  # type: ignore[type-arg]
    assert resnet_run["accuracy"] > 0.8  # it learned the task
    assert resnet_run["running_var"] > 10 * resnet_run["bound"]  # statistics dwarf the weights


def test_clip_above_every_parameter_changes_nothing_and_says_parameters_only(
        resnet_run: dict, tmp_path: Path) -> None:  # type: ignore[type-arg]
    result = invoke("clip", resnet_run["run"], "--max-abs", resnet_run["bound"], "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    report = pd.read_csv(tmp_path / "out" / "clip_report.csv")
    assert report.n_clipped.sum() == 0
    running = report[report.tensor.str.contains("running_")]
    assert len(running) == 3 * 10  # 5 BatchNorms x (mean, var) x 3 checkpoints
    assert running.kind.eq("buffer").all() and running.kind_rule.str.startswith("name:").all()
    assert running.spec.str.startswith("none (buffer").all()
    for name in ("epoch_1.pt", "epoch_3.pt"):  # the framework's own loader: every tensor identical
        before = torch.load(resnet_run["run"] / name, weights_only=True)
        after = torch.load(tmp_path / "out" / name, weights_only=True)
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_sweep_above_every_parameter_keeps_accuracy_bit_for_bit(resnet_run: dict, tmp_path: Path) -> None:  # type: ignore[type-arg]
    bound = resnet_run["bound"]
    result = invoke("sweep", resnet_run["run"] / "epoch_3.pt", "--model", resnet_run["model"],
                    "--data", resnet_run["data"], "--max-abs", f"{bound},{bound * 2}", "--out", tmp_path / "s")
    assert result.exit_code == 0, result.output
    sweep = pd.read_csv(tmp_path / "s" / "sweep.csv")
    original = sweep[sweep.variant == "original"].accuracy.iloc[0]
    assert original == pytest.approx(resnet_run["accuracy"], abs=1e-6)  # the model's own forward pass
    clipped = sweep[sweep.variant != "original"]
    assert len(clipped) == 2 and clipped.n_clipped.eq(0).all() and clipped.accuracy.eq(original).all()


def test_clipping_the_running_statistics_is_what_wrecks_it(resnet_run: dict, tmp_path: Path) -> None:  # type: ignore[type-arg]
    result = invoke("evaluate", resnet_run["run"] / "epoch_3.pt", "--model", resnet_run["model"],
                    "--data", resnet_run["data"], "--clip", f"max_abs={resnet_run['bound']}", "--buffers",
                    "--out", tmp_path / "e")
    assert result.exit_code == 0, result.output
    ev = pd.read_csv(tmp_path / "e" / "evaluation.csv")
    clipped = ev[ev.variant != "original"].iloc[0]
    assert clipped.n_clipped > 0 and clipped.accuracy < resnet_run["accuracy"] - 0.2
