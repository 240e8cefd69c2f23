"""The shipped sample runs are what the README says they are."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from auditclip import analyze, open_run

from conftest import SAMPLES


def _model():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("digits_mlp", SAMPLES / "digits_mlp.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module.make_model()


def test_sample_runs_are_ordered_by_metadata_step() -> None:
    for name in ("high_lr", "wgan_clip"):
        run = open_run(SAMPLES / name)
        assert run.labels == [f"epoch_{e:02d}.safetensors" for e in range(1, 13)]
        assert [c.step for c in run] == [45 * e for e in range(1, 13)]


def test_wgan_run_stays_inside_its_clip_range() -> None:
    stats = analyze(SAMPLES / "wgan_clip", drift=False).stats
    assert len(stats) == 12 * 7
    assert stats.abs_max.max() <= 0.01


def test_high_lr_run_grows_out_of_range_late() -> None:
    result = analyze(SAMPLES / "high_lr")
    total = result.stats[result.stats.tensor == "__all__"].set_index("step")
    assert total.loc[360, "abs_max"] < 1.5 < 5.0 < total.loc[540, "abs_max"]
    steps = result.drift[(result.drift.tensor == "__all__") & (result.drift.baseline == "previous")]
    assert steps.loc[steps.rel_l2_change.idxmax(), "step"] == 405  # the jump when the rate goes up


def test_held_out_data_and_model_load_every_checkpoint() -> None:
    data = load_file(str(SAMPLES / "digits_test.safetensors"))
    assert data["x"].shape == (360, 64) and data["x"].dtype == torch.float32 and data["y"].dtype == torch.int64
    model = _model()
    for path in sorted((SAMPLES / "wgan_clip").glob("*.safetensors")):
        model.load_state_dict(load_file(str(path)), strict=True)
    model.eval()
    with torch.inference_mode():
        accuracy = (model(data["x"]).argmax(1) == data["y"]).float().mean().item()
    assert accuracy > 0.9  # clipped to +-0.01 and still a working classifier


def test_samples_are_small() -> None:
    assert sum(p.stat().st_size for p in SAMPLES.rglob("*") if p.is_file()) < 5_000_000
    lm = [p for p in SAMPLES.rglob("*") if p.is_file() and p.relative_to(SAMPLES).parts[0].startswith("tiny_lm")]
    assert lm and sum(p.stat().st_size for p in lm) < 2_000_000
    assert not any(p.suffix in (".bin", ".pt", ".pth", ".pkl") for p in lm)  # no pickles shipped


def test_lm_sample_is_what_the_readme_says() -> None:
    pytest.importorskip("transformers", reason="the language-model sample is read with transformers")
    from transformers import AutoTokenizer, GPT2LMHeadModel

    run = SAMPLES / "tiny_lm"
    assert [c.label for c in open_run(run)] == ["checkpoint-12", "checkpoint-24", "checkpoint-36"]
    data = load_file(str(SAMPLES / "tiny_lm_heldout.safetensors"))
    assert data["input_ids"].shape == (16, 15) and torch.equal(data["input_ids"], data["labels"])
    texts = [line for line in (SAMPLES / "tiny_lm_heldout.jsonl").read_text().splitlines() if line]
    tokenizer = AutoTokenizer.from_pretrained(str(run), local_files_only=True)
    import json

    assert torch.equal(torch.tensor(tokenizer([json.loads(t)["text"] for t in texts])["input_ids"]), data["input_ids"])
    model = GPT2LMHeadModel.from_pretrained(str(run / "checkpoint-36")).eval()
    assert model.lm_head.weight is model.transformer.wte.weight  # tied, stored once
    with torch.inference_mode():
        loss = float(model(input_ids=data["input_ids"], labels=data["labels"]).loss)
    assert loss < 0.9 * math.log(122)  # it learnt something: well below a uniform guess


def test_regeneration_reproduces_what_is_stable_across_machines(tmp_path: Path) -> None:
    """Training replays are not bit-identical across CPUs (AVX-512 vs AVX2 kernels), so
    compare what does not depend on them: the data bit for bit, the layout and metadata,
    the first epoch closely, and the properties the README promises of each run."""
    pytest.importorskip("sklearn")
    sys.path.insert(0, str(SAMPLES))
    try:
        import make_samples
    finally:
        sys.path.remove(str(SAMPLES))
    make_samples.main(tmp_path)
    shipped = sorted(p.relative_to(SAMPLES) for p in SAMPLES.rglob("*.safetensors"))
    if importlib.util.find_spec("transformers") is None:  # the language-model sample needs it
        shipped = [p for p in shipped if not str(p).startswith("tiny_lm")]
    assert shipped == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.safetensors"))
    for rel in shipped:
        with safe_open(str(SAMPLES / rel), "pt") as a, safe_open(str(tmp_path / rel), "pt") as b:
            # safetensors writes metadata keys in hash order, so compare contents, not bytes
            assert a.metadata() == b.metadata()
            assert sorted(a.keys()) == sorted(b.keys())
            for key in a.keys():
                x, y = a.get_tensor(key), b.get_tensor(key)
                assert x.shape == y.shape and x.dtype == y.dtype, (rel, key)
                if rel.name in ("digits_test.safetensors", "tiny_lm_heldout.safetensors"):
                    assert torch.equal(x, y), (rel, key)
                elif rel.name == "epoch_01.safetensors":  # one epoch in, replays still agree closely
                    assert float((x - y).norm()) <= 1e-3 * float(x.norm()) + 1e-6, (rel, key)
    regenerated = analyze(tmp_path / "wgan_clip", drift=False).stats
    assert regenerated.abs_max.max() <= 0.01
    totals = analyze(tmp_path / "high_lr", drift=False).stats.query("tensor == '__all__'").set_index("step")
    assert totals.loc[360, "abs_max"] < 5.0 < totals.loc[540, "abs_max"]
