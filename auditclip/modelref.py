"""Build the user's model and load a checkpoint's weights into it.

``--model`` is ``package.module:factory`` or ``path/to/file.py:factory`` (the
user's own code, imported as they would import it), or a ``torch.export``
program saved as ``.pt2`` whose parameters are swapped for the checkpoint's.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import InputError
from .notices import note
from .formats.source import normalize_names


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (at most 400 characters), for an error message.

    >>> one_line(ValueError("bad\\n   value"))
    'bad value'
    >>> one_line(KeyError())
    'KeyError'
    """
    return " ".join(str(exc).split())[:400] or type(exc).__name__


def raised(exc: BaseException) -> str:
    """What the user's code did, for a message: ``raised ValueError: ...`` or ``called sys.exit(3)``.

    >>> raised(ValueError("bad")), raised(SystemExit(3))
    ('raised ValueError: bad', 'called sys.exit(3) instead of returning')
    """
    if isinstance(exc, SystemExit):
        return f"called sys.exit({exc.code!r}) instead of returning"
    return f"raised {type(exc).__name__}: {one_line(exc)}"


def load_factory(ref: str, what: str = "--model") -> Callable[..., Any]:
    """The factory function a ``module:factory`` or ``file.py:factory`` reference names.

    >>> load_factory("sample_checkpoints/digits_mlp.py:make_model").__name__  # doctest: +SKIP
    'make_model'
    """
    module_part, sep, attr = ref.rpartition(":")
    if not sep or not module_part or not attr:
        raise InputError(f"{what} {ref!r}: expected package.module:factory, path/to/file.py:factory or a .pt2 file")
    try:
        if module_part.endswith(".py") or "/" in module_part or "\\" in module_part:
            path = Path(module_part)
            if not path.is_file():
                raise InputError(f"{what} {ref!r}: no such file {path}")
            name = f"auditclip_user_{abs(hash(str(path.resolve())))}"
            spec = importlib.util.spec_from_file_location(name, path)
            module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
            sys.path.insert(0, str(path.resolve().parent))  # so the file can import its neighbours
            try:
                spec.loader.exec_module(module)  # type: ignore[union-attr]
            finally:
                sys.path.remove(str(path.resolve().parent))
        else:
            module = importlib.import_module(module_part)
    except InputError:
        raise
    except BaseException as exc:  # the user's module may raise anything while importing
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise InputError(f"{what} {ref!r}: cannot import {module_part}: {type(exc).__name__}: {one_line(exc)}") from exc
    try:
        factory = getattr(module, attr, None)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # a module __getattr__ is the user's code too
        raise InputError(f"{what} {ref!r}: looking up {attr!r} in {module_part} {raised(exc)}") from exc
    if not callable(factory):
        raise InputError(f"{what} {ref!r}: {module_part} has no callable {attr!r}")
    return factory


