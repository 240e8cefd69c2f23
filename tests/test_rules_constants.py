"""The flag rules' constants and the streaming blocks, pinned so that a changed constant fails.

Each rule test puts a value on both sides of the rule's exact limit, computed
independently with numpy (a relative margin of 1e-9), so a change of the MAD scale,
the IQR scale, the spike percentile, the jump rule's median or its default factor,
or ``norm_growth``'s strictness moves the limit across the value and fails a test.
The block tests compare statistics and drift of tensors spanning several streaming
blocks (``sketch.BLOCK``, ``stats.CHUNK``, the ``CHUNK`` of ``distances``) with
numpy and scipy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.stats
import torch

import auditclip.distances as distances
import auditclip.sketch as sketch
import auditclip.stats as stats
from auditclip.config import FlagRules, flag_settings
from auditclip.flags import element_findings, flag, outlier_scale
from auditclip.stats import describe, moments

from conftest import save_safetensors

EPS = 1e-9  # relative margin on either side of a limit


def _findings(t: torch.Tensor, **options: float) -> list[dict]:
    settings = flag_settings(options={"fail_on": "never", **options}, search=False)
    return element_findings("w", t, describe(t), settings)


def _rules(found: list[dict], rule: str) -> list[dict]:
    return [f for f in found if f["rule"] == rule]


# --- outlier: the scale and its constants ------------------------------------------------


def test_outlier_limit_is_1_4826_mad() -> None:
    g = torch.Generator().manual_seed(1)
    t = torch.randn(1001, generator=g) * 0.02
    t[500] = 0.3
    x = t.numpy().astype(np.float64)
    median = np.median(x)
    mad = np.median(np.abs(x - median))
    z = float(np.abs(x - median).max() / (1.4826 * mad))
    assert 10 < z < 20  # the planted value; the normal bulk stays far below
    fired = _rules(_findings(t, zscore=z * (1 - EPS)), "outlier")
    assert [(f["count"], f["worst_index"]) for f in fired] == [(1, "[500]")]
    assert f"max z={z:.3g}" in fired[0]["message"] and "1.4826*MAD" in fired[0]["message"]
    assert not _rules(_findings(t, zscore=z * (1 + EPS)), "outlier")


def test_outlier_scale_is_iqr_over_1_349_when_the_mad_collapses() -> None:
    """A clip-trained layer without a bound given: 60% of the weights at +c, so the MAD is 0."""
    g = torch.Generator().manual_seed(2)
    c = 0.01
    t = torch.cat([torch.full((600,), c), torch.full((300,), -c), (torch.rand(99, generator=g) * 2 - 1) * c,
                   torch.tensor([0.2])])
    x = t.numpy().astype(np.float64)
    median = np.median(x)
    assert np.median(np.abs(x - median)) == 0
    p25, p75 = np.percentile(x, [25, 75])
    scale = (p75 - p25) / 1.349
    z = float(np.abs(x - median).max() / scale)
    assert 5 < z < 50
    fired = _rules(_findings(t, zscore=z * (1 - EPS)), "outlier")
    assert [(f["count"], f["worst_index"]) for f in fired] == [(1, "[999]")]
    assert "IQR/1.349" in fired[0]["message"]
    assert not _rules(_findings(t, zscore=z * (1 + EPS)), "outlier")
    # the weights at -c are 2c from the median: z = 2c / scale, nowhere near an outlier
    assert 2 * c / scale < 2


def test_outlier_scale_is_the_std_when_three_quarters_pile_up() -> None:
    c = 0.01
    t = torch.cat([torch.full((800,), c), torch.full((199,), -c), torch.tensor([0.5])])
    x = t.numpy().astype(np.float64)
    assert np.percentile(x, 75) - np.percentile(x, 25) == 0
    z = float(np.abs(x - np.median(x)).max() / x.std())
    fired = _rules(_findings(t, zscore=z * (1 - EPS)), "outlier")
    assert [f["worst_index"] for f in fired] == ["[999]"] and "scale std" in fired[0]["message"]
    assert not _rules(_findings(t, zscore=z * (1 + EPS)), "outlier")


@pytest.mark.parametrize("side", [1 - 1e-6, 1 + 1e-6])
def test_outlier_scale_collapse_thresholds(side: float) -> None:
    """The MAD gives way below 1/4 of IQR/1.349, the IQR below 1/4 of the std."""
    mad = 0.25 / 1.4826 * side  # 1.4826 MAD = 1/4 x side of IQR/1.349 = 1
    scale, name = outlier_scale(mad, 1.349, 1.0)
    assert (scale, name) == ((1.4826 * mad, "1.4826*MAD") if side > 1 else (1.349 / 1.349, "IQR/1.349"))
    scale, name = outlier_scale(0.0, 1.349 * 25 * side, 100.0)  # IQR/1.349 = std/4 x side
    assert name == ("IQR/1.349" if side > 1 else "std")


def test_outlier_never_fires_inside_an_explicit_bound() -> None:
    """A value the robust scale calls an outlier is still allowed when inside --max-abs."""
    g = torch.Generator().manual_seed(3)
    t = torch.randn(1000, generator=g) * 0.001
    t[7] = 0.05  # z = 50, inside +-0.1
    assert _rules(_findings(t), "outlier")
    assert not _rules(_findings(t, max_abs=0.1), "outlier")
    t[8] = 0.15  # outside: range error and outlier; t[7], inside, still is not one
    found = _findings(t, max_abs=0.1)
    assert [(f["count"], f["worst_index"]) for f in _rules(found, "outlier")] == [(1, "[8]")]
    assert [(f["count"], f["worst_index"]) for f in _rules(found, "range")] == [(1, "[8]")]
    assert [f["count"] for f in _rules(_findings(t), "outlier")] == [2]


# --- spike: the 99.99th percentile ---------------------------------------------------------


def test_spike_limit_is_the_99_99th_percentile_of_abs_w() -> None:
    g = torch.Generator().manual_seed(4)
    t = torch.randn(20001, generator=g)
    t[123] = 200.0
    a = np.abs(t.numpy().astype(np.float64))
    p = float(np.percentile(a, 99.99))
    assert p < float(np.sort(a)[-2]) and p != float(np.percentile(a, 99.9))  # not the max, not p99.9
    k = 200.0 / p
    fired = _rules(_findings(t, spike=k * (1 - EPS)), "spike")
    assert [(f["count"], f["worst_index"]) for f in fired] == [(1, "[123]")]
    assert f"p99.99(|w|)={p:.3g}" in fired[0]["threshold"]
    assert not _rules(_findings(t, spike=k * (1 + EPS)), "spike")


# --- norm_growth: strictly above ---------------------------------------------------------


def test_norm_growth_exactly_at_the_limit_passes_and_above_it_fires(tmp_path: Path) -> None:
    """Doubling a tensor doubles its float64 norm exactly: growth 2.0 is at the limit of --norm-growth 2."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(64, 64, generator=g)
    save_safetensors(tmp_path / "run" / "step_1.safetensors", {"w.weight": w})
    save_safetensors(tmp_path / "run" / "step_2.safetensors", {"w.weight": w * 2})
    at = flag(tmp_path / "run", norm_growth=2.0)
    norms = at.analysis.stats.query("tensor == 'w.weight'").l2_norm.tolist()
    assert norms[1] == 2 * norms[0]  # the premise: exactly at the limit
    assert "norm_growth" not in set(at.flags.rule)
    above = flag(tmp_path / "run", norm_growth=2.0 * (1 - EPS)).flags.query("rule == 'norm_growth'")
    assert above[["checkpoint", "tensor", "worst_value"]].values.tolist() == [["step_2.safetensors", "w.weight", norms[1]]]


