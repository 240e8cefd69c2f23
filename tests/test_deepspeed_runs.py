"""DeepSpeed runs written by DeepSpeed itself, end to end through discovery, the reader and the CLI.

The runs (``tests/deepspeed_runs.py``: two data-parallel ranks on CPU, ZeRO-2 in bf16 and
ZeRO-3 in fp32, saves at steps 2 and 3) come with what DeepSpeed itself says the weights
are: ``get_fp32_state_dict_from_zero_checkpoint`` (its ``zero_to_fp32.py`` consolidation)
and the engine's own ``module.state_dict()`` at save time. Those are saved here as
safetensors and audited too: the statistics of the DeepSpeed run must equal them.

Which copy is compared: at ZeRO-3 the fp32 master copy (the only one: the model-states
files hold shape-[0] placeholders) against DeepSpeed's fp32 consolidation; at ZeRO-2 the
default module weights (bf16, what the model runs with) against the engine's
``module.state_dict()``, and ``--key master`` against the fp32 consolidation.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from auditclip.checkpoints import open_run
from auditclip.errors import CheckpointError
from auditclip.kinds import tensor_kind
from auditclip.formats.readers import open_checkpoint_file
from conftest import assert_same_stats, csv_rows, invoke_cli, save_safetensors
from deepspeed_runs import deepspeed_runs

STEPS = (2, 3)
ZERO3_RANK0 = "zero_pp_rank_0_mp_rank_00_model_states.pt"
BUFFERS = {"scale"}  # what tests/scripts/deepspeed_train.py registers as buffers


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The DeepSpeed runs, and DeepSpeed's own view of their weights as safetensors runs."""
    out = deepspeed_runs(tmp_path_factory)
    base = tmp_path_factory.mktemp("deepspeed-expected")
    expected: dict[tuple[str, str], dict[int, dict[str, torch.Tensor]]] = {}
    for run, kind in (("3_fp32", "fp32"), ("2_bf16", "fp32"), ("2_bf16", "module")):
        expected[run, kind] = {}
        for step in STEPS:
            saved = torch.load(out / run / "expected" / f"global_step{step}.{kind}.pt", weights_only=True)
            sd = {k: v.detach() for k, v in saved.items()}  # zero_to_fp32 hands back Parameters
            expected[run, kind][step] = sd
            save_safetensors(base / f"{run}-{kind}" / f"global_step{step}.safetensors", sd)
    return {"out": out, "zero3": out / "3_fp32" / "run", "zero2": out / "2_bf16" / "run", "base": base,
            "expected": expected}



# --- discovery --------------------------------------------------------------------------------

def test_a_run_folder_is_its_tags_in_step_order(runs: dict[str, Any]) -> None:
    for key in ("zero2", "zero3"):
        run = open_run(runs[key])
        assert [(c.label, c.step, c.format) for c in run] == [("global_step2", 2, "deepspeed"),
                                                              ("global_step3", 3, "deepspeed")]
        assert run.notes == [] and run.ignored == []  # latest names the last tag; optimizer files are read
        # a tag folder alone is one checkpoint
        assert [(c.label, c.step) for c in open_run(runs[key] / "global_step2")] == [("global_step2", 2)]
    # any file of a ZeRO-3 tag, given or globbed, is its tag folder (rank 1's model states, optimizer files...)
    one = open_run(runs["zero3"] / "global_step3" / "zero_pp_rank_1_mp_rank_00_model_states.pt")
    assert [(c.label, c.step, c.format, c.path.name) for c in one] == [("global_step3", 3, "deepspeed", "global_step3")]
    globbed = open_run(str(runs["zero3"] / "*" / "*.pt"))
    assert [(c.label, c.step) for c in globbed] == [("global_step2", 2), ("global_step3", 3)]


