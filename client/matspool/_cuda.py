"""CUDA tensors -> ring, with the caller's stream waiting on the GPU only, never on PCIe.

Per device group of a save:

1. **Snapshot on the caller's stream.** A private copy of each tensor, in MATLAB order
   and in the stored dtype (one gather kernel), is made on the caller's current stream
   (or on ``stream=`` when the tensors come from another one). It is ordered after the
   caller's queued kernels and before whatever the caller queues next, so the caller may
   overwrite its tensor right after ``save()`` returns; the wait it costs is that of a
   ``clone()``. The source itself is read only there, so it is not kept alive after.
2. **D2H on matspool's own copy stream.** One stream per device, taken by this module
   (``torch.cuda.Stream(device, priority=-1)``, never ``current_stream()``), waits on an
   event recorded after the snapshot and copies it asynchronously into the page-locked
   ring. ``record_stream`` tells the caching allocator the snapshot is in use on that
   stream, so its memory is never handed out again before the copy ended. The caller's
   stream never waits on the copy stream, so back-to-back saves do not queue the
   caller behind the PCIe traffic of the saves before them.
3. **A GPU memory budget.** Snapshots in flight on a device may take at most its
   staging budget (default ``min(256 MiB, 2 % of the device, half the free memory at
   first use)``; ``$MATSPOOL_CUDA_STAGING_BYTES`` sets it). A device group beyond what is
   left of it, or one whose snapshot raises ``torch.cuda.OutOfMemoryError``, is streamed
   in chunks through two staging buffers of half the budget each; the caller's stream
   waits, on the GPU, for a buffer's previous D2H before refilling it: a PCIe wait,
   never a disk wait. Only when not even two 1 MiB buffers fit is :class:`CudaError`
   raised: never a raw OOM.

Refused: a save while the current stream captures a CUDA graph (:class:`CudaCaptureError`;
a replay would copy into ring offsets long reused). Where the ring could not be
page-locked (``pinned=False``), the D2H of whole snapshots runs on the copy thread,
synchronously into pageable memory, and chunked saves copy each chunk synchronously in
the caller's thread: saves still work, at pageable speed (``_copies`` warns once).

Events are created with ``blocking=True``: the copy thread sleeps in ``synchronize()``
instead of spinning a core per copy.

Threads: ``start`` runs in callers' threads (any number); ``PendingCopy.wait`` on the copy
thread; ``CudaCopier._lock`` guards the streams, budgets and bytes in flight, which both
touch. Everything queued by a ``start`` that raises has ended before it re-raises (item
holds on ring regions may then be released), or it raises :class:`CudaError` saying so.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final, cast

from ._errors import CudaCaptureError, CudaError
from ._numeric import Prepared, torch_dtype

__all__ = [
    "DRAIN_TIMEOUT",
    "MIN_CHUNK",
    "STAGING_ENV",
    "CudaCopier",
    "PendingCopy",
    "eager",
    "refuse_capture",
    "wait_events",
]

STAGING_ENV: Final = "MATSPOOL_CUDA_STAGING_BYTES"
MIN_CHUNK: Final = 1 << 20  # the smallest staging buffer before giving up with CudaError
DRAIN_TIMEOUT: Final = 60.0  # how long a failed start() or synchronize() waits for queued copies
_BUDGET_CAP: Final = 256 << 20
_ALIGN: Final = 64


def refuse_capture() -> None:
    """Raise :class:`CudaCaptureError` if the caller's current CUDA stream is capturing.

    Checked before anything is queued or reserved: a capture in the default ("global")
    mode is invalidated by a synchronizing call from any thread, so nothing may run first.
    Does not initialize CUDA (no capture can exist before it is).
    """
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_initialized():
        return
    if torch.cuda.is_current_stream_capturing():
        raise CudaCaptureError(
            "save() during CUDA graph capture: a captured save would replay into ring regions "
            "long reused. Call save() outside the captured region, on the graph's outputs "
            "after graph.replay()"
        )


_eager_cache: dict[Callable[..., Any], Callable[..., Any]] = {}


def eager(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` behind ``torch.compiler.disable`` once torch's compiler is loaded.

    A ``save()`` inside a ``torch.compile``d function must run eagerly behind a graph
    break: it takes locks, talks to a thread and queues copies, none of which belongs
    in a graph. Without ``torch._dynamo`` imported nothing is compiling, and importing it
    only to wrap would cost seconds, so ``fn`` is returned as it is.
    """
    wrapped = _eager_cache.get(fn)
    if wrapped is not None:
        return wrapped
    if "torch._dynamo" not in sys.modules:
        return fn
    import torch

    wrapped = cast("Callable[..., Any]", torch.compiler.disable(fn, recursive=True))  # type: ignore[no-untyped-call]
    _eager_cache[fn] = wrapped
    return wrapped


