"""The pending table: every save between ``save()`` and the daemon's last answer for it.

It is the only place that resolves a save's future, and the place that decides when a
save's ring regions (its leases, ``_leases``) may be reused: at the daemon's last answer
for the save, when the daemon it was handed to is known dead, or when it was never sent.
A future may fail earlier than that (a silent daemon, ``close()``): its record, and so
its regions, stay until one of those happens.

It also keeps the failures for ``flush()`` (those since the last flush) and ``close()``
(those nobody observed: no ``result()``/``exception()`` call, no flush that raised them).

Threads: any; one lock guards the table. The I/O thread feeds it answers, the caller's
thread adds saves, the copy thread fails saves whose copy failed.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any, Final

from ._errors import FlushError, MatspoolError, with_context
from ._leases import Lease, Leases
from ._saves import SaveResult

__all__ = ["PendingTable", "Save", "SaveFuture", "failing"]

MAX_KEPT_FAILURES: Final = 10_000  # flush()/close() report at most this many; futures hold all
#: ``concurrent.futures`` states (the same strings in every Python this supports)
_RUNNING: Final = "RUNNING"
_FINISHED: Final = "FINISHED"
_OVER: Final = frozenset({"FINISHED", "CANCELLED", "CANCELLED_AND_NOTIFIED"})


def failing(cls: type[MatspoolError], message: str) -> Callable[[Save], MatspoolError]:
    """For ``fail_unresolved``: a fresh ``cls(message)`` per save (each gets its context)."""
    return lambda _: cls(message)


class SaveFuture(Future[SaveResult]):
    """A save's future; it remembers whether anyone looked at its outcome.

    It is born running and shares its table's condition with the table's other futures
    (``concurrent.futures`` gives each its own ``Condition``, the largest cost of a small
    save after its copy). So a wake-up may be for another future: ``result`` and
    ``exception`` wait in a loop until their own is done or the timeout has passed.
    ``concurrent.futures.wait`` and ``as_completed`` take the condition once per future
    (it is reentrant) and wait on their own events, which works as with any Future.
    """

    def __init__(self, path: str, seq: int, condition: threading.Condition | None = None) -> None:
        # Future.__init__'s fields, set here: the one condition, and RUNNING at once
        self._condition = threading.Condition() if condition is None else condition
        self._state = _RUNNING
        self._result = None
        self._exception = None
        self._waiters: list[Any] = []
        self._done_callbacks: list[Any] = []
        self.path = path
        self.seq = seq
        self.observed = False

    def _over(self) -> bool:
        """``done()`` without taking the condition (which ``flush()``'s wait may hold over
        every future): a state only moves on from RUNNING, and FINISHED or CANCELLED is
        final, so a read that sees it is right without the lock."""
        return self._state in _OVER

    def _wait(self, timeout: float | None) -> None:
        """Until this future is done, or ``timeout`` s (None: no limit) have passed."""
        if self._over():
            return
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._condition:
            while not self._over():
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return
                self._condition.wait(remaining)

    # A done future's state and outcome are read without the condition (``Future.result``
    # and ``done`` take it, twice more after a wait woke the caller): FINISHED is final,
    # and its outcome is set before it (``_resolve``, ``Future.set_result``/``set_exception``)
    def result(self, timeout: float | None = None) -> SaveResult:
        try:
            self._wait(timeout)
            if self._state == _FINISHED and self._exception is None:
                return self._result  # type: ignore[return-value]  # set with the state
            return super().result(0)  # raises its exception, or TimeoutError at once
        finally:
            self.observed = self._over()

    def exception(self, timeout: float | None = None) -> BaseException | None:
        try:
            self._wait(timeout)
            if self._state == _FINISHED:
                return self._exception
            return super().exception(0)
        finally:
            self.observed = self._over()


def _resolve(condition: threading.Condition, finished: list[tuple[SaveFuture, SaveResult]]) -> None:
    """``Future.set_result`` of each pair, under ``condition`` (which the futures share)
    taken once, with one ``notify_all``; a future already over (failed meanwhile) is
    left as it is, and one with another condition is resolved on its own."""
    done: list[SaveFuture] = []
    with condition:
        for fut, result in finished:
            if fut._condition is not condition:
                continue  # below, through its own condition
            if fut._over():
                continue
            fut._result = result
            fut._state = _FINISHED
            for waiter in fut._waiters:  # concurrent.futures.wait / as_completed
                waiter.add_result(fut)
            done.append(fut)
        condition.notify_all()
    for fut, result in finished:
        if fut._condition is not condition and not fut.done():
            with contextlib.suppress(InvalidStateError):
                fut.set_result(result)
    for fut in done:
        if fut._done_callbacks:
            fut._invoke_callbacks()  # type: ignore[attr-defined]  # Future's, untyped in typeshed


@dataclass(slots=True, eq=False)
class Save:
    """What the client keeps per save until the daemon's last answer for it."""

    seq: int
    path: str
    format: str
    future: SaveFuture
    pieces: bool = False  # a save in pieces: BEGIN, PARTs, END, each answered in order
    leases: list[Lease] = field(default_factory=list)
    wire: list[Any] | None = None  # the WRITE's frames as sent, to re-send to a restarted daemon
    instance: str | None = None  # the daemon instance its messages were handed to
    outstanding: int = 0  # messages sent and not answered yet
    ended: bool = False  # its last message (the WRITE, or END) has been sent


