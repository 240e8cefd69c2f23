"""Rule and clipping settings from options, a TOML config file, or ``pyproject.toml``.

Settings are read from ``--config FILE`` or else the ``[tool.auditclip]`` table of
the nearest ``pyproject.toml`` (searched upward from the working directory);
command-line options win over both. Layout::

    [tool.auditclip]
    exclude = ["*.num_batches_tracked"]      # shared by flag and clip

    [tool.auditclip.flag]
    max_abs = 0.01                           # or range = "-0.01:0.01"
    zscore = 10
    jump = 5
    norm_growth = 3.0
    spike = 50
    fail_on = "error"

    [[tool.auditclip.flag.override]]         # later overrides win
    pattern = ["*.bias", "*norm*"]
    off = ["range"]

    [tool.auditclip.clip]
    max_abs = 0.01                           # or range / percentile / sigma
    protect_top = 1

    [[tool.auditclip.clip.override]]
    pattern = "*norm*"
    skip = true                              # a TOML boolean; false = the default spec

In a file given with ``--config`` the same tables may sit at the top level
(``[flag]``, ``[clip]``) or under ``[tool.auditclip]``. An unknown key or a bad
value (of the wrong type too: a boolean is never a number) is an error naming it.
"""

from __future__ import annotations

import math
import os
import tomllib
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from .errors import InputError
from .kinds import is_buffer

RULES = ("range", "nonfinite", "outlier", "jump", "norm_growth", "spike", "dead", "frozen")
SEVERITIES = ("error", "warning", "info")
FAIL_ON = ("error", "warning", "info", "never")


def parse_range(text: str, what: str = "--range") -> tuple[float, float]:
    """``"-0.01:0.01"`` -> ``(-0.01, 0.01)``; LO must be below HI.

    >>> parse_range("-0.01:0.01")
    (-0.01, 0.01)
    """
    parts = str(text).split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        lo, hi = float(parts[0]), float(parts[1])
    except ValueError:
        raise InputError(f"{what} {text!r}: expected LO:HI with two numbers, e.g. -0.01:0.01") from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo >= hi:
        raise InputError(f"{what} {text!r}: LO must be a finite number below HI")
    return lo, hi


def _not_bool(what: str, value: Any) -> None:
    if isinstance(value, bool):  # bool is an int in Python: max_abs = true would mean 1.0
        raise InputError(f"{what} {value!r}: expected a number, not a boolean")


