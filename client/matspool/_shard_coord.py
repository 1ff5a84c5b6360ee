"""One sharded save's (or stream step's) talk over the group's c10d store.

The keys are ``_shard_keys``'s; the connection is one of the spool's pool
(``_shard_conns``), taken for the save and given back. Rank 0 holds the group's store
itself (``base``) for as long as the save runs and, once it has put the outcome, waits
for every rank's ``read/<r>`` before it deletes the save's keys and resolves its own
future: so none is left behind, and under ``env://`` (the store lives in rank 0's
process) rank 0 never takes the store down while another rank still waits on it. A rank
whose store is gone (rank 0's process exited, or the store's host died) fails at once
with a :class:`ShardError` saying so (a connected store client learns of it at once),
not after the timeout.

``early_failure`` is the part a rank whose ``save()`` raised still plays, so the others
fail at once and the keys still go. ``notice`` is a closed spool's (or sharded stream's)
word for the save or step it will never make (``closing``: the next sharded save on each
group the spool used; ``closed``: the next step of each of its sharded streams): its
``blocks/<r>`` is the error, so the others fail that save or step at once instead of after
the timeout (rank 0 at once tells them; a closed rank 0's word is the ``layout`` itself).
Its keys go as a save's do when rank 0 makes the save; otherwise (rank 0 closed too, or
every rank closed: the end of every stream) each rank that is done with it counts itself
under ``gone``, and the one that makes it the group's size deletes them.

Threads: a :class:`Coord` belongs to its save's thread; ``early_failure`` runs in the
caller's thread and, on rank 0, starts one thread that collects the keys; ``closing``,
``closed`` and ``notice`` run in the closing caller's thread.
"""

from __future__ import annotations

import contextlib
import json
import threading
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Final

from . import _shard_keys as keys
from ._shard_blocks import ShardError
from ._shard_conns import Conns, drop_pools, drop_streams, next_number

if TYPE_CHECKING:
    from ._spool import Spool

__all__ = ["GRACE", "Coord", "StoreGone", "closed", "closing", "delete", "early_failure", "gone", "notice"]

GRACE: Final = 10.0  # others wait this much longer than rank 0 for its verdict


class StoreGone(ShardError):
    """The group's store went away mid-save (rank 0 exited, or its host died)."""


def gone(e: BaseException) -> bool:
    """Whether a store error says the store is gone (a timeout does not)."""
    return type(e).__name__ == "DistNetworkError" or isinstance(e, ConnectionError | BrokenPipeError)


def _said(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


@dataclass(eq=False, kw_only=True)
class Coord:
    """The store side of one save on one rank."""

    pool: Conns
    base: Any  # the group's store: held (rank 0: kept up) while the save runs
    prefix: str
    rank: int
    size: int
    path: str
    timeout: float
    store: Any = None  # this save's connection, from ``pool``, while it runs
    broken: bool = False  # a wait on ``store`` failed (timed out): not given back
    absent: set[int] = field(default_factory=set)  # rank 0: ranks that never came (not waited for again)

    def _what(self) -> str:
        return f"sharded save to {self.path!r}"

    def _unknown(self) -> str:
        """What a rank that lost rank 0 mid-save cannot know."""
        return "whether rank 0 published the file is unknown"

    def _connect(self) -> None:
        try:
            self.store = self.pool.take(self.base)
        except Exception as e:  # noqa: BLE001 - the store is gone already
            raise self._gone_error(e) from None

    def _disconnect(self, ok: bool) -> None:
        if self.store is not None and self.store is not self.base:
            self.pool.give(self.store, ok=ok and not self.broken)
        self.store = None

    def _gone_error(self, e: BaseException) -> StoreGone:
        return StoreGone(
            f"{self._what()}: the process group's store is gone (rank 0's process exited, or the "
            f"store's host died; the store said: {_said(e)}); {self._unknown()}"
        )

    def _put(self, key: str, value: dict[str, Any]) -> None:
        self.store.set(self.prefix + key, json.dumps(value))

    def _get(self, key: str) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.store.get(self.prefix + key))
        return value

    def _wait(self, names: list[str], timeout: float) -> None:
        """Wait for ``names``; a store that is gone raises :class:`StoreGone` at once."""
        try:
            self.store.wait([self.prefix + k for k in names], timedelta(seconds=timeout))
        except Exception as e:
            self.broken = True
            if gone(e):
                raise self._gone_error(e) from None
            raise

    def _missing(self, names: list[str]) -> list[str]:
        return [k for k in names if not self.store.check([self.prefix + k])]

    def _wait_ranks(self, what: str) -> str | None:
        """Wait for ``what/<r>`` of every rank; the error naming those that never came."""
        names = [keys.rank_key(what, r) for r in range(self.size)]
        try:
            self._wait(names, self.timeout)
        except StoreGone:
            raise
        except Exception:  # noqa: BLE001 - the store's timeout: say which ranks are missing
            late = [k.split("/")[-1] for k in self._missing(names)]
            self.absent.update(int(r) for r in late)
            if late:
                verb = "start" if what == keys.BLOCKS else "finish"
                return (
                    f"{self._what()}: rank(s) {', '.join(late)} did not {verb} within {self.timeout:g} s "
                    "(a rank or its daemon died, or did not call save())"
                )
        return None

    def _read(self, laid: dict[str, Any] | None = None) -> None:
        """This rank has its outcome: say so; rank 0 then waits for every rank's word and
        deletes the save's keys (``laid``: a layout from a closed rank 0, which cannot:
        the last rank to count itself under ``gone`` does, see ``notice``)."""
        self._put(keys.rank_key(keys.READ, self.rank), {})
        if self.rank == 0:
            ranks = [r for r in range(self.size) if r not in self.absent]
            collect(self.store, self.prefix, self.size, self.timeout + GRACE, ranks)
        elif laid and laid.get("orphan") and self.store.add(self.prefix + keys.GONE, 1) == self.size:
            collect(self.store, self.prefix, self.size, GRACE)


