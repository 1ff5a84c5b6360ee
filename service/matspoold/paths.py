"""Where the daemon may write: inside one of its roots, reached by file descriptor.

``normalize_roots`` turns ``--root`` arguments into real paths once, at start;
``resolve_target`` resolves a client's path to an open directory below a root (see
``fsconfine``), through which every later operation of the save goes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from .fsconfine import Target, resolve

__all__ = ["normalize_roots", "resolve_target"]


def normalize_roots(roots: Sequence[str]) -> tuple[str, ...]:
    """Each root as a real path (symlinks resolved once, by the operator's choice)."""
    out = []
    for r in roots:
        real = os.path.realpath(r)
        if not os.path.isdir(real):
            raise ValueError(f"--root {r!r} is not a directory")
        out.append(real)
    return tuple(out)


def resolve_target(path: str, roots: Sequence[str], *, check: bool = True) -> Target:
    """The open directory and name to write ``path`` at; raises ``PathNotAllowedError``
    if it leaves every root, ``WriteFailed`` if its directory is missing or it names a
    directory (without ``check``: later, where the writer would put a file there by name,
    ``fsconfine.resolve``). The caller closes the returned Target."""
    return resolve(path, roots, check=check)
