"""Drift between checkpoints: exact against scipy, statuses for changing tensors."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch
from safetensors.torch import load_file

from auditclip import analyze, drift
from auditclip.analysis import DRIFT_COLUMNS
from auditclip.distances import ks_statistic, wasserstein
from auditclip.stats import STATS_COLUMNS

from conftest import save_safetensors

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("n_a, n_b", [(1000, 1000), (1000, 777), (5, 3000)])
def test_ks_and_wasserstein_match_scipy(n_a: int, n_b: int) -> None:
    rng = np.random.default_rng(0)
    a = np.sort(rng.standard_t(3, n_a).astype(np.float32))
    b = np.sort((rng.standard_normal(n_b) * 1.3 + 0.2).astype(np.float32))
    b[::50] = a[0]  # ties across samples
    b.sort()
    assert ks_statistic(a, b) == pytest.approx(scipy.stats.ks_2samp(a, b).statistic, abs=1e-12)
    assert wasserstein(a, b) == pytest.approx(scipy.stats.wasserstein_distance(a, b), rel=1e-9)


def _write_run(folder: Path, dtype: torch.dtype, steps: int = 4) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    w = torch.randn(120, 50, generator=g) * 0.05
    b = torch.randn(50, generator=g)
    versions = []
    for i in range(steps):
        w = w + torch.randn(w.shape, generator=g) * 0.01 * (i + 1)
        b = b * 1.1 + 0.01
        sd = {"layer.weight": w.to(dtype), "layer.bias": b.to(dtype)}
        versions.append(sd)
        save_safetensors(folder / f"step_{(i + 1) * 100}.safetensors", sd)
    return versions


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_drift_values_match_numpy_scipy(tmp_path: Path, dtype: torch.dtype) -> None:
    versions = _write_run(tmp_path, dtype)
    df = drift(tmp_path)
    assert list(df.columns) == list(DRIFT_COLUMNS)
    as64 = [{k: v.float().numpy().astype(np.float64).ravel() for k, v in sd.items()} for sd in versions]
    for row in df[df.tensor != "__all__"].itertuples():
        i = int(row.step) // 100 - 1
        j = i - 1 if row.baseline == "previous" else 0
        cur, base = as64[i][row.tensor], as64[j][row.tensor]
        assert row.status == "ok"
        assert row.baseline_checkpoint == f"step_{(j + 1) * 100}.safetensors"
        assert row.rel_l2_change == pytest.approx(np.linalg.norm(cur - base) / np.linalg.norm(base), rel=1e-9, abs=1e-15)
        assert row.cosine == pytest.approx(cur @ base / np.linalg.norm(cur) / np.linalg.norm(base), rel=1e-9)
        assert row.max_abs_change == pytest.approx(np.abs(cur - base).max(), rel=1e-9, abs=1e-15)
        assert row.mean_shift == pytest.approx(cur.mean() - base.mean(), rel=1e-6, abs=1e-12)
        assert row.std_ratio == pytest.approx(cur.std() / base.std(), rel=1e-6)
        # exact, so far inside the documented bounds (0.005 absolute KS, 1% relative W1)
        assert row.ks == pytest.approx(scipy.stats.ks_2samp(cur, base).statistic, abs=1e-12)
        assert row.wasserstein == pytest.approx(scipy.stats.wasserstein_distance(cur, base), rel=1e-6, abs=1e-15)
    # previous rows start at the second checkpoint; reference rows include the first (zero change)
    assert df[(df.baseline == "previous")].step.min() == 200
    first = df[(df.baseline == "reference") & (df.step == 100) & (df.tensor == "layer.weight")].iloc[0]
    assert (first.rel_l2_change, first.ks, first.wasserstein) == (0.0, 0.0, 0.0)


def test_all_row_is_global_relative_change(tmp_path: Path) -> None:
    versions = _write_run(tmp_path, torch.float32)
    df = drift(tmp_path)
    row = df[(df.tensor == "__all__") & (df.baseline == "reference") & (df.step == 400)].iloc[0]
    cur = np.concatenate([v.double().numpy().ravel() for v in versions[3].values()])
    base = np.concatenate([v.double().numpy().ravel() for v in versions[0].values()])
    assert row.rel_l2_change == pytest.approx(np.linalg.norm(cur - base) / np.linalg.norm(base), rel=1e-9)
    assert row.cosine == pytest.approx(cur @ base / np.linalg.norm(cur) / np.linalg.norm(base), rel=1e-9)


def test_added_removed_and_shape_changed(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(8)
    save_safetensors(tmp_path / "step_1.safetensors", {"keep": torch.randn(4, 4, generator=g), "old": torch.ones(3),
                                                       "grow": torch.randn(4, generator=g)})
    save_safetensors(tmp_path / "step_2.safetensors", {"keep": torch.randn(4, 4, generator=g), "new": torch.ones(2),
                                                       "grow": torch.randn(6, generator=g)})
    result = analyze(tmp_path)
    d = result.drift[result.drift.baseline == "previous"].set_index("tensor")
    assert d.loc["keep", "status"] == "ok"
    assert d.loc["old", "status"] == "removed" and math.isnan(d.loc["old", "rel_l2_change"])
    assert d.loc["new", "status"] == "added"
    grow = d.loc["grow"]
    assert grow.status == "shape_changed" and math.isnan(grow.rel_l2_change) and not math.isnan(grow.ks)
    # statistics are still reported for whatever each checkpoint holds
    s = result.stats
    assert set(s[s.step == 1].tensor) == {"grow", "keep", "old", "__all__"}
    assert set(s[s.step == 2].tensor) == {"grow", "keep", "new", "__all__"}
    assert list(s.columns) == list(STATS_COLUMNS)


def test_reference_option_and_include_exclude(tmp_path: Path) -> None:
    _write_run(tmp_path, torch.float32)
    df = drift(tmp_path, reference=tmp_path / "step_400.safetensors", include=["*.weight"])
    assert set(df.tensor) == {"layer.weight", "__all__"}
    ref = df[df.baseline == "reference"]
    assert set(ref.baseline_checkpoint) == {"step_400.safetensors"}
    assert ref[ref.step == 400].rel_l2_change.tolist() == [0.0, 0.0]
    assert ref[ref.step == 100].rel_l2_change.gt(0).all()
    assert set(drift(tmp_path, exclude=["*.weight"]).tensor) == {"layer.bias", "__all__"}


def test_non_finite_values_make_elementwise_change_nan(tmp_path: Path) -> None:
    a = torch.randn(100, generator=torch.Generator().manual_seed(9))
    b = a.clone()
    b[5] = float("nan")
    save_safetensors(tmp_path / "step_1.safetensors", {"w": a})
    save_safetensors(tmp_path / "step_2.safetensors", {"w": b})
    row = drift(tmp_path).query("baseline == 'previous' and tensor == 'w'").iloc[0]
    assert math.isnan(row.rel_l2_change) and math.isnan(row.max_abs_change)
    assert row.ks == pytest.approx(scipy.stats.ks_2samp(a.numpy(), np.delete(b.numpy(), 5)).statistic)


def test_drift_bound_option_adds_frac_at_bound_and_audit_writes_it_too(tmp_path: Path) -> None:
    """The same bound in drift --max-abs, flag/audit --max-abs and the config file gives the same column."""
    from click.testing import CliRunner

    from auditclip.cli import cli

    c = 0.05
    g = torch.Generator().manual_seed(0)
    for step in (1, 2):
        w = (torch.randn(40, 10, generator=g) * 0.1).clamp_(-c, c)  # about 60% clamped to +-c
        save_safetensors(tmp_path / "run" / f"step_{step}.safetensors",
                         {"fc.weight": w, "fc.bias": torch.zeros(10), "bn.running_var": torch.full((10,), c)})
    runner = CliRunner()
    assert runner.invoke(cli, ["drift", str(tmp_path / "run"), "--max-abs", str(c), "-q",
                               "--out", str(tmp_path / "d")]).exit_code == 0
    stats = pd.read_csv(tmp_path / "d" / "stats.csv")
    assert list(stats.columns) == [*STATS_COLUMNS, "frac_at_bound"]
    expected = [float(np.mean(np.abs(np.abs(w.numpy().astype(np.float64)) - c) <= np.spacing(np.float32(c))))
                for w in (load_file(str(tmp_path / "run" / f"step_{s}.safetensors"))["fc.weight"] for s in (1, 2))]
    assert stats[stats.tensor == "fc.weight"].frac_at_bound.tolist() == expected and 0.4 < expected[0] < 0.8
    assert stats[stats.tensor == "fc.bias"].frac_at_bound.tolist() == [0.0, 0.0]
    assert stats[stats.tensor == "bn.running_var"].frac_at_bound.isna().all()  # a buffer: not the bound's
    (tmp_path / "bound.toml").write_text(f"[tool.auditclip.flag]\nmax_abs = {c}\n")
    audit = runner.invoke(cli, ["audit", str(tmp_path / "run"), "--config", str(tmp_path / "bound.toml"), "-q",
                                "--out", str(tmp_path / "a")])
    assert audit.exit_code == 0, audit.output
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "a" / "stats.csv"), stats)
    both = runner.invoke(cli, ["drift", str(tmp_path / "run"), "--max-abs", "1", "--range", "-1:1",
                               "--out", str(tmp_path / "e")])
    assert both.exit_code == 2 and "Error: give --range or --max-abs, not both" in both.output


def test_workers_1_and_2_write_the_same_bytes(tmp_path: Path) -> None:
    """torch's thread count is per OS thread: walker threads left at the default summed the
    sample's 64x64 weights in another order than --workers 1 (and Dask's tasks), in the last bit."""
    from conftest import invoke_cli

    for n in ("1", "2"):
        assert invoke_cli("drift", "sample_checkpoints/high_lr", "--workers", n, "--out", tmp_path / n).exit_code == 0
    for name in ("stats.csv", "drift.csv"):
        assert (tmp_path / "1" / name).read_bytes() == (tmp_path / "2" / name).read_bytes(), name
