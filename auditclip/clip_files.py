"""Clip whole checkpoints and runs into new files the user's framework still loads.

Output format = input format: safetensors stays safetensors (sharded stays
sharded, with its index), a ``.pt/.ckpt/.bin`` container keeps every other
entry (optimizer state, epoch, hyper-parameters) with only model tensors
clipped: a zip-format one is copied and only the storage records of clipped
tensors are rewritten in place (``data.pkl`` byte for byte, tied storages shared),
every copy of the weights (EMA and live) is clipped unless ``key`` names one.
``to="safetensors"`` converts. Inputs are only read; every output is
written to a temporary file and renamed into place.
"""

from __future__ import annotations

import os
import shutil
import struct
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd
import torch

from ._version import __version__
from .checkpoints import Checkpoint, open_run
from .clipping import CLIP_REPORT_COLUMNS, Kinds, clip_selected
from .config import ClipSettings, ClipSpec
from .errors import CheckpointError, InputError
from .formats.deepspeed import is_deepspeed_file, is_deepspeed_tag_folder
from .formats.detect import HF_WEIGHT_NAMES, is_master_weights, is_trainer_state
from .modelref import ModelLoader
from .output import atomic_path
from .paths import is_inside, member
from .notices import note
from .formats.readers import (PinnedFile, load_torch_meta, zip_byteorder, load_torch_file, normalize_names, note_tied,
                      open_checkpoint_file, read_shard_index, storage_identity, tensor_slots, untie, weight_copies)
from .selection import name_filter
from .formats.writers import save_torch, sha256_file, write_json, write_patched_copy, write_safetensors


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
        clipped, row = clip_selected(name, t, self.settings, self.keep, self.kinds, siblings=self.siblings,
                                     adapter=self.adapter, inplace=inplace)
        if row is not None:
            if copy is not None:
                row = {**row, "tensor": f"{copy}.{row['tensor']}"}
            self.rows.append({"checkpoint": self.label, **row})
        return clipped


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


class _Record(NamedTuple):
    """One stored (uncompressed) record of a zip file: where its data lies and where its CRC-32 is written."""

    name: str
    data: int  # offset of the first data byte
    size: int
    crc: int
    crc_at: tuple[int, ...]  # central directory entry, local header, data descriptor (where they hold it)


def _zip_records(f: PinnedFile) -> dict[int, _Record]:
    """The stored records of a zip-format torch file, by the offset of their data.

    The central directory is walked here (zipfile does not say where each entry lies)
    to find the CRC field of every record; its local header and data descriptor
    (torch's writer sets flag bit 3) hold the CRC too, or zero.
    """
    with f.dup() as fh, zipfile.ZipFile(fh) as z:
        infos, position = z.infolist(), z.start_dir
    records: dict[int, _Record] = {}
    for info in infos:
        head = f.read(position, 46)
        if head[:4] != b"PK\x01\x02":
            raise CheckpointError(f.path, "zip central directory is not where the file says")
        n, m, k = struct.unpack("<HHH", head[28:34])
        crc_at = [position + 16]
        position += 46 + n + m + k
        if info.compress_type != zipfile.ZIP_STORED:
            continue
        local = f.read(info.header_offset, 30)
        if local[:4] != b"PK\x03\x04":
            raise CheckpointError(f.path, f"zip record {info.filename} has no local header")
        data = info.header_offset + 30 + sum(struct.unpack("<HH", local[26:30]))
        if struct.unpack("<I", local[14:18])[0] == info.CRC:
            crc_at.append(info.header_offset + 14)
        end = data + info.compress_size
        if info.flag_bits & 0x08 and end + 8 <= f.size:
            descriptor = f.read(end, 8)
            at = end + 4 if descriptor[:4] == b"PK\x07\x08" else end
            if struct.unpack("<I", f.read(at, 4))[0] == info.CRC:
                crc_at.append(at)
        records[data] = _Record(info.filename, data, info.file_size, info.CRC, tuple(crc_at))
    return records


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
        records = _zip_records(f)
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
    finally:
        f.close()


def _checked(f: PinnedFile, patches: Iterator[tuple[int, bytes]]) -> Iterator[tuple[int, bytes]]:
    """``patches``, after checking that ``f`` did not change while it was copied."""
    f.check()
    yield from patches