def wait_events(events: list[Any], timeout: float | None) -> None:
    """Wait for ``events``; with a timeout, poll (blocking events cannot be bounded) and
    raise :class:`CudaError` when it passes."""
    if timeout is None:
        for ev in events:
            ev.synchronize()
        return
    deadline = time.monotonic() + timeout
    pause = 0.0005
    for ev in events:
        while not ev.query():
            if time.monotonic() >= deadline:
                raise CudaError(
                    f"copies into the ring did not end within {timeout} s: a CUDA stream they "
                    "wait on (the caller's, or stream=) is stuck or far behind"
                )
            time.sleep(pause)
            pause = min(pause * 2, 0.02)


@dataclass(slots=True)
class PendingCopy:
    """What the copy thread waits for before the daemon may read the bytes.

    ``events``: one per device group, recorded after its last D2H (after its snapshot
    where the ring is pageable); ``later``: pageable D2H copies run after the events;
    ``keepalive``: snapshots and staging buffers (also ``record_stream``-ed); ``release``:
    returns budget bytes. Owned by the caller's thread until ``dispatch``, then by the
    copy thread.
    """

    events: list[Any] = field(default_factory=list)
    later: list[Callable[[], None]] = field(default_factory=list)
    keepalive: list[Any] = field(default_factory=list)
    release: list[Callable[[], None]] = field(default_factory=list)

    def wait(self, timeout: float | None = None) -> None:
        """Wait for every event, even after one failed: the ring regions are released
        when this returns, so no copy may still be running into them."""
        first: BaseException | None = None
        for ev in self.events:
            try:
                wait_events([ev], timeout)
            except BaseException as e:  # noqa: BLE001 - re-raised below, after the rest
                first = first or e
        if first is None:
            for fn in self.later:
                try:
                    fn()
                except BaseException as e:  # noqa: BLE001
                    first = first or e
        if first is None or not isinstance(first, CudaError):  # a timeout keeps them alive
            self.keepalive.clear()
            for fn in self.release:
                fn()
            self.release.clear()
        if first is not None:
            raise first


