"""auditclip.formats.dcp on folders written by torch.distributed.checkpoint itself.

One single-process ``dcp.save`` of a model and its Adam state, and one real 2-rank
sharded save (gloo, ``file://`` rendezvous, FSDP2 ``fully_shard`` plus hand-sharded
DTensors) whose full tensors the ranks also gather with ``DTensor.full_tensor()`` as
the reference. Both are module-scoped; tests that damage a folder work on a copy.
"""

from __future__ import annotations

import doctest
import os
import pickle
import shutil
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from auditclip import formats
from auditclip.errors import CheckpointError
from auditclip.formats import dcp as fdcp
from auditclip.formats.dcp import read_dcp_index, read_dcp_object, read_dcp_tensor

dcp = pytest.importorskip("torch.distributed.checkpoint")


def bits(t: torch.Tensor) -> bytes:
    """The tensor's raw bytes: equality of these is bit-for-bit equality (NaNs, -0.0, bf16 included)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and tuple(got.shape) == tuple(want.shape)
    assert bits(got) == bits(want)


def save(state: dict[str, Any], folder: Path, **writer: Any) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
        if writer:
            dcp.save(state, storage_writer=dcp.FileSystemWriter(folder, **writer))
        else:
            dcp.save(state, checkpoint_id=folder)
    return folder


class Net(nn.Module):
    """fp32 layers, a bf16 head, BatchNorm (0-d int64 buffer) and two more buffers (0-d float, int32)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 4)
        self.bn = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 2).to(torch.bfloat16)
        self.register_buffer("temperature", torch.tensor(0.7))
        self.register_buffer("counts", torch.arange(5, dtype=torch.int32) - 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(self.fc(x)).to(torch.bfloat16)).float() / self.temperature


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor], dict[str, Any]]:
    """``dcp.save({"model", "optim", "step"})`` in one process, after two Adam steps."""
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(6, 3)).pow(2).mean().backward()
        opt.step()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    osd = opt.state_dict()
    osd = {"state": {i: {k: v.clone() for k, v in s.items()} for i, s in osd["state"].items()},
           "param_groups": osd["param_groups"]}
    folder = save({"model": model.state_dict(), "optim": opt.state_dict(), "step": 3},
                  tmp_path_factory.mktemp("single") / "step-2")
    return folder, sd, osd


def test_single_process_save_reads_back_bit_for_bit(single: Any) -> None:
    folder, sd, osd = single
    # the fixture covers what the test claims to cover
    assert sd["head.weight"].dtype == torch.bfloat16 and sd["bn.num_batches_tracked"].dim() == 0
    assert sd["temperature"].dim() == 0 and sd["counts"].dtype == torch.int32
    assert sorted(os.listdir(folder)) == [".metadata", "__0_0.distcp"]

    index = read_dcp_index(folder)
    assert index.model_prefix == "model" and index.version is not None
    model = index.model_tensors()
    assert list(model) == list(sd)
    for name, want in sd.items():
        entry = model[name]
        assert (entry.key, entry.role, entry.dtype, entry.shape) == (
            f"model.{name}", "model", str(want.dtype).removeprefix("torch."), tuple(want.shape))
        assert_same(read_dcp_tensor(index, name), want)
        assert_same(read_dcp_tensor(index, f"model.{name}"), want)

    # optimizer state: plain optimizer.state_dict() keys its state by parameter id
    for pid, stats in osd["state"].items():
        for stat, want in stats.items():
            entry = index.tensors[f"optim.state.{pid}.{stat}"]
            assert (entry.role, entry.name) == ("optimizer", f"state.{pid}.{stat}")
            assert_same(read_dcp_tensor(index, entry.key), want)
    assert {t.role for t in index.tensors.values()} == {"model", "optimizer"}

    # non-tensor entries: listed apart, loaded with weights_only
    assert read_dcp_object(index, "step") == 3 and index.objects["step"].role == "other"
    assert index.objects["optim.param_groups.0.lr"].role == "optimizer"
    assert read_dcp_object(index, "optim.param_groups.0.lr") == 0.01
    assert read_dcp_object(index, "optim.param_groups.0.betas") == osd["param_groups"][0]["betas"]
    with pytest.raises(KeyError, match="not a tensor"):
        read_dcp_tensor(index, "nope")


