"""``O_DIRECT`` payload writes, straight from the client's ring, for saves that end in fsync.

A save with ``fsync`` waits for the disk anyway; written through the page cache its
payload is first copied there (one ``memcpy`` per byte, plus fresh page-cache pages to
allocate and later write back and drop). With ``O_DIRECT`` the disk reads the bytes from
the ring's own pages (the ring is page-aligned shared memory): no copy, no dirty pages,
and the save's bytes do not push other data out of the page cache.

When (:func:`write_payload`): the daemon runs with ``MATSPOOL_DIRECT_IO=1`` in its
environment, the job asked for ``fsync`` (a thread-local flag set by
``_files.early_writeback``, or ``direct=`` given), the run is at least
:data:`DIRECT_MIN_BYTES`, and the file system says it takes direct I/O:
``statx(STATX_DIOALIGN)`` (Linux 6.1) gives the alignment it needs of memory addresses
and of file offsets. tmpfs, ramfs and others report none, and get buffered writes.

Off by default: on the only machine measured (a 2-core VM whose virtual disk is cached by
its host), direct writes ran at the speed of ``dd oflag=direct`` but no faster than the
buffered path with early writeback (``_files.early_writeback``), which overlaps the copy
with the disk; see ``bench.writestage --fsync``. Where the page cache is the bottleneck
(fast local NVMe, a node short of memory, checkpoints that should not evict the job's
own cached data) it is worth switching on.

How: file offsets and memory addresses must both be multiples of those alignments, so
the run is cut in three: a buffered head up to the first offset where both are aligned,
the aligned middle through a second descriptor opened ``O_DIRECT`` on the same inode
(``/proc/self/fd/N``), and a buffered tail (less than one alignment unit). That works
only when the payload's address and its file offset are congruent modulo the alignment.
v7.3 puts datasets of 4 MiB and more at 512-byte file offsets (``v73.ALIGNMENT``), so its
payloads go direct when their ring region starts on a 512-byte boundary: a ring's first
region is page-aligned, and the ring hands out regions on 64-byte boundaries in order, so
a loop saving tensors of power-of-two sizes keeps every region there. A v5 payload follows
a header whose length depends on the variable's name and rank, seldom in phase with its
ring address. Those are written buffered, as before, and counted in :data:`STATS`.
A direct write refused (EINVAL from ``open`` or ``pwrite``) is retried buffered, and
:data:`STATS` counts it.

Exactness: the kernel keeps direct and buffered writes of one file coherent (a direct
write first writes back, then drops, cached pages over its range), so mixing the two
leaves exactly the bytes written, whatever order; the ``fsync`` of the publish then makes
the new blocks' metadata durable, as for a buffered file.

Threads: any writer thread; :data:`STATS` is updated under its own lock.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np

from ._files import fsync_wanted, pwrite_all

__all__ = ["DIRECT_MIN_BYTES", "STATS", "DirectStats", "dio_alignment", "direct_enabled", "write_payload"]

#: below this a run goes through the page cache: the extra descriptor and the
#: alignment checks are not worth it (and small saves rarely ask for fsync)
DIRECT_MIN_BYTES: Final = 4 << 20
_STEP: Final = 64 << 20  # bytes per direct pwrite: bounds the pages pinned by one call

_STATX_DIOALIGN: Final = 0x2000  # linux/stat.h
_AT_EMPTY_PATH: Final = 0x1000
_STATX_SIZE: Final = 256
_DIO_MEM: Final = 152  # offsets of stx_dio_mem_align, stx_dio_offset_align in struct statx
_DIO_OFFSET: Final = 156

_libc = ctypes.CDLL(None, use_errno=True)
_statx = getattr(_libc, "statx", None)
if _statx is not None:
    _statx.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]
    _statx.restype = ctypes.c_int


@dataclass
class DirectStats:
    """What :func:`write_payload` did with the runs it was asked to write direct."""

    direct_bytes: int = 0  # written with O_DIRECT
    buffered_bytes: int = 0  # asked for, but written through the page cache (why below)
    unsupported: int = 0  # runs on a file system that reports no direct I/O
    misaligned: int = 0  # memory and file offset not congruent modulo the alignment
    refused: int = 0  # the kernel refused O_DIRECT (EINVAL) although statx allowed it
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **counts: int) -> None:
        with self.lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    def reset(self) -> None:
        with self.lock:
            self.direct_bytes = self.buffered_bytes = 0
            self.unsupported = self.misaligned = self.refused = 0


STATS = DirectStats()


def direct_enabled() -> bool:
    """Whether this daemon writes direct at all: only with ``MATSPOOL_DIRECT_IO=1`` in its
    environment (read per save, so a test or bench can switch it)."""
    return os.environ.get("MATSPOOL_DIRECT_IO", "").strip().lower() in ("1", "true", "yes", "on")


def dio_alignment(fd: int) -> tuple[int, int] | None:
    """(memory alignment, file offset alignment) the file system of ``fd`` needs for
    ``O_DIRECT``, or None where it takes none (or the kernel cannot say)."""
    if _statx is None:
        return None
    buf = ctypes.create_string_buffer(_STATX_SIZE)
    if _statx(fd, b"", _AT_EMPTY_PATH, _STATX_DIOALIGN, buf) != 0:
        return None
    raw = buf.raw
    if not int.from_bytes(raw[0:4], "little") & _STATX_DIOALIGN:
        return None
    mem = int.from_bytes(raw[_DIO_MEM : _DIO_MEM + 4], "little")
    off = int.from_bytes(raw[_DIO_OFFSET : _DIO_OFFSET + 4], "little")
    return (mem, off) if mem and off else None


def _buffered(fd: int, view: memoryview, offset: int) -> None:
    pwrite_all(fd, view, offset)


def write_payload(fd: int, data: Any, offset: int, *, direct: bool | None = None) -> None:
    """Write all of ``data`` (any contiguous buffer) at ``offset`` of ``fd``: with
    ``O_DIRECT`` where the rules above allow, else as ``_files.pwrite_all`` does.
    ``direct`` None: as the current job asked (``fsync``, through ``early_writeback``)."""
    view = memoryview(data).cast("B")
    n = len(view)
    if direct is None:
        direct = fsync_wanted()
    if not direct or n < DIRECT_MIN_BYTES or not direct_enabled():
        _buffered(fd, view, offset)
        return
    align = dio_alignment(fd)
    if align is None:
        STATS.add(unsupported=1, buffered_bytes=n)
        _buffered(fd, view, offset)
        return
    mem_align, off_align = align
    addr = np.frombuffer(view, np.uint8).ctypes.data
    head = -offset % off_align
    if (addr + head) % mem_align:
        STATS.add(misaligned=1, buffered_bytes=n)
        _buffered(fd, view, offset)
        return
    body = (n - head) // off_align * off_align
    if body <= 0:
        _buffered(fd, view, offset)
        return
    try:
        dfd = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        STATS.add(refused=1, buffered_bytes=n)
        _buffered(fd, view, offset)
        return
    done = head
    try:
        if head:
            _buffered(fd, view[:head], offset)
        while done < head + body:
            chunk = view[done : min(head + body, done + _STEP)]
            try:
                done += os.pwrite(dfd, chunk, offset + done)  # without the GIL, like pwrite_all
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise
                STATS.add(refused=1)
                break
    finally:
        os.close(dfd)
    STATS.add(direct_bytes=done - head, buffered_bytes=n - (done - head))
    if done < n:
        _buffered(fd, view[done:], offset + done)  # the tail, or all left after a refusal
