"""The file object HDF5 writes through during one journaled append (``_journal``).

Why: HDF5 rewrites metadata below the file's old end (``base``) in place; holding those
writes in memory until the commit keeps the bytes below ``base`` the old, consistent file,
so a kill leaves only a tail beyond ``base``, which recovery cuts off. Writes at or beyond
``base`` go straight to the file; reads see the held writes.

A write that fails (ENOSPC, EIO) is never reported to HDF5 (its own close failing on a
real descriptor crashed the daemon): the error is kept, and that and every later write
are held in memory (writes over 1 MiB, raw chunk data HDF5 never reads back, are
dropped), so HDF5 finishes and closes cleanly and the append rolls back.

At the commit, ``undo_ranges`` names the original bytes the journal must keep, and
``apply`` puts the held writes into the file in the order that keeps it readable at
every write boundary (``_apply_rank``).

Threads: an ``UndoFile`` belongs to the one thread running its append; the module holds
no other state.
"""

from __future__ import annotations

import bisect
import errno
import os
from typing import Any

from ._files import pwrite_all

__all__ = ["IDENT_BYTES", "UndoFile"]

IDENT_BYTES = 128  # the MAT header ("Created on: ..."), in HDF5's userblock: never written
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
_HOLD_MAX = 1 << 20  # after a failure: larger writes are raw chunk data, dropped


class UndoFile:
    """The file object HDF5 sees during one append (see the module docstring): writes
    below ``base`` are held in memory, the rest go to ``fd``. Used by one thread."""

    def __init__(self, fd: int, base: int) -> None:
        self.fd = fd
        self.base = base
        self.eof = base  # the length HDF5 believes the file has
        self.held: list[tuple[int, bytes]] = []  # in write order; later ones win
        self.error: OSError | None = None
        self.size = base  # the file's size once committed
        self._pos = 0

    # -- the methods h5py's fileobj driver calls ---------------------------------------
    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self._pos = (
            offset
            if whence == os.SEEK_SET
            else (self._pos + offset if whence == os.SEEK_CUR else self.eof + offset)
        )
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, buf: Any) -> int:
        view = memoryview(buf).cast("B")
        off, n = self._pos, len(view)
        got = os.preadv(self.fd, [view], off) if n else 0
        if got < n:
            view[got:] = bytes(n - got)
        for start, data in self.held:  # what HDF5 wrote but the file does not hold yet
            lo, hi = max(start, off), min(start + len(data), off + n)
            if lo < hi:
                view[lo - off : hi - off] = data[lo - start : hi - start]
        self._pos += n
        return n

    def read(self, n: int = -1) -> bytes:
        buf = bytearray(max(0, self.eof - self._pos) if n < 0 else n)
        self.readinto(buf)
        return bytes(buf)

    def write(self, buf: Any) -> int:
        view = memoryview(buf).cast("B")
        off, n = self._pos, len(view)
        self._pos += n
        self.eof = max(self.eof, off + n)
        if off < IDENT_BYTES and self.error is None:  # a file without a userblock
            self.error = OSError(
                errno.EINVAL, "the file has no userblock: its first bytes would be rewritten"
            )
        if self.error is not None:
            self._hold(off, view)
            return n
        if off < self.base:
            self.held.append((off, bytes(view[: self.base - off])))
        if off + n > self.base:
            start = max(off, self.base)
            try:
                pwrite_all(self.fd, view[start - off :], start)
            except OSError as e:
                self.error = e
                self._hold(start, view[start - off :])
        return n

    def truncate(self, size: int | None = None) -> int:
        self.eof = self._pos if size is None else size
        if self.error is None:
            try:  # below base only at the commit, once the cut bytes are journaled
                os.ftruncate(self.fd, max(self.eof, self.base))
            except OSError as e:
                self.error = e
        return self.eof

    def flush(self) -> None:
        """Nothing: the commit writes and fsyncs."""

    def _hold(self, off: int, view: memoryview) -> None:
        if len(view) <= _HOLD_MAX:
            self.held.append((off, bytes(view)))

    # -- the commit ----------------------------------------------------------------------
    def undo_ranges(self) -> list[tuple[int, int]]:
        """Disjoint ``[start, end)`` ranges below ``base`` the commit will change."""
        spans = [(o, o + len(d)) for o, d in self.held]
        return _merge([*spans, (self.eof, self.base)] if self.eof < self.base else spans)

    def segments(self) -> list[tuple[int, bytes]]:
        """The held writes as disjoint runs of their final bytes (overlapping writes
        joined, later ones winning), in the order ``apply`` writes them."""
        spans = _merge([(o, o + len(d)) for o, d in self.held], touching=False)
        starts = [lo for lo, _ in spans]
        bufs = [bytearray(hi - lo) for lo, hi in spans]
        for off, data in self.held:  # in write order: a later write wins
            i = bisect.bisect_right(starts, off) - 1
            bufs[i][off - starts[i] : off - starts[i] + len(data)] = data
        return sorted(((lo, bytes(buf)) for lo, buf in zip(starts, bufs, strict=True)), key=_apply_rank)

    def apply(self) -> None:
        """Put the held writes into the file, and cut it if HDF5 shrank it."""
        for off, data in self.segments():
            pwrite_all(self.fd, data, off)
        if self.eof < self.base:
            os.ftruncate(self.fd, self.eof)


def _apply_rank(segment: tuple[int, bytes]) -> tuple[int, int]:
    """Superblock (its end-of-file address) first, then chunk B-tree nodes, then object
    headers (a dataset's size) last: a reader of a file whose commit was cut short then
    sees every earlier step, and new steps only once indexed. Measured at every write
    boundary of an append (tests): the file reads in full with every earlier step exact
    before any recovery; in HDF5's own order 100 of 256 such files did not."""
    off, data = segment
    return (0 if data[:8] == _HDF5_SIGNATURE else 1 if data[:4] == b"TREE" else 2), off


def _merge(spans: list[tuple[int, int]], touching: bool = True) -> list[tuple[int, int]]:
    """Sorted disjoint ranges covering ``spans``; ranges that only touch stay apart unless
    ``touching``."""
    merged: list[tuple[int, int]] = []
    for lo, hi in sorted(spans):
        if merged and (lo <= merged[-1][1] if touching else lo < merged[-1][1]):
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    return merged
