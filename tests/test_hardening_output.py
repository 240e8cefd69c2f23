"""What auditclip writes and prints holds up: signals, leftovers, terminal escapes, CSV formulas, full disks."""

from __future__ import annotations

import csv
import errno
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from auditclip.formats import writers
from auditclip.cli import cli, main
from auditclip.interrupts import Interrupted, handle_signals
from auditclip.output import atomic_path, formula_safe, remove_stale_temp_files, write_csv
from auditclip.terminal import safe

OSC52 = "\x1b]52;c;aGVsbG8=\x07"
POSIX = pytest.mark.skipif(os.name != "posix", reason="POSIX signals and /dev/full")

# Runs the installed console script (or ``python -m auditclip.cli``) with os.replace slowed
# down for auditclip's temporary files: the run stops, mid-write, until a signal comes.
HARNESS = r"""
import os, runpy, signal, sys, time
for name in ("SIGTERM", "SIGHUP"):  # as from an interactive shell, whatever pytest's parent ignores
    signal.signal(getattr(signal, name), signal.SIG_DFL)
signal.signal(signal.SIGINT, signal.default_int_handler)
ready, script = sys.argv[1], sys.argv[2]
_replace = os.replace
def slow_replace(src, dst, *args, **kwargs):
    if ".auditclip-" in os.fspath(src):
        open(ready, "w").close()
        time.sleep(60)
    return _replace(src, dst, *args, **kwargs)
os.replace = slow_replace
sys.argv = [script, *sys.argv[3:]]
if os.path.isfile(script):
    runpy.run_path(script, run_name="__main__")
else:
    runpy.run_module("auditclip.cli", run_name="__main__", alter_sys=True)
"""


def _script() -> str:
    script = Path(sys.executable).parent / "auditclip"
    return str(script) if script.is_file() else "auditclip.cli"


def _start_and_wait_mid_write(tmp_path: Path, args: list[str]) -> tuple[subprocess.Popen[str], Path]:
    """Start auditclip ``args`` in ``tmp_path``; return once it is writing its first output file."""
    ready = tmp_path / "READY"
    proc = subprocess.Popen([sys.executable, "-c", HARNESS, str(ready), _script(), *args], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"auditclip never reached a write (rc {proc.returncode}):\n{out}\n{err}")
        time.sleep(0.02)
    return proc, ready


def _temp_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.name.endswith(".tmp"))


def _run(tmp_path: Path, **tensors: dict[str, torch.Tensor]) -> list[Path]:
    paths = []
    for name, sd in tensors.items():
        save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / f"{name}.safetensors"))
        paths.append(tmp_path / f"{name}.safetensors")
    return paths


def _small(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"fc.weight": torch.randn(4, 3, generator=g), "fc.bias": torch.randn(4, generator=g)}


def _invoke(*args: object) -> object:
    return CliRunner().invoke(cli, [str(a) for a in args])


def _finished_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# 1. Interrupts and leftovers


@POSIX
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_mid_write_exits_128_plus_signal_and_leaves_no_temp_file(tmp_path: Path, signum: int,
                                                                         code: int) -> None:
    _run(tmp_path, step_1=_small(1), step_2=_small(2))
    proc, _ = _start_and_wait_mid_write(tmp_path, ["drift", "step_1.safetensors", "step_2.safetensors",
                                                   "--out", "out", "-q"])
    assert _temp_files(tmp_path / "out"), "the run should be writing stats.csv now"
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == code, (out, err)
    assert "Traceback" not in err and "Aborted!" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"Interrupted by {signal.Signals(signum).name}"), err
    assert _temp_files(tmp_path / "out") == []
    assert not (tmp_path / "out" / "stats.csv").exists()


