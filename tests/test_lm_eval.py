"""Language models re-evaluated: GPT-2 and Llama runs written by transformers' Trainer, a LoRA run by peft.

The independent side is transformers itself: each ``checkpoint-<step>/`` loaded with
``from_pretrained`` and scored by its own ``model(input_ids, labels=labels).loss`` (and
peft's ``PeftModel.from_pretrained`` for the adapter run), on the same tokens.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from auditclip.evaluation import evaluate
from auditclip.lm import decide_shift, token_sums
from conftest import csv_rows, invoke_cli
from realruns import fit_causal_lm, fit_peft_trainer, save_word_tokenizer, word_texts

transformers = pytest.importorskip("transformers", reason="language-model evaluation needs transformers")
pytest.importorskip("tokenizers", reason="the test tokenizer is built with tokenizers")

VOCAB = 122  # w0..w119, [UNK], [PAD]
N_HELD = 10


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tokenizer, held-out texts (JSONL and pre-tokenised), and a GPT-2 and a Llama run trained on the same text."""
    root = tmp_path_factory.mktemp("lm")
    tokenizer = save_word_tokenizer(root / "tokenizer")
    train = torch.tensor(tokenizer(word_texts(64, seed=0))["input_ids"])
    texts = word_texts(N_HELD, seed=1)
    (root / "heldout.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    ids = torch.tensor(tokenizer(texts)["input_ids"])
    save_file({"input_ids": ids, "labels": ids.clone()}, str(root / "heldout.safetensors"))
    # padded: each row cut to its own length, the rest [PAD] with attention 0 and label -100
    lengths = torch.tensor([16 - (i % 5) for i in range(N_HELD)])[:, None] - 1
    keep = torch.arange(ids.shape[1])[None, :] <= lengths
    padded = ids.masked_fill(~keep, 1)
    save_file({"input_ids": padded, "attention_mask": keep.long(), "labels": padded.masked_fill(~keep, -100)},
              str(root / "padded.safetensors"))
    runs = {arch: fit_causal_lm(root / arch, arch, train, vocab=VOCAB) for arch in ("gpt2", "llama")}
    return {"root": root, "ids": ids, "padded": (padded, keep), "runs": runs}


def _hf_loss(folder: Path, input_ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        return float(model(input_ids=input_ids, attention_mask=mask, labels=labels).loss)


def _hf_accuracy(folder: Path, input_ids: torch.Tensor) -> float:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        guess = model(input_ids=input_ids).logits[:, :-1].argmax(-1)
    return float((guess == input_ids[:, 1:]).float().mean())


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_evaluate_hf_matches_transformers_loss(lm: dict[str, Any], arch: str, tmp_path: Path) -> None:
    run, root, ids = lm["runs"][arch], lm["root"], lm["ids"]
    # --batch-size 3: four batches, the last of one sequence; a mean of batch means would differ
    result = invoke_cli("evaluate", str(run), "--model", "hf", "--data", str(root / "heldout.safetensors"),
                        "--batch-size", "3", "--out", str(tmp_path / "eval"))
    assert result.exit_code == 0, result.output
    rows = {r["checkpoint"]: r for r in csv_rows(tmp_path / "eval" / "evaluation.csv")}
    assert sorted(rows) == ["checkpoint-12", "checkpoint-24"]
    for label, row in rows.items():
        want = _hf_loss(run / label, ids, ids)
        assert float(row["loss"]) == pytest.approx(want, rel=1e-5, abs=1e-6)
        assert float(row["perplexity"]) == pytest.approx(math.exp(want), rel=1e-5)
        assert float(row["accuracy"]) == pytest.approx(_hf_accuracy(run / label, ids), abs=1e-6)
        assert row["primary_metric"] == "loss" and row["n_loaded"] == row["n_model_tensors"]
    assert float(rows["checkpoint-24"]["loss"]) < float(rows["checkpoint-12"]["loss"]) < math.log(VOCAB)
    if arch == "gpt2":  # lm_head.weight is tied to the embedding and absent from the file: no --no-strict
        with open(run / "checkpoint-24" / "model.safetensors", "rb"):
            from safetensors import safe_open

            with safe_open(str(run / "checkpoint-24" / "model.safetensors"), "pt") as f:
                assert "lm_head.weight" not in f.keys()


def test_padding_masked_and_limit_counts_sequences(lm: dict[str, Any]) -> None:
    run, root = lm["runs"]["llama"], lm["root"]
    padded, keep = lm["padded"]
    df = evaluate(run / "checkpoint-24", "hf", str(root / "padded.safetensors"), batch_size=4)
    want = _hf_loss(run / "checkpoint-24", padded, padded.masked_fill(~keep, -100), keep.long())
    assert float(df.loss.iloc[0]) == pytest.approx(want, rel=1e-5)
    limited = evaluate(run / "checkpoint-24", "hf", str(root / "heldout.safetensors"), batch_size=3, limit=4)
    ids = lm["ids"][:4]
    assert float(limited.loss.iloc[0]) == pytest.approx(_hf_loss(run / "checkpoint-24", ids, ids), rel=1e-5)


def test_jsonl_texts_with_the_saved_tokenizer_give_the_same_numbers(lm: dict[str, Any], tmp_path: Path) -> None:
    run, root = lm["runs"]["gpt2"], lm["root"]
    out = {}
    for name, extra in (("tokens", ["--data", str(root / "heldout.safetensors")]),
                        ("texts", ["--data", str(root / "heldout.jsonl"), "--tokenizer", str(root / "tokenizer")])):
        result = invoke_cli("evaluate", str(run), *extra, "--batch-size", "4", "--out", str(tmp_path / name))
        assert result.exit_code == 0, result.output  # no --model: hf, because config.json is there
        out[name] = csv_rows(tmp_path / name / "evaluation.csv")
    for a, b in zip(out["tokens"], out["texts"], strict=True):
        for metric in ("loss", "perplexity", "accuracy"):
            assert float(a[metric]) == pytest.approx(float(b[metric]), rel=1e-9), metric


def test_sweep_recommends_by_loss_within_tolerance_and_names_its_cost(lm: dict[str, Any], tmp_path: Path) -> None:
    run, root = lm["runs"]["gpt2"], lm["root"]
    settings = [0.05, 0.1, 0.2, 0.5, 1.0]
    result = invoke_cli("sweep", str(run / "checkpoint-24"), "--model", "hf", "--data",
                        str(root / "heldout.safetensors"), "--max-abs", ",".join(map(str, settings)),
                        "--out", str(tmp_path / "sweep"))
    assert result.exit_code == 0, result.output
    rows = csv_rows(tmp_path / "sweep" / "sweep.csv")
    base = float(next(r for r in rows if r["variant"] == "original")["loss"])
    tried = sorted((r for r in rows if r["variant"] != "original"), key=lambda r: float(r["setting"]))
    # independently: the tightest setting that clips something and keeps loss within 1% of the original
    within = [r for r in tried if int(r["n_clipped"]) > 0 and float(r["loss"]) <= base * 1.01 + 1e-15]
    assert within and any(float(r["loss"]) > base * 1.01 for r in tried)  # the tolerance decided something
    chosen = within[0]
    assert [r["variant"] for r in rows if r["recommended"] == "True"] == [chosen["variant"]]
    rel = (float(chosen["loss"]) - base) / base * 100
    cost = (f"{chosen['variant']} clips {float(chosen['frac_clipped']) * 100:.3g}% of weights, "
            f"loss {rel:+.3g}% (within 1%)")
    summary = (tmp_path / "sweep" / "summary.md").read_text(encoding="utf-8")
    assert cost in summary and cost in result.output
    assert "primary metric (`--primary-metric`): `loss`" in summary
    assert "loss (lower is better), tolerance 1 % of the original (`--tolerance`)" in summary


@pytest.fixture(scope="module")
def lora(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    pytest.importorskip("peft", reason="LoRA evaluation needs peft")
    root = tmp_path_factory.mktemp("lora")
    base, run, _ = fit_peft_trainer(root, max_steps=2, save_steps=1)
    ids = torch.randint(0, 64, (6, 16), generator=torch.Generator().manual_seed(5))
    save_file({"input_ids": ids, "labels": ids.clone()}, str(root / "heldout.safetensors"))
    return {"root": root, "base": base, "run": run, "ids": ids}


def _peft_loss(base: Path, adapter: Path, ids: torch.Tensor) -> float:
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(str(base)), str(adapter))
    with torch.no_grad():
        return float(model.eval()(input_ids=ids, labels=ids).loss)


def test_lora_run_is_scored_as_base_plus_adapter(lora: dict[str, Any], tmp_path: Path) -> None:
    base, run, ids = lora["base"], lora["run"], lora["ids"]
    data = str(lora["root"] / "heldout.safetensors")
    result = invoke_cli("evaluate", str(run), "--model", "hf", "--data", data, "--clip", "max_abs=0.02",
                        "--out", str(tmp_path / "eval"))
    assert result.exit_code == 0, result.output
    rows = csv_rows(tmp_path / "eval" / "evaluation.csv")
    originals = {r["checkpoint"]: r for r in rows if r["variant"] == "original"}
    assert sorted(originals) == ["checkpoint-1", "checkpoint-2"]
    base_loss = _hf_loss(base, ids, ids)
    for label, row in originals.items():
        want = _peft_loss(base, run / label, ids)
        assert float(row["loss"]) == pytest.approx(want, rel=1e-5)
        assert abs(float(row["loss"]) - base_loss) > 1e-3  # the adapter changed the model
    # a clipped variant is the adapter clip writes: evaluate that folder with peft itself
    clipped = invoke_cli("clip", str(run), "--max-abs", "0.02", "--out", str(tmp_path / "clipped"))
    assert clipped.exit_code == 0, clipped.output
    for row in (r for r in rows if r["variant"] == "max_abs=0.02"):
        assert int(row["n_clipped"]) > 0 and "adapter_config.json" in row["kind_rule"]
        want = _peft_loss(base, tmp_path / "clipped" / row["checkpoint"], ids)
        assert float(row["loss"]) == pytest.approx(want, rel=1e-5)


def test_lora_base_not_local_needs_base(lora: dict[str, Any], tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "run" / "checkpoint-2"
    shutil.copytree(lora["run"] / "checkpoint-2", copy)
    config = json.loads((copy / "adapter_config.json").read_text())
    (copy / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "org/not-here"}))
    data = str(lora["root"] / "heldout.safetensors")
    result = invoke_cli("evaluate", str(copy), "--data", data, "--out", str(tmp_path / "e1"))
    assert result.exit_code == 2 and "--base PATH" in result.output
    result = invoke_cli("evaluate", str(copy), "--base", str(lora["base"]), "--data", data, "--out", str(tmp_path / "e2"))
    assert result.exit_code == 0, result.output
    got = float(csv_rows(tmp_path / "e2" / "evaluation.csv")[0]["loss"])
    assert got == pytest.approx(_peft_loss(lora["base"], lora["run"] / "checkpoint-2", lora["ids"]), rel=1e-5)


def test_token_sums_against_a_direct_computation() -> None:
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(3, 6, 11, generator=g), torch.randint(0, 11, (3, 6), generator=g)
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[1, 4:] = 0
    labels[2, 0] = -100
    got = token_sums(logits, labels, mask, shift=True)
    want, count, right = 0.0, 0, 0
    for b in range(3):
        for t in range(5):
            target = int(labels[b, t + 1])
            if target == -100 or mask[b, t + 1] == 0:
                continue
            row = logits[b, t].double()
            want += float(torch.logsumexp(row, 0) - row[target])
            count += 1
            right += int(int(row.argmax()) == target)
    assert got.tokens == count == 3 * 5 - 2 - 0 and got.correct == right
    assert got.loss == pytest.approx(want, rel=1e-6)
    unshifted = token_sums(logits, labels, None, shift=False)
    assert unshifted.tokens == 17


def test_shift_auto_follows_the_model_and_the_labels() -> None:
    ids = torch.tensor([[3, 4, 5]])
    other = torch.tensor([[4, 5, -100]])
    assert decide_shift("auto", True, {"input_ids": ids}, ids.masked_fill(ids == 3, -100))
    assert not decide_shift("auto", True, {"input_ids": ids}, other)  # already aligned: said in a note
    assert decide_shift("yes", False, {"input_ids": ids}, other) and not decide_shift("no", True, {}, ids)


def test_clip_merged_clips_base_plus_adapter(lora: dict[str, Any]) -> None:
    from peft import PeftModel

    base, adapter, ids = lora["base"], lora["run"] / "checkpoint-2", lora["ids"]
    df = evaluate(adapter, "hf", str(lora["root"] / "heldout.safetensors"), clips=["max_abs=0.05"], clip_merged=True)
    # independently: peft merges the adapter, torch clamps every parameter (the tied embedding once)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(str(base)),
                                           str(adapter)).merge_and_unload().eval()
    n_clipped = 0
    with torch.no_grad():
        for p in merged.parameters():
            n_clipped += int((p.abs() > 0.05).sum())
            p.clamp_(-0.05, 0.05)
        want = float(merged(input_ids=ids, labels=ids).loss)
    row = df[df.variant == "max_abs=0.05"].iloc[0]
    assert int(row.n_clipped) == n_clipped > 0 and row.kind_rule == "model"
    assert float(row.loss) == pytest.approx(want, rel=1e-5)
    assert float(df[df.variant == "original"].loss.iloc[0]) == pytest.approx(_peft_loss(base, adapter, ids), rel=1e-5)


