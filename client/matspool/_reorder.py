"""Host arrays whose MATLAB order is a transpose: snapshot now, reorder later.

MATLAB stores column-major; a C-ordered array must have its axes reversed on its way
into the ring, and even the tiled, threaded copy (``_transpose``) runs at 3-5x the time
of a memcpy here. ``save()`` returns once the bytes are safe from the caller, so the
caller only needs a snapshot: a memcpy into a staging area of the ring. The copy thread
then reorders the snapshot into the save's own region, frees the staging area and sends
the WRITE, in save order. Where the ring has no room for staging and region at once,
``_whole`` skips the snapshot and reorders straight into the region.

Threads: ``stage`` runs in the caller's thread; ``HostReorder.wait`` on the copy thread.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from ._numeric import Prepared, copy_host

__all__ = ["DEFER_MIN_BYTES", "AllOf", "HostReorder", "defers", "stage", "staged_bytes"]

DEFER_MIN_BYTES: Final = 1 << 20  # smaller arrays reorder in cache, at about memcpy speed


def defers(p: Prepared) -> bool:
    """Whether ``p``'s copy into the ring is a transpose worth taking off the caller."""
    a = p.array
    return (
        not p.is_cuda
        and p.nbytes >= DEFER_MIN_BYTES
        and a.ndim >= 2
        and a.flags.c_contiguous
        and not a.transpose().flags.c_contiguous
    )


def staged_bytes(p: Prepared) -> int:
    return int(p.array.nbytes)


def stage(p: Prepared, ring: np.ndarray, offset: int) -> Prepared:
    """Snapshot ``p`` (C order, its own dtype) at ``offset``: a plain memcpy."""
    a = p.array
    snap = np.ndarray(a.shape, dtype=a.dtype, buffer=ring, offset=offset)
    np.copyto(snap, a)
    return Prepared(p.name, p.dtype, p.dims, snap, False)


@dataclass(slots=True)
class HostReorder:
    """Snapshots to lay out column-major at their final ring offsets, then the staging
    block is given back (``release``)."""

    items: list[tuple[Prepared, int]]
    ring: Any  # matspool._ring.Ring
    release: Callable[[], None]

    def wait(self) -> None:
        try:
            for p, offset in self.items:
                copy_host(p, self.ring.array, offset)
        finally:
            self.release()


@dataclass(slots=True)
class AllOf:
    """Several copies a save waits for (its CUDA copies and its host reorders)."""

    parts: list[Any]

    def wait(self) -> None:
        errors = []
        for part in self.parts:
            try:
                part.wait()
            except Exception as e:  # noqa: BLE001 - raised below; the others still run: their cleanup frees ring space
                errors.append(e)
        if errors:
            raise errors[0]
