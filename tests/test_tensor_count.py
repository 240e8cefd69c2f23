"""Many tiny tensors: the batched paths give the one-at-a-time values, bit for bit.

``describe_many``/``compare_values`` stack tiny tensors of one shape and run each
step once per stack; ``analyze`` walks runs of tiny names checkpoint by checkpoint;
``flag`` skips the element-wise pass when the statistics show no rule can fire.
None of it may change a single output value.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch

import auditclip.analysis as analysis
import auditclip.flags as flags
from auditclip.analysis import _natural_sorted, analyze
from auditclip.checkpoints import natural_key
from auditclip.config import flag_settings
from auditclip.distances import compare, compare_many, ks_statistic
from auditclip.formats.readers import TensorInfo
from auditclip.stats import TINY_MAX, describe, describe_many

from conftest import record_live_tensors, save_safetensors

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _same(a: object, b: object) -> bool:
    """Equal, NaN equal to NaN, and -0.0 told apart from 0.0."""
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    return a == b


def _tiny_tensors(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape in [(1,), (2,), (7,), (8,), (9,), (4, 4), (3, 5, 2), (130,), (TINY_MAX,)]:
        for dtype in DTYPES:
            for kind in range(6):
                t = torch.randn(shape, generator=g, dtype=torch.float64) * 10 ** (kind - 2) + (kind == 3) * 1e4
                if kind == 4:
                    t = t.round()  # ties and exact zeros
                    t.view(-1)[0] = -0.0
                if kind == 5 and t.numel() > 2:
                    t.view(-1)[1] = math.nan if shape[0] % 2 else math.inf
                out.append(t.to(dtype))
            out.append(torch.full(shape, 0.125, dtype=dtype))  # constant
            out.append(-torch.zeros(shape, dtype=dtype))  # all -0.0
    return out


@pytest.mark.parametrize("spectral", [False, True])
def test_describe_many_is_describe_bit_for_bit(spectral: bool) -> None:
    tensors = _tiny_tensors(0) + [torch.randn(TINY_MAX + 1), torch.zeros(0), torch.tensor(2.5)]
    infos = [TensorInfo(f"t{i}", str(t.dtype).removeprefix("torch."), tuple(t.shape)) for i, t in enumerate(tensors)]
    for t, info, many in zip(tensors, infos, describe_many(tensors, infos, spectral=spectral)):
        one = describe(t, info, spectral=spectral)
        assert list(many.stats) == list(one.stats)
        assert all(_same(many.stats[k], one.stats[k]) for k in one.stats), (info, many.stats, one.stats)
        assert many.n_finite == one.n_finite and many.info == one.info
        assert np.array_equal(many.values, one.values) and many.values.dtype == one.values.dtype


def test_compare_many_is_compare_bit_for_bit() -> None:
    a, b = _tiny_tensors(1), _tiny_tensors(2)
    pairs = []
    for x, y in zip(a, b):
        sx, sy = describe(x), describe(y)
        pairs.append((sx, x, sy, y))  # same shape and dtype
        pairs.append((sx, x, sx, x))  # a tensor against itself
        y32 = y.to(torch.float32)
        pairs.append((sx, x, describe(y32), y32))  # dtype changed
        flat = y.reshape(-1)[: max(1, y.numel() - 1)].contiguous()
        pairs.append((sx, x, describe(flat), flat))  # shape changed
    for (metrics, sums), pair in zip(compare_many(pairs), pairs):
        one_metrics, one_sums = compare(*pair)
        assert list(metrics) == list(one_metrics)
        assert all(_same(metrics[k], one_metrics[k]) for k in metrics), (pair[1], metrics, one_metrics)
        assert (sums is None) == (one_sums is None)
        if sums is not None:
            assert all(_same(sums[k], one_sums[k]) for k in one_sums), (pair[1], sums, one_sums)


@pytest.mark.parametrize("n_a, n_b", [(3, 3), (5, 8), (64, 64), (100, 7), (1000, 999)])
def test_ks_statistic_is_scipys_exact_value(n_a: int, n_b: int) -> None:
    rng = np.random.default_rng(n_a)
    a = np.sort(rng.integers(0, 9, n_a).astype(np.float32))  # many ties
    b = np.sort(rng.integers(1, 10, n_b).astype(np.float32))
    assert ks_statistic(a, b) == scipy.stats.ks_2samp(a, b, method="exact").statistic


def _moe_run(folder: Path, steps: int = 3, names: int = 600) -> Path:
    """Many tiny tensors of a few shapes, plus the awkward cases, over a few steps."""
    g = torch.Generator().manual_seed(11)
    shapes = [(8,), (4, 4), (2, 3, 2), (1,), (33,)]
    base = {f"layers.{i // 40}.experts.{i % 40}.w": torch.randn(shapes[i % 5], generator=g) for i in range(names)}
    for step in range(steps):
        sd = {k: (v + 0.01 * step * torch.randn(v.shape, generator=g)) for k, v in base.items()}
        sd["layers.0.experts.3.w"] = sd["layers.0.experts.3.w"].half()
        sd["layers.1.experts.5.w"] = sd["layers.1.experts.5.w"].to(torch.bfloat16)
        sd["layers.2.experts.7.w"] = sd["layers.2.experts.7.w"].double()
        sd["layers.3.experts.0.w"][0] = math.nan if step == 1 else 0.0
        sd["layers.4.experts.1.w"] = torch.zeros(4) if step else torch.zeros(2, 2)  # shape change
        sd["big.weight"] = torch.randn(TINY_MAX + 5, generator=g)  # a large tensor between tiny ones
        sd["counter"] = torch.tensor(step)
        if step != 1:
            sd["sometimes.w"] = torch.randn(8, generator=g)
        save_safetensors(folder / f"step_{step}.safetensors", sd)
    return folder


@pytest.mark.parametrize("options", [{}, {"workers": 2}, {"spectral": True}, {"reference": "step_2.safetensors"},
                                     {"reference": "outside"}, {"drift": False}])
def test_tiny_walk_is_the_one_name_walk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, options: dict) -> None:
    run = _moe_run(tmp_path / "run")
    options = dict(options)
    if options.get("reference") == "outside":
        options["reference"] = save_safetensors(tmp_path / "ref.safetensors", {"layers.0.experts.0.w": torch.ones(8),
                                                                               "only.here": torch.ones(3)})
    elif "reference" in options:
        options["reference"] = run / options["reference"]
    batched = analyze(run, **options)
    monkeypatch.setattr(analysis, "TINY_MAX", 0)  # every name walked alone, every tensor described alone
    alone = analyze(run, **options)
    pd.testing.assert_frame_equal(batched.stats, alone.stats, check_exact=True)
    pd.testing.assert_frame_equal(batched.drift, alone.drift, check_exact=True)
    assert batched.tensors == alone.tensors


def test_tiny_walk_keeps_a_bounded_number_of_tensors_alive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    names = 3 * analysis.CHUNK_NAMES
    for step in range(4):
        save_safetensors(tmp_path / f"step_{step}.safetensors", {f"e.{i}.w": torch.randn(8) for i in range(names)})
    peak = record_live_tensors(monkeypatch)
    result = analyze(tmp_path, workers=1)
    assert len(result.stats) == 4 * (names + 1)
    # reference, previous and current versions of one chunk of names: never the run (4 x names)
    assert peak["peak"] <= 3 * analysis.CHUNK_NAMES


def test_natural_sorted_is_natural_key_order() -> None:
    names = {"a.10.b", "a.9.b", "a.9.B2", "x", "10", "9x", "a.009.c", "é.1", "layers.2.experts.10.w1",
             "layers.2.experts.9.w1", "layers.10.x", "a" * 3 + "1" * 1200, "b1.2.3", "b1.2", "__all__"}
    assert _natural_sorted(names) == sorted(names, key=natural_key)


@pytest.mark.parametrize("options", [{}, {"max_abs": 0.3}, {"zscore": 2, "spike": 2}, {"range": "-0.05:2"}])
def test_flag_screen_finds_what_the_element_pass_finds(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       options: dict) -> None:
    g = torch.Generator().manual_seed(5)
    for step in range(4):
        sd = {f"w.{i}": torch.randn(16, generator=g) * 0.1 for i in range(200)}
        sd["w.3"][5] = 4.0  # an outlier and a spike
        sd["w.4"] = torch.full((16,), 0.3).to(torch.bfloat16)  # on a bf16 bound
        sd["w.5"] = torch.zeros(9)  # dead
        sd["w.6"][2] = math.inf
        sd["w.7"] = torch.linspace(-0.3, 0.3, 16)  # exactly on a bound
        save_safetensors(tmp_path / f"step_{step}.safetensors", sd)
    screened = flags.flag(tmp_path, flag_settings(options=options, search=False))
    monkeypatch.setattr(flags, "_quiet", lambda *a: False)  # every tensor through the element-wise pass
    full = flags.flag(tmp_path, flag_settings(options=options, search=False))
    pd.testing.assert_frame_equal(screened.flags, full.flags, check_exact=True)
    assert len(full.flags)


def test_group_medians_are_nanmedians() -> None:
    rng = np.random.default_rng(3)
    codes = rng.integers(0, 40, 500)
    values = rng.standard_normal(500)
    values[rng.random(500) < 0.2] = np.nan
    values[codes == 7] = np.nan
    values[codes == 8] = np.inf
    got = flags._group_medians(codes, values, 41)
    for g in range(41):
        group = values[codes == g]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN groups
            want = float(np.nanmedian(group)) if group.size else math.nan
        assert _same(float(got[g]), want)