def parse_bool(what: str, value: Any) -> bool:
    """A strict boolean: a real ``bool`` (TOML), or true/false, yes/no, 1/0 as text (any case).

    >>> parse_bool("skip", "False"), parse_bool("skip", True)
    (False, True)
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("true", "yes", "1"):
            return True
        if text in ("false", "no", "0"):
            return False
    raise InputError(f"{what} {value!r}: expected true or false")


def positive(what: str, value: Any) -> float:
    _not_bool(what, value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{what} {value!r}: expected a number") from None
    if not (math.isfinite(number) and number > 0):
        raise InputError(f"{what} {value!r}: must be a positive number")
    return number


def percentile_value(what: str, value: Any) -> float:
    _not_bool(what, value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{what} {value!r}: expected a number") from None
    if not 50 < number < 100:
        raise InputError(f"{what} {value!r}: must be between 50 and 100 (clip to the [100-P, P] percentiles)")
    return number


def _patterns(what: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise InputError(f"{what}: expected a glob or a list of globs")


# ---------------------------------------------------------------- clip specs

@dataclass(frozen=True)
class ClipSpec:
    """How one tensor is clipped: ``range``, ``max_abs``, ``percentile``, ``sigma`` or ``none``.

    >>> ClipSpec.parse("max_abs=0.01"), str(ClipSpec.parse("range=-1:2"))
    (ClipSpec(kind='max_abs', a=0.01, b=None), 'range=-1:2')
    """

    kind: str
    a: float | None = None
    b: float | None = None

    KINDS = ("range", "max_abs", "percentile", "sigma", "none")

    @classmethod
    def make(cls, kind: str, value: Any) -> ClipSpec:
        if kind == "range":
            lo, hi = parse_range(value, "range")
            return cls("range", lo, hi)
        if kind == "max_abs":
            return cls("max_abs", positive("max_abs", value))
        if kind == "percentile":
            return cls("percentile", percentile_value("percentile", value))
        if kind == "sigma":
            return cls("sigma", positive("sigma", value))
        if kind in ("none", "skip"):
            return cls("none")
        raise InputError(f"unknown clip spec {kind!r}; use one of range, max_abs, percentile, sigma, none")

    @classmethod
    def parse(cls, text: str) -> ClipSpec:
        """Parse ``KIND=VALUE`` (``max_abs=0.01``, ``range=-1:1``, ``percentile=99.9``, ``sigma=4``, ``none``)."""
        kind, _, value = str(text).partition("=")
        return cls.make(kind.strip(), value.strip())

    def __str__(self) -> str:
        if self.kind == "range":
            return f"range={self.a:g}:{self.b:g}"
        if self.kind == "none":
            return "none"
        return f"{self.kind}={self.a:g}"


# ---------------------------------------------------------------- flag settings

@dataclass(frozen=True)
class FlagRules:
    """Thresholds of the flag rules for one tensor (see ``auditclip flag --help``)."""

    range: tuple[float, float] | None = None
    zscore: float = 10.0
    jump: float = 5.0
    norm_growth: float | None = None
    spike: float = 50.0
    off: frozenset[str] = frozenset()

    def on(self, rule: str) -> bool:
        return rule not in self.off and (rule != "range" or self.range is not None) and (
            rule != "norm_growth" or self.norm_growth is not None)


def _flag_changes(where: str, table: Mapping[str, Any], allowed: set[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        if key not in allowed:
            raise InputError(f"unknown key {key!r} in {where}; known keys: {', '.join(sorted(allowed))}")
        what = f"--{key.replace('_', '-')}" if where == "options" else f"{where}: {key}"
        if key == "range":
            out["range"] = parse_range(value, what)
        elif key == "max_abs":
            c = positive(what, value)
            out["range"] = (-c, c)
        elif key in ("zscore", "jump", "spike", "norm_growth"):
            out[key] = positive(what, value)
        elif key == "off":
            rules = _patterns(what, value)
            unknown = [r for r in rules if r not in RULES or r == "nonfinite"]
            if unknown:
                raise InputError(f"{what}: unknown or mandatory rule {unknown[0]!r}; rules: {', '.join(RULES[2:] + ('range',))}")
            out["off"] = frozenset(rules)
    if "range" in table and "max_abs" in table:
        raise InputError(f"{where}: give range or max_abs, not both")
    return out


@dataclass
class FlagSettings:
    """Everything ``flag`` needs: default rules, per-pattern overrides, selection, fail level."""

    rules: FlagRules = field(default_factory=FlagRules)
    overrides: list[tuple[tuple[str, ...], dict[str, Any]]] = field(default_factory=list)
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    fail_on: str = "error"
    #: the config file these settings were read from ("" when none was in effect)
    source: str = ""
    #: also act on buffers (BatchNorm running statistics...); parameters only by default
    buffers: bool = False

    def rules_for(self, name: str, siblings: Collection[str] | None = None,
                  kinds: tuple[Collection[str], Collection[str]] | None = None) -> FlagRules:
        """The rules for one tensor: defaults, then every matching override in order.

        The range rule applies to parameters only unless ``buffers``: a WGAN gate on a
        critic with BatchNorm must not fail on its running variances.

        >>> s = FlagSettings(FlagRules(range=(-1, 1)), [(("*.bias",), {"off": frozenset({"range"})})])
        >>> s.rules_for("fc.bias").on("range"), s.rules_for("fc.weight").on("range")
        (False, True)
        >>> s.rules_for("bn.running_var").on("range")
        False

        ``kinds``: (parameter names, buffer names) where the file records them
        (:meth:`auditclip.formats.readers.TensorReader.format_kinds`); they decide the names they hold.

        >>> s.rules_for("scale", kinds=(set(), {"scale"})).on("range"), s.rules_for("scale").on("range")
        (False, True)
        """
        rules = self.rules
        for patterns, changes in self.overrides:
            if any(fnmatchcase(name, p) for p in patterns):
                rules = replace(rules, **changes)
        if not self.buffers and rules.range is not None and (
                name in kinds[1] if kinds is not None and (name in kinds[0] or name in kinds[1])
                else is_buffer(name, siblings)):
            rules = replace(rules, off=rules.off | {"range"})
        return rules


@dataclass
class ClipSettings:
    """Everything ``clip`` needs: a default spec, per-pattern specs, protection, selection."""

    spec: ClipSpec | None = None
    overrides: list[tuple[tuple[str, ...], ClipSpec]] = field(default_factory=list)
    protect: tuple[str, ...] = ()
    protect_top: int = 0
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    #: the config file these settings were read from ("" when none was in effect)
    source: str = ""
    #: also act on buffers (BatchNorm running statistics...); parameters only by default
    buffers: bool = False

    def spec_for(self, name: str) -> ClipSpec | None:
        """The spec of one tensor (None: leave it alone). Later overrides win.

        >>> s = ClipSettings(ClipSpec.parse("max_abs=0.01"), [(("*norm*",), ClipSpec("none"))])
        >>> str(s.spec_for("fc.weight")), s.spec_for("norm.weight")
        ('max_abs=0.01', None)
        """
        spec = self.spec
        for patterns, override in self.overrides:
            if any(fnmatchcase(name, p) for p in patterns):
                spec = override
        return None if spec is None or spec.kind == "none" else spec


_FLAG_KEYS = {"range", "max_abs", "zscore", "jump", "norm_growth", "spike", "off"}
_CLIP_SPEC_KEYS = {"range", "max_abs", "percentile", "sigma"}


def _clip_spec(where: str, table: Mapping[str, Any], text: bool = False) -> ClipSpec | None:
    """The spec a table sets, or None when it sets none (``skip = false`` sets none).

    ``skip`` must be a real boolean, or with ``text`` (command-line values) true/false.
    """
    given = [k for k in _CLIP_SPEC_KEYS if k in table]
    if "skip" in table:
        value = table["skip"]
        if not text and not isinstance(value, bool):
            raise InputError(f"{where}: skip {value!r}: expected true or false (a TOML boolean, unquoted)")
        if parse_bool(f"{where}: skip", value):
            given.append("skip")
    if len(given) > 1:
        raise InputError(f"{where}: give one clip spec per tensor, not {' and '.join(sorted(given))}")
    if not given:
        return None
    return ClipSpec("none") if given[0] == "skip" else ClipSpec.make(given[0], table[given[0]])


# ---------------------------------------------------------------- files

def find_pyproject(start: Path | None = None) -> Path | None:
    """The nearest ``pyproject.toml`` at or above ``start`` (default: the working directory)."""
    here = (start or Path.cwd()).absolute()
    for folder in (here, *here.parents):
        candidate = folder / "pyproject.toml"
        if candidate.is_file():
            return candidate
    return None


def load_table(
    config: str | os.PathLike[str] | None, start: Path | None = None, search: bool = True
) -> tuple[dict[str, Any], str]:
    """The auditclip table and where it came from (``{}`` when there is none).

    Without ``config``, the nearest ``pyproject.toml`` is used when ``search`` is true.
    """
    table, where, _ = _load(config, start, search)
    return table, where


def _load(
    config: str | os.PathLike[str] | None, start: Path | None, search: bool
) -> tuple[dict[str, Any], str, str]:
    """The auditclip table, where it came from (for messages) and the file in effect ("" if none)."""
    if config is not None:
        path = Path(config)
        if path.is_dir():
            raise InputError(f"--config {path}: is a directory; give a TOML file")
        if not path.is_file():
            raise InputError(f"--config {path}: no such file")
        doc = _read_toml(path)
        if "tool" in doc:
            table = _subtable(_subtable(doc, "tool", str(path)), "auditclip", f"{path} [tool]")
        else:
            table = doc
        return table, str(path), str(path)
    path = find_pyproject(start) if search else None
    if path is None:
        return {}, "", ""
    doc = _read_toml(path)
    table = _subtable(_subtable(doc, "tool", str(path)), "auditclip", f"{path} [tool]")
    return table, f"{path} [tool.auditclip]", str(path) if "auditclip" in doc.get("tool", {}) else ""


def _subtable(doc: Mapping[str, Any], key: str, where: str) -> dict[str, Any]:
    value = doc.get(key, {})
    if not isinstance(value, dict):
        raise InputError(f"{where}: {key} must be a table, not {_toml_type(value)} {value!r}")
    return dict(value)


def _toml_type(value: Any) -> str:
    """The TOML name of a parsed value's type, for messages."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return "a date/time"


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise InputError(f"cannot read config {path}: {exc}") from exc


