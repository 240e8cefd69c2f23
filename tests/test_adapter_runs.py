"""A PEFT LoRA run written by peft + transformers' Trainer, audited as an adapter run.

The independent side is peft itself: each ``checkpoint-<step>/`` loaded with
``PeftModel.from_pretrained`` onto the locally saved base model, and each LoraLayer's
``get_delta_weight`` measured with torch; the stored factors read with safetensors.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from pathlib import Path

import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from auditclip.analysis import analyze
from auditclip.cli import cli
from auditclip.flags import flag
from auditclip.formats.peft import read_adapter_index
from auditclip.kinds import tensor_kind
from realruns import fit_peft_trainer

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

REL = 1e-5
MODULE = "base_model.model.transformer.h.0.attn.c_attn"
DELTA = f"{MODULE}.delta_weight"
A_NAME, B_NAME = f"{MODULE}.lora_A.weight", f"{MODULE}.lora_B.weight"


def _close(got: float, want: float, rel: float = REL, abs_: float = 1e-12) -> bool:
    return math.isclose(got, want, rel_tol=rel, abs_tol=abs_)


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """3 Trainer steps saved at each step, and what peft says ΔW is at each checkpoint."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import GPT2LMHeadModel

    root = tmp_path_factory.mktemp("lora_run")
    base, run, _ = fit_peft_trainer(root, max_steps=3, save_steps=1)
    ckpts = sorted(run.glob("checkpoint-*"))
    deltas, factors = {}, {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for c in ckpts:
            model = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(str(base)), str(c))
            deltas[c.name] = {name: layer.get_delta_weight("default").detach().to(torch.float64)
                              for name, layer in model.named_modules() if isinstance(layer, LoraLayer)}
            factors[c.name] = load_file(str(c / "adapter_model.safetensors"))
    out = root / "report"
    result = CliRunner().invoke(cli, ["drift", str(run), "--out", str(out), "-q"])
    return {"base": base, "run": run, "ckpts": ckpts, "deltas": deltas, "factors": factors, "cli": result,
            "stats": pd.read_csv(out / "stats.csv"), "drift": pd.read_csv(out / "drift.csv")}


def test_drift_of_a_trainer_lora_run_has_adapter_and_delta_rows(lora_run: dict) -> None:
    result = lora_run["cli"]
    assert result.exit_code == 0, result.output
    assert [c.name for c in lora_run["ckpts"]] == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert "PEFT LoRA adapter folders" in result.stderr and "<module>.delta_weight" in result.stderr
    stats = lora_run["stats"]
    for label in ("checkpoint-1", "checkpoint-3"):
        rows = stats[stats.checkpoint == label]
        # ΔW sits beside its factors, in name order; __all__ last
        assert rows.tensor.tolist() == [DELTA, A_NAME, B_NAME, "__all__"]
        assert rows.kind.fillna("").tolist() == ["adapter_delta", "adapter", "adapter", ""]
        stored = lora_run["factors"][label]
        for name in (A_NAME, B_NAME):  # the raw rows are the stored tensors' statistics
            row = rows.set_index("tensor").loc[name]
            assert _close(row.l2_norm, float(torch.linalg.vector_norm(stored[name].double())))
        # __all__ pools what is stored: ΔW is not
        assert rows.set_index("tensor").loc["__all__", "numel"] == sum(t.numel() for t in stored.values())


