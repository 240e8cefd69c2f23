"""Hardening of settings and of the user's code.

Strict booleans (``skip = false`` means not skipped), typed config values, where
the settings came from, and model/data/metric code that raises, exits or returns
the wrong thing. Every input error: exit 2, one ``Error:`` line, no traceback.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from auditclip import InputError
from auditclip.cli import cli
from auditclip.config import clip_settings, flag_settings
from auditclip.data import load_data

USER_CODE = '''
import sys
import torch


def make():
    return torch.nn.Linear(4, 3)


def exits():
    sys.exit(0)


def boom():
    raise RuntimeError("no GPU here")


class Quitter(torch.nn.Linear):
    def forward(self, x):
        sys.exit(0)


def quitter():
    return Quitter(4, 3)


def listy(outputs, targets):
    return [1.0]


def wordy(outputs, targets):
    return {"margin": "high"}


def metric_exits(outputs, targets):
    sys.exit(3)


def metric_boom(outputs, targets):
    raise ZeroDivisionError("division by zero")


def named_loss(outputs, targets):
    return {"loss": 1.0}


def fickle(outputs, targets):
    return {"a": 1.0} if len(targets) == 4 else {"b": 1.0}


def fine(outputs, targets):
    return {"margin": 0.5}


def data_exits():
    sys.exit(0)


class BadSet(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        raise KeyError(i)


def bad_set():
    return BadSet()


def one_shot_exits():
    yield torch.randn(2, 4), torch.tensor([0, 1])
    sys.exit(0)


def scalar_targets():
    return [(torch.randn(2, 4), 1)]
'''


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A run, user code and data files in a working directory of their own (no pyproject above it counts)."""
    monkeypatch.chdir(tmp_path)
    g = torch.Generator().manual_seed(0)
    Path("run").mkdir()
    for step in (1, 2):
        save_file({"weight": torch.randn(3, 4, generator=g), "bias": torch.randn(3, generator=g)},
                  f"run/step_{step}.safetensors")
    Path("m.py").write_text(USER_CODE)
    save_file({"x": torch.randn(10, 4, generator=g), "y": torch.randint(0, 3, (10,), generator=g)}, "d.safetensors")
    save_file({"x": torch.tensor(1.0), "y": torch.tensor([0])}, "d0.safetensors")
    save_file({"x": torch.randn(10, 4, generator=g), "y": torch.randint(0, 2, (10, 3), generator=g)}, "onehot.safetensors")
    torch.save({"x": ["a", "b"], "y": torch.tensor([0, 1])}, "words.pt")
    return tmp_path


def invoke(*args: object):  # type: ignore[no-untyped-def]
    return CliRunner().invoke(cli, [str(a) for a in args])