def _section(table: Mapping[str, Any], name: str, where: str) -> tuple[dict[str, Any], tuple[str, ...], tuple[str, ...]]:
    unknown = set(table) - {"flag", "clip", "include", "exclude"}
    if unknown:
        raise InputError(f"unknown key {sorted(unknown)[0]!r} in {where}; known keys: clip, exclude, flag, include")
    section = table.get(name, {})
    if not isinstance(section, dict):
        raise InputError(f"{where}: {name} must be a table")
    include = _patterns(f"{where}: include", table.get("include", []))
    exclude = _patterns(f"{where}: exclude", table.get("exclude", []))
    return section, include, exclude


def _override_tables(section: Mapping[str, Any], where: str) -> list[tuple[tuple[str, ...], dict[str, Any]]]:
    out = []
    entries = section.get("override", [])
    if not isinstance(entries, list):
        raise InputError(f"{where}: override must be an array of tables ([[...override]] entries)")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise InputError(f"{where}: override {i + 1} must be a table with a pattern, not {_toml_type(entry)}")
        if "pattern" not in entry:
            raise InputError(f"{where}: override {i + 1} needs a pattern")
        patterns = _patterns(f"{where}: override {i + 1} pattern", entry["pattern"])
        out.append((patterns, {k: v for k, v in entry.items() if k != "pattern"}))
    return out


