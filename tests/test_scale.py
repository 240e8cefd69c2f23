"""Large tensors: sketch accuracy against scipy, --workers invariance, bounded live tensors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch

from auditclip import analyze, describe
from auditclip import sketch as sk

from conftest import record_live_tensors, save_safetensors

N = 3 * sk.EXACT_MAX  # sketched, not sorted


def _cases() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    normal = torch.randn(N, generator=g) * 0.02
    with_zeros = torch.where(torch.rand(N, generator=g) < 0.3, torch.zeros(N), torch.randn(N, generator=g))
    with_outlier = normal.clone()
    with_outlier[123] = 40.0
    heavy_tail = torch.from_numpy(np.random.default_rng(0).standard_t(2, N).astype(np.float32)) * 0.01
    return {"normal": normal, "zeros": with_zeros, "outlier": with_outlier, "heavy_tail": heavy_tail,
            "bf16": (torch.randn(N, generator=g) * 0.02).bfloat16()}


@pytest.mark.parametrize("name", list(_cases()))
def test_sketch_meets_documented_bounds(name: str) -> None:
    a = _cases()[name]
    b = (a.float() + torch.randn(a.shape, generator=torch.Generator().manual_seed(1)) * 0.003).to(a.dtype)
    sa, sb = describe(a), describe(b)
    assert sa.values is None and sa.sketch is not None  # the streaming path
    x, y = a.double().numpy(), b.double().numpy()
    # moments stay exact (float64 accumulation)
    assert sa.stats["mean"] == pytest.approx(x.mean(), rel=1e-6, abs=1e-12)
    assert sa.stats["std"] == pytest.approx(x.std(), rel=1e-6)
    assert sa.stats["kurtosis"] == pytest.approx(scipy.stats.kurtosis(x), rel=1e-6)
    assert (sa.stats["min"], sa.stats["max"]) == (x.min(), x.max())
    # percentiles within 0.1% of numel in rank
    ordered = np.sort(x)
    for col, q in (("p0_1", 0.1), ("p5", 5), ("p50", 50), ("p99", 99), ("p99_9", 99.9)):
        target = q / 100 * (N - 1)
        lo, hi = np.searchsorted(ordered, sa.stats[col], "left"), np.searchsorted(ordered, sa.stats[col], "right")
        miss = 0 if lo <= target <= hi else min(abs(lo - target), abs(hi - target))
        assert miss <= 0.001 * N, (col, miss / N)
    from auditclip.distances import compare

    metrics, _ = compare(sb, b, sa, a)
    assert abs(metrics["ks"] - scipy.stats.ks_2samp(y, x).statistic) <= 0.005
    exact_w = scipy.stats.wasserstein_distance(y, x)
    assert abs(metrics["wasserstein"] - exact_w) <= 0.01 * exact_w


def test_point_mass_percentile_is_exact() -> None:
    t = torch.cat([torch.zeros(N // 2), torch.linspace(1, 2, N // 2)])
    s = describe(t).stats
    assert s["p1"] == 0.0 and s["frac_zero"] == 0.5 and s["p50"] == pytest.approx(np.percentile(t.numpy(), 50), abs=1e-3)


@pytest.fixture
def big_run(tmp_path: Path) -> Path:
    g = torch.Generator().manual_seed(2)
    w = torch.randn(N // 64, 64, generator=g)
    small = torch.randn(300, generator=g)
    for step in range(5):
        w = w + torch.randn(w.shape, generator=g) * 0.01
        small = small * 1.01
        save_safetensors(tmp_path / f"step_{step}.safetensors",
                         {"big.weight": w, "half.weight": w[: N // 128].half(), "small.bias": small})
    return tmp_path


def test_workers_do_not_change_results(big_run: Path) -> None:
    one = analyze(big_run, workers=1, spectral=True)
    two = analyze(big_run, workers=2, spectral=True)
    pd.testing.assert_frame_equal(one.stats, two.stats)
    pd.testing.assert_frame_equal(one.drift, two.drift)


def test_at_most_a_few_tensors_alive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(3)
    names = [f"layer.{i}.weight" for i in range(6)]
    for step in range(12):
        save_safetensors(tmp_path / f"step_{step}.safetensors", {n: torch.randn(40, 40, generator=g) for n in names})
    peak = record_live_tensors(monkeypatch)
    result = analyze(tmp_path, workers=1)
    assert len(result.stats) == 12 * 7
    # the reference, the previous and the current version of one tensor: never a whole checkpoint (6) or run (72)
    assert peak["peak"] <= 3



def test_large_tensor_with_nan_and_inf() -> None:
    t = torch.randn(N, generator=torch.Generator().manual_seed(4)) + 3.0
    t[10], t[20], t[N - 1] = float("nan"), float("inf"), float("-inf")
    s = describe(t).stats
    finite = t.double().numpy()[np.isfinite(t.numpy())]
    assert (s["n_nan"], s["n_inf"]) == (1, 2)
    assert s["mean"] == pytest.approx(finite.mean(), rel=1e-9) and s["std"] == pytest.approx(finite.std(), rel=1e-6)
    assert s["skew"] == pytest.approx(scipy.stats.skew(finite), rel=1e-5, abs=1e-9)
