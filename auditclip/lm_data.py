"""Held-out token data for language models: a mapping of ``input_ids`` (and friends), or texts.

Batches are ``(inputs, labels)`` with ``inputs`` a dict of ``[batch, tokens]`` tensors
(``input_ids``, ``attention_mask``, ``token_type_ids``...: every key of the file but
``labels``; the model is called with those its ``forward`` takes) and ``labels`` the
token targets. Without ``labels`` the targets are the input ids (next-token
prediction), with ``-100`` where the attention mask is 0. ``--limit`` counts sequences.

Texts come as a JSONL file (one JSON object per line with a ``text`` field, or a JSON
string), tokenised by the tokenizer saved with ``save_pretrained`` in ``--tokenizer
PATH`` (transformers' ``AutoTokenizer``, local files only: nothing is downloaded).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import InputError
from .lm import IGNORE_INDEX
from .notices import note

#: the key holding the token ids; a data file with it (and no ``--inputs-key``) is token data
TOKEN_KEY = "input_ids"
LABELS_KEY = "labels"
TEXT_FIELD = "text"


def is_token_mapping(doc: Mapping[str, Any], inputs_key: str) -> bool:
    """True when a data file holds token data: ``input_ids`` and no ``--inputs-key`` entry.

    >>> is_token_mapping({"input_ids": 0, "labels": 0}, "x"), is_token_mapping({"x": 0, "y": 0}, "x")
    (True, False)
    """
    return TOKEN_KEY in doc and inputs_key not in doc


def labels_from(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Targets of next-token prediction: the input ids, ``-100`` where the mask is 0.

    >>> labels_from(torch.tensor([[4, 5, 0]]), torch.tensor([[1, 1, 0]])).tolist()
    [[4, 5, -100]]
    """
    labels = input_ids.clone().long()
    if attention_mask is not None:
        labels[attention_mask == 0] = IGNORE_INDEX
    return labels


def token_batches(source: str, doc: Mapping[str, Any], batch_size: int) -> Callable[[], Iterable[tuple[Any, Any]]]:
    """Batches of a mapping holding ``input_ids`` ``[N, T]`` (optional ``labels``, ``attention_mask``...).

    >>> make = token_batches("d", {"input_ids": torch.ones(3, 4, dtype=torch.long),
    ...                            "labels": torch.ones(3, 4, dtype=torch.long)}, batch_size=2)
    >>> [(sorted(x), list(y.shape)) for x, y in make()]
    [(['input_ids'], [2, 4]), (['input_ids'], [1, 4])]
    """
    tensors: dict[str, torch.Tensor] = {}
    for key, value in doc.items():
        try:
            t = value if isinstance(value, torch.Tensor) else torch.as_tensor(value)
        except Exception as exc:
            raise InputError(f"--data {source}: {key!r} is not an array of numbers") from exc
        tensors[str(key)] = t
    ids = tensors[TOKEN_KEY]
    if ids.dim() != 2 or ids.is_floating_point():
        raise InputError(f"--data {source}: {TOKEN_KEY} of shape {list(ids.shape)} and dtype {ids.dtype}: "
                         "expected integer token ids [sequences, tokens]")
    for key, t in tensors.items():
        if t.dim() == 0 or t.shape[0] != ids.shape[0]:
            raise InputError(f"--data {source}: {key!r} of shape {list(t.shape)} does not have one row per "
                             f"sequence ({ids.shape[0]} in {TOKEN_KEY})")
    mask = tensors.get("attention_mask")
    labels = tensors.pop(LABELS_KEY, None)
    if labels is None:
        note(f"--data {source}: no {LABELS_KEY!r}: the targets are the input ids (next-token prediction), "
             "ignoring masked positions")
        labels = labels_from(ids, mask)
    elif labels.shape != ids.shape or labels.is_floating_point():
        raise InputError(f"--data {source}: labels of shape {list(labels.shape)} and dtype {labels.dtype}: "
                         f"expected integer token ids shaped like {TOKEN_KEY} {list(ids.shape)}")
    inputs = {k: (t.long() if k in (TOKEN_KEY, "attention_mask", "token_type_ids", "position_ids") else t)
              for k, t in tensors.items()}
    labels = labels.long()

    def batches() -> Iterable[tuple[Any, Any]]:
        for i in range(0, ids.shape[0], batch_size):
            yield {k: t[i:i + batch_size] for k, t in inputs.items()}, labels[i:i + batch_size]

    return batches


