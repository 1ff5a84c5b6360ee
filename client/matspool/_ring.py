"""The client's ring: shared memory that the daemon reads and never writes.

The client is the only producer and the only allocator; the daemon only reads the
ranges a WRITE names and acknowledges them. Space is handed out in order around the
ring and returns when the oldest outstanding save is acknowledged, so acknowledgements
arriving out of order (the daemon writes files in parallel) only delay reuse. Which
region may be freed when is decided in ``_leases``; this module only counts the copies
running into the ring, so that :meth:`Ring.move` can wait for them.

**A client cannot change its ring's size under the daemon.** A daemon that maps a file
and reads past its end takes SIGBUS and dies, with every other client's writer; a
client (by mistake or on purpose) that truncates its ring during a long write would do
that. So a ring is one of two kinds:

- ``memfd`` (the default): ``memfd_create`` sized once, then sealed with
  ``F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL``: from then on ``ftruncate`` fails with
  EPERM for everyone, the client too. It has no name in any directory; the daemon opens
  it as ``/proc/<pid>/fd/<fd>`` (which the kernel allows to the same user, or root),
  checks that the file it got is the memfd named ``matspool-<pid>-<token>`` (the token
  is 96 random bits only the client and the daemon know) and that both seals are set,
  and maps it. It goes away with the last descriptor and mapping: a dead client leaves
  nothing behind in ``/dev/shm``.
- ``shm``: a file in ``/dev/shm``, for a daemon that cannot open ``/proc/<pid>/fd`` (it
  runs as another user of the group: ``mode=0o640``, or in another pid namespace). Such
  a file cannot be sealed, so the daemon does not map it: it copies each save's bytes
  with ``preadv`` into its own buffers (``matspoold.ringio``). A truncated ring then gives
  a short read, an error for that save, never SIGBUS. The copy costs about what a
  ``memcpy`` of the payload costs (see the module docstring of ``matspoold.ringio``).

A ``memfd`` ring refused by the daemon for a reason a ``shm`` ring fixes (``_link``
decides, by the errno of the refusal) is moved to ``shm`` (:meth:`Ring.move`).

Naming and creating the segments is in ``_segment``; the daemon's side (opening a
client's ring, checking its seals, mapping it) in ``_ringopen``; this module is the
client's ring: the allocator, a move, CUDA page-locking, close and fork.

Threads: any; one condition (``_cond``, over the lock ``lock``) guards the allocator,
the copy count and a move. A small save (``_quick``) holds ``lock`` itself (a C-level
lock, where the condition's ``with`` is two Python calls) around its allocation
(``take_held``) and its copy.
"""

from __future__ import annotations

import mmap
import os
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any, Final, Literal

import numpy as np

from ._errors import PayloadTooLarge, RingError, SpoolFull
from ._ringopen import open_ring_readonly
from ._segment import RING_PREFIX, SHM_DIR, RingKind, create_memfd, create_shm, new_name, ring_path

# RING_PREFIX, SHM_DIR and open_ring_readonly are re-exported: tests and their fake daemon
# import them from here
__all__ = ["ALIGN", "RING_PREFIX", "SHM_DIR", "Ring", "open_ring_readonly"]

ALIGN: Final = 64  # a cache line; also satisfies every dtype and CUDA's copy engines
_PAGE: Final = mmap.PAGESIZE

_LIVE: weakref.WeakSet[Ring] = weakref.WeakSet()  # for the fork hook below


