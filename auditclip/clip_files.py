"""Clip whole checkpoints and runs into new files the user's framework still loads.

Output format = input format: safetensors stays safetensors (sharded stays
sharded, with its index), a ``.pt/.ckpt/.bin`` container keeps every other
entry (optimizer state, epoch, hyper-parameters) with only model tensors
clipped: a zip-format one is copied and only the storage records of clipped
tensors are rewritten in place (``data.pkl`` byte for byte, tied storages shared),
every copy of the weights (EMA and live) is clipped unless ``key`` names one.
``to="safetensors"`` converts. A DeepSpeed tag folder is rewritten with both copies
of the weights clipped (:mod:`auditclip.formats.deepspeed_writer`), so
``engine.load_checkpoint`` resumes from the clip. Inputs are only read; every output
is written to a temporary file and renamed into place.
"""

from __future__ import annotations

import math
import os
import struct
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd
import torch

from ._version import __version__
from .checkpoints import Checkpoint, open_run
from .clipping import CLIP_REPORT_COLUMNS, Kinds, clip_selected, inward
from .config import ClipSettings, ClipSpec
from .errors import CheckpointError, InputError
from .formats.deepspeed import (LATEST_FILE, DeepSpeedTensor, is_deepspeed_file, is_deepspeed_tag_folder, latest_tag,
                                 read_deepspeed_index)
from .formats.dcp import METADATA_FILE, DcpTensor, read_dcp_index
from .formats.dcp_writer import rewrite_dcp_folder
from .formats.deepspeed_writer import rewrite_deepspeed_tag
from .formats.detect import DCP_OPTIMIZER_FOLDER, HF_WEIGHT_NAMES, is_master_weights, is_trainer_state
from .modelref import ModelLoader
from .output import atomic_path
from .paths import is_inside, member
from .notices import note
from .formats.index import read_shard_index
from .formats.pinned import PinnedFile
from .formats.readers import open_checkpoint_file
from .formats.remote import is_url
from .formats.source import normalize_names
from .formats.torch_pickle import (load_torch_file, load_torch_meta, note_tied, storage_identity, tensor_slots, untie,
                                   weight_copies, zip_byteorder)
from .selection import name_filter
from .formats.torch_zip import ZipRecord, zip_records
from .formats.writers import (PROVENANCE_SUFFIX, copy_file, provenance_file, save_torch, sha256_file, write_json, write_patched_copy,
                               write_provenance, write_safetensors)


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
    if settings.buffers:
        parts.append("buffers")
    parts += [f"protect={p}" for p in settings.protect]
    parts += [f"include={p}" for p in settings.include] + [f"exclude={p}" for p in settings.exclude]
    return "; ".join(parts)