def test_the_reader_lists_full_shapes_never_placeholders(runs: dict[str, Any]) -> None:
    fp32 = runs["expected"]["3_fp32", "fp32"][3]
    with open_checkpoint_file(runs["zero3"] / "global_step3" / ZERO3_RANK0) as reader:
        infos = {n: reader.info(n) for n in reader.names()}
        assert {n: tuple(i.shape) for n, i in infos.items()} == {n: tuple(t.shape) for n, t in fp32.items()}
        assert all(i.numel > 0 for i in infos.values())
        assert all(torch.equal(reader.get(n), fp32[n]) for n in fp32)
    # --key picks the copy; other entries are refused by name
    with pytest.raises(CheckpointError, match="placeholders") as err:
        open_checkpoint_file(runs["zero3"], key="module")
    assert err.value.kind == "unsupported"
    with pytest.raises(CheckpointError, match="--key module .* --key master"):
        open_checkpoint_file(runs["zero2"], key="ema")


# --- drift: the statistics DeepSpeed's own consolidation gives ---------------------------------

def test_drift_of_a_zero3_run_equals_zero_to_fp32(runs: dict[str, Any], tmp_path: Path) -> None:
    result = invoke_cli("drift", str(runs["zero3"]), "--out", str(tmp_path / "ds"))
    assert result.exit_code == 0, result.output
    assert "ZeRO-3 checkpoints: the parameters are the fp32 master copy reassembled" in result.output
    assert invoke_cli("drift", str(runs["base"] / "3_fp32-fp32"), "--out", str(tmp_path / "st")).exit_code == 0
    assert_same_stats(tmp_path / "ds", tmp_path / "st")
    rows = csv_rows(tmp_path / "ds" / "stats.csv")
    assert [r["checkpoint"] for r in rows if r["tensor"] == "__all__"] == ["global_step2", "global_step3"]
    # an independent check of the values: numpy on DeepSpeed's consolidated weights
    for r in rows:
        if r["tensor"] != "__all__":
            a = runs["expected"]["3_fp32", "fp32"][int(r["step"])][r["tensor"]].double().numpy()
            assert a.size > 0 and float(r["abs_max"]) == pytest.approx(np.abs(a).max(), rel=1e-6)
            assert float(r["l2_norm"]) == pytest.approx(np.sqrt((a * a).sum()), rel=1e-6)


def test_drift_of_a_zero2_run_reads_the_module_weights_and_key_master_the_fp32_copy(
        runs: dict[str, Any], tmp_path: Path) -> None:
    result = invoke_cli("drift", str(runs["zero2"]), "--out", str(tmp_path / "ds"))
    assert result.exit_code == 0, result.output
    assert "ZeRO-2 checkpoints: the module weights are read (what the model runs with, bfloat16)" in result.output
    # the bf16 weights the engine's module held at save time
    assert invoke_cli("drift", str(runs["base"] / "2_bf16-module"), "--out", str(tmp_path / "st")).exit_code == 0
    assert_same_stats(tmp_path / "ds", tmp_path / "st")
    assert {r["dtype"] for r in csv_rows(tmp_path / "ds" / "stats.csv") if r["tensor"].endswith("weight")} == {"bfloat16"}

    result = invoke_cli("drift", str(runs["zero2"]), "--key", "master", "--out", str(tmp_path / "master"))
    assert result.exit_code == 0, result.output
    assert "fp32 master copy from the zero_pp_rank_*_optim_states.pt files (--key master)" in result.output
    assert invoke_cli("drift", str(runs["base"] / "2_bf16-fp32"), "--out", str(tmp_path / "fp32")).exit_code == 0
    assert_same_stats(tmp_path / "master", tmp_path / "fp32")


# --- kinds: DeepSpeed's buffer_names decide -------------------------------------------------------

def _range_rows(out: Path) -> dict[tuple[int, str], int]:
    return {(int(r["step"]), r["tensor"]): int(r["count"]) for r in csv_rows(out / "flags.csv") if r["rule"] == "range"}