# --- jump: K x the median step change ----------------------------------------------------------


def _jump_run(folder: Path, last_ratio: float) -> list[float]:
    """Five checkpoints; the last step change is ``last_ratio`` x the median of the four. Returns the changes."""
    g = torch.Generator().manual_seed(6)
    w = torch.randn(32, 32, generator=g).double()
    sizes = [0.01, 0.03, 0.02]
    ws = [w]
    for s in sizes:
        u = torch.randn(32, 32, generator=g).double()
        ws.append(ws[-1] + u * (s * ws[-1].norm() / u.norm()))
    # with the last change the largest, the median of the four is the mean of the 2nd and 3rd
    target = last_ratio * (0.02 + 0.03) / 2
    u = torch.randn(32, 32, generator=g).double()
    ws.append(ws[-1] + u * (target * ws[-1].norm() / u.norm()))
    for i, x in enumerate(ws):
        save_safetensors(folder / f"step_{i + 1}.safetensors", {"w.weight": x.float()})
    xs = [x.float().double() for x in ws]
    return [float((b - a).norm() / a.norm()) for a, b in zip(xs, xs[1:])]


def test_jump_limit_is_k_times_the_median_step_change(tmp_path: Path) -> None:
    changes = _jump_run(tmp_path / "run", 8.0)
    ratio = changes[-1] / float(np.median(changes))
    assert ratio != pytest.approx(changes[-1] / float(np.mean(changes)), rel=0.1)  # median, not mean, matters
    fired = flag(tmp_path / "run", jump=ratio * (1 - EPS)).flags.query("rule == 'jump'")
    assert fired[["checkpoint", "tensor"]].values.tolist() == [["step_5.safetensors", "w.weight"]]
    assert fired.worst_value.iloc[0] == pytest.approx(changes[-1], rel=1e-6)
    assert flag(tmp_path / "run", jump=ratio * (1 + EPS)).flags.query("rule == 'jump'").empty


