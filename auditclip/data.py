"""Held-out data for re-evaluation: tensors in a file, a table, or the user's loader.

``--data`` is a ``.safetensors``, ``.pt`` or ``.npz`` file holding inputs and
targets (keys ``x``/``y`` by default), a CSV or Parquet table (``--target
COLUMN``, the other columns as float features), or ``module:factory`` returning
a ``Dataset``, a ``DataLoader`` or an iterable of ``(inputs, targets)`` batches.
Token data for language models (a file with ``input_ids``, a ``datasets``-style
Arrow/Parquet table, a JSONL file of texts with ``--tokenizer``): :mod:`auditclip.lm_data`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import InputError
from .modelref import one_line, load_factory, raised

Batch = tuple[Any, torch.Tensor]


@dataclass
class HeldOut:
    """Batches of (inputs, targets), re-iterable, cut to ``limit`` samples."""

    source: str
    make: Callable[[], Iterable[Batch]]
    limit: int | None = None

    def batches(self) -> Iterator[Batch]:
        seen = 0
        items = self._user("starting to read it", lambda: iter(self.make()))
        while True:
            item = self._user("reading a batch", lambda: next(items, _END))
            if item is _END:
                return
            if not isinstance(item, (tuple, list)) or len(item) < 2:
                raise InputError(f"--data {self.source}: batches must be (inputs, targets) pairs, got {type(item).__name__}")
            inputs, targets = item[0], _targets(self.source, item[1])
            if len(targets) == 0:
                continue
            if self.limit is not None:
                room = self.limit - seen
                if room <= 0:
                    return
                if len(targets) > room:
                    inputs = self._user("cutting a batch to --limit", lambda: _head(inputs, room))
                    targets = targets[:room]
            seen += len(targets)
            yield inputs, targets

    def _user(self, doing: str, step: Callable[[], Any]) -> Any:
        """Run a step that calls the user's code (a Dataset, a loader); what it raises becomes an InputError."""
        try:
            return step()
        except (KeyboardInterrupt, InputError):
            raise
        except BaseException as exc:  # SystemExit included
            raise InputError(f"--data {self.source}: while {doing}, the data {raised(exc)}") from exc


_END = object()


def _targets(source: str, value: Any) -> torch.Tensor:
    """A batch's targets as a tensor with a batch dimension."""
    try:
        targets = torch.as_tensor(value)
    except Exception as exc:
        raise InputError(f"--data {source}: a batch's targets ({type(value).__name__}) are not numbers; "
                         "return a tensor or array of numbers as the targets") from exc
    if targets.dim() == 0:
        raise InputError(f"--data {source}: a batch's targets are a single number; "
                         "expected one target per sample (shape [batch, ...])")
    return targets


def _head(inputs: Any, n: int) -> Any:
    if isinstance(inputs, dict):
        return {k: v[:n] for k, v in inputs.items()}
    return inputs[:n]


def _tensor_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> Callable[[], Iterable[Batch]]:
    return lambda: ((x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(y), batch_size))


def _pick(source: str, doc: Any, key: str, what: str) -> torch.Tensor:
    if key not in doc:
        keys = ", ".join(sorted(map(str, doc)))[:200]
        option = "--inputs-key" if what == "inputs" else "--targets-key"
        raise InputError(f"--data {source}: no {what} key {key!r} (keys: {keys}); choose one with {option}")
    value = doc[key]
    if not isinstance(value, torch.Tensor):
        try:
            value = torch.as_tensor(np.asarray(value))
        except Exception as exc:
            raise InputError(f"--data {source}: {what} {key!r} is a {type(doc[key]).__name__} that is not an array "
                             "of numbers; store a numeric tensor or array under it") from exc
    if value.dim() == 0:
        raise InputError(f"--data {source}: {what} {key!r} is a single number (a 0-d tensor); "
                         "expected one row per sample (shape [samples, ...])")
    return value


