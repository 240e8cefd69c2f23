"""The statistics pass on a Dask cluster (``--scheduler``): the same frames as the threads, bit for bit.

One ``LocalCluster(processes=True, n_workers=2, threads_per_worker=1)`` on 127.0.0.1 serves
the module; each test checks its frames against the threaded run of the same files (and
one value against numpy), and one test kills a worker process in the middle of a run.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from safetensors.numpy import load_file
from safetensors.torch import save_file

from auditclip import walk_dask
from auditclip.analysis import analyze
from auditclip.cli import cli
from auditclip.flags import flag

from conftest import SAMPLES, invoke_cli

distributed = pytest.importorskip("distributed", reason="--scheduler needs dask[distributed] (auditclip[dask])")


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address="127.0.0.1:0", silence_logs=40) as local:
        yield local.scheduler_address


def assert_same(want: Any, got: Any) -> None:
    for frame in ("stats", "drift", "errors"):
        a, b = getattr(want, frame), getattr(got, frame)
        pd.testing.assert_frame_equal(a, b, check_exact=True)
        assert a.to_csv(index=False) == b.to_csv(index=False), frame


def test_cli_drift_on_the_cluster_writes_the_threaded_csvs(cluster: str, tmp_path: Path) -> None:
    run = SAMPLES / "high_lr"
    threads = invoke_cli("drift", run, "--out", tmp_path / "threads", "-q")
    dask = invoke_cli("drift", run, "--out", tmp_path / "dask", "-q", "--scheduler", cluster)
    assert threads.exit_code == dask.exit_code == 0, dask.output
    for name in ("stats.csv", "drift.csv"):
        assert (tmp_path / "dask" / name).read_bytes() == (tmp_path / "threads" / name).read_bytes(), name
    # one value against numpy: the whole net.0.weight's move from epoch 1 by epoch 12
    first, last = (load_file(str(run / f"epoch_{i:02d}.safetensors"))["net.0.weight"].astype(np.float64)
                   for i in (1, 12))
    drift = pd.read_csv(tmp_path / "dask" / "drift.csv")
    row = drift[(drift.checkpoint == "epoch_12.safetensors") & (drift.tensor == "net.0.weight")
                & (drift.baseline == "reference")]
    assert float(row.rel_l2_change.iloc[0]) == pytest.approx(np.linalg.norm(last - first) / np.linalg.norm(first),
                                                             rel=1e-6)


def test_blocks_of_checkpoints_give_the_same_frames(cluster: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # blocks of 2 checkpoints: each re-reads the one before it as its previous baseline, and the reference
    monkeypatch.setattr(walk_dask, "BLOCK_CHECKPOINTS", 2)
    run = SAMPLES / "wgan_clip"
    reference = run / sorted(os.listdir(run))[1]
    for options in ({}, {"reference": str(reference)}):
        assert_same(analyze(run, **options), analyze(run, scheduler=cluster, **options))


def test_flag_checks_the_elements_on_the_workers(cluster: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(walk_dask, "BLOCK_CHECKPOINTS", 5)
    run = SAMPLES / "high_lr"
    want, got = flag(run, max_abs=1.5), flag(run, max_abs=1.5, scheduler=cluster)
    assert (want.flags.rule == "range").any()
    pd.testing.assert_frame_equal(want.flags, got.flags, check_exact=True)
    assert_same(want.analysis, got.analysis)


def test_unreadable_checkpoints_end_in_errors_as_without_dask(cluster: str, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(0)
    # 30,000 elements: numpy's dot splits sums that long across its BLAS threads (wasserstein uses it)
    base = {"a.weight": torch.randn(300, 100, generator=g), "a.bias": torch.randn(100, generator=g)}
    run = tmp_path / "run"
    run.mkdir()
    for step in range(6):
        sd = {k: v + 0.01 * step for k, v in base.items()}
        if step == 3:  # opens (the header is fine) but a value is past what float64 statistics can hold
            sd["a.bias"] = sd["a.bias"].double()
            sd["a.bias"][0] = 1e80
        save_file(sd, str(run / f"step_{step}.safetensors"))
    (run / "step_4.safetensors").write_bytes((run / "step_4.safetensors").read_bytes()[:100])  # truncated
    monkeypatch.setattr(walk_dask, "BLOCK_CHECKPOINTS", 2)
    monkeypatch.chdir(tmp_path)  # a relative path here, where the workers were not started
    want, got = analyze("run"), analyze("run", scheduler=cluster)
    assert_same(want, got)
    assert list(got.errors.checkpoint) == ["step_3.safetensors", "step_4.safetensors"]
    assert got.errors.error.iloc[0] == "out_of_range"  # found on a worker, while it read the tensor
    assert "a.weight" in set(got.stats[got.stats.checkpoint == "step_3.safetensors"].tensor)


class KillOnce(distributed.WorkerPlugin):
    """Ends its worker process (as a crash or the OOM killer would) when the first walk task starts."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        if finish == "executing" and "auditclip-walk" in str(key):
            try:
                os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL))  # one worker, once
            except FileExistsError:
                return
            os._exit(1)


def test_a_worker_killed_mid_run_still_gives_the_whole_result(cluster: str, tmp_path: Path) -> None:
    marker = tmp_path / "killed"
    run = SAMPLES / "high_lr"
    want = analyze(run)
    with distributed.Client(cluster) as client:
        client.register_plugin(KillOnce(str(marker)), name="kill-once")
        try:
            got = analyze(run, scheduler=cluster)
        finally:
            client.unregister_worker_plugin("kill-once")
    assert marker.exists()  # a worker did die
    assert_same(want, got)


def test_a_cluster_without_workers_is_an_error_not_a_hang(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(walk_dask, "NO_WORKER_TIMEOUT", 1.0)
    monkeypatch.setattr(walk_dask, "_POLL", 0.25)
    with distributed.LocalCluster(n_workers=0, processes=True, host="127.0.0.1", dashboard_address="127.0.0.1:0",
                                  silence_logs=40) as empty:
        result = CliRunner().invoke(cli, ["drift", str(SAMPLES / "high_lr"), "--out", "unused",
                                          "--scheduler", empty.scheduler_address])
    assert result.exit_code == 2, result.output
    assert "has had no worker for 1 s" in result.output


@pytest.mark.parametrize("spec, fragment", [("local:0", "local:N takes"), ("dask-host", "tcp://HOST:PORT"),
                                            ("tcp://127.0.0.1:9", "cannot reach the Dask scheduler")])
def test_a_bad_scheduler_is_one_error_line(tmp_path: Path, spec: str, fragment: str,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(walk_dask, "CONNECT_TIMEOUT", 1.0)
    result = CliRunner().invoke(cli, ["drift", str(SAMPLES / "high_lr"), "--out", str(tmp_path), "--scheduler", spec])
    assert result.exit_code == 2 and fragment in result.output, result.output


def test_without_dask_the_scheduler_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed raises ImportError
    result = CliRunner().invoke(cli, ["flag", str(SAMPLES / "high_lr"), "--out", str(tmp_path), "--scheduler",
                                      "local:2"])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "pip install 'auditclip[dask]'" in errors[0], result.output
