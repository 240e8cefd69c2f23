"""Clip whole checkpoints and runs into new files the user's framework still loads.

Output format = input format: safetensors stays safetensors (sharded stays
sharded, with its index), a ``.pt/.ckpt/.bin`` container keeps every other
entry (optimizer state, epoch, hyper-parameters) with only model tensors
clipped. ``to="safetensors"`` converts. Inputs are only read; every output is
written to a temporary file and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from ._version import __version__
from .checkpoints import HF_WEIGHT_NAMES, _TRAINER_STATE, Checkpoint, open_run
from .clipping import CLIP_REPORT_COLUMNS, clip_tensor_outcome
from .config import ClipSettings, ClipSpec
from .errors import CheckpointError, InputError
from .output import atomic_path
from .readers import WRAPPER_KEYS, find_state_dict, load_torch_file, normalize_names, open_checkpoint_file
from .selection import name_filter
from .writers import save_torch, sha256_file, write_json, write_safetensors


@dataclass
class ClipResult:
    """What :func:`clip_run` did: the report, unreadable checkpoints, files written and notes."""

    report: pd.DataFrame
    errors: pd.DataFrame
    written: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def describe_settings(settings: ClipSettings) -> str:
    """One line recording a clip configuration, for provenance metadata.

    >>> from auditclip.config import ClipSpec
    >>> describe_settings(ClipSettings(ClipSpec.parse("max_abs=0.01"), protect_top=1))
    'max_abs=0.01; protect_top=1'
    """
    parts = [str(settings.spec) if settings.spec else "none"]
    parts += [f"{','.join(p)}: {s}" for p, s in settings.overrides]
    if settings.protect_top:
        parts.append(f"protect_top={settings.protect_top}")
    parts += [f"protect={p}" for p in settings.protect]
    parts += [f"include={p}" for p in settings.include] + [f"exclude={p}" for p in settings.exclude]
    return "; ".join(parts)


class _Clipper:
    """Applies the settings to tensors by clean name and collects report rows."""

    def __init__(self, settings: ClipSettings, label: str) -> None:
        self.settings, self.label = settings, label
        self.keep = name_filter(settings.include, settings.exclude)
        self.rows: list[dict[str, Any]] = []

    def __call__(self, name: str, t: torch.Tensor) -> torch.Tensor:
        spec = self.settings.spec_for(name) if self.keep(name) else None
        if spec is None or not t.is_floating_point():
            return t
        s = self.settings
        outcome = clip_tensor_outcome(t, spec, name=name, protect=s.protect, protect_top=s.protect_top)
        self.rows.append({"checkpoint": self.label, "tensor": name, "spec": str(spec), **outcome.report(t)})
        return outcome.tensor


def _provenance(source: Path, settings: ClipSettings) -> dict[str, str]:
    return {"auditclip_source_sha256": sha256_file(source), "auditclip_spec": describe_settings(settings),
            "auditclip_version": __version__}


def _clip_safetensors(src: Path, dst: Path, clipper: _Clipper, dry_run: bool) -> None:
    with open_checkpoint_file(src) as reader:
        clean_of = {raw: clean for clean, raw in reader.name_map.items()}
        entries = []
        for clean, raw in reader.name_map.items():
            info = reader.info(clean)
            entries.append((raw, getattr(torch, info.dtype), info.shape))
        produce = lambda raw: clipper(clean_of[raw], reader.get(clean_of[raw]))  # noqa: E731
        if dry_run:
            for raw, _, _ in entries:
                produce(raw)
            return
        metadata = {**reader.metadata, **_provenance(src, clipper.settings)}
        write_safetensors(dst, entries, produce, metadata)


def _tensor_slots(obj: Any, path: Path, key: str | None) -> list[tuple[Any, Any, str]]:
    """(mapping, key, stored name) for every model tensor of a loaded container, to edit in place."""
    sd = find_state_dict(obj, path, key)
    wrappers = (key,) if key else WRAPPER_KEYS
    if not any(isinstance(obj, Mapping) and obj.get(w) is sd for w in wrappers):
        return [(obj, k, str(k)) for k, v in obj.items() if isinstance(v, torch.Tensor)]

    def walk(m: Any, prefix: str) -> Iterator[tuple[Any, Any, str]]:
        for k, v in m.items():
            if isinstance(v, torch.Tensor):
                yield m, k, prefix + str(k)
            elif isinstance(v, Mapping):
                yield from walk(v, f"{prefix}{k}.")

    return list(walk(sd, ""))


def _clip_torch(src: Path, dst: Path, clipper: _Clipper, key: str | None, to: str | None, dry_run: bool) -> None:
    obj = load_torch_file(src)
    slots = _tensor_slots(obj, src, key)
    clean = normalize_names([raw for _, _, raw in slots])
    clean_of = {raw: c for c, raw in clean.items()}
    if to == "safetensors":
        tensors = {clean_of[raw]: m[k] for m, k, raw in slots}
        produce = lambda name: clipper(name, tensors[name])  # noqa: E731
        if dry_run:
            for name in tensors:
                produce(name)
            return
        entries = [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
        write_safetensors(dst, entries, produce, {"format": "pt", **_provenance(src, clipper.settings)})
        return
    for mapping, k, raw in slots:
        # a new tensor replaces the entry: the memory-mapped original is never written to
        mapping[k] = clipper(clean_of[raw], mapping[k])
    if not dry_run:
        save_torch(obj, dst)


def _output(ckpt: Checkpoint, out: Path, to: str | None) -> Path:
    """Where a checkpoint's clipped weights go (the run's layout, mirrored under ``out``)."""
    # a sharded checkpoint's shards are named in its index and land beside it
    weights = ckpt.weights
    folder = ckpt.path.is_dir()
    base = out / ckpt.label / weights.name if folder else out / ckpt.label
    if to == "safetensors" and not weights.name.endswith((".safetensors", ".index.json")):
        base = base.with_name(Path(base.name).stem + ".safetensors")
    return base


def clip_checkpoint(
    src: str | os.PathLike[str] | Checkpoint,
    dst: str | os.PathLike[str],
    specs: ClipSettings | ClipSpec | str,
    *,
    to: str | None = None,
    key: str | None = None,
    dry_run: bool = False,
) -> pd.DataFrame:
    """Clip one checkpoint into ``dst`` (a file; a folder for a sharded checkpoint's index).

    Returns the ``clip_report.csv`` rows for it.

    ``specs``: :class:`ClipSettings`, a :class:`ClipSpec` or its text.

    >>> clip_checkpoint("run/step_100.safetensors", "clipped/step_100.safetensors", "max_abs=0.01")  # doctest: +SKIP
    """
    if not isinstance(specs, ClipSettings):
        specs = ClipSettings(spec=specs if isinstance(specs, ClipSpec) else ClipSpec.parse(specs))
    ckpt = src if isinstance(src, Checkpoint) else open_run(src, key=key)[0]
    dst = Path(dst)
    clipper = _Clipper(specs, ckpt.label)
    weights = ckpt.weights
    if not dry_run:
        dst.parent.mkdir(parents=True, exist_ok=True)
    if weights.name.endswith(".index.json"):
        doc = json.loads(weights.read_text(encoding="utf-8"))
        shards = sorted(set(doc["weight_map"].values()))
        missing = [s for s in shards if not (weights.parent / s).is_file()]
        if missing:
            raise CheckpointError(weights, f"index names missing shard(s): {', '.join(missing)}", kind="missing_shard")
        for shard in shards:
            source = weights.parent / shard
            if shard.endswith(".safetensors"):
                _clip_safetensors(source, dst.parent / shard, clipper, dry_run)
            else:
                _clip_torch(source, dst.parent / shard, clipper, key, None, dry_run)
        if not dry_run:
            meta = dict(doc.get("metadata") or {})
            meta.update({"auditclip_spec": describe_settings(specs), "auditclip_version": __version__,
                         "auditclip_source_sha256": sha256_file(weights)})
            write_json({**doc, "metadata": meta}, dst)
    elif weights.name.endswith(".safetensors"):
        _clip_safetensors(weights, dst, clipper, dry_run)
    else:
        _clip_torch(weights, dst, clipper, key, to, dry_run)
    return pd.DataFrame(clipper.rows, columns=list(CLIP_REPORT_COLUMNS))


def _is_inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def clip_run(
    src: Any,
    out: str | os.PathLike[str],
    settings: ClipSettings,
    *,
    to: str | None = None,
    key: str | None = None,
    sort: str = "step",
    force: bool = False,
    dry_run: bool = False,
) -> ClipResult:
    """Clip every checkpoint of a run into ``out``, mirroring the run's layout.

    In Hugging Face folders the files a loader needs (config, tokenizer...) are
    copied; optimizer, scheduler and RNG states are not (they describe the
    unclipped weights). Unreadable checkpoints are listed in ``errors`` and skipped.

    >>> from auditclip.config import ClipSpec
    >>> result = clip_run("sample_checkpoints/high_lr", "clipped/",
    ...                   ClipSettings(ClipSpec.parse("max_abs=1")))  # doctest: +SKIP
    """
    if to not in (None, "safetensors"):
        raise InputError(f"--to {to!r}: only safetensors is supported")
    run = open_run(src, sort=sort, key=key)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; give a directory for the clipped checkpoints")
    sources = [Path(p) for p in ([src] if isinstance(src, (str, os.PathLike)) else [])]
    folders = [p for p in sources if p.is_dir()] + [c.path for c in run if c.path.is_dir()]
    for folder in folders:
        if _is_inside(out, folder):
            raise InputError(f"--out {out} is inside the input {folder}; write the clipped run somewhere else")
    plans = [(ckpt, _output(ckpt, out, to)) for ckpt in run]
    inputs = {p.resolve() for c in run for p in (c.weights, c.path)}
    for _, dst in plans:
        if dst.resolve() in inputs:
            raise InputError(f"--out {out} would overwrite the input {dst}; write the clipped run somewhere else")
    if not force and not dry_run:
        existing = [dst for _, dst in plans if dst.exists()]
        if existing:
            raise InputError(f"{existing[0]} already exists; pass --force to overwrite")
    reports: list[pd.DataFrame] = []
    errors: list[dict[str, str]] = []
    result = ClipResult(report=pd.DataFrame(), errors=pd.DataFrame())
    skipped_state: set[str] = set()
    for ckpt, dst in plans:
        try:
            reports.append(clip_checkpoint(ckpt, dst, settings, to=to, key=key, dry_run=dry_run))
        except CheckpointError as exc:
            errors.append(exc.row(ckpt.label))
            continue
        if not dry_run:
            result.written.append(dst)
        if ckpt.path.is_dir():
            for extra in sorted(p for p in ckpt.path.iterdir() if p.is_file()):
                if _TRAINER_STATE.match(extra.name):
                    skipped_state.add(extra.name)
                elif extra.name not in HF_WEIGHT_NAMES and not _is_shard_of(extra, ckpt.weights) and not dry_run:
                    target = dst.parent / extra.name
                    with atomic_path(target) as tmp:
                        shutil.copy2(extra, tmp)
                    result.written.append(target)
    if skipped_state:
        result.notes.append(
            "not copied (they describe the unclipped weights): " + ", ".join(sorted(skipped_state)))
    frames = [r for r in reports if len(r)]
    result.report = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(CLIP_REPORT_COLUMNS))
    result.errors = pd.DataFrame(errors, columns=["checkpoint", "error", "message"])
    return result


def _is_shard_of(path: Path, weights: Path) -> bool:
    if not weights.name.endswith(".index.json"):
        return False
    try:
        return path.name in set(json.loads(weights.read_text(encoding="utf-8"))["weight_map"].values())
    except (OSError, ValueError, KeyError):
        return False
