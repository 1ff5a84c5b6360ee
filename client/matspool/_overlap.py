"""Large saves that fit in the ring: the snapshot overlapped with the daemon's write.

A whole save (``_whole``) copies every byte into the ring, then sends one WRITE: the
daemon starts writing only once the whole snapshot is in, so the file is complete after
the copy *plus* the write (64 MiB here: 7 + 18 ms, where h5py makes one 18.5 ms pass).
A host save of :data:`MIN_BYTES` or more goes instead as a save in pieces (the protocol
of ``_pieces``: BEGIN lays the file out, each PART is written into its place, END renames
the complete file into place), cut into slabs of about :data:`SLAB_BYTES`: each slab's
PART leaves as soon as that slab is in the ring, so the daemon writes slab k while the
caller copies slab k+1. Arrays whose MATLAB order is a transpose (``_reorder.defers``)
are snapshotted whole by the caller (a memcpy into staging) and reordered slab by slab
on the copy thread, each PART leaving after its slab's reorder: the reorder of slab k+1
overlaps the write of slab k. Either way ``save()`` returns once the snapshot is whole,
and the file is published only when complete (END).

Off unless ``MATSPOOL_OVERLAP=1``: it needs a core for the copy and one for the write; on
2 shared cores it measured no gain and kept the caller longer (docs/performance.md, "Large
saves: the snapshot overlapped with the write"), and no machine with more cores has
measured it yet, so it is not a default anywhere.

All ring space (staging, the small variables' region, every slab) is taken at once and
without waiting; where the ring has no room for it now, or the save cannot be cut
(compressed, fsynced, append, a stream step, CUDA tensors, char arrays, a 3-d array to
reorder, a slab wider than :data:`SLAB_BYTES` x 2), ``send_overlapped`` returns None and
the save goes whole.

Threads: the caller's (``Spool._submit``); slab reorders run on the copy thread.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from . import _protocol as proto
from . import _transpose
from ._copies import CopyPipeline
from ._errors import PayloadTooLarge, SpoolFull
from ._leases import Lease, Leases
from ._messages import End
from ._numeric import Prepared, copy_host
from ._pending import PendingTable, SaveFuture
from ._planner import Plan, _in_pieces
from ._reorder import defers, stage, staged_bytes

__all__ = ["ENABLED", "MIN_BYTES", "SLAB_BYTES", "send_overlapped"]

#: Saves this large (their largest array) overlap the snapshot with the write.
MIN_BYTES: Final = 16 << 20


def _on() -> bool:
    """``MATSPOOL_OVERLAP=1`` turns it on (opt-in: see the module docstring)."""
    return os.environ.get("MATSPOOL_OVERLAP", "") == "1"


ENABLED = _on()  # module-level so that tests and benchmarks can set it
#: About this many bytes per slab: each PART costs the daemon a hand-off (0.3-1 ms on
#: 2 busy cores), each slab the wait for its copy before the first write can start.
SLAB_BYTES: Final = 8 << 20


def _eligible(p: Plan) -> bool:
    return (
        ENABLED
        and p.slabs is None
        and p.mode == "write"
        and not p.append
        and not p.level
        and not p.fsync  # a whole save's fsync starts writeback as it writes: kept (unmeasured here)
        and p.format in ("v5", "v7.3")
        and not any(a.is_cuda for a in p.arrays)
        and any(isinstance(v, Prepared) and v.nbytes >= MIN_BYTES for v in p.values.values())
    )


class _Staging:
    """A staging region shared by the reorders of one array's slabs: given back after
    the last one ran (or failed)."""

    def __init__(self, leases: Leases, lease: Lease, uses: int) -> None:
        self._leases = leases
        self._lease = lease
        self._left = uses
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            self._left -= 1
            last = self._left == 0
        if last:
            self._leases.copied(self._lease)


@dataclass(slots=True)
class _SlabReorder:
    """One slab of a snapshot laid out column-major at its region (a ``_copies.Copy``),
    by ``_transpose``'s tiles: torch's strided copy, ``copy_host``'s choice for whole 2-d
    arrays, takes 2-5x as long on a thin column block."""

    piece: Prepared
    ring: Any  # matspool._ring.Ring
    offset: int
    release: Callable[[], None]

    def wait(self) -> None:
        try:
            src = self.piece.array
            dt = np.dtype(self.piece.dtype)
            dest = np.ndarray(self.piece.dims[::-1], dtype=dt, buffer=self.ring.array, offset=self.offset)
            if src.dtype == dt and _transpose.tiled(src, dest):
                _transpose.reverse_axes(src, dest, nthreads=max(1, _transpose.threads - 1))
            else:
                copy_host(self.piece, self.ring.array, self.offset)
        finally:
            self.release()


def _take_all(leases: Leases, sizes: list[tuple[int, bool]]) -> list[Lease] | None:
    """Every region at once, without waiting (``(nbytes, daemon reads it)``), or None."""
    taken: list[Lease] = []
    try:
        for nbytes, daemon in sizes:
            taken.append(leases.take(nbytes, block=False, timeout=None, daemon=daemon))
    except SpoolFull:
        _release(leases, taken)
        return None
    return taken


def _release(leases: Leases, unsent: list[Lease]) -> None:
    """Regions that never went to the daemon (and whose copy never started or ended)."""
    for lease in unsent:
        leases.answered(lease)
        leases.copied(lease)


def send_overlapped(
    whole: Plan,
    seqs: Iterator[int],
    leases: Leases,
    table: PendingTable,
    copies: CopyPipeline,
) -> SaveFuture | None:
    """Send ``whole`` in slabs whose writes overlap their copies; None: send it whole."""
    if not _eligible(whole):
        return None
    try:
        p = _in_pieces(whole, 4 * SLAB_BYTES)
    except PayloadTooLarge:  # a slab too wide, or too much that cannot be cut
        return None
    assert p.slabs is not None
    cuts: list[tuple[int, Prepared, list[tuple[int, int]]]] = []  # var index, array, slabs
    for index, (name, v) in enumerate(p.values.items()):
        if name in p.slabs:
            if not isinstance(v, Prepared) or v.mclass is not None or (defers(v) and v.array.ndim != 2):
                return None  # 3-d reorders of thin slabs run slower than the whole one
            axis, per = p.slabs[name]
            cuts.append((index, v, [(k, min(per, v.dims[axis] - k)) for k in range(0, v.dims[axis], per)]))
    staged = [staged_bytes(v) if defers(v) else 0 for _, v, _ in cuts]
    sizes = [(p.total, True)] + [(n, False) for n in staged if n]
    for _, v, slabs in cuts:
        axis = p.slabs[v.name][0]
        plane = v.nbytes // v.dims[axis]
        sizes += [(n * plane, True) for _, n in slabs]
    taken = _take_all(leases, sizes)
    if taken is None:
        return None
    base, rest = taken[0], taken[1:]
    staging = [rest.pop(0) if n else None for n in staged]
    ring = leases.ring
    seq = next(seqs)
    save = table.add(seq, p.path, p.format, [base], pieces=True)
    request = proto.WriteRequest(seq, p.path, p.format, p.fsync, tuple(p.specs(base.offset)), 0, "begin")
    try:
        for a in p.arrays:
            copy_host(a, ring.array, base.offset + p.relative[id(a)])
    except BaseException:
        _release(leases, [base, *rest])
        for held in staging:
            if held is not None:
                leases.copied(held)
        table.discard(seq)
        raise
    copies.dispatch(request, None, [base], base)
    abandon = True
    try:
        _send_slabs(seq, p, cuts, staging, rest, leases, table, copies)
        abandon = False
    except BaseException:
        save.future.observed = True  # save() raises: the caller never gets the future
        raise
    finally:
        copies.dispatch(End(seq, abandon))
    return save.future


def _send_slabs(
    seq: int,
    p: Plan,
    cuts: list[tuple[int, Prepared, list[tuple[int, int]]]],
    staging: list[Lease | None],
    regions: list[Lease],
    leases: Leases,
    table: PendingTable,
    copies: CopyPipeline,
) -> None:
    """Copy (or snapshot) each array and send its slabs; on a failure every region not
    handed on is released here."""
    assert p.slabs is not None
    ring = leases.ring
    regions = list(regions)
    unstaged = [s for s in staging if s is not None]
    release: Callable[[], None] | None = None
    owed = 0  # slabs of the staged array whose reorder was not queued
    try:
        for (index, v, slabs), held in zip(cuts, staging, strict=True):
            axis = p.slabs[v.name][0]
            plane = v.nbytes // v.dims[axis]
            source = v
            release = None
            if held is not None:
                source = stage(v, ring.array, held.offset)  # the snapshot: a memcpy
                unstaged.remove(held)
                release, owed = _Staging(leases, held, len(slabs)).release, len(slabs)
            for k, n in slabs:
                cut: list[slice] = [slice(None)] * len(v.dims)
                cut[axis] = slice(k, k + n)
                dims = (*v.dims[:axis], n, *v.dims[axis + 1 :])
                piece = Prepared(v.name, v.dtype, dims, source.array[tuple(cut)], False)
                lease = regions.pop(0)
                part = proto.Part(seq, index, k * plane, lease.offset, piece.nbytes)
                if not table.attach(seq, lease):  # failed already: nothing more goes out
                    _release(leases, [lease])
                    if release is not None:
                        owed -= 1
                        release()
                    continue
                if release is not None:  # reordered on the copy thread, then its PART goes
                    owed -= 1
                    copies.dispatch(part, _SlabReorder(piece, ring, lease.offset, release), [lease], lease)
                    continue
                try:
                    copy_host(piece, ring.array, lease.offset)
                except BaseException:
                    leases.copied(lease)
                    table.unsent(seq, "PART", lease)
                    raise
                copies.dispatch(part, None, [lease], lease)
    except BaseException:
        _release(leases, regions)
        for held in unstaged:
            leases.copied(held)
        for _ in range(owed if release is not None else 0):
            release()  # type: ignore[misc]
        raise
