"""The scheduler and the writer pool: per-file order, writer threads, their results.

Writes to one file run in the order they arrived (a client's later save of a file must
win; a file is its directory's inode and its name, however the path spells them);
different files run in parallel on ``n`` writer threads taking jobs from one queue
(a ThreadPoolExecutor's Future per task costs the control thread more than a small
file's whole write). A writer appends its outcome to a results queue and, only when it
found the queue empty, wakes the control loop through an inproc socket. The files a job
replaced are freed after the control loop has taken its result, on ``_retire``'s thread.

A writer that finishes a piece of a save in pieces runs that save's next piece itself
when it is queued right behind (``_follow``): the pieces of one save still run one at a
time and in order, without a hand-off through the control loop between them.

Threads: ``enqueue``, ``empty``, ``idle``, ``next_result``, ``wake_socket`` and ``shutdown`` belong to the
control thread; ``_loop``/``_finish`` run on the writer threads; the results queue, and
the per-file queues where they change (``enqueue``, ``next_result``, ``_follow``), are
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
        with self._lock:  # a writer may be taking the next piece of a save (_follow)
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
            if taken is not None and id(taken[0].job) in self._key_of:  # else _follow did this
                self._advance(taken[0].job)
        if taken is None:
            answered, self._answered = self._answered, []
            RETIRE.close_later(answered)  # their saves are answered: the old files go
            if self._stopped:
                RETIRE.drain(10.0)  # the last answers are out: nothing stays held open
            return None
        result, replaced = taken
        self._answered += replaced
        return result

    def _advance(self, done: Job) -> None:
        """Take ``done`` off the head of its queues and start the jobs now first (under
        ``_lock``)."""
        heads: dict[int, Job] = {}
        for key in self._key_of.pop(id(done)):
            waiting = self._by_key[key]
            waiting.popleft()  # the job that finished: it headed each of its queues
            if waiting:
                heads[id(waiting[0])] = waiting[0]
            else:
                del self._by_key[key]
        for job in heads.values():
            self._start_if_first(job)

    def _follow(self, done: Job) -> Job | None:
        """The next piece of ``done``'s save where it is queued right behind it, taken off
        the queues for the same writer to run now (under ``_lock``): a save in pieces
        (BEGIN, PARTs, END) goes on without a round trip through the control loop per
        piece, which cost 0.3-5 ms each on 2 busy cores while the writer sat idle."""
        if type(done) is not Job or done.kind not in ("begin", "part"):
            return None
        keys = self._key_of.get(id(done))
        if keys is None:
            return None
        nxt: Job | None = None
        for key in keys:
            waiting = self._by_key[key]
            if len(waiting) < 2 or waiting[0] is not done or (nxt is not None and waiting[1] is not nxt):
                return None
            nxt = waiting[1]
        if (
            nxt is None
            or type(nxt) is not Job
            or nxt.kind not in ("part", "end")
            or nxt.client is not done.client
            or nxt.request.seq != done.request.seq
        ):
            return None
        for key in keys:
            self._by_key[key].popleft()
        del self._key_of[id(done)]
        return nxt

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
                while job is not None:  # a save's next piece, queued behind it: run now
                    result = Result(job, *self._run(job))
                    job = self._finish(result, RETIRE.taken())

    def _finish(self, result: Result, replaced: list[int]) -> Job | None:
        """Hand ``result`` to the control loop; returns the job to run next, if any."""
        with self._lock:
            follow = self._follow(result.job)
            self._results.append((result, replaced))
            if len(self._results) > 1:
                return follow  # an earlier result's wake-up is pending: the loop drains them all
        sock = getattr(self._local, "wake", None)
        if sock is None:
            sock = self._local.wake = self._ctx.socket(zmq.PUSH)
            sock.connect(self._wake_addr)
        try:
            sock.send(b"", zmq.NOBLOCK)
        except zmq.Again:
            pass  # wake-ups are already queued; the loop also looks every 200 ms
        return follow
