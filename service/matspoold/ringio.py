"""Reading a client's ring without giving the client a way to kill the daemon.

A daemon that reads a *mapping* past the end of its file takes SIGBUS, which Python
cannot survive. Two kinds of ring keep that from happening (``matspool._ring``):

- a sealed ``memfd`` (``F_SEAL_SHRINK | F_SEAL_GROW``, checked before mapping): its size
  cannot change, so the daemon maps it and writers read it in place, as before;
- a ``/dev/shm`` file, which cannot be sealed: never mapped. :class:`ShmRing` copies
  each save's bytes with ``preadv`` into buffers of the daemon's own; a ring truncated
  under a save is a short read, a :class:`~matspool.RingError` for that save.

Costs, measured on this project's shared 2-core machine (256 MiB, the client's pages
already faulted, best of 5, a noisy box: ratios matter more than the numbers):

======================================================  ===========  ==========
what                                                    time         rate
======================================================  ===========  ==========
HELLO, old: ``mmap`` + ``MAP_POPULATE`` (control thread)  42 ms       6.4 GB/s
HELLO, new: lazy ``mmap`` (control thread)              < 0.1 ms
first save reading all of a lazy mapping (writer)       110-155 ms   1.7-2.4 GB/s
later saves, mapping faulted in                         68-107 ms    2.5-4.0 GB/s
``/dev/shm`` fallback: ``preadv`` into a fresh buffer   406-440 ms   0.6 GB/s
``preadv`` into a reused buffer                         166 ms       1.6 GB/s
writing the same bytes to a file (page cache)           269 ms       1.0 GB/s
======================================================  ===========  ==========

So the sealed mapping costs nothing per save, and its lazy faults (once per client,
on a writer thread) cost about one extra read of the ring; the fallback's copy costs
about as much as writing the file again, and holds the save's bytes in the daemon's
memory while it is written (at most one ring per writer thread). Most of that copy is
faulting in fresh pages; a buffer kept per writer thread would halve it, at the price
of a ring's worth of memory per writer kept for good: not worth it for a fallback.
Since then a large plain array of a whole save is not copied out at all: the writers
splice it from the ring file into the output (``shmspan``); what ``payload`` still
copies is small, complex, or part of a struct or cell.

A sealed mapping's first read of a page is a page fault taken inside ``write()``, one
per 4 KiB (64 KiB with the kernel's fault-around): on this VM a 64 MiB save from a fresh
mapping took 129 ms against 42 ms for the same write from faulted memory. :func:`prefault`
maps a save's pages first with ``madvise(MADV_POPULATE_READ)`` (Linux 5.14), in one
system call and without the GIL: 58 ms for the same cold save, and nothing once a
mapping's chunks are known to be populated (a bitmap of 1 MiB chunks per mapping).

A mapping is also costly to take down: unmapping a populated 256 MiB ring (the client's
default size) took 26 ms on this VM (its page tables freed, TLBs flushed), and the control
thread did it when a client left, holding up every other client's requests meanwhile
(eight ranks ending together: a fifth of a second). :func:`unmap_later` hands a released
mapping of :data:`UNMAP_LATER_BYTES` or more to a thread of its own.

Threads: a :class:`ShmRing` belongs to its client (control thread); writer threads call
``read`` and ``payload``, which use only ``pread`` on a descriptor that stays open while
the client has a job in flight. :func:`prefault` runs on writer threads; its bitmaps are
only read and set under the GIL, and a race between two writers only populates a chunk
twice (harmless). :func:`unmap_later` is called by the control thread; its thread
(``matspool-unmap``, started on first use) only closes mappings nobody uses any more.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import queue
import threading
import weakref
from collections.abc import Iterable

import numpy as np

from matspool import _protocol as proto
from matspool._errors import RingError

__all__ = ["UNMAP_LATER_BYTES", "ShmRing", "prefault", "unmap_later"]


class ShmRing:
    """A client's ``/dev/shm`` ring, read by copy (``preadv``), never mapped."""

    __slots__ = ("closed", "fd", "size")

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd  # owned by the Client (it closes it): this only reads through it
        self.size = size
        self.closed = False

    def read(self, offset: int, nbytes: int) -> memoryview:
        """``nbytes`` of the ring at ``offset``, copied; a short read (the client shrank
        its ring) is a :class:`RingError` for this save."""
        view = np.empty(nbytes, np.uint8).data  # no zero fill: every byte is read into
        got = 0
        while got < nbytes:
            try:
                n = os.preadv(self.fd, [view[got:]], offset + got)
            except OSError as e:
                raise RingError(f"cannot read the client's ring: {e.strerror}") from e
            if n == 0:
                raise RingError(
                    f"the client's ring shrank under a save: {offset + got} bytes "
                    f"readable, this save needs {offset + nbytes}"
                )
            got += n
        return view

    def payload(self, leaves: Iterable[proto.VarSpec]) -> dict[int, memoryview]:
        """The arrays of a save, by ring offset, copied out of the ring (arrays sharing an
        offset share the longest one's copy: each view takes its own first bytes)."""
        longest: dict[int, int] = {}
        for leaf in leaves:
            longest[leaf.offset] = max(longest.get(leaf.offset, 0), leaf.nbytes)
        return {offset: self.read(offset, nbytes) for offset, nbytes in longest.items() if nbytes}

    def close(self) -> None:
        self.closed = True


