"""flag: rules, worst indices, exit codes, config files."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from auditclip import InputError
from auditclip.cli import cli
from auditclip.config import flag_settings
from auditclip.flags import FLAG_COLUMNS, flag

from conftest import SAMPLES, save_safetensors


def invoke(*args: object):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture
def troubled_run(tmp_path: Path) -> Path:
    """Six checkpoints: a NaN at step 3, a 100x outlier at step 2, a jump at step 5, a frozen tensor."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(200, 50, generator=g) * 0.1
    b = torch.randn(100, 100, generator=g) * 0.1
    c = torch.randn(64, 64, generator=g) * 0.1
    frozen = torch.randn(32, 8, generator=g)
    for step in range(1, 7):
        a = a + torch.randn(a.shape, generator=g) * 0.002
        b = b + torch.randn(b.shape, generator=g) * 0.002
        c = c + torch.randn(c.shape, generator=g) * 0.002 + (0.5 if step == 5 else 0.0)
        sd = {"a.weight": a.clone(), "b.weight": b.clone(), "c.weight": c.clone(), "frozen.weight": frozen}
        if step == 3:
            sd["a.weight"][4, 7] = float("nan")
        if step == 2:
            sd["b.weight"][3, 17] = 10.0
        save_safetensors(tmp_path / "run" / f"step_{step}.safetensors", sd)
    return tmp_path / "run"


def test_flag_finds_each_planted_problem(troubled_run: Path, tmp_path: Path) -> None:
    result = invoke("flag", troubled_run, "--out", tmp_path / "f")
    assert result.exit_code == 1, result.output
    flags = pd.read_csv(tmp_path / "f" / "flags.csv")
    assert list(flags.columns) == list(FLAG_COLUMNS)
    errors = flags[flags.severity == "error"]
    assert errors[["step", "tensor", "rule", "worst_index", "count"]].values.tolist() == [
        [3, "a.weight", "nonfinite", "[4, 7]", 1]]
    outlier = flags[(flags.rule == "outlier") & (flags.tensor == "b.weight")]
    assert outlier[["step", "worst_index", "worst_value"]].values.tolist() == [[2, "[3, 17]", 10.0]]
    jump = flags[(flags.rule == "jump") & (flags.tensor == "c.weight")]
    assert jump.step.tolist() == [5]
    frozen = flags[flags.rule == "frozen"]
    assert frozen[["tensor", "step", "severity"]].values.tolist() == [["frozen.weight", 6, "info"]]
    assert "nonfinite" in result.output and "frozen.weight" in result.output
    # only warnings and info remain when errors are not what fails the gate
    assert invoke("flag", troubled_run, "--out", tmp_path / "g", "--fail-on", "never").exit_code == 0


def test_wgan_run_passes_its_bound_and_fails_with_one_weight_out(tmp_path: Path) -> None:
    ok = invoke("flag", SAMPLES / "wgan_clip", "--max-abs", "0.01", "--out", tmp_path / "ok")
    assert ok.exit_code == 0, ok.output
    assert "0 error" in ok.output
    run = tmp_path / "wgan"
    shutil.copytree(SAMPLES / "wgan_clip", run)
    sd = load_file(str(run / "epoch_07.safetensors"))
    sd["net.3.weight"][5, 9] = 0.02
    save_safetensors(run / "epoch_07.safetensors", sd, {"step": "315"})
    bad = invoke("flag", run, "--max-abs", "0.01", "--out", tmp_path / "bad")
    assert bad.exit_code == 1
    flags = pd.read_csv(tmp_path / "bad" / "flags.csv")
    row = flags[flags.rule == "range"].iloc[0]
    assert (row.checkpoint, row.tensor, row.worst_index, row["count"]) == ("epoch_07.safetensors", "net.3.weight", "[5, 9]", 1)
    assert row.worst_value == pytest.approx(0.02)
    assert "net.3.weight" in bad.output


def test_bf16_weight_clamped_in_bf16_is_inside_the_bound(tmp_path: Path) -> None:
    w = (torch.randn(50, 50) * 0.1).to(torch.bfloat16).clamp(-0.01, 0.01)  # 0.01 rounds up in bf16
    save_safetensors(tmp_path / "step_1.safetensors", {"w": w})
    assert flag(tmp_path, max_abs=0.01).flags.query("rule == 'range'").empty
    assert not flag(tmp_path, max_abs=0.009).flags.query("rule == 'range'").empty


