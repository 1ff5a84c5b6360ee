"""Saves that fit in the ring: one region, copied in, then one WRITE.

Host arrays are copied now; arrays whose reorder is slow (``_reorder.defers``) are
snapshotted into a staging region and reordered into place on the copy thread, where the
ring has staging and region free at once (a tight ring: reordered during the copy instead,
which needs half the ring space and lets the previous save's write overlap it); CUDA
tensors start their copies on the copy thread. The WRITE goes when every copy ended
(``_copies``). Saves larger than the ring go in pieces instead (``_pieces``).

Threads: the caller's (``Spool.save``); it waits only for ring space (``on_full``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from . import _protocol as proto
from ._convert import copy_host
from ._copies import Copy, CopyPipeline
from ._errors import SpoolFull
from ._leases import Lease, Leases
from ._pending import PendingTable, SaveFuture
from ._planner import Plan
from ._reorder import AllOf, HostReorder, defers, stage, staged_bytes
from ._ring import Ring
from ._saves import aligned

__all__ = ["send_whole"]


def send_whole(
    p: Plan,
    seqs: Iterator[int],
    ring: Ring,
    leases: Leases,
    table: PendingTable,
    copies: CopyPipeline,
    *,
    block: bool,
    timeout: float | None,
    stream: Any = None,
) -> SaveFuture:
    """Take ring space for ``p`` (and staging for deferred reorders), number the save
    from ``seqs`` once it has its region, copy in and dispatch its WRITE."""
    if not any(a.is_cuda or defers(a) for a in p.arrays):
        return _send_host(p, seqs, ring, leases, table, copies, block=block, timeout=timeout)
    deferred = {id(a): aligned(staged_bytes(a)) for a in p.arrays if defers(a)}
    staging, region = _stage_now(leases, sum(deferred.values()), p.total) if deferred else (None, None)
    if staging is None:
        deferred = {}  # a tight ring: reorder during the copy into the region, as small arrays do
    if region is None:
        region = leases.take(p.total, block=block, timeout=timeout)
    seq = next(seqs)
    save = table.add(seq, p.path, p.format, [region])
    request = proto.WriteRequest(
        seq, p.path, p.format, p.fsync, tuple(p.specs(region.offset)), p.level, p.mode, p.append
    )
    try:
        copy = _copy_in(p, ring, leases, copies, region, staging, deferred, stream)
    except BaseException:
        copies.synchronize()
        leases.copied(region)
        if staging is not None:
            leases.copied(staging)
        table.discard(seq)
        raise
    copies.dispatch(request, copy, [region], region)
    return save.future


def _stage_now(leases: Leases, staged: int, total: int) -> tuple[Lease | None, Lease | None]:
    """Staging and the save's region, where both are free at once; else neither.

    A ring that has no room for both now is a tight ring: the caller would wait for space
    anyway, and reordering straight into the region needs half of it, so the daemon's
    write of the save before overlaps this reorder instead of waiting behind it."""
    if staged + total > leases.ring.size:
        return None, None
    try:
        staging = leases.take(staged, block=False, timeout=None, daemon=False)
    except SpoolFull:
        return None, None
    try:
        return staging, leases.take(total, block=False, timeout=None, nested=True)
    except SpoolFull:
        leases.copied(staging)
        return None, None


def _send_host(
    p: Plan,
    seqs: Iterator[int],
    ring: Ring,
    leases: Leases,
    table: PendingTable,
    copies: CopyPipeline,
    *,
    block: bool,
    timeout: float | None,
) -> SaveFuture:
    """``send_whole`` for host arrays copied here and now (every small save): no staging,
    nothing for the copy thread, the WRITE queued before returning."""
    region = leases.take(p.total, block=block, timeout=timeout)
    seq = next(seqs)
    save = table.add(seq, p.path, p.format, [region])
    base = region.offset
    try:
        for a in p.arrays:
            copy_host(a, ring.array, base + p.relative[id(a)])
    except BaseException:
        leases.copied(region)
        table.discard(seq)
        raise
    specs = tuple(p.specs(base))
    request = proto.WriteRequest(seq, p.path, p.format, p.fsync, specs, p.level, p.mode, p.append)
    copies.dispatch(request, None, [region], region)
    return save.future


def _copy_in(
    p: Plan,
    ring: Ring,
    leases: Leases,
    copies: CopyPipeline,
    region: Lease,
    staging: Lease | None,
    deferred: dict[int, int],
    stream: Any = None,
) -> Copy | None:
    """Copy host arrays now, snapshot those to reorder later, start CUDA copies."""
    offsets = {key: region.offset + off for key, off in p.relative.items()}
    cuda_items, reorders = [], []
    at = staging.offset if staging is not None else 0
    for a in p.arrays:
        if a.is_cuda:
            cuda_items.append((a, offsets[id(a)]))
        elif id(a) in deferred:
            reorders.append((stage(a, ring.array, at), offsets[id(a)]))
            at += deferred[id(a)]
        else:
            copy_host(a, ring.array, offsets[id(a)])
    parts: list[Copy] = (
        [copies.cuda(cuda_items[0][0].array.device.index or 0).start(cuda_items, stream)]
        if cuda_items
        else []
    )
    if reorders:
        assert staging is not None
        parts.append(HostReorder(reorders, ring, lambda: leases.copied(staging)))
    elif staging is not None:
        leases.copied(staging)
    return None if not parts else parts[0] if len(parts) == 1 else AllOf(parts)