_MADV_POPULATE_READ = 22  # linux/mman.h; Python 3.11's mmap module does not name it
_CHUNK = 1 << 20  # the prefault bitmap's granularity
PREFAULT_MIN_BYTES = 1 << 20  # below this the faults cost less than the system call
_libc = ctypes.CDLL(None, use_errno=True)
_madvise = _libc.madvise  # through ctypes: the call runs without the GIL
_madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_madvise.restype = ctypes.c_int
_populated: weakref.WeakKeyDictionary[mmap.mmap, bytearray] = weakref.WeakKeyDictionary()
_supported = True


def prefault(mm: mmap.mmap, offset: int, nbytes: int) -> None:
    """Map ``mm``'s pages in ``[offset, offset + nbytes)`` before a writer reads them, in
    one ``MADV_POPULATE_READ``; chunks populated once are not asked for again. Best
    effort: a kernel without it (EINVAL) or any other failure leaves the faults to
    ``write()``, as before. Never past the mapping's end."""
    global _supported
    if not _supported or nbytes < PREFAULT_MIN_BYTES:
        return
    size = len(mm)
    end = min(offset + nbytes, size)
    if offset < 0 or offset >= end:
        return
    done = _populated.get(mm)
    if done is None:
        done = _populated.setdefault(mm, bytearray(-(-size // _CHUNK)))
    first, last = offset // _CHUNK, (end - 1) // _CHUNK
    if all(done[first : last + 1]):
        return
    start = first * _CHUNK  # page aligned: chunks are multiples of the page size
    stop = min((last + 1) * _CHUNK, size)
    base = np.frombuffer(mm, np.uint8)  # only for the address: dropped before returning
    try:
        rc = _madvise(base.ctypes.data + start, stop - start, _MADV_POPULATE_READ)
    finally:
        del base  # an exported buffer would keep the client's release from closing mm
    if rc != 0:
        if ctypes.get_errno() == 22:  # EINVAL: the kernel predates MADV_POPULATE_READ
            _supported = False
        return
    done[first : last + 1] = b"\x01" * (last + 1 - first)


UNMAP_LATER_BYTES = 16 << 20  # smaller mappings are closed at once: a hand-off costs more
_unmaps: queue.SimpleQueue[mmap.mmap] = queue.SimpleQueue()
_unmapper: threading.Thread | None = None


def _unmap_loop() -> None:
    while True:
        mm = _unmaps.get()
        try:
            mm.close()
        except BufferError:
            pass  # a view is still alive somewhere; the mapping goes with it
        del mm


def unmap_later(mm: mmap.mmap) -> None:
    """Close ``mm``, a released client's mapping that no job uses any more: at once when it
    is small, else on the ``matspool-unmap`` thread, off the caller's (the control thread)."""
    global _unmapper
    if len(mm) < UNMAP_LATER_BYTES:
        try:
            mm.close()
        except BufferError:
            pass
        return
    if _unmapper is None:
        _unmapper = threading.Thread(target=_unmap_loop, name="matspool-unmap", daemon=True)
        _unmapper.start()
    _unmaps.put(mm)