def parse_override(text: str) -> tuple[tuple[str, ...], dict[str, Any]]:
    """``'GLOB:key=value,key=value'`` from the command line (``off`` takes ``rule+rule``).

    Tensor names may hold ``:`` (DCGAN's ``main.pyramid:128:batchnorm.weight``), and so
    may values (``range=-1:1``): the pattern ends at the last ``:`` that starts a
    ``KEY=`` list.

    >>> parse_override("*.bias:max_abs=1,zscore=20")
    (('*.bias',), {'max_abs': '1', 'zscore': '20'})
    >>> parse_override("main.pyramid:128:batchnorm.weight:range=-1:1")
    (('main.pyramid:128:batchnorm.weight',), {'range': '-1:1'})
    """
    import re

    starts = [m.start() for m in re.finditer(r":(?=\s*[A-Za-z_]\w*\s*=)", text)]
    cut = starts[-1] if starts else text.find(":")
    pattern, sep, rest = (text[:cut], ":", text[cut + 1:]) if cut >= 0 else (text, "", "")
    pairs = [p for p in rest.split(",") if p.strip()]
    if not sep or not pattern or not pairs or any("=" not in p for p in pairs):
        raise InputError(f"--override {text!r}: expected GLOB:KEY=VALUE[,KEY=VALUE], e.g. '*.bias:max_abs=1'")
    changes: dict[str, Any] = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        key, value = key.strip(), value.strip()
        changes[key] = value.split("+") if key == "off" else value
    return (pattern,), changes


