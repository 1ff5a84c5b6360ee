"""Store connections for sharded saves and streams, reused; save numbers; who to tell on close.

A sharded save (or stream step) coordinates on a thread of its own that blocks in store
waits, so it needs a store client connection of its own (a wait on a shared one holds up
every other request behind it). A TCPStore ``clone()`` was measured taking 5.0 s now and
then (its connect backs off), which made 60 sharded saves take 53.8 s instead of ~12 s;
so connections are cloned once per (spool, group) and reused: a save takes a free one, or
clones one when every one is in use (as many as saves in flight at once), and gives it
back once its outcome is known. Before cloning, the group's own store is asked whether it
is still there: a clone to a store that is gone would retry for the store's timeout.

A pool holds its group's store only weakly (a destroyed process group is not kept up by
an idle spool, and a new one gets a new pool); a save holds it for as long as it runs, so
on rank 0 (whose process holds the store under ``env://``) a ``destroy_process_group()``
while saves are in flight does not take the store away from the other ranks.

The registry also knows each spool's sharded streams (``track``), so that a closing spool
can tell the other ranks about them too; ``drop_pools`` and ``drop_streams`` hand a
closing spool's pools and streams to ``_shard_coord``'s ``closing`` and ``closed``, which
speak for it. A forked child starts with no
pools and no streams: the parent's connections and its word are not the child's.

Threads: a :class:`Conns` is shared by the save threads of one spool and group (under
its lock); the registry (pools and streams) and the save numbers by every thread, under
``_lock``.
"""

from __future__ import annotations

import itertools
import os
import threading
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from . import _shard_keys as keys

if TYPE_CHECKING:
    from ._spool import Spool

__all__ = ["Conns", "Ending", "conns", "drop_pools", "drop_streams", "next_number", "track"]


class Ending(Protocol):
    """A sharded stream as a closing spool sees it (``_shard_stream.ShardedStream``)."""

    def end(self, closed: str) -> None:
        """This rank appends no further step (``closed``: "Spool" or "stream"): tell the others."""


_lock = threading.Lock()
_numbers: dict[str, itertools.count[int]] = {}
_pools: weakref.WeakKeyDictionary[Spool, dict[str, Conns]] = weakref.WeakKeyDictionary()
_streams: weakref.WeakKeyDictionary[Spool, weakref.WeakSet[Any]] = weakref.WeakKeyDictionary()


@dataclass(eq=False)
class Conns:
    """One spool's reusable connections to one group's store (see the module docstring)."""

    store: weakref.ref[Any]
    group: str
    rank: int
    size: int
    free: list[Any] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, store: Any) -> Any:
        """A connection of the caller's own until ``give``: a free one, or a new clone
        (the store itself where it cannot be cloned). Raises the store's error at once
        when the store is gone."""
        with self.lock:
            if self.free:
                return self.free.pop()
        store.check([keys.save_prefix(self.group, -1)])  # gone: raises now, not after a clone's retries
        try:
            return store.clone()
        except Exception:  # noqa: BLE001 - a store that cannot clone (HashStore, FileStore): shared
            return store

    def give(self, conn: Any, *, ok: bool = True) -> None:
        """Back for the next save; ``ok=False``: it failed, drop it."""
        if ok:
            with self.lock:
                self.free.append(conn)


def conns(spool: Spool, group: str, store: Any, rank: int, size: int) -> Conns:
    """``spool``'s pool for ``group`` (whose store is ``store``); a new one when the group
    was destroyed and made again since."""
    with _lock:
        by_group = _pools.setdefault(spool, {})
        pool = by_group.get(group)
        if pool is None or pool.store() is not store:
            pool = by_group[group] = Conns(weakref.ref(store), group, rank, size)
        return pool


def _after_fork_in_child() -> None:
    """A forked child (a DataLoader worker, say) is no rank: the parent's pools (its store
    connections, which a clone shares with the parent by socket) are not the child's, and
    a spool the child closes must not tell the parent's groups that a save will not come."""
    global _lock
    _lock = threading.Lock()
    _pools.clear()
    _streams.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def next_number(group: str) -> int:
    """The number of this process's next sharded save on ``group`` (every rank counts its
    saves the same way: they are collectives)."""
    with _lock:
        return next(_numbers.setdefault(group, itertools.count()))


def track(spool: Spool, stream: Ending) -> None:
    """``stream`` (a sharded stream of ``spool``) is told when ``spool`` closes; held weakly
    (a stream dropped unclosed tells nobody)."""
    with _lock:
        _streams.setdefault(spool, weakref.WeakSet()).add(stream)


def drop_pools(spool: Spool) -> list[Conns]:
    """``spool`` is closing: its pools, forgotten here."""
    with _lock:
        return list(_pools.pop(spool, {}).values())


def drop_streams(spool: Spool) -> list[Ending]:
    """``spool`` is closing: its sharded streams, forgotten here."""
    with _lock:
        return list(_streams.pop(spool, ()))
