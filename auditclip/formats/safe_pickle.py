"""Read the tensors of a torch pickle that also carries foreign objects, running none of its code.

Real Lightning checkpoints pickle ``hyper_parameters`` holding ``argparse.Namespace``,
``pathlib.PosixPath``, dataclasses and enums, often defined in the training script
(``__main__``). ``torch.load(weights_only=True)`` refuses the whole file for them.
This module reads such a file anyway, with an unpickler in which a global can only
be obtained through one gate, :meth:`Unpickler.find_class`:

* the globals torch's own ``weights_only`` unpickler allows (tensor rebuild functions,
  storages, dtypes, ``OrderedDict``...) and those admitted with ``--allow-global``
  are the real objects, used under the same rules as torch's (``REDUCE`` only on
  them, ``BUILD`` only on tensors, ``OrderedDict`` and allowed types);
* a global from a module that is plainly code, not data (``os``, ``subprocess``,
  ``builtins``, ``importlib``, ``pickle``, ``socket``, ``ctypes``...; see
  :data:`DENIED_MODULES`) refuses the file at once (:class:`Refused`);
* every other global becomes an inert placeholder: a class made here, named like
  the global, whose construction (arguments, state, items) is recorded and never
  executed. No module is imported. Calling (``REDUCE``) a placeholder whose name
  is a function's (lower case: ``make_thing``, ``partial``, ``attrgetter``...)
  refuses the file, since building data does not need a call to a foreign function;
  the few known data reconstructors in :data:`DATA_RECONSTRUCTORS` (numpy's scalar
  and array rebuilders, ``copyreg._reconstructor``, ``functools.partial`` of a
  configured optimizer...) are recorded like classes.

The unpickler is the pure-Python one (``pickle._Unpickler``) with every opcode that
calls, builds or mutates an object replaced, so no path around the gate remains.
It is used as ``torch.load(..., weights_only=False, pickle_module=module)`` (see
:func:`pickle_module`): torch subclasses ``module.Unpickler`` and its ``find_class``
falls through to the gate here (only names containing ``Storage`` are answered by
torch itself, with its inert ``StorageType``), so torch still rebuilds the tensors
and records where their storages lie.
"""

from __future__ import annotations

import _compat_pickle
import pickle
import types
from collections import Counter, OrderedDict
from typing import Any

import torch

__all__ = ["DATA_RECONSTRUCTORS", "DENIED_MODULES", "Placeholder", "Refused", "Unpickler", "pickle_module"]

#: Top-level modules whose globals are code, not data: one of them in a pickle refuses the file.
DENIED_MODULES = frozenset({
    "os", "posix", "nt", "posixpath", "ntpath", "subprocess", "_posixsubprocess", "sys", "builtins",
    "__builtin__", "shutil", "importlib", "runpy", "socket", "ctypes", "_ctypes", "pickle", "_pickle",
    "marshal", "pty", "code", "codeop", "webbrowser", "multiprocessing", "io", "_io", "signal", "pdb",
    "timeit", "trace", "cProfile", "profile", "asyncio", "threading", "_thread", "platform", "ssl",
    "http", "urllib", "ftplib", "smtplib", "xmlrpc", "zipimport", "pkgutil", "site", "sysconfig",
    "tempfile", "glob", "pydoc", "dill", "cloudpickle", "types", "operator", "inspect",
    "gc", "weakref", "setuptools", "pip", "distutils", "cffi", "_operator", "posixshmem",
    "resource", "fcntl", "mmap", "select", "selectors", "_socket", "_ssl", "_winapi", "msvcrt", "winreg",
})

#: Lower-case globals that only make data (numpy's rebuilders, lower-case classes of the
#: standard library); a REDUCE on their placeholder is recorded, not refused.
DATA_RECONSTRUCTORS = frozenset({
    "copyreg._reconstructor",
    "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar",
    "numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct",
    "numpy.dtype", "numpy.ndarray",
    "datetime.datetime", "datetime.date", "datetime.time", "datetime.timedelta", "datetime.timezone",
    "collections.defaultdict", "collections.deque",
    # LightningCLI / Hydra configs keep partial(torch.optim.Adam, lr=...) in hyper-parameters;
    # a placeholder is never called, so recording it runs nothing
    "functools.partial",
})


class Refused(pickle.UnpicklingError):
    """The pickle needs something that is plainly code, not data; ``names`` lists the globals."""

    def __init__(self, message: str, names: list[str]) -> None:
        super().__init__(message)
        self.names = names