class _Clipper:
    """Applies the settings to tensors by clean name and collects report rows."""

    def __init__(self, settings: ClipSettings, label: str, siblings: frozenset[str] = frozenset(),
                 kinds: Kinds | None = None, adapter: dict[str, tuple[str, str]] | None = None) -> None:
        self.settings, self.label, self.siblings, self.kinds = settings, label, siblings, kinds
        self.adapter = adapter  # a PEFT adapter folder's kinds: its config names the LoRA factors
        self.keep = name_filter(settings.include, settings.exclude)
        self.rows: list[dict[str, Any]] = []

    def __call__(self, name: str, t: torch.Tensor, copy: str | None = None, inplace: bool = False) -> torch.Tensor:
        """Clip ``name`` as the settings select it; ``copy``: the container entry of a further
        copy of the weights (EMA, live weights), whose rows name the tensor ``COPY.name``;
        ``inplace``: ``t`` is a buffer of our own, clamped in it."""
        return self.clip(name, t, copy, inplace)[0]

    def clip(self, name: str, t: torch.Tensor, copy: str | None = None,
             inplace: bool = False) -> tuple[torch.Tensor, dict[str, Any] | None]:
        """:meth:`__call__`, also giving the report row (its ``lo``/``hi``), or None when not clipped."""
        clipped, row = clip_selected(name, t, self.settings, self.keep, self.kinds, siblings=self.siblings,
                                     adapter=self.adapter, inplace=inplace)
        if row is not None:
            if copy is not None:
                row = {**row, "tensor": f"{copy}.{row['tensor']}"}
            self.rows.append({"checkpoint": self.label, **row})
        return clipped, row

    def deepspeed(self, entry: DeepSpeedTensor, copies: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Clip one tensor of a DeepSpeed checkpoint in every copy it has (a :data:`Transform`).

        The fp32 master copy, where there is one, is clipped as the settings say (a percentile
        or sigma bound comes from it). In mixed precision the bound is then rounded inward to
        the module's dtype (bf16/fp16) for both copies: ``engine.load_checkpoint`` rounds the
        master to that dtype to rebuild the model, and a master value just inside an fp32
        bound could round out of it. The module copy is clamped to the same bound, except
        where the master's values were protected, so a resume and a plain read agree.
        """
        primary = "master" if "master" in copies else "module"
        before = copies[primary]
        after, row = self.clip(entry.name, before)
        if row is None or after is before or math.isnan(row["lo"]):
            return {}
        module = copies.get("module")
        if primary == "module" or module is None:
            return {primary: after}
        lo, hi = float(row["lo"]), float(row["hi"])
        protected = ((before < lo) | (before > hi)) & (after == before)
        lo_m, hi_m = inward(lo, module.dtype, down=False), inward(hi, module.dtype, down=True)
        if module.dtype != before.dtype:
            after = torch.where(protected, before, before.clamp(lo_m, hi_m))
            moved = (after != before) & ~before.isnan()
            report = self.rows[-1]  # the row self.clip appended: now the bound both copies share
            report.update(lo=lo_m, hi=hi_m, n_clipped=int(moved.sum()), frac_clipped=float(moved.sum()) / after.numel(),
                          abs_max_after=float(after.abs().nan_to_num(nan=0.0).max()))
        return {"master": after, "module": torch.where(protected, module, module.clamp(lo_m, hi_m))}


def _provenance(source: Path, settings: ClipSettings) -> dict[str, str]:
    return {"auditclip_source_sha256": sha256_file(source), "auditclip_spec": describe_settings(settings),
            "auditclip_version": __version__}


def _clip_safetensors(src: Path, dst: Path, clipper: _Clipper, dry_run: bool) -> None:
    with open_checkpoint_file(src) as reader:
        clean_of = {raw: clean for clean, raw in reader.name_map.items()}
        entries = []
        for clean, raw in reader.name_map.items():
            info = reader.info(clean)
            entries.append((raw, getattr(torch, info.dtype, None) if info.dtype.isidentifier() else None, info.shape,
                            info.dtype))

        def produce(raw: str) -> torch.Tensor | bytes:
            clean = clean_of[raw]
            if not reader.info(clean).is_float:  # integers, bools, sub-byte floats: the stored bytes
                return reader.raw_bytes(clean)
            return clipper(clean, reader.get(clean), inplace=True)  # get() reads into a fresh buffer: ours

        if dry_run:
            for raw, *_ in entries:
                produce(raw)
            return
        metadata = {**reader.metadata, **_provenance(src, clipper.settings)}
        write_safetensors(dst, [(raw, name, shape) for raw, _, shape, name in entries], produce, metadata)


Slots = list[tuple[Any, Any, str]]


def _copies_to_clip(obj: Any, path: Path, key: str | None) -> list[tuple[str | None, Slots]]:
    """(label, tensor slots) of every copy of the weights ``clip`` edits, the copy that is read first.

    Without ``key`` every copy (:func:`weight_copies`) is clipped with the same settings;
    the first is labelled None (its rows name tensors as stats.csv does), the others by
    their entry. With ``key`` only that entry is, and a note says the others were left as is.
    """
    copies = weight_copies(obj, path, key)
    chosen = copies[:1] if key is not None else copies
    if key is not None and len(copies) > 1:
        note(f"clip: only '{key}' (--key) was clipped; the other copies of the weights were left as is: "
             + ", ".join(str(e) for e, _ in copies[1:]))
    if key is None and len(copies) > 1:
        note("clip: every copy of the weights was clipped with the same settings: "
             + ", ".join(str(e) for e, _ in copies)
             + f" (clip_report.csv names the tensors of the others {copies[1][0]}.NAME)")
    out: list[tuple[str | None, Slots]] = []
    for i, (entry, state) in enumerate(chosen):
        if entry is None:  # a bare state dict: its top-level tensors (nested mappings are trainer state)
            slots = [(obj, k, str(k)) for k, v in obj.items() if isinstance(v, torch.Tensor)]
        else:
            slots = tensor_slots(state, path)
        out.append((None if i == 0 else entry, slots))
    return out


def _clip_torch(src: Path, dst: Path, clipper: _Clipper, key: str | None, to: str | None, dry_run: bool) -> None:
    """Clip a ``.pt/.ckpt/.bin``: a zip-format file record by record (:func:`_clip_torch_zip`),
    a legacy or big-endian one loaded and re-saved whole, ``to="safetensors"`` converted."""
    f = PinnedFile(src)
    try:
        zip_file = zip_byteorder(f) == "little"
    finally:
        f.close()
    if zip_file and to is None:
        _clip_torch_zip(src, dst, clipper, key, dry_run)
        return
    # re-saved whole (a legacy or big-endian file): placeholders could not be pickled back
    obj = load_torch_file(src, placeholders=to == "safetensors")
    copies = _copies_to_clip(obj, src, key)
    if to == "safetensors":
        label, slots = copies[0]
        if len(copies) > 1:
            note("--to safetensors writes one copy of the weights (the one read); left out: "
                 + ", ".join(str(e) for e, _ in copies[1:]))
        clean = normalize_names([raw for _, _, raw in slots])
        clean_of = {raw: c for c, raw in clean.items()}
        tensors = untie({clean_of[raw]: m[k] for m, k, raw in slots})
        produce = lambda name: clipper(name, tensors[name])  # noqa: E731
        if dry_run:
            for name in tensors:
                produce(name)
            return
        entries = [(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
        write_safetensors(dst, entries, produce, {"format": "pt", **_provenance(src, clipper.settings)})
        return
    done: dict[tuple[Any, ...], torch.Tensor] = {}  # a tied tensor is clipped once and stays shared
    for label, slots in copies:
        clean = normalize_names([raw for _, _, raw in slots])
        clean_of = {raw: c for c, raw in clean.items()}
        for mapping, k, raw in slots:
            ident = storage_identity(mapping[k], lazy=False)
            if ident is not None and ident in done:
                mapping[k] = done[ident]
                continue
            # a new tensor replaces the entry; the input file is never written to
            mapping[k] = clipper(clean_of[raw], mapping[k], label)
            if ident is not None:
                done[ident] = mapping[k]
    if not dry_run:
        save_torch(obj, dst)
        write_provenance(dst, _provenance(src, clipper.settings))


def _clip_torch_zip(src: Path, dst: Path, clipper: _Clipper, key: str | None, dry_run: bool) -> None:
    """Clip a zip-format torch file by rewriting only the storage records of clipped tensors.

    The output is a copy of the input in which each changed ``archive/data/<key>``
    record is overwritten in place (same size, same offset) and its CRC-32 updated
    in the central directory, local header and data descriptor. ``data.pkl`` (with
    any foreign objects, hyper-parameters, optimizer state) is kept byte for byte,
    tied tensors stay one storage, and the file keeps its size. One storage is held
    in memory at a time; each tensor is clipped in its view of the storage.
    """
    f = PinnedFile(src)
    try:
        obj, lazy = load_torch_meta(f)
        if not lazy:  # cannot happen for a little-endian zip file; the offsets below need meta tensors
            raise CheckpointError(src, "not a zip-format file with storage offsets")
        records = zip_records(f)
        plan: dict[int, list[tuple[str, str | None, torch.Tensor]]] = {}
        first: dict[tuple[Any, ...], str] = {}
        tied: list[tuple[str, str]] = []
        for label, slots in _copies_to_clip(obj, src, key):
            clean = normalize_names([raw for _, _, raw in slots])
            clean_of = {raw: c for c, raw in clean.items()}
            for mapping, k, raw in slots:
                t, name = mapping[k], clean_of[raw]
                ident = storage_identity(t, lazy=True)
                if ident is None:  # empty or not dense: nothing stored to clip
                    continue
                shown = name if label is None else f"{label}.{name}"
                if ident in first:
                    tied.append((shown, first[ident]))
                    continue
                first[ident] = shown
                if ident[0] not in records:
                    raise CheckpointError(src, f"tensor {raw!r}: its storage is not a stored record of the zip")
                plan.setdefault(ident[0], []).append((name, label, t))
        note_tied(tied)

        def patches() -> Iterator[tuple[int, bytes]]:
            for offset in sorted(plan):  # one storage in memory at a time
                record = records[offset]
                changed = _clip_record(f, record, plan[offset], clipper)
                if changed is None:
                    continue
                yield record.data, changed
                crc = struct.pack("<I", zlib.crc32(changed))
                yield from ((at, crc) for at in record.crc_at)

        if dry_run:
            for _ in patches():
                pass
            return
        with f.dup() as fh:  # the file opened and parsed above, not whatever the name points to now
            write_patched_copy(fh, dst, _checked(f, patches()))
        write_provenance(dst, _provenance(src, clipper.settings))
    finally:
        f.close()


def _checked(f: PinnedFile, patches: Iterator[tuple[int, bytes]]) -> Iterator[tuple[int, bytes]]:
    """``patches``, after checking that ``f`` did not change while it was copied."""
    f.check()
    yield from patches


def _clip_record(f: PinnedFile, record: ZipRecord, views: list[tuple[str, str | None, torch.Tensor]],
                 clipper: _Clipper) -> bytes | None:
    """Clip each tensor's view of one storage record; the new bytes, or None when nothing changed."""
    raw = bytearray(record.size)
    f.read_into(raw, record.data)
    before = bytes(raw)
    storage = torch.frombuffer(raw, dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
    for name, label, t in views:
        if record.size % t.dtype.itemsize:
            raise CheckpointError(f.path, f"tensor {name!r}: its storage of {record.size} bytes does not hold {t.dtype}")
        try:
            view = storage.view(t.dtype).as_strided(tuple(t.shape), tuple(t.stride()), t.storage_offset())
        except RuntimeError as exc:
            raise CheckpointError(f.path, f"tensor {name!r} reaches beyond its storage") from exc
        clipped = clipper(name, view, label)
        if clipped is not view:
            view.copy_(clipped)
    return None if raw == before else bytes(raw)


def _output(ckpt: Checkpoint, out: Path, to: str | None, root: Path | None = None) -> Path:
    """Where a checkpoint's clipped weights go (the run's layout, mirrored under ``out``)."""
    # a sharded checkpoint's shards are named in its index and land beside it;
    # the real relative path, not the label (which shows undecodable names escaped)
    rel = Path(os.path.relpath(ckpt.path.absolute(), root.absolute())) if root is not None else Path(ckpt.label)
    weights = ckpt.weights
    folder = ckpt.path.is_dir()
    base = out / rel / weights.name if folder else out / rel
    if to == "safetensors" and not weights.name.endswith((".safetensors", ".index.json")):
        # Hugging Face looks for model.safetensors, not pytorch_model.safetensors
        stem = "model" if weights.name == "pytorch_model.bin" else Path(base.name).stem
        base = base.with_name(stem + ".safetensors")
    return base



_COPIED_NOTE = ("optimizer/scheduler state copied as is ({}): it describes the unclipped weights (Adam moments "
                "stay valid as statistics); --drop-trainer-state leaves it out")
_DROPPED_NOTE = ("--drop-trainer-state: not copied: {} (resuming from the clipped run starts the optimizer, "
                 "scheduler and RNG afresh; trainer_state.json, the run's record, is kept)")
_REFACTORED_NOTE = ("--adapter-mode delta: the copied optimizer state holds the moments of the original LoRA "
                    "factors A and B; the refactored A', B' are another factorisation, whose coordinates those "
                    "moments do not describe: pass --drop-trainer-state to resume with a fresh optimizer")
_MASTER_NOTE = ("not copied: {} (DeepSpeed optimizer partitions hold the fp32 master weights, which a resume "
                "would load over the clipped weights)")


class _Extras(NamedTuple):
    """The other files of a checkpoint folder, as :func:`_extras` sorts them."""

    copy: list[Path]  # copied byte for byte beside the clipped weights
    state: list[Path]  # trainer state among ``copy``
    left: list[Path]  # trainer state left out (--drop-trainer-state, DeepSpeed master weights)
    notes: list[str]  # files not copied for another reason (a symlink out of the folder)


def _extras(ckpt: Checkpoint, drop_state: bool = False) -> _Extras:
    """The files of a checkpoint folder copied beside the clipped weights, and those that are not.

    Trainer state (optimizer, scheduler, RNG...: :func:`is_trainer_state`) is copied unless
    ``drop_state``; optimizer partitions holding DeepSpeed's fp32 master weights are not
    (they would restore the unclipped weights; a DeepSpeed tag folder is written by
    :func:`_clip_deepspeed`, not from here). A symlink pointing outside the folder is never copied as content.
    """
    found = _Extras([], [], [], [])
    if not ckpt.path.is_dir() or _deepspeed_tag(ckpt) == ckpt.path or (ckpt.format == "dcp" and
                                                                      ckpt.weights == ckpt.path):
        return found  # a DeepSpeed tag or DCP folder: its writer writes every file of it
    shards: set[str] = set()
    if ckpt.weights.name.endswith(".index.json"):
        shards = set(read_shard_index(ckpt.weights).shards)
    for extra in sorted(p for p in ckpt.path.iterdir() if p.is_file()):
        if extra.name in HF_WEIGHT_NAMES or extra.name in shards or _is_provenance(extra):
            continue  # the weights are written clipped; an input's provenance is replaced by the output's
        state = is_trainer_state(extra.name)
        if state and (drop_state or is_master_weights(extra.name)):
            found.left.append(extra)
            continue
        if extra.is_symlink() and not is_inside(extra, ckpt.path):
            found.notes.append(f"not copied: {ckpt.label}/{extra.name} is a symlink pointing outside the checkpoint")
            continue
        found.copy.append(extra)
        if state:
            found.state.append(extra)
    if ckpt.format == "dcp":  # accelerate's FSDP save_state: optimizer_<i>/ DCP folders beside the model's
        for folder in sorted(p for p in ckpt.path.iterdir() if p.is_dir() and DCP_OPTIMIZER_FOLDER.match(p.name)):
            files = sorted(p for p in folder.iterdir() if p.is_file() and not p.is_symlink())
            (found.left if drop_state else found.copy).extend(files)
            if not drop_state:
                found.state.extend(files)
    return found


#: Why clip refuses a ZeRO-0 bf16/fp16 checkpoint rather than write one whose resume undoes the clip.
_DEEPSPEED_ZERO0_REFUSED = (
    "clip does not write ZeRO-0 DeepSpeed checkpoints trained in {dtype}: their fp32 master weights are an unnamed "
    "list in the optimizer entry of {tag}/mp_rank_00_model_states.pt, which engine.load_checkpoint restores over "
    "the clipped weights; export the weights (torch.save(engine.module.state_dict(), ...)) and clip that file, or "
    "train with ZeRO stage 1-3, whose fp32 master copy clip writes")
#: DeepSpeed's consolidation scripts, saved beside the tag folders: copied with ``latest``.
_DEEPSPEED_SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")


def _deepspeed_tag(ckpt: Checkpoint) -> Path | None:
    """The DeepSpeed tag folder ``ckpt`` is (or lies in), by the names :mod:`auditclip.formats.deepspeed` knows; else None."""
    for path in (ckpt.weights, ckpt.path):
        if path.is_dir() and is_deepspeed_tag_folder(path):
            return path
        if is_deepspeed_file(path):
            return path.parent
    # discovery's word (a Trainer checkpoint-<N>/ or Lightning *.ckpt/ holding a tag folder...)
    return ckpt.weights if ckpt.format == "deepspeed" else None


def _planned_files(ckpt: Checkpoint, dst: Path, out: Path, drop_state: bool = False) -> list[Path]:
    """Every file clipping ``ckpt`` into ``dst`` writes; each must lie inside ``out``."""
    ckpt.check()  # what listing the run already found wrong (a broken or unsafe index...)
    files = [dst]
    tag = _deepspeed_tag(ckpt)
    if tag is not None:
        out_tag = _deepspeed_output(ckpt, tag, dst)
        files = [out_tag / p.name for p in sorted(tag.iterdir()) if p.is_file() and not _is_provenance(p)]
        files.append(provenance_file(out_tag / ckpt.weights.name))
    elif ckpt.format == "dcp":
        out_dcp = _dcp_output(ckpt, dst)
        files = [out_dcp / p.name for p in sorted(ckpt.weights.iterdir()) if p.is_file() and not _is_provenance(p)]
        files.append(provenance_file(out_dcp / METADATA_FILE))
    elif _has_provenance_file(dst):
        files.append(provenance_file(dst))
    if ckpt.weights.name.endswith(".index.json"):
        index = read_shard_index(ckpt.weights)
        files += [member(dst.parent, shard, source=ckpt.weights, what="output shard") for shard in sorted(index.shards)]
    files += [dst.parent / extra.relative_to(ckpt.path) for extra in _extras(ckpt, drop_state).copy]
    for path in files:
        if not is_inside(path, out):
            raise CheckpointError(ckpt.path, f"refused: its output {path} would lie outside --out {out}", kind="unsafe")
    return files


def _deepspeed_run_files(plans: list[tuple[Checkpoint, Path]], root: Path,
                         out: Path) -> tuple[dict[Path, Path | str], list[str]]:
    """The run-level files of the DeepSpeed runs being clipped: ``latest`` and the consolidation scripts.

    ``engine.load_checkpoint(dir)`` finds its tag through ``latest``: the clipped run gets
    the input's when that tag is clipped too, else (a glob picked some tags) the last
    clipped tag's name, with a note. A run folder outside the run root is not mirrored (a note says so).
    Returns the files (target: source file or text) and the notes.
    """
    tags: dict[Path, list[tuple[Checkpoint, Path]]] = {}
    for ckpt, dst in plans:
        tag = _deepspeed_tag(ckpt)
        # a tag folder inside a checkpoint folder (Trainer's checkpoint-N/global_stepN/) has its
        # latest beside it in that folder, copied with the folder's other files (_extras)
        if tag is not None and tag == ckpt.path:
            tags.setdefault(tag.parent, []).append((ckpt, tag))
    files: dict[Path, Path | str] = {}
    notes: list[str] = []
    for folder, clipped in tags.items():
        if not is_inside(folder, root):
            notes.append(f"{folder}: its latest file is not written with the clipped tags (the folder lies above the run "
                 f"root {root}); write it with the tag to resume from")
            continue
        target = out / os.path.relpath(folder.absolute(), root.absolute())
        names = [tag.name for _, tag in clipped]
        latest = latest_tag(folder)
        if latest in names:
            files[target / LATEST_FILE] = folder / LATEST_FILE
        else:
            files[target / LATEST_FILE] = names[-1]
            notes.append(f"{folder}: latest names {latest!r}, which is not clipped here; the clipped run's latest names "
                 f"{names[-1]}, the last tag clipped" if latest else
                 f"{folder}: no latest file; the clipped run's latest names {names[-1]}, the last tag clipped")
        for script in _DEEPSPEED_SCRIPTS:
            if (folder / script).is_file() and not (folder / script).is_symlink():
                files[target / script] = folder / script
    return files, notes


def _dcp_output(ckpt: Checkpoint, dst: Path) -> Path:
    """Where the clipped copy of a DCP folder goes: ``dst`` names it inside a checkpoint folder
    (accelerate's ``checkpoint_0/pytorch_model_fsdp_0/``); a folder that is the checkpoint is ``dst``'s folder."""
    return dst.parent if ckpt.weights == ckpt.path else dst


def _clip_dcp(ckpt: Checkpoint, dst: Path, settings: ClipSettings, key: str | None, model: ModelLoader | None,
              dry_run: bool) -> pd.DataFrame:
    """Clip the model tensors of a ``torch.distributed.checkpoint`` folder (:mod:`auditclip.formats.dcp_writer`).

    The model's tensors as :mod:`auditclip.formats.dcp` tells them from optimizer and training
    state (or the entry ``key`` names) are clipped in every rank's pieces; the optimizer
    state and every other entry are copied as they are, so ``dcp.load`` resumes.
    """
    index = read_dcp_index(ckpt.weights)
    if key is not None:
        where = {t.key[len(key) + 1:]: t.key for t in index.tensors.values() if t.key.startswith(key + ".")}
    else:
        where = {t.name: t.key for t in index.tensors.values() if t.role == "model"}
    kinds = model.kinds_at(sorted(where), str(ckpt.path)) if model is not None else None
    clipper = _Clipper(settings, ckpt.label, frozenset(where), kinds)
    name_of = {stored: name for name, stored in where.items()}

    def transform(entry: DcpTensor, full: torch.Tensor) -> torch.Tensor | None:
        clipped = clipper(name_of[entry.key], full)
        return None if clipped is full else clipped

    out = _dcp_output(ckpt, dst)
    written = rewrite_dcp_folder(index, out, list(where.values()), transform, dry_run)
    if written:
        write_provenance(out / METADATA_FILE, {
            "auditclip_source_sha256": {p.name: sha256_file(ckpt.weights / p.name) for p in written},
            "auditclip_spec": describe_settings(settings), "auditclip_version": __version__})
    return pd.DataFrame(clipper.rows, columns=list(CLIP_REPORT_COLUMNS))


def _has_provenance_file(dst: Path) -> bool:
    """Whether the clipped file ``dst`` gets its provenance beside it (torch pickles: no metadata of their own)."""
    return not dst.name.endswith((".safetensors", ".index.json"))


def _is_provenance(path: Path) -> bool:
    return path.name.endswith(PROVENANCE_SUFFIX)


def _deepspeed_output(ckpt: Checkpoint, tag: Path, dst: Path) -> Path:
    """Where the clipped copy of the tag folder goes: ``dst``'s folder stands for ``ckpt.path``."""
    return dst.parent / os.path.relpath(tag.absolute(), ckpt.path.absolute()) if tag != ckpt.path else dst.parent


def _clip_deepspeed(ckpt: Checkpoint, tag: Path, dst: Path, settings: ClipSettings, model: ModelLoader | None,
                    dry_run: bool) -> pd.DataFrame:
    """Clip a DeepSpeed tag folder: the fp32 master partitions and the module weights together.

    ``engine.load_checkpoint`` reloads the master copy over the module weights (ZeRO 1-3),
    so both are clipped (:mod:`auditclip.formats.deepspeed_writer`); the optimizer moments
    and every other entry are kept. The kinds DeepSpeed records (``buffer_names``) decide
    what a buffer is, unless a ``model`` says.
    """
    index = read_deepspeed_index(tag)
    if index.zero_stage == 0:
        half = sorted({e.module_dtype for e in index.tensors.values()
                       if e.role == "parameter" and e.module_dtype in ("bfloat16", "float16")})
        if half:
            raise CheckpointError(tag, _DEEPSPEED_ZERO0_REFUSED.format(dtype="/".join(half), run=tag.parent,
                                                                       tag=tag.name), kind="unsupported")
    clean = normalize_names(list(index.tensors))
    clean_of = {raw: c for c, raw in clean.items()}
    kinds = model.kinds_at(sorted(clean), str(ckpt.path)) if model is not None else None
    with ckpt.open() as reader:  # DeepSpeed's own record (buffer_names, param_shapes) of what each tensor is
        recorded = reader.format_kind_rules()
    clipper = _Clipper(settings, ckpt.label, frozenset(clean), kinds, None if model is not None else recorded)

    def transform(entry: DeepSpeedTensor, copies: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return clipper.deepspeed(replace(entry, name=clean_of[entry.name]), copies)  # rows name clean names

    out_tag = _deepspeed_output(ckpt, tag, dst)
    written = rewrite_deepspeed_tag(index, out_tag, transform, dry_run)
    if written:
        write_provenance(out_tag / ckpt.weights.name, {
            "auditclip_source_sha256": {p.name: sha256_file(tag / p.name) for p in written if (tag / p.name).is_file()},
            "auditclip_spec": describe_settings(settings), "auditclip_version": __version__})
    return pd.DataFrame(clipper.rows, columns=list(CLIP_REPORT_COLUMNS))


def _loader(model: str) -> ModelLoader:
    """``clip --model``: a factory, a .pt2 program, or ``hf`` (the checkpoint's config.json), as ``evaluate`` builds it."""
    if model == "hf":
        from .hf_models import HFModelLoader

        return HFModelLoader()
    return ModelLoader(model)


def clip_checkpoint(
    src: str | os.PathLike[str] | Checkpoint,
    dst: str | os.PathLike[str],
    specs: ClipSettings | ClipSpec | str,
    *,
    to: str | None = None,
    key: str | None = None,
    dry_run: bool = False,
    model: ModelLoader | None = None,
    adapter_mode: str = "factors",
) -> pd.DataFrame:
    """Clip one checkpoint into ``dst`` (a file; a folder for a sharded checkpoint's index).

    ``model``: a :class:`~auditclip.modelref.ModelLoader` whose ``named_buffers()`` decide
    what a buffer is (``clip --model``), as for the clipped variants of ``evaluate``.
    ``adapter_mode``: ``"delta"`` clips a PEFT LoRA folder's updates ΔW and refactors them
    (:func:`auditclip.adapters.clip_adapter_checkpoint`); ``"factors"`` clips A and B as weights.

    Returns the ``clip_report.csv`` rows for it. A sharded checkpoint's shards are
    written beside ``dst`` under the names its index gives (which must stay in that folder).

    ``specs``: :class:`ClipSettings`, a :class:`ClipSpec` or its text.

    >>> import tempfile
    >>> out = Path(tempfile.mkdtemp()) / "epoch_12.safetensors"
    >>> report = clip_checkpoint("sample_checkpoints/high_lr/epoch_12.safetensors", out, "max_abs=1")
    >>> int(report.n_clipped.sum()) > 0, out.is_file()
    (True, True)
    """
    if not isinstance(specs, ClipSettings):
        specs = ClipSettings(spec=specs if isinstance(specs, ClipSpec) else ClipSpec.parse(specs))
    ckpt = src if isinstance(src, Checkpoint) else open_run(src, key=key)[0]
    ckpt.check()
    if ckpt.format == "dcp":
        return _clip_dcp(ckpt, Path(dst), specs, key, model, dry_run)
    dst = Path(dst)
    tag = _deepspeed_tag(ckpt)
    if tag is not None:
        return _clip_deepspeed(ckpt, tag, dst, specs, model, dry_run)
    from .formats.peft import adapter_index_for

    adapter = adapter_index_for(ckpt.weights)
    if adapter_mode == "delta":  # a PEFT LoRA folder: clip each module's update, refactored (auditclip.adapters)
        from .adapters import clip_adapter_checkpoint

        if adapter is not None:
            return clip_adapter_checkpoint(ckpt.weights.parent, dst, specs, label=ckpt.label, dry_run=dry_run)
        note("--adapter-mode delta: checkpoints that are no PEFT adapter folder are clipped as ordinary weights")
    with ckpt.open(key) as reader:  # the names beside each tensor decide what weight_v is (kinds.py)
        siblings = frozenset(reader.names())
        recorded = reader.format_kind_rules()  # what the format itself says a tensor is
    kinds = model.kinds_at(sorted(siblings), str(ckpt.path)) if model is not None else None
    if adapter is not None:
        recorded = {**recorded, **adapter.kinds()}
    clipper = _Clipper(specs, ckpt.label, siblings, kinds, recorded or None)
    weights = ckpt.weights
    if weights.name.endswith(".index.json"):
        index = read_shard_index(weights)
        targets = {shard: member(dst.parent, shard, source=weights, what="output shard") for shard in index.shards}
        if not dry_run:
            dst.parent.mkdir(parents=True, exist_ok=True)
        for shard in sorted(index.shards):
            source, target = index.shards[shard], targets[shard]
            if not dry_run:
                target.parent.mkdir(parents=True, exist_ok=True)
            if shard.endswith(".safetensors"):
                _clip_safetensors(source, target, clipper, dry_run)
            else:
                _clip_torch(source, target, clipper, key, None, dry_run)
        if not dry_run:
            meta = dict(index.doc.get("metadata") or {})
            meta.update({"auditclip_spec": describe_settings(specs), "auditclip_version": __version__,
                         "auditclip_source_sha256": sha256_file(weights)})
            write_json({**index.doc, "metadata": meta}, dst)
        return pd.DataFrame(clipper.rows, columns=list(CLIP_REPORT_COLUMNS))
    if not dry_run:
        dst.parent.mkdir(parents=True, exist_ok=True)
    if weights.name.endswith(".safetensors"):
        _clip_safetensors(weights, dst, clipper, dry_run)
    else:
        _clip_torch(weights, dst, clipper, key, to, dry_run)
    return pd.DataFrame(clipper.rows, columns=list(CLIP_REPORT_COLUMNS))


def _input_folders(src: Any, run: Any) -> list[Path]:
    """The folders the inputs name: directories given, the fixed part of each glob, checkpoint folders.

    >>> [p.as_posix() for p in _input_folders(["runs/*/step_*.pt"], [])]
    ['runs']
    """
    import glob as globmod

    raw = [src] if isinstance(src, (str, os.PathLike)) else [] if hasattr(src, "checkpoints") else list(src)
    folders: list[Path] = []
    for item in map(os.fspath, raw):
        if Path(item).is_dir():
            folders.append(Path(item))
        elif globmod.has_magic(item):
            parts = Path(item).parts
            fixed = next(i for i, part in enumerate(parts) if globmod.has_magic(part))
            folders.append(Path(*parts[:fixed]) if fixed else Path("."))
    folders += [c.path for c in run if c.path.is_dir()]
    return list(dict.fromkeys(folders))


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
    model: str | None = None,
    drop_trainer_state: bool = False,
    adapter_mode: str = "factors",
) -> ClipResult:
    """Clip every checkpoint of a run into ``out``, mirroring the run's layout.

    The other files of a checkpoint folder (Hugging Face's config and tokenizer,
    ``trainer_state.json``) are copied byte for byte, and so is the trainer state
    (:func:`is_trainer_state`: optimizer, scheduler, RNG, sampler...), so the clipped
    folder resumes with ``Trainer.train(resume_from_checkpoint=...)`` or
    ``Accelerator.load_state``; a note says the optimizer state describes the
    unclipped weights. ``drop_trainer_state`` leaves that state out. A DeepSpeed tag
    folder is rewritten whole, its fp32 master partitions clipped with the module weights
    (:func:`_clip_deepspeed`), and the run's ``latest`` written, so
    ``engine.load_checkpoint`` resumes from the clip. Unreadable checkpoints, and those whose files name paths
    outside their folder, are listed in ``errors`` and skipped. Every file written
    lies inside ``out``; none exists already unless ``force``; no two checkpoints
    write the same file.

    >>> import tempfile
    >>> from auditclip.config import ClipSpec
    >>> result = clip_run("sample_checkpoints/high_lr", tempfile.mkdtemp(),
    ...                   ClipSettings(ClipSpec.parse("max_abs=1")))
    >>> len(result.written), result.report.checkpoint.nunique()
    (12, 12)
    """
    if to not in (None, "safetensors"):
        raise InputError(f"--to {to!r}: only safetensors is supported")
    # with a model, its named_buffers() decide what clipping leaves alone, as in evaluate
    loader = _loader(model) if model else None
    if is_url(os.fspath(out)):
        raise InputError(f"--out {os.fspath(out)}: clip_run writes a local folder; for a URL write into "
                         "auditclip.formats.remote.remote_output(URL), as the clip command does")
    run = open_run(src, sort=sort, key=key)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; give a directory for the clipped checkpoints")
    for folder in _input_folders(src, run):
        if is_inside(out, folder):
            raise InputError(f"--out {out} is inside the input {folder}; write the clipped run somewhere else")
    errors: list[dict[str, str]] = []
    plans: list[tuple[Checkpoint, Path]] = []
    owner: dict[Path, str] = {}
    inputs = {p.resolve() for c in run for p in (c.weights, c.path)}
    existing: list[Path] = []
    for ckpt in run:
        dst = _output(ckpt, out, to, run.root)
        try:
            files = _planned_files(ckpt, dst, out, drop_trainer_state)
        except CheckpointError as exc:
            errors.append(exc.row(ckpt.label))
            continue
        for path in files:
            resolved = path.resolve()
            if resolved in inputs:
                raise InputError(f"--out {out} would overwrite the input {path}; write the clipped run somewhere else")
            if resolved in owner:
                raise InputError(f"{owner[resolved]} and {ckpt.label} would both be written to {path}"
                                 + (" (--to safetensors gives them the same name)" if to else "")
                                 + "; clip them into separate --out folders")
            owner[resolved] = ckpt.label
            if path.exists() or path.is_symlink():
                existing.append(path)
        plans.append((ckpt, dst))
    run_files, _ = _deepspeed_run_files(plans, run.root, out)
    if run_files and drop_trainer_state:
        raise InputError("--drop-trainer-state: DeepSpeed keeps the fp32 master weights engine.load_checkpoint "
                         "restores in its optimizer files, so clip writes them (clipped) with the moments; run "
                         "without it, and resume with engine.load_checkpoint(dir, load_optimizer_states=False) "
                         "for a fresh optimizer")
    if drop_trainer_state and any(c.format == "dcp" and c.weights == c.path for c, _ in plans):
        raise InputError("--drop-trainer-state: a DCP folder keeps its optimizer state in the same storage files "
                         "as the weights (one .metadata indexes both), so clip keeps it; run without it, and load "
                         "only the model (dcp.load({'model': ...})) for a fresh optimizer")
    for path in run_files:
        if path.exists() or path.is_symlink():
            existing.append(path)
    if existing and not force and not dry_run:
        raise InputError(f"{existing[0]} already exists; pass --force to overwrite")
    reports: list[pd.DataFrame] = []
    result = ClipResult(report=pd.DataFrame(), errors=pd.DataFrame(), notes=list(run.notes))
    copied_state: set[str] = set()
    dropped_state: set[str] = set()
    master_weights: set[str] = set()
    clipped: list[tuple[Checkpoint, Path]] = []
    refactored = False  # trainer state copied beside LoRA factors that --adapter-mode delta refactored
    for ckpt, dst in plans:
        try:
            reports.append(clip_checkpoint(ckpt, dst, settings, to=to, key=key, dry_run=dry_run, model=loader,
                                           adapter_mode=adapter_mode))
            clipped.append((ckpt, dst))
            extras = _extras(ckpt, drop_trainer_state)
        except CheckpointError as exc:
            errors.append(exc.row(ckpt.label))
            continue
        result.notes += [n for n in extras.notes if n not in result.notes]
        copied_state.update(p.relative_to(ckpt.path).as_posix() for p in extras.state)
        if extras.state and adapter_mode == "delta" and not refactored:
            from .formats.peft import adapter_index_for

            refactored = adapter_index_for(ckpt.weights) is not None
        for p in extras.left:
            (master_weights if is_master_weights(p.name) else dropped_state).add(p.relative_to(ckpt.path).as_posix())
        if not dry_run:
            tag = _deepspeed_tag(ckpt)
            # what the writer wrote: the weights (every file of a DeepSpeed tag) and their provenance
            result.written += [p for p in _planned_files(ckpt, dst, out) if p.is_file()] \
                if tag is not None or ckpt.format == "dcp" \
                else [dst] + [p for p in (provenance_file(dst),) if _has_provenance_file(dst) and p.is_file()]
        for extra in extras.copy:
            if dry_run:
                continue
            # byte for byte, streamed, through a temporary file renamed into place like every output
            target = dst.parent / extra.relative_to(ckpt.path)
            target.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(target) as tmp:
                copy_file(extra, tmp)
            result.written.append(target)
    run_files, run_notes = _deepspeed_run_files(clipped, run.root, out)  # for the tags clipped, not those refused
    for text in run_notes:
        note(text)
    if not dry_run:
        for target, content in run_files.items():
            target.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(target) as tmp:
                if isinstance(content, Path):
                    copy_file(content, tmp)
                else:
                    tmp.write_text(content, encoding="utf-8")
            result.written.append(target)
    # one note per kind for the whole run, not one per checkpoint
    for template, names in ((_COPIED_NOTE, copied_state), (_DROPPED_NOTE, dropped_state),
                            (_MASTER_NOTE, master_weights)):
        if names:
            note(template.format(", ".join(sorted(names))))
    if refactored:
        note(_REFACTORED_NOTE)
    frames = [r for r in reports if len(r)]
    result.report = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(CLIP_REPORT_COLUMNS))
    order = {c.label: i for i, c in enumerate(run)}
    errors.sort(key=lambda e: order.get(e["checkpoint"], -1))
    result.errors = pd.DataFrame(errors, columns=["checkpoint", "error", "message"])
    return result
