"""The command line, through click's CliRunner: exit codes, output, files written."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from auditclip import __version__
from auditclip.analysis import DRIFT_COLUMNS, ERROR_COLUMNS
from auditclip.cli import cli
from auditclip.stats import STATS_COLUMNS

from conftest import state_dict


def invoke(*args: str) -> "CliRunner.invoke":  # type: ignore[valid-type]
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_version_and_help() -> None:
    assert invoke("--version").output.strip() == f"auditclip, version {__version__}"
    result = invoke("--help")
    assert result.exit_code == 0 and "drift" in result.output and "inspect" in result.output


@pytest.mark.parametrize("command", sorted(cli.commands))
def test_every_command_has_help_with_an_example(command: str) -> None:
    result = invoke(command, "--help")
    assert result.exit_code == 0
    assert "Examples:" in result.output and f"auditclip {command} " in result.output


def test_inspect_table_csv_json(run_dir: Path) -> None:
    ckpt = run_dir / "step_10.safetensors"
    table = invoke("inspect", ckpt)
    assert table.exit_code == 0
    assert table.output.splitlines()[0].split()[:4] == ["tensor", "dtype", "shape", "numel"]
    assert "fc1.weight" in table.output and "__all__" in table.output

    csv = invoke("inspect", ckpt, "--format", "csv")
    df = pd.read_csv(pd.io.common.StringIO(csv.output))
    assert list(df.columns) == list(STATS_COLUMNS)
    assert df.set_index("tensor").loc["fc1.weight", "mean"] == pytest.approx(
        float((state_dict(0)["fc1.weight"] + 0.05).double().mean()), rel=1e-9)

    records = json.loads(invoke("inspect", ckpt, "--format", "json").output)
    assert records[0]["tensor"] == "bn.num_batches_tracked" and records[0]["mean"] is None


def test_drift_writes_both_csvs_and_prints_top_tensors(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    result = invoke("drift", run_dir, "--out", out, "--top", "2")
    assert result.exit_code == 0, result.output
    stats = pd.read_csv(out / "stats.csv")
    drift = pd.read_csv(out / "drift.csv")
    assert list(stats.columns) == list(STATS_COLUMNS) and list(drift.columns) == list(DRIFT_COLUMNS)
    assert stats.checkpoint.unique().tolist() == [f"step_{s}.safetensors" for s in (0, 10, 20, 30)]
    assert stats.step.unique().tolist() == [0, 10, 20, 30]
    assert not (out / "errors.csv").exists()
    lines = result.output.splitlines()
    assert lines[0] == "Audited 4 checkpoint(s), 5 tensor(s): step_0.safetensors .. step_30.safetensors"
    assert lines[3].split()[0] == "tensor"
    top = [ln.split()[0] for ln in lines[4:6]]
    ref = drift[(drift.baseline == "reference") & (drift.step == 30) & (drift.tensor != "__all__")]
    assert top == ref.nlargest(2, "rel_l2_change").tensor.tolist()
    # fc2.bias starts at zero: any change is an infinite relative change, shown rather than hidden
    assert ref.set_index("tensor").loc["fc2.bias", "rel_l2_change"] == float("inf")


def test_broken_checkpoint_is_reported_and_skipped(run_dir: Path, tmp_path: Path) -> None:
    (run_dir / "step_15.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    out = tmp_path / "report"
    result = invoke("drift", run_dir, "--out", out)
    assert result.exit_code == 1
    assert "warning: skipped step_15.safetensors" in result.output
    errors = pd.read_csv(out / "errors.csv")
    assert list(errors.columns) == list(ERROR_COLUMNS)
    assert errors.checkpoint.tolist() == ["step_15.safetensors"]
    stats = pd.read_csv(out / "stats.csv")
    assert stats.checkpoint.nunique() == 4  # every readable checkpoint is still there


@pytest.mark.parametrize("args, message", [
    (["inspect", "{tmp}/nope.safetensors"], "no such file or directory"),
    (["drift", "{tmp}/nope", "--out", "{tmp}/o"], "no such file or directory"),
    (["drift", "{tmp}/*.nothing", "--out", "{tmp}/o"], "no file matches"),
    (["drift", "{run}", "--out", "{run}/step_0.safetensors"], "is a file"),
    (["inspect", "{run}"], "inspect takes one checkpoint"),
    (["drift", "{run}", "--out", "{tmp}/o", "--reference", "{run}"], "--reference must name one checkpoint"),
    (["inspect", "{tmp}/bad.pt"], "not a readable PyTorch file"),
])
def test_bad_input_is_one_error_line_exit_2(run_dir: Path, tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "bad.pt").write_bytes(b"PK\x03\x04 truncated zip")
    result = invoke(*[a.format(tmp=tmp_path, run=run_dir) for a in args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    error_lines = [ln for ln in result.output.splitlines() if ln.startswith("Error:")]
    assert len(error_lines) == 1 and message in error_lines[0]


def test_usage_errors_exit_2(run_dir: Path) -> None:
    result = invoke("drift", run_dir)  # --out missing
    assert result.exit_code == 2 and "Error: Missing option '--out'" in result.output
    result = invoke("inspect", run_dir / "step_0.safetensors", "--format", "xml")
    assert result.exit_code == 2 and "Error: Invalid value for '--format'" in result.output


def test_pt_run_with_key_through_cli(tmp_path: Path) -> None:
    for step in (1, 2):
        torch.save({"state_dict": state_dict(step), "ema": state_dict(step + 10)}, tmp_path / f"step_{step}.ckpt")
    out = tmp_path / "o"
    assert invoke("drift", tmp_path, "--out", out, "--key", "ema", "-q").exit_code == 0
    stats = pd.read_csv(out / "stats.csv").set_index(["step", "tensor"])
    assert stats.loc[(2, "fc1.weight"), "max"] == pytest.approx(float(state_dict(12)["fc1.weight"].max()), rel=1e-7)


def test_options_are_declared_once_and_mean_the_same_everywhere() -> None:
    """Every option of every command is one of auditclip.options.OPTIONS, with its flags, type and
    default (a command may only reword its help): --key or --include cannot drift apart per command."""
    import click

    from auditclip.options import OPTIONS

    def shape(o: click.Option) -> tuple[object, ...]:
        kind = (type(o.type).__name__, getattr(o.type, "choices", None), getattr(o.type, "min", None))
        return (tuple(o.opts), tuple(o.secondary_opts), o.name, kind, o.default, o.multiple, o.is_flag, o.required)

    declared = {shape(click.Option(list(opt.decls), **opt.settings)) for opt in OPTIONS.values()}
    own = {("inspect", "--format")}  # one command's own option, declared beside it
    shared = 0
    for name, command in cli.commands.items():
        for param in command.params:
            if isinstance(param, click.Option) and param.opts != ["-h", "--help"] and (name, param.opts[0]) not in own:
                assert shape(param) in declared, (name, param.opts)
                shared += 1
    assert shared > 100
    flags = [f for opt in OPTIONS.values() for f in opt.decls if f.startswith("-")]
    sweep_lists = {"--max-abs", "--percentile", "--sigma"}  # sweep's take lists of settings
    assert sorted(f for f in flags if flags.count(f) > 1) == sorted([*sweep_lists, *sweep_lists])