def read_texts(path: Path, source: str) -> list[str]:
    """The texts of a JSONL file: each line a JSON object with a ``text`` field, or a JSON string.

    >>> read_texts(Path("sample_checkpoints/tiny_lm_heldout.jsonl"), "d")[0].split()[:3]
    ['w85', 'w118', 'w109']
    """
    texts: list[str] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"--data {source}: cannot read it: {exc}") from exc
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except ValueError as exc:
            raise InputError(f"--data {source}: line {number} is not JSON: {exc}") from exc
        text = item.get(TEXT_FIELD) if isinstance(item, dict) else item
        if not isinstance(text, str):
            raise InputError(f"--data {source}: line {number}: expected a JSON object with a {TEXT_FIELD!r} "
                             "string, or a JSON string")
        texts.append(text)
    if not texts:
        raise InputError(f"--data {source}: no texts in it")
    return texts


def load_tokenizer(path: str) -> Any:
    """The tokenizer saved in folder ``path`` (``save_pretrained``), from local files only.

    >>> load_tokenizer("sample_checkpoints/tiny_lm_heldout.jsonl")
    Traceback (most recent call last):
    ...
    auditclip.errors.InputError: --tokenizer sample_checkpoints/tiny_lm_heldout.jsonl: not a folder (...)
    """
    if not Path(path).is_dir():
        raise InputError(f"--tokenizer {path}: not a folder (expected what tokenizer.save_pretrained writes)")
    try:
        from transformers import AutoTokenizer
    except ImportError as exc:
        raise InputError("--tokenizer needs transformers: pip install 'auditclip[hf]'") from exc
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:
        raise InputError(f"--tokenizer {path}: cannot load a tokenizer from it: {' '.join(str(exc).split())[:300]}") \
            from exc


def text_batches(source: str, path: Path, tokenizer_path: str | None,
                 batch_size: int) -> Callable[[], Iterable[tuple[Any, Any]]]:
    """Batches of a JSONL file of texts, tokenised once and padded per batch (masked padding).

    >>> text_batches("t.jsonl", Path("t.jsonl"), None, 8)
    Traceback (most recent call last):
    ...
    auditclip.errors.InputError: --data t.jsonl: a JSONL file of texts needs --tokenizer PATH (...)
    """
    if not tokenizer_path:
        raise InputError(f"--data {source}: a JSONL file of texts needs --tokenizer PATH (the folder a "
                         "tokenizer was saved to with save_pretrained, e.g. beside the checkpoints)")
    tokenizer = load_tokenizer(tokenizer_path)
    texts = read_texts(path, source)
    limit = getattr(tokenizer, "model_max_length", None)
    limit = limit if isinstance(limit, int) and limit < 1_000_000 else None
    encoded = [tokenizer(t, truncation=limit is not None, max_length=limit)["input_ids"] for t in texts]
    if limit is not None and any(len(e) >= limit for e in encoded):
        note(f"--data {source}: texts longer than the tokenizer's model_max_length {limit} are cut to it")
    if any(len(e) == 0 for e in encoded):
        raise InputError(f"--data {source}: a text gives no tokens")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0  # masked: never scored

    def batches() -> Iterable[tuple[Any, Any]]:
        for i in range(0, len(encoded), batch_size):
            rows = encoded[i:i + batch_size]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for j, r in enumerate(rows):
                ids[j, :len(r)] = torch.tensor(r, dtype=torch.long)
                mask[j, :len(r)] = 1
            yield {TOKEN_KEY: ids, "attention_mask": mask}, labels_from(ids, mask)

    return batches


def arrow_token_doc(path: Path, source: str) -> dict[str, Any] | None:
    """The columns of a ``datasets``-style Arrow/Parquet table with ``input_ids`` as ``[N, T]``
    tensors (every row the same length), or None when it has no ``input_ids`` column; needs pyarrow."""
    try:
        import pyarrow.parquet as pq
        import pyarrow as pa
    except ImportError as exc:
        raise InputError(f"--data {source}: reading Arrow/Parquet needs pyarrow (pip install pyarrow)") from exc
    if path.suffix.lower() == ".parquet":
        table = pq.read_table(str(path))
    else:
        with pa.memory_map(str(path)) as f:
            try:
                table = pa.ipc.open_stream(f).read_all()  # datasets' cache files are IPC streams
            except pa.ArrowInvalid:
                table = pa.ipc.open_file(f).read_all()
    if TOKEN_KEY not in table.column_names:
        return None
    doc: dict[str, Any] = {}
    for name in table.column_names:
        rows = table.column(name).to_pylist()
        if rows and isinstance(rows[0], list):
            widths = {len(r) for r in rows}
            if len(widths) != 1:
                raise InputError(f"--data {source}: column {name!r} holds sequences of {len(widths)} different "
                                 "lengths; pad them to one length (with an attention_mask) first")
            doc[name] = torch.tensor(rows)
    return doc