def test_a_deepspeed_buffer_is_a_buffer_in_stats_and_the_range_gate(runs: dict[str, Any], tmp_path: Path) -> None:
    assert tensor_kind("scale")[0] == "unknown"  # the name rule alone cannot tell
    assert invoke_cli("drift", str(runs["zero2"]), "--out", str(tmp_path / "drift")).exit_code == 0
    module = runs["expected"]["2_bf16", "module"]
    want = {n: "buffer" if n in BUFFERS else "parameter" for n in module[3]}  # 2.bias: a frozen parameter
    for table in ("stats.csv", "drift.csv"):
        rows = [r for r in csv_rows(tmp_path / "drift" / table) if r["tensor"] != "__all__"]
        assert {r["tensor"]: r["kind"] for r in rows} == want and len(rows) >= len(want), table

    limit = 0.375  # below every value of scale (0.5, 2, 3) and some weights; exact in bfloat16
    expected: dict[tuple[int, str], int] = {}
    for s in STEPS:
        for n, t in module[s].items():
            count = int((t.double().abs().numpy() > limit).sum())
            if count:
                expected[(s, n)] = count
    assert expected[(3, "scale")] == 3 and len(expected) > len(STEPS) * len(BUFFERS)
    result = invoke_cli("flag", str(runs["zero2"]), "--max-abs", f"{limit}", "--out", str(tmp_path / "params"))
    assert result.exit_code == 1, result.output
    assert _range_rows(tmp_path / "params") == {k: v for k, v in expected.items() if k[1] not in BUFFERS}
    result = invoke_cli("flag", str(runs["zero2"]), "--max-abs", f"{limit}", "--buffers", "--out", str(tmp_path / "all"))
    assert result.exit_code == 1, result.output
    assert _range_rows(tmp_path / "all") == expected
    # only the buffer beyond the limit: the gate passes, it checked the parameters
    big = max(float(t.abs().max()) for s in STEPS for n, t in module[s].items() if n not in BUFFERS)
    assert big < 3.0
    result = invoke_cli("flag", str(runs["zero2"]), "--max-abs", f"{big * 1.01:.6g}", "--out", str(tmp_path / "pass"))
    assert result.exit_code == 0, result.output
    result = invoke_cli("flag", str(runs["zero2"]), "--max-abs", f"{big * 1.01:.6g}", "--buffers",
                  "--out", str(tmp_path / "fail"))
    assert result.exit_code == 1 and set(_range_rows(tmp_path / "fail")) == {(s, "scale") for s in STEPS}


def test_drift_max_abs_bounds_the_parameters_the_format_records(runs: dict[str, Any], tmp_path: Path) -> None:
    """frac_at_bound: the bound applies to what DeepSpeed records as parameters; its buffer ``scale``
    (a name the name rule cannot tell) has none, as flag's range gate decides."""
    limit = 0.5  # a bfloat16 value; scale holds 0.5: at the bound were it a parameter
    assert invoke_cli("drift", runs["zero2"], "--max-abs", limit, "--out", tmp_path / "d").exit_code == 0
    rows = {(int(r["step"]), r["tensor"]): r for r in csv_rows(tmp_path / "d" / "stats.csv")}
    module = runs["expected"]["2_bf16", "module"]
    for s in STEPS:
        assert rows[(s, "scale")]["frac_at_bound"] == ""  # no bound: NaN
        for n, t in module[s].items():
            if n in BUFFERS:
                continue
            x = t.float().numpy()
            ulp = float(np.spacing(np.float32(limit)) * 2 ** 16)  # one bfloat16 ulp at 0.5
            at = int(((np.abs(x - limit) <= ulp) | (np.abs(x + limit) <= ulp)).sum())
            assert float(rows[(s, n)]["frac_at_bound"]) == pytest.approx(at / x.size), (s, n)


# --- flag: a gate never passes on placeholders --------------------------------------------------