@POSIX
def test_sigkill_leftover_is_removed_by_the_next_run_without_force(tmp_path: Path) -> None:
    _run(tmp_path, model=_small(1))
    proc, _ = _start_and_wait_mid_write(tmp_path, ["clip", "model.safetensors", "--max-abs", "0.5", "--out", "out"])
    proc.kill()
    proc.communicate(timeout=30)
    left = _temp_files(tmp_path / "out")
    assert [p.name.startswith(".model.safetensors.auditclip-") for p in left] == [True]

    result = _invoke("clip", tmp_path / "model.safetensors", "--max-abs", "0.5", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert _temp_files(tmp_path / "out") == []
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_only_temp_files_of_dead_auditclip_processes_of_this_host_are_removed(tmp_path: Path) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    with atomic_path(folder / "probe.csv") as tmp:
        ours = tmp.name  # .probe.csv.auditclip-HOST-PID-RANDOM.tmp
    m = re.fullmatch(r"\.probe\.csv\.auditclip-(\w+)-(\d+)-(\w+)\.tmp", ours)
    assert m is not None and int(m[2]) == os.getpid(), ours
    host, dead = m[1], _finished_pid()
    names = {
        "dead": f".stats.csv.auditclip-{host}-{dead}-abcd1234.tmp",
        "dead_odd_name": f".we ird\nname.csv.auditclip-{host}-{dead}-zz_9.tmp",
        "alive": f".drift.csv.auditclip-{host}-{os.getpid()}-abcd1234.tmp",
        "other_host": f".stats.csv.auditclip-{host}x-{dead}-abcd1234.tmp",
        "old_style": ".stats.csv.k2j4h5.tmp",
        "not_hidden": f"stats.csv.auditclip-{host}-{dead}-abcd1234.tmp",
        "other_suffix": f".stats.csv.auditclip-{host}-{dead}-abcd1234.tmp.bak",
        "user_file": "stats.csv",
    }
    for name in names.values():
        (folder / name).write_text("x")
    (folder / f".dir.auditclip-{host}-{dead}-abcd1234.tmp").mkdir()
    (folder / f".link.auditclip-{host}-{dead}-abcd1234.tmp").symlink_to(folder / "stats.csv")

    removed = remove_stale_temp_files(folder)
    assert sorted(p.name for p in removed) == sorted([names["dead"], names["dead_odd_name"]])
    left = {p.name for p in folder.iterdir()}
    assert left == (set(names.values()) - {names["dead"], names["dead_odd_name"]}) | {
        f".dir.auditclip-{host}-{dead}-abcd1234.tmp", f".link.auditclip-{host}-{dead}-abcd1234.tmp", "probe.csv"}


def test_a_run_writing_into_a_folder_sweeps_it(tmp_path: Path) -> None:
    run = _run(tmp_path, step_1=_small(1), step_2=_small(2))
    out = tmp_path / "out"
    out.mkdir()
    with atomic_path(tmp_path / "probe") as tmp:
        host = tmp.name.split(".auditclip-", 1)[1].split("-")[0]
    stale = out / f".stats.csv.auditclip-{host}-{_finished_pid()}-q1w2e3r4.tmp"
    stale.write_text("half a csv")
    result = _invoke("drift", *run, "--out", out)
    assert result.exit_code == 0, result.output
    assert not stale.exists() and _temp_files(out) == []


def test_main_exit_codes_are_unchanged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    run = _run(tmp_path, step_1=_small(1))
    broken = tmp_path / "step_2.safetensors"
    broken.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")

    def code(*args: object) -> int:
        monkeypatch.setattr(sys, "argv", ["auditclip", *map(str, args)])
        with pytest.raises(SystemExit) as exc:
            main()
        return exc.value.code

    assert code("--version") == 0
    assert code("inspect", run[0]) == 0
    assert code("inspect") == 2
    assert code("inspect", tmp_path / "nope") == 2
    assert code("drift", run[0], broken, "--out", tmp_path / "out", "-q") == 1
    err = capsys.readouterr().err
    assert "Error: no such file or directory" in err and "Traceback" not in err


def test_keyboard_interrupt_through_main_is_130(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    import auditclip.analysis

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(auditclip.analysis, "inspect_checkpoint", interrupted)
    monkeypatch.setattr(sys, "argv", ["auditclip", "inspect", "x.safetensors"])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 130
    err = capsys.readouterr().err
    assert [ln for ln in err.splitlines() if ln.strip()] == ["Interrupted by SIGINT (Ctrl-C); unfinished output "
                                                             "files were removed"]


@POSIX
@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGTERM])
def test_a_signal_inside_atomic_path_removes_the_temp_file(tmp_path: Path, signum: int) -> None:
    with pytest.raises(Interrupted) as exc, handle_signals(), atomic_path(tmp_path / "stats.csv") as tmp:
        tmp.write_text("half a csv")
        os.kill(os.getpid(), signum)
        time.sleep(10)  # the signal ends this at once
    assert exc.value.exit_code == 128 + signum
    assert list(tmp_path.iterdir()) == []


