"""Saves larger than the ring: laid out first, their largest arrays sent in slabs."""

from __future__ import annotations

import threading
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from . import _protocol as proto
from ._convert import Prepared, Value, copy_host, iter_arrays, to_spec
from ._errors import PayloadTooLarge
from ._saves import End, Pending, SaveResult, place

if TYPE_CHECKING:
    from ._ring import Ring

__all__ = ["PiecesMixin"]


class PiecesMixin:
    """The in-pieces half of :class:`matspool.Spool` (a mixin: it shares the spool's state)."""

    on_full: str
    timeout: float | None
    _lock: threading.Lock
    _pending: dict[int, Pending]
    _ring: Ring | None
    _seq: Any

    if TYPE_CHECKING:  # the spool's side, used here
        def _dispatch(self, message: Any, copy: Any = None, hold: bool = False) -> None: ...

        def _cuda(self) -> Any: ...

    def _submit_in_pieces(self, abspath: str, values: dict[str, Value], fmt: str, fsync: bool,
                          level: int) -> Future[SaveResult]:
        """A save larger than the ring: its largest arrays travel in slabs.

        The file is laid out first (BEGIN, with the small variables in the ring), then
        each slab of a deferred array is copied in as ring space frees and written into
        its place (PART), then END renames the file into place. This call returns when
        the last slab is in the ring: for these saves the caller waits for the disk by as
        much as the save exceeds the ring.
        """
        ring = self._ring
        assert ring is not None
        if level:
            raise PayloadTooLarge(f"a compressed save must fit in the ring ({ring.size} bytes); "
                                  "raise ring_bytes or save uncompressed")
        budget = ring.size // 4
        names = list(values)
        deferred: dict[str, tuple[int, int]] = {}  # name -> (axis, planes per slab)
        rest = sum(a.nbytes for v in values.values() for a in iter_arrays(v))
        for name in sorted(names, key=lambda n: -sum(a.nbytes for a in iter_arrays(values[n]))):
            v = values[name]
            if rest <= budget or not isinstance(v, Prepared) or v.nbytes <= budget // 4:
                break
            axis = max(i for i, d in enumerate(v.dims) if d > 1)  # slabs along it are contiguous
            plane = v.nbytes // v.dims[axis]
            if plane > ring.size // 2:
                raise PayloadTooLarge(
                    f"variable {name!r}: one slab along its last dimension is {plane} bytes; a save "
                    f"in pieces needs a ring of at least twice that (ring_bytes={ring.size})")
            deferred[name] = (axis, max(1, budget // plane))
            rest -= v.nbytes
        if rest > ring.size // 2:
            raise PayloadTooLarge(f"this save's variables that cannot be split take {rest} bytes; "
                                  f"the ring holds {ring.size}: raise ring_bytes")
        small = [a for n, v in values.items() if n not in deferred for a in iter_arrays(v)]
        relative, total = place(small)
        base = ring.alloc(total, block=self.on_full == "block", timeout=self.timeout)
        offsets = {key: base + off for key, off in relative.items()}
        specs = [proto.VarSpec(n, v.dtype, v.dims, 0, v.nbytes, deferred=True)  # type: ignore[union-attr]
                 if n in deferred else to_spec(n, v, offsets) for n, v in values.items()]
        seq = next(self._seq)
        fut: Future[SaveResult] = Future()
        fut.set_running_or_notify_cancel()
        pending = Pending(fut, base, abspath, fmt, parts=set())
        with self._lock:
            self._pending[seq] = pending
        abandon = True
        try:
            cuda_items = [(a, offsets[id(a)]) for a in small if a.is_cuda]
            for a in small:
                if not a.is_cuda:
                    copy_host(a, ring.array, offsets[id(a)])
            self._dispatch(proto.WriteRequest(seq, abspath, fmt, fsync, tuple(specs), 0, "begin"),
                           self._cuda().start(cuda_items) if cuda_items else None)
            for index, name in enumerate(names):
                if name in deferred:
                    self._send_slabs(seq, index, values[name], *deferred[name], pending)  # type: ignore[arg-type]
            abandon = False
        finally:
            self._dispatch(End(seq, abandon))
        return fut

    def _send_slabs(self, seq: int, index: int, v: Prepared, axis: int, per: int, pending: Pending) -> None:
        ring = self._ring
        assert ring is not None and pending.parts is not None
        plane = v.nbytes // v.dims[axis]
        for k in range(0, v.dims[axis], per):
            if pending.future.done():
                return  # failed already: the daemon's END answer says why
            cut = [slice(None)] * len(v.dims)
            cut[axis] = slice(k, k + per)
            slab = v.array[tuple(cut)]
            piece = Prepared(v.name, v.dtype, tuple(int(d) for d in slab.shape), slab, v.is_cuda)
            off = ring.alloc(piece.nbytes, block=self.on_full == "block", timeout=self.timeout)
            with self._lock:
                pending.parts.add(off)
            copy = None
            if v.is_cuda:
                copy = self._cuda().start([(piece, off)])
            else:
                copy_host(piece, ring.array, off)
            self._dispatch(proto.Part(seq, index, k * plane, off, piece.nbytes), copy)