class Placeholder:
    """An object a pickle described but that was never built: its global and what it was given.

    ``args``/``kwargs`` are the constructor arguments the pickle passed, ``state`` what
    ``BUILD`` would have set, ``items``/``elements`` what it would have stored in it.

    >>> stub = _placeholder_class("__main__", "Config")
    >>> obj = _make(stub, (3,), {})
    >>> obj
    <placeholder __main__.Config(3)>
    """

    global_name = "?"
    is_function = False

    def __init__(self) -> None:  # never called by the unpickler: instances come from _make
        self.args: tuple[Any, ...] = ()
        self.kwargs: dict[str, Any] = {}
        self.state: Any = None
        self.items: dict[Any, Any] = {}
        self.elements: list[Any] = []

    def __repr__(self) -> str:
        args = ", ".join(repr(a) for a in self.args[:4]) + (", ..." if len(self.args) > 4 else "")
        return f"<placeholder {self.global_name}({args})>"


def _make(cls: type[Placeholder], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Placeholder:
    obj = object.__new__(cls)
    obj.args, obj.kwargs, obj.state, obj.items, obj.elements = tuple(args), dict(kwargs), None, {}, []
    return obj


def _is_function_name(name: str) -> bool:
    """A global named like a function (``make_thing``, ``Foo.bar``), not a class (``Config``)."""
    last = name.rsplit(".", 1)[-1].lstrip("_")
    return not last[:1].isupper()


def _placeholder_class(module: str, name: str) -> type[Placeholder]:
    full = f"{module}.{name}"
    return type(name.rsplit(".", 1)[-1] or "_", (Placeholder,), {
        "global_name": full, "is_function": _is_function_name(name) and full not in DATA_RECONSTRUCTORS,
        "__module__": __name__, "__qualname__": f"Placeholder[{full}]",
    })


def _allowed() -> dict[str, Any]:
    """The globals torch's weights_only unpickler allows, plus those admitted by the user."""
    from torch import _weights_only_unpickler as wo

    return {**wo._get_allowed_globals(), **wo._get_user_allowed_globals()}


_BUILDABLE = (torch.Tensor, OrderedDict, Counter)


class Unpickler(pickle._Unpickler):  # type: ignore[name-defined,misc]
    """The gated unpickler; after ``load``, ``stubbed`` lists the globals made placeholders."""

    dispatch = dict(pickle._Unpickler.dispatch)  # type: ignore[attr-defined]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._allowed = _allowed()
        self._real = {id(v) for v in self._allowed.values()}
        self._stubs: dict[str, type[Placeholder]] = {}
        self.stubbed: list[str] = []

    # -- the gate ---------------------------------------------------------------------------
    def find_class(self, module: str, name: str) -> Any:
        if type(module) is not str or type(name) is not str:
            raise Refused("a global with a non-text name", [repr((module, name))])
        if self.proto < 3 and self.fix_imports:  # protocol 2 writes Python 2 names (__builtin__, commands...)
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
        full = f"{module}.{name}"
        if full in self._allowed:
            return self._allowed[full]
        if module.split(".", 1)[0] in DENIED_MODULES:
            raise Refused(f"the pickle asks for {full}, which is code, not data", [full])
        if full not in self._stubs:
            self._stubs[full] = _placeholder_class(module, name)
            self.stubbed.append(full)
        return self._stubs[full]

    # -- every opcode that calls, builds or mutates goes through these ---------------------
    def _is_real(self, obj: Any) -> bool:
        return id(obj) in self._real

    def _call(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> Any:
        """REDUCE / INST / OBJ: an allowed callable is called; a placeholder class records."""
        if isinstance(func, type) and issubclass(func, Placeholder):
            if func.is_function:
                raise Refused(f"the pickle calls {func.global_name}, a function, not data", [func.global_name])
            return _make(func, args, kwargs or {})
        if self._is_real(func) and not kwargs:
            return func(*args)
        raise Refused(f"the pickle calls {_describe(func)}, which is not an allowed global", [_describe(func)])

    def _new(self, cls: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """NEWOBJ / NEWOBJ_EX: ``cls.__new__`` of an allowed class, or a recorded placeholder."""
        if isinstance(cls, type) and issubclass(cls, Placeholder):
            return _make(cls, args, kwargs)
        if cls is torch.nn.Parameter and not kwargs:
            return torch.nn.Parameter(*args)
        if isinstance(cls, type) and self._is_real(cls) and not kwargs:  # torch's unpickler has no NEWOBJ_EX
            return cls.__new__(cls, *args)
        raise Refused(f"the pickle creates {_describe(cls)}, which is not an allowed class", [_describe(cls)])

    def load_reduce(self) -> None:
        args = self.stack.pop()
        self.stack[-1] = self._call(self.stack[-1], tuple(args))

    dispatch[pickle.REDUCE[0]] = load_reduce

    def _instantiate(self, klass: Any, args: list[Any]) -> None:
        self.append(self._call(klass, tuple(args)))

    def load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._new(cls, tuple(args), {}))

    dispatch[pickle.NEWOBJ[0]] = load_newobj

    def load_newobj_ex(self) -> None:
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._new(cls, tuple(args), dict(kwargs)))

    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex

    def load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, Placeholder):
            inst.state = state
            return
        kind = type(inst)
        if kind is torch.Tensor:  # legacy tensors: what torch's weights_only unpickler does
            inst.set_(*state)
        elif kind is torch.nn.Parameter:
            inst.__setstate__(state)
        elif kind in _BUILDABLE or (self._is_real(kind) and not isinstance(inst, type)):
            setstate = getattr(inst, "__setstate__", None)
            if setstate is not None and kind not in (OrderedDict, Counter):
                setstate(state)
                return
            slotstate = None
            if isinstance(state, tuple) and len(state) == 2:
                state, slotstate = state
            if state:
                inst.__dict__.update(state)
            for k, v in (slotstate or {}).items():
                setattr(inst, k, v)
        else:
            raise Refused(f"the pickle sets the state of {_describe(inst)}, which is not allowed", [_describe(kind)])

    dispatch[pickle.BUILD[0]] = load_build

    def _container(self, kinds: tuple[type, ...]) -> Any:
        target = self.stack[-1]
        if type(target) in kinds or isinstance(target, Placeholder):
            return target
        raise Refused(f"the pickle fills {_describe(target)}, which is not a plain container", [_describe(type(target))])

    def load_append(self) -> None:
        value = self.stack.pop()
        target = self._container((list,))
        (target.elements if isinstance(target, Placeholder) else target).append(value)

    dispatch[pickle.APPEND[0]] = load_append

    def load_appends(self) -> None:
        items = self.pop_mark()
        target = self._container((list,))
        (target.elements if isinstance(target, Placeholder) else target).extend(items)

    dispatch[pickle.APPENDS[0]] = load_appends

    def load_setitem(self) -> None:
        value = self.stack.pop()
        key = self.stack.pop()
        target = self._container((dict, OrderedDict, Counter))
        (target.items if isinstance(target, Placeholder) else target)[key] = value

    dispatch[pickle.SETITEM[0]] = load_setitem

    def load_setitems(self) -> None:
        items = self.pop_mark()
        target = self._container((dict, OrderedDict, Counter))
        store = target.items if isinstance(target, Placeholder) else target
        for i in range(0, len(items), 2):
            store[items[i]] = items[i + 1]

    dispatch[pickle.SETITEMS[0]] = load_setitems

    def load_additems(self) -> None:
        items = self.pop_mark()
        target = self._container((set,))
        (target.elements.extend if isinstance(target, Placeholder) else target.update)(items)

    dispatch[pickle.ADDITEMS[0]] = load_additems


