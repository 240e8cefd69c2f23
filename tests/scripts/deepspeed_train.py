"""Train a tiny model with DeepSpeed on CPU (gloo) and save two checkpoints, as a user's script would.

Run by tests/test_formats_deepspeed.py in its own process (DeepSpeed initialises
torch.distributed and its accelerator globally; the test process must stay clean):

    python deepspeed_train.py OUT WORLD_SIZE STAGE:DTYPE [STAGE:DTYPE ...]

    python deepspeed_train.py OUT WORLD_SIZE STAGE:DTYPE=RUN [...]   # resume instead

trains one model per ``STAGE:DTYPE`` (``2:bf16``, ``3:fp32``...) in the same ranks and
writes ``OUT/<stage>_<dtype>/run/`` (``latest``, ``global_step2/``, ``global_step3/``, by
``engine.save_checkpoint``) and, for each tag, ``.../expected/<tag>.module.pt`` (the
engine's ``module.state_dict()`` at save time; for ZeRO-3 the full parameters gathered
with ``deepspeed.zero.GatheredParameters``) and ``OUT/expected/<tag>.fp32.pt``
(``get_fp32_state_dict_from_zero_checkpoint`` of DeepSpeed itself; not for stage 0).
With ``STAGE:DTYPE=RUN`` it resumes ``RUN`` (a clipped run) with ``engine.load_checkpoint(RUN)``
as a user would, and writes ``OUT/<stage>_<dtype>.resumed.pt``: ``global_steps`` after the
load, ``module`` (the model's full state dict right after loading, gathered at ZeRO-3),
``fp32`` (DeepSpeed's own ``get_fp32_state_dict_from_zero_checkpoint(RUN)``; not at
stage 0) and ``steps_after`` (``global_steps`` after one more training step).
Prints ``SKIP <reason>`` and exits 3 when DeepSpeed cannot initialise on CPU.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import torch


def _model() -> torch.nn.Module:
    # Sizes chosen so no parameter divides by 2 (ZeRO-3 pads every partition with 2 ranks)
    # and the flat groups need alignment padding; a buffer shows where buffers go.
    model = torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.LayerNorm(13), torch.nn.Linear(13, 3))
    model.register_buffer("scale", torch.tensor([0.5, 2.0, 3.0]))
    # a frozen parameter: ZeRO keeps it out of the optimizer's flat groups (frozen_param_* entries)
    model[2].bias.requires_grad_(False)
    return model


def _worker(rank: int, out: Path, world: int, runs: list[str], init_file: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    try:
        import deepspeed
        import deepspeed.comm.torch  # noqa: F401 - loads the module patched below

        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op (minutes, needs a
        # C++ toolchain) that only speeds up collectives; gloo alone is what a plain CPU run uses.
        # (``deepspeed.comm.torch`` as an attribute is the torch package: go through sys.modules)
        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, init_method=f"file://{init_file}", rank=rank,
                                   world_size=world)
    except Exception as exc:  # noqa: BLE001 - any failure to start is a reason to skip
        print(f"SKIP deepspeed cannot initialise on CPU: {type(exc).__name__}: {exc}", flush=True)
        sys.exit(3)
    for spec in runs:
        spec, _, resume = spec.partition("=")
        stage, dtype = spec.split(":")
        if resume:
            _resume(deepspeed, rank, out / f"{stage}_{dtype}.resumed.pt", int(stage), dtype, Path(resume))
        else:
            _train(deepspeed, rank, out / f"{stage}_{dtype}", int(stage), dtype)
    torch.distributed.destroy_process_group()


def _engine(deepspeed: object, stage: int, dtype: str) -> object:
    torch.manual_seed(0)
    model = _model()
    config = {
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage}, "bf16": {"enabled": dtype == "bf16"},
    }
    if stage in (1, 2):
        # per-parameter alignment padding in the flat groups, and parameters reordered across the
        # ranks' partitions (round robin): what param_alignment_paddings / param_shapes record
        config["zero_optimization"].update(parameter_alignment=True, round_robin_gradients=True)
    # torch's Adam: DeepSpeed's own Adam needs compiled ops
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)  # type: ignore[attr-defined]
    return engine


def _step(engine: object, g: torch.Generator, dtype: str) -> None:
    x = torch.randn(2, 7, generator=g).to({"bf16": torch.bfloat16, "fp32": torch.float32}[dtype])
    loss = engine(x).float().pow(2).mean()  # type: ignore[operator]
    engine.backward(loss)  # type: ignore[attr-defined]
    engine.step()  # type: ignore[attr-defined]


def _full_module(deepspeed: object, engine: object, stage: int) -> dict[str, torch.Tensor]:
    module = engine.module  # type: ignore[attr-defined]
    if stage == 3:
        with deepspeed.zero.GatheredParameters(list(module.parameters())):  # type: ignore[attr-defined]
            return {k: v.detach().clone() for k, v in module.state_dict().items()}
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _resume(deepspeed: object, rank: int, out: Path, stage: int, dtype: str, run: Path) -> None:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    engine = _engine(deepspeed, stage, dtype)
    path, _ = engine.load_checkpoint(str(run))  # type: ignore[attr-defined]
    assert path is not None, f"load_checkpoint found no checkpoint in {run}"
    result = {"global_steps": engine.global_steps, "module": _full_module(deepspeed, engine, stage)}  # type: ignore[attr-defined]
    if stage > 0 and rank == 0:
        result["fp32"] = {k: v.clone() for k, v in get_fp32_state_dict_from_zero_checkpoint(str(run)).items()}
    _step(engine, torch.Generator().manual_seed(rank), dtype)
    result["steps_after"] = engine.global_steps  # type: ignore[attr-defined]
    if rank == 0:
        torch.save(result, out)
    torch.distributed.barrier()


def _train(deepspeed: object, rank: int, out: Path, stage: int, dtype: str) -> None:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    engine = _engine(deepspeed, stage, dtype)
    run, expected = out / "run", out / "expected"
    g = torch.Generator().manual_seed(rank)
    for step in range(1, 4):
        _step(engine, g, dtype)
        if step < 2:
            continue
        tag = f"global_step{step}"
        engine.save_checkpoint(str(run))  # type: ignore[attr-defined]
        module = _full_module(deepspeed, engine, stage)
        if rank == 0:
            expected.mkdir(parents=True, exist_ok=True)
            torch.save(module, expected / f"{tag}.module.pt")
            if stage > 0:
                fp32 = get_fp32_state_dict_from_zero_checkpoint(str(run), tag=tag)
                torch.save({k: v.clone() for k, v in fp32.items()}, expected / f"{tag}.fp32.pt")
        torch.distributed.barrier()


def main() -> None:
    out, world, runs = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    out.mkdir(parents=True, exist_ok=True)
    init_file = tempfile.mktemp(prefix="ds_init_", dir=out)  # file:// rendezvous: no port to pick
    if world == 1:
        _worker(0, out, world, runs, init_file)
    else:
        import torch.multiprocessing as mp

        try:
            mp.start_processes(_worker, args=(out, world, runs, init_file), nprocs=world, start_method="fork")
        except mp.ProcessExitedException as exc:
            sys.exit(exc.exit_code or 1)
    print("DONE", flush=True)


if __name__ == "__main__":
    main()
