"""Every format we claim to read gives the same rows as the equivalent safetensors."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch

from auditclip import CheckpointError, inspect_checkpoint, open_checkpoint_file
from auditclip.formats.source import normalize_names

from conftest import save_safetensors, save_sharded, state_dict


def _rows(path: Path, **kw: object) -> pd.DataFrame:
    return inspect_checkpoint(path, **kw).drop(columns=["checkpoint", "step"]).reset_index(drop=True)


@pytest.fixture
def reference_rows(tmp_path: Path) -> pd.DataFrame:
    return _rows(save_safetensors(tmp_path / "ref" / "model.safetensors", state_dict(3)))


def test_lightning_style_pt_with_ddp_prefix_matches_safetensors(tmp_path: Path, reference_rows: pd.DataFrame) -> None:
    wrapped = {
        "state_dict": {f"module.{k}": v for k, v in state_dict(3).items()},
        "optimizer_states": [{"state": {0: {"exp_avg": torch.ones(3)}}}],
        "epoch": 4,
        "hyper_parameters": {"lr": 0.1},
    }
    torch.save(wrapped, tmp_path / "x.pt")
    pd.testing.assert_frame_equal(_rows(tmp_path / "x.pt"), reference_rows)


@pytest.mark.parametrize("wrap", [
    lambda sd: {"model_state_dict": sd, "optimizer_state_dict": {}, "epoch": 3},
    lambda sd: {"model": sd, "step": 10},
    lambda sd: {"module": {f"_orig_mod.{k}": v for k, v in sd.items()}},
    lambda sd: sd,
])
def test_common_containers(tmp_path: Path, reference_rows: pd.DataFrame, wrap) -> None:  # type: ignore[no-untyped-def]
    torch.save(wrap(state_dict(3)), tmp_path / "c.pth")
    pd.testing.assert_frame_equal(_rows(tmp_path / "c.pth"), reference_rows)


def test_legacy_pickle_format(tmp_path: Path, reference_rows: pd.DataFrame) -> None:
    torch.save({"state_dict": state_dict(3)}, tmp_path / "old.bin", _use_new_zipfile_serialization=False)
    pd.testing.assert_frame_equal(_rows(tmp_path / "old.bin"), reference_rows)


def test_key_selects_ema_weights(tmp_path: Path, reference_rows: pd.DataFrame) -> None:
    torch.save({"state_dict": state_dict(0), "ema": state_dict(3)}, tmp_path / "e.ckpt")
    pd.testing.assert_frame_equal(_rows(tmp_path / "e.ckpt", key="ema"), reference_rows)
    assert not _rows(tmp_path / "e.ckpt").equals(reference_rows)
    with pytest.raises(CheckpointError, match="no entry 'ema_state_dict'"):
        inspect_checkpoint(tmp_path / "e.ckpt", key="ema_state_dict")


def test_sharded_index_is_one_checkpoint(tmp_path: Path, reference_rows: pd.DataFrame) -> None:
    index = save_sharded(tmp_path / "sharded", state_dict(3), n_shards=3)
    pd.testing.assert_frame_equal(_rows(index), reference_rows)
    pd.testing.assert_frame_equal(_rows(tmp_path / "sharded"), reference_rows)  # as a folder too


def test_sharded_pytorch_bin_index(tmp_path: Path, reference_rows: pd.DataFrame) -> None:
    import json

    sd = state_dict(3)
    names = sorted(sd)
    folder = tmp_path / "bin"
    folder.mkdir()
    torch.save({n: sd[n] for n in names[:2]}, folder / "pytorch_model-00001-of-00002.bin")
    torch.save({n: sd[n] for n in names[2:]}, folder / "pytorch_model-00002-of-00002.bin")
    weight_map = {n: f"pytorch_model-0000{1 if i < 2 else 2}-of-00002.bin" for i, n in enumerate(names)}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    pd.testing.assert_frame_equal(_rows(folder), reference_rows)


def test_integer_tensors_listed_not_analysed(reference_rows: pd.DataFrame) -> None:
    row = reference_rows.set_index("tensor").loc["bn.num_batches_tracked"]
    assert (row["dtype"], row["shape"], row["numel"]) == ("int64", "[]", 1)
    assert pd.isna(row["mean"]) and pd.isna(row["std"])
    total = reference_rows.set_index("tensor").loc["__all__"]
    assert total["numel"] == 16 * 8 + 16 + 4 * 16 + 4  # the int buffer is not in the aggregate


def test_float8_and_half_types_are_analysed(tmp_path: Path) -> None:
    sd = {"a": torch.linspace(-1, 1, 9).to(torch.float8_e4m3fn), "b": torch.linspace(-1, 1, 9).to(torch.bfloat16)}
    df = _rows(save_safetensors(tmp_path / "f8.safetensors", sd)).set_index("tensor")
    assert df.loc["a", "dtype"] == "float8_e4m3fn" and df.loc["a", "max"] == 1.0
    assert df.loc["b", "dtype"] == "bfloat16" and df.loc["b", "mean"] == pytest.approx(0.0, abs=1e-7)


def test_reader_is_lazy_and_reports_shapes(tmp_path: Path) -> None:
    path = save_safetensors(tmp_path / "m.safetensors", state_dict(0), {"step": "7"})
    with open_checkpoint_file(path) as reader:
        assert reader.metadata == {"step": "7"}
        info = reader.info("fc1.weight")
        assert (info.dtype, info.shape, info.numel, info.is_float) == ("float32", (16, 8), 128, True)
        assert torch.equal(reader.get("fc2.bias"), torch.zeros(4))


def test_normalize_names_keeps_stored_names_on_collision() -> None:
    assert normalize_names(["module.a", "module.b"]) == {"a": "module.a", "b": "module.b"}
    assert normalize_names(["a._orig_mod.b", "a.b"]) == {"a._orig_mod.b": "a._orig_mod.b", "a.b": "a.b"}
    assert normalize_names(["module.a", "b"]) == {"module.a": "module.a", "b": "b"}


@pytest.mark.parametrize("content, match", [
    (b"", "not a readable"),
    (b"\x00" * 7, "not a readable"),
    (b"garbage header that is not json at all........", "not a readable"),
])
def test_broken_safetensors_is_a_clean_error(tmp_path: Path, content: bytes, match: str) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        open_checkpoint_file(path)


def test_truncated_safetensors_is_a_clean_error(tmp_path: Path) -> None:
    path = save_safetensors(tmp_path / "t.safetensors", state_dict(0))
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(CheckpointError):
        open_checkpoint_file(path)


class _Payload:
    def __reduce__(self):  # type: ignore[no-untyped-def]
        import os

        return (os.system, ("echo pwned > /dev/null",))


def test_pickle_that_would_run_code_is_refused(tmp_path: Path) -> None:
    torch.save({"state_dict": state_dict(0), "evil": _Payload()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refused.*(posix|os)\\.system") as info:
        open_checkpoint_file(tmp_path / "evil.pt")
    assert info.value.kind == "unsafe"


def test_missing_shard_is_named(tmp_path: Path) -> None:
    index = save_sharded(tmp_path / "s", state_dict(0))
    (tmp_path / "s" / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing shard.*model-00002-of-00002"):
        open_checkpoint_file(index)
