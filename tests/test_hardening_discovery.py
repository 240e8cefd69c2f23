"""Run discovery is never silently wrong: every weight-like file is audited, or listed with a reason.

A checkpoint discovery cannot read (a broken or unsafe shard index, a directory
named ``model.safetensors``...) still becomes a :class:`Checkpoint` whose opening
fails, so the CLI lists it in ``errors.csv`` and exits 1; anything else left out
is a line of ``Run.notes``. Hostile names, steps and JSON never raise a traceback.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from click.testing import CliRunner

from auditclip import open_run, parse_step
from auditclip.checkpoints import printable
from auditclip.cli import cli
from auditclip.errors import CheckpointError, NoCheckpointsError

from conftest import ROOT, save_safetensors, save_sharded, state_dict


def _good_run(tmp_path: Path) -> Path:
    """A run of two readable Hugging Face checkpoint folders, checkpoint-100 and checkpoint-200."""
    run = tmp_path / "run"
    for step in (100, 200):
        save_safetensors(run / f"checkpoint-{step}" / "model.safetensors", state_dict(step))
    return run


def _drift(run: Path | str, out: Path) -> tuple[Any, list[dict[str, str]]]:
    """``auditclip drift RUN --out OUT``: the result (checked for tracebacks) and the errors.csv rows."""
    result = CliRunner().invoke(cli, ["drift", str(run), "--out", str(out), "-q"])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    assert result.exit_code in (0, 1), result.output
    errors = out / "errors.csv"
    rows = list(csv.DictReader(errors.open(encoding="utf-8"))) if errors.exists() else []
    assert (result.exit_code == 1) == bool(rows), (result.output, rows)
    return result, rows


def _stats_labels(out: Path) -> set[str]:
    with (out / "stats.csv").open(encoding="utf-8") as f:
        return {row["checkpoint"] for row in csv.DictReader(f)}


def _edit_index(folder: Path, edit: Callable[[dict[str, Any]], object]) -> Path:
    index = folder / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    doc = edit(doc) or doc
    index.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return index


def _first_to(name: object) -> Callable[[dict[str, Any]], None]:
    def edit(doc: dict[str, Any]) -> None:
        doc["weight_map"][next(iter(doc["weight_map"]))] = name
    return edit


# --- 1. broken, odd or unsafe shard indexes: a checkpoint whose opening fails -----------------

BROKEN_INDEXES = {
    "truncated": (lambda doc: json.dumps(doc)[:25], "unreadable", "not a valid shard index"),
    "not JSON": (lambda doc: "this is { not json", "unreadable", "not a valid shard index"),
    "10,000-deep nesting": (lambda doc: "[" * 10_000 + "]" * 10_000, "unreadable", "not a valid shard index"),
    "deep weight_map": (lambda doc: '{"weight_map": ' + "[" * 10_000 + "]" * 10_000 + "}", "unreadable",
                        "not a valid shard index"),
    "a JSON list": (lambda doc: [doc], "unreadable", "not a valid shard index"),
    "weight_map a list": (lambda doc: {"weight_map": list(doc["weight_map"].values())}, "unreadable",
                          "not a valid shard index"),
    "no weight_map": (lambda doc: {"metadata": {}}, "unreadable", "not a valid shard index"),
    "a value not a string": (_first_to(1), "unreadable", "not a valid shard index"),
    "a nested value": (_first_to([[["model-00001-of-00002.safetensors"]]]), "unreadable", "not a valid shard index"),
    "names itself": (_first_to("model.safetensors.index.json"), "unreadable", "not a valid shard index"),
    "names a non-weight file": (_first_to("config.json"), "unreadable", "not a valid shard index"),
    "names a missing file": (_first_to("model-00009-of-00009.safetensors"), "missing_shard", "index names missing"),
    "names a directory": (_first_to("sub.safetensors"), "unreadable", "not a valid shard index"),
    "names ../": (_first_to("../checkpoint-100/model.safetensors"), "unsafe", "refused"),
    "names an absolute path": (_first_to("/etc/passwd.safetensors"), "unsafe", "refused"),
    "names a NUL": (_first_to("a\x00.safetensors"), "unsafe", "refused"),
    "names a lone surrogate": (_first_to("\ud800.safetensors"), None, None),
}


@pytest.mark.parametrize("case", sorted(BROKEN_INDEXES))
def test_a_broken_index_is_a_checkpoint_in_errors_csv(tmp_path: Path, case: str) -> None:
    edit, kind, message = BROKEN_INDEXES[case]
    run = _good_run(tmp_path)
    save_sharded(run / "checkpoint-300", state_dict(3))
    (run / "checkpoint-300" / "sub.safetensors").mkdir()
    (run / "checkpoint-300" / "config.json").write_text("{}")
    index = _edit_index(run / "checkpoint-300", edit)

    listed = open_run(run)
    assert listed.labels == ["checkpoint-100", "checkpoint-200", "checkpoint-300"]
    broken = listed[2]
    assert broken.weights == index and broken.step == 300
    # the shards beside the index belong to it: never checkpoints nor notes of their own
    assert not any("model-0000" in note for note in listed.notes), listed.notes
    with pytest.raises(CheckpointError) as err:
        broken.open()
    if kind is not None:
        assert err.value.kind == kind and err.value.message.startswith(message), err.value

    out = tmp_path / "out"
    result, rows = _drift(run, out)
    assert result.exit_code == 1
    assert [r["checkpoint"] for r in rows] == ["checkpoint-300"]
    if kind is not None:
        assert rows[0]["error"] == kind and rows[0]["message"].startswith(message)
    assert _stats_labels(out) == {"checkpoint-100", "checkpoint-200"}


def test_an_unsafe_shard_name_is_never_followed(tmp_path: Path) -> None:
    """The index names a readable file outside its folder: refused, never read, never claimed."""
    outside = save_safetensors(tmp_path / "elsewhere" / "secret.safetensors", state_dict(9))
    run = _good_run(tmp_path)
    save_sharded(run / "checkpoint-300", state_dict(3))
    relative = os.path.relpath(outside, run / "checkpoint-300")
    _edit_index(run / "checkpoint-300", lambda doc: {"weight_map": {"w": relative}})
    save_sharded(run / "checkpoint-400", state_dict(4))
    _edit_index(run / "checkpoint-400", lambda doc: {"weight_map": {"w": str(outside)}})
    result, rows = _drift(run, tmp_path / "out")
    assert {(r["checkpoint"], r["error"]) for r in rows} == {("checkpoint-300", "unsafe"), ("checkpoint-400", "unsafe")}
    # the index named directly, or through a glob, is refused the same way
    for given in (run / "checkpoint-300" / "model.safetensors.index.json", str(run / "checkpoint-4*" / "*.json")):
        with pytest.raises(CheckpointError) as err:
            open_run(given)[0].open()
        assert err.value.kind == "unsafe"


def test_a_broken_index_in_a_flat_run_keeps_its_shards(tmp_path: Path) -> None:
    """A flat run's broken index is one failing checkpoint; its shards are not audited as models."""
    run = tmp_path / "run"
    save_sharded(run, state_dict(5), stem="step_5")
    (run / "step_5.safetensors.index.json").write_text('{"weight_map": ')
    save_safetensors(run / "step_10.safetensors", state_dict(10))
    listed = open_run(run)
    assert listed.labels == ["step_5.safetensors.index.json", "step_10.safetensors"]
    result, rows = _drift(run, tmp_path / "out")
    assert [(r["checkpoint"], r["error"]) for r in rows] == [("step_5.safetensors.index.json", "unreadable")]