def load_data(
    ref: str,
    *,
    inputs_key: str = "x",
    targets_key: str = "y",
    target: str | None = None,
    batch_size: int = 256,
    limit: int | None = None,
    tokenizer: str | None = None,
) -> HeldOut:
    """Open ``--data`` as batches of (inputs, targets).

    ``tokenizer``: the folder of a saved tokenizer, for a ``.jsonl`` file of texts.

    >>> data = load_data("sample_checkpoints/digits_test.safetensors")  # doctest: +SKIP
    >>> x, y = next(data.batches()); x.shape  # doctest: +SKIP
    torch.Size([256, 64])
    """
    if batch_size < 1:
        raise InputError("--batch-size must be at least 1")
    path = Path(ref)
    suffix = path.suffix.lower()
    if tokenizer and suffix != ".jsonl":
        raise InputError(f"--tokenizer tokenises a JSONL file of texts; --data {ref} is not one (.jsonl)")
    if suffix in (".safetensors", ".pt", ".pth", ".npz", ".csv", ".parquet", ".jsonl", ".arrow") and not path.is_file():
        raise InputError(f"--data {ref}: no such file")
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            doc: Any = load_file(str(path))
        elif suffix in (".pt", ".pth"):
            doc = torch.load(path, map_location="cpu", weights_only=True)
        elif suffix == ".npz":
            doc = dict(np.load(path, allow_pickle=False))
        elif suffix == ".jsonl":
            from .lm_data import text_batches

            return HeldOut(ref, text_batches(ref, path, tokenizer, batch_size), limit)
        elif suffix in (".arrow", ".parquet") and target is None:
            from .lm_data import arrow_token_doc

            doc = arrow_token_doc(path, ref)
            if doc is None:
                return _table(ref, path, target, batch_size, limit)
        elif suffix in (".csv", ".parquet"):
            return _table(ref, path, target, batch_size, limit)
        else:
            return _factory_data(ref, batch_size, limit)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"--data {ref}: cannot read it: {one_line(exc)}") from exc
    if not isinstance(doc, dict):
        raise InputError(f"--data {ref}: expected a mapping of tensors, found {type(doc).__name__}")
    from .lm_data import is_token_mapping, token_batches

    if is_token_mapping(doc, inputs_key):
        return HeldOut(ref, token_batches(ref, doc, batch_size), limit)
    x, y = _pick(ref, doc, inputs_key, "inputs"), _pick(ref, doc, targets_key, "targets")
    if len(x) != len(y):
        raise InputError(f"--data {ref}: {len(x)} inputs but {len(y)} targets")
    x = x.float() if x.is_floating_point() else x
    return HeldOut(ref, _tensor_batches(x, y, batch_size), limit)


def _table(ref: str, path: Path, target: str | None, batch_size: int, limit: int | None) -> HeldOut:
    import pandas as pd

    df = pd.read_parquet(path) if path.suffix.lower() == ".parquet" else pd.read_csv(path)
    if target is None:
        raise InputError(f"--data {ref}: a table needs --target COLUMN (columns: {', '.join(map(str, df.columns[:12]))})")
    if target not in df.columns:
        raise InputError(f"--data {ref}: no column {target!r} (columns: {', '.join(map(str, df.columns[:12]))})")
    features = df.drop(columns=[target])
    non_numeric = [c for c in features.columns if not pd.api.types.is_numeric_dtype(features[c])]
    if non_numeric:
        raise InputError(f"--data {ref}: feature column {non_numeric[0]!r} is not numeric")
    x = torch.tensor(features.to_numpy(dtype=np.float32))
    column = df[target]
    if pd.api.types.is_integer_dtype(column) or pd.api.types.is_bool_dtype(column):
        y = torch.tensor(column.to_numpy(dtype=np.int64))
    elif pd.api.types.is_float_dtype(column):
        y = torch.tensor(column.to_numpy(dtype=np.float32))
    else:
        codes, _ = pd.factorize(column, sort=True)
        y = torch.tensor(codes.astype(np.int64))
    return HeldOut(ref, _tensor_batches(x, y, batch_size), limit)


def _factory_data(ref: str, batch_size: int, limit: int | None) -> HeldOut:
    factory = load_factory(ref, "--data")
    try:
        made = factory()
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # the user's code may raise anything, SystemExit included
        raise InputError(f"--data {ref}: the factory {raised(exc)}") from exc
    from torch.utils.data import DataLoader, Dataset

    if isinstance(made, Dataset) and not isinstance(made, torch.utils.data.IterableDataset):
        loader = DataLoader(made, batch_size=batch_size, shuffle=False)
        return HeldOut(ref, lambda: loader, limit)
    if isinstance(made, (DataLoader, Iterable)):
        try:
            one_shot = iter(made) is made
            items = list(made) if one_shot else []  # a one-shot iterator would be empty on the second checkpoint
        except KeyboardInterrupt:
            raise
        except BaseException as exc:
            raise InputError(f"--data {ref}: while reading what the factory returned, it {raised(exc)}") from exc
        return HeldOut(ref, (lambda: items) if one_shot else (lambda: made), limit)
    raise InputError(f"--data {ref}: the factory returned a {type(made).__name__}, not a Dataset, DataLoader or iterable")