def test_flag_max_abs_on_a_zero3_run_flags_what_numpy_says(runs: dict[str, Any], tmp_path: Path) -> None:
    fp32 = runs["expected"]["3_fp32", "fp32"]
    # the model's register_buffer("scale") (tests/scripts/deepspeed_train.py): DeepSpeed lists it in
    # buffer_names, so the range rule leaves it alone although its name says nothing
    gated = [n for n in fp32[3] if tensor_kind(n)[0] != "buffer" and n not in BUFFERS]
    values = np.concatenate([fp32[s][n].abs().flatten().numpy() for s in STEPS for n in gated])
    limit = float(f"{float(np.quantile(values, 0.9)):.6g}")
    result = invoke_cli("flag", str(runs["zero3"]), "--max-abs", f"{limit}", "--out", str(tmp_path / "out"))
    assert result.exit_code == 1, result.output
    expected = {}
    for s in STEPS:
        for n in gated:
            a = fp32[s][n].double().numpy()
            if (np.abs(a) > limit).any():
                expected[(s, n)] = (int((np.abs(a) > limit).sum()), float(a.flat[np.argmax(np.abs(a))]))
    assert 2 <= len(expected) < 2 * len(gated)  # some flagged, some not
    flagged = {(int(r["step"]), r["tensor"]): (int(r["count"]), float(r["worst_value"]))
               for r in csv_rows(tmp_path / "out" / "flags.csv") if r["rule"] == "range"}
    assert flagged.keys() == expected.keys()
    for where, (count, worst) in expected.items():
        assert flagged[where][0] == count and flagged[where][1] == pytest.approx(worst, rel=1e-6)


def test_flag_on_a_zero3_model_states_file_alone_never_passes(runs: dict[str, Any], tmp_path: Path) -> None:
    # the file given on its own: its tag folder is read, and every real value beyond 1e-9 is flagged
    given = runs["zero3"] / "global_step3" / ZERO3_RANK0
    result = invoke_cli("flag", str(given), "--max-abs", "1e-9", "--out", str(tmp_path / "given"))
    assert result.exit_code == 1, result.output
    fp32 = runs["expected"]["3_fp32", "fp32"][3]
    flagged = {r["tensor"]: int(r["count"]) for r in csv_rows(tmp_path / "given" / "flags.csv") if r["rule"] == "range"}
    assert flagged == {n: int((t.abs() > 1e-9).sum()) for n, t in fp32.items() if n not in BUFFERS} \
        and sum(flagged.values()) > 100

    # without the optimizer files nothing holds the weights: an error naming the consolidation, never exit 0
    tag = shutil.copytree(runs["zero3"] / "global_step3", tmp_path / "run" / "global_step3")
    for p in tag.glob("*optim_states.pt"):
        p.unlink()
    # (no checkpoint of the run is readable: the CLI stops with the error, exit 2)
    result = invoke_cli("flag", str(tag / ZERO3_RANK0), "--max-abs", "1e-9", "--out", str(tmp_path / "alone"))
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert "ZeRO-3 checkpoint without its zero_pp_rank_*_optim_states.pt files" in message
    assert "placeholders" in message and "python zero_to_fp32.py . OUTPUT_DIR --tag global_step3" in message
    with pytest.raises(CheckpointError) as err:
        open_checkpoint_file(tag / ZERO3_RANK0)
    assert err.value.kind == "missing_shard"

    # renamed out of its DeepSpeed name, the generic reader sees param_shapes and empty tensors: refused
    renamed = shutil.copy(given, tmp_path / "step3.pt")
    result = invoke_cli("flag", str(renamed), "--max-abs", "1e-9", "--out", str(tmp_path / "renamed"))
    assert result.exit_code == 2, result.output
    message = " ".join(result.output.split())
    assert "a DeepSpeed ZeRO-3 model-states file" in message and "python zero_to_fp32.py" in message
    with pytest.raises(CheckpointError) as err:
        open_checkpoint_file(renamed)
    assert err.value.kind == "unsupported" and "empty placeholders of shape [0]" in err.value.message


# --- broken and odd runs ---------------------------------------------------------------------------

