"""Replaced files freed after their save is answered, not inside the rename.

Why: saving over an existing file (every time step of a job that reuses its names) makes
the rename drop the old file's last link, and the kernel frees its pages and extents
right there: 25-35 ms for a 64 MiB file on ext4 (10 ms on tmpfs), all of it before the
save can be answered. So, just before the rename, :meth:`Retirer.keep` opens the old
file ``O_PATH | O_NOFOLLOW`` relative to the target's open directory (no read access
needed, nothing followed, nothing outside the directory the save was confined to: a
file another user owns works the same); the rename then only drops a name, and the last
reference, this descriptor, goes after the answer, on the closer thread.

The rename itself (:meth:`Retirer.rename_over`) is a ``RENAME_EXCHANGE`` followed by an
``unlink`` of the old file under the temporary's name: a plain rename over a file also
makes ext4 start the new file's writeback (``auto_da_alloc``, 2-3 ms for 64 MiB); an
exchange does not (0.06-0.10 ms with the unlink). Where the exchange does not apply (no
old file held, anything but a regular file of this user's there, a file system that
refuses exchanges, an old file replaced by someone meanwhile) it is a plain rename, as
before.

Who calls what: a writer thread inside :meth:`Retirer.deferring` (the scheduler's) has
``Temporary.publish`` keep the old files of saves of at least ``MIN_BYTES``; after it
posts the job's result it takes them (:meth:`Retirer.taken`) and the scheduler hands
them to :meth:`Retirer.close_later` once the control loop has taken every waiting
result (their DONEs go out right after, in the same turn of the loop). Anywhere else
(tests, tools, the control loop's tiny inline saves) nothing is kept and the rename
frees the old file as before. At most ``limit`` descriptors are held at once
(beyond that the rename frees inline); :meth:`Retirer.drain` waits for everything
queued to be closed, which the scheduler does after its last results at shutdown.

Threads: the held lists are per thread (``threading.local``); the count and the queue
are shared under ``_lock``; only the closer thread closes queued descriptors.
"""

from __future__ import annotations

import ctypes
import errno
import os
import queue
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["MIN_BYTES", "RETIRE", "Retirer"]

#: a new file at least this large has the file it replaces freed after the answer
MIN_BYTES = 1 << 20
_O_PATH = getattr(os, "O_PATH", 0o10000000)


class Retirer:
    """Descriptors of replaced files, kept across the rename and closed off the save's path."""

    def __init__(self, limit: int = 64) -> None:
        self.limit = limit
        self._local = threading.local()
        self._lock = threading.Lock()
        self._held = 0  # kept and not yet closed, on every thread and in the queue
        self._queue: queue.SimpleQueue[list[int] | threading.Event] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    @property
    def held(self) -> int:
        """Descriptors of replaced files not closed yet."""
        return self._held

    @contextmanager
    def deferring(self) -> Iterator[None]:
        """On this thread, :meth:`keep` keeps; whatever is still held at the end is closed."""
        self._local.fds = []
        try:
            yield
        finally:
            self._close(self.taken())
            del self._local.fds

    def rename_over(self, dir_fd: int, temp: str, final: str, nbytes: int) -> None:
        """Rename ``temp`` to ``final`` in ``dir_fd`` (``nbytes``: the new file's size),
        keeping the file it replaces for later where this thread defers (see above)."""
        held = self.keep(dir_fd, final, nbytes)
        if held < 0 or not _exchange_over(dir_fd, temp, final, held):
            os.rename(temp, final, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)

    def keep(self, dir_fd: int, name: str, nbytes: int) -> int:
        """Before a rename over ``name`` in ``dir_fd`` by a file of ``nbytes``: hold the old
        file open (when this thread defers and it is worth it), so the rename frees nothing.
        Returns the descriptor held, or -1."""
        fds: list[int] | None = getattr(self._local, "fds", None)
        if fds is None or nbytes < MIN_BYTES:
            return -1
        with self._lock:
            if self._held >= self.limit:
                return -1
            self._held += 1
        try:
            fd = os.open(name, _O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        except OSError:  # nothing there (a new name), or anything else: nothing to keep
            with self._lock:
                self._held -= 1
            return -1
        fds.append(fd)
        return fd

    def taken(self) -> list[int]:
        """This thread's kept descriptors, now the caller's to pass to :meth:`close_later`."""
        fds: list[int] | None = getattr(self._local, "fds", None)
        if not fds:
            return []
        self._local.fds = []
        return fds

    def close_later(self, fds: list[int]) -> None:
        """Close ``fds`` on the closer thread (the replaced files are freed there)."""
        if not fds:
            return
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="matspool-retire", daemon=True)
                    self._thread.start()
        self._queue.put(fds)

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until everything passed to :meth:`close_later` so far is closed."""
        if self._thread is None:
            return True
        done = threading.Event()
        self._queue.put(done)
        return done.wait(timeout)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if isinstance(item, threading.Event):
                item.set()
            else:
                self._close(item)

    def _close(self, fds: list[int]) -> None:
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
        if fds:
            with self._lock:
                self._held -= len(fds)


_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)  # glibc 2.28
if _renameat2 is not None:
    _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    _renameat2.restype = ctypes.c_int
_RENAME_EXCHANGE = 2  # linux/fs.h
_no_exchange: set[int] = set()  # file systems (st_dev) that refused RENAME_EXCHANGE


def _exchange_over(dir_fd: int, temp: str, final: str, held: int) -> bool:
    """Put ``temp`` at ``final`` by ``RENAME_EXCHANGE`` and unlink the old file, which the
    exchange left at ``temp``: unlike a rename over it, an exchange does not start the
    new file's writeback (ext4's ``auto_da_alloc``: 2-3 ms for 64 MiB). False, having
    changed nothing, where that does not apply: the old file (``held``) is not a regular
    file of this user's, the file system refuses exchanges, or ``final`` no longer holds it.

    Why only this user's regular files: a daemon killed between the exchange and the
    unlink leaves the old file under the temporary's name, and the next daemon's sweep
    (``cleanup._sweep_one``) removes only regular files of its own user there; a symlink
    or another user's file would stay behind for good, so those are renamed over."""
    old = os.fstat(held)
    if (
        _renameat2 is None
        or old.st_dev in _no_exchange
        or not stat.S_ISREG(old.st_mode)
        or old.st_uid != os.geteuid()
    ):
        return False
    t, f = os.fsencode(temp), os.fsencode(final)
    if _renameat2(dir_fd, t, dir_fd, f, _RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            _no_exchange.add(old.st_dev)
        return False
    try:
        now = os.stat(temp, dir_fd=dir_fd, follow_symlinks=False)
        if (now.st_dev, now.st_ino) == (old.st_dev, old.st_ino):
            os.unlink(temp, dir_fd=dir_fd)  # only a link goes: the file is held open
            return True
    except FileNotFoundError:  # someone removed it already: the new file is in place
        return True
    # something replaced the old file between its opening and the exchange: swap back,
    # and let a plain rename replace whatever is there, as it always did
    if _renameat2(dir_fd, t, dir_fd, f, _RENAME_EXCHANGE) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), final)
    return False


#: the daemon's retirer (one per process: ``Temporary.publish`` finds it here)
RETIRE = Retirer()