def test_readme_language_model_examples_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shlex
    import shutil

    from conftest import ROOT, SAMPLES

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Language models\n", 1)[1]
    block = section.split("```bash\n", 1)[1].split("\n```", 1)[0]
    claimed = section.split("`recommended for ", 1)[1].split("`", 1)[0]
    shutil.copytree(SAMPLES, tmp_path / "sample_checkpoints")
    monkeypatch.chdir(tmp_path)
    outputs = []
    for line in block.splitlines():
        argv = shlex.split(line)
        assert argv[0] == "auditclip"
        result = invoke_cli(*argv[1:])
        assert result.exit_code == 0, f"{line}\n{result.output}"
        outputs.append(result.output)
    assert f"recommended for {claimed}" in outputs[-1]
    assert f"- `{claimed.split(':', 1)[0]}`:{claimed.split(':', 1)[1]}" in (tmp_path / "sweep_lm" / "summary.md").read_text()
    tokens, texts = csv_rows(tmp_path / "eval_lm" / "evaluation.csv"), csv_rows(tmp_path / "eval_lm_text" / "evaluation.csv")
    assert [float(r["loss"]) for r in tokens if r["variant"] == "original"] == pytest.approx(
        [float(r["loss"]) for r in texts], rel=1e-9)


def test_audit_without_model_scores_the_hf_run_and_names_the_cost(lm: dict[str, Any], tmp_path: Path) -> None:
    run, root = lm["runs"]["gpt2"], lm["root"]
    result = invoke_cli("audit", str(run / "checkpoint-24"), "--data", str(root / "heldout.safetensors"), "--clip", "max_abs=0.3",
                        "--clip", "max_abs=0.1", "--tolerance", "50", "--out", str(tmp_path / "report"))
    assert result.exit_code in (0, 1), result.output  # 1: a flag rule fired; the evaluation is what is checked
    rows = [r for r in csv_rows(tmp_path / "report" / "evaluation.csv") if r["checkpoint"] == "checkpoint-24"]
    base = float(next(r for r in rows if r["variant"] == "original")["loss"])
    chosen = next(r for r in rows if r["recommended"] == "True")
    rel = (float(chosen["loss"]) - base) / base * 100
    cost = (f"{chosen['variant']} clips {float(chosen['frac_clipped']) * 100:.3g}% of weights, "
            f"loss {rel:+.3g}% (within 50%)")
    assert f"Cost: {cost}." in (tmp_path / "report" / "summary.md").read_text(encoding="utf-8")


