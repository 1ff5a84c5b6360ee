"""The client's ring: POSIX shared memory that the daemon maps read-only.

The client is the only producer and the only allocator; the daemon only reads the
ranges a WRITE names and acknowledges them. Space is handed out in order around the
ring and returns when the oldest outstanding save is acknowledged, so acknowledgements
arriving out of order (the daemon writes files in parallel) only delay reuse. Which
region may be freed when is decided in ``_leases``; this module only counts the copies
running into the ring, so that :meth:`Ring.move` can wait for them.

Threads: any; one condition (``_cond``) guards the allocator, the copy count and a move.
"""

from __future__ import annotations

import errno
import mmap
import os
import secrets
import stat
import threading
import time
from collections import OrderedDict
from typing import Final

import numpy as np

from ._errors import PayloadTooLarge, RingError, SpoolFull

__all__ = ["ALIGN", "RING_PREFIX", "SHM_DIR", "Ring", "open_ring_readonly", "ring_path"]

SHM_DIR: Final = "/dev/shm"
RING_PREFIX: Final = "matspool-"
ALIGN: Final = 64  # a cache line; also satisfies every dtype and CUDA's copy engines
_PAGE: Final = mmap.PAGESIZE


def ring_path(name: str) -> str:
    """Where a ring of ``name`` lives; names are checked so no path escapes ``SHM_DIR``."""
    if not name.startswith(RING_PREFIX) or not name.replace("-", "").replace("_", "").isalnum():
        raise RingError(f"invalid ring name {name!r}")
    return os.path.join(SHM_DIR, name)


def _align(n: int) -> int:
    return max(ALIGN, (n + ALIGN - 1) // ALIGN * ALIGN)


class Ring:
    """A pre-faulted shared-memory buffer with a FIFO allocator.

    ``mode`` is the file mode of the segment: owner-only by default, ``0o640`` lets a
    daemon running as another user of the same group map it.
    """

    def __init__(self, nbytes: int, *, mode: int = 0o600) -> None:
        if nbytes < ALIGN:
            raise ValueError(f"ring_bytes must be at least {ALIGN}, got {nbytes}")
        self.size = (nbytes + _PAGE - 1) // _PAGE * _PAGE
        self.name = f"{RING_PREFIX}{os.getpid()}-{secrets.token_hex(6)}"
        self.path = ring_path(self.name)
        self.mode = mode
        self._mm = self._create(self.path, self.size, mode)
        self.array = np.frombuffer(self._mm, dtype=np.uint8)
        self.array[::_PAGE] = 0  # pre-fault: no page fault lands in a save() later
        self._cuda_registered = False
        self._cond = threading.Condition()
        self._live: OrderedDict[int, list[int]] = OrderedDict()  # offset -> [size, freed]
        self._head = 0
        self._tail = 0
        self._writers = 0  # regions handed out whose copy has not ended (see written())
        self._moving = False
        self.closed = False

    @staticmethod
    def _create(path: str, size: int, mode: int) -> mmap.mmap:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
        except OSError as e:
            raise RingError(f"cannot create ring {path}: {e.strerror}") from e
        try:
            os.fchmod(fd, mode)  # the umask must not widen or narrow what was asked for
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as e:
                hint = ""
                if e.errno in (errno.ENOSPC, errno.ENOMEM):
                    hint = (f"; {SHM_DIR} is too small for a {size >> 20} MiB ring "
                            "(in Docker raise --shm-size, or pass a smaller ring_bytes)")
                raise RingError(f"cannot reserve {size} bytes for ring {path}: "
                                f"{e.strerror}{hint}") from e
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        os.close(fd)
        return mm

    def exists(self) -> bool:
        """Whether the segment is still linked under its name (a daemon that declared
        this process dead may have unlinked it)."""
        try:
            return os.stat(self.path).st_size == self.size
        except OSError:
            return False

    def move(self, timeout: float = 30.0) -> None:
        """Go on in a new segment with the same bytes, under a new name (the old one was
        unlinked). New allocations wait meanwhile, and the move waits for every copy into
        the ring to end, so no byte lands in the old mapping after it was copied."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._moving = True
            try:
                while self._writers:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise RingError(f"ring {self.path} was removed and copies into it did not "
                                        f"end within {timeout} s")
                    self._cond.wait(left)
                name = f"{RING_PREFIX}{os.getpid()}-{secrets.token_hex(6)}"
                path = ring_path(name)
                mm = self._create(path, self.size, self.mode)
                registered = self._cuda_registered
                if registered:
                    self._unregister_cuda()
                mm[:] = self._mm  # every live region keeps its offset
                old = self._mm
                self.name, self.path, self._mm = name, path, mm
                self.array = np.frombuffer(mm, dtype=np.uint8)
                if registered:
                    self.register_cuda()
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
                self._cond.wait(remaining)
            self._live[off] = [n, 0]
            self._tail = off + n
            self._writers += 1
            return off

    def written(self) -> None:
        """A region's copy has ended (each alloc is followed by exactly one call)."""
        with self._cond:
            self._writers -= 1
            if self._moving:
                self._cond.notify_all()

    def free(self, offset: int) -> None:
        with self._cond:
            entry = self._live.get(offset)
            if entry is None:
                return
            entry[1] = 1
            while self._live:
                first_off, (_size, freed) = next(iter(self._live.items()))
                if not freed:
                    self._head = first_off
                    break
                self._live.popitem(last=False)
            else:
                self._head = self._tail = 0
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
                    "is probably too low")
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
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        self.array = None  # type: ignore[assignment]
        try:
            self._mm.close()
        except BufferError:
            pass  # a view is still alive somewhere; the mapping goes with it


def open_ring_readonly(name: str, expected_bytes: int) -> tuple[mmap.mmap, int]:
    """Map a client's ring for reading (daemon side); the size must match what it claims.

    Returns the mapping and the open read-only descriptor, which the caller closes: the
    daemon ``fstat``s it before each write, because reading a mapping past the end of a
    file its client has since truncated raises SIGBUS, which would end the daemon.
    """
    path = ring_path(name)
    try:
        # O_NONBLOCK: a FIFO planted under the ring's name must not hang the daemon in open()
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as e:
        raise RingError(f"cannot open ring {path}: {e.strerror}") from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise RingError(f"ring {path} is not a shared-memory segment (not a regular file)")
        size = st.st_size
        if size != expected_bytes or size <= 0:
            raise RingError(f"ring {path} is {size} bytes, the client said {expected_bytes}")
        # MAP_POPULATE: map every page now, once per client, so writers read at memory
        # speed instead of taking a page fault per 4 KiB on each save's first read
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        return mmap.mmap(fd, size, flags, mmap.PROT_READ), fd
    except BaseException:
        os.close(fd)
        raise
