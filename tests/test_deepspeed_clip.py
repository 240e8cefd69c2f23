"""Clipped DeepSpeed runs that DeepSpeed itself resumes: ``engine.load_checkpoint`` on ``auditclip clip``'s output.

The runs are DeepSpeed's own (``tests/deepspeed_runs.py``: two ranks on CPU, ZeRO-2 in bf16
with alignment padding and round-robin partitions, ZeRO-3 in fp32 with every parameter
split across both ranks, a frozen parameter and a buffer). They are clipped with the CLI;
then, in a subprocess, DeepSpeed builds the same model, calls ``engine.load_checkpoint``
on the clipped run (the tag from its ``latest``), and reports the weights it resumed
with, its own ``get_fp32_state_dict_from_zero_checkpoint`` of the clipped run, and one
more training step. Expected values are numpy's clamp of DeepSpeed's consolidation of
the *input* run, so the master partitions, the module weights and the resume are each
checked against an independent computation.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from conftest import csv_rows, invoke_cli
from deepspeed_runs import SCRIPT, deepspeed_runs

C = 0.2  # below LayerNorm's weights (1.0) and many Linear weights of the tiny model: the clip changes values
BF16_C = 0.19921875  # the largest bfloat16 not above 0.2: the bound a bf16 run's two copies share
FP32_C = float(np.float32(0.2)) if float(np.float32(0.2)) <= C else float(np.nextafter(np.float32(0.2), np.float32(0)))
BUFFERS = {"scale"}
STAGES = {"2_bf16": ("2:bf16", BF16_C), "3_fp32": ("3:fp32", FP32_C)}


def _files(folder: Path) -> dict[Path, bytes]:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def resumed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    runs = deepspeed_runs(tmp_path_factory)
    out = tmp_path_factory.mktemp("deepspeed-clip")
    before = {name: _files(runs / name / "run") for name in STAGES}
    results = {name: invoke_cli("clip", runs / name / "run", "--max-abs", C, "--out", out / name) for name in STAGES}
    after = {name: _files(runs / name / "run") for name in STAGES}
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out), "2",
                           *(f"{spec}={out / name}" for name, (spec, _) in STAGES.items())],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert proc.returncode == 0 and "DONE" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]
    return {"runs": runs, "out": out, "results": results, "inputs_kept": before == after,
            "resumed": {name: torch.load(out / f"{name}.resumed.pt", weights_only=True) for name in STAGES}}


def _expected(resumed: dict[str, Any], name: str, what: str) -> dict[str, np.ndarray]:
    """numpy's clamp of DeepSpeed's own view of the input run's last tag (``fp32`` or ``module``)."""
    saved = torch.load(resumed["runs"] / name / "expected" / f"global_step3.{what}.pt", weights_only=True)
    bound = STAGES[name][1]
    out = {}
    for k, v in saved.items():
        v = v.detach()
        if k in BUFFERS:
            out[k] = v.float().numpy()
        elif v.dtype == torch.bfloat16:  # clamp in float32; the bound is a bf16 value, so the result is exact
            out[k] = np.clip(v.float().numpy(), -bound, bound)
        else:
            out[k] = np.clip(v.numpy(), np.float32(-bound), np.float32(bound))
    return out


@pytest.mark.parametrize("name", sorted(STAGES))
def test_the_clip_writes_a_run_deepspeed_resumes(resumed: dict[str, Any], name: str) -> None:
    result = resumed["results"][name]
    assert result.exit_code == 0, result.output
    assert resumed["inputs_kept"]
    out = resumed["out"] / name
    assert (out / "latest").read_text() == "global_step3"  # what engine.load_checkpoint(dir) follows
    assert (out / "zero_to_fp32.py").is_file()
    got = resumed["resumed"][name]
    assert got["global_steps"] == 3 and got["steps_after"] == 4  # resumed at the saved step and trained on
    # provenance beside the rank-0 model states: every input file's digest, the settings
    src = resumed["runs"] / name / "run" / "global_step3"
    record = next((out / "global_step3").glob("*.auditclip.json"))
    digests = json.loads(record.read_text())["auditclip_source_sha256"]
    assert digests == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in src.iterdir()}