def test_device_batches_are_kept_after_the_first_pass(lm: dict[str, Any]) -> None:
    from auditclip.evaluation import EvalOptions, Evaluator

    evaluator = Evaluator("hf", str(lm["root"] / "heldout.safetensors"), EvalOptions(batch_size=4, device="cpu"))
    evaluator.cache = True  # as off the CPU, where moving the data is the cost
    reads = []
    real = evaluator.data.batches
    evaluator.data.batches = lambda: (reads.append(1), *real())[1:]  # type: ignore[method-assign]
    path = lm["runs"]["gpt2"] / "checkpoint-24"
    from safetensors.torch import load_file

    state = load_file(str(path / "model.safetensors"))
    first = evaluator.run(state, "checkpoint-24", str(path))
    assert evaluator.run(state, "checkpoint-24", str(path)) == first and len(reads) == 1
    assert first["loss"] == pytest.approx(_hf_loss(path, lm["ids"], lm["ids"]), rel=1e-5)


def test_factory_model_and_data_with_tied_weights_load_strictly(lm: dict[str, Any], tmp_path: Path) -> None:
    run, ids = lm["runs"]["gpt2"], lm["ids"]
    torch.save({"input_ids": ids}, tmp_path / "ids.pt")
    (tmp_path / "lmfactory.py").write_text(
        "import torch, transformers\n"
        "def make_model(checkpoint):\n"
        "    return transformers.GPT2LMHeadModel(transformers.GPT2Config.from_pretrained(checkpoint))\n"
        "def make_data():\n"
        f"    ids = torch.load({str(tmp_path / 'ids.pt')!r})['input_ids']\n"
        "    return [({'input_ids': ids[i:i + 4], 'attention_mask': torch.ones_like(ids[i:i + 4])}, ids[i:i + 4])\n"
        "            for i in range(0, len(ids), 4)]\n")
    df = evaluate(run / "checkpoint-24", f"{tmp_path / 'lmfactory.py'}:make_model", f"{tmp_path / 'lmfactory.py'}:make_data")
    assert df.n_loaded.iloc[0] == df.n_model_tensors.iloc[0]  # lm_head.weight filled by the embedding it is tied to
    assert float(df.loss.iloc[0]) == pytest.approx(_hf_loss(run / "checkpoint-24", ids, ids), rel=1e-5)


