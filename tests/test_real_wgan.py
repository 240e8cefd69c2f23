"""A WGAN critic trained by torch the way the WGAN paper's code trains it, audited by auditclip.

The critic (Linear -> BatchNorm1d -> LeakyReLU -> Linear -> LeakyReLU -> Linear) is
trained with RMSprop and, after every step, ``for p in netD.parameters(): p.data.clamp_(-c, c)``;
checkpoints are ``torch.save(netD.state_dict(), f"netD_epoch_{i}.pth")``. Only the
parameters are clamped: BatchNorm's running statistics are buffers and stay far above c.
The learning rate is higher than the paper's 5e-5 so that a few dozen steps pile the
weights at +-c as long trainings do.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from auditclip.cli import cli
from auditclip.flags import flag

C = 0.01
EPOCHS = 6
STEPS_PER_EPOCH = 6


def invoke(*args: object):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def critic_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``netD_epoch_0.pth`` .. ``netD_epoch_5.pth`` of a weight-clipped critic, 6 RMSprop steps apart."""
    torch.manual_seed(0)
    netD = nn.Sequential(nn.Linear(16, 64), nn.BatchNorm1d(64), nn.LeakyReLU(0.2),
                         nn.Linear(64, 64), nn.LeakyReLU(0.2), nn.Linear(64, 1))
    netG = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Linear(32, 16))
    optD = torch.optim.RMSprop(netD.parameters(), lr=2e-2)
    run = tmp_path_factory.mktemp("wgan") / "critic"
    run.mkdir()
    for epoch in range(EPOCHS):
        for _ in range(STEPS_PER_EPOCH):
            real = torch.randn(32, 16) * 4 + 2
            with torch.no_grad():
                fake = netG(torch.randn(32, 4))
            out = netD(torch.cat([real, fake]))
            loss = -(out[:32].mean() - out[32:].mean())
            optD.zero_grad()
            loss.backward()
            optD.step()
            for p in netD.parameters():
                p.data.clamp_(-C, C)
        torch.save(netD.state_dict(), run / f"netD_epoch_{epoch}.pth")
    return run


def _saved(run: Path) -> list[dict[str, torch.Tensor]]:
    return [torch.load(run / f"netD_epoch_{i}.pth", weights_only=True) for i in range(EPOCHS)]


def _frac_at_bound(w: torch.Tensor) -> float:
    """numpy's reading of the definition: |(|w|) - c| <= the float32 spacing at c."""
    a = np.abs(w.numpy().astype(np.float64))
    return float(np.mean(np.abs(a - C) <= np.spacing(np.float32(C))))


def test_the_critic_is_what_a_wgan_run_writes(critic_run: Path) -> None:
    """The premise of the other tests, checked on the files: parameters inside +-c, running_var above."""
    for sd in _saved(critic_run):
        params = {k: v for k, v in sd.items() if k.endswith(("weight", "bias"))}
        assert max(float(v.abs().max()) for v in params.values()) <= C
        assert float(sd["1.running_var"].min()) > C


def test_flag_max_abs_passes_on_parameters_and_fails_with_buffers(critic_run: Path, tmp_path: Path) -> None:
    ok = invoke("flag", critic_run, "--max-abs", C, "--out", tmp_path / "ok")
    assert ok.exit_code == 0, ok.output
    flags = pd.read_csv(tmp_path / "ok" / "flags.csv")
    assert not (flags.severity == "error").any()
    assert "outlier" not in set(flags.rule)

    bad = invoke("flag", critic_run, "--max-abs", C, "--buffers", "--out", tmp_path / "bad")
    assert bad.exit_code == 1, bad.output
    ranged = pd.read_csv(tmp_path / "bad" / "flags.csv").query("rule == 'range'")
    assert set(ranged.tensor) <= {"1.running_var", "1.running_mean"}
    saved = _saved(critic_run)
    # every checkpoint fails on its running variances, counted as numpy counts them
    running_var = ranged[ranged.tensor == "1.running_var"].sort_values("step")
    assert running_var["count"].tolist() == [int((sd["1.running_var"].abs() > C).sum()) for sd in saved]


def test_no_outlier_on_weights_inside_the_clip_range_even_without_a_bound(critic_run: Path) -> None:
    saved = _saved(critic_run)
    # the defect this guards against: the plain robust z-score (1.4826 MAD) of some clamped
    # parameter is far above 10, although every value is inside +-c
    worst = 0.0
    for sd in saved:
        for name, w in sd.items():
            if name.endswith(("weight", "bias")) and w.numel() > 2:
                x = w.numpy().astype(np.float64).ravel()
                med = np.median(x)
                mad = np.median(np.abs(x - med))
                if mad > 0:
                    worst = max(worst, float(np.abs(x - med).max() / (1.4826 * mad)))
    assert worst > 10
    free = flag(critic_run)
    parameters = free.flags[free.flags.tensor.str.endswith(("weight", "bias"))]
    assert "outlier" not in set(parameters.rule)
    bounded = flag(critic_run, max_abs=C)
    assert "outlier" not in set(bounded.flags.rule) and not bounded.failed


def test_frac_at_bound_matches_numpy_per_layer_per_epoch(critic_run: Path, tmp_path: Path) -> None:
    result = invoke("drift", critic_run, "--max-abs", C, "--out", tmp_path / "d", "-q")
    assert result.exit_code == 0, result.output
    stats = pd.read_csv(tmp_path / "d" / "stats.csv")
    saved = _saved(critic_run)
    labels = [f"netD_epoch_{i}.pth" for i in range(EPOCHS)]
    for label, sd in zip(labels, saved):
        rows = stats[stats.checkpoint == label].set_index("tensor")
        counted = numel = 0
        for name, w in sd.items():
            got = rows.loc[name, "frac_at_bound"]
            if name.endswith(("weight", "bias")):
                assert got == pytest.approx(_frac_at_bound(w), abs=0), (label, name)
                counted += round(_frac_at_bound(w) * w.numel())
                numel += w.numel()
            else:  # running statistics: the bound is not theirs
                assert np.isnan(got), (label, name)
        assert rows.loc["__all__", "frac_at_bound"] == pytest.approx(counted / numel, rel=1e-12)
    last = stats[stats.checkpoint == labels[-1]].set_index("tensor")
    # the layers after the BatchNorm saturate: most of their weights sit exactly at +-c
    assert last.loc["3.weight", "frac_at_bound"] > 0.5 and last.loc["5.weight", "frac_at_bound"] > 0.5
    # flag and audit write the same column from their own --max-abs
    flagged = flag(critic_run, max_abs=C).analysis.stats
    pd.testing.assert_series_equal(flagged.frac_at_bound, stats.frac_at_bound, check_names=False)


def test_frac_at_bound_is_absent_without_a_bound(critic_run: Path, tmp_path: Path) -> None:
    assert invoke("drift", critic_run, "--out", tmp_path / "d", "-q").exit_code == 0
    assert "frac_at_bound" not in pd.read_csv(tmp_path / "d" / "stats.csv").columns
    assert "frac_at_bound" not in flag(critic_run).analysis.stats.columns


def test_with_buffers_the_running_statistics_get_a_fraction_too(critic_run: Path) -> None:
    stats = flag(critic_run, max_abs=C, buffers=True).analysis.stats
    rv = stats[stats.tensor == "1.running_var"]
    assert rv.frac_at_bound.notna().all() and (rv.frac_at_bound == 0).all()  # all far above c
    assert stats[stats.tensor == "1.num_batches_tracked"].frac_at_bound.isna().all()  # an integer
