"""Whole writes to file descriptors, shared by the writers."""

from __future__ import annotations

import os
from typing import Any

__all__ = ["pwrite_all", "write_new_file"]


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
