"""Writing results safely: every file appears complete or not at all.

A file is written under a temporary name beside it, ``.NAME.auditclip-HOST-PID-XXXXXXXX.tmp``,
and renamed into place once complete. An error, Ctrl-C or SIGTERM removes the temporary
file; one left by a process that could not clean up (SIGKILL, power loss) is recognised
by its name and removed by the next run writing into that folder, once the process
that wrote it is gone. An OSError while writing (disk full, quota, read-only) becomes
an :class:`OutputError` naming the file and the reason.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import pandas as pd

from .errors import AuditclipError, InputError


class OutputError(AuditclipError):
    """A result could not be written (disk full, no permission...); nothing partial was left."""


def _host() -> str:
    host = re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())[:32]
    return host or "localhost"


_HOST = _host()
# .NAME.auditclip-HOST-PID-RANDOM.tmp, RANDOM from tempfile.mkstemp
_TEMP = re.compile(r"\..*\.auditclip-(?P<host>[A-Za-z0-9_]+)-(?P<pid>[0-9]{1,10})-[a-z0-9_]+\.tmp", re.S)
_swept: set[str] = set()


def _temp_prefix(final: Path) -> str:
    name = final.name
    while len(os.fsencode(name)) > 120:  # room for the rest within the 255 bytes a file name may have
        name = name[:-1]
    return f".{name}.auditclip-{_HOST}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    """Whether process ``pid`` may still be running (when unsure: yes)."""
    if os.name == "nt" or pid <= 0:  # on Windows os.kill(pid, 0) would end the process
        return True
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # PermissionError: alive, another user's
        return True
    return True


def remove_stale_temp_files(folder: str | os.PathLike[str]) -> list[Path]:
    """Remove the temporary files that dead auditclip processes of this host left in ``folder``.

    Only regular files named like auditclip's temporary files, written by a process
    of this host that is no longer running, are removed; nothing else is touched.
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP.fullmatch(entry.name)
        if m is None or m["host"] != _HOST or _alive(int(m["pid"])):
            continue
        try:
            if entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            continue
    return removed


def _sweep_once(folder: Path) -> None:
    """:func:`remove_stale_temp_files` on the first write of this process into ``folder``."""
    key = os.path.abspath(folder)
    if key not in _swept:
        _swept.add(key)
        remove_stale_temp_files(folder)


def _cannot_write(final: Path, tmp: Path, exc: OSError) -> str:
    reason = exc.strerror or str(exc) or type(exc).__name__
    if exc.filename is not None and os.fspath(exc.filename) not in (str(tmp), str(final)):
        reason += f": {exc.filename}"
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        reason += "; free some space or choose another --out"
    elif exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        reason += "; choose another --out"
    return f"cannot write {final}: {reason}"


def _umask() -> int:
    """The process umask (read by setting it and putting it back: there is no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it into place only on success.

    A failure, Ctrl-C or SIGTERM inside the block removes the temporary file and leaves
    any earlier ``final`` untouched; an OSError becomes an :class:`OutputError`.

    >>> with atomic_path("report/stats.csv") as tmp:  # doctest: +SKIP
    ...     tmp.write_text("a,b\\n")
    """
    final = Path(final)
    _sweep_once(final.parent)
    try:
        fd, name = tempfile.mkstemp(prefix=_temp_prefix(final), suffix=".tmp", dir=final.parent)
    except OSError as exc:
        raise InputError(f"cannot write in {final.parent}: {exc.strerror or exc}; choose another --out") from exc
    tmp = Path(name)
    try:
        # mkstemp makes the file 0600; outputs get the permissions any new file would (0644 under umask 022)
        os.fchmod(fd, 0o666 & ~_umask())
        os.close(fd)
        yield tmp
        os.replace(tmp, final)
    except BaseException as exc:
        with suppress(OSError):
            tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise OutputError(_cannot_write(final, tmp, exc)) from exc
        raise


# A text cell starting with one of these is run as a formula by spreadsheets (OWASP,
# "CSV injection"); "'" is quoted too, so stripping one leading "'" always undoes it.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "'")
_NUMBER = re.compile(r"[+-]?(?:(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?|inf|infinity|nan)", re.I)


def formula_safe(value: object) -> object:
    """``value`` with a ``'`` in front when it is text a spreadsheet would run as a formula.

    >>> formula_safe('=HYPERLINK("http://x")'), formula_safe("-1+1"), formula_safe("-0.5"), formula_safe("-inf")
    ('\\'=HYPERLINK("http://x")', "'-1+1", '-0.5', '-inf')
    """
    if isinstance(value, str) and value.startswith(_FORMULA_START) and not _NUMBER.fullmatch(value):
        return "'" + value
    return value


def formula_safe_frame(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with :func:`formula_safe` applied to its text columns (numbers stay numbers)."""
    out = None
    for i, (_, col) in enumerate(df.items()):
        if not (pd.api.types.is_object_dtype(col.dtype) or pd.api.types.is_string_dtype(col.dtype)
                or isinstance(col.dtype, pd.CategoricalDtype)):
            continue
        quoted = col.astype(object).map(formula_safe)
        if not quoted.equals(col.astype(object)):
            if out is None:
                out = df.copy()
            out.isetitem(i, quoted)
    return df if out is None else out


def json_records(df: pd.DataFrame, indent: int = 1) -> str:
    """``df`` as a JSON list of records with every float at full precision (``repr``: it reads
    back bit for bit), missing values and NaN as ``null``, infinities as ``Infinity``/``-Infinity``.

    >>> print(json_records(pd.DataFrame({"a": [0.1 + 0.2], "b": [float("nan")]}), indent=None))
    [{"a": 0.30000000000000004, "b": null}]
    """
    import json

    def plain(v: object) -> object:
        if v is None or v is pd.NA or v is pd.NaT:
            return None
        if hasattr(v, "item"):  # numpy scalars
            v = v.item()  # type: ignore[union-attr]
        if isinstance(v, float) and v != v:
            return None
        return v

    records = [{str(k): plain(v) for k, v in zip(df.columns, row)} for row in df.itertuples(index=False)]
    return json.dumps(records, indent=indent, ensure_ascii=False)


def write_csv(df: pd.DataFrame, path: str | os.PathLike[str]) -> Path:
    """Write ``df`` as CSV (no index, empty cells for missing values), atomically.

    Text cells a spreadsheet would run as a formula get a leading ``'``
    (see :func:`formula_safe`).
    """
    with atomic_path(path) as tmp:
        formula_safe_frame(df).to_csv(tmp, index=False)
    return Path(path)


def prepare_out_dir(path: str | os.PathLike[str]) -> Path:
    """Create the output directory if needed; refuse a path that is an existing file.

    Temporary files that dead auditclip processes left in it are removed. A URL is refused:
    reports are written to a local folder (``clip --out s3://...`` publishes its output itself).

    >>> prepare_out_dir("s3://bucket/report")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    auditclip.errors.InputError: --out s3://bucket/report: reports are written to a local folder; ...
    """
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*://", os.fspath(path)):  # not a folder named "s3:"
        raise InputError(f"--out {os.fspath(path)}: reports are written to a local folder; give a local path "
                         "(clip --out accepts a URL)")
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; give a directory to write the reports into")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create output directory {out}: {exc.strerror or exc}") from exc
    _sweep_once(out)
    return out