def flag_settings(
    config: str | os.PathLike[str] | None = None,
    options: Mapping[str, Any] | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    start: Path | None = None,
    search: bool = True,
) -> FlagSettings:
    """Merge the config file and command-line options into :class:`FlagSettings`.

    ``options`` holds command-line values (None = not given): ``range``, ``max_abs``,
    ``zscore``, ``jump``, ``norm_growth``, ``spike``, ``fail_on``, ``include``, ``exclude``.

    >>> flag_settings(options={"max_abs": 0.01}, start=Path("/")).rules.range
    (-0.01, 0.01)
    """
    table, source, path = _load(config, start, search)
    where = source or "config"
    section, include, exclude = _section(table, "flag", where)
    where_flag = f"{where} flag"
    base = {k: v for k, v in section.items() if k not in ("override", "fail_on", "buffers")}
    changes = _flag_changes(where_flag, base, _FLAG_KEYS)
    buffers = (options or {}).get("buffers") or section.get("buffers", False)
    if not isinstance(buffers, bool):
        raise InputError(f"{where_flag}: buffers {buffers!r}: expected true or false")
    fail_on = section.get("fail_on", "error")
    opts = {k: v for k, v in (options or {}).items() if v not in (None, ())}
    cli = {k: opts[k] for k in _FLAG_KEYS if k in opts}
    if "range" in cli and "max_abs" in cli:
        raise InputError("give --range or --max-abs, not both")
    if "range" in cli or "max_abs" in cli:
        changes.pop("range", None)
    changes.update(_flag_changes("options", cli, _FLAG_KEYS))
    fail_on = opts.get("fail_on", fail_on)
    if fail_on not in FAIL_ON:
        raise InputError(f"{where_flag}: fail_on {fail_on!r}: use one of {', '.join(FAIL_ON)}")
    override_list = [(p, _flag_changes(f"{where_flag} override", c, _FLAG_KEYS))
                     for p, c in _override_tables(section, where_flag)]
    override_list += [(p, _flag_changes(f"--override {p[0]}", c, _FLAG_KEYS)) for p, c in map(parse_override, overrides)]
    return FlagSettings(
        rules=FlagRules(**changes), overrides=override_list, fail_on=fail_on, buffers=buffers,
        include=tuple(opts.get("include", include)), exclude=tuple(opts.get("exclude", exclude)), source=path,
    )


def clip_settings(
    config: str | os.PathLike[str] | None = None,
    options: Mapping[str, Any] | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    start: Path | None = None,
    search: bool = True,
) -> ClipSettings:
    """Merge the config file and command-line options into :class:`ClipSettings`.

    ``options``: ``range``, ``max_abs``, ``percentile``, ``sigma``, ``protect``,
    ``protect_top``, ``include``, ``exclude`` (None = not given). Exactly one spec.

    >>> str(clip_settings(options={"percentile": 99.9}, start=Path("/")).spec)
    'percentile=99.9'
    """
    table, source, path = _load(config, start, search)
    where = f"{source or 'config'} clip"
    section, include, exclude = _section(table, "clip", where)
    allowed = _CLIP_SPEC_KEYS | {"override", "protect", "protect_top", "buffers"}
    for key in section:
        if key not in allowed:
            raise InputError(f"unknown key {key!r} in {where}; known keys: {', '.join(sorted(allowed))}")
    opts = {k: v for k, v in (options or {}).items() if v not in (None, ())}
    if sum(k in opts for k in _CLIP_SPEC_KEYS) > 1:
        raise InputError("give one of --range, --max-abs, --percentile, --sigma (per-pattern specs go in --override)")
    cli_spec = _clip_spec("options", {k: opts[k] for k in _CLIP_SPEC_KEYS if k in opts})
    spec = cli_spec or _clip_spec(where, section)
    # an override that sets no spec (skip = false, or nothing) gives its tensors the default spec
    unskipped = spec or ClipSpec("none")
    override_list: list[tuple[tuple[str, ...], ClipSpec]] = []
    for patterns, entry in _override_tables(section, where):
        unknown = set(entry) - _CLIP_SPEC_KEYS - {"skip"}
        if unknown:
            raise InputError(f"unknown key {sorted(unknown)[0]!r} in {where} override")
        override_list.append((patterns, _clip_spec(f"{where} override", entry) or unskipped))
    for patterns, entry in map(parse_override, overrides):
        unknown = set(entry) - _CLIP_SPEC_KEYS - {"skip"}
        if unknown:
            raise InputError(f"--override {patterns[0]}: unknown key {sorted(unknown)[0]!r} for clip")
        override_list.append((patterns, _clip_spec(f"--override {patterns[0]}", entry, text=True) or unskipped))
    if spec is None and all(s.kind == "none" for _, s in override_list):
        raise InputError("no clipping asked for: give --range, --max-abs, --percentile or --sigma (or a config)")
    protect_top = opts.get("protect_top", section.get("protect_top", 0))
    if isinstance(protect_top, bool) or not isinstance(protect_top, int) or protect_top < 0:
        raise InputError(f"{where}: protect_top {protect_top!r}: must be a whole number >= 0")
    buffers = opts.get("buffers") or section.get("buffers", False)
    if not isinstance(buffers, bool):
        raise InputError(f"{where}: buffers {buffers!r}: expected true or false")
    return ClipSettings(
        spec=spec, overrides=override_list, protect_top=protect_top, buffers=buffers,
        protect=tuple(opts.get("protect", ())) + _patterns(f"{where}: protect", section.get("protect", [])),
        include=tuple(opts.get("include", include)), exclude=tuple(opts.get("exclude", exclude)), source=path,
    )


