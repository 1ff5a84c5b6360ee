"""Ring regions and who may still touch them.

A region of the ring is handed out as a :class:`Lease` with two holds:

- the *copy* hold, while bytes are still being copied into it (the caller's host copy,
  a CUDA copy, a host reorder on the copy thread);
- the *daemon* hold, while the daemon instance it was handed to may still read it: until
  that instance answered for it (DONE, ERR, PART_DONE), or is known dead (its pid is gone,
  or another instance answered on the endpoint), or the region was never sent at all.

The region goes back to the allocator when both holds are released, exactly once. A
silent daemon therefore means backpressure, never reuse of bytes it may still read.

Threads: any. The caller's thread takes leases, the copy thread releases copy holds, the
I/O thread releases daemon holds; one lock (``Leases._lock``) guards every lease.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from ._ring import Ring

__all__ = ["Lease", "Leases"]


class Lease:
    """One region of the ring; see the module docstring for its holds."""

    __slots__ = ("copying", "daemon", "freed", "instance", "nbytes", "offset")

    def __init__(self, offset: int, nbytes: int, daemon: bool) -> None:
        self.offset = offset
        self.nbytes = nbytes
        self.copying = True
        self.daemon = daemon
        self.instance: str | None = None  # the daemon instance it was handed to
        self.freed = False

    def __repr__(self) -> str:
        return (
            f"Lease(offset={self.offset}, nbytes={self.nbytes}, copying={self.copying}, "
            f"daemon={self.daemon}, instance={self.instance!r})"
        )


class Leases:
    """The ring's regions in use, with their holds."""

    def __init__(self, ring: Ring) -> None:
        self.ring = ring
        self._lock = threading.Lock()  # nobody waits on a lease: a plain lock, not a condition

    def take(
        self, nbytes: int, *, block: bool, timeout: float | None, daemon: bool = True, nested: bool = False
    ) -> Lease:
        """Reserve ``nbytes`` (waiting or raising :class:`SpoolFull` by the policy given).

        ``daemon=False``: a region the daemon never reads (a host reorder's staging).
        ``nested``: the caller holds another lease whose copy has not ended yet.
        """
        offset = self.ring.alloc(nbytes, block=block, timeout=timeout, nested=nested)
        return Lease(offset, nbytes, daemon)

    def copied(self, lease: Lease) -> None:
        """The copy into ``lease`` has ended (or will never run)."""
        with self._lock:
            if not lease.copying:
                return
            lease.copying = False
            free = self._settle(lease)
        self.ring.written()
        if free:
            self.ring.free(lease.offset)

    def answered(self, lease: Lease) -> None:
        """The daemon will not read ``lease`` any more (it answered, it is dead, or the
        region was never sent to it)."""
        self.answered_all((lease,))

    def answered_all(self, leases: Iterable[Lease]) -> None:
        """``answered`` of each of ``leases`` (one DONE's saves), each lock taken once."""
        free: list[int] = []
        with self._lock:
            for lease in leases:
                if lease.daemon:
                    lease.daemon = False
                    if self._settle(lease):
                        free.append(lease.offset)
        if free:
            self.ring.free_all(free)

    def _settle(self, lease: Lease) -> bool:
        if lease.copying or lease.daemon or lease.freed:
            return False
        lease.freed = True
        return True