def collect(store: Any, prefix: str, size: int, timeout: float, ranks: list[int] | None = None) -> None:
    """Rank 0: wait (at most ``timeout``) until every rank (of ``ranks``: those not known
    to be gone) has its outcome, then delete the save's keys (a rank that comes later
    after all leaves what it writes then)."""
    with contextlib.suppress(Exception):
        wanted = range(size) if ranks is None else ranks
        store.wait([prefix + keys.rank_key(keys.READ, r) for r in wanted], timedelta(seconds=timeout))
    delete(store, prefix, size)


def delete(store: Any, prefix: str, size: int) -> None:
    """Every key of the save (or step) under ``prefix``; a store that is gone is skipped."""
    for key in keys.every_key(size):
        with contextlib.suppress(Exception):
            store.delete_key(prefix + key)


def early_failure(pool: Conns, store: Any, prefix: str, text: str, layout: str, timeout: float) -> None:
    """This rank's ``save()`` raised (``text`` says how): the others learn it at once (rank 0
    fails the save for all, or says ``layout`` itself when it is rank 0), and the keys go."""
    rank, size = pool.rank, pool.size
    with contextlib.suppress(Exception):
        store.set(prefix + keys.rank_key(keys.BLOCKS, rank), json.dumps({"error": text}))
        store.set(prefix + keys.rank_key(keys.READ, rank), "{}")
        if rank != 0:
            return
        store.set(prefix + keys.LAYOUT, json.dumps({"error": layout}))

        def run() -> None:
            conn = None
            try:
                conn = pool.take(store)
                collect(conn, prefix, size, timeout + GRACE)
            except Exception:  # noqa: BLE001 - the store is gone: nothing to clean
                conn = None
            finally:
                if conn is not None and conn is not store:
                    pool.give(conn)

        threading.Thread(target=run, name="matspool-shard-collect", daemon=True).start()


def notice(store: Any, prefix: str, rank: int, size: int, text: str, closed: str) -> None:
    """This rank will never make the save (or step) under ``prefix``: its spool or stream
    was closed (``closed`` says so, ``text`` is the others' error). Never raises: a store
    that is gone is skipped. ``read/<rank>`` comes after the count, so a rank 0 that
    deletes the keys once every ``read`` is there never deletes before it; the rank whose
    count makes ``size`` (every rank closed, or read a closed rank 0's word) deletes them."""
    with contextlib.suppress(Exception):
        store.set(prefix + keys.rank_key(keys.BLOCKS, rank), json.dumps({"error": text, "closed": closed}))
        if rank == 0:  # no rank 0 to check the blocks: the others hear it from here
            store.set(prefix + keys.LAYOUT, json.dumps({"error": text, "closed": closed, "orphan": True}))
        count = store.add(prefix + keys.GONE, 1)
        store.set(prefix + keys.rank_key(keys.READ, rank), "{}")
        if count == size:
            collect(store, prefix, size, GRACE)


def closing(spool: Spool) -> None:
    """``spool`` is closing: tell the other ranks of every group it saved sharded on that
    this rank's next save there will not come; the number is skipped, so a new spool on
    this rank stays in step with the others (which fail that save)."""
    for pool in drop_pools(spool):
        store = pool.store()
        if store is None:  # the group was destroyed: nobody waits on it
            continue
        n = next_number(pool.group)
        text = (
            f"rank {pool.rank}'s Spool was closed before it made this sharded save "
            f"(number {n} on group {pool.group!r}); it will not come"
        )
        notice(store, keys.save_prefix(pool.group, n), pool.rank, pool.size, text, text)


def closed(spool: Spool) -> None:
    """``spool`` is closing and its pending saves are over: each of its sharded streams
    tells the other ranks that this rank appends no further step (after the pending ones,
    so that a stream another rank already ended is not told again)."""
    for stream in drop_streams(spool):
        stream.end("Spool")