def clip_variant(
    spec: str | ClipSpec,
    config: str | os.PathLike[str] | None = None,
    options: Mapping[str, Any] | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    start: Path | None = None,
    search: bool = True,
) -> ClipSettings:
    """The settings ``clip`` would use with ``spec`` given on its command line.

    One resolution for ``clip`` and for the clipped variants that ``evaluate``, ``sweep``
    and ``audit`` score: ``spec`` (``max_abs=0.01``...) takes the place of the config
    file's spec, and the file's include/exclude, overrides, protection and ``buffers``
    apply as they would to ``clip``. ``options``: ``include``, ``exclude``, ``buffers``,
    ``protect``, ``protect_top`` (None = not given).

    >>> s = clip_variant("max_abs=0.5", options={"exclude": ("fc.*",)}, search=False)
    >>> str(s.spec), s.exclude
    ('max_abs=0.5', ('fc.*',))
    """
    parsed = spec if isinstance(spec, ClipSpec) else ClipSpec.parse(spec)
    if parsed.kind == "none":
        raise InputError(f"--clip {spec}: a variant needs a bound (max_abs=C, range=LO:HI, percentile=P, sigma=K)")
    # the spec's own numbers, in full precision (str(spec) rounds them for display)
    value = f"{parsed.a!r}:{parsed.b!r}" if parsed.kind == "range" else repr(parsed.a)
    opts = {k: v for k, v in (options or {}).items() if k not in _CLIP_SPEC_KEYS}
    return clip_settings(config, {**opts, parsed.kind: value}, overrides, start=start, search=search)


_CLIP_ONLY_KEYS = {"percentile", "sigma", "skip"}
_FLAG_ONLY_KEYS = _FLAG_KEYS - _CLIP_SPEC_KEYS


def split_overrides(overrides: list[str] | tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``audit --override`` values as (the flag rules' part, the clip variants' part).

    A bound (``max_abs``, ``range``) means the same to both; ``off``, ``zscore``...
    are flag rules only, ``skip``, ``percentile``, ``sigma`` clip only. A key neither
    knows goes to both, so each says it is unknown.

    >>> split_overrides(["*norm*:off=range+outlier,skip=true", "*.bias:max_abs=1"])
    (('*norm*:off=range+outlier', '*.bias:max_abs=1'), ('*norm*:skip=true', '*.bias:max_abs=1'))
    """
    flag_part: list[str] = []
    clip_part: list[str] = []
    for text in overrides:
        (pattern,), changes = parse_override(text)
        for keep_out, side in ((_CLIP_ONLY_KEYS, flag_part), (_FLAG_ONLY_KEYS, clip_part)):
            pairs = [f"{k}={'+'.join(v) if isinstance(v, list) else v}" for k, v in changes.items() if k not in keep_out]
            if pairs:
                side.append(f"{pattern}:{','.join(pairs)}")
    return tuple(flag_part), tuple(clip_part)


def severity_at_least(severity: str, fail_on: str) -> bool:
    """True when a finding of ``severity`` fails a run with ``--fail-on fail_on``.

    >>> severity_at_least("warning", "error"), severity_at_least("error", "warning")
    (False, True)
    """
    if fail_on == "never":
        return False
    return SEVERITIES.index(severity) <= SEVERITIES.index(fail_on)


