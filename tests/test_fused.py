"""The one-pass statistics of large tensors (auditclip.fused) against float64 numpy/scipy.

Tensors span several blocks and both halves of a two-thread pass, in float32, float16
and bfloat16, with NaN, Inf and exact zeros; each is checked on the numba kernel (when
numba is installed), on the torch implementation, and on the GPU (when there is one).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch

from auditclip import analyze, describe, fused
from auditclip.distances import compare

from conftest import ROOT, save_safetensors

N = 4 * fused.BLOCK + 12345  # five blocks, and more than one chunk: two threads share the pass
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
PATHS = ["numba", "torch"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=PATHS)
def path(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    if request.param == "numba" and not fused.numba_available():
        pytest.skip("numba is not installed (the optional 'fast' extra)")
    previous = fused.set_numba(request.param == "numba")
    yield request.param
    fused.set_numba(previous)


def _pair(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    a = torch.randn(N, generator=g) * 0.02 + 0.003
    a[torch.rand(N, generator=g) < 0.05] = 0.0  # a point mass at zero
    b = a + torch.randn(N, generator=g) * 0.004
    a, b = a.to(dtype), b.to(dtype)
    a[7], a[N - 3], a[fused.BLOCK + 1] = float("nan"), float("inf"), float("-inf")
    return a, b


def _on(t: torch.Tensor, path: str) -> torch.Tensor:
    return t.cuda() if path == "cuda" else t


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_one_pass_matches_float64_scipy(dtype: torch.dtype, path: str) -> None:
    a, b = _pair(dtype)
    da, db = _on(a, path), _on(b, path)
    sb = describe(db, threads=2)
    sa = describe(da, against=[(sb, db)], threads=2)
    assert sa.values is None and sa.sketch is not None and id(sb) in sa.pairs  # the one-pass path, sums measured
    x, y = a.double().numpy(), b.double().numpy()
    fin = x[np.isfinite(x)]
    st = sa.stats
    assert (st["n_nan"], st["n_inf"]) == (1, 2)
    assert st["frac_zero"] == np.count_nonzero(fin == 0) / N
    assert (st["min"], st["max"]) == (fin.min(), fin.max())
    assert st["mean"] == pytest.approx(fin.mean(), rel=1e-6)
    assert st["std"] == pytest.approx(fin.std(), rel=1e-6)
    assert st["skew"] == pytest.approx(scipy.stats.skew(fin), rel=1e-6)
    assert st["kurtosis"] == pytest.approx(scipy.stats.kurtosis(fin), rel=1e-6)
    assert st["l2_norm"] == pytest.approx(np.linalg.norm(fin), rel=1e-6)
    ordered = np.sort(fin)
    for col, q in (("p0_1", 0.1), ("p1", 1), ("p5", 5), ("p50", 50), ("p95", 95), ("p99_9", 99.9)):
        target = q / 100 * (fin.size - 1)
        lo, hi = np.searchsorted(ordered, st[col], "left"), np.searchsorted(ordered, st[col], "right")
        miss = 0 if lo <= target <= hi else min(abs(lo - target), abs(hi - target))
        assert miss <= 0.001 * fin.size, (col, miss / fin.size)
    metrics, sums = compare(sa, da, sb, db)
    # element-wise sums: the NaN/Inf of a propagate, as in distances.elementwise
    assert np.isnan(sums["delta_sq"]) and np.isnan(metrics["max_abs_change"])
    assert sums["base_sq"] == pytest.approx(float(y @ y), rel=1e-9)
    assert metrics["ks"] == pytest.approx(scipy.stats.ks_2samp(fin, y).statistic, abs=0.002)
    exact_w = scipy.stats.wasserstein_distance(fin, y)
    assert abs(metrics["wasserstein"] - exact_w) <= 0.01 * exact_w


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_element_wise_sums_match_numpy(dtype: torch.dtype, path: str) -> None:
    a, b = _pair(dtype)
    a = torch.nan_to_num(a, posinf=0.5, neginf=-0.5)  # finite: the sums are numbers
    c = (b.float() * 0.9).to(dtype)  # a third version: previous and reference both measured in the one pass
    da, db, dc = _on(a, path), _on(b, path), _on(c, path)
    sb, sc = describe(db), describe(dc)
    sa = describe(da, against=[(sb, db), (sc, dc)])
    x = a.double().numpy()
    for s_base, d_base, base in ((sb, db, b), (sc, dc, c)):
        metrics, sums = compare(sa, da, s_base, d_base)
        y = base.double().numpy()
        assert sums["delta_sq"] == pytest.approx(float((x - y) @ (x - y)), rel=1e-9)
        assert sums["dot"] == pytest.approx(float(x @ y), rel=1e-9)
        assert sums["cur_sq"] == pytest.approx(float(x @ x), rel=1e-9)
        assert metrics["max_abs_change"] == np.abs(x - y).max()
        assert metrics["rel_l2_change"] == pytest.approx(np.linalg.norm(x - y) / np.linalg.norm(y), rel=1e-9)
        assert metrics["cosine"] == pytest.approx(x @ y / np.linalg.norm(x) / np.linalg.norm(y), rel=1e-9)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_numba_and_torch_passes_agree(dtype: torch.dtype) -> None:
    if not fused.numba_available():
        pytest.skip("numba is not installed (the optional 'fast' extra)")
    a, b = _pair(dtype)
    results = []
    for use in (True, False):
        previous = fused.set_numba(use)
        try:
            results.append(fused.fused_pass(a, [b], threads=2))
        finally:
            fused.set_numba(previous)
    nb, tr = results
    assert (nb.bins == tr.bins).all() and (nb.counts == tr.counts).all()  # the same histogram, count for count
    assert (nb.n_finite, nb.n_nan, nb.zeros, nb.lo, nb.hi) == (tr.n_finite, tr.n_nan, tr.zeros, tr.lo, tr.hi)
    for r in (nb, tr):  # moments about their own shift: compare the mean and the central second moment
        r.mean = r.shift + r.s1 / r.n_finite  # type: ignore[attr-defined]
    assert nb.mean == pytest.approx(tr.mean, rel=1e-9)  # type: ignore[attr-defined]


def test_bfloat16_histogram_is_exact() -> None:
    # every bfloat16 value has a bin of its own: the sketch is the exact distribution
    t = (torch.randn(N, generator=torch.Generator().manual_seed(3)) * 0.02).bfloat16()
    s = describe(t)
    x = np.sort(t.double().numpy())
    for col, q in (("p1", 1), ("p50", 50), ("p99", 99)):
        pos = q / 100 * (N - 1)
        lo = int(np.floor(pos))
        if x[lo] == x[min(lo + 1, N - 1)]:  # both neighbours equal: numpy's percentile is that value exactly
            assert s.stats[col] == x[lo]


def _big_run(folder: Path) -> Path:
    g = torch.Generator().manual_seed(5)
    w = torch.randn(N // 64, 64, generator=g) * 0.02  # above analysis.BIG_TENSOR: shared by both threads
    h = torch.randn(300, 300, generator=g)
    for step in range(3):
        w = w + torch.randn(w.shape, generator=g) * 0.002
        h = h * 1.01
        save_safetensors(folder / f"step_{step}.safetensors",
                         {"big.weight": w, "bf.weight": w.bfloat16(), "half.weight": h.half(), "bias": h[0].clone()})
    return folder


@pytest.fixture(scope="module")
def big_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _big_run(tmp_path_factory.mktemp("fused_run"))


def test_workers_and_device_give_the_same_frames(big_run: Path) -> None:
    one = analyze(big_run, workers=1)
    two = analyze(big_run, workers=2)
    pd.testing.assert_frame_equal(one.stats, two.stats)  # blocks are fixed, sums merged in block order
    pd.testing.assert_frame_equal(one.drift, two.drift)
    if torch.cuda.is_available():
        gpu = analyze(big_run, workers=2, device="cuda")
        pd.testing.assert_frame_equal(one.stats.drop(columns=[c for c in one.stats if c.startswith("p")]),
                                      gpu.stats.drop(columns=[c for c in gpu.stats if c.startswith("p")]), rtol=1e-6)
        pd.testing.assert_frame_equal(one.drift, gpu.drift, rtol=1e-6, atol=1e-12)


def test_device_cuda_without_a_gpu_is_one_error_line(big_run: Path, tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from click.testing import CliRunner

    from auditclip.cli import cli

    result = CliRunner().invoke(cli, ["drift", str(big_run), "--out", str(tmp_path / "o"), "--device", "cuda", "-q"])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and result.output.startswith("Error: --device cuda: no CUDA device")
    assert not (tmp_path / "o" / "stats.csv").exists()


def test_cli_import_loads_no_heavy_library() -> None:
    # --version and --help must not pay for torch, pandas or scipy (benchmarks/ measures the time)
    code = ("import sys, auditclip.cli, auditclip; "
            "print(sorted(m for m in ('torch', 'pandas', 'scipy', 'numpy', 'numba') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
    version = subprocess.run([sys.executable, "-m", "auditclip.cli", "--version"], capture_output=True, text=True,
                             check=True, cwd=ROOT)
    assert "version" in version.stdout


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("protect_top", [0, 3])
def test_in_place_clip_is_the_copying_clip(dtype: torch.dtype, protect_top: int, path: str) -> None:
    if path == "cuda":
        pytest.skip("clip runs on the CPU")
    from auditclip.clipping import clip_tensor_outcome
    from auditclip.config import ClipSpec

    a, _ = _pair(dtype)
    a = a[: N // 7 * 7].reshape(-1, 7)
    spec = ClipSpec.parse("max_abs=0.03")
    want = clip_tensor_outcome(a, spec, protect_top=protect_top)
    mine = a.clone()
    got = clip_tensor_outcome(mine, spec, protect_top=protect_top, inplace=True)
    assert got.tensor is mine  # clamped where it lies: no copy
    bits = torch.int16 if dtype != torch.float32 else torch.int32
    nan = torch.isnan(want.tensor)
    assert torch.equal(torch.isnan(got.tensor), nan)  # NaN stays NaN (in place, even its payload stays)
    assert torch.equal(got.tensor.view(bits)[~nan], want.tensor.view(bits)[~nan])  # the rest bit for bit
    assert (got.n_clipped, got.n_protected) == (want.n_clipped, want.n_protected) and got.n_clipped > 1000
    assert got.report(a) == want.report(a)