def test_delta_rows_equal_torch_on_peft_get_delta_weight(lora_run: dict) -> None:
    stats = lora_run["stats"]
    delta_rows = stats[stats.kind == "adapter_delta"]
    assert delta_rows.checkpoint.tolist() == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    for row in delta_rows.itertuples():
        d = lora_run["deltas"][row.checkpoint][MODULE]
        assert row.tensor == DELTA and row.dtype == "float32" and row.numel == d.numel()
        assert row.shape == "[96, 32]"  # [out, in] of B @ A; peft's Conv1D update is its transpose
        assert float(d.abs().max()) > 0  # the run trained B away from zero
        want = {"l2_norm": float(torch.linalg.matrix_norm(d)), "abs_max": float(d.abs().max()),
                "spectral_norm": float(torch.linalg.matrix_norm(d, ord=2)), "mean": float(d.mean()),
                "std": float(d.std(correction=0)), "min": float(d.min()), "max": float(d.max())}
        for key, value in want.items():
            assert _close(getattr(row, key), value), (row.checkpoint, key, getattr(row, key), value)
        assert _close(row.stable_rank, want["l2_norm"] ** 2 / want["spectral_norm"] ** 2)
        # what would need every value of ΔW is left empty, not guessed
        assert all(math.isnan(getattr(row, c)) for c in ("skew", "kurtosis", "p0_1", "p50", "p99_9"))


def test_delta_drift_equals_torch_between_checkpoints(lora_run: dict) -> None:
    drift = lora_run["drift"]
    rows = drift[drift.tensor == DELTA].set_index(["checkpoint", "baseline"])
    assert set(drift[drift.tensor == DELTA].kind) == {"adapter_delta"}
    deltas = lora_run["deltas"]
    pairs = [("checkpoint-2", "previous", "checkpoint-1"), ("checkpoint-3", "previous", "checkpoint-2"),
             ("checkpoint-2", "reference", "checkpoint-1"), ("checkpoint-3", "reference", "checkpoint-1")]
    for label, baseline, base_label in pairs:
        row = rows.loc[(label, baseline)]
        cur, base = deltas[label][MODULE], deltas[base_label][MODULE]
        assert row.status == "ok" and row.baseline_checkpoint == base_label
        assert _close(row.rel_l2_change, float(torch.linalg.matrix_norm(cur - base) / torch.linalg.matrix_norm(base)))
        cos = float((cur * base).sum() / (torch.linalg.matrix_norm(cur) * torch.linalg.matrix_norm(base)))
        assert _close(row.cosine, cos)
        assert _close(row.max_abs_change, float((cur - base).abs().max()))
        assert _close(row.mean_shift, float(cur.mean() - base.mean()), abs_=1e-9)
        assert _close(row.std_ratio, float(cur.std(correction=0) / base.std(correction=0)))
        assert math.isnan(row.ks) and math.isnan(row.wasserstein)
    same = rows.loc[("checkpoint-1", "reference")]  # the reference against itself: exactly no change
    assert (same.rel_l2_change, same.cosine, same.max_abs_change) == (0.0, 1.0, 0.0)
    # the update moved more than its factors say alone: reported, not read off A/B
    last = drift[(drift.checkpoint == "checkpoint-3") & (drift.baseline == "reference")].set_index("tensor")
    assert last.loc[DELTA, "rel_l2_change"] != last.loc[A_NAME, "rel_l2_change"]


def test_kind_rule_names_the_adapter_config(lora_run: dict) -> None:
    kinds = read_adapter_index(lora_run["ckpts"][0]).kinds()
    assert tensor_kind(A_NAME, adapter=kinds) == ("adapter", f"adapter_config.json: lora_A of LoRA module {MODULE}")
    assert tensor_kind(DELTA, adapter=kinds)[0] == "adapter_delta"
    assert tensor_kind(A_NAME) == ("parameter", "name: weight is a parameter name")  # without the config


def test_range_rule_checks_the_factors_and_max_abs_bounds_them(lora_run: dict, tmp_path: Path) -> None:
    factors = lora_run["factors"]["checkpoint-3"]
    bound = 0.5 * float(factors[A_NAME].abs().max())
    outside = {n: int((t.abs() > bound).sum()) for n, t in factors.items()}
    assert outside[A_NAME] > 0
    result = flag(lora_run["run"], max_abs=bound)
    hits = result.flags[(result.flags.rule == "range") & (result.flags.checkpoint == "checkpoint-3")]
    assert dict(zip(hits.tensor, hits["count"])) == {n: c for n, c in outside.items() if c}  # A/B, never ΔW
    assert result.failed
    stats = result.analysis.stats
    # frac_at_bound: the stored factors have a bound; ΔW, never stored, has none
    assert stats[stats.kind == "adapter"].frac_at_bound.notna().all()
    assert stats[stats.kind == "adapter_delta"].frac_at_bound.isna().all()


