"""The atomic publish, whole writes to file descriptors, and temporary names.

Every file reaches its final name the same way (:class:`Temporary`): written under a
temporary name in the same directory, optionally fsynced, renamed into place, then the
directory fsynced, so readers never see a partial file under the name they asked for,
and with ``fsync`` the file survives a power cut once its save is answered.

Threads: any writer thread; ``TempNames.for_final`` is safe to call from all of them,
and each :class:`Temporary` belongs to the one job that made it.
"""

from __future__ import annotations

import itertools
import os
import secrets
from collections.abc import Callable
from typing import Any

__all__ = ["TEMPS", "TMP_SUFFIX", "TempNames", "Temporary", "fsync_path", "pwrite_all", "write_new_file"]

TMP_SUFFIX = ".matspool-tmp"


class TempNames:
    """``.NAME.<tag>-<n>.matspool-tmp`` beside a final name: unique within the daemon (a
    counter, no ``urandom`` per file) and across daemons (``tag`` is the pid and a random
    salt). ``record``, when set (the daemon's temporary-file journal), is told each
    directory before a temporary is named in it, so a killed daemon's leftovers can be
    found and removed by the next one (``tempjournal``)."""

    def __init__(self) -> None:
        self.tag = f"{os.getpid()}-{secrets.token_hex(8)}"
        self.record: Callable[[str], None] | None = None
        self._ids = itertools.count()

    def for_final(self, final: str) -> str:
        directory, base = os.path.split(final)
        if self.record is not None:
            self.record(directory)
        return os.path.join(directory, f".{base[:180]}.{self.tag}-{next(self._ids)}{TMP_SUFFIX}")


#: the process's temporary names (one daemon per process)
TEMPS = TempNames()


def fsync_path(path: str, flags: int = os.O_RDONLY) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Temporary:
    """A file written under a temporary name beside ``final``, until :meth:`publish`
    renames it into place or :meth:`discard` removes it."""

    def __init__(self, final: str) -> None:
        self.final = final
        self.path = TEMPS.for_final(final)

    def publish(self, fsync: bool) -> int:
        """Rename the complete file into place (durably with ``fsync``); its size in bytes."""
        if fsync:
            fsync_path(self.path)
        os.rename(self.path, self.final)
        if fsync:
            fsync_path(os.path.dirname(self.final), os.O_RDONLY | os.O_DIRECTORY)
        return os.stat(self.final).st_size

    def discard(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def pwrite_all(fd: int, data: Any, offset: int) -> None:
    """Write all of ``data`` (any buffer) at ``offset``; a short write (disk full,
    signals) goes on until done, so a full disk surfaces as ENOSPC, not a cut file."""
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def write_new_file(path: str, image: Any) -> None:
    """Create ``path`` (it must not exist) holding exactly ``image``: a small file's
    header and payloads, assembled in memory, in one write."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    try:
        pwrite_all(fd, image, 0)
    finally:
        os.close(fd)
