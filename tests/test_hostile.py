"""Hostile and broken checkpoints: code never runs, the rest of the run is processed."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from auditclip.cli import cli


class _Payload:
    """Unpickling this would create the marker file: exactly what must never happen."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def _weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"weight": torch.randn(3, 4, generator=g), "bias": torch.randn(3, generator=g)}


@pytest.fixture
def hostile_run(tmp_path: Path) -> tuple[Path, Path, Path]:
    run = tmp_path / "run"
    run.mkdir()
    marker = tmp_path / "PWNED"
    for step in (1, 3, 5):
        torch.save({"state_dict": _weights(step)}, run / f"step_{step}.pt")
    torch.save({"state_dict": _weights(2), "x": _Payload(marker)}, run / "step_2.pt")  # zip format
    torch.save({"state_dict": _weights(4), "x": _Payload(marker)}, run / "step_4.pt",
               _use_new_zipfile_serialization=False)  # legacy format
    (tmp_path / "m.py").write_text("import torch\ndef make():\n    return torch.nn.Linear(4, 3)\n")
    g = torch.Generator().manual_seed(0)
    save_file({"x": torch.randn(30, 4, generator=g), "y": torch.randint(0, 3, (30,), generator=g)},
              str(tmp_path / "data.safetensors"))
    return run, marker, tmp_path


def _commands(run: Path, tmp: Path) -> dict[str, list[str]]:
    model, data = f"{tmp}/m.py:make", str(tmp / "data.safetensors")
    return {
        "drift": ["drift", str(run), "--out", str(tmp / "o_drift")],
        "flag": ["flag", str(run), "--out", str(tmp / "o_flag")],
        "clip": ["clip", str(run), "--max-abs", "0.5", "--out", str(tmp / "o_clip")],
        "evaluate": ["evaluate", str(run), "--model", model, "--data", data, "--out", str(tmp / "o_evaluate")],
        "sweep": ["sweep", str(run), "--model", model, "--data", data, "--max-abs", "0.5,1", "--out", str(tmp / "o_sweep")],
        "audit": ["audit", str(run), "--model", model, "--data", data, "--out", str(tmp / "o_audit")],
    }


@pytest.mark.parametrize("command", ["drift", "flag", "clip", "evaluate", "sweep", "audit"])
def test_malicious_pickles_never_run_and_the_rest_is_processed(hostile_run, command: str) -> None:  # type: ignore[no-untyped-def]
    run, marker, tmp = hostile_run
    args = _commands(run, tmp)[command]
    result = CliRunner().invoke(cli, args)
    assert not marker.exists()
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    out = Path(args[args.index("--out") + 1])
    errors = pd.read_csv(out / "errors.csv")
    assert errors.checkpoint.tolist() == ["step_2.pt", "step_4.pt"]
    assert set(errors.error) == {"unsafe"}
    assert errors.message.str.contains("system").all() and errors.message.str.contains("safetensors").all()
    assert "warning: skipped step_2.pt" in result.output


def test_inspect_of_a_malicious_pickle_is_refused_with_exit_2(hostile_run) -> None:  # type: ignore[no-untyped-def]
    run, marker, _ = hostile_run
    for name in ("step_2.pt", "step_4.pt"):
        result = CliRunner().invoke(cli, ["inspect", str(run / name)])
        assert result.exit_code == 2 and "refused" in result.output and "system" in result.output
        assert result.output.count("\n") == 1 and "Traceback" not in result.output
    assert not marker.exists()


def test_allow_global_admits_a_named_class(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "trainmeta.py").write_text(
        "class TrainMeta:\n    def __init__(self, lr=0.1):\n        self.lr = lr\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import trainmeta

    ckpt = tmp_path / "ckpt" / "step_1.pt"
    ckpt.parent.mkdir()
    torch.save({"state_dict": _weights(0), "meta": trainmeta.TrainMeta(0.3)}, ckpt)
    # a zip-format file: the foreign object is kept as an inert placeholder and said on stderr
    stubbed = CliRunner().invoke(cli, ["inspect", str(ckpt)])
    assert stubbed.exit_code == 0 and "weight" in stubbed.output, stubbed.output
    assert "trainmeta.TrainMeta kept as inert placeholders" in stubbed.output
    # a legacy-format file is still refused: only what weights_only admits
    legacy = tmp_path / "legacy" / "step_1.pt"
    legacy.parent.mkdir()
    torch.save({"state_dict": _weights(0), "meta": trainmeta.TrainMeta(0.3)}, legacy,
               _use_new_zipfile_serialization=False)
    refused = CliRunner().invoke(cli, ["inspect", str(legacy)])
    assert refused.exit_code == 2 and "trainmeta.TrainMeta" in refused.output
    allowed = CliRunner().invoke(cli, ["--allow-global", "trainmeta.TrainMeta", "inspect", str(legacy)])
    assert allowed.exit_code == 0, allowed.output
    assert "weight" in allowed.output
    bad = CliRunner().invoke(cli, ["--allow-global", "nowhere_xyz.Thing", "inspect", str(ckpt)])
    assert bad.exit_code == 2 and "Error: --allow-global nowhere_xyz.Thing" in bad.output
    sys.modules.pop("trainmeta", None)


def test_unwritable_output_is_a_clean_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "run"
    src.mkdir()
    torch.save(_weights(0), src / "step_1.pt")
    out = tmp_path / "out"
    out.mkdir()
    if os.geteuid() != 0:  # a real read-only directory where permissions bind
        out.chmod(0o555)
    else:  # root ignores permission bits: make the filesystem refuse instead
        import tempfile

        def refuse(*args, **kwargs):  # type: ignore[no-untyped-def]
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr(tempfile, "mkstemp", refuse)
    for args in (["drift", str(src), "--out", str(out)], ["clip", str(src), "--max-abs", "1", "--out", str(out)]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 2, result.output
        assert "Error: cannot write in" in result.output and "Traceback" not in result.output
    out.chmod(0o755)
    assert [p.name for p in out.iterdir()] == []


def test_inputs_are_never_opened_for_writing(hostile_run) -> None:  # type: ignore[no-untyped-def]
    run, _, tmp = hostile_run
    for evil in ("step_2.pt", "step_4.pt"):
        (run / evil).unlink()
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.iterdir()}
    writes: list[str] = []
    watched = str(run)
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC

    def hook(event: str, args: tuple) -> None:  # type: ignore[type-arg]
        if event == "open" and args and str(args[0]).startswith(watched):
            mode, flags = args[1], args[2]
            if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (isinstance(flags, int) and flags & write_flags):
                writes.append(f"{args[0]} {mode} {flags}")

    sys.addaudithook(hook)  # audit hooks cannot be removed; this one only watches this test's folder
    for args in _commands(run, tmp).values():
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, (args[0], result.output)
    result = CliRunner().invoke(cli, ["inspect", str(run / "step_1.pt")])
    assert result.exit_code == 0
    watched = "/nonexistent-after-test"
    assert writes == []
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in run.iterdir()} == before