def test_include_reference_and_a_broken_adapter_config(lora_run: dict, tmp_path: Path) -> None:
    run, ckpts = lora_run["run"], lora_run["ckpts"]
    only = analyze(run, include=["*.delta_weight"], reference=ckpts[1])
    assert set(only.stats.tensor) == {DELTA, "__all__"}
    ref = only.drift[(only.drift.baseline == "reference") & (only.drift.tensor == DELTA)].set_index("checkpoint")
    deltas = lora_run["deltas"]
    want = torch.linalg.matrix_norm(deltas["checkpoint-3"][MODULE] - deltas["checkpoint-2"][MODULE])
    assert _close(ref.loc["checkpoint-3", "rel_l2_change"], float(want / torch.linalg.matrix_norm(
        deltas["checkpoint-2"][MODULE])))
    assert ref.loc["checkpoint-2", "rel_l2_change"] == 0.0
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    (copy / "checkpoint-2" / "adapter_config.json").write_text(json.dumps([1, 2]))
    broken = analyze(copy)
    assert broken.errors.checkpoint.tolist() == ["checkpoint-2"]
    assert "peft_type" in broken.errors.message.iloc[0]
    assert set(broken.stats.checkpoint) == {"checkpoint-1", "checkpoint-3"}  # skipped as a whole, not half-read
    prev = broken.drift[(broken.drift.tensor == DELTA) & (broken.drift.baseline == "previous")]
    assert prev.baseline_checkpoint.tolist() == ["checkpoint-1"]


def test_delta_rows_stream_one_module_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Six adapted modules in three saves: the ΔW walk holds one module's factors of three saves at most."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    from conftest import record_live_tensors

    for i in range(3):
        torch.manual_seed(i)
        base = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, n_positions=16))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["c_attn", "c_fc", "c_proj"],
                                                    init_lora_weights=False))
        model.save_pretrained(str(tmp_path / f"checkpoint-{i + 1}"))
    live = record_live_tensors(monkeypatch)
    result = analyze(tmp_path, include=["*.delta_weight"], workers=1)
    modules = result.stats[result.stats.kind == "adapter_delta"].tensor.unique()
    assert len(modules) == 8 and len(result.drift[result.drift.tensor.isin(modules)]) == 8 * 5
    assert live["peak"] <= 6  # 2 factors x (reference, previous, current), of 48 stored factors