def test_overrides_exempt_patterns_and_options_beat_config(troubled_run: Path, tmp_path: Path) -> None:
    (tmp_path / "audit.toml").write_text(
        '[flag]\nmax_abs = 0.05\nfail_on = "warning"\n[[flag.override]]\npattern = ["frozen.*", "c.*"]\noff = ["range"]\n')
    result = flag(troubled_run, flag_settings(tmp_path / "audit.toml"))
    ranged = set(result.flags[result.flags.rule == "range"].tensor)
    assert ranged == {"a.weight", "b.weight"}
    assert result.failed  # warnings fail with fail_on = "warning"
    cli_wins = flag_settings(tmp_path / "audit.toml", {"max_abs": 100.0, "fail_on": "never"}, ["a.*:off=range"])
    result = flag(troubled_run, cli_wins)
    assert result.flags[result.flags.rule == "range"].empty and not result.failed


def test_pyproject_table_is_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "pyproject.toml").write_text('[tool.auditclip]\nexclude = ["*.bias"]\n[tool.auditclip.flag]\nzscore = 7\n')
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    settings = flag_settings()
    assert settings.rules.zscore == 7 and settings.exclude == ("*.bias",)


@pytest.mark.parametrize("toml, message", [
    ("[flag]\nzscroe = 3\n", "unknown key 'zscroe'"),
    ("[flag]\nmax_abs = -1\n", "max_abs"),
    ("[flag]\nrange = \"1:-1\"\n", "LO must be"),
    ("[flag]\nfail_on = \"sometimes\"\n", "fail_on"),
    ("[flag]\noff = [\"nonfinite\"]\n", "mandatory rule 'nonfinite'"),
    ("[flags]\n", "unknown key 'flags'"),
])
def test_bad_config_names_the_key(tmp_path: Path, toml: str, message: str) -> None:
    (tmp_path / "c.toml").write_text(toml)
    with pytest.raises(InputError, match=message):
        flag_settings(tmp_path / "c.toml")
    result = invoke("flag", SAMPLES / "wgan_clip", "--config", tmp_path / "c.toml", "--out", tmp_path / "o")
    assert result.exit_code == 2 and message.split("'")[0] in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("args, message", [
    (["--range", "1:-1"], "LO must be"),
    (["--range", "a:b"], "expected LO:HI"),
    (["--range", "-1:1", "--max-abs", "1"], "not both"),
    (["--zscore", "-2"], "positive"),
    (["--override", "nocolon"], "expected GLOB:KEY=VALUE"),
])
def test_bad_flag_options_exit_2(tmp_path: Path, args: list[str], message: str) -> None:
    result = invoke("flag", SAMPLES / "wgan_clip", "--out", tmp_path / "o", *args)
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output


def test_dead_tensor_and_norm_growth(tmp_path: Path) -> None:
    for step, scale in ((1, 1.0), (2, 1.5), (3, 4.0)):
        save_safetensors(tmp_path / f"step_{step}.safetensors",
                         {"w": torch.ones(10, 10) * scale + torch.eye(10), "zero.bias": torch.zeros(10)})
    result = flag(tmp_path, norm_growth=3.0)
    growth = result.flags[result.flags.rule == "norm_growth"]
    assert growth[["step", "tensor"]].values.tolist() == [[3, "w"]]
    dead = result.flags[result.flags.rule == "dead"]
    assert dead.tensor.unique().tolist() == ["zero.bias"] and dead.step.tolist() == [1, 2, 3]


def test_a_run_too_short_for_the_run_rules_says_so(tmp_path: Path) -> None:
    """One checkpoint: jump, frozen and norm_growth cannot be applied; each is a skipped row and a note."""
    single = SAMPLES / "high_lr" / "epoch_01.safetensors"
    result = CliRunner().invoke(cli, ["flag", str(single), "--norm-growth", "2", "--fail-on", "info",
                                      "--out", str(tmp_path / "f")])
    assert result.exit_code == 0, result.output  # skipped is not a finding: the gate passes
    flags = pd.read_csv(tmp_path / "f" / "flags.csv")
    assert flags[["rule", "severity", "tensor"]].values.tolist() == [
        ["jump", "skipped", "__all__"], ["norm_growth", "skipped", "__all__"], ["frozen", "skipped", "__all__"]]
    for message in flags.message:
        assert f"note: {message}" in result.output
    assert "the rule needs 4" in flags.message.iloc[0] and "besides the reference" in flags.message.iloc[1]


def test_jump_not_applied_to_a_tensor_added_late_is_said(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(8, 8, generator=g)
    for step in range(1, 6):
        a = a + 0.01 * torch.randn(8, 8, generator=g)
        sd = {"a.weight": a.clone()}
        if step >= 4:
            sd["late.weight"] = torch.randn(4, 4, generator=g)
        save_safetensors(tmp_path / "run" / f"step_{step}.safetensors", sd)
    skipped = flag(tmp_path / "run").flags.query("severity == 'skipped'")
    assert skipped[["rule", "checkpoint"]].values.tolist() == [["jump", "step_5.safetensors"]]
    assert skipped.message.iloc[0].endswith("fewer than 4 checkpoints (added, removed or reshaped during the run): late.weight")
