"""The daemon's side of a client's ring: opening it read-only, checking it cannot change
size under a read, and mapping it (a sealed ``memfd``) or not (a ``shm`` file).

The client creates rings (``_ring``, ``_segment``); only the daemon opens another
process's ring, and everything it checks before trusting one is here: that a ``memfd``
reached through ``/proc/<pid>/fd`` is the memfd of that name, carries the seals, is plain
shared memory (not hugetlb), and has the size its client claims.

Threads: no state; any thread (the daemon's control thread calls it on HELLO).
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import stat
from typing import Any, Final

from ._errors import RingError
from ._segment import SEALS, memfd_link, ring_path

__all__ = ["open_ring_readonly"]


_TMPFS_MAGIC: Final = 0x01021994


_libc: Any = None


def _fs_type(fd: int) -> int | None:
    """``f_type`` of the filesystem of ``fd`` (None where ``fstatfs`` cannot tell).

    ``fstatfs`` is looked up in the process's own symbols (libc is loaded already), once:
    ``ctypes.util.find_library`` runs ``ldconfig -p`` in a subprocess, which forked the
    daemon on every HELLO and held its control thread 2-5 ms per client (py-spy of
    ``bench.producers``)."""
    global _libc
    if _libc is None:
        import ctypes

        try:
            _libc = ctypes.CDLL(None, use_errno=True)
        except OSError:
            return None
    import ctypes

    buf = ctypes.create_string_buffer(256)  # struct statfs: f_type is its first word
    if _libc.fstatfs(fd, buf) != 0:
        return None
    return int(ctypes.c_long.from_buffer(buf).value)


def _refuse(what: str, err: int) -> RingError:
    """A refusal whose errno tells ``_link`` a ``shm`` ring would be reachable instead."""
    e = RingError(what)
    e.__cause__ = OSError(err, os.strerror(err))
    return e


def _open_memfd(name: str, pid: int, fd: int) -> int:
    """The client's sealed memfd, reopened read-only through ``/proc/<pid>/fd/<fd>``.

    Opened first as ``O_PATH`` (which opens nothing: no FIFO, device or socket the
    client put at that number is ever opened), checked to be the regular memfd named
    ``name``, then reopened read-only through our own descriptor, which is that inode
    whatever the client does with its descriptor meanwhile."""
    where = f"/proc/{pid}/fd/{fd}"
    try:
        path_fd = os.open(where, os.O_PATH | os.O_CLOEXEC)
    except OSError as e:
        raise _refuse(
            f"cannot open ring {name} as {where}: {e.strerror} (a daemon of another "
            "user or pid namespace cannot; the client then uses /dev/shm)",
            e.errno or errno.EACCES,
        ) from e
    try:
        link = os.readlink(f"/proc/self/fd/{path_fd}")
        if link != memfd_link(name) or not stat.S_ISREG(os.fstat(path_fd).st_mode):
            raise _refuse(f"{where} is not the ring {name} (it is {link[:80]!r})", errno.ENXIO)
        return os.open(f"/proc/self/fd/{path_fd}", os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    finally:
        os.close(path_fd)


def open_ring_readonly(
    name: str, expected_bytes: int, *, pid: int | None = None, fd: int | None = None
) -> tuple[mmap.mmap | None, int]:
    """Open a client's ring for reading (daemon side); the size must match what it claims.

    With ``fd`` (a ``memfd`` ring, reached as ``/proc/<pid>/fd/<fd>``): the descriptor
    and a read-only mapping, made only once the seals that fix its size are checked.
    The mapping is lazy (no ``MAP_POPULATE``): pages are faulted in by the writer thread
    that first reads them, never on the control thread that handles HELLO.

    Without ``fd`` (a ``shm`` ring in ``/dev/shm``, which cannot be sealed): the
    descriptor only, and no mapping; the daemon reads it with ``preadv`` into its own
    buffers, so a ring truncated by its client is a short read, never SIGBUS.
    """
    if fd is not None:
        if pid is None:
            raise RingError(f"ring {name}: a memfd ring needs its pid")
        ring_path(name)  # the name's shape
        rfd = _open_memfd(name, pid, fd)
        where = f"memfd ring {name} of pid {pid}"
    else:
        path = ring_path(name)
        where = f"ring {path}"
        try:
            # O_NONBLOCK: a FIFO planted under the ring's name must not hang the daemon in open()
            rfd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise RingError(f"cannot open ring {path}: {e.strerror}") from e
    try:
        st = os.fstat(rfd)
        if not stat.S_ISREG(st.st_mode):
            raise RingError(f"{where} is not a shared-memory segment (not a regular file)")
        if fd is not None:
            try:
                seals = fcntl.fcntl(rfd, fcntl.F_GET_SEALS)
            except OSError as e:
                raise RingError(f"{where} cannot be sealed: {e.strerror}") from e
            if seals & SEALS != SEALS:
                raise RingError(
                    f"{where} is not sealed against shrinking and growing "
                    f"(seals {seals:#x}); its client could truncate it under a write"
                )
            if _fs_type(rfd) not in (None, _TMPFS_MAGIC):
                # a hugetlb memfd seals too, but faults in it raise SIGBUS once the pool of
                # huge pages is spent: only plain shared memory is read through a mapping
                raise RingError(f"{where} is not plain shared memory (a hugetlb memfd?)")
            st = os.fstat(rfd)  # sealed now: this size is final
        size = st.st_size
        if size != expected_bytes or size <= 0:
            raise RingError(f"{where} is {size} bytes, the client said {expected_bytes}")
        if fd is None:
            return None, rfd
        return mmap.mmap(rfd, size, mmap.MAP_SHARED, mmap.PROT_READ), rfd
    except BaseException:
        os.close(rfd)
        raise