class ModelLoader:
    """Makes a ready-to-run model for each checkpoint from a ``--model`` reference.

    >>> loader = ModelLoader("sample_checkpoints/digits_mlp.py:make_model")  # doctest: +SKIP
    >>> model = loader.load(state_dict, "run/epoch_12.safetensors")  # doctest: +SKIP
    """

    last_loaded: tuple[int, int] = (0, 0)

    def __init__(self, ref: str, *, strict: bool = True, strip_prefix: str | None = None,
                 add_prefix: str | None = None, device: torch.device | str = "cpu") -> None:
        self.ref, self.strict, self.device = ref, strict, torch.device(device)
        self.strip_prefix, self.add_prefix = strip_prefix, add_prefix
        self._model: torch.nn.Module | None = None
        if ref.endswith(".pt2"):
            path = Path(ref)
            if not path.is_file():
                raise InputError(f"--model {ref}: no such file")
            try:
                program = torch.export.load(str(path))
                self._model = program.module()
            except Exception as exc:
                raise InputError(f"--model {ref}: not a torch.export program: {one_line(exc)}") from exc
            self._factory = None
            self._per_checkpoint = False
        else:
            self._factory = load_factory(ref)
            try:
                params = inspect.signature(self._factory).parameters
            except (TypeError, ValueError):
                params = {}  # type: ignore[assignment]
            self._per_checkpoint = "checkpoint" in params

    def _build(self, checkpoint: str) -> torch.nn.Module:
        assert self._factory is not None
        try:
            model = self._factory(checkpoint=checkpoint) if self._per_checkpoint else self._factory()
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # the user's code may raise anything, SystemExit included
            raise InputError(f"--model {self.ref}: the factory {raised(exc)}") from exc
        if not isinstance(model, torch.nn.Module):
            raise InputError(f"--model {self.ref}: the factory returned a {type(model).__name__}, not a torch.nn.Module")
        return model

    def _rename_one(self, name: str) -> str:
        if self.strip_prefix and name.startswith(self.strip_prefix):
            name = name[len(self.strip_prefix):]
        return (self.add_prefix or "") + name

    def _rename(self, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {self._rename_one(name): t for name, t in state.items()}

    def kinds_at(self, names: list[str], path: str) -> tuple[frozenset[str], frozenset[str]]:
        """:meth:`kinds` for the checkpoint at ``path``, building the model first if no load did
        (``clip --model``: the model decides what a buffer is, as in ``evaluate``)."""
        self._model_for(path)
        return self.kinds(names)

    def kinds(self, names: list[str]) -> tuple[frozenset[str], frozenset[str]]:
        """(parameters, buffers) among the checkpoint's tensor ``names``, as the model says.

        By the model's ``named_parameters()`` / ``named_buffers()``, normalised like its
        state dict (``_orig_mod.``, ``module.``) and matched through ``--strip-prefix`` /
        ``--add-prefix``; tied parameters count under every name they have.
        A name the model lacks is in neither set (the name rule decides it).
        """
        model = self._model
        if model is None:
            return frozenset(), frozenset()
        clean_of = {raw: clean for clean, raw in normalize_names(list(model.state_dict())).items()}
        params = {clean_of.get(n, n) for n, _ in model.named_parameters(remove_duplicate=False)}
        buffers = {clean_of.get(n, n) for n, _ in model.named_buffers(remove_duplicate=False)}
        return (frozenset(n for n in names if self._rename_one(n) in params),
                frozenset(n for n in names if self._rename_one(n) in buffers))

    def _model_for(self, path: str) -> torch.nn.Module:
        """The model to load the checkpoint at ``path`` into: built once, or per checkpoint
        for a factory that takes ``checkpoint``."""
        if self._model is None or self._per_checkpoint:
            self._model = self._build(path)
        return self._model

    def load(self, state: Mapping[str, torch.Tensor], checkpoint: str, path: str | None = None) -> torch.nn.Module:
        """The model with ``state`` loaded, in eval mode on the chosen device.

        ``checkpoint`` names it in messages; ``path`` (its real path) is what a factory
        taking a ``checkpoint`` argument receives, so it can read ``config.json`` beside it
        from any working directory. ``last_loaded`` is (tensors loaded, tensors the model has).
        With ``--no-strict``, loading under half of the model's tensors is an error: the
        rest would keep their random initial values, and scoring that model would lie.
        A name the model ties to another (``lm_head.weight`` to the embedding) is filled by
        its partner: a checkpoint that stores the tied tensor once is complete.
        """
        model = self._model_for(path or checkpoint)
        self.last_loaded = self._load_into(model, state, checkpoint)
        model = unwrap(model.to(self.device))
        if self._factory is not None or getattr(self, "_is_hf", False):
            model.eval()  # an exported program was traced in its own mode; it refuses eval()
        return model

    def _load_into(self, model: torch.nn.Module, state: Mapping[str, torch.Tensor], checkpoint: str) -> tuple[int, int]:
        """Copy ``state`` into ``model``'s tensors in place (the model is built once and reused);
        (tensors loaded, tensors the model has)."""
        state = self._rename(state)
        # The model's own wrapper prefixes (torch.compile's _orig_mod., DataParallel/DDP's
        # module.) are dropped like the checkpoint's, so a factory may return either.
        raw_of = normalize_names(list(model.state_dict()))
        expected = set(raw_of)
        partners = tied_names(model, raw_of)
        given = set(state)
        missing = sorted(n for n in expected - given if not partners.get(n, frozenset()) & given)
        unexpected = sorted(given - expected)
        if self.strict and (missing or unexpected):
            raise InputError(_key_mismatch(checkpoint, missing, unexpected, expected, given))
        loaded = len(expected) - len(missing)
        if expected and 2 * loaded < len(expected):
            raise InputError(f"{checkpoint}: --no-strict would load only {loaded} of the model's {len(expected)} "
                             "tensors, leaving the rest at their initial values; the names do not line up "
                             f"({_key_mismatch(checkpoint, missing, unexpected, expected, given, strict=False).split('; ', 1)[1]})")
        chosen: dict[str, torch.Tensor] = {}
        for n, t in state.items():
            if n not in raw_of:
                continue
            first = next((p for p in sorted(partners.get(n, ())) if p in chosen), None)
            if first is not None:  # one storage, one copy: the first name given fills it
                if chosen[first].shape != t.shape or not torch.equal(chosen[first], t):
                    note(f"{checkpoint}: {n} and {first} differ in the checkpoint but the model ties them "
                         f"(one tensor); {first} is used")
                continue
            chosen[n] = t
        try:
            model.load_state_dict({raw_of[n]: t for n, t in chosen.items()}, strict=False)
        except RuntimeError as exc:
            raise InputError(f"{checkpoint}: the weights do not fit --model {self.ref}: {one_line(exc)}") from exc
        return loaded, len(expected)


def tied_names(model: torch.nn.Module, raw_of: Mapping[str, str] | None = None) -> dict[str, frozenset[str]]:
    """Each state-dict name the model ties to others (one tensor under several names), and those others.

    ``raw_of``: clean name -> the model's own name (:func:`auditclip.formats.readers.normalize_names`).

    >>> m = torch.nn.ModuleDict({"emb": torch.nn.Embedding(3, 2), "head": torch.nn.Linear(2, 3, bias=False)})
    >>> m.head.weight = m.emb.weight
    >>> tied_names(m)
    {'emb.weight': frozenset({'head.weight'}), 'head.weight': frozenset({'emb.weight'})}
    """
    raw_of = raw_of if raw_of is not None else {n: n for n in model.state_dict()}
    clean_of = {raw: clean for clean, raw in raw_of.items()}
    groups: dict[int, list[str]] = {}
    for raw, t in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(t), []).append(clean_of.get(raw, raw))
    return {n: frozenset(g) - {n} for g in groups.values() if len(g) > 1 for n in g}