@pytest.mark.parametrize("ratio, fires", [(5.05, True), (4.95, False)])
def test_jump_default_factor_is_5(tmp_path: Path, ratio: float, fires: bool) -> None:
    assert FlagRules().jump == 5.0
    _jump_run(tmp_path / "run", ratio)
    assert (not flag(tmp_path / "run").flags.query("rule == 'jump'").empty) is fires


def test_jump_needs_four_checkpoints_and_says_so_when_it_has_fewer(tmp_path: Path) -> None:
    from auditclip import notices

    _jump_run(tmp_path / "run", 50.0)
    for gone in ("step_4.safetensors", "step_5.safetensors"):  # steps 1..3: two changes, no median to speak of
        (tmp_path / "run" / gone).unlink()
    with notices.collect() as notes:
        result = flag(tmp_path / "run", fail_on="info")
    skipped = result.flags.query("severity == 'skipped'")
    assert skipped[["rule", "tensor", "checkpoint"]].values.tolist() == [["jump", "__all__", "step_3.safetensors"]]
    assert "3 readable checkpoint(s); the rule needs 4" in skipped.message.iloc[0]
    assert notes == [skipped.message.iloc[0]]
    assert not result.failed  # a skipped rule is said, and never fails the gate


def test_jump_applies_from_four_checkpoints(tmp_path: Path) -> None:
    _jump_run(tmp_path / "run", 50.0)
    (tmp_path / "run" / "step_1.safetensors").unlink()  # steps 2..5: three changes, the last one huge
    flags = flag(tmp_path / "run").flags
    assert flags.query("severity == 'skipped'").empty
    assert flags.query("rule == 'jump'").checkpoint.tolist() == ["step_5.safetensors"]


# --- tensors larger than one streaming block ------------------------------------------------------


