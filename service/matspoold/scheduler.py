"""The scheduler and the writer pool: per-file order, writer threads, their results.

Writes to one file run in the order they arrived (a client's later save of a file must
win; a file is its directory's inode and its name, however the path spells them);
different files run in parallel on ``n`` writer threads taking jobs from one queue
(a ThreadPoolExecutor's Future per task costs the control thread more than a small
file's whole write). A writer appends its outcome to a results queue and, only when it
found the queue empty, wakes the control loop through an inproc socket. The files a job
replaced are freed after the control loop has taken its result, on ``_retire``'s thread.

Threads: ``enqueue``, ``empty``, ``idle``, ``next_result``, ``wake_socket`` and ``shutdown`` belong to the
control thread; ``_loop``/``_finish`` run on the writer threads; the results queue is
shared under ``_lock``.
"""

from __future__ import annotations

import os
import queue
import threading
from collections import deque
from collections.abc import Callable
from typing import NamedTuple

import zmq

from .jobs import Job
from .writers._retire import RETIRE

__all__ = ["Result", "Scheduler", "file_key"]


def file_key(path: str) -> tuple[str, ...]:
    """Which file ``path`` names, for the order of its writes: its normalised text, and the
    device and inode of its directory with its base name. A save waits for every earlier
    one sharing either key: the same text is the same file when the writes run (also after
    its directory was renamed away and made anew, which changes the inode), and the same
    inode is the same file however the path spells it (a symlinked directory, ``..``, a bind
    mount). A directory that cannot be reached keys by the text alone (the write fails
    and says why)."""
    text = os.path.normpath(path)
    directory, base = os.path.split(text)
    try:
        st = os.stat(directory or ".")
    except (OSError, ValueError):
        return (text,)
    return (text, f"{st.st_dev}:{st.st_ino}/{base}")


class Result(NamedTuple):
    job: Job
    nbytes: int | None
    error: BaseException | None


class Scheduler:
    """Per-path queues in front of ``n`` writer threads running ``run``."""

    def __init__(
        self,
        n: int,
        run: Callable[[Job], tuple[int | None, BaseException | None]],
        ctx: zmq.Context[zmq.Socket[bytes]],
    ) -> None:
        self._run = run
        self._ctx = ctx
        self._wake_addr = f"inproc://matspoold-wake-{id(self)}"
        self._local = threading.local()
        # key -> its jobs queued or running, in arrival order; a job runs once it heads the
        # queue of each of its keys
        self._by_key: dict[str, deque[Job]] = {}
        self._key_of: dict[int, tuple[str, ...]] = {}  # id(job) -> its file_key, until taken
        self._results: deque[tuple[Result, list[int]]] = deque()  # and the files it replaced
        self._answered: list[int] = []  # replaced files of results taken (control thread)
        self._lock = threading.Lock()
        self._stopped = False
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._loop, name=f"matspool-writer-{i}", daemon=True) for i in range(n)
        ]
        for t in self._threads:
            t.start()

    def wake_socket(self) -> zmq.Socket[bytes]:
        """The socket the control loop polls; readable when results are waiting."""
        wake: zmq.Socket[bytes] = self._ctx.socket(zmq.PULL)
        wake.bind(self._wake_addr)
        return wake

    def enqueue(self, job: Job, keys: tuple[str, ...]) -> None:
        """Queue ``job`` behind the jobs of its file (``keys``: :func:`file_key`)."""
        self._key_of[id(job)] = keys
        for key in keys:
            self._by_key.setdefault(key, deque()).append(job)  # keep the order of the saves
        self._start_if_first(job)

    def empty(self) -> bool:
        """No job is queued or running: any write now keeps every file's order."""
        return not self._by_key

    def idle(self, keys: tuple[str, ...]) -> bool:
        """No job of the file ``keys`` is queued or running: one written now keeps the order."""
        return not any(key in self._by_key for key in keys)

    def _start_if_first(self, job: Job) -> None:
        if all(self._by_key[key][0] is job for key in self._key_of[id(job)]):
            self._jobs.put(job)

    def next_result(self) -> Result | None:
        """The next finished job, its path's next job started; None when there is none."""
        with self._lock:
            taken = self._results.popleft() if self._results else None
        if taken is None:
            answered, self._answered = self._answered, []
            RETIRE.close_later(answered)  # their saves are answered: the old files go
            if self._stopped:
                RETIRE.drain(10.0)  # the last answers are out: nothing stays held open
            return None
        result, replaced = taken
        self._answered += replaced
        heads: dict[int, Job] = {}
        for key in self._key_of.pop(id(result.job)):
            waiting = self._by_key[key]
            waiting.popleft()  # the job that finished: it headed each of its queues
            if waiting:
                heads[id(waiting[0])] = waiting[0]
            else:
                del self._by_key[key]
        for job in heads.values():
            self._start_if_first(job)
        return result

    def shutdown(self) -> None:
        """Finish the queued jobs (the per-path queues must be empty), then stop."""
        for _ in self._threads:
            self._jobs.put(None)
        for t in self._threads:
            t.join()
        self._stopped = True

    def _loop(self) -> None:
        with RETIRE.deferring():
            while (job := self._jobs.get()) is not None:
                result = Result(job, *self._run(job))
                self._finish(result, RETIRE.taken())

    def _finish(self, result: Result, replaced: list[int]) -> None:
        with self._lock:
            self._results.append((result, replaced))
            if len(self._results) > 1:
                return  # an earlier result's wake-up is pending: the loop drains them all
        sock = getattr(self._local, "wake", None)
        if sock is None:
            sock = self._local.wake = self._ctx.socket(zmq.PUSH)
            sock.connect(self._wake_addr)
        try:
            sock.send(b"", zmq.NOBLOCK)
        except zmq.Again:
            pass  # wake-ups are already queued; the loop also looks every 200 ms
