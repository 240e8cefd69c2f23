"""Stopping on a signal the way shells and schedulers expect: cleanly, 128 + its number.

Ctrl-C (SIGINT), SIGTERM (CI cancellation, ``timeout``, Kubernetes) and SIGHUP (the
terminal closed) raise :class:`Interrupted`, a ``KeyboardInterrupt``, in the main
thread. Every ``finally`` and ``except BaseException`` on the way out runs, so
:func:`auditclip.output.atomic_path` removes the file it was writing; the command
line then prints one line and exits 130, 143 or 129. A second signal while that
happens ends the process at once (the next run removes what it leaves behind).
A signal the parent set to be ignored (``nohup``, background jobs) stays ignored.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class Interrupted(KeyboardInterrupt):
    """A stop signal arrived; ``exit_code`` is the shell's 128 + signal number."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(signal_name(signum))

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def exit_code(exc: BaseException) -> int:
    """The exit code for an interrupt: 128 + the signal, 130 for a plain KeyboardInterrupt."""
    return exc.exit_code if isinstance(exc, Interrupted) else 128 + signal.SIGINT


def message(exc: BaseException) -> str:
    """One line saying what stopped the run, and that unfinished files are gone."""
    what = signal_name(exc.signum) if isinstance(exc, Interrupted) else "SIGINT"
    if what == "SIGINT":
        what += " (Ctrl-C)"
    return f"Interrupted by {what}; unfinished output files were removed"


@contextmanager
def handle_signals(signums: tuple[int, ...] = SIGNALS) -> Iterator[None]:
    """Within the block, the stop signals raise :class:`Interrupted`; the old handlers come back after.

    Works in the main thread only (elsewhere it changes nothing).
    """
    fired = False

    def handler(signum: int, frame: Any) -> None:
        nonlocal fired
        if fired:  # asked twice: stop now, without waiting for the cleanup
            os._exit(128 + signum)
        fired = True
        raise Interrupted(signum)

    previous: dict[int, Any] = {}
    for signum in signums:
        try:
            old = signal.getsignal(signum)
            if old == signal.SIG_IGN:
                continue
            signal.signal(signum, handler)
        except (ValueError, OSError):  # not the main thread, or not a signal of this platform
            continue
        previous[signum] = old
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old if old is not None else signal.SIG_DFL)