@pytest.mark.parametrize("suffix", [".parquet", ".arrow"])
def test_arrow_and_parquet_token_tables(lm: dict[str, Any], tmp_path: Path, suffix: str) -> None:
    pa = pytest.importorskip("pyarrow", reason="Arrow/Parquet token tables need pyarrow")
    import pyarrow.parquet as pq

    run, ids = lm["runs"]["gpt2"], lm["ids"]
    table = pa.table({"input_ids": ids.tolist(), "labels": ids.tolist(), "text": ["s"] * len(ids)})
    path = tmp_path / f"held{suffix}"
    if suffix == ".parquet":
        pq.write_table(table, str(path))
    else:  # what datasets' save_to_disk / cache files hold: an Arrow IPC stream
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    df = evaluate(run / "checkpoint-24", "hf", str(path), batch_size=4)
    assert float(df.loss.iloc[0]) == pytest.approx(_hf_loss(run / "checkpoint-24", ids, ids), rel=1e-5)


def test_a_clipped_variant_scores_the_file_clip_writes(lm: dict[str, Any], tmp_path: Path) -> None:
    from auditclip.hf_models import HF_TASKS
    from auditclip.options import OPTIONS

    assert list(OPTIONS["hf_task"].settings["type"].choices) == list(HF_TASKS)  # one list of tasks
    run, root, ids = lm["runs"]["llama"], lm["root"], lm["ids"]
    data = str(root / "heldout.safetensors")
    df = evaluate(run / "checkpoint-24", "hf", data, clips=["max_abs=0.1"], exclude=("*norm*",))
    clipped = invoke_cli("clip", str(run / "checkpoint-24"), "--model", "hf", "--max-abs", "0.1", "--exclude", "*norm*",
                         "--out", str(tmp_path / "clipped"))
    assert clipped.exit_code == 0, clipped.output
    folder = next(p.parent for p in (tmp_path / "clipped").rglob("model.safetensors"))
    row = df[df.variant == "max_abs=0.1"].iloc[0]
    assert int(row.n_clipped) > 0
    assert float(row.loss) == pytest.approx(_hf_loss(folder, ids, ids), rel=1e-5)


