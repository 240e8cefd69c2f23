"""Statistics agree with numpy/scipy computed in float64 on the same values."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from auditclip import describe, tensor_stats
from auditclip.stats import PERCENTILES, STATS_COLUMNS, spectral_norm

from conftest import save_safetensors

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def reference(values: np.ndarray) -> dict[str, float]:
    """What numpy/scipy say about the finite values, in float64."""
    x = values[np.isfinite(values)].astype(np.float64)
    out = {
        "mean": x.mean(), "std": x.std(ddof=0), "min": x.min(), "max": x.max(), "abs_max": np.abs(x).max(),
        "l2_norm": np.linalg.norm(x), "rms": np.sqrt(np.mean(x * x)),
        "skew": scipy.stats.skew(x), "kurtosis": scipy.stats.kurtosis(x),
        "frac_zero": np.count_nonzero(values == 0) / values.size,
        "n_nan": np.isnan(values).sum(), "n_inf": np.isinf(values).sum(),
    }
    for name, q in PERCENTILES:
        out[name] = np.percentile(x, q)
    return out


def _assert_matches(got: dict[str, float], want: dict[str, float]) -> None:
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-12), key


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, loc, scale", [((300, 70), 0.0, 0.02), ((5000,), 3.0, 0.5), ((64, 3, 3, 3), -0.1, 1.0)])
def test_moments_and_percentiles_match_numpy_scipy(dtype: torch.dtype, shape, loc: float, scale: float) -> None:  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(1)
    t = (torch.randn(shape, generator=g) ** 3 * scale + loc).to(dtype)  # skewed, heavy-tailed
    t.view(-1)[::97] = 0
    values = t.float().numpy().astype(np.float64)
    _assert_matches(describe(t).stats, reference(values))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_and_inf_are_counted_and_excluded(dtype: torch.dtype) -> None:
    t = torch.randn(1000, generator=torch.Generator().manual_seed(2)).to(dtype)
    t[3] = float("nan")
    t[10] = float("inf")
    t[11] = float("-inf")
    s = describe(t).stats
    assert (s["n_nan"], s["n_inf"]) == (1, 2)
    _assert_matches(s, reference(t.float().numpy().astype(np.float64)))


def test_float64_tensor_keeps_full_precision() -> None:
    t = torch.randn(2000, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * 1e-3 + 1e3
    _assert_matches(describe(t).stats, reference(t.numpy()))


def test_degenerate_tensors() -> None:
    const = describe(torch.full((10,), 0.5)).stats
    assert const["std"] == 0 and math.isnan(const["skew"]) and math.isnan(const["kurtosis"])
    empty = describe(torch.zeros(0, 4)).stats
    assert math.isnan(empty["mean"]) and empty["n_nan"] == 0
    nan = describe(torch.full((3,), float("nan"))).stats
    assert nan["n_nan"] == 3 and math.isnan(nan["max"]) and nan["frac_zero"] == 0.0
    scalar = describe(torch.tensor(-2.0)).stats
    assert (scalar["mean"], scalar["abs_max"], scalar["p50"]) == (-2.0, 2.0, -2.0)


@pytest.mark.parametrize("shape", [(40, 30), (300, 260), (512, 3, 3, 3), (1024, 700)])
def test_spectral_norm_within_one_percent(shape: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(5)
    t = torch.randn(shape, generator=g)
    t[0] += 0.3  # a structured direction on top of noise, as trained weights have
    exact = float(torch.linalg.matrix_norm(t.reshape(shape[0], -1).double(), ord=2))
    assert spectral_norm(t) == pytest.approx(exact, rel=0.01)
    s = describe(t, spectral=True).stats
    assert s["stable_rank"] == pytest.approx(float(t.double().norm()) ** 2 / exact**2, rel=0.02)


def test_stats_frame_columns_and_all_row(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(6)
    sd = {"a": torch.randn(50, 20, generator=g), "b": torch.randn(30, generator=g).half() * 4 + 1}
    save_safetensors(tmp_path / "step_1.safetensors", sd)
    df = tensor_stats(tmp_path, spectral=True)
    assert list(df.columns) == list(STATS_COLUMNS)
    assert df.tensor.tolist() == ["a", "b", "__all__"]
    assert df.spectral_norm.notna().tolist() == [True, False, False]
    every = np.concatenate([sd["a"].numpy().ravel(), sd["b"].float().numpy().ravel()]).astype(np.float64)
    total = df.set_index("tensor").loc["__all__"]
    assert total["numel"] == every.size
    for key in ("mean", "std", "l2_norm", "abs_max", "min", "max", "rms"):
        assert total[key] == pytest.approx(reference(every)[key], rel=1e-9), key
    assert (total["n_nan"], total["n_inf"]) == (0, 0)


@pytest.mark.filterwarnings("ignore:Precision loss:RuntimeWarning")
@settings(max_examples=40, deadline=None)
@given(
    data=st.lists(st.floats(-1e4, 1e4, allow_nan=False, width=32) | st.sampled_from([0.0, float("nan"), float("inf")]),
                  min_size=1, max_size=200),
    dtype=st.sampled_from(DTYPES),
)
def test_property_stats_agree_with_float64_reference(data: list[float], dtype: torch.dtype) -> None:
    t = torch.tensor(data, dtype=torch.float32).to(dtype)
    values = t.float().numpy().astype(np.float64)
    s = describe(t).stats
    finite = values[np.isfinite(values)]
    assert s["n_nan"] + s["n_inf"] + finite.size == values.size
    if finite.size == 0:
        assert math.isnan(s["mean"])
        return
    want = reference(values)
    for key in ("mean", "std", "min", "max", "l2_norm", *(n for n, _ in PERCENTILES)):
        scale = max(np.abs(finite).max(), 1e-30)
        assert abs(s[key] - want[key]) <= 1e-9 * scale, key
