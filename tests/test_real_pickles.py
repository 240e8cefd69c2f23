"""Pickles the real libraries write: foreign hyper-parameters, EMA weight copies, tied GPT-2 embeddings.

Every file here is written by Lightning, transformers or ``torch.save`` itself, and every
value auditclip reports is checked against the library's own loader (in a process that
has the training script's classes) or numpy.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import io
import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from safetensors.numpy import load_file

from auditclip.cli import cli
from auditclip.errors import CheckpointError
from auditclip.formats.readers import load_torch_file, open_checkpoint_file
from auditclip.formats.safe_pickle import Placeholder, Refused, Unpickler

SCRIPT = Path(__file__).parent / "scripts" / "lightning_hparams.py"
FOREIGN = ("argparse.Namespace", "pathlib.PosixPath", "__main__.RunConfig", "__main__.Mode")


def _invoke(*args: str) -> Any:
    result = CliRunner().invoke(cli, list(args))
    assert "Traceback" not in result.output, result.output
    return result


def _records(path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None  # every CRC-32 matches its record
        return {info.filename: z.read(info) for info in z.infolist()}


def _clamped(x: np.ndarray, report: pd.DataFrame, name: str) -> np.ndarray:
    """numpy's clamp of ``x`` to the bounds the report says were used for ``name``."""
    row = report[report.tensor == name]
    assert len(row) == 1, (name, report.tensor.tolist())
    lo, hi = row.lo.iloc[0], row.hi.iloc[0]
    return np.clip(x, np.float32(lo), np.float32(hi))


# --- (a) a Lightning run whose hyper-parameters are classes of the training script -----------

