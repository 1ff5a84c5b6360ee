"""Where the daemon may write: inside one of its roots, after symlinks are resolved."""

from __future__ import annotations

import errno
import os
import threading
from collections import OrderedDict
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


_DIRS_KEPT = 1024
_dirs: OrderedDict[tuple[tuple[str, ...], str], tuple[str, int, int]] = OrderedDict()
_dirs_lock = threading.Lock()


def _identity(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _cached_dir(roots: tuple[str, ...], directory: str) -> str | None:
    """A directory checked before, if both the client's path and the checked real path
    still lead to that same directory (inode): a symlink swapped in since then on
    either path misses, and the full check runs again. ``realpath`` costs a few lstat
    calls per component in Python, which is most of a small file's path handling."""
    with _dirs_lock:
        hit = _dirs.get((roots, directory))
    if hit is None:
        return None
    real_dir, dev, ino = hit
    if _identity(directory) == (dev, ino) and (real_dir == directory or _identity(real_dir) == (dev, ino)):
        return real_dir
    return None


def _remember_dir(roots: tuple[str, ...], directory: str, real_dir: str) -> None:
    ident = _identity(real_dir)
    if ident is None:
        return
    with _dirs_lock:
        _dirs[(roots, directory)] = (real_dir, *ident)
        while len(_dirs) > _DIRS_KEPT:
            _dirs.popitem(last=False)


def _failed(message: str, number: int) -> WriteFailed:
    """A WriteFailed with its OS errno (the daemon's ERR carries it), message unchanged."""
    err = WriteFailed(message)
    err.errno = number
    return err


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
        raise _failed(f"path names a directory, not a file: {path!r}", errno.EISDIR)
    key_roots = tuple(roots)
    real_dir = _cached_dir(key_roots, directory)
    if real_dir is None:
        real_dir = os.path.realpath(directory)
        if not any(_within(real_dir, root) for root in roots):
            raise PathNotAllowedError(
                f"{path!r} is outside the daemon's roots ({', '.join(roots)}); start the daemon "
                "with --root for that directory"
            )
        if not os.path.isdir(real_dir):
            raise _failed(f"cannot write {path!r}: directory {directory!r} does not exist",
                          errno.ENOENT if not os.path.exists(real_dir) else errno.ENOTDIR)
        _remember_dir(key_roots, directory, real_dir)
    final = os.path.join(real_dir, base)
    if os.path.isdir(final):
        raise _failed(f"cannot write {path!r}: it is a directory", errno.EISDIR)
    return final