class PendingTable:
    """Futures by sequence number, and the leases each save holds; see the module docstring."""

    def __init__(self, leases: Leases) -> None:
        self._leases = leases
        self._lock = threading.Lock()
        self._condition = threading.Condition()  # shared by the futures (``SaveFuture``)
        self._saves: dict[int, Save] = {}
        self._failures: list[SaveFuture] = []
        self._flushed = 0  # failures before this index were reported by flush()
        self._lost_failures = 0  # beyond MAX_KEPT_FAILURES

    # -- the caller's side ----------------------------------------------------------------
    def add(self, seq: int, path: str, fmt: str, leases: list[Lease], *, pieces: bool = False) -> Save:
        fut = SaveFuture(path, seq, self._condition)
        save = Save(seq, path, fmt, fut, pieces, list(leases))
        with self._lock:
            self._saves[seq] = save
        return save

    def add_one(self, seq: int, path: str, fmt: str, lease: Lease) -> Save:
        """``add`` of a whole save in one region (``_quick``'s small saves)."""
        save = Save(seq, path, fmt, SaveFuture(path, seq, self._condition), False, [lease])
        with self._lock:
            self._saves[seq] = save
        return save

    def attach(self, seq: int, lease: Lease) -> bool:
        """A piece's region joins its save; False if the save is gone (never send it)."""
        with self._lock:
            save = self._saves.get(seq)
            if save is None:
                return False
            save.leases.append(lease)
            return True

    def discard(self, seq: int) -> None:
        """A save whose future was never handed out (``save()`` raised): forget it and
        release what the daemon never saw."""
        with self._lock:
            save = self._saves.pop(seq, None)
        if save is not None:
            for lease in save.leases:
                self._leases.answered(lease)

    def futures(self) -> list[SaveFuture]:
        with self._lock:
            return [s.future for s in self._saves.values() if not s.future._over()]

    def unresolved(self) -> int:
        with self._lock:
            return sum(1 for s in self._saves.values() if not s.future.done())

    def failed(self, seq: int) -> bool:
        with self._lock:
            save = self._saves.get(seq)
            return save is None or (save.future.done() and save.future.exception() is not None)

    # -- the I/O thread's side ------------------------------------------------------------
    def sent(self, seq: int, op: str, frames: list[Any], instance: str | None, lease: Lease | None) -> bool:
        """A message of save ``seq`` goes to the daemon now; False: do not send it (the
        save is gone), and ``lease`` (the region it names) is released here."""
        drop: list[Lease] = []
        with self._lock:
            save = self._saves.get(seq)
            if save is not None and op != "END" and save.future._over():
                # failed before it went (a silent daemon, a failed copy): it never goes
                if op == "WRITE":
                    del self._saves[seq]
                    drop = save.leases
                elif lease in save.leases:
                    save.leases.remove(lease)
                save = None
            if save is not None:
                save.outstanding += 1
                save.instance = instance
                if lease is not None:
                    lease.instance = instance
                if op == "WRITE":
                    save.wire = frames
                    save.ended = not save.pieces
                elif op == "END":
                    save.ended = True
        for held in drop:
            self._leases.answered(held)
        if save is None and lease is not None:
            self._leases.answered(lease)
        return save is not None

    def answer(
        self,
        seq: object,
        result: Callable[[Save], SaveResult] | None = None,
        error: MatspoolError | None = None,
        part: int | bool | None = False,
    ) -> None:
        """The daemon answered one message of save ``seq``: DONE (``result``), ERR
        (``error``) or PART_DONE (``part``: the piece's offset, None for the laid-out
        save's own region)."""
        release: list[Lease] = []
        with self._lock:
            save = self._saves.get(seq) if type(seq) is int else None
            if save is None:
                return
            if part is False:
                release = self._answered(save)
            else:
                save.outstanding = max(0, save.outstanding - 1)
                for lease in save.leases:
                    if part is None or lease.offset == part:
                        save.leases.remove(lease)
                        release.append(lease)
                        break
        if release:
            self._leases.answered_all(release)
        if part is False:
            if error is not None:
                self._fail(save, error)
            elif result is not None and not save.future.done():
                save.future.set_result(result(save))

    def answer_done(self, answers: Iterable[tuple[int, int]]) -> None:
        """``answer`` of every ``(seq, file size)`` of one DONE (up to about 50 small saves
        in a burst): the table's lock, the leases' and the ring's taken once for all, and
        the futures resolved under their shared condition with one ``notify_all``, where
        one ``answer`` each took every lock and woke every waiter once per save."""
        release: list[Lease] = []
        finished: list[tuple[SaveFuture, SaveResult]] = []
        with self._lock:
            for seq, nbytes in answers:
                save = self._saves.get(seq) if type(seq) is int else None
                if save is None:
                    continue
                release += self._answered(save)
                finished.append((save.future, SaveResult(save.path, nbytes, save.format)))
        if release:
            self._leases.answered_all(release)  # the space is free before anyone wakes
        _resolve(self._condition, finished)

    def _answered(self, save: Save) -> list[Lease]:
        """A DONE or ERR of one of ``save``'s messages (under ``_lock``): once its last
        message is answered the record goes, and its leases are returned to release."""
        save.outstanding = max(0, save.outstanding - 1)
        if save.ended and not save.outstanding:
            del self._saves[save.seq]
            return save.leases
        return []

    def fail_unresolved(self, error: Callable[[Save], MatspoolError], *, keep: bool = True) -> None:
        """Fail every save whose future is still open. ``keep``: their records (and so
        their regions) stay until the daemon answers or is known dead."""
        with self._lock:
            saves = [s for s in self._saves.values() if not s.future.done()]
        for save in saves:
            if not keep:  # released before the future completes: its waiter sees it so
                self.forget(save)
            self._fail(save, error(save))

    def fail(self, seq: int, error: MatspoolError) -> None:
        with self._lock:
            save = self._saves.get(seq)
        if save is not None:
            self._fail(save, error)

    def unsent(self, seq: int, op: str, lease: Lease | None) -> None:
        """A message of save ``seq`` will never go (its copy failed): a save whose first
        message it was is forgotten; otherwise only the region it named is released."""
        with self._lock:
            save = self._saves.get(seq)
            if save is not None and op != "WRITE" and lease in save.leases:
                save.leases.remove(lease)
        if save is not None and op == "WRITE":
            self.forget(save)
        elif lease is not None:
            self._leases.answered(lease)

    def forget(self, save: Save) -> None:
        """The daemon that held ``save`` is gone: release its regions."""
        with self._lock:
            if self._saves.get(save.seq) is not save:
                return
            del self._saves[save.seq]
        for lease in save.leases:
            self._leases.answered(lease)

    def handed_to(self, instance: str | None) -> list[Save]:
        """Saves whose messages went to ``instance`` (all sent ones for None)."""
        with self._lock:
            return [
                s
                for s in self._saves.values()
                if s.outstanding and (instance is None or s.instance == instance)
            ]

    def held_by_silence(self) -> bool:
        """Whether some failed save still holds regions (its daemon may yet read them)."""
        with self._lock:
            return any(s.future.done() for s in self._saves.values())

    def _fail(self, save: Save, error: MatspoolError) -> None:
        if save.future.done():
            return
        with_context(error, path=save.path, seq=save.seq, errno=getattr(error, "errno", None))
        with self._lock:  # kept before the future completes: flush() waits on it
            if len(self._failures) < MAX_KEPT_FAILURES:
                self._failures.append(save.future)
            else:
                self._lost_failures += 1
        with contextlib.suppress(InvalidStateError):  # resolved meanwhile: that outcome stands
            save.future.set_exception(error)

    # -- reports --------------------------------------------------------------------------
    def take_failures(self) -> list[BaseException]:
        """Failures since the last call (for ``flush()``); they count as observed."""
        with self._lock:
            new, self._flushed = self._failures[self._flushed :], len(self._failures)
        for fut in new:
            fut.observed = True
        return [e for f in new if (e := f.exception()) is not None]

    def unobserved(self) -> FlushError | None:
        """An error naming every failed save nobody looked at, or None."""
        with self._lock:
            futures = [f for f in self._failures if not f.observed]
            lost = self._lost_failures
        if not futures:
            return None
        failed = [(f, e) for f in futures if (e := f.exception()) is not None]
        errors = [e for _, e in failed]
        for f in futures:
            f.observed = True
        lines = "\n".join(f"  {f.path}: {type(e).__name__}: {e}" for f, e in failed)
        more = f"\n  ... and {lost} more" if lost else ""
        return FlushError(
            f"{len(errors) + lost} saves failed and nobody looked at their futures:\n{lines}{more}",
            list(errors),
        )
