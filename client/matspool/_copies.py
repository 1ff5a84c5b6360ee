"""The copy pipeline: a save's message leaves only once the bytes it names are in the ring.

Host arrays are copied by the caller before ``dispatch``; CUDA copies and host reorders
(``_cuda``, ``_reorder``) end later, on the copy thread (started on first need), which
waits for each in order, releases the copy holds of the regions involved, and passes the
message on. While anything is queued there, every message queues behind it, so saves to
one path, a stream's steps and a big save's pieces reach the daemon in save order.

The CUDA copier is made on the first CUDA save, which page-locks the ring from the
context of that save's device (not GPU 0 for every rank), once, under ``_lock`` (two
threads' first saves). Where page-locking is refused (memlock limit, a driver without
host registration) saves still work through pageable memory, and a ``RuntimeWarning``
says so once per process.

Threads: ``dispatch`` runs in callers' threads; the copy thread owns the queue's items;
``_lock`` guards the queue count, the thread and the copier.
"""

from __future__ import annotations

import queue
import threading
import warnings
from collections.abc import Callable
from typing import Any, Protocol

from ._errors import MatspoolError, RingError
from ._leases import Lease, Leases
from ._pending import PendingTable
from ._ring import Ring

__all__ = ["Copy", "CopyPipeline"]


class Copy(Protocol):
    """Something still copying into the ring (a CUDA copy, a host reorder, several)."""

    def wait(self) -> None: ...


Send = Callable[[Any, "Lease | None"], None]

_warned_pageable = False  # the pageable fallback is reported once per process


def _pin(ring: Ring, device: int) -> bool:
    """Page-lock ``ring`` from ``device``'s context; False (warned once) where refused."""
    global _warned_pageable
    try:
        ring.register_cuda(device)
    except RingError as e:
        if not _warned_pageable:
            _warned_pageable = True
            warnings.warn(
                f"matspool: {e}. CUDA saves go through pageable memory instead: they "
                "still work, but each device-to-host copy is synchronous and slower",
                RuntimeWarning,
                stacklevel=4,
            )
        return False
    return True


class CopyPipeline:
    def __init__(self, ring: Ring, leases: Leases, table: PendingTable, send: Send) -> None:
        self._ring = ring
        self._leases = leases
        self._table = table
        self._send = send
        self._lock = threading.Lock()
        self._queued = 0  # messages in the queue or being handled by the copy thread
        self._queue: queue.SimpleQueue[tuple[Copy, Any, list[Lease], Lease | None] | None] = (
            queue.SimpleQueue()
        )
        self._thread: threading.Thread | None = None
        self._copier: Any = None
        self._copier_for: Any = None  # the ring mapping the copier writes into

    def cuda(self, device: int) -> Any:
        """The CUDA copier; the first call page-locks the ring from ``device``'s context
        (12 ms per 256 MiB), or falls back to pageable copies where that is refused."""
        with self._lock:
            if self._copier is None or self._copier_for is not self._ring.array:
                from ._cuda import CudaCopier  # (again after the ring moved: Ring.move)

                pinned = self._ring.cuda_registered or _pin(self._ring, device)
                self._copier = CudaCopier(self._ring.array, pinned=pinned)
                self._copier_for = self._ring.array
            return self._copier

    def synchronize(self) -> None:
        """Wait for every CUDA copy queued (after a save failed halfway through its start)."""
        if self._copier is not None:
            self._copier.synchronize()

    def dispatch(
        self,
        message: Any,
        copy: Copy | None = None,
        copied: list[Lease] | tuple[()] = (),
        lease: Lease | None = None,
    ) -> None:
        """Send ``message`` once ``copy`` has ended; ``copied``: the leases whose copy hold
        ends with it; ``lease``: the region the message names (see ``Link.send``)."""
        if copy is None:
            for held in copied:  # the caller's host copies: done already
                self._leases.copied(held)
        with self._lock:
            if copy is None and self._queued == 0:
                self._send(message, lease)
                return
            self._queued += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="matspool-copy", daemon=True)
                self._thread.start()
        self._queue.put((copy, message, list(copied) if copy is not None else [], lease))  # type: ignore[arg-type]

    def _loop(self) -> None:
        while (item := self._queue.get()) is not None:
            copy, message, copied, lease = item
            try:
                if copy is not None:
                    copy.wait()
            except Exception as e:  # noqa: BLE001 - a CUDA error (any type): the bytes never arrived
                self._table.fail(message.seq, MatspoolError(f"copy into the ring failed: {e}"))
                self._table.unsent(message.seq, message.OP, lease)
            else:
                # the bytes are in: release the copy holds before the daemon can answer, so a
                # caller its answer wakes finds the region free (not after a race with us)
                for held in copied:
                    self._leases.copied(held)
                copied = []
                self._send(message, lease)
            finally:
                for held in copied:
                    self._leases.copied(held)
                with self._lock:
                    self._queued -= 1

    def close(self, timeout: float | None = None) -> bool:
        """Stop the copy thread once what is queued has been passed on; False when it
        is still waiting on a copy after ``timeout`` (a stuck CUDA stream): the ring must
        then stay mapped until :meth:`after_copies` runs its callback."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def after_copies(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` (unmapping the ring) once the copy thread has ended, on a thread of
        its own: the GPU may still write into the ring until then."""
        thread = self._thread
        assert thread is not None

        def later() -> None:
            thread.join()
            fn()

        threading.Thread(target=later, name="matspool-unmap", daemon=True).start()
