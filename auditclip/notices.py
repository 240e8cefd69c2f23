"""Notes auditclip owes the user: what it was unsure of, chose, or left out.

"Never silently wrong" needs one channel for things like "read ``state_dict`` (the
EMA average); ``current_model_state`` was left out" or "``lm_head.weight`` is tied to
``transformer.wte.weight``; counted once". Library code calls :func:`note`; the
note goes to the ``auditclip`` logger (the CLI prints it on stderr as ``note: ...``)
and to every :func:`collect` block open at the time (a report gathers them for
``summary.md``). A note said twice in one block is recorded once.

>>> with collect() as notes:
...     note("lm_head.weight is tied to wte.weight; counted once")
...     note("lm_head.weight is tied to wte.weight; counted once")
>>> notes
['lm_head.weight is tied to wte.weight; counted once']
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager

LOGGER = logging.getLogger("auditclip")

_lock = threading.Lock()
_collectors: list[list[str]] = []
_said: set[str] = set()


def note(message: str) -> None:
    """Record ``message`` in the open :func:`collect` blocks and log it once per process."""
    with _lock:
        for notes in _collectors:
            if message not in notes:
                notes.append(message)
        first = message not in _said
        _said.add(message)
    if first:
        LOGGER.info(message)


@contextmanager
def collect() -> Iterator[list[str]]:
    """Gather the notes said inside the block (in order, each once), also from worker threads."""
    notes: list[str] = []
    with _lock:
        _collectors.append(notes)
    try:
        yield notes
    finally:
        with _lock:
            _collectors.remove(notes)


def reset() -> None:
    """Forget which notes were already logged (a new command in the same process)."""
    with _lock:
        _said.clear()