def _planted(n: int, block: int, seed: int = 7) -> torch.Tensor:
    """A skewed, offset tensor with zeros, NaN and Inf in different blocks (the last one partial)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(n, generator=g) * 0.02 + 0.003
    t[: n // 3] += torch.rand(n // 3, generator=g) * 0.05  # a skewed first third
    t[block + 5: block + 500] = 0.0
    t[2 * block + 7] = float("nan")
    t[-3] = float("inf")
    t[-1] = float("-inf")
    t[block - 1] = 0.9  # the maximum, at the end of the first block
    return t


def _check_against_numpy(t: torch.Tensor) -> None:
    s = describe(t).stats
    x = t.numpy().astype(np.float64)
    finite = x[np.isfinite(x)]
    assert s["n_nan"] == 1 and s["n_inf"] == 2
    assert s["frac_zero"] == np.count_nonzero(x == 0) / x.size
    assert (s["min"], s["max"], s["abs_max"]) == (finite.min(), finite.max(), np.abs(finite).max())
    assert s["mean"] == pytest.approx(finite.mean(), rel=1e-9)
    assert s["std"] == pytest.approx(finite.std(), rel=1e-9)
    assert s["l2_norm"] == pytest.approx(np.sqrt(np.dot(finite, finite)), rel=1e-9)
    assert s["rms"] == pytest.approx(np.sqrt(np.mean(finite**2)), rel=1e-9)
    assert s["skew"] == pytest.approx(scipy.stats.skew(finite), rel=1e-6)
    assert s["kurtosis"] == pytest.approx(scipy.stats.kurtosis(finite), rel=1e-6)
    for name, q in stats.PERCENTILES:  # within 0.1% of numel in rank, as documented
        lo, hi = np.percentile(finite, [max(q - 0.1, 0), min(q + 0.1, 100)])
        assert lo <= s[name] <= hi, (name, s[name], lo, hi)


def test_statistics_of_a_tensor_of_several_blocks_match_numpy_and_scipy() -> None:
    n = 3 * sketch.BLOCK + 12345  # three full blocks and a partial one, default block size
    _check_against_numpy(_planted(n, sketch.BLOCK))


def test_statistics_with_many_small_blocks_match_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sketch, "BLOCK", 1 << 12)
    n = 40 * (1 << 12) + 999  # above EXACT_MAX: the streaming path, over 41 blocks
    assert n > sketch.EXACT_MAX
    t = _planted(n, 1 << 12)
    _check_against_numpy(t)
    t[:: 1 << 10] = 0.05  # at the bound, in every block
    expected = np.count_nonzero(np.abs(np.abs(t.numpy().astype(np.float64)) - 0.05) <= np.spacing(np.float32(0.05)))
    assert stats.count_at_bound(t, -0.05, 0.05) == expected > 40


def test_moments_over_several_chunks_match_scipy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stats, "CHUNK", 1000)
    g = np.random.default_rng(8)
    x = (g.standard_normal(10_500) ** 3 + 100.0).astype(np.float32)  # skewed, with a large offset
    m = moments(x)
    wide = x.astype(np.float64)
    assert m["mean"] == pytest.approx(wide.mean(), rel=1e-12)
    assert m["std"] == pytest.approx(wide.std(), rel=1e-9)
    assert m["skew"] == pytest.approx(scipy.stats.skew(wide), rel=1e-7)
    assert m["kurtosis"] == pytest.approx(scipy.stats.kurtosis(wide), rel=1e-7)
    assert m["l2_norm"] == pytest.approx(np.linalg.norm(wide), rel=1e-12)


def test_drift_over_several_chunks_matches_numpy_and_scipy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(distances, "CHUNK", 1 << 12)
    g = torch.Generator().manual_seed(9)
    base = torch.randn(70_001, generator=g)
    cur = base + torch.randn(70_001, generator=g) * 0.1
    cur[50_000] += 3.0  # the largest change, in the 13th chunk
    sums = distances.elementwise(cur, base)
    x, y = cur.numpy().astype(np.float64), base.numpy().astype(np.float64)
    assert distances.rel_change(sums) == pytest.approx(np.linalg.norm(x - y) / np.linalg.norm(y), rel=1e-12)
    assert distances.cosine(sums) == pytest.approx(np.dot(x, y) / np.linalg.norm(x) / np.linalg.norm(y), rel=1e-12)
    assert sums["max_abs"] == np.abs(x - y).max()
    a, b = np.sort(cur.numpy()), np.sort(base.numpy()[:60_000])  # unequal sizes: the merged-support loop
    assert distances.ks_statistic(a, b) == pytest.approx(scipy.stats.ks_2samp(a, b).statistic, rel=1e-12)
    assert distances.wasserstein(a, b) == pytest.approx(scipy.stats.wasserstein_distance(a, b), rel=1e-9)
    b_same = np.sort(base.numpy())  # equal sizes: the order-statistics loop
    assert distances.wasserstein(a, b_same) == pytest.approx(scipy.stats.wasserstein_distance(a, b_same), rel=1e-9)


def test_frac_at_bound_counts_exactly_k_elements_at_the_bound_in_each_dtype() -> None:
    c = 0.01
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        edge = float(torch.tensor(c, dtype=dtype))  # the bound as the dtype writes it
        gap = stats.ulp(c, dtype)
        values = [edge] * 5 + [-edge] * 4  # k = 9 at the bound
        # 3 ulps inside and far inside do not count
        values += [edge - 3 * gap, -(edge - 3 * gap), 0.5 * c, 0.0, -0.7 * c]
        t = torch.tensor(values, dtype=torch.float64).to(dtype)
        assert stats.count_at_bound(t, -c, c) == 9, dtype
        a = np.abs(t.float().numpy().astype(np.float64))
        assert np.count_nonzero(np.abs(a - c) <= gap) == 9
        assert stats.count_at_bound(t, -c, 1.0) == 4  # a range: only its ends count
    for dtype in (torch.float32, torch.bfloat16, torch.float16):  # exactly one ulp away counts, two do not
        u = stats.ulp(0.5, dtype)
        t = torch.tensor([0.5, -0.5, 0.5 + u, -(0.5 - u), 0.5 - u / 2, 0.5 - 2 * u, 0.5 + 2 * u, 0.25],
                         dtype=torch.float64).to(dtype)
        assert t.double().tolist()[2:7] == [0.5 + u, -(0.5 - u), 0.5 - u / 2, 0.5 - 2 * u, 0.5 + 2 * u]  # all exact
        assert stats.count_at_bound(t, -0.5, 0.5) == 5, dtype
    assert stats.ulp(c, torch.float32) == float(np.spacing(np.float32(c)))
    assert stats.ulp(c, torch.float16) == float(np.spacing(np.float16(c)))
    assert stats.ulp(c, torch.bfloat16) == 2.0 ** -14  # 8 significant bits in [2^-7, 2^-6)
