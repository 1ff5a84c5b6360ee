"""This rank's share of a sharded save on the ring side: its blocks cut into pieces (at
most a quarter of the ring each when they exceed it) and copied into the ring.

Split out of ``_shard``, which coordinates the ranks over the store on the save's own
thread; this module never touches the store. ``prepare`` runs in the caller's thread
(a snapshot: the caller may reuse its tensors once ``save()`` returned, unless they
exceed the ring); ``copy_piece`` and ``release`` also on the save's ``matspool-shard``
thread, for the pieces it alone holds by then.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ._leases import Lease
from ._numeric import Prepared, copy_host, torch_dtype
from ._pending import Save
from ._saves import aligned
from ._shard_blocks import Var, boxes, file_format
from ._shard_blocks import variables as rank_blocks

if TYPE_CHECKING:
    from ._spool import Spool

__all__ = ["Piece", "copy_piece", "landed", "prepare", "release"]


@dataclass(slots=True)
class Piece:
    """One PLACE to make: a sub-block of a variable, in the ring once copied."""

    var: Var
    origin: tuple[int, ...]  # the sub-block's first element in the global array (MATLAB)
    shape: tuple[int, ...]
    source: Prepared
    within: tuple[int, ...]  # its first element within ``source``
    ring_offset: int = -1  # where its bytes are in the ring, once copied
    lease: Lease | None = None  # released when the daemon answers this piece's PLACE
    pending: Any = None  # a CUDA piece's D2H in flight (``_cuda.PendingCopy``), until ``landed``

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.var.dtype).itemsize


def copy_piece(spool: Spool, piece: Piece, offset: int, *, wait: bool = True) -> None:
    """Copy ``piece`` into ``spool``'s ring at ``offset`` (column-major). A CUDA piece goes
    through the spool's CUDA copier as a whole CUDA save's variables do (a snapshot on the
    caller's stream, the D2H on matspool's copy stream into the page-locked ring);
    ``wait=False`` leaves the D2H in flight (``piece.pending``: waited for before its PLACE
    goes, or before its region is released)."""
    ring = spool._ring
    assert ring is not None
    p = piece.source
    sub = p.array[tuple(slice(o, o + n) for o, n in zip(piece.within, piece.shape, strict=True))]
    if p.is_cuda and spool._copies is not None:
        copier = spool._copies.cuda(sub.device.index or 0)
        pending = copier.start([(Prepared(p.name, p.dtype, piece.shape, sub, True), offset)])
        piece.ring_offset = offset
        if wait:
            pending.wait(spool.timeout)
        else:
            piece.pending = pending
        return
    if p.is_cuda:  # no copier (no link yet?): one synchronous D2H, widened as prepare() does
        sub = sub.to(torch_dtype(p.dtype)).cpu().resolve_conj().resolve_neg().numpy()
    copy_host(Prepared(p.name, p.dtype, piece.shape, sub, False), ring.array, offset)
    piece.ring_offset = offset


def landed(spool: Spool, piece: Piece) -> None:
    """Wait for ``piece``'s D2H still in flight (a CUDA piece of a snapshot), if any."""
    pending, piece.pending = piece.pending, None
    if pending is not None:
        pending.wait(spool.timeout)


def _snapshot(spool: Spool, pieces: list[Piece], total: int) -> None:
    """Copy every piece now, into ONE region (several could not all be had at once in a
    fragmented ring); the last piece's PLACE holds it: the daemon answers a client's
    PLACEs to one file in order, so that answer comes when all of them are written."""
    lease = spool._leases.take(total, block=spool.on_full == "block", timeout=spool.timeout)
    try:
        at = lease.offset
        for piece in pieces:
            copy_piece(spool, piece, at, wait=False)  # CUDA: the D2H goes on meanwhile
            at += aligned(piece.nbytes)
    except BaseException:
        for piece in pieces:  # no copy may still run into the region when it goes back
            with contextlib.suppress(Exception):
                landed(spool, piece)
        spool._leases.copied(lease)
        spool._leases.answered(lease)
        raise
    spool._leases.copied(lease)
    pieces[-1].lease = lease


def prepare(
    spool: Spool, full: str, variables: Mapping[str, Any], rank: int, oned_as: str, fmt: str
) -> tuple[list[Var], list[Piece], Save]:
    """This rank's blocks, cut into pieces, copied into the ring when they fit; the save
    (its format: ``"auto"`` is v5 when every global variable fits v5, as for any save)."""
    vars_ = rank_blocks(variables, rank, oned_as)
    fmt = file_format(fmt, vars_)
    ring = spool._ring
    assert ring is not None
    pieces: list[Piece] = []
    total = sum(aligned(p.nbytes) for v in vars_ for _, p in v.blocks)
    limit = ring.size if total <= ring.size else max(ring.size // 4, 1)
    for v in vars_:
        item = np.dtype(v.dtype).itemsize
        for origin, p in v.blocks:
            for within, shape in boxes(p.dims, item, limit):
                at = tuple(o + w for o, w in zip(origin, within, strict=True))
                pieces.append(Piece(v, at, shape, p, within))
    total = sum(aligned(p.nbytes) for p in pieces)
    seq = next(spool._seq)
    save = spool._table.add(seq, full, fmt, [])
    try:
        if pieces and total <= ring.size:  # a snapshot now: the caller may change its tensors
            _snapshot(spool, pieces, total)
    except BaseException:
        spool._table.discard(seq)
        raise
    return vars_, pieces, save


def release(spool: Spool, pieces: list[Piece]) -> None:
    for piece in pieces:
        with contextlib.suppress(Exception):  # no copy may still run into a released region
            landed(spool, piece)
        if piece.lease is not None:
            spool._leases.answered(piece.lease)
            piece.lease = None