def call_model(model: torch.nn.Module, inputs: Any, said: set[str] | None = None) -> Any:
    """Run ``model`` on a batch: a tensor positionally, a dict as keyword arguments, keeping
    only the keys its ``forward`` names (a ``token_type_ids`` a model lacks is left out, with a note).

    >>> call_model(torch.nn.Linear(2, 1, bias=False), torch.zeros(1, 2)).tolist()
    [[0.0]]
    """
    if not isinstance(inputs, dict):
        return model(inputs)
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return model(**inputs)
    named = {k: v for k, v in inputs.items() if k in params}
    if not named:  # a forward(**kwargs) or one taking none of these names: let it decide
        return model(**inputs)
    left = sorted(set(inputs) - set(named))
    if left and said is not None and tuple(left) not in said:
        said.add(tuple(left))  # type: ignore[arg-type]
        note(f"the model's forward takes no {', '.join(left)}; called without")
    return model(**named)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module that holds the weights, under ``torch.compile`` and DataParallel/DDP wrappers.

    A compiled module runs the same weights through a generated graph; compiling costs
    seconds to minutes per shape (a C++ toolchain on CPU) and the scores are the eager
    module's up to rounding, so evaluation runs the underlying ``_orig_mod`` eagerly.

    >>> unwrap(torch.nn.DataParallel(torch.nn.Linear(2, 1))).__class__.__name__
    'Linear'
    """
    while True:
        inner = getattr(model, "_orig_mod", None) if type(model).__name__ == "OptimizedModule" else None
        if inner is None and isinstance(model, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
            inner = model.module
        if not isinstance(inner, torch.nn.Module):
            return model
        note(f"the model is wrapped in {type(model).__name__}; evaluating the module it wraps "
             "(same weights, run eagerly)")
        model = inner


def _key_mismatch(checkpoint: str, missing: list[str], unexpected: list[str], expected: set[str], given: set[str],
                  strict: bool = True) -> str:
    def show(names: list[str]) -> str:
        return ", ".join(names[:5]) + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")

    parts = [f"{checkpoint}: state dict does not match the model"]
    if missing:
        parts.append(f"missing: {show(missing)}")
    if unexpected:
        parts.append(f"unexpected: {show(unexpected)}")
    hint = suggest_prefix(expected, given)
    if hint:
        parts.append(f"try {hint}")
    elif strict:
        parts.append("use --no-strict to load what matches")
    return "; ".join(parts)


def suggest_prefix(expected: set[str], given: set[str]) -> str | None:
    """An option that would make the names line up, if a common prefix explains the mismatch.

    >>> suggest_prefix({"fc.weight"}, {"model.fc.weight"})
    '--strip-prefix model.'
    >>> suggest_prefix({"net.fc.weight"}, {"fc.weight"})
    '--add-prefix net.'
    """
    for a, b, option in ((given, expected, "--strip-prefix"), (expected, given, "--add-prefix")):
        sample = next(iter(b), None)
        for longer in a:
            if sample and longer.endswith(sample) and longer != sample:
                prefix = longer[: len(longer) - len(sample)]
                if {n[len(prefix):] for n in a if n.startswith(prefix)} == b and all(n.startswith(prefix) for n in a):
                    return f"{option} {prefix}"
    return None
