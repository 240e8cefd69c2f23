"""DeepSpeed checkpoints written by DeepSpeed itself, read by auditclip.formats.deepspeed.

One training process (tests/scripts/deepspeed_train.py: CPU accelerator, gloo over a
``file://`` rendezvous, two data-parallel ranks) trains the same tiny model under ZeRO-2
in bf16, ZeRO-3 in fp32 and ZeRO-0 in bf16, saving at steps 2 and 3. Every value read
here is compared bit for bit with what the engine held at save time
(``engine.module.state_dict()``, gathered for ZeRO-3) and with DeepSpeed's own
consolidation, ``get_fp32_state_dict_from_zero_checkpoint``.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from auditclip.errors import CheckpointError
from auditclip.formats import deepspeed as ds
from auditclip.formats.deepspeed import deepspeed_tags, read_deepspeed_index, read_deepspeed_tensor
from deepspeed_runs import deepspeed_runs

TAGS = ["global_step2", "global_step3"]
RUNS = ["2_bf16", "3_fp32", "0_bf16"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # trained once per session (tests/deepspeed_runs.py), shared with tests/test_deepspeed_runs.py
    return deepspeed_runs(tmp_path_factory, tuple(r.replace("_", ":") for r in RUNS))


def _expected(runs: Path, run: str, tag: str, kind: str) -> dict[str, torch.Tensor]:
    return torch.load(runs / run / "expected" / f"{tag}.{kind}.pt", weights_only=True)


def _copy_tag(runs: Path, run: str, tmp_path: Path, tag: str = "global_step3") -> Path:
    folder = tmp_path / run / tag
    shutil.copytree(runs / run / "run" / tag, folder)
    return folder


# --- what DeepSpeed wrote ----------------------------------------------------------------------

def test_layout_is_what_the_reader_expects(runs: Path) -> None:
    """The file names this module relies on (if DeepSpeed renames them, this says so first)."""
    names = {run: sorted(p.name for p in (runs / run / "run" / "global_step3").iterdir()) for run in RUNS}
    assert names["2_bf16"] == ["bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt",
                               "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", "mp_rank_00_model_states.pt"]
    assert names["3_fp32"] == ["zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                               "zero_pp_rank_1_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert names["0_bf16"] == ["mp_rank_00_model_states.pt"]
    assert all(ds.is_deepspeed_file(n) for names_ in names.values() for n in names_)
    assert not ds.is_deepspeed_file(runs / "3_fp32" / "expected" / "global_step3.fp32.pt")
    for run in RUNS:
        assert (runs / run / "run" / "latest").read_text() == "global_step3"
        assert (runs / run / "run" / "zero_to_fp32.py").is_file() == (run != "0_bf16")


def test_tags_in_step_order_and_latest(runs: Path) -> None:
    for run in RUNS:
        root = runs / run / "run"
        assert ds.is_deepspeed_run(root) and not ds.is_deepspeed_run(runs / run)
        assert [(t.name, t.step) for t in deepspeed_tags(root)] == [("global_step2", 2), ("global_step3", 3)]
        index = read_deepspeed_index(root)  # the run folder: the tag its latest file names
        assert (index.tag, index.step, index.latest, index.folder) == ("global_step3", 3, "global_step3",
                                                                        root / "global_step3")
        # a tag folder, or a file in it, is read as that tag
        assert read_deepspeed_index(root / "global_step2").step == 2
        first = sorted((root / "global_step2").glob("*model_states.pt"))[0]
        assert read_deepspeed_index(first).tag == "global_step2"


# --- ZeRO-2, bf16, two ranks -----------------------------------------------------------------

def test_zero2_module_weights_are_the_engines(runs: Path) -> None:
    for tag in TAGS:
        index = read_deepspeed_index(runs / "2_bf16" / "run" / tag)
        assert (index.zero_stage, index.world_size, index.bf16_files, index.default_source) == (2, 2, True, "module")
        module = _expected(runs, "2_bf16", tag, "module")
        assert list(index.tensors) == list(module)
        roles = {n: e.role for n, e in index.tensors.items()}
        assert roles == {"scale": "buffer", "0.weight": "parameter", "0.bias": "parameter", "1.weight": "parameter",
                         "1.bias": "parameter", "2.weight": "parameter", "2.bias": "frozen"}
        for name, want in module.items():
            got = read_deepspeed_tensor(index, name)
            assert got.dtype == want.dtype and torch.equal(got, want), name
        assert index.tensors["0.weight"].module_dtype == "bfloat16"


def test_zero2_master_is_zero_to_fp32s(runs: Path) -> None:
    for tag in TAGS:
        index = read_deepspeed_index(runs / "2_bf16" / "run" / tag)
        fp32 = _expected(runs, "2_bf16", tag, "fp32")  # DeepSpeed's own consolidation
        assert sorted(index.tensors) == sorted(fp32)
        for name, want in fp32.items():
            got = read_deepspeed_tensor(index, name, source="master")
            assert got.dtype == want.dtype and torch.equal(got, want), name
        # the bf16 weights the model runs with are the fp32 master rounded: the slices line up
        for name, entry in index.tensors.items():
            if entry.role == "parameter":
                assert entry.master_dtype == "float32"
                master = read_deepspeed_tensor(index, name, source="master")
                assert torch.equal(master.to(torch.bfloat16), read_deepspeed_tensor(index, name)), name
        # round robin order (0.weight, 1.weight, 2.weight, 0.bias, 1.bias) with bf16 alignment padding
        # to 8 elements: 1.weight starts at element 91 + 5 of the group, 4 into rank 1's 92
        assert [(p.file, p.start, p.numel) for p in index.tensors["1.weight"].master] == [
            ("bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt", 4, 13)]


# --- ZeRO-3, fp32, two ranks -----------------------------------------------------------------

def test_zero3_reassembled_equals_zero_to_fp32_bit_for_bit(runs: Path) -> None:
    for tag in TAGS:
        index = read_deepspeed_index(runs / "3_fp32" / "run" / tag)
        assert (index.zero_stage, index.world_size, index.default_source) == (3, 2, "master")
        fp32 = _expected(runs, "3_fp32", tag, "fp32")
        gathered = _expected(runs, "3_fp32", tag, "module")  # the engine's own full parameters at save time
        assert sorted(index.tensors) == sorted(fp32) == sorted(gathered)
        for name, want in fp32.items():
            entry = index.tensors[name]
            got = read_deepspeed_tensor(index, name)
            # never the [0]-shaped placeholders of the model-states files
            assert entry.shape == tuple(want.shape) and entry.numel > 0 and got.numel() == want.numel() > 0
            assert got.dtype == want.dtype and torch.equal(got, want), name
            assert torch.equal(got, gathered[name]), name
            assert got.abs().max() > 0
        streamed = dict(ds.iter_deepspeed_tensors(index))
        assert list(streamed) == list(index.tensors) and all(torch.equal(streamed[n], fp32[n]) for n in fp32)
        # the frozen 2.bias (3 elements) is split 2 + 1 (+1 padding) over the ranks' model states
        assert [(p.file, p.numel) for p in index.tensors["2.bias"].module] == [
            ("zero_pp_rank_0_mp_rank_00_model_states.pt", 2), ("zero_pp_rank_1_mp_rank_00_model_states.pt", 1)]


def test_zero3_placeholders_are_never_weights(runs: Path, tmp_path: Path) -> None:
    index = read_deepspeed_index(runs / "3_fp32" / "run")
    with pytest.raises(CheckpointError) as err:
        read_deepspeed_tensor(index, "0.weight", source="module")
    assert err.value.kind == "unsupported" and "placeholder" in err.value.message
    # the model states alone (what a plain torch.load reader sees: every parameter shape [0]) are refused
    folder = _copy_tag(runs, "3_fp32", tmp_path)
    for p in folder.glob("*optim_states.pt"):
        p.unlink()
    with pytest.raises(CheckpointError) as err:
        read_deepspeed_index(folder / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    assert err.value.kind == "missing_shard"
    assert "placeholders" in err.value.message and "python zero_to_fp32.py . OUTPUT_DIR --tag global_step3" in err.value.message


def test_reading_one_parameter_reads_only_its_bytes(runs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, int, int]] = []
    real = ds.read_strided

    def counting(f: Any, offset: int, storage_bytes: Any, dtype: torch.dtype, shape: tuple[int, ...],
                 *args: Any) -> torch.Tensor:
        calls.append((f.path.name, math.prod(shape), dtype.itemsize))
        return real(f, offset, storage_bytes, dtype, shape, *args)

    monkeypatch.setattr(ds, "read_strided", counting)
    index = read_deepspeed_index(runs / "3_fp32" / "run")
    assert calls == []  # the index reads no tensor data
    read_deepspeed_tensor(index, "0.weight")  # 13 x 7 = 91 elements: 46 on rank 0, 45 on rank 1
    assert calls == [("zero_pp_rank_0_mp_rank_00_optim_states.pt", 46, 4),
                     ("zero_pp_rank_1_mp_rank_00_optim_states.pt", 45, 4)]


# --- ZeRO-0 ---------------------------------------------------------------------------------

def test_zero0_module_weights_and_no_master(runs: Path) -> None:
    index = read_deepspeed_index(runs / "0_bf16" / "run")
    assert (index.zero_stage, index.world_size) == (0, 1)
    module = _expected(runs, "0_bf16", "global_step3", "module")
    for name, want in module.items():
        assert torch.equal(read_deepspeed_tensor(index, name), want), name
    with pytest.raises(CheckpointError) as err:
        read_deepspeed_tensor(index, "0.weight", source="master")
    assert err.value.kind == "unsupported" and "ZeRO-0" in err.value.message


# --- broken, partial and hostile folders ----------------------------------------------------

@pytest.mark.parametrize("run, rank_file", [
    ("3_fp32", "zero_pp_rank_1_mp_rank_00_optim_states.pt"),
    ("2_bf16", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"),
])
def test_missing_rank_file_is_a_missing_shard(runs: Path, tmp_path: Path, run: str, rank_file: str) -> None:
    folder = _copy_tag(runs, run, tmp_path)
    (folder / rank_file).unlink()
    with pytest.raises(CheckpointError) as err:
        read_deepspeed_index(folder)
    assert err.value.kind == "missing_shard" and err.value.path == str(folder / rank_file)
    assert "2 rank(s)" in err.value.message


def test_truncated_rank_file_is_refused(runs: Path, tmp_path: Path) -> None:
    folder = _copy_tag(runs, "3_fp32", tmp_path)
    path = folder / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as err:
        read_deepspeed_index(folder)
    assert err.value.kind == "unreadable" and err.value.path == str(path)


def test_rank_file_rewritten_after_indexing_is_changed(runs: Path, tmp_path: Path) -> None:
    folder = _copy_tag(runs, "3_fp32", tmp_path)
    index = read_deepspeed_index(folder)
    path = folder / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    path.write_bytes(path.read_bytes()[:-100])  # a trainer saving again under the same tag
    with pytest.raises(CheckpointError) as err:
        read_deepspeed_tensor(index, "0.weight")
    assert err.value.kind == "changed"


def _top_keys(path: Path) -> list[str]:
    from auditclip.formats.torch_pickle import load_torch_file

    return list(load_torch_file(path))


class _Boom:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("victim", ["zero_pp_rank_0_mp_rank_00_model_states.pt",
                                    "zero_pp_rank_1_mp_rank_00_optim_states.pt"])
def test_hostile_pickle_never_runs(runs: Path, tmp_path: Path, victim: str) -> None:
    folder = _copy_tag(runs, "3_fp32", tmp_path)
    marker = tmp_path / "ran"
    # the same keys as DeepSpeed's file, and an entry that runs a command when unpickled
    keys = _top_keys(folder / victim)  # read safely (DeepSpeed's classes stay placeholders)
    torch.save({**dict.fromkeys(keys), "ds_config": _Boom(marker)}, folder / victim)
    with pytest.raises(CheckpointError) as err:
        read_deepspeed_index(folder)
    assert err.value.kind == "unsafe" and "system" in err.value.message
    assert not marker.exists()


@pytest.mark.parametrize("extra, words", [
    ("mp_rank_01_model_states.pt", "tensor (model) parallelism"),
    ("layer_01-model_00-model_states.pt", "pipeline-parallel"),
    ("expp_rank_0_mp_rank_00_optim_states.pt", "mixture-of-experts"),
])
def test_layouts_not_read_are_refused_by_name(runs: Path, tmp_path: Path, extra: str, words: str) -> None:
    folder = _copy_tag(runs, "2_bf16", tmp_path)
    shutil.copy(folder / "mp_rank_00_model_states.pt", folder / extra)
    with pytest.raises(CheckpointError) as err:
        read_deepspeed_index(folder)
    assert err.value.kind == "unsupported" and words in err.value.message