def test_checkpoint_code_runs_only_with_trust_remote_code(lm: dict[str, Any], tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "remote"
    shutil.copytree(lm["runs"]["gpt2"] / "checkpoint-24", folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="mything", architectures=["MyModel"],
                  auto_map={"AutoConfig": "my.MyConfig", "AutoModelForCausalLM": "my.MyModel"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "my.py").write_text("raise SystemExit('the checkpoint code ran')\n")
    result = invoke_cli("evaluate", str(folder), "--data", str(lm["root"] / "heldout.safetensors"),
                        "--out", str(tmp_path / "e"))
    assert result.exit_code == 2 and "--trust-remote-code runs that code" in result.output
    assert "checkpoint code ran" not in result.output


def test_progress_counts_checkpoints_times_variants(lm: dict[str, Any]) -> None:
    seen: list[tuple[int, int]] = []
    evaluate(lm["runs"]["gpt2"], "hf", str(lm["root"] / "heldout.safetensors"), clips=["max_abs=0.1", "max_abs=0.2"],
             progress=lambda done, total: seen.append((done, total)))
    assert seen == [(i, 6) for i in range(1, 7)]  # 2 checkpoints x (original + 2 variants)


def test_adapter_mode_delta_variant_scores_the_adapter_clip_writes(lora: dict[str, Any], tmp_path: Path) -> None:
    run, ids = lora["run"], lora["ids"]
    data = str(lora["root"] / "heldout.safetensors")
    result = invoke_cli("evaluate", str(run / "checkpoint-2"), "--data", data, "--clip", "max_abs=0.001",
                        "--adapter-mode", "delta", "--out", str(tmp_path / "eval"))
    assert result.exit_code == 0, result.output
    clipped = invoke_cli("clip", str(run / "checkpoint-2"), "--max-abs", "0.001", "--adapter-mode", "delta",
                         "--out", str(tmp_path / "clipped"))
    assert clipped.exit_code == 0, clipped.output
    report = csv_rows(tmp_path / "clipped" / "clip_report.csv")
    row = next(r for r in csv_rows(tmp_path / "eval" / "evaluation.csv") if r["variant"] == "max_abs=0.001")
    assert int(row["n_clipped"]) == sum(int(r["n_clipped"]) for r in report) > 0
    folder = next(p.parent for p in (tmp_path / "clipped").rglob("adapter_model.safetensors"))
    assert float(row["loss"]) == pytest.approx(_peft_loss(lora["base"], folder, ids), rel=1e-5)
    factors = evaluate(run / "checkpoint-2", "hf", data, clips=["max_abs=0.001"])
    assert float(factors.loss.iloc[1]) != pytest.approx(float(row["loss"]), rel=1e-6)  # the modes differ