def _align(n: int) -> int:
    return max(ALIGN, (n + ALIGN - 1) // ALIGN * ALIGN)


class Ring:
    """A pre-faulted shared-memory buffer with a FIFO allocator.

    ``mode`` is the file mode of a ``shm`` segment: owner-only by default, ``0o640``
    lets a daemon running as another user of the same group read it. ``kind``: ``memfd``
    (sealed; see the module docstring), ``shm``, or ``auto``: ``memfd`` unless ``mode``
    opens the ring to others, who could not reach a memfd through ``/proc``.
    """

    def __init__(self, nbytes: int, *, mode: int = 0o600, kind: RingKind | Literal["auto"] = "auto") -> None:
        if nbytes < ALIGN:
            raise ValueError(f"ring_bytes must be at least {ALIGN}, got {nbytes}")
        self.size = (nbytes + _PAGE - 1) // _PAGE * _PAGE
        self.mode = mode
        self.kind: RingKind = kind if kind != "auto" else ("memfd" if not mode & 0o077 else "shm")
        self.name = new_name()
        self.fd = -1  # a memfd ring's descriptor, kept open: the daemon reaches it through it
        self.path = ""
        self._mm = self._make(self.kind, self.name)
        self.array = np.frombuffer(self._mm, dtype=np.uint8)
        self.array[::_PAGE] = 0  # pre-fault: no page fault lands in a save() later
        self._cuda_registered = False
        self._views: dict[np.dtype[Any], np.ndarray] = {}  # the mapping as each dtype (view())
        self.lock = threading.RLock()  # the allocator's, under _cond (see take_held)
        self._cond = threading.Condition(self.lock)
        self._live: OrderedDict[int, list[int]] = OrderedDict()  # offset -> [size, freed]
        self._head = 0
        self._tail = 0
        self._writers = 0  # regions handed out whose copy has not ended (see written())
        self._waiting = 0  # allocs waiting for room (free_all wakes them)
        self._moving = False
        self.closed = False
        self._pid = os.getpid()
        _LIVE.add(self)

    def _make(self, kind: RingKind, name: str) -> mmap.mmap:
        """Create the segment ``name`` of ``kind``; sets ``fd`` and ``path``."""
        if kind == "memfd":
            fd, mm = create_memfd(name, self.size)
            self.fd, self.path = fd, f"/proc/{os.getpid()}/fd/{fd}"
            return mm
        path = ring_path(name)
        mm = create_shm(path, self.size, self.mode)
        self.fd, self.path = -1, path
        return mm

    def exists(self) -> bool:
        """Whether the daemon can still reach the segment: a ``memfd`` always can (nobody
        can take it from us); a ``shm`` one is gone if a daemon that declared this process
        dead unlinked it."""
        if self.kind == "memfd":
            return not self.closed
        try:
            return os.stat(self.path).st_size == self.size
        except OSError:
            return False

    def move(self, timeout: float = 30.0, *, kind: RingKind | None = None) -> None:
        """Go on in a new segment (of ``kind``, else the same kind) with the same bytes,
        under a new name: the old one was unlinked, or a daemon cannot reach a memfd.
        New allocations wait meanwhile, and the move waits for every copy into the ring
        to end, so no byte lands in the old mapping after it was copied."""
        deadline = time.monotonic() + timeout
        with self._cond:
            if self.closed:  # the spool closed while its I/O thread re-registered
                raise RingError(f"ring {self.name} was closed: it cannot move")
            self._moving = True
            try:
                while self._writers:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise RingError(
                            f"ring {self.name} must move and copies into it did not end within {timeout} s"
                        )
                    self._cond.wait(left)
                old_kind, old_fd, old_path = self.kind, self.fd, self.path
                new_kind = kind or self.kind
                name = new_name()
                mm = self._make(new_kind, name)
                registered = self._cuda_registered
                if registered:
                    self._unregister_cuda()
                mm[:] = self._mm  # every live region keeps its offset
                old = self._mm
                self.name, self.kind, self._mm = name, new_kind, mm
                self.array = np.frombuffer(mm, dtype=np.uint8)
                self._views = {}
                if registered:
                    self.register_cuda()
                if old_fd >= 0:
                    os.close(old_fd)
                elif old_kind == "shm" and old_path != self.path:
                    try:
                        os.unlink(old_path)  # usually gone already (that is why we moved)
                    except FileNotFoundError:
                        pass
                try:
                    old.close()
                except BufferError:
                    pass  # a view is still alive somewhere; the mapping goes with it
            finally:
                self._moving = False
                self._cond.notify_all()

    # -- allocation ------------------------------------------------------------------
    @property
    def used(self) -> int:
        with self._cond:
            return sum(s for s, _ in self._live.values())

    def _fit(self, n: int) -> int | None:
        if not self._live:
            self._head = self._tail = 0
            return 0 if n <= self.size else None
        # Live bytes run from head (the oldest save) to tail (the end of the newest); they
        # have wrapped when the newest save starts before the oldest. head == tail alone
        # cannot tell a full ring from an empty one, which is why this asks the order.
        wrapped = next(reversed(self._live)) < self._head
        if not wrapped:
            if self.size - self._tail >= n:
                return self._tail
            return 0 if n <= self._head else None
        return self._tail if self._head - self._tail >= n else None

    def alloc(self, nbytes: int, *, block: bool, timeout: float | None, nested: bool = False) -> int:
        """Reserve ``nbytes``; returns the offset. Waits or raises by the policy given.

        ``nested``: the caller already holds a region whose copy has not ended; it must
        not wait for a move, which waits for that copy."""
        n = _align(nbytes)
        if n > self.size:
            raise PayloadTooLarge(
                f"this save needs {nbytes} bytes but the ring holds {self.size}; "
                "create the Spool with a larger ring_bytes"
            )
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while (self._moving and not nested) or (off := self._fit(n)) is None:
                if self.closed:
                    raise RingError("ring is closed")
                remaining = None if deadline is None else deadline - time.monotonic()
                if not block or (remaining is not None and remaining <= 0):
                    free = self.size - sum(s for s, _ in self._live.values())
                    raise SpoolFull(
                        f"ring full: {nbytes} bytes wanted, {free}"
                        f" of {self.size} free" + ("" if not block else f" after waiting {timeout} s")
                    )
                self._waiting += 1
                try:
                    self._cond.wait(remaining)
                finally:
                    self._waiting -= 1
            self._live[off] = [n, 0]
            self._tail = off + n
            self._writers += 1
            return off

    def take_held(self, n: int) -> int:
        """``alloc`` of ``n`` bytes (a multiple of ALIGN, at most ``size``) by a caller that
        holds ``lock`` and copies into the region before it releases it (``_quick``'s small
        saves): no move can run meanwhile, so that copy is not counted in ``_writers``.
        Never waits: the offset, or -1 when the ring has no room now, is moving or is
        closed (the caller then takes the general path, which waits or raises)."""
        if self._moving or self.closed:
            return -1
        off = self._fit(n)
        if off is None:
            return -1
        self._live[off] = [n, 0]
        self._tail = off + n
        return off

    def view(self, dtype: np.dtype[Any]) -> np.ndarray:
        """The whole mapping as ``dtype`` (kept until the ring moves or closes). Only
        while a region is being copied into (before its ``written()``, or under ``lock``),
        when the mapping cannot move."""
        views = self._views
        v = views.get(dtype)
        if v is None:
            v = views[dtype] = self.array.view(dtype)
        return v

    def written(self) -> None:
        """A region's copy has ended (each alloc is followed by exactly one call)."""
        with self.lock:
            self._writers -= 1
            if self._moving:
                self._cond.notify_all()

    def free(self, offset: int) -> None:
        self.free_all((offset,))

    def free_all(self, offsets: Iterable[int]) -> None:
        """Free the regions at ``offsets`` (unknown ones are ignored), under the lock once."""
        with self.lock:  # _cond's own lock, without the condition's Python-level __enter__
            known = False
            for offset in offsets:
                entry = self._live.get(offset)
                if entry is not None:
                    entry[1] = 1
                    known = True
            if not known:
                return
            while self._live:
                first_off, (_size, freed) = next(iter(self._live.items()))
                if not freed:
                    self._head = first_off
                    break
                self._live.popitem(last=False)
            else:
                self._head = self._tail = 0
            # the newest regions freed before older ones (reservations given back at once,
            # ``_overlap``): their space goes back to the tail, not only once the oldest is free
            while self._live:
                last_off, (size, freed) = next(reversed(self._live.items()))
                if not freed:
                    self._tail = last_off + size
                    break
                self._live.popitem(last=True)
            if self._waiting:  # an alloc waits for room (one a DONE frees, most often has none)
                self._cond.notify_all()

    # -- CUDA ------------------------------------------------------------------------
    def register_cuda(self, device: int | None = None) -> None:
        """Page-lock the ring for CUDA so device-to-host copies are truly asynchronous.

        From ``device``'s context (default: the one used before a move, else the current
        device), so a rank that saves from GPU 3 never creates a context on GPU 0. Once:
        idempotent under the ring's lock. The call runs on a helper thread, because a
        refused ``cudaHostRegister`` leaves a pending error in its thread that the next
        kernel launch there would report as its own; it is also cleared with
        ``cudaGetLastError`` where the process's libcudart is found. Raises
        :class:`RingError` with CUDA's name for the error.
        """
        import torch

        with self._cond:
            if self._cuda_registered:
                return
            if device is None:
                device = getattr(self, "_cuda_device", None)
            if device is None:
                device = torch.cuda.current_device()
            cudart = torch.cuda.cudart()  # type: ignore[no-untyped-call]
            outcome: dict[str, object] = {}

            def clear_error() -> None:  # cudaGetLastError on the libcudart torch loaded, if found
                import ctypes

                try:
                    with open("/proc/self/maps") as maps:
                        path = next((ln.split()[-1] for ln in maps if "libcudart.so" in ln), None)
                    if path is not None:
                        ctypes.CDLL(path).cudaGetLastError()
                except OSError:
                    pass  # the helper thread ends, and its pending error with it

            def register() -> None:
                try:
                    with torch.cuda.device(device):
                        # cudaHostRegisterPortable: pinned for every device's context
                        code = int(cudart.cudaHostRegister(self.array.ctypes.data, self.size, 1))
                        outcome["code"] = code
                        if code:
                            outcome["text"] = str(cudart.cudaGetErrorString(cudart.cudaError(code)))
                            clear_error()
                except BaseException as e:  # noqa: BLE001 - reported in the caller's thread
                    outcome["error"] = e

            helper = threading.Thread(target=register, name="matspool-pin", daemon=True)
            helper.start()
            helper.join()
            if "error" in outcome:
                raise RingError(f"cannot page-lock the ring for CUDA: {outcome['error']}") from None
            if outcome.get("code"):
                raise RingError(
                    f"cudaHostRegister of the {self.size >> 20} MiB ring failed: {outcome.get('text')} "
                    f"(cudaError {outcome['code']}); the memlock limit (ulimit -l, container memlock) "
                    "is probably too low"
                )
            self._cuda_device = device
            self._cuda_registered = True

    @property
    def cuda_registered(self) -> bool:
        return self._cuda_registered

    def _unregister_cuda(self) -> None:
        import torch

        torch.cuda.cudart().cudaHostUnregister(self.array.ctypes.data)  # type: ignore[no-untyped-call]
        self._cuda_registered = False

    def close(self) -> None:
        with self._cond:
            if self.closed:
                return
            self.closed = True
            self._cond.notify_all()
        if self._cuda_registered:
            self._unregister_cuda()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        elif self.kind == "shm":
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        self.array = None  # type: ignore[assignment]
        self._views = {}
        try:
            self._mm.close()
        except BufferError:
            pass  # a view is still alive somewhere; the mapping goes with it

    def _forked(self) -> None:
        """In a forked child: the parent's memfd descriptor is not ours to keep (it
        would hold the parent's ring alive after the parent closed it)."""
        if self.fd >= 0 and self._pid != os.getpid():
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = -1


def _after_fork_in_child() -> None:
    for ring in list(_LIVE):
        ring._forked()


os.register_at_fork(after_in_child=_after_fork_in_child)
