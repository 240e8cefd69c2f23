"""Remote runs: a real S3 API (moto's server on 127.0.0.1) read by s3fs, against the same run read locally.

Bytes are counted by a TCP proxy between s3fs and the server, not by auditclip: what the
server really sent. Memory-filesystem tests check the ranged reader alone (blocks, retries,
the io-workers bound, a replaced object).
"""

from __future__ import annotations

import filecmp
import logging
import socket
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp

from conftest import csv_rows, invoke_cli, save_safetensors, save_sharded, state_dict

fsspec = pytest.importorskip("fsspec", reason="remote runs need fsspec")

from auditclip.errors import CheckpointError  # noqa: E402
from auditclip.formats import remote  # noqa: E402
from auditclip.formats.readers import open_checkpoint_file  # noqa: E402


class CountingProxy:
    """Forwards 127.0.0.1:``port`` to the server, counting the bytes the server sends back."""

    def __init__(self, target: int) -> None:
        self.target, self.sent = target, 0
        self._lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, count: bool) -> None:
        try:
            while data := src.recv(1 << 16):
                if count:
                    with self._lock:
                        self.sent += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.sock.close()


def _runs(tmp: Path) -> None:
    """Three runs of one drifting model: safetensors files, sharded checkpoint folders, Lightning-style .ckpt zips."""
    base = state_dict(0)
    (tmp / "pt").mkdir(parents=True)
    for i, step in enumerate([0, 10, 20]):
        sd = {k: (v + 0.4 * i * torch.ones_like(v) if v.is_floating_point() else v) for k, v in base.items()}
        save_safetensors(tmp / "run" / f"step_{step}.safetensors", sd)
        save_sharded(tmp / "sharded" / f"checkpoint-{step}", sd)
        (tmp / "sharded" / f"checkpoint-{step}" / "config.json").write_text('{"model_type": "mlp"}')
        # the step lives inside the pickle only (epoch=<i> names no step): read through the zip remotely too
        torch.save({"state_dict": sd, "global_step": step + 5}, tmp / "pt" / f"epoch={i}.ckpt")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "assuming the intent is to save in a single process"
            dcp.save({"model": sd}, checkpoint_id=tmp / "dcp" / f"step-{step}")
    big = {f"w{i}": torch.randn(256, 512) for i in range(16)} | {"small": torch.arange(3.0)}
    save_safetensors(tmp / "big" / "big.safetensors", big)
    torch.save(big, tmp / "big" / "big.pt")


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    pytest.importorskip("s3fs", reason="the S3 tests need s3fs (pip install 'auditclip[s3]')")
    moto_server = pytest.importorskip("moto.server", reason="the S3 tests need moto[s3] and flask")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    proxy = CountingProxy(server._server.server_port)
    saved = dict(fsspec.config.conf.get("s3", {}))
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            mp.setenv(name, "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(name, raising=False)
        # the endpoint the way a user gives it to s3fs (FSSPEC_S3_ENDPOINT_URL fills this table)
        fsspec.config.conf["s3"] = {"endpoint_url": f"http://127.0.0.1:{proxy.port}"}
        try:
            fs = fsspec.filesystem("s3", skip_instance_cache=True)
            fs.mkdir("bucket")
            local = tmp_path_factory.mktemp("remote")
            _runs(local)
            fs.put(f"{local}/", "bucket/", recursive=True)
            yield {"fs": fs, "local": local, "proxy": proxy}
        finally:
            fsspec.config.conf["s3"] = saved
            proxy.close()
            server.stop()


@pytest.mark.parametrize("run", ["run", "sharded", "pt", "dcp"])
def test_drift_by_url_equals_the_local_run(s3: dict[str, Any], tmp_path: Path, run: str) -> None:
    local = invoke_cli("drift", s3["local"] / run, "--out", tmp_path / "local")
    remote_ = invoke_cli("drift", f"s3://bucket/{run}/", "--out", tmp_path / "remote")
    assert local.exit_code == remote_.exit_code == 0, remote_.output
    for name in ("stats.csv", "drift.csv"):
        assert filecmp.cmp(tmp_path / "local" / name, tmp_path / "remote" / name, shallow=False), name
    steps = sorted({int(r["step"]) for r in csv_rows(tmp_path / "remote" / "stats.csv")})
    assert steps == ([5, 15, 25] if run == "pt" else [0, 10, 20])  # the .ckpt steps come from inside the pickles


def test_a_deepspeed_run_by_url_equals_the_local_run(s3: dict[str, Any], tmp_path: Path,
                                                   tmp_path_factory: pytest.TempPathFactory) -> None:
    from deepspeed_runs import deepspeed_runs

    # ZeRO-2 in bf16: the module weights in the model states, the fp32 master copy in the optimizer partitions
    local = deepspeed_runs(tmp_path_factory) / "2_bf16" / "run"
    s3["fs"].put(f"{local}/", "bucket/deepspeed/", recursive=True)
    for key in ("module", "master"):
        want = invoke_cli("drift", local, "--key", key, "--out", tmp_path / f"local_{key}")
        got = invoke_cli("drift", "s3://bucket/deepspeed", "--key", key, "--out", tmp_path / f"remote_{key}")
        assert want.exit_code == got.exit_code == 0, got.output
        for name in ("stats.csv", "drift.csv"):
            assert filecmp.cmp(tmp_path / f"local_{key}" / name, tmp_path / f"remote_{key}" / name, shallow=False)
        assert len(csv_rows(tmp_path / f"remote_{key}" / "stats.csv")) > 4


def test_audit_and_flag_by_url_give_the_local_findings(s3: dict[str, Any], tmp_path: Path) -> None:
    want = invoke_cli("audit", s3["local"] / "run", "--max-abs", "1.5", "--out", tmp_path / "local",
                      "--reference", s3["local"] / "run" / "step_10.safetensors")
    got = invoke_cli("audit", "s3://bucket/run/", "--max-abs", "1.5", "--out", tmp_path / "remote",
                     "--reference", "s3://bucket/run/step_10.safetensors")
    assert want.exit_code == got.exit_code == 1, got.output  # the bound is crossed: the gate fails both
    for name in ("stats.csv", "drift.csv", "flags.csv"):
        assert filecmp.cmp(tmp_path / "local" / name, tmp_path / "remote" / name, shallow=False), name
    assert any(r["rule"] == "range" for r in csv_rows(tmp_path / "remote" / "flags.csv"))
    # a glob in the URL, as in a local path
    got = invoke_cli("flag", "s3://bucket/run/step_[12]*.safetensors", "--max-abs", "1.5", "--out", tmp_path / "glob")
    want = invoke_cli("flag", s3["local"] / "run" / "step_[12]*.safetensors", "--max-abs", "1.5",
                      "--out", tmp_path / "glob_local")
    assert got.exit_code == want.exit_code == 1
    assert csv_rows(tmp_path / "glob" / "flags.csv") == csv_rows(tmp_path / "glob_local" / "flags.csv")
    assert {r["checkpoint"] for r in csv_rows(tmp_path / "glob" / "flags.csv")} <= {"step_10.safetensors",
                                                                                    "step_20.safetensors"}


@pytest.mark.parametrize("name", ["big.safetensors", "big.pt"])
def test_one_small_tensor_of_a_large_file_transfers_a_small_fraction(s3: dict[str, Any], name: str) -> None:
    view = remote.local_view("s3://bucket/big")
    size = (s3["local"] / "big" / name).stat().st_size
    before = s3["proxy"].sent
    with open_checkpoint_file(view / name) as reader:
        got = reader.get("small")
    sent = s3["proxy"].sent - before
    assert got.tolist() == [0.0, 1.0, 2.0]
    assert 0 < sent < 0.05 * size, (sent, size)
    # the placeholder in the view holds no data: the tensor came from the server
    assert (view / name).read_bytes().count(0) == size


def test_clip_to_s3_writes_what_a_local_clip_writes(s3: dict[str, Any], tmp_path: Path) -> None:
    fs = s3["fs"]
    want = invoke_cli("clip", s3["local"] / "sharded", "--max-abs", "1.5", "--out", tmp_path / "local")
    got = invoke_cli("clip", "s3://bucket/sharded/", "--max-abs", "1.5", "--out", "s3://bucket/clipped/")
    assert want.exit_code == got.exit_code == 0, got.output
    fs.invalidate_cache()
    keys = sorted(k.removeprefix("bucket/clipped/") for k in fs.find("bucket/clipped"))
    local = sorted(p.relative_to(tmp_path / "local").as_posix() for p in (tmp_path / "local").rglob("*") if p.is_file())
    assert keys == local and not [k for k in keys if "partial" in k]
    for key in keys:
        if key.endswith((".safetensors", "config.json", ".index.json")):
            assert fs.cat_file(f"bucket/clipped/{key}") == (tmp_path / "local" / key).read_bytes(), key
    # the clipped weights hold the bound: read back through the remote reader
    view = remote.local_view("s3://bucket/clipped")
    with open_checkpoint_file(view / "checkpoint-20" / "model.safetensors.index.json") as reader:
        assert max(reader.get(n).abs().max().item() for n in reader if reader.info(n).is_float) <= 1.5
    # a second clip to the same place is refused without --force
    again = invoke_cli("clip", "s3://bucket/sharded/", "--max-abs", "1.5", "--out", "s3://bucket/clipped/")
    assert again.exit_code == 2 and "--force" in again.output
    # with --force it is written again, and a stale errors.csv of an earlier clip is removed, as locally
    fs.pipe("bucket/clipped/errors.csv", b"checkpoint,error,message\nx,unreadable,old\n")
    again = invoke_cli("clip", "s3://bucket/sharded/", "--max-abs", "1.5", "--out", "s3://bucket/clipped/", "--force")
    assert again.exit_code == 0, again.output
    fs.invalidate_cache()
    assert sorted(k.removeprefix("bucket/clipped/") for k in fs.find("bucket/clipped")) == keys


def test_an_interrupted_clip_to_s3_leaves_no_object(s3: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    fs = remote.url_filesystem("s3://bucket/cut")  # the instance the command will use
    real_put = fs.put_file
    calls: list[str] = []

    def put_then_interrupt(lpath: str, rpath: str, **kw: Any) -> Any:
        calls.append(rpath)
        result = real_put(lpath, rpath, **kw)  # the temporary object is complete on the server...
        if len(calls) == 3:
            assert fs.exists(rpath)
            raise KeyboardInterrupt  # ...and Ctrl-C comes before it is copied to its final key
        return result

    monkeypatch.setattr(fs, "put_file", put_then_interrupt)
    from click.testing import CliRunner

    from auditclip.cli import cli

    result = CliRunner().invoke(cli, ["clip", "s3://bucket/run/", "--max-abs", "1", "--out", "s3://bucket/cut/"])
    assert result.exit_code != 0 and "Traceback" not in result.output
    fs.invalidate_cache()
    left = fs.find("bucket/cut")
    assert len(calls) == 3 and all(".auditclip-partial-" in c for c in calls)
    # the two files published before stay whole; nothing under the third's final key, no temporary key
    assert not [k for k in left if "partial" in k]
    assert calls[2].split(".auditclip-partial-")[0] not in left
    assert len(left) == 2


def test_a_clip_interrupted_while_writing_publishes_nothing(s3: dict[str, Any],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import auditclip.clip_files as clip_files

    real_write = clip_files.write_safetensors
    written: list[Any] = []

    def write_then_interrupt(dst: Any, *args: Any, **kw: Any) -> Any:
        written.append(dst)
        if len(written) == 2:  # Ctrl-C while the second checkpoint is written locally
            raise KeyboardInterrupt
        return real_write(dst, *args, **kw)

    monkeypatch.setattr(clip_files, "write_safetensors", write_then_interrupt)
    result = invoke_cli("clip", "s3://bucket/run/", "--max-abs", "1", "--out", "s3://bucket/cut2/")
    assert result.exit_code != 0 and len(written) == 2
    s3["fs"].invalidate_cache()
    assert s3["fs"].find("bucket/cut2") == []
    assert not Path(written[0]).exists()  # the local staging folder is gone too


# --- the ranged reader alone, on fsspec's memory filesystem ------------------------------------

class _Flaky:
    """A filesystem whose ``cat_file`` fails ``fail`` times with a connection error, and counts concurrency."""

    def __init__(self, fs: Any, fail: int = 0, delay: float = 0.0) -> None:
        self.fs, self.fail, self.delay = fs, fail, delay
        self.calls = self.active = self.most = 0
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.fs, name)

    def cat_file(self, path: str, start: int, end: int) -> bytes:
        with self._lock:
            self.calls += 1
            self.active += 1
            self.most = max(self.most, self.active)
            failing = self.fail > 0
            self.fail -= failing
        try:
            if failing:
                raise ConnectionResetError("connection reset by peer")
            time.sleep(self.delay)
            return self.fs.cat_file(path, start=start, end=end)
        finally:
            with self._lock:
                self.active -= 1


def test_ranged_reads_in_blocks_with_bounded_concurrency(monkeypatch: pytest.MonkeyPatch) -> None:
    mem = fsspec.filesystem("memory")
    data = bytes(range(256)) * 4096  # 1 MiB
    mem.pipe("/blocks/x.bin", data)
    monkeypatch.setattr(remote, "BLOCK_BYTES", 32 << 10)
    monkeypatch.setattr(remote, "BACKOFF_SECONDS", 0.0)
    remote.set_io_workers(3)
    try:
        fs = _Flaky(mem, fail=2, delay=0.002)
        f = remote.RemoteFile(fs, "/blocks/x.bin", Path("x.bin"))
        buffer = bytearray(900_000)
        f.read_into(buffer, 100_000)
        assert bytes(buffer) == data[100_000:1_000_000]
        assert fs.calls == 2 + -(-900_000 // (32 << 10))  # every block once, plus the two failed tries
        assert fs.most <= 3
        with f.dup() as fh:  # the file object zipfile and torch.load read
            fh.seek(-10, 2)
            assert fh.read() == data[-10:]
    finally:
        remote.set_io_workers(remote.DEFAULT_IO_WORKERS)


def test_retries_end_and_a_replaced_object_is_changed(monkeypatch: pytest.MonkeyPatch) -> None:
    mem = fsspec.filesystem("memory")
    mem.pipe("/changed/x.bin", b"a" * 200_000)
    monkeypatch.setattr(remote, "BACKOFF_SECONDS", 0.0)
    f = remote.RemoteFile(_Flaky(mem, fail=remote.RETRIES), "/changed/x.bin", Path("x.bin"))
    with pytest.raises(CheckpointError, match="failed 5 times"):
        f.read(100_000, 10)
    f = remote.RemoteFile(mem, "/changed/x.bin", Path("x.bin"))
    assert f.read(100_000, 3) == b"aaa"
    mem.pipe("/changed/x.bin", b"b" * 200_000)  # replaced under the reader, same size
    with pytest.raises(CheckpointError) as info:
        f.check()
    assert info.value.kind == "changed"


def test_a_key_leaving_the_folder_is_never_mirrored(tmp_path: Path) -> None:
    from auditclip.notices import collect

    mem = fsspec.filesystem("memory")
    save_safetensors(tmp_path / "w.safetensors", {"w": torch.arange(2.0)})
    mem.pipe("/hostile/run/step_1.safetensors", (tmp_path / "w.safetensors").read_bytes())
    mem.pipe("/hostile/run/a/../../evil.safetensors", b"x" * 10)  # object stores allow such keys
    mem.pipe("/hostile/run2/step_2.safetensors", b"x" * 10)  # a prefix listing would also match run2/
    with collect() as notes:
        view = remote.local_view("memory://hostile/run")
    everything = sorted(p.relative_to(view.parent).as_posix() for p in view.parent.rglob("*"))
    assert everything == [remote.MARKER, "run", "run/a", "run/step_1.safetensors"]
    assert any("evil.safetensors" in n and "not a plain relative path" in n for n in notes)
    with open_checkpoint_file(view / "step_1.safetensors") as reader:
        assert reader.get("w").tolist() == [0.0, 1.0]


def test_a_process_that_did_not_list_the_run_reads_the_objects_not_the_placeholders(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # a worker process handed a checkpoint's path in the view (Dask...) has no listing of its own
    mem = fsspec.filesystem("memory")
    save_safetensors(tmp_path / "w.safetensors", {"w": torch.arange(3.0)})
    mem.pipe("/other/run/step_1.safetensors", (tmp_path / "w.safetensors").read_bytes())
    view = remote.local_view("memory://other/run")
    monkeypatch.setattr(remote, "_placeholders", {})
    with open_checkpoint_file(view / "step_1.safetensors") as reader:
        assert reader.get("w").tolist() == [0.0, 1.0, 2.0]