@POSIX
def test_ignored_signals_stay_ignored_and_handlers_come_back() -> None:
    before = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with handle_signals():
            assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
            assert signal.getsignal(signal.SIGINT) not in (signal.SIG_IGN, signal.default_int_handler)
        assert signal.getsignal(signal.SIGINT) == signal.default_int_handler
    finally:
        signal.signal(signal.SIGTERM, before)


# 2. Terminal hygiene


def test_safe_escapes_c0_c1_and_del() -> None:
    assert safe(OSC52) == "\\x1b]52;c;aGVsbG8=\\x07"
    assert safe("a\x9b31mb\x7fc\rd\te\x00") == "a\\x9b31mb\\x7fc\\x0dd\\x09e\\x00"
    assert safe("x\ny") == "x\\x0ay"
    assert safe("x\ny\r\nz\r", keep_newlines=True) == "x\ny\r\nz\\x0d"
    assert safe(os.fsdecode(b"bad\xffname")) == "bad\\xffname"
    assert safe("übung.weight · 权重") == "übung.weight · 权重"


def test_hostile_tensor_and_file_names_never_reach_the_terminal_raw(tmp_path: Path) -> None:
    evil = f"evil{OSC52}.weight"
    sd = {evil: torch.ones(3), "two\nlines": torch.zeros(2), "x\x1b[2J": torch.ones(1)}
    run = _run(tmp_path, step_1=sd, step_2={k: v * 3 for k, v in sd.items()})
    broken = tmp_path / f"step_3{OSC52}.safetensors"
    broken.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")
    results = [
        _invoke("inspect", run[0]),
        _invoke("drift", *run, broken, "--out", tmp_path / "out"),
        _invoke("flag", *run, "--max-abs", "0.5", "--out", tmp_path / "flags"),
        _invoke("clip", *run, "--max-abs", "0.5", "--out", tmp_path / "clipped"),
        _invoke("inspect", broken),
        _invoke("inspect", tmp_path / f"nope{OSC52}"),
    ]
    for result in results:
        text = result.stdout + result.stderr
        assert "Traceback" not in text, text
        assert not re.search(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]", text), repr(text)
    assert "evil\\x1b]52;c;aGVsbG8=\\x07.weight" in results[0].stdout
    assert "two\\x0alines" in results[0].stdout
    assert "warning: skipped step_3\\x1b]52;c;aGVsbG8=\\x07.safetensors" in results[1].stderr
    assert results[4].exit_code == 2 and results[4].stderr.count("\n") == 1 and "\\x1b]52" in results[4].stderr
    # every tensor of the table is one line: 3 tensors, the __all__ row and the header
    assert len(results[0].stdout.splitlines()) == 5


# 3. CSV formula injection


def test_formula_safe_quotes_formulas_not_numbers() -> None:
    for text in ['=HYPERLINK("http://x")', "-1+1", "+cmd", "@SUM(A1)", "\tx", "\rx", "'quoted", "-", "-0x1A"]:
        assert formula_safe(text) == "'" + text
    for value in ["-0.5", "-inf", "+1e-3", "-NaN", "-Infinity", ".5", "fc1.weight", "", "a=b", -0.5, None, 3]:
        assert formula_safe(value) == value


