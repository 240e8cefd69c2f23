"""PEFT LoRA adapters written by peft itself: the index, ΔW statistics and drift, clipping.

The independent side is peft: ``model.peft_config`` and each LoraLayer's ``r``/``scaling``
for the index, ``LoraLayer.get_delta_weight`` for ΔW, ``PeftModel.from_pretrained`` +
``merge_and_unload`` for what a clipped adapter does to the weights.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from auditclip import adapters
from auditclip.adapters import (adapter_delta_drift, adapter_delta_rows, clip_adapter_delta, clip_adapter_folder,
                                delta_drift, delta_stats, materialise_delta)
from auditclip.errors import CheckpointError, InputError
from auditclip.formats.peft import adapter_folders, is_adapter_folder, read_adapter_index
from auditclip.notices import collect
from realruns import fit_peft_trainer

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

REL = 1e-5


def _close(got: float, want: float, rel: float = REL, abs_: float = 1e-9) -> bool:
    return math.isclose(got, want, rel_tol=rel, abs_tol=abs_)


def _load_base(base: Path):  # noqa: ANN202 - a transformers model
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(str(base))


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A 2-step Trainer run of a LoRA GPT-2 (checkpoint-1, checkpoint-2), an rslora/rank_pattern
    adapter saved as .bin, and a DoRA adapter; with the live peft models for reference."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("peft")
    base, run, model = fit_peft_trainer(root, max_steps=2, save_steps=1, modules_to_save=["ln_f"])
    out: dict = {"base": base, "run": run, "model": model}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(1)
        variant = get_peft_model(_load_base(base), LoraConfig(
            r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], use_rslora=True,
            rank_pattern={"c_proj": 2}, alpha_pattern={"mlp.c_proj": 3}, lora_bias=True,
            init_lora_weights=False))  # random B too: a non-zero update without training
        variant.save_pretrained(str(root / "variant"))
        variant.save_pretrained(str(root / "variant_bin"), safe_serialization=False)
        out["variant"], out["variant_bin"], out["variant_model"] = root / "variant", root / "variant_bin", variant

        emb = get_peft_model(_load_base(base), LoraConfig(r=2, lora_alpha=4, target_modules=["wte"],
                                                          init_lora_weights=False))
        emb.save_pretrained(str(root / "emb"))
        out["emb"], out["emb_model"] = root / "emb", emb

        tp = get_peft_model(_load_base(base), LoraConfig(r=2, target_modules=[], target_parameters=["mlp.c_fc.weight"],
                                                         init_lora_weights=False))
        tp.save_pretrained(str(root / "tp"))
        out["tp"], out["tp_model"] = root / "tp", tp

        dora = get_peft_model(_load_base(base), LoraConfig(r=2, target_modules=["c_fc"], use_dora=True,
                                                           init_lora_weights=False))
        dora.save_pretrained(str(root / "dora"))
        out["dora"] = root / "dora"
    return out


def _layers(model) -> dict:  # noqa: ANN001
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


# --- the index ------------------------------------------------------------------------------------


def test_trainer_checkpoints_are_adapter_folders_indexed_as_peft_says(written: dict) -> None:
    run = written["run"]
    ckpts = sorted(run.glob("checkpoint-*"))
    assert [c.name for c in ckpts] == ["checkpoint-1", "checkpoint-2"]
    assert all(is_adapter_folder(c) for c in ckpts) and not is_adapter_folder(run)
    assert adapter_folders(ckpts[-1]) == [("default", ckpts[-1])]
    index = read_adapter_index(ckpts[-1])
    model = written["model"]
    layers = _layers(model)
    assert index.peft_type == "LORA" and index.weights.name == "adapter_model.safetensors"
    assert [m.module for m in index.modules] == sorted(layers) == ["base_model.model.transformer.h.0.attn.c_attn"]
    m, layer = index.modules[0], layers[index.modules[0].module]
    assert (m.rank, m.scaling) == (layer.r["default"], layer.scaling["default"]) == (4, 2.0)
    assert m.alpha == model.peft_config["default"].lora_alpha
    assert m.fan_in_fan_out and m.problem is None and m.variant is None
    assert (m.a_name, m.b_name) == (f"{m.module}.lora_A.weight", f"{m.module}.lora_B.weight")
    assert m.delta_shape == (96, 32) and m.target == "transformer.h.0.attn.c_attn.weight"
    roles = {t.name: t.role for t in index.tensors}
    assert roles == {m.a_name: "lora_A", m.b_name: "lora_B",
                     "base_model.model.transformer.ln_f.weight": "modules_to_save",
                     "base_model.model.transformer.ln_f.bias": "modules_to_save"}
    assert {r["kind"] for r in index.rows()} == {"adapter"}


@pytest.mark.parametrize("which", ["variant", "variant_bin"])
def test_rslora_rank_and_alpha_patterns_give_peft_scalings(written: dict, which: str) -> None:
    index = read_adapter_index(written[which])
    layers = _layers(written["variant_model"])
    assert index.weights.suffix == (".bin" if which == "variant_bin" else ".safetensors")
    got = {m.module: (m.rank, m.scaling, m.bias_name is not None) for m in index.modules}
    want = {name: (l.r["default"], l.scaling["default"], True) for name, l in layers.items()}
    assert got == want
    # the three cases differ: rslora alpha/sqrt(r), rank_pattern r=2, alpha_pattern alpha=3
    assert sorted({v[1] for v in got.values()}) == sorted({8 / 2, 8 / math.sqrt(2), 3 / math.sqrt(2)})


def test_unpaired_unknown_and_broken_folders_are_said(written: dict, tmp_path: Path) -> None:
    src = written["run"] / "checkpoint-2"
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    shutil.copy(src / "adapter_config.json", lonely)
    sd = load_file(str(src / "adapter_model.safetensors"))
    b_name = "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"
    save_file({k: v for k, v in sd.items() if k != b_name}, str(lonely / "adapter_model.safetensors"))
    with collect() as notes:
        index = read_adapter_index(lonely)
    assert index.modules[0].problem == "lora_A without lora_B"
    assert any("lora_A without lora_B" in n and "raw tensors" in n for n in notes)
    assert adapter_delta_rows(lonely) == []
    with pytest.raises(InputError, match="lora_A without lora_B"):
        clip_adapter_folder(lonely, tmp_path / "out", "max_abs=0.01")

    config = json.loads((src / "adapter_config.json").read_text())
    (lonely / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    shutil.copy(src / "adapter_model.safetensors", lonely)
    assert "rank 4 but adapter_config.json gives r=8" in read_adapter_index(lonely).modules[0].problem

    (lonely / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "LOHA"}))
    with collect() as notes:
        index = read_adapter_index(lonely)
    assert index.modules == [] and {t.role for t in index.tensors} == {"other", "modules_to_save"}
    assert any("LOHA adapters" in n and "raw tensors" in n for n in notes)

    (lonely / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="peft_type"):
        read_adapter_index(lonely)
    (lonely / "adapter_model.safetensors").unlink()
    (lonely / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as exc:
        read_adapter_index(lonely)
    assert exc.value.kind == "missing_shard"


# --- ΔW statistics and drift ------------------------------------------------------------------------


def _torch_stats(d: torch.Tensor) -> dict[str, float]:
    d = d.to(torch.float64)
    return {"l2_norm": float(torch.linalg.matrix_norm(d)), "spectral_norm": float(torch.linalg.matrix_norm(d, ord=2)),
            "abs_max": float(d.abs().max()), "mean": float(d.mean()), "std": float(d.std(correction=0)),
            "min": float(d.min()), "max": float(d.max()), "rank": int(torch.linalg.matrix_rank(d.float()))}


@pytest.mark.parametrize("which", ["run", "variant", "emb", "tp"])
def test_delta_stats_equal_torch_on_peft_delta_weight(written: dict, which: str) -> None:
    folder = written["run"] / "checkpoint-2" if which == "run" else written[which]
    layers = _layers(written["model" if which == "run" else f"{which}_model"])
    rows = adapter_delta_rows(folder)
    assert len(rows) == len(layers)
    for row in rows:
        want = _torch_stats(layers[row["module"]].get_delta_weight("default").detach())
        assert row["kind"] == "adapter_delta" and row["tensor"] == row["module"] + ".delta_weight"
        for key, value in want.items():
            assert _close(row[key], value), (row["module"], key, row[key], value)
        assert _close(row["stable_rank"], want["l2_norm"] ** 2 / want["spectral_norm"] ** 2)
        assert row["n_nan"] == row["n_inf"] == 0
    if which == "emb":
        m = read_adapter_index(folder).modules[0]
        assert m.embedding and m.a_name.endswith("wte.lora_embedding_A") and m.delta_shape == (32, 64)
    if which == "tp":  # LoRA on a parameter (target_parameters)
        assert [r["target"] for r in rows] == ["transformer.h.0.mlp.c_fc.weight"]


def test_delta_stats_in_many_row_blocks_and_with_conv_factors(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(3)
    A, B = torch.randn(3, 5, 3, 3, generator=g), torch.randn(7, 3, 1, 1, generator=g)
    B[2] = 0.0  # a row of ΔW that is zero
    whole = delta_stats(A, B, 0.7)
    monkeypatch.setattr(adapters, "BLOCK", 45)  # one row of 45 per block: 7 blocks
    blocked = delta_stats(A, B, 0.7)
    want = _torch_stats(materialise_delta(A, B, 0.7))
    for key, value in want.items():
        assert _close(blocked[key], value) and _close(whole[key], value), key
    assert blocked["frac_zero"] == whole["frac_zero"] == 1 / 7
    B[0, 0] = math.nan
    broken = delta_stats(A, B, 0.7)
    assert broken["n_nan"] == 45 and math.isnan(broken["l2_norm"]) and math.isnan(broken["spectral_norm"])


def test_delta_drift_across_trainer_checkpoints_equals_peft(written: dict) -> None:
    from peft import PeftModel

    ckpts = [written["run"] / "checkpoint-1", written["run"] / "checkpoint-2"]
    deltas = []
    for c in ckpts:
        model = PeftModel.from_pretrained(_load_base(written["base"]), str(c))
        deltas.append({n: l.get_delta_weight("default").detach().to(torch.float64) for n, l in _layers(model).items()})
    rows = adapter_delta_drift(*ckpts)
    assert [r["module"] for r in rows] == sorted(deltas[0])
    for row in rows:
        d1, d2 = deltas[0][row["module"]], deltas[1][row["module"]]
        assert float(torch.linalg.matrix_norm(d2 - d1)) > 0  # the run moved
        assert _close(row["rel_l2_change"], float(torch.linalg.matrix_norm(d2 - d1) / torch.linalg.matrix_norm(d1)))
        cos = float((d1 * d2).sum() / (torch.linalg.matrix_norm(d1) * torch.linalg.matrix_norm(d2)))
        assert _close(row["cosine"], cos)
        assert _close(row["max_abs_change"], float((d2 - d1).abs().max()))


def test_delta_drift_is_exact_for_nearly_equal_updates() -> None:
    g = torch.Generator().manual_seed(0)
    A, B = torch.randn(4, 50, generator=g, dtype=torch.float64), torch.randn(60, 4, generator=g, dtype=torch.float64)
    A2 = A.clone()
    A2[0, 0] += 1e-7
    d = delta_drift((A, B, 2.0), (A2, B, 2.0))
    want = float(torch.linalg.matrix_norm(2.0 * B @ A2 - 2.0 * B @ A) / torch.linalg.matrix_norm(2.0 * B @ A))
    assert _close(d["rel_l2_change"], want, rel=1e-6)
    assert math.isnan(delta_drift((A, B, 1.0), (A[:, :10], B, 1.0))["rel_l2_change"])  # other shape


# --- clipping -------------------------------------------------------------------------------------------


def _merged_delta(base: Path, folder: Path) -> dict[str, torch.Tensor]:
    """merged minus base, per LoRA-targeted weight, as peft merges the adapter."""
    from peft import PeftModel

    before = {k: v.clone() for k, v in _load_base(base).state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = PeftModel.from_pretrained(_load_base(base), str(folder)).merge_and_unload().state_dict()
    return {k: (merged[k].to(torch.float64) - before[k].to(torch.float64)) for k in before}


def test_clipped_delta_loads_in_peft_and_stays_within_bound_plus_residual(written: dict, tmp_path: Path) -> None:
    src = written["run"] / "checkpoint-2"
    module = read_adapter_index(src).modules[0]
    original = _layers(written["model"])[module.module].get_delta_weight("default").detach().to(torch.float64)
    bound = 0.5 * float(original.abs().max())
    dst = tmp_path / "clipped"
    result = clip_adapter_folder(src, dst, f"max_abs={bound}")
    row = result.report.set_index("tensor").loc[module.delta_name]
    assert row["n_clipped"] == int((original.abs() > bound).sum()) > 0
    assert (dst / "adapter_config.json").read_bytes() == (src / "adapter_config.json").read_bytes()
    with safe_open(str(src / "adapter_model.safetensors"), "pt") as a, safe_open(str(dst / "adapter_model.safetensors"),
                                                                                 "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        assert all(a.get_slice(k).get_dtype() == b.get_slice(k).get_dtype() for k in a.keys())
        assert torch.equal(a.get_tensor("base_model.model.transformer.ln_f.weight"),
                           b.get_tensor("base_model.model.transformer.ln_f.weight"))
        assert b.metadata()["auditclip_spec"].startswith("adapter delta: max_abs=")
    new = _merged_delta(written["base"], dst)[module.target]
    assert new.shape == original.shape  # Conv1D: peft transposes; the bound does not care
    clipped = original.clamp(-bound, bound)
    residual_abs = float(torch.linalg.matrix_norm(clipped - new))
    assert row["residual"] > 1e-3  # clipping raised the rank: the refactoring has a cost, and it is reported
    assert _close(row["residual_abs"], residual_abs, rel=1e-3, abs_=1e-6)
    assert _close(row["residual"], residual_abs / float(torch.linalg.matrix_norm(clipped)), rel=1e-3, abs_=1e-6)
    assert float(new.abs().max()) <= bound + row["residual_abs"] + 1e-6
    assert _close(row["abs_max_after"], float(new.abs().max()), rel=1e-4)


def test_clipped_factors_load_in_peft(written: dict, tmp_path: Path) -> None:
    src = written["run"] / "checkpoint-2"
    dst = tmp_path / "factors"
    result = clip_adapter_folder(src, dst, "max_abs=0.05", mode="factors")
    assert set(result.report["mode"]) == {"factors"} and result.report["n_clipped"].sum() > 0
    stored = load_file(str(dst / "adapter_model.safetensors"))
    index = read_adapter_index(dst)
    for m in index.modules:
        assert float(stored[m.a_name].abs().max()) <= 0.05 and float(stored[m.b_name].abs().max()) <= 0.05
        want = 2.0 * (stored[m.b_name].double() @ stored[m.a_name].double()).T  # fan_in_fan_out
        assert torch.allclose(_merged_delta(written["base"], dst)[m.target], want, atol=1e-6)


def test_clip_of_a_bin_adapter_writes_bin_and_loads(written: dict, tmp_path: Path) -> None:
    dst = tmp_path / "bin"
    result = clip_adapter_folder(written["variant_bin"], dst, "max_abs=0.1", others="max_abs=0.5")
    assert (dst / "adapter_model.bin").is_file() and not (dst / "adapter_model.safetensors").exists()
    rows = result.report.set_index("tensor")
    assert rows.loc[[m.delta_name for m in result.index.modules], "n_clipped"].min() > 0
    assert (rows["mode"] == "tensor").any()  # lora_B biases clipped as ordinary tensors
    merged = _merged_delta(written["base"], dst)
    for m in result.index.modules:
        assert float(merged[m.target].abs().max()) <= 0.1 + rows.loc[m.delta_name, "residual_abs"] + 1e-6


def test_clipped_embedding_delta_loads(written: dict, tmp_path: Path) -> None:
    result = clip_adapter_folder(written["emb"], tmp_path / "emb", "max_abs=0.2")
    row = result.report.iloc[0]
    assert row["n_clipped"] > 0
    merged = _merged_delta(written["base"], tmp_path / "emb")["transformer.wte.weight"]
    assert float(merged.abs().max()) <= 0.2 + row["residual_abs"] + 1e-6


def test_dora_is_indexed_and_its_delta_clip_refused(written: dict, tmp_path: Path) -> None:
    with collect() as notes:
        index = read_adapter_index(written["dora"])
    m = index.modules[0]
    assert m.variant == "use_dora" and m.magnitude_name == f"{m.module}.lora_magnitude_vector"
    assert any("use_dora" in n and "scaling · B @ A only" in n for n in notes)
    with pytest.raises(InputError, match="use_dora"):
        clip_adapter_folder(written["dora"], tmp_path / "d", "max_abs=0.01")
    clip_adapter_folder(written["dora"], tmp_path / "f", "max_abs=0.01", mode="factors")  # the raw path works
    assert is_adapter_folder(tmp_path / "f")


def test_refactoring_is_optimal_and_randomized_svd_close(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(5)
    A, B = torch.randn(3, 40, generator=g), torch.randn(30, 3, generator=g)
    delta = materialise_delta(A, B, 1.5)
    bound = 0.3 * float(delta.abs().max())
    exact = clip_adapter_delta(A, B, 1.5, f"max_abs={bound}")
    s = torch.linalg.svdvals(delta.clamp(-bound, bound))
    optimal = float(torch.linalg.vector_norm(s[3:]) / torch.linalg.vector_norm(s))
    assert exact.rank > 3 and _close(exact.residual, optimal, rel=1e-4)
    monkeypatch.setattr(adapters, "EXACT_SVD_MAX", 0)
    approx = clip_adapter_delta(A, B, 1.5, f"max_abs={bound}")
    assert optimal <= approx.residual <= optimal * 1.01
    assert clip_adapter_delta(A, B, 1.5, f"max_abs={2 * float(delta.abs().max())}").A is A  # nothing outside


def test_range_clip_of_bf16_factors_reports_the_residual_of_what_is_stored() -> None:
    g = torch.Generator().manual_seed(7)
    A, B = torch.randn(2, 24, generator=g).bfloat16(), torch.randn(20, 2, generator=g).bfloat16()
    out = clip_adapter_delta(A, B, 0.5, "range=-0.3:0.6")
    assert (out.A.dtype, out.B.dtype, out.A.shape, out.B.shape) == (A.dtype, B.dtype, A.shape, B.shape)
    clipped = materialise_delta(A, B, 0.5).clamp(-0.3, 0.6)
    stored = materialise_delta(out.A, out.B, 0.5)
    res = float(torch.linalg.matrix_norm(clipped - stored))
    assert (out.lo, out.hi) == (-0.3, 0.6) and out.n_clipped == int(((clipped == -0.3) | (clipped == 0.6)).sum())
    assert _close(out.residual_abs, res, rel=1e-9) and _close(out.residual, res / float(torch.linalg.matrix_norm(clipped)))
    assert -0.3 - res <= float(stored.min()) and float(stored.max()) <= 0.6 + res
