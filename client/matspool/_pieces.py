"""Saves larger than the ring: laid out first, their largest arrays sent in slabs.

The file is laid out first (BEGIN, with the small variables in the ring), then each slab
of an array the planner chose is copied in as ring space frees and written into its place
(PART), then END renames the file into place. Every region is a lease of its own: it
returns to the ring when the daemon answered for it (PART_DONE) or for the whole save
(its END's answer), never on the first ERR while later slabs may still be copying.

Threads: the caller's; it returns when the last slab is in the ring, so for these saves
the caller waits for the disk by as much as the save exceeds the ring.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Final

from . import _protocol as proto
from ._errors import SpoolFull
from ._leases import Lease, Leases
from ._messages import End
from ._numeric import Prepared, copy_host
from ._pending import PendingTable, SaveFuture
from ._planner import Plan

if TYPE_CHECKING:
    from ._copies import CopyPipeline

__all__ = ["send_in_pieces"]

_POLL: Final = 0.05  # how often a slab waiting for room looks whether its save failed


def send_in_pieces(
    plan: Plan,
    seq: int,
    leases: Leases,
    table: PendingTable,
    copies: CopyPipeline,
    *,
    block: bool,
    timeout: float | None,
    stream: Any = None,
) -> SaveFuture:
    """Send a save the planner split (``plan.slabs``); returns its future.

    A CUDA slab's region keeps its copy hold until the copy thread saw its D2H end (the
    ``copied`` list given to ``dispatch``); a slab whose copy could not be queued is
    released only after ``CudaCopier.start`` drained what it had queued, or stays held
    when that drain timed out (:class:`CudaError`): never freed under a running copy.
    """
    assert plan.slabs is not None
    ring = leases.ring
    base = leases.take(plan.total, block=block, timeout=timeout)
    offsets = {key: base.offset + off for key, off in plan.relative.items()}
    save = table.add(seq, plan.path, plan.format, [base], pieces=True)
    request = proto.WriteRequest(
        seq, plan.path, plan.format, plan.fsync, tuple(plan.specs(base.offset)), 0, "begin"
    )
    abandon = True
    try:
        try:
            cuda_items = [(a, offsets[id(a)]) for a in plan.arrays if a.is_cuda]
            for a in plan.arrays:
                if not a.is_cuda:
                    copy_host(a, ring.array, offsets[id(a)])
            copy = (
                copies.cuda(cuda_items[0][0].array.device.index or 0).start(cuda_items, stream)
                if cuda_items
                else None
            )
        except BaseException:
            copies.synchronize()
            leases.copied(base)
            table.discard(seq)
            raise
        copies.dispatch(request, copy, [base], base)
        try:
            for index, (name, v) in enumerate(plan.values.items()):
                if name in plan.slabs:
                    assert isinstance(v, Prepared)
                    _send_slabs(
                        seq,
                        index,
                        v,
                        *plan.slabs[name],
                        save.future,
                        leases,
                        table,
                        copies,
                        block=block,
                        timeout=timeout,
                        stream=stream,
                    )
        except BaseException:
            save.future.observed = True  # save() raises: the caller never gets the future
            raise
        abandon = False
    finally:
        copies.dispatch(End(seq, abandon))
    return save.future


def _take(
    leases: Leases, nbytes: int, future: SaveFuture, *, block: bool, timeout: float | None
) -> Lease | None:
    """A slab's region, or None once the save has failed: the regions it holds return
    only when the daemon answers its END, so waiting for room would wait for itself."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while not future.done():
        left = None if deadline is None else deadline - time.monotonic()
        try:
            return leases.take(
                nbytes, block=block, timeout=_POLL if left is None else max(0.0, min(_POLL, left))
            )
        except SpoolFull:
            if not block or (left is not None and left <= _POLL):
                if future.done():
                    return None
                raise SpoolFull(
                    f"ring full: a slab of {nbytes} bytes did not fit"
                    + (f" after waiting {timeout} s" if block else "")
                ) from None
    return None


def _send_slabs(
    seq: int,
    index: int,
    v: Prepared,
    axis: int,
    per: int,
    future: SaveFuture,
    leases: Leases,
    table: PendingTable,
    copies: CopyPipeline,
    *,
    block: bool,
    timeout: float | None,
    stream: Any = None,
) -> None:
    ring = leases.ring
    plane = v.nbytes // v.dims[axis]
    for k in range(0, v.dims[axis], per):
        if future.done():
            return  # failed already: the daemon's END answer says why
        cut = [slice(None)] * len(v.dims)
        cut[axis] = slice(k, k + per)
        slab = v.array[tuple(cut)]
        piece = Prepared(v.name, v.dtype, tuple(int(d) for d in slab.shape), slab, v.is_cuda)
        lease = _take(leases, piece.nbytes, future, block=block, timeout=timeout)
        if lease is None:
            return  # failed while waiting for room: END goes now, and its answer frees the rest
        if not table.attach(seq, lease):  # the save is gone: this region never goes out
            leases.answered(lease)
            leases.copied(lease)
            return
        copy = None
        try:
            if v.is_cuda:
                copy = copies.cuda(v.array.device.index or 0).start([(piece, lease.offset)], stream)
            else:
                copy_host(piece, ring.array, lease.offset)
        except BaseException:
            copies.synchronize()
            leases.copied(lease)
            table.unsent(seq, "PART", lease)
            raise
        copies.dispatch(proto.Part(seq, index, k * plane, lease.offset, piece.nbytes), copy, [lease], lease)