def _clip_record(f: PinnedFile, record: _Record, views: list[tuple[str, str | None, torch.Tensor]],
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
    ``drop_state``; DeepSpeed's optimizer partitions never are (they would restore the
    unclipped master weights). A symlink pointing outside the folder is never copied as content.
    """
    found = _Extras([], [], [], [])
    if not ckpt.path.is_dir():
        return found
    shards: set[str] = set()
    if ckpt.weights.name.endswith(".index.json"):
        shards = set(read_shard_index(ckpt.weights).shards)
    for extra in sorted(p for p in ckpt.path.iterdir() if p.is_file()):
        if extra.name in HF_WEIGHT_NAMES or extra.name in shards:
            continue
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
    return found


#: Why clip refuses DeepSpeed checkpoints rather than write one whose resume undoes the clip.
_DEEPSPEED_REFUSED = (
    "clip does not write DeepSpeed checkpoints: engine.load_checkpoint restores the fp32 master weights from the "
    "optimizer states (zero_pp_rank_*_optim_states.pt; the optimizer entry at ZeRO-0 in bf16/fp16; at ZeRO-3 the "
    "only copy of the weights), so clipped module weights would be silently overwritten on resume; "
    "consolidate it with DeepSpeed's own script, saved in the run folder: cd {run} && python zero_to_fp32.py . "
    "OUTPUT_DIR --tag {tag}, then clip OUTPUT_DIR")


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
    if ckpt.weights.name.endswith(".index.json"):
        index = read_shard_index(ckpt.weights)
        files += [member(dst.parent, shard, source=ckpt.weights, what="output shard") for shard in sorted(index.shards)]
    files += [dst.parent / extra.name for extra in _extras(ckpt, drop_state).copy]
    for path in files:
        if not is_inside(path, out):
            raise CheckpointError(ckpt.path, f"refused: its output {path} would lie outside --out {out}", kind="unsafe")
    return files


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
    if ckpt.format == "dcp":  # read by formats.dcp; no DCP writer yet (never a half-written folder)
        raise CheckpointError(ckpt.weights, "clip does not write torch.distributed.checkpoint (DCP) folders yet; "
                                            "drift, flag, audit and inspect read them", kind="unsupported")
    tag = _deepspeed_tag(ckpt)
    if tag is not None:
        raise CheckpointError(tag, _DEEPSPEED_REFUSED.format(run=tag.parent, tag=tag.name), kind="unsupported")
    dst = Path(dst)
    from .formats.peft import adapter_index_for

    adapter = adapter_index_for(ckpt.weights)
    if adapter_mode == "delta":  # a PEFT LoRA folder: clip each module's update, refactored (auditclip.adapters)
        from .adapters import clip_adapter_checkpoint

        if adapter is not None:
            return clip_adapter_checkpoint(ckpt.weights.parent, dst, specs, label=ckpt.label, dry_run=dry_run)
        note("--adapter-mode delta: checkpoints that are no PEFT adapter folder are clipped as ordinary weights")
    with ckpt.open(key) as reader:  # the names beside each tensor decide what weight_v is (kinds.py)
        siblings = frozenset(reader.names())
    kinds = model.kinds_at(sorted(siblings), str(ckpt.path)) if model is not None else None
    clipper = _Clipper(specs, ckpt.label, siblings, kinds, adapter.kinds() if adapter is not None else None)
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
    unclipped weights. ``drop_trainer_state`` leaves that state out, and DeepSpeed's
    optimizer partitions (fp32 master weights a resume would load over the clipped
    weights) are never copied. Unreadable checkpoints, and those whose files name paths
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
    loader = ModelLoader(model) if model else None
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
    if existing and not force and not dry_run:
        raise InputError(f"{existing[0]} already exists; pass --force to overwrite")
    reports: list[pd.DataFrame] = []
    result = ClipResult(report=pd.DataFrame(), errors=pd.DataFrame(), notes=list(run.notes))
    copied_state: set[str] = set()
    dropped_state: set[str] = set()
    master_weights: set[str] = set()
    refactored = False  # trainer state copied beside LoRA factors that --adapter-mode delta refactored
    for ckpt, dst in plans:
        try:
            reports.append(clip_checkpoint(ckpt, dst, settings, to=to, key=key, dry_run=dry_run, model=loader,
                                           adapter_mode=adapter_mode))
            extras = _extras(ckpt, drop_trainer_state)
        except CheckpointError as exc:
            errors.append(exc.row(ckpt.label))
            continue
        result.notes += [n for n in extras.notes if n not in result.notes]
        copied_state.update(p.name for p in extras.state)
        if extras.state and adapter_mode == "delta" and not refactored:
            from .formats.peft import adapter_index_for

            refactored = adapter_index_for(ckpt.weights) is not None
        for p in extras.left:
            (master_weights if is_master_weights(p.name) else dropped_state).add(p.name)
        if not dry_run:
            result.written.append(dst)
        for extra in extras.copy:
            if dry_run:
                continue
            # byte for byte, streamed, through a temporary file renamed into place like every output
            target = dst.parent / extra.name
            with atomic_path(target) as tmp:
                shutil.copyfile(extra, tmp)
                shutil.copystat(extra, tmp, follow_symlinks=True)
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
