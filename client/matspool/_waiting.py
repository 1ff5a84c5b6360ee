"""Waiting for saves in ``flush()`` and ``close()``: progress, and what Ctrl-C does.

A flush that takes more than a second shows a progress bar from ``tqdm.auto`` (a
terminal's text bar, a notebook's widget); quick flushes show nothing. Set
``MATSPOOL_PROGRESS=0`` to never show it, ``1`` to show it even when stderr is not a
terminal (a log file gets tqdm's updates).

Ctrl-C during the wait does not drop the saves silently: the first one prints one line
naming how many saves are still on their way to disk and the oldest one's path, and
the wait goes on (the saves are in the daemon's hands and will finish); a second
Ctrl-C abandons the wait, prints the saves left unconfirmed, and raises
``KeyboardInterrupt``.

Threads: the caller's (the one in ``flush()``/``close()``).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import wait
from typing import Any, Final

from ._pending import SaveFuture

__all__ = ["PROGRESS_AFTER_S", "Abandoned", "wait_for_saves"]

#: A wait shorter than this shows no progress bar.
PROGRESS_AFTER_S: Final = 1.0
_SLICE: Final = 0.2  # how often the bar is updated (and Ctrl-C noticed on every platform)
_LISTED: Final = 10  # abandoned saves named one by one; the rest are counted


class Abandoned(KeyboardInterrupt):
    """A second Ctrl-C gave up on ``left``, the saves still pending (a KeyboardInterrupt,
    so code that catches that keeps working)."""

    def __init__(self, left: list[SaveFuture]) -> None:
        super().__init__(f"{len(left)} saves abandoned")
        self.left = left


def _progress_wanted() -> bool:
    setting = os.environ.get("MATSPOOL_PROGRESS", "").strip().lower()
    if setting in ("0", "false", "no", "off"):
        return False
    if setting in ("1", "true", "yes", "on"):
        return True
    return "ipykernel" in sys.modules or (sys.stderr is not None and sys.stderr.isatty())


def _bar(total: int, what: str) -> Any:
    try:
        from tqdm.auto import tqdm  # type: ignore[import-untyped]
    except ImportError:  # a dependency, but a bar is never worth failing a flush for
        return None
    return tqdm(total=total, desc=f"matspool {what}", unit="save", leave=False, file=sys.stderr)


def _pending(futures: Sequence[SaveFuture]) -> list[SaveFuture]:
    return sorted((f for f in futures if not f.done()), key=lambda f: f.seq)


def _say(line: str) -> None:
    sys.stderr.write(f"matspool: {line}\n")
    sys.stderr.flush()


def _wait_some(pending: list[SaveFuture], timeout: float) -> list[SaveFuture]:
    """``pending`` (in the order saved) less those done, after waiting up to ``timeout`` s
    for the newest: ``concurrent.futures.wait`` of them all took the futures' shared
    condition once per future, twice, and put a waiter on each, which the I/O thread
    then fed once per answer. The newest is nearly always the last done; when it is
    not, the next call waits for the newest left."""
    if pending:
        wait(pending[-1:], timeout)
    return [f for f in pending if not f._over()]


def wait_for_saves(futures: Sequence[SaveFuture], timeout: float | None, what: str) -> set[SaveFuture]:
    """Wait up to ``timeout`` s for ``futures``; returns those not done. ``what`` names
    the waiting call in messages (``"flush()"``, ``"close()"``). Raises
    :class:`Abandoned` on a second Ctrl-C."""
    if not futures:
        return set()
    start = time.monotonic()
    deadline = None if timeout is None else start + timeout
    bar = None
    interrupted = False
    left_undone = list(futures)
    try:
        while True:
            try:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                left_undone = _wait_some(left_undone, _SLICE if left is None else min(_SLICE, left))
                if not left_undone or (deadline is not None and time.monotonic() >= deadline):
                    return set(left_undone)  # (the newest done may leave older ones: wait on)
                if bar is None and time.monotonic() - start >= PROGRESS_AFTER_S and _progress_wanted():
                    bar = _bar(len(futures), what.rstrip("()"))
                if bar is not None:
                    bar.update(len(futures) - len(left_undone) - bar.n)
            except KeyboardInterrupt:
                pending = _pending(futures)
                if not pending:
                    raise
                if bar is not None:
                    bar.clear()
                if interrupted:
                    shown = ", ".join(f.path for f in pending[:_LISTED])
                    more = f" and {len(pending) - _LISTED} more" if len(pending) > _LISTED else ""
                    _say(
                        f"{what} abandoned: {len(pending)} saves not confirmed written "
                        f"(they may still appear, whole): {shown}{more}"
                    )
                    raise Abandoned(pending) from None
                interrupted = True
                _say(
                    f"{what} is waiting for {len(pending)} saves to reach disk (oldest: "
                    f"{pending[0].path}); press Ctrl-C again to abandon them"
                )
    finally:
        if bar is not None:
            bar.close()
