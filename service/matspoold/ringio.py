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

Threads: a :class:`ShmRing` belongs to its client (control thread); writer threads call
``read`` and ``payload``, which use only ``pread`` on a descriptor that stays open while
the client has a job in flight.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import numpy as np

from matspool import _protocol as proto
from matspool._errors import RingError

__all__ = ["ShmRing"]


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
        """The arrays of a save, by ring offset, copied out of the ring."""
        return {leaf.offset: self.read(leaf.offset, leaf.nbytes) for leaf in leaves if leaf.nbytes}

    def close(self) -> None:
        self.closed = True
