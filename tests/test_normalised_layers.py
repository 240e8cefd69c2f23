"""spectral_norm and weight_norm layers, as torch saves them: their vectors are told apart.

``spectral_norm`` keeps power-iteration vectors (``weight_u``/``weight_v``, or
``parametrizations.weight.0._u``/``._v``) as buffers: clipping them changes the
normalising sigma, so the critic's output, without a single weight near the bound.
``weight_norm``'s ``weight_v`` is its trained direction, a parameter. The name
``weight_v`` alone cannot tell; the names beside it can.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from auditclip.cli import cli
from auditclip.kinds import tensor_kind


def invoke(*args: object):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(cli, [str(a) for a in args])


def _critic(api: str) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(8, 16), nn.Linear(16, 1)]
    if api == "spectral_old":
        layers = [nn.utils.spectral_norm(m) for m in layers]
    elif api == "spectral_new":
        layers = [nn.utils.parametrizations.spectral_norm(m) for m in layers]
    elif api == "weight_norm":
        layers = [nn.utils.weight_norm(m) for m in layers]  # the old API writes weight_g / weight_v
    model = nn.Sequential(layers[0], nn.LeakyReLU(0.2), layers[1])
    x = torch.randn(64, 8)
    for _ in range(5):  # train-mode passes run the power iteration, as training does
        model(x)
    return model


@pytest.mark.parametrize("api, buffers", [
    ("spectral_old", {"0.weight_u", "0.weight_v", "2.weight_u", "2.weight_v"}),
    ("spectral_new", {"0.parametrizations.weight.0._u", "0.parametrizations.weight.0._v",
                      "2.parametrizations.weight.0._u", "2.parametrizations.weight.0._v"}),
    ("weight_norm", set()),
])
def test_the_names_beside_decide_and_agree_with_the_model(api: str, buffers: set[str]) -> None:
    model = _critic(api)
    names = set(model.state_dict())
    expected = {n for n, _ in model.named_buffers()}
    assert expected == buffers  # torch's own answer
    decided = {n for n in names if tensor_kind(n, siblings=names)[0] == "buffer"}
    assert decided == expected
    assert all(tensor_kind(n, siblings=names)[0] == "parameter" for n, _ in model.named_parameters())


@pytest.mark.parametrize("api", ["spectral_old", "spectral_new"])
def test_clip_and_flag_leave_spectral_norm_vectors_alone(api: str, tmp_path: Path) -> None:
    model = _critic(api)
    run = tmp_path / "run"
    run.mkdir()
    for epoch in (1, 2):
        torch.save(model.state_dict(), run / f"critic_epoch_{epoch}.pt")
    params = dict(model.named_parameters())
    bound = 0.9 * max(float(p.detach().abs().max()) for p in params.values())
    gate = invoke("flag", run, "--max-abs", 0.999, "--out", tmp_path / "f")
    assert gate.exit_code == 0, gate.output  # unit vectors' elements may reach 1; parameters stay under
    result = invoke("clip", run, "--max-abs", bound, "--out", tmp_path / "c")
    assert result.exit_code == 0, result.output
    report = pd.read_csv(tmp_path / "c" / "clip_report.csv")
    vectors = report[report.tensor.str.contains(r"_u$|_v$")]
    assert len(vectors) == 8 and vectors.kind.eq("buffer").all() and vectors.n_clipped.eq(0).all()
    # the critic's output equals that of the same critic with only its parameters clamped
    expected = _critic(api)
    expected.load_state_dict(torch.load(run / "critic_epoch_2.pt", weights_only=True))
    with torch.no_grad():
        for p in expected.parameters():
            p.clamp_(-bound, bound)
    clipped = _critic(api)
    clipped.load_state_dict(torch.load(tmp_path / "c" / "critic_epoch_2.pt", weights_only=True))
    expected.eval(), clipped.eval()
    x = torch.randn(32, 8)
    with torch.no_grad():
        assert torch.equal(clipped(x), expected(x))


def test_weight_norm_direction_is_a_parameter_and_gated(tmp_path: Path) -> None:
    model = _critic("weight_norm")
    run = tmp_path / "run"
    run.mkdir()
    torch.save(model.state_dict(), run / "epoch_1.pt")
    torch.save(model.state_dict(), run / "epoch_2.pt")
    bound = 0.5 * float(model[0].weight_v.detach().abs().max())
    gate = invoke("flag", run, "--max-abs", bound, "--out", tmp_path / "f")
    assert gate.exit_code == 1, gate.output
    flags = pd.read_csv(tmp_path / "f" / "flags.csv")
    assert "0.weight_v" in set(flags[flags.rule == "range"].tensor)
    stats_run = invoke("drift", run, "--out", tmp_path / "d")
    assert stats_run.exit_code == 0, stats_run.output
    stats = pd.read_csv(tmp_path / "d" / "stats.csv", keep_default_na=False)
    assert set(stats[stats.tensor.str.endswith("weight_v")].kind) == {"parameter"}
