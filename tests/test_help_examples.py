"""Every example a ``--help`` shows runs as written, on the shipped sample run.

Each example line (``auditclip ...``, joined over ``\\`` continuations) of the group's and
every command's help is run with CliRunner in a fresh folder holding a copy of
``sample_checkpoints/``; it must exit 0, or the code its trailing ``# exit N`` documents
(a gate example meant to fail).
"""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from auditclip.cli import cli

from conftest import SAMPLES


def _help(*command: str) -> str:
    result = CliRunner().invoke(cli, [*command, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    return result.output


def _examples(text: str) -> list[str]:
    """The example commands in a help text, continuation lines joined."""
    out: list[str] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if pending:
            pending += " " + stripped
        elif stripped.startswith("auditclip "):
            pending = stripped
        else:
            continue
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        out.append(pending)
        pending = ""
    assert not pending, f"an example ends in a continuation: {pending}"
    return out


EXAMPLES = [(name, example) for name in ["", *sorted(cli.commands)]
            for example in _examples(_help(*([name] if name else [])))]


def test_every_help_has_examples_to_run() -> None:
    shown = {name for name, _ in EXAMPLES}
    assert shown == {"", *cli.commands}
    assert len(EXAMPLES) >= 2 * len(cli.commands)


@pytest.mark.parametrize("command, example", EXAMPLES, ids=[f"{c or 'auditclip'}-{i}" for i, (c, _) in
                                                             enumerate(EXAMPLES)])
def test_help_example_runs(command: str, example: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copytree(SAMPLES, tmp_path / "sample_checkpoints")
    monkeypatch.chdir(tmp_path)  # outputs (report/, clipped/...) land in the temporary folder
    code = re.search(r"#\s*exit\s+(\d+)\s*$", example)
    argv = shlex.split(example, comments=True)
    assert argv[0] == "auditclip"
    result = CliRunner().invoke(cli, argv[1:])
    expected = int(code.group(1)) if code else 0
    assert result.exit_code == expected, f"{example}\n{result.output}"
    assert "Traceback" not in result.output and "Error:" not in result.output
