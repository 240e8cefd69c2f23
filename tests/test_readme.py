"""README.md stays true: CI command, every command, every CSV column documented."""

from __future__ import annotations

import re

import pytest

from auditclip.analysis import DRIFT_COLUMNS, ERROR_COLUMNS
from auditclip.clipping import CLIP_REPORT_COLUMNS
from auditclip.flags import FLAG_COLUMNS
from auditclip.cli import cli
from auditclip.stats import STATS_COLUMNS

from conftest import ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    command = ci.strip().splitlines()[-1]
    assert "pytest" in command
    assert f"```bash\n{command}\n```" in README


def test_every_command_is_documented_with_an_example() -> None:
    for name in cli.commands:
        assert f"### `auditclip {name}" in README
        assert re.search(rf"^auditclip {name} \S", README, re.MULTILINE), name


@pytest.mark.parametrize("columns", [STATS_COLUMNS, DRIFT_COLUMNS, ERROR_COLUMNS, FLAG_COLUMNS, CLIP_REPORT_COLUMNS])
def test_every_csv_column_is_in_the_dictionary(columns: tuple[str, ...]) -> None:
    documented = set(re.findall(r"`([a-z0-9_]+)`", README))
    assert set(columns) <= documented, set(columns) - documented


def test_main_command_is_audit_on_the_sample_run() -> None:
    first_block = README.split("```bash\n", 1)[1].split("\n```", 1)[0]
    assert "auditclip audit sample_checkpoints/high_lr --model sample_checkpoints/digits_mlp.py:make_model" in first_block
    assert "--data sample_checkpoints/digits_test.safetensors" in first_block and "'.[plot]'" in first_block


def test_evaluation_columns_are_documented() -> None:
    for column in ("variant", "n_clipped", "frac_clipped", "loss", "accuracy", "top5_accuracy", "mae", "recommended",
                   "setting", "n_loaded", "n_model_tensors"):
        assert f"`{column}`" in README, column


def test_python_api_example_runs(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    block = README.split("## Python API", 1)[1].split("```python\n", 1)[1].split("\n```", 1)[0]
    import shutil

    shutil.copytree(ROOT / "sample_checkpoints", tmp_path / "sample_checkpoints")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)  # the README's own example, as written
    assert namespace["flags"].rule.eq("range").any() and len(namespace["ev"]) == 24
    assert (tmp_path / "report" / "summary.md").is_file()
    assert (tmp_path / "report" / "epoch_12_clipped.safetensors").is_file()