def _load_peft(base: Path, folder: Path) -> dict[str, torch.Tensor]:
    """ΔW of each LoRA layer, as peft computes it for the adapter saved in ``folder``."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import GPT2LMHeadModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(str(base)), str(folder))
    return {name: layer.get_delta_weight("default").detach().to(torch.float64)
            for name, layer in model.named_modules() if isinstance(layer, LoraLayer)}


def test_clip_adapter_mode_delta_loads_in_peft_within_the_bound(lora_run: dict, tmp_path: Path) -> None:
    original = lora_run["deltas"]["checkpoint-3"][MODULE]
    bound = 0.5 * float(original.abs().max())
    out = tmp_path / "clipped"
    result = CliRunner().invoke(cli, ["clip", str(lora_run["run"]), "--max-abs", str(bound), "--adapter-mode", "delta",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = pd.read_csv(out / "clip_report.csv")
    assert set(report.tensor) == {DELTA} and set(report.kind) == {"adapter_delta"}
    assert report.kind_rule.str.startswith("adapter_config.json: scaling · B @ A").all()
    row = report.set_index("checkpoint").loc["checkpoint-3"]
    clipped = original.clamp(-bound, bound)
    assert row.n_clipped == int((original.abs() > bound).sum()) > 0
    for label in ("checkpoint-1", "checkpoint-2", "checkpoint-3"):
        src, dst = lora_run["run"] / label, out / label
        assert (dst / "adapter_config.json").read_bytes() == (src / "adapter_config.json").read_bytes()
        assert (dst / "trainer_state.json").read_bytes() == (src / "trainer_state.json").read_bytes()
    new = _load_peft(lora_run["base"], out / "checkpoint-3")[MODULE]
    residual = float(torch.linalg.matrix_norm(clipped - new) / torch.linalg.matrix_norm(clipped))
    assert residual > 1e-3  # clipping raised the rank; the rank-r refactoring's cost is reported in spec
    assert _close(float(row.spec.rsplit("residual ", 1)[1]), residual, rel=2e-3)
    assert _close(row.abs_max_after, float(new.abs().max()), rel=1e-4)
    assert float(new.abs().max()) < float(original.abs().max())


def test_clip_adapter_default_mode_clips_the_factors(lora_run: dict, tmp_path: Path) -> None:
    factors = lora_run["factors"]["checkpoint-3"]
    bound = 0.5 * float(factors[B_NAME].abs().max())
    out = tmp_path / "factors"
    result = CliRunner().invoke(cli, ["clip", str(lora_run["run"] / "checkpoint-3"), "--max-abs", str(bound),
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = pd.read_csv(out / "clip_report.csv")
    assert set(report.tensor) == {A_NAME, B_NAME} and report.n_clipped.sum() > 0
    assert set(report.kind) == {"adapter"}  # the adapter config, not the name rule, decided
    assert report.set_index("tensor").kind_rule[A_NAME] == f"adapter_config.json: lora_A of LoRA module {MODULE}"
    stored = load_file(str(out / "checkpoint-3" / "adapter_model.safetensors"))
    assert all(float(stored[n].abs().max()) <= bound for n in (A_NAME, B_NAME))
    new = _load_peft(lora_run["base"], out / "checkpoint-3")[MODULE]
    want = 2.0 * (stored[B_NAME].double() @ stored[A_NAME].double()).T  # scaling 8/4; Conv1D: fan_in_fan_out
    assert torch.allclose(new, want, atol=1e-6)


def test_clipped_variants_of_evaluate_say_adapter_as_clip_does(lora_run: dict) -> None:
    # the function evaluate/sweep/audit score their clipped variants with (a peft model factory
    # would cost far more than the variant): A and B are the adapter config's, as in clip's report
    from auditclip.checkpoints import open_run
    from auditclip.evaluation import adapter_kinds_of, clip_variant_states, clip_variants

    ckpt = next(c for c in open_run(lora_run["run"]) if c.label.startswith("checkpoint-3"))
    factors = lora_run["factors"]["checkpoint-3"]
    bound = 0.5 * float(factors[B_NAME].abs().max())
    adapter = adapter_kinds_of(ckpt)
    assert adapter is not None and tensor_kind(A_NAME)[0] == "parameter"  # what the name rule alone says
    [(name, clipped, report)] = clip_variant_states(dict(factors), clip_variants([f"max_abs={bound}"]),
                                                    adapter=adapter)
    rows = {r["tensor"]: r for r in report}
    assert set(rows) == {A_NAME, B_NAME} and {r["kind"] for r in report} == {"adapter"}
    assert rows[A_NAME]["kind_rule"] == f"adapter_config.json: lora_A of LoRA module {MODULE}"
    for n in (A_NAME, B_NAME):
        assert rows[n]["n_clipped"] == int((factors[n].abs() > bound).sum())
        assert torch.equal(clipped[n], factors[n].clamp(-bound, bound))
    assert rows[B_NAME]["n_clipped"] > 0
    assert adapter_kinds_of(open_run("sample_checkpoints/high_lr")[0]) is None


def test_clip_adapter_mode_delta_refuses_what_names_stored_tensors(lora_run: dict, tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["clip", str(lora_run["run"]), "--max-abs", "0.01", "--adapter-mode", "delta",
                                      "--exclude", "*lora_B*", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "Error: --adapter-mode delta" in result.output