def test_a_shard_the_index_forgets_is_a_note(tmp_path: Path) -> None:
    run = _good_run(tmp_path)
    save_sharded(run / "checkpoint-300", state_dict(3))
    save_safetensors(run / "checkpoint-300" / "model-00003-of-00002.safetensors", state_dict(1))
    listed = open_run(run)
    assert listed.labels == ["checkpoint-100", "checkpoint-200", "checkpoint-300"]
    assert any(n.startswith("checkpoint-300/model-00003-of-00002.safetensors: ignored:") for n in listed.notes)


def test_a_checkpoint_claimed_as_a_shard_is_a_note(tmp_path: Path) -> None:
    run = tmp_path / "run"
    save_safetensors(run / "step_10.safetensors", state_dict(10))
    save_safetensors(run / "step_20.safetensors", state_dict(20))
    (run / "step_5.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "step_10.safetensors"}}))
    listed = open_run(run)
    assert listed.labels == ["step_5.safetensors.index.json", "step_20.safetensors"]
    assert listed.notes == ["step_10.safetensors: not audited on its own: step_5.safetensors.index.json names it "
                            "as one of its shards"]


# --- 1. extra weight files, odd folders: audited or noted -------------------------------------


def test_an_extra_weight_file_beside_the_model_is_a_note(tmp_path: Path) -> None:
    run = _good_run(tmp_path)
    save_safetensors(run / "checkpoint-100" / "ema_model.safetensors", state_dict(7))
    torch.save({"state": {}}, run / "checkpoint-100" / "optimizer.pt")
    listed = open_run(run)
    assert listed.labels == ["checkpoint-100", "checkpoint-200"]
    assert listed[0].weights.name == "model.safetensors"
    assert [p.name for p in listed.ignored] == ["optimizer.pt"]
    assert listed.notes == [
        "checkpoint-100/ema_model.safetensors: ignored: an extra weight file beside the model weights "
        "model.safetensors; audit it on its own by passing the file"]
    out = tmp_path / "out"
    result, rows = _drift(run, out)
    assert result.exit_code == 0 and _stats_labels(out) == {"checkpoint-100", "checkpoint-200"}
    # passed on its own, the folder is a run of both files: nothing hidden
    assert open_run(run / "checkpoint-100").labels == ["ema_model.safetensors", "model.safetensors"]


def test_two_model_weight_files_in_one_folder_keep_the_preferred_and_note_the_other(tmp_path: Path) -> None:
    run = _good_run(tmp_path)
    torch.save(state_dict(1), run / "checkpoint-200" / "pytorch_model.bin")
    for listed in (open_run(run), open_run(run / "checkpoint-200")):
        assert listed[-1].weights.name == "model.safetensors"
        assert [n.split(":")[0] for n in listed.notes] == ["checkpoint-200/pytorch_model.bin"]


def test_a_directory_named_like_weights_is_an_error(tmp_path: Path) -> None:
    run = _good_run(tmp_path)
    (run / "checkpoint-300" / "model.safetensors").mkdir(parents=True)
    listed = open_run(run)
    assert listed.labels == ["checkpoint-100", "checkpoint-200", "checkpoint-300"]
    result, rows = _drift(run, tmp_path / "out")
    assert [(r["checkpoint"], r["error"]) for r in rows] == [("checkpoint-300", "unreadable")]
    assert "directory" in rows[0]["message"]
    # in a flat run as well
    flat = tmp_path / "flat"
    save_safetensors(flat / "step_1.safetensors", state_dict(1))
    (flat / "step_2.safetensors").mkdir()
    result, rows = _drift(flat, tmp_path / "out2")
    assert [(r["checkpoint"], r["error"]) for r in rows] == [("step_2.safetensors", "unreadable")]


def test_a_broken_symlink_is_an_error_not_a_gap(tmp_path: Path) -> None:
    run = tmp_path / "run"
    save_safetensors(run / "step_1.safetensors", state_dict(1))
    os.symlink("gone.safetensors", run / "step_2.safetensors")
    assert sorted(open_run(run, sort="mtime").labels) == ["step_1.safetensors", "step_2.safetensors"]
    result, rows = _drift(run, tmp_path / "out")
    assert [(r["checkpoint"], r["error"]) for r in rows] == [("step_2.safetensors", "unreadable")]


def test_folders_that_are_not_checkpoints_are_notes(tmp_path: Path) -> None:
    run = _good_run(tmp_path)
    save_safetensors(run / "checkpoint-300" / "weights.safetensors", state_dict(3))  # no model weight name
    (run / "checkpoint-400").mkdir()
    torch.save({"state": {}}, run / "checkpoint-400" / "optimizer.pt")  # the weights were never saved
    (run / "logs").mkdir()  # nothing weight-like: not worth a note
    (run / "logs" / "events.txt").write_text("")
    os.symlink(".", run / "loop")
    listed = open_run(run)
    assert listed.labels == ["checkpoint-100", "checkpoint-200"]
    assert [n.split(": ")[0] for n in listed.notes] == ["checkpoint-300/", "checkpoint-400/", "loop/"]
    assert "weights.safetensors" in listed.notes[0] and "no model weights" in listed.notes[1]
    _, rows = _drift(run, tmp_path / "out")
    assert rows == []
    # a folder holding only such folders says why it has no checkpoints
    lone = tmp_path / "lone"
    save_safetensors(lone / "checkpoint-300" / "weights.safetensors", state_dict(3))
    with pytest.raises(NoCheckpointsError, match="checkpoint-300/: ignored: not a checkpoint folder"):
        open_run(lone)


# --- 2. ** globs over symlink loops end --------------------------------------------------------


def test_recursive_glob_over_a_symlink_loop_ends(tmp_path: Path) -> None:
    run = tmp_path / "run"
    for step in (1, 2):
        save_safetensors(run / f"step_{step}.safetensors", state_dict(step))
    save_safetensors(tmp_path / "elsewhere" / "step_3.safetensors", state_dict(3))
    os.symlink(".", run / "loop")
    os.symlink(".", run / "again")
    os.symlink("../elsewhere", run / "linked")  # a linked folder is still searched, once
    code = textwrap.dedent("""
        import json
        from auditclip import open_run
        print(json.dumps(open_run("run/**/*.safetensors").labels))
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=20,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == ["step_1.safetensors", "step_2.safetensors", "linked/step_3.safetensors"]
    cli_code = "from auditclip.cli import cli; cli()"
    done = subprocess.run([sys.executable, "-c", cli_code, "drift", "run/**/*.safetensors", "--out", "out", "-q"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert _stats_labels(tmp_path / "out") == {"step_1.safetensors", "step_2.safetensors", "linked/step_3.safetensors"}


def test_recursive_glob_matches_like_glob(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for i, name in enumerate(["run/step_1.safetensors", "run/a/step_2.safetensors", "run/a/b/step_3.pt",
                              "run/.hidden/step_4.pt"]):
        save_safetensors(Path(name), state_dict(i))  # distinct: identical copies would be folded
    assert open_run("run/**/*.safetensors").labels == ["step_1.safetensors", "a/step_2.safetensors"]
    assert open_run("run/**/step_*").labels == ["step_1.safetensors", "a/step_2.safetensors", "a/b/step_3.pt"]
    assert open_run(str(tmp_path / "run" / "**" / "b" / "*.pt")).labels == ["step_3.pt"]


# --- 3. steps beyond int64, hostile trainer_state.json -----------------------------------------

STEP_CASES: dict[str, tuple[str, Callable[[Path], None], bool]] = {
    # name: (folder, build(folder), whether a note about the 64-bit range is expected)
    "metadata step 1e300": ("final", lambda f: save_safetensors(f / "model.safetensors", state_dict(3),
                                                                {"step": "1e300"}), True),
    "metadata step 2**63": ("final", lambda f: save_safetensors(f / "model.safetensors", state_dict(3),
                                                                {"global_step": str(2**63)}), True),
    "21 digits in the name": ("checkpoint-123456789012345678901",
                              lambda f: save_safetensors(f / "model.safetensors", state_dict(3)), True),
    "trainer_state global_step huge": ("final", lambda f: _with_state(f, '{"global_step": 1e400}'), False),
    "trainer_state global_step 10**30": ("final", lambda f: _with_state(f, '{"global_step": %d}' % 10**30), True),
    "trainer_state global_step 5000 digits": ("final", lambda f: _with_state(f, '{"global_step": %s}' % ("9" * 5000)),
                                              False),
    "trainer_state a list": ("final", lambda f: _with_state(f, "[1, 2]"), False),
    "trainer_state a string": ("final", lambda f: _with_state(f, '"global_step"'), False),
    "trainer_state global_step [1]": ("final", lambda f: _with_state(f, '{"global_step": [1]}'), False),
    "trainer_state global_step true": ("final", lambda f: _with_state(f, '{"global_step": true}'), False),
    "trainer_state 10,000 deep": ("final", lambda f: _with_state(f, "[" * 10_000 + "]" * 10_000), False),
    "trainer_state deep dict": ("final", lambda f: _with_state(f, '{"global_step": ' + '{"a": ' * 10_000 + "1"
                                                                + "}" * 10_001), False),
    "trainer_state not UTF-8": ("final", lambda f: _with_state(f, b'{"global_step": "\xff"}'), False),
}


def _with_state(folder: Path, text: str | bytes) -> None:
    save_safetensors(folder / "model.safetensors", state_dict(3))
    state = folder / "trainer_state.json"
    state.write_bytes(text if isinstance(text, bytes) else text.encode())


@pytest.mark.parametrize("case", sorted(STEP_CASES))
def test_hostile_steps_are_unknown_not_tracebacks(tmp_path: Path, case: str) -> None:
    folder_name, build, range_note = STEP_CASES[case]
    run = _good_run(tmp_path)
    build(run / folder_name)
    listed = open_run(run)
    assert listed.labels == ["checkpoint-100", "checkpoint-200", folder_name]
    assert listed[-1].step is None
    notes = [n for n in listed.notes if n.startswith(f"{folder_name}: ")]
    if range_note:
        assert len(notes) == 1 and "64-bit" in notes[0] and notes[0].endswith("step unknown"), listed.notes
    out = tmp_path / "out"
    result, rows = _drift(run, out)
    assert result.exit_code == 0 and rows == []
    with (out / "stats.csv").open(encoding="utf-8") as f:
        steps = {r["checkpoint"]: r["step"] for r in csv.DictReader(f)}
    assert steps == {"checkpoint-100": "100", "checkpoint-200": "200", folder_name: ""}


def test_a_flat_file_with_a_huge_step_in_its_name(tmp_path: Path) -> None:
    run = tmp_path / "run"
    save_safetensors(run / "step_123456789012345678901.safetensors", state_dict(1), {"step": "7"})
    save_safetensors(run / "step_5.safetensors", state_dict(2))
    listed = open_run(run)
    # the name's step is out of range; the metadata's is used instead, and the note says so
    assert [c.step for c in listed] == [5, 7]
    assert listed.notes == ["step_123456789012345678901.safetensors: ignored the step 123456789012345678901 "
                            "in its name: beyond the 64-bit integer range"]
    _, rows = _drift(run, tmp_path / "out")
    assert rows == []


def test_parse_step_bounds() -> None:
    assert parse_step("step_9223372036854775807.pt") == 2**63 - 1
    assert parse_step("step_9223372036854775808.pt") is None
    assert parse_step("step_" + "9" * 5000) is None  # int() refuses so many digits: no ValueError
    assert parse_step("step_00000000000000000000000042") == 42


# --- 4. file names that are not UTF-8 -----------------------------------------------------------


def _bytes_name(folder: Path, name: bytes) -> Path:
    path = Path(os.fsdecode(os.fsencode(folder) + b"/" + name))
    try:
        path.touch()
    except (OSError, UnicodeError):
        pytest.skip("this file system refuses names that are not UTF-8")
    return path


def test_names_that_are_not_utf8(tmp_path: Path) -> None:
    run = tmp_path / "run"
    save_safetensors(run / "step_2.safetensors", state_dict(2))
    save_safetensors(_bytes_name(run, b"step_1\xff.safetensors"), state_dict(1))
    _bytes_name(run, b"step_3\xfe.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")
    listed = open_run(run)
    assert listed.labels == ["step_1\\xff.safetensors", "step_2.safetensors", "step_3\\xfe.safetensors"]
    assert [c.step for c in listed] == [1, 2, 3]
    out = tmp_path / "out"
    result, rows = _drift(run, out)
    assert result.exit_code == 1
    for row in rows:
        row["message"].encode("utf-8")
    assert "step_3\\xfe.safetensors" in {r["checkpoint"] for r in rows}
    audited = _stats_labels(out) | {r["checkpoint"] for r in rows}
    assert audited == {"step_1\\xff.safetensors", "step_2.safetensors", "step_3\\xfe.safetensors"}


def test_notes_name_odd_files_printably(tmp_path: Path) -> None:
    run = _good_run(tmp_path)
    _bytes_name(run / "checkpoint-100", b"ema\xff\n.safetensors")
    listed = open_run(run)
    assert listed.notes and listed.notes[0].startswith("checkpoint-100/ema\\xff\\n.safetensors: ignored:")
    assert all(n.isprintable() for n in listed.notes)


def test_printable() -> None:
    assert printable("checkpoint-500/model.safetensors") == "checkpoint-500/model.safetensors"
    assert printable(os.fsdecode(b"a\xffb")) == "a\\xffb"
    assert printable("\ud800x") == "\\ud800x"
    assert printable("a\tb\x1b") == "a\\tb\\x1b"