@pytest.mark.parametrize("name", sorted(STAGES))
def test_deepspeed_consolidates_the_clipped_master_weights_to_numpys_clamp(resumed: dict[str, Any], name: str) -> None:
    """The fp32 master partitions in the optimizer files (what a resume restores) hold the clamp."""
    got = {k: v.detach().float().numpy() for k, v in resumed["resumed"][name]["fp32"].items()}
    want = _expected(resumed, name, "fp32")
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert any(np.abs(v).max() > C for k, v in _expected_raw(resumed, name).items() if k not in BUFFERS)


def _expected_raw(resumed: dict[str, Any], name: str) -> dict[str, np.ndarray]:
    saved = torch.load(resumed["runs"] / name / "expected" / "global_step3.fp32.pt", weights_only=True)
    return {k: v.detach().float().numpy() for k, v in saved.items()}


@pytest.mark.parametrize("name", sorted(STAGES))
def test_the_model_resumes_with_the_clipped_weights(resumed: dict[str, Any], name: str) -> None:
    """The weights the engine runs with after load_checkpoint: clipped, buffers untouched."""
    module = resumed["resumed"][name]["module"]
    want = _expected(resumed, name, "module" if name == "2_bf16" else "fp32")
    assert module.keys() == want.keys()
    for k, v in module.items():
        np.testing.assert_array_equal(v.float().numpy(), want[k], err_msg=k)
        if k not in BUFFERS:
            assert float(v.abs().max()) <= C
    assert float(module["scale"].max()) == 3.0  # a buffer above the bound, left alone


def test_audit_of_the_clipped_run_reads_the_clip_in_both_copies(resumed: dict[str, Any], tmp_path: Path) -> None:
    """flag --max-abs passes on the clipped ZeRO-2 run whichever copy it reads, and fails on the input."""
    out = resumed["out"] / "2_bf16"
    for key in ("module", "master"):
        assert invoke_cli("flag", out, "--max-abs", C, "--key", key, "--out", tmp_path / key).exit_code == 0
    failed = invoke_cli("flag", resumed["runs"] / "2_bf16" / "run", "--max-abs", C, "--out", tmp_path / "input")
    assert failed.exit_code == 1
    rows = csv_rows(out / "clip_report.csv")
    w = next(r for r in rows if r["checkpoint"] == "global_step3" and r["tensor"] == "0.weight")
    raw = _expected_raw(resumed, "2_bf16")["0.weight"]
    assert int(w["n_clipped"]) == int((np.abs(raw) > BF16_C).sum())  # counted on the master copy, at the shared bound
    assert float(w["hi"]) == BF16_C
    assert next(r for r in rows if r["tensor"] == "scale")["kind_rule"] == "format: deepspeed buffer_names"


def test_zero0_in_bf16_is_refused_naming_what_to_do(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    """At ZeRO-0 in bf16 the fp32 master copy is an unnamed list: refused, never half clipped."""
    run = deepspeed_runs(tmp_path_factory) / "0_bf16" / "run"
    result = invoke_cli("clip", run, "--max-abs", C, "--out", tmp_path / "out")
    assert result.exit_code == 1, result.output
    errors = csv_rows(tmp_path / "out" / "errors.csv")
    assert [e["checkpoint"] for e in errors] == ["global_step2", "global_step3"]
    assert all(e["error"] == "unsupported" and "ZeRO-0" in e["message"] and "engine.module.state_dict()"
               in e["message"] for e in errors)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["clip_report.csv", "errors.csv"]


def test_drop_trainer_state_is_refused_for_deepspeed(tmp_path_factory: pytest.TempPathFactory,
                                                     tmp_path: Path) -> None:
    run = deepspeed_runs(tmp_path_factory) / "3_fp32" / "run"
    result = invoke_cli("clip", run, "--max-abs", C, "--out", tmp_path / "out", "--drop-trainer-state")
    assert result.exit_code == 2
    assert "load_optimizer_states=False" in result.output and not (tmp_path / "out").exists()
