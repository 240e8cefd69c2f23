"""Files that lie, change under us or explode: paths stay inside, processes survive, reports stay clean."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
from pathlib import Path

import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from auditclip import analyze, open_checkpoint_file
from auditclip.cli import cli
from auditclip.errors import CheckpointError

from conftest import save_sharded, state_dict


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def invoke(*args: object) -> object:
    return CliRunner().invoke(cli, [str(a) for a in args])


def _files_under(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------- shard names that leave their folder

@pytest.mark.parametrize("style", ["dotdot", "absolute"])
def test_shard_names_outside_the_folder_are_refused_and_nothing_is_written_outside_out(
        tmp_path: Path, style: str) -> None:
    victim_dir = tmp_path / "elsewhere"
    victim_dir.mkdir()
    victim = victim_dir / "model.safetensors"
    save_file({"fc1.weight": torch.full((16, 8), 5.0)}, str(victim))  # an unrelated model, out of range
    before = sha256(victim)

    run = tmp_path / "run"
    good = run / "checkpoint-1"
    save_sharded(good, state_dict(1))
    evil = run / "checkpoint-2"
    save_sharded(evil, state_dict(2))
    index = evil / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    name = "../../elsewhere/model.safetensors" if style == "dotdot" else str(victim)
    doc["weight_map"]["fc1.weight"] = name
    index.write_text(json.dumps(doc))

    drift = invoke("drift", run, "--out", tmp_path / "report")
    assert drift.exit_code == 1, drift.output
    errors = pd.read_csv(tmp_path / "report" / "errors.csv")
    assert errors.checkpoint.tolist() == ["checkpoint-2"] and errors.error.tolist() == ["unsafe"]
    assert "outside" in errors.message.iloc[0]

    outside_before = _files_under(tmp_path)
    out = tmp_path / "clipped"
    clip = invoke("clip", run, "--max-abs", "0.1", "--out", out)
    assert clip.exit_code == 1, clip.output
    assert sha256(victim) == before
    assert pd.read_csv(out / "errors.csv").error.tolist() == ["unsafe"]
    assert {k: v for k, v in _files_under(tmp_path).items() if not k.startswith("clipped/")} == outside_before
    assert not (out / "checkpoint-2").exists()
    assert (out / "checkpoint-1" / "model.safetensors.index.json").is_file()


def test_force_is_needed_for_every_file_written_shards_included(tmp_path: Path) -> None:
    save_sharded(tmp_path / "run" / "checkpoint-1", state_dict(1))
    out = tmp_path / "out"
    stale = out / "checkpoint-1" / "model-00002-of-00002.safetensors"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"an earlier file")
    refused = invoke("clip", tmp_path / "run", "--max-abs", "0.5", "--out", out)
    assert refused.exit_code == 2 and "model-00002-of-00002.safetensors already exists" in refused.output
    assert stale.read_bytes() == b"an earlier file"
    forced = invoke("clip", tmp_path / "run", "--max-abs", "0.5", "--out", out, "--force")
    assert forced.exit_code == 0, forced.output
    assert set(load_file(str(stale))) <= set(state_dict(1))


def test_hf_extras_that_are_symlinks_out_of_the_checkpoint_are_not_copied(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("private key")
    ckpt = tmp_path / "run" / "checkpoint-1"
    ckpt.mkdir(parents=True)
    save_file({k: v for k, v in state_dict(1).items()}, str(ckpt / "model.safetensors"))
    (ckpt / "config.json").write_text('{"model_type": "mlp"}')
    (ckpt / "tokenizer.json").symlink_to(secret)
    (ckpt / "vocab.txt").symlink_to("config.json")  # inside the folder: copied as content
    result = invoke("clip", tmp_path / "run", "--max-abs", "1", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    copied = tmp_path / "out" / "checkpoint-1"
    assert (copied / "config.json").read_text() == '{"model_type": "mlp"}'
    assert not (copied / "tokenizer.json").exists()
    assert (copied / "vocab.txt").read_text() == '{"model_type": "mlp"}' and not (copied / "vocab.txt").is_symlink()
    assert "tokenizer.json is a symlink pointing outside the checkpoint" in result.output


@pytest.mark.parametrize("form", ["glob", "two_dirs", "file_list"])
def test_out_inside_an_input_is_refused_for_every_input_form(tmp_path: Path, form: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    for run in ("a", "b"):
        Path(run).mkdir()
        for step in (1, 2):
            save_file(state_dict(step), f"{run}/step_{step}.safetensors")
    args = {"glob": ["a/*.safetensors"], "two_dirs": ["a", "b"],
            "file_list": ["b/step_1.safetensors", "a"]}[form]
    before = _files_under(tmp_path)
    result = invoke("clip", *args, "--max-abs", "1", "--out", "a/clipped")
    assert result.exit_code == 2, result.output
    assert "Error: --out a/clipped is inside the input a" in result.output
    assert _files_under(tmp_path) == before and not Path("a/clipped").exists()


def test_to_safetensors_collisions_are_refused_naming_both(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    torch.save(state_dict(1), run / "step_1.pt")
    torch.save({"state_dict": state_dict(2), "global_step": 2}, run / "step_1.ckpt")  # stored step 2: one run
    result = invoke("clip", run, "--max-abs", "1", "--to", "safetensors", "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert "step_1.ckpt and step_1.pt would both be written to" in result.output or \
        "step_1.pt and step_1.ckpt would both be written to" in result.output
    assert not (tmp_path / "out" / "step_1.safetensors").exists()


# ---------------------------------------------------------------- files that change while read

def _big_run(tmp_path: Path, fmt: str) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    g = torch.Generator().manual_seed(0)
    for step in (1, 2, 3):
        sd = {f"layer{i:02d}.weight": torch.randn(256, 256, generator=g) for i in range(12)}
        if fmt == "safetensors":
            save_file(sd, str(run / f"step_{step}.safetensors"))
        else:
            torch.save({"state_dict": sd, "epoch": step}, run / f"step_{step}.pt")
    return run


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_a_file_truncated_while_read_is_a_clean_error_not_a_signal(tmp_path: Path, fmt: str) -> None:
    """What ``torch.save`` over an existing name does during a live run: the file shrinks
    under the reader. A memory map would die of SIGBUS (killing this test process)."""
    run = _big_run(tmp_path, fmt)
    victim = sorted(run.iterdir())[1]
    done = threading.Event()

    def truncate_from_another_thread(label: str, name: str, tensor: torch.Tensor, summary: object) -> None:
        if not done.is_set():
            done.set()
            worker = threading.Thread(target=os.truncate, args=(victim, 4096))
            worker.start()
            worker.join()

    result = analyze(run, visit=truncate_from_another_thread, workers=1)
    assert done.is_set()
    assert result.errors.checkpoint.tolist() == [victim.name]
    assert result.errors.error.iloc[0] in ("changed", "unreadable")
    # the other checkpoints are still fully audited
    others = result.stats[(result.stats.checkpoint != victim.name) & (result.stats.tensor != "__all__")]
    assert len(others) == 2 * 12 and others["mean"].notna().all()


@pytest.mark.parametrize("fmt", ["safetensors", "pt"])
def test_a_same_size_overwrite_in_place_is_detected(tmp_path: Path, fmt: str) -> None:
    run = _big_run(tmp_path, fmt)
    path = sorted(run.iterdir())[0]
    with open_checkpoint_file(path) as reader:
        names = reader.names()
        reader.get(names[0])
        size = path.stat().st_size
        with open(path, "r+b") as f:  # same size, new bytes, same inode
            f.seek(size - 1024)
            f.write(os.urandom(1024))
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))
        with pytest.raises(CheckpointError) as info:
            reader.get(names[-1])
        assert info.value.kind == "changed" and "changed while being read" in info.value.message


def test_truncation_through_the_cli_gives_an_errors_row(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = _big_run(tmp_path, "safetensors")
    victim = sorted(run.iterdir())[2]
    import auditclip.formats.safetensors as family  # the safetensors reader's read_strided

    real = family.read_strided
    calls = {"n": 0}

    def shrink_then_read(f, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if f.path == victim and calls["n"] > 3:
            os.truncate(victim, f.size // 2)
        return real(f, *args, **kwargs)

    monkeypatch.setattr(family, "read_strided", shrink_then_read)
    result = invoke("drift", run, "--out", tmp_path / "r", "--workers", "1")
    assert result.exit_code == 1, result.output
    errors = pd.read_csv(tmp_path / "r" / "errors.csv")
    assert errors.checkpoint.tolist() == [victim.name] and errors.error.tolist() == ["changed"]
    assert "Traceback" not in result.output


# ---------------------------------------------------------------- container bombs

def test_a_pickle_of_shared_dicts_is_refused_quickly(tmp_path: Path) -> None:
    d: dict = {"w": torch.zeros(2)}
    for _ in range(60):
        d = {"a": d, "b": d}  # 2**60 paths in 2 KB
    path = tmp_path / "bomb.pt"
    torch.save({"state_dict": d}, path)
    assert path.stat().st_size < 4000
    for args in (["inspect", path], ["drift", path, "--out", tmp_path / "r"]):
        result = invoke(*args)
        assert result.exit_code == 2, result.output
        assert "refused: the same sub-containers are reached by more than" in result.output
        assert result.output.count("\n") == 1


def test_cyclic_and_very_deep_containers_do_not_overflow(tmp_path: Path) -> None:
    cyclic: dict = {"w": torch.ones(2)}
    cyclic["self"] = cyclic
    torch.save(cyclic, tmp_path / "cyclic.pt")
    result = invoke("inspect", tmp_path / "cyclic.pt", "--format", "csv")
    assert result.exit_code == 0, result.output
    assert pd.read_csv(__import__("io").StringIO(result.output)).tensor.tolist() == ["w", "__all__"]

    nested: dict = {"w": torch.zeros(2)}
    top = nested
    for _ in range(5000):
        nested["n"] = {}
        nested = nested["n"]
    import sys

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(50_000)  # pickle itself recurses while saving
    try:
        torch.save({"state_dict": top}, tmp_path / "deep.pt")
    finally:
        sys.setrecursionlimit(limit)
    result = invoke("inspect", tmp_path / "deep.pt")
    assert result.exit_code == 2 and "nested more than 64 levels deep" in result.output
    assert "Traceback" not in result.output and "RecursionError" not in result.output


# ---------------------------------------------------------------- tensors auditclip cannot read

def _raw_safetensors(path: Path, entries: dict[str, tuple[str, list[int], bytes]]) -> None:
    header, offset, data = {}, 0, b""
    for name, (code, shape, raw) in entries.items():
        header[name] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        data += raw
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def test_sub_byte_floats_are_listed_and_copied_verbatim_by_clip(tmp_path: Path) -> None:
    src = tmp_path / "in" / "step_1.safetensors"
    src.parent.mkdir()
    w = torch.tensor([0.5, -3.0, 0.25], dtype=torch.float32)
    _raw_safetensors(src, {"packed": ("F4", [4, 2], bytes(range(4))),
                           "w": ("F32", [3], w.numpy().tobytes())})
    shown = invoke("inspect", src, "--format", "csv")
    assert shown.exit_code == 0, shown.output
    assert "packed,unknown,f4,\"[4, 2]\",8" in shown.output
    result = invoke("clip", src, "--max-abs", "1", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    with open_checkpoint_file(tmp_path / "out" / "step_1.safetensors") as r:
        assert r.raw_bytes("packed") == bytes(range(4)) and r.info("packed").dtype == "f4"
        assert r.get("w").tolist() == [0.5, -1.0, 0.25]


@pytest.mark.parametrize("make, message", [
    (lambda: torch.zeros(3, 3).to_sparse(), "is sparse_coo, not a dense tensor"),
    (lambda: torch.zeros(3, 3, device="meta"), "has no data in the file"),
])
def test_sparse_and_meta_tensors_in_a_pt_are_clean_errors(tmp_path: Path, make, message: str) -> None:  # type: ignore[no-untyped-def]
    torch.save({"w": make(), "v": torch.zeros(2)}, tmp_path / "x.pt")
    result = invoke("inspect", tmp_path / "x.pt")
    assert result.exit_code == 2 and message in result.output, result.output
    assert result.output.count("\n") == 1 and "Warning" not in result.output


def test_e8m0_with_protect_top_clips_exactly(tmp_path: Path) -> None:
    src = tmp_path / "in" / "s.safetensors"
    src.parent.mkdir()
    values = torch.tensor([0.5, 2.0, 8.0, 0.25])
    save_file({"scales": values.to(torch.float8_e8m0fnu)}, str(src))
    result = invoke("clip", src, "--max-abs", "1", "--protect-top", "1", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    out = load_file(str(tmp_path / "out" / "s.safetensors"))["scales"].to(torch.float32)
    assert out.tolist() == [0.5, 1.0, 8.0, 0.25]  # 8 protected as the top |w|, 2 clipped to 1


def test_left_out_files_are_named_on_stderr_and_settings_source_too(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    run = tmp_path / "run"
    for step in (1, 2):
        folder = run / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        save_file(state_dict(step), str(folder / "model.safetensors"))
    save_file(state_dict(9), str(run / "checkpoint-2" / "ema_model.safetensors"))
    (tmp_path / "pyproject.toml").write_text("[tool.auditclip.flag]\nmax_abs = 100\n")
    monkeypatch.chdir(tmp_path)
    for args in (["drift", "run", "--out", "r1"], ["flag", "run", "--out", "r2"],
                 ["clip", "run", "--max-abs", "9", "--out", "r3"]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, result.output
        assert "ema_model.safetensors: ignored" in result.stderr + result.stdout, args
        if args[0] == "flag":
            assert "note: settings from" in result.stderr and "pyproject.toml" in result.stderr
            assert "note: settings from" not in result.stdout


def test_a_raw_pickle_refusal_names_the_global_it_asked_for(tmp_path: Path) -> None:
    import pickle

    class Payload:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (os.system, ("touch never",))

    (tmp_path / "raw.pt").write_bytes(pickle.dumps({"w": Payload()}))
    result = invoke("inspect", tmp_path / "raw.pt")
    assert result.exit_code == 2 and "(posix.system)" in result.output.replace("nt.system", "posix.system")
    assert not (tmp_path / "never").exists() and not Path("never").exists()


def test_zero_size_tensors_with_huge_dimensions_are_empty_not_errors(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    one = torch.tensor([1.0]).numpy().tobytes()
    _raw_safetensors(run / "step_1.safetensors", {"w": ("F32", [0, 2**62], b""), "v": ("F32", [1], one)})
    two = torch.tensor([2.0]).numpy().tobytes()  # not a byte copy of step_1, which would be folded into it
    _raw_safetensors(run / "step_2.safetensors", {"w": ("F32", [0, 2**62], b""), "v": ("F32", [1], two)})
    result = invoke("inspect", run / "step_1.safetensors", "--format", "csv")
    assert result.exit_code == 0, result.output
    assert f'w,unknown,float32,"[0, {2**62}]",0' in result.output
    for args in (["drift", run, "--out", tmp_path / "r"], ["clip", run, "--max-abs", "0.5", "--out", tmp_path / "c"]):
        outcome = invoke(*args)
        assert outcome.exit_code == 0, (args[0], outcome.output)
    with open_checkpoint_file(tmp_path / "c" / "step_2.safetensors") as r:
        assert r.info("w").shape == (0, 2**62) and r.get("v").tolist() == [0.5]


@pytest.mark.parametrize("case, message", [
    ("excluded", "every tensor is excluded by --include"),
    ("placeholders", "every floating tensor is empty"),
    ("integers", "is floating point"),
])
def test_a_gate_that_checked_nothing_never_passes(tmp_path: Path, case: str, message: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    run = Path("run")
    run.mkdir()
    for step in (1, 2):
        sd = {"excluded": state_dict(step), "integers": {"steps": torch.tensor([step, 2])},
              "placeholders": {"w": torch.empty(0), "b": torch.empty(0, 4)}}[case]
        # ZeRO-3 placeholders are saved as shape-[0] tensors in the real files
        torch.save({"module": sd}, run / f"step_{step}.pt")
    if case == "excluded":  # the config file excludes everything
        Path("pyproject.toml").write_text('[tool.auditclip]\nexclude = ["*"]\n')
    for command in ("flag", "audit"):
        result = invoke(command, run, "--max-abs", "0.01", "--out", f"o_{command}")
        assert result.exit_code == 2, (command, result.output)
        error = [ln for ln in result.stderr.splitlines() if ln.startswith("Error:")]
        assert len(error) == 1 and "nothing was checked, so the gate cannot pass" in error[0] and message in error[0]
        if case == "excluded":
            assert "pyproject.toml" in error[0] and "note: settings from" in result.stderr


def test_float64_values_whose_moments_overflow_are_reported_not_tracebacks(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    wide = torch.cat([torch.linspace(-1e300, 1e300, 70_001, dtype=torch.float64), torch.tensor([1e-300])])
    for step in (1, 2):
        save_file({"ok": torch.randn(4, dtype=torch.float64), "huge": wide * step / 2}, str(run / f"step_{step}.safetensors"))
    shown = invoke("inspect", run / "step_1.safetensors")
    assert shown.exit_code == 2 and "tensor 'huge' holds float64 values up to 5e+299" in shown.output, shown.output
    assert shown.output.count("\n") == 1
    drift = invoke("drift", run, "--out", tmp_path / "r")
    assert drift.exit_code == 2, drift.output
    assert "Error: no checkpoint of the run could be read" in drift.stderr
    errors = pd.read_csv(tmp_path / "r" / "errors.csv")
    assert errors.error.tolist() == ["out_of_range", "out_of_range"]
    gate = invoke("flag", run, "--out", tmp_path / "f")  # fails: both checkpoints are listed as unreadable
    assert gate.exit_code == 1 and "Traceback" not in gate.output
    assert pd.read_csv(tmp_path / "f" / "errors.csv").error.tolist() == ["out_of_range", "out_of_range"]
