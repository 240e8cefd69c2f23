"""One output folder and what a command wrote into it: every report goes through a :class:`Report`.

It writes each CSV atomically and remembers the files in the order written (the
summary lists them); ``errors.csv`` is written when checkpoints were unreadable and
*removed* otherwise, so a stale list from an earlier run never survives beside new
reports.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from ..output import prepare_out_dir, write_csv

ERRORS_CSV = "errors.csv"


class Report:
    """The reports of one command in ``out`` (created if needed; refused if it is a file).

    >>> import tempfile
    >>> report = Report(tempfile.mkdtemp())
    >>> _ = report.csv(pd.DataFrame({"a": [1]}), "stats.csv")
    >>> report.errors(pd.DataFrame(columns=["checkpoint", "error", "message"])) is None
    True
    >>> [p.name for p in report.files]
    ['stats.csv']
    """

    def __init__(self, out: str | os.PathLike[str]) -> None:
        self.out: Path = prepare_out_dir(out)
        self.files: list[Path] = []

    def csv(self, df: pd.DataFrame, name: str) -> Path:
        """Write ``df`` as ``out/name`` (see :func:`auditclip.output.write_csv`)."""
        return self.add(write_csv(df, self.out / name))

    def errors(self, errors: pd.DataFrame) -> Path | None:
        """``errors.csv`` when there are unreadable checkpoints; otherwise remove an earlier one."""
        if len(errors):
            return self.csv(errors, ERRORS_CSV)
        (self.out / ERRORS_CSV).unlink(missing_ok=True)
        return None

    def add(self, path: Path) -> Path:
        """Record a file written by someone else (a picture, the summary)."""
        self.files.append(Path(path))
        return Path(path)