def test_a_missing_rank_file_is_an_error_row_and_the_other_tags_are_audited(
        runs: dict[str, Any], tmp_path: Path) -> None:
    run = shutil.copytree(runs["zero3"], tmp_path / "run")
    (run / "global_step2" / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    result = invoke_cli("drift", str(run), "--out", str(tmp_path / "out"))
    assert result.exit_code == 1, result.output
    errors = csv_rows(tmp_path / "out" / "errors.csv")
    assert [(r["checkpoint"], r["error"]) for r in errors] == [("global_step2", "missing_shard")]
    assert "zero_pp_rank_1_mp_rank_00_optim_states.pt" in errors[0]["message"] and "2 rank(s)" in errors[0]["message"]
    stats = csv_rows(tmp_path / "out" / "stats.csv")
    assert {r["checkpoint"] for r in stats} == {"global_step3"}
    assert {r["tensor"] for r in stats} == {*runs["expected"]["3_fp32", "fp32"][3], "__all__"}


def test_latest_naming_an_older_tag_is_noted(runs: dict[str, Any], tmp_path: Path) -> None:
    run = shutil.copytree(runs["zero2"], tmp_path / "run")
    (run / "latest").write_text("global_step2")
    listed = open_run(run)
    assert [c.label for c in listed] == ["global_step2", "global_step3"]  # every tag, in step order
    assert any("latest: names global_step2, not global_step3" in n for n in listed.notes), listed.notes
    (run / "latest").write_text("global_step9")
    assert any("names the tag 'global_step9', which is no DeepSpeed checkpoint folder" in n
               for n in open_run(run).notes)


def test_trainer_checkpoint_folders_holding_one_deepspeed_tag_are_a_run(runs: dict[str, Any], tmp_path: Path) -> None:
    """A Hugging Face Trainer under ZeRO-3 without gathered weights saves no model.safetensors: each
    ``checkpoint-<N>/`` holds ``latest``, its one ``global_step<N>/`` and the Trainer's own files."""
    for step in STEPS:
        folder = tmp_path / "output_dir" / f"checkpoint-{step}"
        shutil.copytree(runs["zero3"] / f"global_step{step}", folder / f"global_step{step}")
        (folder / "latest").write_text(f"global_step{step}")
        (folder / "trainer_state.json").write_text(f'{{"global_step": {step}}}')
        torch.save({}, folder / "training_args.bin")
    run = open_run(tmp_path / "output_dir")
    assert [(c.label, c.step, c.format) for c in run] == [("checkpoint-2", 2, "deepspeed"),
                                                          ("checkpoint-3", 3, "deepspeed")]
    assert sorted(p.name for p in run.ignored) == ["training_args.bin"] * 2
    fp32 = runs["expected"]["3_fp32", "fp32"][3]
    with run[1].open() as reader:
        assert sorted(reader.names()) == sorted(fp32) and all(torch.equal(reader.get(n), fp32[n]) for n in fp32)


def test_lightning_deepspeed_ckpt_folders_are_a_run(runs: dict[str, Any], tmp_path: Path) -> None:
    """Lightning's DeepSpeedStrategy.save_checkpoint: ``engine.save_checkpoint(filepath, tag="checkpoint")``, so
    ``epoch=0-step=2.ckpt/`` is a folder holding ``latest`` and the tag folder ``checkpoint/``."""
    for epoch, step in enumerate(STEPS):
        folder = tmp_path / "checkpoints" / f"epoch={epoch}-step={step}.ckpt"
        shutil.copytree(runs["zero2"] / f"global_step{step}", folder / "checkpoint")
        (folder / "latest").write_text("checkpoint")
    run = open_run(tmp_path / "checkpoints")
    assert [(c.label, c.step, c.format) for c in run] == [("epoch=0-step=2.ckpt", 2, "deepspeed"),
                                                          ("epoch=1-step=3.ckpt", 3, "deepspeed")]
    assert run.notes == []  # the tag's global_steps agree with the names' steps
    module = runs["expected"]["2_bf16", "module"][2]
    with run[0].open() as reader:
        assert sorted(reader.names()) == sorted(module)
        assert all(torch.equal(reader.get(n), module[n]) for n in module)
