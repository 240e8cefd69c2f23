"""Text for the terminal: names read from files never reach it raw.

A tensor name, a path or a message quoting either comes from a file someone else
wrote. Printed as is, control characters in it drive the terminal: ``ESC ]52``
writes the clipboard, ``ESC [`` moves the cursor or rewrites earlier lines, a
carriage return overwrites the line it is on. :func:`safe` shows every C0 and C1
control character (and DEL) as a visible ``\\xNN`` escape instead; :func:`echo`
is ``click.echo`` through it, keeping the newlines the caller wrote.
"""

from __future__ import annotations

import re
from typing import Any

import click

# C0 controls, DEL, C1 controls; lone surrogates stand for the undecodable bytes of a
# file name (os.fsdecode) and cannot be encoded for the terminal either.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")
# The same with newlines kept: "\n", and "\r" only as part of "\r\n".
_CONTROL_KEEP_NEWLINES = re.compile(r"[\x00-\x09\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]|\r(?!\n)")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    if 0xDC80 <= code <= 0xDCFF:  # a byte os.fsdecode could not decode: show that byte
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def safe(text: object, *, keep_newlines: bool = False) -> str:
    """``text`` with control characters shown as ``\\xNN`` escapes, safe to print.

    Newlines are escaped too unless ``keep_newlines`` (for text whose line breaks the
    caller wrote itself); then a ``\\r`` survives only in ``\\r\\n``.

    >>> safe("fc1.weight")
    'fc1.weight'
    >>> safe("evil\\x1b]52;c;aGVsbG8=\\x07.weight")
    'evil\\\\x1b]52;c;aGVsbG8=\\\\x07.weight'
    >>> safe("a\\nb"), safe("a\\nb", keep_newlines=True)
    ('a\\\\x0ab', 'a\\nb')
    """
    return (_CONTROL_KEEP_NEWLINES if keep_newlines else _CONTROL).sub(_escape, str(text))


def echo(message: Any = None, **kwargs: Any) -> None:
    """``click.echo`` with control characters escaped; the message's own newlines are kept."""
    click.echo(None if message is None else safe(message, keep_newlines=True), **kwargs)