@pytest.fixture(scope="module")
def hparams_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    pytest.importorskip("lightning")
    root = tmp_path_factory.mktemp("hparams")
    run, last = root / "ckpts", root / "ckpts" / "epoch=1-step=8.ckpt"
    verify = root / "verify"
    verify.mkdir()
    # one process, as a user's train.py (its classes live in __main__): it trains, then, with the
    # same classes, loads and resumes the file auditclip clipped meanwhile
    with open(root / "stderr.txt", "w") as errors:
        proc = subprocess.Popen([sys.executable, str(SCRIPT), "session", str(root)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=errors, text=True)
        try:
            assert proc.stdout is not None and proc.stdin is not None
            for line in proc.stdout:
                if line.strip() == "TRAINED":
                    break
            clip = _invoke("clip", str(run), "--max-abs", "0.2", "--out", str(root / "clipped"))
            proc.stdin.write(f"{last}\t{root / 'clipped' / last.name}\t{verify}\n")
            proc.stdin.flush()
            proc.communicate(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 0, (root / "stderr.txt").read_text()[-3000:]
    return {"root": root, "run": run, "last": last, "clip": clip, "verify": verify,
            "clipped": root / "clipped" / last.name}


def test_weights_only_refuses_the_lightning_checkpoint(hparams_run: dict[str, Any]) -> None:
    # what this file is about: torch's own safe loader refuses the whole file
    with pytest.raises(pickle.UnpicklingError):
        torch.load(hparams_run["last"], weights_only=True)


def test_foreign_hyper_parameters_are_stubbed_and_the_weights_read(hparams_run: dict[str, Any]) -> None:
    root, run, last = hparams_run["root"], hparams_run["run"], hparams_run["last"]
    drift = _invoke("drift", str(run), "--out", str(root / "drift"))
    assert drift.exit_code == 0, drift.output
    assert "kept as inert placeholders" in drift.output and all(g in drift.output for g in FOREIGN)
    # the values are what torch.load(weights_only=False) gives in a process that has the classes
    expected = load_file(str(hparams_run["verify"] / "input.safetensors"))
    with open_checkpoint_file(last) as reader:
        assert sorted(reader.names()) == sorted(expected)
        for name, value in expected.items():
            np.testing.assert_array_equal(reader.get(name).numpy(), value)
    stats = pd.read_csv(root / "drift" / "stats.csv")
    stats = stats[stats.checkpoint == last.name].set_index("tensor")
    for name, value in expected.items():
        if value.dtype.kind == "f":
            assert stats.loc[name, "abs_max"] == pytest.approx(float(np.abs(value).max()), rel=1e-6)
            assert stats.loc[name, "mean"] == pytest.approx(float(value.astype(np.float64).mean()), rel=1e-5, abs=1e-9)
    flag = _invoke("flag", str(run), "--max-abs", "0.2", "--out", str(root / "flag"))
    assert flag.exit_code == 1, flag.output  # values beyond the bound: flagged, not refused
    flags = pd.read_csv(root / "flag" / "flags.csv")
    flagged = set(flags[(flags.checkpoint == last.name) & (flags.rule == "range")].tensor)
    beyond = {n for n, v in expected.items() if v.dtype.kind == "f" and np.abs(v).max() > 0.2
              and "running" not in n}  # buffers (BatchNorm statistics) are not under --max-abs
    assert flagged == beyond and beyond


def test_clipped_lightning_checkpoint_keeps_its_pickle_loads_and_resumes(hparams_run: dict[str, Any]) -> None:
    clip, last, clipped = hparams_run["clip"], hparams_run["last"], hparams_run["clipped"]
    assert clip.exit_code == 0, clip.output
    assert all(g in clip.output for g in FOREIGN)
    before, after = _records(last), _records(clipped)
    assert list(before) == list(after)  # the same records in the same order
    pkl = next(n for n in before if n.endswith("/data.pkl"))
    assert after[pkl] == before[pkl]  # data.pkl (hyper-parameters, optimizer state...) byte for byte
    changed = {n for n in before if before[n] != after[n]}
    assert changed and all("/data/" in n for n in changed)  # only storage records were rewritten
    assert clipped.stat().st_size == last.stat().st_size
    # the clipped file, loaded by the user's own code: clamped parameters, untouched buffers
    report = pd.read_csv(hparams_run["root"] / "clipped" / "clip_report.csv")
    report = report[report.checkpoint == last.name]
    original = load_file(str(hparams_run["verify"] / "input.safetensors"))
    loaded = load_file(str(hparams_run["verify"] / "loaded.safetensors"))
    n_clipped = 0
    for name, value in original.items():
        if name.endswith(("weight", "bias")):
            want = _clamped(value, report, name)
            n_clipped += int((want != value).sum())
        else:  # running_mean, running_var, num_batches_tracked
            want = value
        np.testing.assert_array_equal(loaded[name], want, err_msg=name)
    assert n_clipped == report.n_clipped.sum() > 0
    result = json.loads((hparams_run["verify"] / "result.json").read_text())
    assert result["types"] == {"args": "Namespace", "data_dir": "PosixPath", "config": "RunConfig", "run_mode": "Mode"}
    assert result["mode_is_slow"] and result["config_width"] == 16 and result["args_batch"] == 8
    assert result["clipped_step"] == 8 and result["resumed_step"] == 12  # one more epoch of 4 steps


def test_lightning_checkpoint_with_foreign_objects_converts_to_safetensors(hparams_run: dict[str, Any],
                                                                          tmp_path: Path) -> None:
    result = _invoke("clip", str(hparams_run["run"]), "--max-abs", "0.2", "--to", "safetensors",
                     "--out", str(tmp_path / "st"))
    assert result.exit_code == 0, result.output
    converted = load_file(str(tmp_path / "st" / "epoch=1-step=8.safetensors"))
    report = pd.read_csv(tmp_path / "st" / "clip_report.csv")
    report = report[report.checkpoint == hparams_run["last"].name]
    original = load_file(str(hparams_run["verify"] / "input.safetensors"))
    assert sorted(converted) == sorted(original)
    for name, value in original.items():
        want = _clamped(value, report, name) if name.endswith(("weight", "bias")) else value
        np.testing.assert_array_equal(converted[name], want, err_msg=name)


# --- (b) Lightning weight averaging: two copies of the weights in one checkpoint -------------

@pytest.fixture(scope="module")
def ema_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("lightning")
    from lightning.pytorch.callbacks import EMAWeightAveraging
    from realruns import fit_lightning

    run = tmp_path_factory.mktemp("ema") / "ckpts"
    fit_lightning(run, filename="{epoch}-{step}", max_epochs=1, callbacks=[EMAWeightAveraging(decay=0.5)])
    return run / "epoch=0-step=4.ckpt"


def _params(state: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in state.items() if k.endswith(("weight", "bias"))}


def test_ema_checkpoint_reads_the_average_and_says_so(ema_run: Path) -> None:
    original = torch.load(ema_run, weights_only=True)
    assert set(original["state_dict"]) == set(original["current_model_state"])
    assert not torch.equal(original["state_dict"]["net.0.weight"], original["current_model_state"]["net.0.weight"])
    result = _invoke("inspect", str(ema_run), "--format", "csv")
    assert result.exit_code == 0, result.output
    assert "read the weights in 'state_dict'" in result.output and "left out: current_model_state" in result.output
    with open_checkpoint_file(ema_run) as reader:
        np.testing.assert_array_equal(reader.get("net.0.weight").numpy(), original["state_dict"]["net.0.weight"].numpy())
    with open_checkpoint_file(ema_run, key="current_model_state") as reader:
        np.testing.assert_array_equal(reader.get("net.0.weight").numpy(),
                                      original["current_model_state"]["net.0.weight"].numpy())


def test_ema_clip_clips_every_copy_or_only_the_key(ema_run: Path, tmp_path: Path) -> None:
    original = torch.load(ema_run, weights_only=True)
    everything = _invoke("clip", str(ema_run.parent), "--max-abs", "0.1", "--out", str(tmp_path / "all"))
    assert everything.exit_code == 0, everything.output
    assert "every copy of the weights was clipped" in everything.output
    out = torch.load(tmp_path / "all" / ema_run.name, weights_only=True)
    report = pd.read_csv(tmp_path / "all" / "clip_report.csv")
    for entry, prefix in (("state_dict", ""), ("current_model_state", "current_model_state.")):
        for name, value in _params(original[entry]).items():
            np.testing.assert_array_equal(out[entry][name].numpy(), _clamped(value, report, prefix + name))
        for name in ("net.1.running_mean", "net.1.running_var"):  # buffers: left alone
            assert torch.equal(out[entry][name], original[entry][name])
    assert torch.equal(out["averaging_state"]["n_averaged"], original["averaging_state"]["n_averaged"])
    assert report[report.tensor.str.startswith("current_model_state.")].n_clipped.sum() > 0

    only = _invoke("clip", str(ema_run.parent), "--max-abs", "0.1", "--key", "current_model_state",
                   "--out", str(tmp_path / "one"))
    assert only.exit_code == 0, only.output
    assert "only 'current_model_state' (--key) was clipped" in only.output and "left as is: state_dict" in only.output
    out = torch.load(tmp_path / "one" / ema_run.name, weights_only=True)
    report = pd.read_csv(tmp_path / "one" / "clip_report.csv")
    for name, value in _params(original["state_dict"]).items():
        np.testing.assert_array_equal(out["state_dict"][name].numpy(), value)
    for name, value in _params(original["current_model_state"]).items():
        np.testing.assert_array_equal(out["current_model_state"][name].numpy(), _clamped(value, report, name))


# --- (c) transformers GPT-2 with tied embeddings, saved as pytorch_model.bin -----------------

@pytest.fixture(scope="module")
def gpt2_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=32,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    folder = tmp_path_factory.mktemp("gpt2") / "run" / "checkpoint-1"
    folder.mkdir(parents=True)
    config.save_pretrained(folder)
    state = model.state_dict()
    assert state["lm_head.weight"].data_ptr() == state["transformer.wte.weight"].data_ptr()
    torch.save(state, folder / "pytorch_model.bin")  # what Hugging Face's .bin is
    return folder


def test_tied_gpt2_weights_are_counted_once(gpt2_run: Path, tmp_path: Path) -> None:
    result = _invoke("drift", str(gpt2_run.parent), "--out", str(tmp_path / "drift"))
    assert result.exit_code == 0, result.output
    assert "lm_head.weight is tied to transformer.wte.weight (same storage); counted once" in result.output
    stats = pd.read_csv(tmp_path / "drift" / "stats.csv")
    state = torch.load(gpt2_run / "pytorch_model.bin", weights_only=True)
    assert "lm_head.weight" not in set(stats.tensor) and "transformer.wte.weight" in set(stats.tensor)
    unique: dict[int, torch.Tensor] = {}
    for t in state.values():
        if t.is_floating_point():
            unique.setdefault(t.data_ptr(), t)
    float_rows = stats[(stats.tensor != "__all__") & stats.dtype.str.startswith(("float", "bfloat"))]
    assert float_rows.numel.sum() == sum(t.numel() for t in unique.values())
    assert len(stats[stats.tensor != "__all__"]) == len(state) - 1


def test_clipped_gpt2_bin_keeps_its_size_and_loads_tied(gpt2_run: Path, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    result = _invoke("clip", str(gpt2_run.parent), "--max-abs", "0.05", "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    out = tmp_path / "out" / gpt2_run.name
    src_bin, out_bin = gpt2_run / "pytorch_model.bin", out / "pytorch_model.bin"
    assert abs(out_bin.stat().st_size - src_bin.stat().st_size) <= 300
    _records(out_bin)  # a valid zip, every CRC right
    report = pd.read_csv(tmp_path / "out" / "clip_report.csv")
    assert (report.tensor == "transformer.wte.weight").sum() == 1 and "lm_head.weight" not in set(report.tensor)
    original = torch.load(src_bin, weights_only=True)
    model = transformers.GPT2LMHeadModel.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    want = _clamped(original["transformer.wte.weight"].numpy(), report, "transformer.wte.weight")
    assert (want != original["transformer.wte.weight"].numpy()).any()
    np.testing.assert_array_equal(model.lm_head.weight.detach().numpy(), want)
    name = "transformer.h.0.mlp.c_fc.weight"
    np.testing.assert_array_equal(model.state_dict()[name].numpy(), _clamped(original[name].numpy(), report, name))
    for mmap in (False, True):  # torch's own loader, mapped or not, sees the tie too
        loaded = torch.load(out_bin, weights_only=True, mmap=mmap)
        assert loaded["lm_head.weight"].data_ptr() == loaded["transformer.wte.weight"].data_ptr()


def test_a_gpt2_bin_converted_to_safetensors_is_found_by_from_pretrained(gpt2_run: Path, tmp_path: Path) -> None:
    """``--to safetensors`` names pytorch_model.bin's output model.safetensors, the name transformers reads."""
    transformers = pytest.importorskip("transformers")
    result = _invoke("clip", str(gpt2_run.parent), "--max-abs", "0.05", "--to", "safetensors",
                     "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    out = tmp_path / "out" / gpt2_run.name
    assert (out / "model.safetensors").is_file() and not (out / "pytorch_model.safetensors").exists()
    report = pd.read_csv(tmp_path / "out" / "clip_report.csv")
    original = torch.load(gpt2_run / "pytorch_model.bin", weights_only=True)
    model = transformers.GPT2LMHeadModel.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    want = _clamped(original["transformer.wte.weight"].numpy(), report, "transformer.wte.weight")
    np.testing.assert_array_equal(model.lm_head.weight.detach().numpy(), want)


# --- (d) hostile pickles stay refused ----------------------------------------------------------

@dataclasses.dataclass
class ScriptConfig:
    width: int = 16


def test_a_main_dataclass_beside_os_system_is_refused_and_runs_nothing(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    run, marker = tmp_path / "run", tmp_path / "PWNED"
    run.mkdir()
    torch.save({"state_dict": {"w": torch.ones(2, 2)}}, run / "step_1.pt")
    # a dataclass of a training script's __main__ (pickle names __main__.ScriptConfig) beside a call to os.system
    monkeypatch.setattr(ScriptConfig, "__module__", "__main__")
    monkeypatch.setattr(sys.modules["__main__"], "ScriptConfig", ScriptConfig, raising=False)
    torch.save({"state_dict": {"w": torch.ones(2, 2)}, "hyper_parameters": {"config": ScriptConfig()},
                "x": _Calls(os.system, f"touch {marker}")}, run / "step_2.pt")
    monkeypatch.undo()
    with zipfile.ZipFile(run / "step_2.pt") as z:
        assert b"__main__" in z.read("step_2/data.pkl") and b"system" in z.read("step_2/data.pkl")
    for command in (["drift", str(run), "--out", str(tmp_path / "d")],
                    ["clip", str(run), "--max-abs", "0.5", "--out", str(tmp_path / "c")]):
        result = _invoke(*command)
        assert result.exit_code == 1, result.output
        errors = pd.read_csv(Path(command[command.index("--out") + 1]) / "errors.csv")
        assert errors.checkpoint.tolist() == ["step_2.pt"] and errors.error.tolist() == ["unsafe"]
        assert "posix.system" in errors.message.iloc[0] or "nt.system" in errors.message.iloc[0]
    inspect = _invoke("inspect", str(run / "step_2.pt"))
    assert inspect.exit_code == 2 and "system" in inspect.output
    assert not marker.exists()
    assert not (tmp_path / "c" / "step_2.pt").exists()


def make_config() -> dict[str, int]:
    """A foreign function: a pickle may name it, auditclip never calls it."""
    Path(os.environ["AUDITCLIP_TEST_MARKER"]).touch()
    return {"width": 1}


class _Calls:
    def __init__(self, func: Any, *args: Any) -> None:
        self.func, self.args = func, args

    def __reduce__(self) -> Any:
        return (self.func, self.args)


@pytest.mark.parametrize("gadget, named", [
    (_Calls(make_config), "test_real_pickles.make_config"),
    (_Calls(eval, "1+1"), "builtins.eval"),
    (_Calls(getattr, torch.Tensor, "add"), "builtins.getattr"),
    (_Calls(__import__("functools").reduce, make_config, [1, 2]), "functools.reduce"),
    (_Calls(__import__("operator").attrgetter, "system"), "operator.attrgetter"),
    (_Calls(__import__("subprocess").Popen, ["true"]), "subprocess.Popen"),
])
def test_calls_that_are_not_data_are_refused(gadget: Any, named: str, tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "called"
    monkeypatch.setenv("AUDITCLIP_TEST_MARKER", str(marker))
    path = tmp_path / "x.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "x": gadget}, path)
    with pytest.raises(CheckpointError) as err:
        load_torch_file(path)
    assert err.value.kind == "unsafe" and named.rsplit(".", 1)[-1] in str(err.value)
    assert not marker.exists()


class Colour(enum.Enum):
    """Pickled by reference, as a training script's enum is."""

    RED = "red"


def test_placeholders_record_what_the_pickle_said() -> None:
    buffer = io.BytesIO()
    torch.save({"w": torch.arange(3.0), "args": argparse.Namespace(lr=0.1, colour=Colour.RED)}, buffer)
    buffer.seek(0)
    obj = load_torch_file_from(buffer)
    assert obj["w"].tolist() == [0.0, 1.0, 2.0]
    args = obj["args"]
    assert isinstance(args, Placeholder) and args.global_name == "argparse.Namespace"
    assert args.state["lr"] == 0.1 and args.state["colour"].args == ("red",)
    assert args.state["colour"].global_name == f"{__name__}.Colour"


def load_torch_file_from(buffer: io.BytesIO) -> Any:
    from auditclip.formats.safe_pickle import pickle_module

    module, _ = pickle_module()
    return torch.load(buffer, weights_only=False, pickle_module=module)


def test_build_and_fill_are_gated_too() -> None:
    # BUILD on an allowed class object (monkeypatching OrderedDict itself) is refused
    raw = b"\x80\x02ccollections\nOrderedDict\n}X\x01\x00\x00\x00aK\x01sb."
    with pytest.raises(Refused):
        Unpickler(io.BytesIO(raw)).load()
    # SETITEM on an allowed non-container (a torch.Size) is refused
    raw = b"\x80\x02ctorch\nSize\n)\x85RK\x01K\x02s."
    with pytest.raises(Refused):
        Unpickler(io.BytesIO(raw)).load()
    # a plain dict and list still load
    assert Unpickler(io.BytesIO(pickle.dumps({"a": [1, 2]}, protocol=2))).load() == {"a": [1, 2]}


_GPT2_FACTORY = '''
import json, torch
from transformers import GPT2Config, GPT2LMHeadModel


class LastLogits(GPT2LMHeadModel):
    """GPT-2 scoring the next token after each sequence: a classifier over the vocabulary."""

    def forward(self, x):
        return super().forward(input_ids=x).logits[:, -1, :]


def make(checkpoint):
    with open(f"{checkpoint}/config.json") as f:
        return LastLogits(GPT2Config(**json.load(f)))
'''


def test_evaluate_loads_a_tied_gpt2_and_counts_its_clip_once(gpt2_run: Path, tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    from safetensors.torch import save_file

    (tmp_path / "gpt2_factory.py").write_text(_GPT2_FACTORY)
    g = torch.Generator().manual_seed(0)
    save_file({"x": torch.randint(0, 64, (8, 5), generator=g), "y": torch.randint(0, 64, (8,), generator=g)},
              str(tmp_path / "tokens.safetensors"))
    result = _invoke("evaluate", str(gpt2_run.parent), "--model", f"{tmp_path}/gpt2_factory.py:make",
                     "--data", str(tmp_path / "tokens.safetensors"), "--clip", "max_abs=0.05",
                     "--out", str(tmp_path / "eval"))
    assert result.exit_code == 0, result.output
    rows = pd.read_csv(tmp_path / "eval" / "evaluation.csv").set_index("variant")
    # strict loading found lm_head.weight (the tied tensor serves both names)
    assert rows.loc["original", "n_loaded"] == rows.loc["original", "n_model_tensors"]
    clip = _invoke("clip", str(gpt2_run.parent), "--max-abs", "0.05", "--out", str(tmp_path / "clipped"))
    assert clip.exit_code == 0, clip.output
    report = pd.read_csv(tmp_path / "clipped" / "clip_report.csv")
    variant = next(v for v in rows.index if v != "original")
    assert rows.loc[variant, "n_clipped"] == report.n_clipped.sum() > 0  # the tied tensor counted once


def test_numpy_values_in_a_checkpoint_are_placeholders_not_refusals(tmp_path: Path) -> None:
    # numpy scalars and arrays are rebuilt by function-named globals that only make data
    path = tmp_path / "x.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "hp": {"lr": np.float64(0.1), "grid": np.ones(3)}}, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    obj = load_torch_file(path)
    assert obj["state_dict"]["w"].tolist() == [1.0, 1.0]
    assert isinstance(obj["hp"]["lr"], Placeholder) and obj["hp"]["lr"].global_name.endswith("multiarray.scalar")
    assert isinstance(obj["hp"]["grid"], Placeholder)


def test_a_configured_optimizer_partial_is_a_placeholder(tmp_path: Path) -> None:
    import functools

    path = tmp_path / "x.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)},
                "hyper_parameters": {"optimizer": functools.partial(torch.optim.Adam, lr=0.1)}}, path)
    optimizer = load_torch_file(path)["hyper_parameters"]["optimizer"]
    assert isinstance(optimizer, Placeholder) and optimizer.global_name == "functools.partial"
    assert optimizer.args[0].global_name == "torch.optim.adam.Adam" and optimizer.state[2] == {"lr": 0.1}


def test_zip_clip_clips_each_view_of_a_storage_and_nothing_else(tmp_path: Path) -> None:
    # two tensors viewing parts of one storage (an offset slice, a transposed view); elements 0..1
    # of the storage belong to no tensor and must come back as they were
    base = torch.linspace(-3, 3, 10)
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"state_dict": {"head.weight": base[2:6], "tail.weight": base[6:].view(2, 2).t()}}, run / "step_1.pt")
    result = _invoke("clip", str(run), "--max-abs", "1", "--out", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    out = tmp_path / "out" / "step_1.pt"
    assert out.stat().st_size == (run / "step_1.pt").stat().st_size
    _records(out)
    for mmap in (False, True):
        loaded = torch.load(out, weights_only=True, mmap=mmap)["state_dict"]
        storage = torch.tensor([], dtype=torch.float32).set_(loaded["head.weight"].untyped_storage())
        expected = base.numpy().copy()
        expected[2:] = np.clip(expected[2:], -1, 1)
        np.testing.assert_array_equal(storage.numpy(), expected)
        np.testing.assert_array_equal(loaded["tail.weight"].numpy(), np.clip(base[6:].view(2, 2).t().numpy(), -1, 1))
        assert loaded["tail.weight"].stride() == (1, 2)
