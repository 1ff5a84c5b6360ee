"""Replaced files freed after their save is answered, not inside the rename.

Why: saving over an existing file (every time step of a job that reuses its names) makes
the rename drop the old file's last link, and the kernel frees its pages and extents
right there: 25-35 ms for a 64 MiB file on ext4 (10 ms on tmpfs), all of it before the
save can be answered. So, just before the rename, :meth:`Retirer.keep` opens the old
file ``O_PATH | O_NOFOLLOW`` relative to the target's open directory (no read access
needed, nothing followed, nothing outside the directory the save was confined to: a
file another user owns works the same); the rename then only drops a name (2-3 ms), and
the last reference, this descriptor, goes after the answer, on the closer thread.

Who calls what: a writer thread inside :meth:`Retirer.deferring` (the scheduler's) has
``Temporary.publish`` keep the old files of saves of at least ``MIN_BYTES``; after it
posts the job's result it takes them (:meth:`Retirer.taken`) and the scheduler hands
them to :meth:`Retirer.close_later` once the control loop has taken that result.
Anywhere else (tests, tools, the control loop's tiny inline saves) nothing is kept and
the rename frees the old file as before. At most ``limit`` descriptors are held at once
(beyond that the rename frees inline); :meth:`Retirer.drain` closes everything queued,
and the scheduler's shutdown calls it.

Threads: the held lists are per thread (``threading.local``); the count and the queue
are shared under ``_lock``; only the closer thread closes queued descriptors.
"""

from __future__ import annotations

import os
import queue
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

    def keep(self, dir_fd: int, name: str, nbytes: int) -> None:
        """Before a rename over ``name`` in ``dir_fd`` by a file of ``nbytes``: hold the old
        file open (when this thread defers and it is worth it), so the rename frees nothing."""
        fds: list[int] | None = getattr(self._local, "fds", None)
        if fds is None or nbytes < MIN_BYTES:
            return
        with self._lock:
            if self._held >= self.limit:
                return
            self._held += 1
        try:
            fds.append(os.open(name, _O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd))
        except OSError:  # nothing there (a new name), or anything else: nothing to keep
            with self._lock:
                self._held -= 1

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


#: the daemon's retirer (one per process: ``Temporary.publish`` finds it here)
RETIRE = Retirer()
