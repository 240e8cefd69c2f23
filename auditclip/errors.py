"""Exceptions raised by auditclip.

Every error the library raises on purpose is an :class:`AuditclipError`; the CLI
turns them into a one-line ``Error: ...`` message and exit code 2, so a user
never sees a traceback for bad input or a broken file.
"""

from __future__ import annotations

#: Local folder -> the URL it stands for (the local views of remote runs, filled by
#: :func:`auditclip.formats.remote.local_view`), so messages name what the user typed.
SHOWN_PATHS: dict[str, str] = {}


def shown_path(path: object) -> str:
    """``path`` as the user knows it: a file of a remote run's local view as its URL.

    >>> shown_path("runs/step_1.pt")
    'runs/step_1.pt'
    """
    text = str(path)
    for local, url in SHOWN_PATHS.items():
        if text == local or text.startswith(local + "/"):
            return url + text[len(local):]
    return text


class AuditclipError(Exception):
    """Base class of every error auditclip raises on purpose."""


class InputError(AuditclipError):
    """The user asked for something that cannot be done (bad path, bad option)."""


class NoCheckpointsError(InputError):
    """A path, directory or glob named no checkpoint at all."""


class CheckpointError(AuditclipError):
    """A checkpoint file could not be read (truncated, garbage, unsafe, missing shard).

    ``path`` names the offending file so a run can report it and go on.
    """

    def __init__(self, path: object, message: str, kind: str = "unreadable") -> None:
        self.path = shown_path(path)
        self.message = message
        #: short machine-readable cause: ``unreadable``, ``unsafe``, ``missing_shard``...
        self.kind = kind
        super().__init__(f"{self.path}: {message}")

    def row(self, checkpoint: str) -> dict[str, str]:
        """This error as a row of ``errors.csv`` for the checkpoint labelled ``checkpoint``."""
        return {"checkpoint": checkpoint, "error": self.kind, "message": self.message}
