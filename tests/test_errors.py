"""Every row of README's input-error table: exit 2, one `Error:` line, no traceback."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from auditclip.cli import cli

from conftest import ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")
TABLE = README.split("### Input errors", 1)[1].split("\n\n", 3)[2]
ROWS = {m.group(1): (m.group(2), m.group(3)) for m in re.finditer(r"^\| (.+?) \| `(.+?)` \| `(.+?)` \|$", TABLE, re.M)}


@pytest.fixture
def workspace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Files the README examples name, in a working directory of their own."""
    monkeypatch.chdir(tmp_path)
    g = torch.Generator().manual_seed(0)
    Path("run").mkdir()
    for step in (1, 2):
        save_file({"weight": torch.randn(3, 4, generator=g), "bias": torch.randn(3, generator=g)}, f"run/step_{step}.safetensors")
    Path("empty").mkdir()
    Path("notes.txt").write_text("not a directory")
    Path("bad.toml").write_text("[flag]\nzscroe = 3\n")
    Path("broken.py").write_text("import not_a_real_module_xyz\n")
    Path("m.py").write_text("import torch\ndef make():\n    return torch.nn.Linear(4, 3)\n"
                            "def wide():\n    return torch.nn.Linear(7, 3)\ndef nothing():\n    return 42\n"
                            "def exits():\n    raise SystemExit(0)\ndef listy(outputs, targets):\n    return [1.0]\n")
    Path("tool.toml").write_text("tool = 5\n")
    Path("top.toml").write_text("[clip]\nmax_abs = 1\nprotect_top = true\n")
    save_file({"x": torch.tensor(1.0), "y": torch.tensor([0])}, "d0.safetensors")
    save_file({"x": torch.randn(10, 4, generator=g), "y": torch.randint(0, 3, (10,), generator=g)}, "d.safetensors")
    save_file({"inputs": torch.randn(10, 4, generator=g), "y": torch.zeros(10)}, "other.safetensors")
    save_file({"x": torch.randn(10, 7, generator=g), "y": torch.randint(0, 3, (10,), generator=g)}, "d7.safetensors")
    Path("broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")
    torch.save({"w": torch.zeros(2)}, "x.pt")
    bomb: dict = {"w": torch.zeros(2)}
    for _ in range(60):
        bomb = {"a": bomb, "b": bomb}
    torch.save({"state_dict": bomb}, "bomb.pt")
    torch.save({"w": torch.zeros(3, 3).to_sparse()}, "sparse.pt")
    Path("evil").mkdir()
    save_file({"w": torch.zeros(2)}, "evil/model-00001-of-00001.safetensors")
    Path("evil/model.safetensors.index.json").write_text('{"weight_map": {"w": "../x.safetensors"}}')
    Path("taken/stats.csv").mkdir(parents=True)
    Path("ckpt").mkdir()
    Path("ckpt/model.safetensors.index.json").write_text("{")
    Path("escape").mkdir()
    Path("escape/model.safetensors.index.json").write_text('{"weight_map": {"w": "../x.pt"}}')
    save_file({"w": torch.tensor([1e300, 2.0], dtype=torch.float64)}, "huge64.safetensors")
    Path("huge64").mkdir()
    for step in (1, 2):
        save_file({"w": torch.tensor([1e300, step], dtype=torch.float64)}, f"huge64/step_{step}.safetensors")
    Path("twins").mkdir()
    torch.save({"w": torch.zeros(2)}, "twins/step_1.pt")
    torch.save({"state_dict": {"w": torch.ones(2)}, "global_step": 2}, "twins/step_1.ckpt")  # stored step 2: one run
    Path("gan").mkdir()
    for epoch in (1, 2):
        torch.save({"main.0.weight": torch.full((2, 2), float(epoch))}, f"gan/netD_epoch_{epoch}.pth")
        torch.save({"main.0.weight": torch.full((3, 2), float(epoch))}, f"gan/netG_epoch_{epoch}.pth")
    return tmp_path


def test_table_is_complete() -> None:
    assert len(ROWS) == 38, sorted(ROWS)


@pytest.mark.parametrize("row", sorted(ROWS))
def test_readme_error_row(workspace: Path, row: str) -> None:
    example, message = ROWS[row]
    import shlex

    args = shlex.split(example)
    assert args[0] == "auditclip"
    result = CliRunner().invoke(cli, args[1:])
    assert result.exit_code == 2, (row, result.output)
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.splitlines() if ln.startswith("Error:")]
    assert len(lines) == 1, result.output
    assert lines[0].startswith(message), (lines[0], message)


# --- a folder with no checkpoint says what it holds; a format known by name says what to do ---------

FOLDERS = [
    # (files in the folder, fragments the error must hold)
    ((), ["it holds nothing (an empty folder)"]),
    (("optimizer.pt", "trainer_state.json"), ["optimizer.pt (trainer state, not model weights)",
                                              "1 other entry (trainer_state.json)"]),
    (("__0_0.distcp", "__1_0.distcp"), ["__0_0.distcp (a torch.distributed.checkpoint storage file",
                                        "needs the .metadata file"]),
    (("global_step3/zero_pp_rank_0_mp_rank_00_optim_states.pt", "latest"),
     ["global_step3/ (a DeepSpeed tag folder with optimizer states but no model states"]),
    (("flax_model.msgpack",), ["flax_model.msgpack (Flax weights", "from_flax=True"]),
    (("tf_model.h5",), ["from_tf=True"]),
    (("model.gguf",), ["GGUF (llama.cpp)"]),
    (("model.onnx",), ["ONNX: not read"]),
    (("arrays.npz",), ["safetensors.numpy.save_file"]),
]


@pytest.mark.parametrize("files, fragments", FOLDERS, ids=[",".join(f) or "empty" for f, _ in FOLDERS])
def test_a_folder_without_checkpoints_says_what_it_holds(tmp_path: Path, files: tuple[str, ...],
                                                         fragments: list[str]) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    for name in files:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"\0" * 16)
    result = CliRunner().invoke(cli, ["drift", str(folder), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    error = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(error) == 1 and error[0].startswith(f"Error: no checkpoints in {folder}"), result.output
    for fragment in fragments:
        assert fragment in error[0], (fragment, error[0])


@pytest.mark.parametrize("name, fragment", [("model.gguf", "GGUF (llama.cpp)"), ("flax_model.msgpack", "from_flax"),
                                            ("w.npz", "safetensors.numpy.save_file")])
def test_a_file_of_a_format_known_by_name_is_unsupported_with_what_to_do(tmp_path: Path, name: str,
                                                                       fragment: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"\0" * 16)
    result = CliRunner().invoke(cli, ["inspect", str(path)])
    assert result.exit_code != 0 and f"{path}: " in result.output and fragment in result.output, result.output
    assert "Traceback" not in result.output
