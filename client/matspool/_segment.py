"""A ring's shared-memory segment: its name, and creating it as a sealed memfd or a file
in ``/dev/shm``.

Both sides agree here on what a ring is called and where a ``shm`` one lives
(``ring_path`` checks names so no path escapes ``SHM_DIR``), and on the seals that fix a
``memfd`` ring's size (``SEALS``): ``_ring`` creates segments with these, ``_ringopen``
(the daemon) checks them. Why a ring is one of the two kinds: the docstring of ``_ring``.

Threads: no state; any thread.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import secrets
from typing import Final, Literal

from ._errors import RingError

__all__ = [
    "RING_PREFIX",
    "SEALS",
    "SHM_DIR",
    "RingKind",
    "create_memfd",
    "create_shm",
    "memfd_link",
    "new_name",
    "ring_path",
]

SHM_DIR: Final = "/dev/shm"
RING_PREFIX: Final = "matspool-"
#: the seals a ``memfd`` ring must carry before a daemon maps it: its size is fixed
SEALS: Final = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
RingKind = Literal["memfd", "shm"]


def ring_path(name: str) -> str:
    """Where a ``shm`` ring of ``name`` lives; names are checked so no path escapes ``SHM_DIR``."""
    if not name.startswith(RING_PREFIX) or not name.replace("-", "").replace("_", "").isalnum():
        raise RingError(f"invalid ring name {name!r}")
    return os.path.join(SHM_DIR, name)


def memfd_link(name: str) -> str:
    """What ``readlink`` of ``/proc/<pid>/fd/<fd>`` shows for the ``memfd`` ring ``name``."""
    return f"/memfd:{name} (deleted)"


def new_name() -> str:
    """A fresh ring name: the pid, and 96 random bits only the client and its daemon learn."""
    return f"{RING_PREFIX}{os.getpid()}-{secrets.token_hex(12)}"


def create_memfd(name: str, size: int) -> tuple[int, mmap.mmap]:
    """A ``memfd`` ring of ``size`` bytes, reserved and sealed: its descriptor and mapping."""
    try:
        fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    except OSError as e:
        raise RingError(f"cannot create ring {name}: {e.strerror}") from e
    try:
        os.fchmod(fd, 0o600)  # unreachable by name anyway; /proc/<pid>/fd asks ptrace rights
        try:
            os.posix_fallocate(fd, 0, size)  # pages reserved now: no SIGBUS in a copy later
        except OSError as e:
            raise RingError(
                f"cannot reserve {size} bytes for ring {name}: {e.strerror}; pass a smaller ring_bytes"
            ) from e
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SEALS | fcntl.F_SEAL_SEAL)
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        os.close(fd)
        raise
    return fd, mm


def create_shm(path: str, size: int, mode: int) -> mmap.mmap:
    """A ``shm`` ring at ``path`` (created, never reused) of ``size`` bytes: its mapping."""
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
                hint = (
                    f"; {SHM_DIR} is too small for a {size >> 20} MiB ring "
                    "(in Docker raise --shm-size, or pass a smaller ring_bytes)"
                )
            raise RingError(f"cannot reserve {size} bytes for ring {path}: {e.strerror}{hint}") from e
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except BaseException:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)
    return mm