def input_error(result, *needles: str) -> str:  # type: ignore[no-untyped-def]
    """Assert exit 2, exactly one ``Error:`` line containing ``needles``, and no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1, result.output
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def _clip(out: str, *args: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    result = invoke("clip", "run/step_1.safetensors", "--out", out, *args)
    assert result.exit_code == 0, (result.output, result.exception)
    [written] = Path(out).rglob("*.safetensors")
    return load_file("run/step_1.safetensors"), load_file(str(written))


# ---------------------------------------------------------------- 1. skip is a strict boolean

@pytest.mark.parametrize("value", ["false", "False", "0", "no"])
def test_override_skip_false_clips_the_tensor(workspace: Path, value: str) -> None:
    before, after = _clip("o", "--max-abs", "0.1", "--override", f"bias:skip={value}")
    assert before["bias"].abs().max() > 0.1
    assert after["bias"].abs().max() <= 0.1 and after["weight"].abs().max() <= 0.1


@pytest.mark.parametrize("value", ["true", "TRUE", "1", "yes"])
def test_override_skip_true_leaves_the_tensor_bit_identical(workspace: Path, value: str) -> None:
    before, after = _clip("o", "--max-abs", "0.1", "--override", f"bias:skip={value}")
    assert torch.equal(_bits(after["bias"]), _bits(before["bias"]))
    assert after["weight"].abs().max() <= 0.1


def test_later_skip_false_undoes_an_earlier_skip(workspace: Path) -> None:
    before, after = _clip("o", "--max-abs", "0.1", "--override", "*:skip=true", "--override", "bias:skip=false")
    assert after["bias"].abs().max() <= 0.1
    assert torch.equal(_bits(after["weight"]), _bits(before["weight"]))


def test_toml_skip_false_clips_and_skip_true_does_not(workspace: Path) -> None:
    Path("no.toml").write_text('[clip]\nmax_abs = 0.1\n[[clip.override]]\npattern = "bias"\nskip = false\n')
    Path("yes.toml").write_text('[clip]\nmax_abs = 0.1\n[[clip.override]]\npattern = "bias"\nskip = true\n')
    _, clipped = _clip("o1", "--config", "no.toml")
    before, kept = _clip("o2", "--config", "yes.toml")
    assert clipped["bias"].abs().max() <= 0.1
    assert torch.equal(_bits(kept["bias"]), _bits(before["bias"]))


@pytest.mark.parametrize("value", ["maybe", "", "truthy", "2"])
def test_override_skip_must_be_a_boolean(workspace: Path, value: str) -> None:
    result = invoke("clip", "run/", "--max-abs", "0.1", "--override", f"bias:skip={value}", "--out", "o")
    input_error(result, "skip", repr(value))
    assert not Path("o").exists()


@pytest.mark.parametrize("value", ['"false"', '"true"', "1", "0", "[true]"])
def test_toml_skip_must_be_a_real_boolean(workspace: Path, value: str) -> None:
    Path("c.toml").write_text(f'[clip]\nmax_abs = 0.1\n[[clip.override]]\npattern = "bias"\nskip = {value}\n')
    input_error(invoke("clip", "run/", "--config", "c.toml", "--out", "o"), "skip", "true or false")


def test_only_skip_false_asks_for_no_clipping(workspace: Path) -> None:
    input_error(invoke("clip", "run/", "--override", "bias:skip=false", "--out", "o"), "no clipping asked for")


# ---------------------------------------------------------------- 2. config values of the wrong type

@pytest.mark.parametrize("text, needle", [
    ("tool = 5\n", "tool must be a table"),
    ('tool = "auditclip"\n', "tool must be a table"),
    ("[tool]\nauditclip = 5\n", "auditclip must be a table"),
    ("[tool]\nauditclip = [1, 2]\n", "auditclip must be a table"),
    ("[tool.auditclip]\nflag = 5\n", "flag must be a table"),
    ("[tool.auditclip.flag]\noverride = 5\n", "override must be an array of tables"),
    ("[tool.auditclip.flag]\noverride = [1]\n", "override 1 must be a table"),
    ("[tool.auditclip.flag]\nzscore = true\n", "zscore True"),
    ("[tool.auditclip.flag]\nmax_abs = [1]\n", "max_abs [1]"),
    ("[tool.auditclip.flag]\nspike = 1979-05-27\n", "spike"),
])
def test_bad_pyproject_is_a_clean_error(workspace: Path, text: str, needle: str) -> None:
    Path("pyproject.toml").write_text(text)
    input_error(invoke("flag", "run/", "--max-abs", "10", "--out", "r"), needle, "pyproject.toml")
    Path("c.toml").write_text(text)  # the same file given with --config
    input_error(invoke("flag", "run/", "--max-abs", "10", "--config", "c.toml", "--out", "r"), needle, "c.toml")


@pytest.mark.parametrize("text, needle", [
    ("clip = 5\n", "clip must be a table"),
    ("[clip]\nmax_abs = 0.1\nprotect_top = true\n", "protect_top True"),
    ("[clip]\nmax_abs = 0.1\nprotect_top = 1.5\n", "protect_top 1.5"),
    ("[clip]\nmax_abs = true\n", "max_abs True"),
    ("[clip]\npercentile = true\n", "percentile True"),
    ("[clip]\nsigma = [3]\n", "sigma [3]"),
    ("[clip]\nmax_abs = 0.1\noverride = { pattern = 'bias' }\n", "override must be an array of tables"),
    ("[clip]\nmax_abs = 0.1\n[[clip.override]]\npattern = 5\nskip = true\n", "pattern"),
])
def test_bad_clip_config_is_a_clean_error(workspace: Path, text: str, needle: str) -> None:
    Path("c.toml").write_text(text)
    input_error(invoke("clip", "run/", "--config", "c.toml", "--out", "o"), needle)


BAD_VALUES = ["5", "-1", "1.5", "true", "false", '"x"', '""', "[1]", "[]", '["a", 1]', "{ a = 1 }", "1979-05-27",
              "07:32:00", "nan", "inf"]
FLAG_KEYS = ["range", "max_abs", "zscore", "jump", "norm_growth", "spike", "off", "fail_on", "override"]
CLIP_KEYS = ["range", "max_abs", "percentile", "sigma", "protect", "protect_top", "override"]
OVERRIDE_KEYS = ["pattern", "range", "max_abs", "zscore", "off", "percentile", "sigma", "skip"]


def _settle(text: str, tmp_path: Path) -> None:
    """Both readers either accept the file or raise InputError; nothing else escapes."""
    path = tmp_path / "fuzz.toml"
    path.write_text(text)
    for read in (flag_settings, clip_settings):
        try:
            read(path, options={"max_abs": 1.0})
        except InputError:
            pass


@pytest.mark.parametrize("value", BAD_VALUES)
def test_every_key_of_every_type_is_accepted_or_a_clean_error(tmp_path: Path, value: str) -> None:
    for key in ("include", "exclude", "flag", "clip"):
        _settle(f"{key} = {value}\n", tmp_path)
        _settle(f"[tool]\nauditclip = {{ {key} = {value} }}\n", tmp_path)
    _settle(f"tool = {value}\n", tmp_path)
    _settle(f"[tool]\nauditclip = {value}\n", tmp_path)
    for key in FLAG_KEYS:
        _settle(f"[flag]\n{key} = {value}\n", tmp_path)
    for key in CLIP_KEYS:
        _settle(f"[clip]\n{key} = {value}\n", tmp_path)
    for section in ("flag", "clip"):
        for key in OVERRIDE_KEYS:
            pattern = "" if key == "pattern" else 'pattern = "*"\n'
            _settle(f"[[{section}.override]]\n{pattern}{key} = {value}\n", tmp_path)


@pytest.mark.parametrize("table, key", [("flag", k) for k in ("max_abs", "zscore", "jump", "norm_growth", "spike")]
                         + [("clip", k) for k in ("max_abs", "percentile", "sigma", "protect_top")])
def test_a_boolean_is_never_a_number(tmp_path: Path, table: str, key: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f"[{table}]\n{key} = true\n")
    read = flag_settings if table == "flag" else clip_settings
    with pytest.raises(InputError, match=key):
        read(path) if key != "protect_top" else read(path, options={"max_abs": 1.0})


# ---------------------------------------------------------------- 3. where the settings came from

def test_settings_record_their_config_file(tmp_path: Path) -> None:
    config = tmp_path / "audit.toml"
    config.write_text("[flag]\nzscore = 3\n[clip]\nmax_abs = 1\n")
    assert flag_settings(config).source == str(config)
    assert clip_settings(config).source == str(config)

    project = tmp_path / "proj"
    (project / "sub").mkdir(parents=True)
    (project / "pyproject.toml").write_text("[tool.auditclip.flag]\nzscore = 3\n[tool.auditclip.clip]\nsigma = 4\n")
    assert flag_settings(start=project / "sub").source == str(project / "pyproject.toml")
    assert clip_settings(start=project / "sub").source == str(project / "pyproject.toml")
    assert flag_settings(config, start=project).source == str(config)  # --config wins over pyproject

    other = tmp_path / "other"
    other.mkdir()
    (other / "pyproject.toml").write_text("[tool.black]\nline-length = 100\n")
    assert flag_settings(start=other).source == ""  # a pyproject without [tool.auditclip] is not in effect
    assert flag_settings(start=project, search=False).source == ""
    assert clip_settings(options={"max_abs": 1.0}, start=project, search=False).source == ""


# ---------------------------------------------------------------- 4. the user's model, data and metrics

EVAL = ("evaluate", "run/", "--out", "r")


@pytest.mark.parametrize("args, needles", [
    (("--model", "m.py:exits", "--data", "d.safetensors"), ("--model m.py:exits", "sys.exit(0)")),
    (("--model", "m.py:boom", "--data", "d.safetensors"), ("--model m.py:boom", "RuntimeError: no GPU here")),
    (("--model", "m.py:quitter", "--data", "d.safetensors"), ("--model m.py:quitter", "sys.exit(0)")),
    (("--model", "m.py:make", "--data", "m.py:data_exits"), ("--data m.py:data_exits", "sys.exit(0)")),
    (("--model", "m.py:make", "--data", "m.py:bad_set"), ("--data m.py:bad_set", "KeyError")),
    (("--model", "m.py:make", "--data", "m.py:one_shot_exits"),
     ("--data m.py:one_shot_exits", "sys.exit(0) instead of returning")),
    (("--model", "m.py:make", "--data", "m.py:scalar_targets"), ("--data m.py:scalar_targets", "single number")),
    (("--model", "m.py:make", "--data", "d0.safetensors"), ("--data d0.safetensors", "inputs 'x'", "0-d")),
    (("--model", "m.py:make", "--data", "words.pt"), ("--data words.pt", "inputs 'x'", "not an array of numbers")),
    (("--model", "m.py:make", "--data", "onehot.safetensors", "--task", "classification"),
     ("class labels of shape [10, 3]", "--task regression")),
])
def test_model_and_data_code_that_misbehaves(workspace: Path, args: tuple[str, ...], needles: tuple[str, ...]) -> None:
    input_error(invoke(*EVAL, *args), *needles)


@pytest.mark.parametrize("metric, needles", [
    ("m.py:listy", ("--metric m.py:listy", "returned a list")),
    ("m.py:wordy", ("--metric m.py:wordy", "'margin' is a str, not a number")),
    ("m.py:metric_exits", ("--metric m.py:metric_exits", "sys.exit(3)")),
    ("m.py:metric_boom", ("--metric m.py:metric_boom", "ZeroDivisionError")),
    ("m.py:named_loss", ("--metric m.py:named_loss", "'loss' is taken")),
    ("m.py:fickle", ("--metric m.py:fickle", "same names for every batch")),
])
def test_metrics_that_misbehave(workspace: Path, metric: str, needles: tuple[str, ...]) -> None:
    result = invoke(*EVAL, "--model", "m.py:make", "--data", "d.safetensors", "--batch-size", "4", "--metric", metric)
    input_error(result, *needles)


def test_two_metrics_may_not_share_a_name(workspace: Path) -> None:
    result = invoke(*EVAL, "--model", "m.py:make", "--data", "d.safetensors", "--metric", "m.py:fine",
                    "--metric", "m.py:fine")
    input_error(result, "'margin' is also returned")


def test_a_good_metric_still_works(workspace: Path) -> None:
    result = invoke(*EVAL, "--model", "m.py:make", "--data", "d.safetensors", "--metric", "m.py:fine")
    assert result.exit_code == 0, result.output
    assert "margin" in Path("r/evaluation.csv").read_text().splitlines()[0]


def test_zero_dim_data_through_the_api(workspace: Path) -> None:
    with pytest.raises(InputError, match="0-d"):
        load_data("d0.safetensors")


@pytest.mark.parametrize("tolerance", ["nan", "-1", "inf"])
def test_sweep_tolerance_must_be_a_finite_non_negative_number(workspace: Path, tolerance: str) -> None:
    result = invoke("sweep", "run/step_1.safetensors", "--model", "m.py:make", "--data", "d.safetensors",
                    "--max-abs", "0.1,1", "--tolerance", tolerance, "--out", "s")
    input_error(result, "--tolerance")
    assert not Path("s").exists()


def test_config_that_is_a_directory(workspace: Path) -> None:
    input_error(invoke("flag", "run/", "--config", "run", "--out", "r"), "--config run: is a directory")


def test_override_names_may_contain_colons(tmp_path: Path) -> None:
    """DCGAN names such as ``main.pyramid:128:batchnorm.weight``: the pattern ends at the last
    ``:`` that starts a KEY=VALUE list, and values keep their own colons (``range=-1:1``)."""
    from safetensors.torch import save_file

    from auditclip.cli import cli

    src = tmp_path / "run" / "step_1.safetensors"
    src.parent.mkdir()
    save_file({"main.pyramid:128:batchnorm.weight": torch.full((4,), 3.0), "main.final.weight": torch.full((4,), 3.0)},
              str(src))
    result = CliRunner().invoke(cli, ["clip", str(src), "--max-abs", "1", "--out", str(tmp_path / "out"),
                                      "--override", "main.pyramid:128:batchnorm.weight:range=-2:2"])
    assert result.exit_code == 0, result.output
    from safetensors.torch import load_file

    out = load_file(str(tmp_path / "out" / "step_1.safetensors"))
    assert out["main.pyramid:128:batchnorm.weight"].tolist() == [2.0] * 4
    assert out["main.final.weight"].tolist() == [1.0] * 4
