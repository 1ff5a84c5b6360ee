"""The v7.3 layouts kept for reuse: a small file's whole image (``TEMPLATES``) and a large
single variable's bytes around its payload (``_SPLITS``), so a time-step loop saving the same
variables pays h5py's file creation once. ``v73.write_v73`` decides when one applies.

Threads: shared by the daemon's writer threads; each cache is guarded by its own lock.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

__all__ = [
    "TEMPLATES",
    "TEMPLATE_MAX_BYTES",
    "_SPLITS",
    "_Split",
    "_Template",
    "_keep_split",
    "_splits_lock",
]


@dataclass(frozen=True)
class _Template:
    """A small file as h5py laid it out: every byte but the payloads and the header's
    time stamp depends only on the variables' names, types and sizes."""

    image: bytes
    offsets: tuple[int | None, ...]  # each variable's payload offset; None: no payload


TEMPLATE_MAX_BYTES = 1 << 20  # above this h5py's ~0.5 ms per file is lost in the payload
_TEMPLATES_KEPT = 128


class _TemplateCache:
    """Recently written small layouts, so a time-step loop saving the same variables pays
    h5py's file creation (~0.5 ms, most of a small file's cost) once, not every step."""

    def __init__(self, size: int = _TEMPLATES_KEPT) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._items: OrderedDict[tuple[Any, ...], _Template] = OrderedDict()

    def get(self, key: tuple[Any, ...]) -> _Template | None:
        with self._lock:
            t = self._items.get(key)
            if t is not None:
                self._items.move_to_end(key)
            return t

    def put(self, key: tuple[Any, ...], template: _Template) -> None:
        with self._lock:
            self._items[key] = template
            while len(self._items) > self._size:
                self._items.popitem(last=False)


TEMPLATES = _TemplateCache()


@dataclass(frozen=True)
class _Split:
    """A file of one large contiguous variable as h5py laid it out, without its payload:
    the bytes before it (``head``, from offset 0) and after it (``tail``)."""

    head: bytes
    offset: int
    tail: bytes


_SPLITS_KEPT = 32
_splits_lock = threading.Lock()
_SPLITS: OrderedDict[tuple[Any, ...], _Split] = OrderedDict()


def _keep_split(fd: int, key: tuple[Any, ...], offset: int, nbytes: int) -> None:
    """Remember the file's layout around its one payload (read back from the file h5py
    just wrote), for the next save of the same name, type and size."""
    size = os.fstat(fd).st_size
    head = os.pread(fd, offset, 0)
    tail = os.pread(fd, max(0, size - offset - nbytes), offset + nbytes)
    if len(head) != offset or offset + nbytes + len(tail) != size:
        return
    with _splits_lock:
        _SPLITS[key] = _Split(head, offset, tail)
        _SPLITS.move_to_end(key)
        while len(_SPLITS) > _SPLITS_KEPT:
            _SPLITS.popitem(last=False)