def _describe(obj: Any) -> str:
    if isinstance(obj, type) and issubclass(obj, Placeholder):
        return obj.global_name
    if isinstance(obj, Placeholder):
        return f"a {obj.global_name} placeholder"
    name = getattr(obj, "__qualname__", None) or type(obj).__qualname__
    return f"{getattr(obj, '__module__', None) or type(obj).__module__}.{name}"


def pickle_module() -> tuple[types.ModuleType, list[list[str]]]:
    """A fresh ``pickle_module`` for ``torch.load`` and the list its unpicklers report into.

    After a load, each unpickler torch made has appended its ``stubbed`` list (the
    globals made placeholders, in order of first use).

    >>> import io, argparse
    >>> buf = io.BytesIO()
    >>> torch.save({"w": torch.ones(2), "args": argparse.Namespace(lr=0.1)}, buf)
    >>> _ = buf.seek(0)
    >>> module, stubbed = pickle_module()
    >>> obj = torch.load(buf, weights_only=False, pickle_module=module)
    >>> obj["w"].tolist(), obj["args"].state, stubbed
    ([1.0, 1.0], {'lr': 0.1}, [['argparse.Namespace']])
    """
    reports: list[list[str]] = []

    class _Reporting(Unpickler):
        def load(self) -> Any:
            reports.append(self.stubbed)
            return super().load()

    module = types.ModuleType("auditclip_safe_pickle")
    module.Unpickler = _Reporting  # type: ignore[attr-defined]
    return module, reports