def test_drift_csv_cells_are_not_formulas_and_numbers_stay_numbers(tmp_path: Path) -> None:
    names = ['=HYPERLINK("http://x")', "-1+1", "@cmd", "fc.weight"]
    sd = {n: -torch.arange(1.0, 4.0) * (i + 1) for i, n in enumerate(names)}
    sd["fc.weight"] = torch.tensor([-float("inf"), -0.5, 1.0])
    run = _run(tmp_path, step_1=sd, step_2={k: v * 2 for k, v in sd.items()})
    result = _invoke("drift", *run, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output

    with open(tmp_path / "out" / "stats.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    tensors = {r["tensor"] for r in rows}
    assert {"'=HYPERLINK(\"http://x\")", "'-1+1", "'@cmd", "fc.weight"} <= tensors
    assert not any(r[c][:1] in ("=", "+", "@", "\t", "\r") for r in rows for c in r)
    assert not any(r[c].startswith("-") and not re.fullmatch(r"-(\d+\.?\d*(e[+-]?\d+)?|inf)", r[c])
                   for r in rows for c in r), "a '-' cell that is not a number"

    stats = pd.read_csv(tmp_path / "out" / "stats.csv")
    assert stats["min"].dtype == float and stats["mean"].dtype == float
    assert (stats["min"] < 0).all() and stats["min"].min() == -18.0
    drift = pd.read_csv(tmp_path / "out" / "drift.csv")
    assert {"'=HYPERLINK(\"http://x\")", "'-1+1"} <= set(drift.tensor)


def test_write_csv_leaves_the_frame_alone(tmp_path: Path) -> None:
    df = pd.DataFrame({"tensor": ["=1+1", "w"], "value": [-0.5, 2.0]})
    write_csv(df, tmp_path / "t.csv")
    assert list(df.tensor) == ["=1+1", "w"]
    assert (tmp_path / "t.csv").read_text().splitlines() == ["tensor,value", "'=1+1,-0.5", "w,2.0"]


# 4. Disk full while writing


def _no_space(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _one_error_line(result: object) -> str:
    assert result.exit_code == 2, (result.output, result.exception)
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def test_disk_full_writing_a_report_is_one_error_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = _run(tmp_path, step_1=_small(1), step_2=_small(2))

    def half_then_full(self: pd.DataFrame, path: object, *args: object, **kwargs: object) -> None:
        Path(path).write_text("checkpoint,st")  # some bytes made it before the disk filled
        _no_space()

    monkeypatch.setattr(pd.DataFrame, "to_csv", half_then_full)
    result = _invoke("drift", *run, "--out", tmp_path / "out")
    line = _one_error_line(result)
    assert line.startswith(f"Error: cannot write {tmp_path / 'out' / 'stats.csv'}: No space left on device"), line
    assert _temp_files(tmp_path / "out") == [] and not (tmp_path / "out" / "stats.csv").exists()


@pytest.mark.parametrize("suffix", ["safetensors", "pt"])
def test_disk_full_writing_a_checkpoint_is_one_error_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          suffix: str) -> None:
    src = tmp_path / f"model.{suffix}"
    if suffix == "pt":
        torch.save({"state_dict": _small(1)}, src)
    else:
        _run(tmp_path, model=_small(1))
    if Path("/dev/full").exists():  # a real full disk: every write fails with ENOSPC
        def full_disk(file: object, mode: str = "r", *args: object, **kwargs: object) -> object:
            return open("/dev/full" if "w" in mode else file, mode, *args, **kwargs)

        monkeypatch.setattr(writers, "open", full_disk, raising=False)
    else:  # pragma: no cover
        monkeypatch.setattr(writers.os, "fsync", _no_space)
        if suffix == "pt":
            pytest.skip("needs /dev/full")
    result = _invoke("clip", src, "--max-abs", "0.5", "--out", tmp_path / "out")
    line = _one_error_line(result)
    assert line.startswith(f"Error: cannot write {tmp_path / 'out' / src.name}: No space left on device"), line
    assert "free some space" in line
    assert _temp_files(tmp_path / "out") == [] and not (tmp_path / "out" / src.name).exists()


def test_outputs_honour_the_umask(tmp_path: Path) -> None:
    """mkstemp creates 0600 files; a report or clipped checkpoint gets what any new file gets."""
    from safetensors.torch import save_file

    from auditclip.cli import cli

    src = tmp_path / "run"
    src.mkdir()
    for step in (1, 2):
        save_file({"w": torch.ones(3) * step}, str(src / f"step_{step}.safetensors"))
    old = os.umask(0o022)
    try:
        for args in (["drift", str(src), "--out", str(tmp_path / "r")],
                     ["clip", str(src), "--max-abs", "1", "--out", str(tmp_path / "c")]):
            assert CliRunner().invoke(cli, args).exit_code == 0
        os.umask(0o027)
        assert CliRunner().invoke(cli, ["flag", str(src), "--out", str(tmp_path / "f")]).exit_code == 0
    finally:
        os.umask(old)
    modes = {p.relative_to(tmp_path).as_posix(): p.stat().st_mode & 0o777
             for p in tmp_path.rglob("*") if p.is_file() and "run" not in p.parts}
    assert modes["r/stats.csv"] == modes["c/step_2.safetensors"] == modes["c/clip_report.csv"] == 0o644
    assert modes["f/flags.csv"] == 0o640
