"""Reading a client's ring without giving the client a way to kill the daemon.

A daemon that reads a *mapping* past the end of its file takes SIGBUS, which Python
cannot survive. Two kinds of ring keep that from happening (``matspool._ring``):

- a sealed ``memfd`` (``F_SEAL_SHRINK | F_SEAL_GROW``, checked before mapping): its size
  cannot change, so the daemon maps it and writers read it in place, as before;
- a ``/dev/shm`` file, which cannot be sealed: never mapped. :class:`ShmRing` copies
  each save's bytes with ``preadv`` into buffers of the daemon's own; a ring truncated
  under a save is a short read, a :class:`~matspool.RingError` for that save.

Costs (measured on this project's 2-core CI machine, 64 MiB payloads, page cache warm):
the copy runs at memory bandwidth (about 3-6 GB/s per writer thread; a v5 file of the
same bytes is written at 1-2 GB/s), and holds the save's payload in the daemon's memory
while it is written (at most one ring per writer thread). The sealed mapping costs
nothing per save; its pages are faulted in lazily by the writer that first reads them
(the control thread that answers HELLO never touches them), once per client.

Threads: a :class:`ShmRing` belongs to its client (control thread); writer threads call
``read`` and ``payload``, which use only ``pread`` on a descriptor that stays open while
the client has a job in flight.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

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
        buf = bytearray(nbytes)
        view = memoryview(buf)
        got = 0
        while got < nbytes:
            try:
                n = os.preadv(self.fd, [view[got:]], offset + got)
            except OSError as e:
                raise RingError(f"cannot read the client's ring: {e.strerror}") from e
            if n == 0:
                raise RingError(f"the client's ring shrank under a save: {offset + got} bytes "
                                f"readable, this save needs {offset + nbytes}")
            got += n
        return view

    def payload(self, leaves: Iterable[proto.VarSpec]) -> dict[int, memoryview]:
        """The arrays of a save, by ring offset, copied out of the ring."""
        return {leaf.offset: self.read(leaf.offset, leaf.nbytes) for leaf in leaves if leaf.nbytes}

    def close(self) -> None:
        self.closed = True