def _split(src: Any, limit: int, start: int = 0) -> Iterator[tuple[Any, int]]:
    """Pieces of ``src`` (row-major order of its elements) of at most ``limit`` elements,
    each with its first element's index; along leading axes, recursing where one row is
    too long."""
    n = src.numel()
    if n == 0:
        return
    if n <= limit or src.ndim == 0:
        yield src, start
        return
    rows = src.shape[0]
    per_row = n // rows
    if per_row <= limit:
        step = max(1, limit // per_row)
        for i in range(0, rows, step):
            yield src[i : i + step], start + i * per_row
        return
    for i in range(rows):
        yield from _split(src[i], limit, start + i * per_row)


class CudaCopier:
    """Queues CUDA tensors' copies into one ring mapping (see the module docstring)."""

    def __init__(self, ring_array: Any, *, pinned: bool = True) -> None:
        import torch

        self._torch = torch
        self._ring = torch.from_numpy(ring_array)  # shares the ring's memory
        self._pinned = pinned
        self._lock = threading.Lock()
        self._streams: dict[int, list[Any]] = {}  # every copy stream drawn, per device
        self._budgets: dict[int, int] = {}
        self._inflight: dict[int, int] = {}

    # -- state shared by callers' threads and the copy thread ---------------------------------
    def _copy_stream(self, index: int, avoid: Any) -> Any:
        """matspool's copy stream on device ``index``, never the stream ``avoid`` (the
        caller's): torch hands streams out round-robin from a pool per priority, so one
        drawn from it could be a stream the caller computes on; then a new one is drawn."""
        torch = self._torch
        with self._lock:
            drawn = self._streams.setdefault(index, [])
            for s in drawn:
                if s.cuda_stream != avoid.cuda_stream:
                    return s
            s = torch.cuda.Stream(device=index, priority=-1)
            if s.cuda_stream == avoid.cuda_stream:  # the next one in the pool is another
                s = torch.cuda.Stream(device=index, priority=-1)
            drawn.append(s)
            return s

    def budget(self, index: int) -> int:
        """Bytes of snapshots device ``index`` may hold in flight; fixed at first use."""
        with self._lock:
            return self._budget(index)

    def _budget(self, index: int) -> int:
        b = self._budgets.get(index)
        if b is None:
            env = os.environ.get(STAGING_ENV)
            if env:
                b = max(0, int(env))
            else:
                free, total = self._torch.cuda.mem_get_info(index)
                b = max(2 * MIN_CHUNK, min(_BUDGET_CAP, total // 50, free // 2))
            self._budgets[index] = b
        return b

    def _reserve(self, index: int, nbytes: int) -> bool:
        with self._lock:
            used = self._inflight.get(index, 0)
            if nbytes and used + nbytes > self._budget(index):
                return False
            self._inflight[index] = used + nbytes
            return True

    def _release(self, index: int, nbytes: int) -> None:
        with self._lock:
            self._inflight[index] -= nbytes

    def inflight(self, index: int) -> int:
        """Snapshot bytes on device ``index`` whose copy has not been waited for."""
        with self._lock:
            return self._inflight.get(index, 0)

    # -- the caller's thread ------------------------------------------------------------------
    def start(self, items: list[tuple[Prepared, int]], stream: Any = None) -> PendingCopy:
        """Queue the copies of ``items`` (variable, ring offset); returns at once.

        ``stream``: the CUDA stream the tensors on its device were produced on, when not
        the caller's current one; the caller's current stream then also waits for the
        snapshot, so it may overwrite them too.
        """
        refuse_capture()
        torch = self._torch
        pending = PendingCopy()
        by_device: dict[int, list[tuple[Prepared, int]]] = {}
        for p, off in items:
            index = p.array.device.index
            by_device.setdefault(torch.cuda.current_device() if index is None else index, []).append((p, off))
        try:
            for index, group in by_device.items():
                with torch.cuda.device(index):
                    caller = torch.cuda.current_stream(index)
                    source = stream if stream is not None and stream.device.index == index else caller
                    nbytes = sum(p.nbytes for p, _ in group)
                    if self._reserve(index, nbytes):
                        try:
                            self._whole(index, group, source, caller, pending)
                        except torch.cuda.OutOfMemoryError:
                            self._release(index, nbytes)
                        else:
                            pending.release.append(functools.partial(self._release, index, nbytes))
                            continue
                    self._chunked(index, group, source, caller, pending)
        except BaseException:
            # Ctrl-C, an OOM on a later device: what was queued ends before the caller
            # may release the regions (bounded; past it, CudaError and the regions stay held)
            self._drain(by_device)
            pending.keepalive.clear()
            for fn in pending.release:
                fn()
            raise
        return pending

    def _ring_view(self, offset: int, nbytes: int, like: Any) -> Any:
        return self._ring[offset : offset + nbytes].view(like.dtype).view(like.shape)

    def _whole(
        self, index: int, group: list[tuple[Prepared, int]], source: Any, caller: Any, pending: PendingCopy
    ) -> None:
        """Snapshot the group whole on ``source``, D2H it on the copy stream."""
        torch = self._torch
        snaps = []
        with torch.cuda.stream(source):
            for p, _ in group:
                snap = torch.empty(p.dims[::-1], dtype=torch_dtype(p.dtype), device=p.array.device)
                # column-major of m == row-major of m with its axes reversed
                snap.copy_(p.array.permute(*range(len(p.dims) - 1, -1, -1)))
                snaps.append(snap)
            snapped = torch.cuda.Event(blocking=True)
            snapped.record(source)
        if source != caller:
            caller.wait_event(snapped)
        copy = self._copy_stream(index, caller)
        copy.wait_event(snapped)
        for snap in snaps:
            snap.record_stream(copy)
        pending.keepalive.extend(snaps)
        if not self._pinned:
            pending.events.append(snapped)
            pending.later.append(functools.partial(self._pageable, copy, group, snaps))
            return
        with torch.cuda.stream(copy):
            for (p, off), snap in zip(group, snaps, strict=True):
                if p.nbytes:
                    self._ring_view(off, p.nbytes, snap).copy_(snap, non_blocking=True)
            done = torch.cuda.Event(blocking=True)
            done.record(copy)
        pending.events.append(done)

    def _pageable(self, copy: Any, group: list[tuple[Prepared, int]], snaps: list[Any]) -> None:
        """On the copy thread, where the ring is not page-locked: a synchronous D2H."""
        with self._torch.cuda.stream(copy):
            for (p, off), snap in zip(group, snaps, strict=True):
                if p.nbytes:
                    self._ring_view(off, p.nbytes, snap).copy_(snap)

    def _staging(self, index: int, source: Any) -> tuple[list[Any], int]:
        """Two staging buffers on ``source``, halving down to MIN_CHUNK on OOM."""
        torch = self._torch
        chunk = max(MIN_CHUNK, self.budget(index) // 2 // _ALIGN * _ALIGN)
        while True:
            try:
                with torch.cuda.stream(source):
                    return [torch.empty(chunk, dtype=torch.uint8, device=index) for _ in range(2)], chunk
            except torch.cuda.OutOfMemoryError:
                if chunk <= MIN_CHUNK:
                    raise CudaError(
                        f"not even 2 x {MIN_CHUNK >> 20} MiB of staging memory is free on "
                        f"cuda:{index} for a save's copy"
                    ) from None
                chunk = max(MIN_CHUNK, chunk // 2 // _ALIGN * _ALIGN)

    def _chunked(
        self, index: int, group: list[tuple[Prepared, int]], source: Any, caller: Any, pending: PendingCopy
    ) -> None:
        """Stream the group through two staging buffers; ``source`` waits for a buffer's
        previous D2H (on the GPU) before refilling it."""
        torch = self._torch
        bufs, chunk = self._staging(index, source)
        copy = self._copy_stream(index, caller)
        for b in bufs:
            b.record_stream(copy)
        pending.keepalive.extend(bufs)
        freed: list[Any] = [None, None]
        ready = None
        k = 0
        for p, off in group:
            if not p.nbytes:
                continue
            dtype = torch_dtype(p.dtype)
            item = dtype.itemsize
            src = p.array.permute(*range(len(p.dims) - 1, -1, -1))
            for piece, first in _split(src, chunk // item):
                b, k = k % 2, k + 1
                n = piece.numel() * item
                with torch.cuda.stream(source):
                    if freed[b] is not None:
                        source.wait_event(freed[b])
                    bufs[b][:n].view(dtype).view(piece.shape).copy_(piece)
                    ready = torch.cuda.Event(blocking=True)
                    ready.record(source)
                dst = self._ring[off + first * item : off + first * item + n]
                copy.wait_event(ready)
                with torch.cuda.stream(copy):
                    if self._pinned:
                        dst.copy_(bufs[b][:n], non_blocking=True)
                        freed[b] = torch.cuda.Event(blocking=True)
                        freed[b].record(copy)
                    else:
                        dst.copy_(bufs[b][:n])  # pageable: returns when the bytes are there
        if ready is not None and source != caller:
            caller.wait_event(ready)
        done = torch.cuda.Event(blocking=True)
        done.record(copy)
        pending.events.append(done)

    def _drain(self, devices: Any, timeout: float | None = DRAIN_TIMEOUT) -> None:
        """Wait for everything queued so far on the copy streams of ``devices``."""
        torch = self._torch
        with self._lock:
            streams = [(i, s) for i, drawn in self._streams.items() if i in devices for s in drawn]
        events = []
        for index, s in streams:
            with torch.cuda.device(index):
                ev = torch.cuda.Event(blocking=True)
                ev.record(s)
                events.append(ev)
        wait_events(events, timeout)

    def synchronize(self, timeout: float | None = DRAIN_TIMEOUT) -> None:
        """Wait until everything queued on matspool's copy streams has ended (bounded:
        :class:`CudaError` after ``timeout``; the regions involved then stay held)."""
        with self._lock:
            devices = list(self._streams)
        self._drain(devices, timeout)
