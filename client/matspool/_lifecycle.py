"""Spools across a process's life: fork, normal exit, and multiprocessing children's exit.

- fork: a child inherits its parent's spools, whose ring, socket, threads and sequence
  numbers are the parent's. ``os.register_at_fork`` gives every live spool a fresh lock in
  the child; the spool notices the pid change on its next use and opens parts of its own
  (``Spool._own``), leaving the parent's untouched.
- exit: ``atexit`` closes every live spool, so what was saved is finished, not dropped.
  A multiprocessing child (a fork Pool worker, a DataLoader worker) leaves by
  ``os._exit`` after running ``multiprocessing.util`` finalizers, not atexit: a spool
  opened in such a process registers a finalizer too.
- failures nobody observed are printed to stderr at exit, in one block (``close()``
  raises them as a :class:`~matspool.FlushError`).

Threads: the hooks run in whichever thread exits or forks; the registry is a set
changed only under the GIL.
"""

from __future__ import annotations

import atexit
import multiprocessing
import multiprocessing.util
import os
import sys
import weakref
from typing import TYPE_CHECKING, Any

from ._errors import FlushError

if TYPE_CHECKING:
    from ._spool import Spool

__all__ = ["after_open", "forget", "report"]

# Weak: a spool dropped without close() is collected (its finalizer frees its ring and
# lets its share of the embedded daemon go); one still alive at exit is closed here.
_LIVE: weakref.WeakSet[Spool] = weakref.WeakSet()
_FINALIZERS: dict[int, Any] = {}


def after_open(spool: Spool) -> None:
    """Track ``spool`` for fork and exit (called each time it opens parts of its own)."""
    _LIVE.add(spool)
    if multiprocessing.parent_process() is not None:
        # os._exit follows the finalizers in a multiprocessing child; atexit never runs.
        # exitpriority 10: before the queues' feeder threads are joined (priority -5).
        _FINALIZERS[id(spool)] = multiprocessing.util.Finalize(
            spool, _close_at_exit, args=(weakref.ref(spool),), exitpriority=10
        )


def forget(spool: Spool) -> None:
    _LIVE.discard(spool)
    fin = _FINALIZERS.pop(id(spool), None)
    if fin is not None:
        fin.cancel()


def report(error: FlushError, pid: int | None = None) -> None:
    """One stderr block for failures nobody looked at, at exit."""
    who = f" (pid {pid})" if pid is not None else ""
    sys.stderr.write(f"matspool{who}: at exit, {error}\n")
    sys.stderr.flush()


def _close_at_exit(ref: weakref.ref[Spool]) -> None:
    spool = ref()
    if spool is None:
        return
    try:
        spool.close()
    except FlushError as e:
        report(e, os.getpid())


@atexit.register
def _close_live_spools() -> None:
    """Process exit without close(): finish what was saved rather than drop it."""
    for spool in list(_LIVE):
        _close_at_exit(weakref.ref(spool))


def _after_fork_in_child() -> None:
    _FINALIZERS.clear()  # the parent's; multiprocessing clears its registry too
    for spool in list(_LIVE):
        spool._forked()


os.register_at_fork(after_in_child=_after_fork_in_child)
