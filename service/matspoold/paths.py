"""Where the daemon may write: inside one of its roots, after symlinks are resolved."""

from __future__ import annotations

import os
from collections.abc import Sequence

from matspool._errors import PathNotAllowedError, WriteFailed

__all__ = ["normalize_roots", "resolve_target"]


def normalize_roots(roots: Sequence[str]) -> tuple[str, ...]:
    out = []
    for r in roots:
        real = os.path.realpath(r)
        if not os.path.isdir(real):
            raise ValueError(f"--root {r!r} is not a directory")
        out.append(real)
    return tuple(out)


def _within(path: str, root: str) -> bool:
    return root == "/" or path == root or path.startswith(root + os.sep)


def resolve_target(path: str, roots: Sequence[str]) -> str:
    """The real path to write for ``path``; raises if it leaves every root.

    The parent directory is resolved through symlinks before the check, so neither
    ``..`` nor a symlinked directory leads outside; the file itself is replaced by
    rename, which never follows a symlink at the final name.
    """
    if not os.path.isabs(path):
        raise PathNotAllowedError(f"path must be absolute: {path!r}")
    directory, base = os.path.split(os.path.normpath(path))
    if not base or base in (".", ".."):
        raise WriteFailed(f"path names a directory, not a file: {path!r}")
    real_dir = os.path.realpath(directory)
    if not any(_within(real_dir, root) for root in roots):
        raise PathNotAllowedError(
            f"{path!r} is outside the daemon's roots ({', '.join(roots)}); start the daemon "
            "with --root for that directory"
        )
    if not os.path.isdir(real_dir):
        raise WriteFailed(f"cannot write {path!r}: directory {directory!r} does not exist")
    final = os.path.join(real_dir, base)
    if os.path.isdir(final):
        raise WriteFailed(f"cannot write {path!r}: it is a directory")
    return final