@pytest.mark.parametrize("writer", [{"thread_count": 2}, {"single_file_per_rank": False}],
                         ids=["two-files-per-rank", "file-per-tensor"])
def test_other_file_layouts_of_the_writer(writer: dict[str, Any], tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    sd = {"a": torch.randn(7, 5, generator=g), "b": torch.randn(3, generator=g).to(torch.float16),
          "c": torch.tensor(-4, dtype=torch.int64)}
    folder = save({"model": sd}, tmp_path / "ck", **writer)
    assert len([f for f in os.listdir(folder) if f.endswith(".distcp")]) >= 2
    index = read_dcp_index(folder)
    assert len({c.file for t in index.tensors.values() for c in t.chunks}) >= 2
    for name, want in sd.items():
        assert_same(read_dcp_tensor(index, name), want)


def test_safetensors_serialization_is_refused_by_name(tmp_path: Path) -> None:
    formats_enum = getattr(dcp.filesystem, "SerializationFormat", None)
    if formats_enum is None:
        pytest.skip("this torch's FileSystemWriter has no serialization_format")
    folder = save({"model": {"w": torch.ones(2, 3)}, "step": 5}, tmp_path / "ck",
                  serialization_format=formats_enum.SAFETENSORS)
    index = read_dcp_index(folder)
    assert index.tensors["model.w"].shape == (2, 3)
    assert read_dcp_object(index, "step") == 5  # bytes entries are still torch.save records
    with pytest.raises(CheckpointError) as err:
        read_dcp_tensor(index, "w")
    assert err.value.kind == "unsupported" and "serialization_format=SAFETENSORS" in err.value.message


# --------------------------------------------------------------------------- 2 ranks

def _sharded_worker(rank: int, folder: str, store: str) -> None:
    """One rank: FSDP2-shard a model, take an Adam step, save model + optimizer + DTensors with DCP."""
    torch.set_num_threads(1)
    from torch.distributed.checkpoint.state_dict import get_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
        fully_shard(model, mesh=mesh)
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        model(torch.randn(4, 3)).pow(2).mean().backward()
        opt.step()
        msd, osd = get_state_dict(model, opt)
        g = torch.Generator().manual_seed(1)  # same on both ranks: distribute_tensor keeps each rank's piece
        msd["rows"] = distribute_tensor(torch.randn(5, 3, generator=g), mesh, [Shard(0)])   # 3 + 2 rows
        msd["cols"] = distribute_tensor(torch.randn(4, 6, generator=g).to(torch.bfloat16), mesh, [Shard(1)])
        msd["rep"] = distribute_tensor(torch.randn(3, generator=g), mesh, [Replicate()])
        dcp.save({"model": msd, "optimizer": osd}, checkpoint_id=folder)
        # the reference: the framework's own gathered view of every tensor
        full = {f"model.{k}": v.full_tensor() if isinstance(v, DTensor) else v for k, v in msd.items()}
        for fqn, stats in osd["state"].items():
            full.update({f"optimizer.state.{fqn}.{k}": v.full_tensor() if isinstance(v, DTensor) else v
                         for k, v in stats.items()})
        if rank == 0:
            torch.save(full, Path(folder).parent / "reference.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    if not (hasattr(os, "fork") and dist.is_available() and dist.is_gloo_available()):
        pytest.skip("needs fork and torch.distributed with gloo")
    import torch.multiprocessing as mp
    # Imported here, before the fork, so the ranks do not each pay for them (torch._dynamo
    # is what DTensor's first operation imports: seconds).
    import torch._dynamo  # noqa: F401
    import torch.distributed.checkpoint.state_dict  # noqa: F401
    import torch.distributed.fsdp  # noqa: F401
    import torch.distributed.tensor  # noqa: F401

    base = tmp_path_factory.mktemp("sharded")
    folder = base / "step-1"
    context = mp.start_processes(_sharded_worker, args=(str(folder), str(base / "store")), nprocs=2,
                                 join=False, start_method="fork")
    deadline = time.monotonic() + 120
    while not context.join(timeout=5):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail("the 2-rank DCP save did not finish in 120 s")
    return folder, torch.load(base / "reference.pt", weights_only=True)


def test_two_rank_sharded_save_is_reassembled(sharded: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    folder, reference = sharded
    assert sorted(os.listdir(folder)) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    index = read_dcp_index(folder)
    assert index.model_prefix == "model"

    rows = index.tensors["model.rows"]
    assert rows.shape == (5, 3)
    assert [(c.file, c.offsets, c.sizes) for c in rows.chunks] == [
        ("__0_0.distcp", (0, 0), (3, 3)), ("__1_0.distcp", (3, 0), (2, 3))]
    cols = index.tensors["model.cols"]
    assert cols.dtype == "bfloat16" and sorted(c.offsets for c in cols.chunks) == [(0, 0), (0, 3)]
    assert len(index.tensors["model.rep"].chunks) == 1  # replicated: DCP keeps one copy
    weight = index.tensors["model.0.weight"]  # FSDP2 shards dim 0: 5 rows as 3 + 2
    assert {c.file for c in weight.chunks} == {"__0_0.distcp", "__1_0.distcp"}

    # one pread per chunk, nothing else, when one sharded tensor is read
    calls: list[tuple[int, int]] = []
    real_pread = os.pread

    def counting_pread(fd: int, n: int, offset: int) -> bytes:
        calls.append((n, offset))
        return real_pread(fd, n, offset)

    monkeypatch.setattr(os, "pread", counting_pread)
    assert_same(read_dcp_tensor(index, "rows"), reference["model.rows"])
    assert sorted(calls) == sorted((c.length, c.offset) for c in rows.chunks)
    monkeypatch.undo()

    model_keys = [k for k in reference if k.startswith("model.")]
    assert {t.key for t in index.tensors.values() if t.role == "model"} == set(model_keys)
    for key, want in reference.items():
        assert index.tensors[key].role == ("model" if key.startswith("model.") else "optimizer")
        assert_same(read_dcp_tensor(index, key), want)
    # get_state_dict keys the optimizer by parameter name
    assert index.tensors["optimizer.state.0.weight.exp_avg"].name == "state.0.weight.exp_avg"


# --------------------------------------------------------------------------- no data in the index

def test_index_reads_no_tensor_data(single: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder, sd, _ = single
    reads: list[int] = []
    real_pread = os.pread
    monkeypatch.setattr(os, "pread", lambda fd, n, off: reads.append(n) or real_pread(fd, n, off))
    index = read_dcp_index(folder)
    assert reads == []

    # the storage files' bytes do not matter to the index: zero them all, same sizes
    copy = shutil.copytree(folder, tmp_path / "scrambled")
    for f in copy.glob("*.distcp"):
        f.write_bytes(bytes(f.stat().st_size))
    scrambled = read_dcp_index(copy)
    assert scrambled.tensors == index.tensors and scrambled.objects == index.objects
    assert reads == []
    # ...but they are read when a tensor is asked for
    with pytest.raises(CheckpointError) as err:
        read_dcp_tensor(scrambled, "fc.weight")
    assert err.value.path.endswith("__0_0.distcp") and "torch.save archive" in err.value.message
    assert len(reads) == 1 and err.value.kind == "unreadable"
    assert_same(read_dcp_tensor(index, "fc.weight"), sd["fc.weight"])


# --------------------------------------------------------------------------- hostile .metadata

class _Payload:
    def __init__(self, call: Any, args: tuple[Any, ...]) -> None:
        self.call, self.args = call, args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return self.call, self.args


def _real_metadata(folder: Path) -> Any:
    # The test reads its own, just-written file with torch's classes to build variants of it.
    with open(folder / ".metadata", "rb") as f:
        return pickle.load(f)


@pytest.mark.parametrize("how", ["os.system", "nested in Metadata", "eval", "subprocess", "torch.load"])
def test_hostile_metadata_is_refused_and_never_runs(how: str, single: Any, tmp_path: Path) -> None:
    folder = shutil.copytree(single[0], tmp_path / "ck")
    marker = tmp_path / "pwned"
    payload = {
        "os.system": _Payload(os.system, (f"touch {marker}",)),
        "nested in Metadata": _Payload(os.system, (f"touch {marker}",)),
        "eval": _Payload(eval, (f"open({str(marker)!r}, 'w')",)),
        "subprocess": _Payload(subprocess.call, (["touch", str(marker)],)),
        "torch.load": _Payload(torch.load, (str(folder / "__0_0.distcp"),)),
    }[how]
    if how == "nested in Metadata":
        metadata = _real_metadata(folder)
        metadata.storage_meta = payload
        payload = metadata
    (folder / ".metadata").write_bytes(pickle.dumps(payload))
    with pytest.raises(CheckpointError) as err:
        read_dcp_index(folder)
    assert err.value.kind == "unsafe" and "refused" in err.value.message
    assert err.value.path.endswith(".metadata")
    assert not marker.exists()


def _text(value: str) -> bytes:
    raw = value.encode()
    return b"\x8c" + bytes([len(raw)]) + raw  # SHORT_BINUNICODE


def test_a_pickle_rewriting_the_record_classes_changes_only_its_own_load(single: Any, tmp_path: Path) -> None:
    """BUILD on the class ``_StorageInfo`` itself (a default transform for every record), then the real metadata."""
    folder = shutil.copytree(single[0], tmp_path / "ck")
    real = (folder / ".metadata").read_bytes()
    defaults = b"}" + _text("transform_descriptors") + b"]" + _text("stream.zstd/1") + b"as"
    prefix = (b"\x80\x04" + _text("torch.distributed.checkpoint.filesystem") + _text("_StorageInfo") + b"\x93"
              + b"N}" + _text("_defaults") + defaults + b"s\x86b0")  # (None, {"_defaults": ...}) BUILD, POP
    (folder / ".metadata").write_bytes(prefix + real)
    tampered = read_dcp_index(folder)
    assert tampered.tensors["model.fc.weight"].chunks[0].transforms == ("stream.zstd/1",)  # it did apply...
    with pytest.raises(CheckpointError) as err:
        read_dcp_tensor(tampered, "fc.weight")
    assert err.value.kind == "unsupported" and "stream.zstd/1" in err.value.message
    # ...to that load only: the next one gets fresh classes with the writer's defaults
    index = read_dcp_index(single[0])
    assert all(c.transforms == () for t in index.tensors.values() for c in t.chunks)
    assert_same(read_dcp_tensor(index, "fc.weight"), single[1]["fc.weight"])


def test_record_outside_the_folder_is_refused(single: Any, tmp_path: Path) -> None:
    folder = shutil.copytree(single[0], tmp_path / "ck")
    metadata = _real_metadata(folder)
    first = next(iter(metadata.storage_data))
    metadata.storage_data[first].relative_path = "../../etc/passwd"
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(CheckpointError) as err:
        read_dcp_index(folder)
    assert err.value.kind == "unsafe" and "outside the checkpoint folder" in err.value.message


# --------------------------------------------------------------------------- broken folders

def test_truncated_storage_file(single: Any, tmp_path: Path) -> None:
    folder = shutil.copytree(single[0], tmp_path / "ck")
    storage = folder / "__0_0.distcp"
    data = storage.read_bytes()
    storage.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as err:
        read_dcp_index(folder)
    assert err.value.kind == "unreadable" and err.value.path == str(storage)
    assert "truncated" in err.value.message and str(len(data) // 2) in err.value.message

    # cut short after it was indexed: the read says the file changed, never returns a mixed tensor
    storage.write_bytes(data)
    index = read_dcp_index(folder)
    storage.write_bytes(data[:-10])
    with pytest.raises(CheckpointError) as err:
        read_dcp_tensor(index, "fc.weight")
    assert err.value.kind == "changed"


def test_missing_storage_file_and_broken_metadata(single: Any, tmp_path: Path) -> None:
    folder = shutil.copytree(single[0], tmp_path / "ck")
    (folder / "__0_0.distcp").unlink()
    with pytest.raises(CheckpointError) as err:
        read_dcp_index(folder)
    assert err.value.kind == "missing_shard" and "__0_0.distcp" in err.value.message

    folder = shutil.copytree(single[0], tmp_path / "ck2")
    meta = folder / ".metadata"
    meta.write_bytes(meta.read_bytes()[:200])
    with pytest.raises(CheckpointError) as err:
        read_dcp_index(folder)
    assert err.value.kind == "unreadable" and "truncated or not a pickle" in err.value.message

    with pytest.raises(CheckpointError, match="no DCP .metadata"):
        read_dcp_index(tmp_path)
    assert not fdcp.is_dcp_folder(tmp_path) and fdcp.is_dcp_folder(single[0])


@pytest.mark.parametrize("damage", ["gap", "overlap", "outside", "no record", "short record"])
def test_chunks_that_do_not_tile_the_tensor(damage: str, single: Any, tmp_path: Path) -> None:
    folder = shutil.copytree(single[0], tmp_path / "ck")
    metadata = _real_metadata(folder)
    entry = metadata.state_dict_metadata["model.fc.weight"]  # (4, 3), one chunk
    chunk = entry.chunks[0]
    if damage == "gap":
        chunk.sizes = torch.Size([3, 3])
    elif damage == "overlap":
        # a second piece over row 2, with a record of its own, beside the piece covering everything
        entry.chunks.append(type(chunk)(offsets=torch.Size([2, 0]), sizes=torch.Size([1, 3])))
        where, info = next((k, v) for k, v in metadata.storage_data.items() if k.fqn == "model.fc.weight")
        metadata.storage_data[type(where)("model.fc.weight", offset=[2, 0])] = info
    elif damage == "outside":
        chunk.sizes = torch.Size([5, 3])
    elif damage == "no record":
        metadata.storage_data = {k: v for k, v in metadata.storage_data.items() if k.fqn != "model.fc.weight"}
    else:
        info = next(v for k, v in metadata.storage_data.items() if k.fqn == "model.fc.weight")
        info.length = 20  # fewer bytes than 12 floats need
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    expected = {"gap": "cover 9 of its 12", "overlap": "overlap", "outside": "outside its shape",
                "no record": "no storage record", "short record": "its data 48"}[damage]
    with pytest.raises(CheckpointError, match=expected) as err:
        read_dcp_index(folder)
    assert err.value.kind == "unreadable" and "model.fc.weight" in err.value.message


def test_tiling_check_on_a_grid_of_chunks(tmp_path: Path) -> None:
    """2-D sharding (8 x 8 pieces of a 16 x 24 tensor) tiles; one piece moved, dropped or doubled does not."""
    def grid() -> list[fdcp.DcpChunk]:
        return [fdcp.DcpChunk("__0_0.distcp", 0, 1, (2 * i, 3 * j), (2, 3)) for i in range(8) for j in range(8)]

    fdcp._check_tiling("w", (16, 24), grid(), tmp_path)
    moved = grid()
    moved[27] = fdcp.DcpChunk("__0_0.distcp", 0, 1, (moved[27].offsets[0] + 1, moved[27].offsets[1]), (2, 3))
    with pytest.raises(CheckpointError, match="overlap"):
        fdcp._check_tiling("w", (16, 24), moved, tmp_path)
    with pytest.raises(CheckpointError, match="cover 378 of its 384"):
        fdcp._check_tiling("w", (16, 24), grid()[:-1], tmp_path)
    with pytest.raises(CheckpointError, match="overlap"):
        fdcp._check_tiling("w", (16, 24), [*grid()[:-1], grid()[0]], tmp_path)


def test_garbled_metadata_is_an_index_or_a_checkpoint_error(single: Any, tmp_path: Path) -> None:
    """300 seeded corruptions of a real .metadata (cut, bytes flipped, spans spliced): never another exception."""
    import random

    folder = shutil.copytree(single[0], tmp_path / "ck")
    real = (folder / ".metadata").read_bytes()
    rng = random.Random(0)
    outcomes = {"index": 0, "error": 0}
    for _ in range(300):
        data = bytearray(real)
        how = rng.randrange(3)
        if how == 0:
            data = data[: rng.randrange(len(data))]
        elif how == 1:
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        else:
            a, b = sorted(rng.sample(range(len(data)), 2))
            data[a:a] = real[b: b + rng.randint(1, 64)]
        (folder / ".metadata").write_bytes(bytes(data))
        try:
            read_dcp_index(folder)
            outcomes["index"] += 1
        except CheckpointError as exc:
            assert exc.kind in {"unreadable", "unsafe", "unsupported", "missing_shard"}, exc
            outcomes["error"] += 1
    assert outcomes["error"] > 100  # the corruptions did reach the reader


def test_unknown_dtype_is_named(single: Any, tmp_path: Path) -> None:
    folder = shutil.copytree(single[0], tmp_path / "ck")
    meta = folder / ".metadata"
    raw = meta.read_bytes()
    # the pickle names dtypes as ("torch", "float32"); make one a dtype no torch has
    assert b"\x8c\x07float32" in raw
    meta.write_bytes(raw.replace(b"\x8c\x07float32", b"\x8c\x07float99", 1))
    with pytest.raises(CheckpointError) as err:
        read_dcp_index(folder)
    assert err.value.kind == "unsupported" and "torch.float99" in err.value.message


# --------------------------------------------------------------------------- key layouts

def _names(index: fdcp.DcpIndex) -> dict[str, tuple[str, str]]:
    return {k: (t.role, t.name) for k, t in index.tensors.items()}


def test_key_prefix_rules_of_the_writers(tmp_path: Path) -> None:
    """The state-dict layouts torch/torchtitan/Lightning/accelerate hand to dcp.save, saved by dcp.save."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    class HFStyle(nn.Module):  # a decoder under ``model`` and a head beside it, as transformers lays them out
        def __init__(self) -> None:
            super().__init__()
            self.model = nn.Sequential(nn.Linear(2, 2))
            self.lm_head = nn.Linear(2, 2, bias=False)

    torch.manual_seed(0)
    hf = HFStyle()
    opt = torch.optim.SGD(hf.parameters(), lr=0.1, momentum=0.9)
    hf.lm_head(hf.model(torch.randn(3, 2))).sum().backward()
    opt.step()
    msd, flat_osd = get_state_dict(hf, opt, options=StateDictOptions(flatten_optimizer_state_dict=True))

    # torchtitan: model keys at the top level, optimizer flattened by parameter name, training state beside
    titan = read_dcp_index(save({**msd, "optimizer": flat_osd, "lr_scheduler": {"last_epoch": torch.tensor(1)},
                                 "train_state": {"step": torch.tensor(1)}}, tmp_path / "titan"))
    assert titan.model_prefix is None
    assert _names(titan)["model.0.weight"] == ("model", "model.0.weight")
    assert _names(titan)["lm_head.weight"] == ("model", "lm_head.weight")
    assert _names(titan)["optimizer.state.model.0.weight.momentum_buffer"][0] == "optimizer"
    assert _names(titan)["lr_scheduler.last_epoch"] == ("other", "lr_scheduler.last_epoch")
    assert _names(titan)["train_state.step"] == ("other", "train_state.step")

    # torchtitan again, every parameter under ``model.``: the optimizer's names keep the full keys
    decoder_only = {k: v for k, v in msd.items() if k.startswith("model.")}
    opt_only = {k: v for k, v in flat_osd.items() if k.startswith(("state.model.", "param_groups.model."))}
    titan2 = read_dcp_index(save({**decoder_only, "optimizer": opt_only}, tmp_path / "titan2"))
    assert titan2.model_prefix is None and titan2.model_tensors().keys() == decoder_only.keys()

    # user code / accelerate / Lightning FSDPStrategy: a "model" wrapper, optimizer keyed by name
    _, osd = get_state_dict(hf, opt)
    extra = {"lm_head._extra_state": "fp8 scales"}  # a module's non-tensor extra state: a bytes entry
    wrapped = read_dcp_index(save({"model": {**msd, **extra}, "optimizer_0": osd}, tmp_path / "lightning-fsdp"))
    assert wrapped.model_prefix == "model"
    assert set(wrapped.model_tensors()) == set(msd)
    key = "model.lm_head._extra_state"
    assert (wrapped.objects[key].role, read_dcp_object(wrapped, key)) == ("model", "fp8 scales")
    assert read_dcp_index(tmp_path / "lightning-fsdp" / ".metadata").tensors == wrapped.tensors
    assert _names(wrapped)["optimizer_0.state.lm_head.weight.momentum_buffer"] == (
        "optimizer", "state.lm_head.weight.momentum_buffer")

    # Lightning ModelParallelStrategy: "state_dict" wrapper
    mp_index = read_dcp_index(save({"state_dict": msd, "optimizer_0": osd}, tmp_path / "lightning-mp"))
    assert mp_index.model_prefix == "state_dict" and set(mp_index.model_tensors()) == set(msd)

    # accelerate's optimizer folder holds the optimizer alone
    acc = read_dcp_index(save({"optimizer": osd}, tmp_path / "optimizer_0"))
    assert acc.model_tensors() == {} and {t.role for t in acc.tensors.values()} == {"optimizer"}


# --------------------------------------------------------------------------- examples

@pytest.mark.parametrize("module", [fdcp, formats], ids=lambda m: m.__name__)
def test_docstring_examples(module: Any) -> None:
    # tests/test_docstrings.py walks auditclip's top-level modules only; this package's run here
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0 and result.attempted > 0
