"""Choosing tensors by name with ``--include`` / ``--exclude`` glob patterns."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from fnmatch import fnmatchcase


def name_filter(include: Sequence[str] = (), exclude: Sequence[str] = ()) -> Callable[[str], bool]:
    """A predicate keeping names that match any ``include`` glob and no ``exclude`` glob.

    No ``include`` means every name. Matching is case-sensitive, on the full name.

    >>> keep = name_filter(include=["*.weight"], exclude=["norm*"])
    >>> [keep(n) for n in ["fc.weight", "fc.bias", "norm.weight"]]
    [True, False, False]
    """
    inc, exc = tuple(include), tuple(exclude)

    def keep(name: str) -> bool:
        if inc and not any(fnmatchcase(name, p) for p in inc):
            return False
        return not any(fnmatchcase(name, p) for p in exc)

    return keep
