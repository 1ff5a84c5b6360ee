"""Saves sharded over ranks: every rank's block of a global array, one file.

``spool.save(path, {"u": Shard(local, offset, global_shape)})`` (or a DTensor) is called
by every rank of a torch.distributed process group with the same path. Each rank copies
its own blocks into its own ring (at once, so the caller may reuse its tensors, unless
they exceed the ring), and a background thread then coordinates through the group's
c10d store (never a collective: those belong to the caller's thread):

1. every rank puts its blocks (offsets, sizes, dtype, global size) under ``blocks/<r>``;
2. group rank 0 checks them (same path and variables everywhere, no overlap, nothing
   missing), has its daemon LAY OUT the file under a temporary name and puts the
   temporary and the data offsets under ``layout`` (or the error);
3. every rank has its own daemon PLACE its blocks in the temporary (in pieces of at most
   a quarter of its ring when they exceed it), then puts ``done/<r>``;
4. rank 0 waits for every ``done`` (at most ``timeout``), has its daemon PUBLISH (fsync,
   rename) or DISCARD the temporary, and puts ``result``; every rank's future resolves
   from it. A rank whose wait for ``result`` times out discards the temporary itself.

Keys live under ``matspool/shard/<group>/<n>/``, ``n`` counting this process's sharded
saves on the group: every rank must make its sharded saves in the same order, as for
any collective.

The ring side (this rank's blocks cut into pieces, copied into its ring) is ``_shard_ring``;
this module is the coordination over the store and the requests to this rank's daemon.

Threads: ``save_sharded`` runs in the caller's thread (checks, copies into the ring);
each save then has one ``matspool-shard`` thread of its own, with its own clone of the
store client (a blocking wait would otherwise hold up the other saves' requests), which
alone touches its store keys and its sub-requests' futures. ``_counters`` is shared under ``_lock``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import threading
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Final

from ._errors import DaemonUnavailable, InvalidOptionError, MatspoolError, SpoolFull
from ._leases import Lease
from ._msgshard import Discard, Layout, LayoutResult, Place, Publish
from ._pending import Save
from ._saves import SaveResult
from ._shard_blocks import Failed, Shard, ShardError, Var, check_blocks, is_sharded
from ._shard_ring import Piece, copy_piece, prepare, release

if TYPE_CHECKING:
    from ._spool import Spool

__all__ = ["Shard", "ShardError", "is_sharded", "save_sharded"]

_RESULT_GRACE: Final = 10.0  # others wait this much longer than rank 0 for its verdict
_lock = threading.Lock()
_counters: dict[str, itertools.count[int]] = {}


def save_sharded(
    spool: Spool,
    path: str | os.PathLike[str],
    variables: Mapping[str, Any],
    *,
    fmt: str,
    layout: str,
    oned_as: str,
    fsync: bool,
    compress: bool | int | None,
    append: bool,
    group: Any,
) -> Any:
    """See the module docstring; returns the save's future at once."""
    import torch.distributed as dist

    if layout != "matlab":
        raise InvalidOptionError(f"a sharded save takes layout='matlab' only, not {layout!r}")
    if compress or append:
        raise InvalidOptionError(
            "a sharded save cannot be compressed or appended (blocks are written in place)"
        )
    if spool._remote:
        raise InvalidOptionError("a sharded save needs a daemon on this host (not a tcp:// endpoint)")
    if not dist.is_available() or not dist.is_initialized():
        raise InvalidOptionError("a sharded save needs torch.distributed initialised (init_process_group)")
    spool._check_open()
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    if rank < 0:
        raise InvalidOptionError("this process is not a member of the group given")
    store = (
        dist.distributed_c10d._get_default_store()
        if group is None
        else (dist.distributed_c10d._get_process_group_store(group))
    )
    gname = "default" if group is None else str(getattr(group, "group_name", id(group)))
    with _lock:
        n = next(_counters.setdefault(gname, itertools.count()))
    full = os.path.abspath(os.fspath(path))
    prefix = f"matspool/shard/{gname}/{n}/"
    try:
        vars_, pieces, save = prepare(spool, full, variables, rank, oned_as, fmt)
    except BaseException as e:
        # the others learn of it at once (rank 0 fails the save for all), not by a timeout
        why = {"error": f"sharded save to {full!r}: rank {rank}: {type(e).__name__}: {e}"}
        with contextlib.suppress(Exception):
            store.set(f"{prefix}blocks/{rank}", json.dumps(why))
        raise
    timeout = float(spool.timeout) if spool.timeout else 60.0
    job = _Job(spool, save, store, prefix, rank, size, full, fsync, vars_, pieces, timeout)
    threading.Thread(target=job.run, name=f"matspool-shard-{n}", daemon=True).start()
    return save.future


@dataclass(eq=False)
class _Job:
    """One sharded save's coordination, on its own thread (see the module docstring)."""

    spool: Spool
    save: Save
    store: Any
    prefix: str
    rank: int
    size: int
    path: str
    fsync: bool
    vars: list[Var]
    pieces: list[Piece]
    timeout: float
    tmp: str | None = None

    def run(self) -> None:
        try:
            # a connection of this save's own: a blocking wait on a shared store client
            # holds up every other thread's (another save's) requests behind it
            with contextlib.suppress(Exception):  # a store that cannot clone: shared
                self.store = self.store.clone()
            nbytes = self._run()
        except BaseException as e:  # noqa: BLE001 - every failure reaches the future
            release(self.spool, self.pieces)
            error = e if isinstance(e, MatspoolError) else ShardError(f"sharded save to {self.path!r}: {e}")
            self.spool._table.fail(self.save.seq, error)
        else:
            self.save.future.set_result(SaveResult(self.path, nbytes, self.save.format))
        self.spool._table.forget(self.save)

    # -- the store ------------------------------------------------------------------------
    def _put(self, key: str, value: dict[str, Any]) -> None:
        self.store.set(self.prefix + key, json.dumps(value))

    def _wait(self, keys: list[str], timeout: float) -> None:
        self.store.wait([self.prefix + k for k in keys], timedelta(seconds=timeout))

    def _get(self, key: str) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.store.get(self.prefix + key))
        return value

    def _read(self) -> None:
        """This rank has read the outcome; the last to read removes the save's keys."""
        if self.store.add(self.prefix + "read", 1) != self.size:
            return
        keys = ["layout", "result", "read"] + [
            f"{k}/{r}" for k in ("blocks", "done") for r in range(self.size)
        ]
        for key in keys:
            with contextlib.suppress(Exception):
                self.store.delete_key(self.prefix + key)

    def _missing(self, keys: list[str]) -> list[str]:
        return [k for k in keys if not self.store.check([self.prefix + k])]

    def _wait_ranks(self, what: str) -> str | None:
        """Wait for ``what/<r>`` of every rank; the error naming those that never came."""
        keys = [f"{what}/{r}" for r in range(self.size)]
        try:
            self._wait(keys, self.timeout)
        except Exception:  # noqa: BLE001 - the store's timeout: say which ranks are missing
            late = [k.split("/")[-1] for k in self._missing(keys)]
            if late:
                return (
                    f"sharded save to {self.path!r}: rank(s) {', '.join(late)} did not "
                    f"{'start' if what == 'blocks' else 'finish'} within {self.timeout:g} s "
                    "(a rank or its daemon died, or did not call save())"
                )
        return None

    # -- the daemon -----------------------------------------------------------------------
    def _ask(self, message: Any) -> SaveResult:
        """Send one request to this rank's daemon and wait for its answer."""
        return self._send(message).result(self.timeout + _RESULT_GRACE)

    def _send(self, message: Any, lease: Lease | None = None) -> Future[SaveResult]:
        """Send one request to this rank's daemon; its future (``lease``: the ring region
        it names, which goes back when the daemon answers)."""
        spool = self.spool
        link = spool._link
        assert link is not None
        sub = spool._table.add(message.seq, self.path, self.save.format, [lease] if lease else [])
        sub.ended, sub.outstanding, sub.instance = True, 1, link.instance
        if lease is not None:
            lease.instance = link.instance
        link.send(message)
        return sub.future

    # -- the steps ------------------------------------------------------------------------
    def _run(self) -> int:
        self._put(
            f"blocks/{self.rank}",
            {"path": self.path, "format": self.save.format, "vars": {v.name: v.wire() for v in self.vars}},
        )
        if self.rank == 0:
            self._lay_out()
        try:
            self._wait(["layout"], self.timeout + _RESULT_GRACE)
        except Exception as e:  # noqa: BLE001 - a timeout, or the store gone with rank 0
            why = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise ShardError(
                f"sharded save to {self.path!r}: rank 0 did not lay the file out within "
                f"{self.timeout + _RESULT_GRACE:g} s, or it died (the store said: {why})"
            ) from None
        laid = self._get("layout")
        if "error" in laid:
            self._read()
            raise ShardError(laid["error"])
        self.tmp = laid["tmp"]
        status: dict[str, Any] = {"ok": True}
        try:
            self._place(laid["offsets"])
        except BaseException as e:  # noqa: BLE001 - told to rank 0, then raised below
            status = {"error": f"rank {self.rank}: {type(e).__name__}: {e}"}
        self._put(f"done/{self.rank}", status)
        if self.rank == 0:
            self._finish()
        try:
            self._wait(["result"], self.timeout + _RESULT_GRACE)
        except Exception:  # noqa: BLE001 - rank 0 (or its daemon) is gone: clean up ourselves
            self._discard()
            raise ShardError(
                f"sharded save to {self.path!r}: no result from rank 0 within "
                f"{self.timeout + _RESULT_GRACE:g} s (it or its daemon died); nothing was published"
            ) from None
        result = self._get("result")
        self._read()
        if "error" in result:
            raise ShardError(result["error"])
        return int(result["nbytes"])

    def _lay_out(self) -> None:
        """Rank 0: check every rank's blocks, have the file laid out, tell everyone."""
        try:
            late = self._wait_ranks("blocks")
            if late:
                raise Failed(late)
            ranks = [self._get(f"blocks/{r}") for r in range(self.size)]
            fmt, shard_vars = check_blocks(self.path, ranks)
            laid = self._ask(Layout(next(self.spool._seq), self.path, fmt, tuple(shard_vars)))
            assert isinstance(laid, LayoutResult)
            self._put("layout", {"tmp": laid.path, "offsets": laid.offsets})
        except Failed as e:
            self._put("layout", {"error": str(e)})
        except BaseException as e:  # noqa: BLE001 - every rank must hear of it
            self._put("layout", {"error": f"sharded save to {self.path!r}: rank 0: {type(e).__name__}: {e}"})

    def _place(self, offsets: dict[str, list[int]]) -> None:
        """Have this rank's daemon write each of its pieces in place (all in flight at once:
        pieces beyond the ring wait for room, which answered pieces free)."""
        sent: list[Future[SaveResult]] = []
        leases = self.spool._leases
        for piece in self.pieces:
            if piece.ring_offset < 0:  # larger than the ring: copied now, as room frees
                lease = self._room(piece.nbytes, sent)
                try:
                    copy_piece(self.spool, piece, lease.offset)
                finally:
                    leases.copied(lease)
                    piece.lease = lease
            held, piece.lease = piece.lease, None  # from here on the PLACE's to release
            assert self.tmp is not None
            v = piece.var
            at = offsets[v.name]  # the data's offset (v5 complex: and the imaginary parts')
            sent.append(
                self._send(
                    Place(
                        next(self.spool._seq),
                        self.path,
                        self.tmp,
                        at[0],
                        v.dtype,
                        v.dims,
                        piece.origin,
                        piece.shape,
                        piece.ring_offset,
                        self.fsync,
                        at[1] if len(at) > 1 else None,
                    ),
                    held,
                )
            )
        for future in sent:
            future.result(self.timeout + _RESULT_GRACE)

    def _room(self, nbytes: int, sent: list[Future[SaveResult]]) -> Lease:
        """A ring region for a piece. No room because the daemon died (or went silent)
        says so: the pieces in flight fail first with the reason."""
        try:
            return self.spool._leases.take(nbytes, block=True, timeout=self.timeout)
        except SpoolFull:
            for future in sent:
                error = future.exception(self.timeout + _RESULT_GRACE)
                if error is not None:
                    raise error from None
            link = self.spool._link
            if link is not None and link._daemon_dead():
                raise DaemonUnavailable(
                    f"the daemon at {link.endpoint} (pid {link.daemon_pid}) died while this rank's "
                    "blocks were being written"
                ) from None
            raise

    def _finish(self) -> None:
        """Rank 0: every rank done: publish; else discard. Then tell everyone."""
        try:
            late = self._wait_ranks("done")
            errors = [late] if late else []
            if not late:
                errors = [d["error"] for r in range(self.size) if "error" in (d := self._get(f"done/{r}"))]
            if errors:
                self._discard()
                self._put("result", {"error": "; ".join(errors) + "; nothing was published"})
                return
            assert self.tmp is not None
            done = self._ask(Publish(next(self.spool._seq), self.path, self.tmp, self.fsync))
            self._put("result", {"nbytes": done.nbytes})
        except BaseException as e:  # noqa: BLE001 - every rank must hear of it
            self._discard()
            self._put("result", {"error": f"sharded save to {self.path!r}: rank 0: {type(e).__name__}: {e}"})

    def _discard(self) -> None:
        if self.tmp is None:
            return
        try:
            self._ask(Discard(next(self.spool._seq), self.path, self.tmp))
        except Exception:  # noqa: BLE001 - best effort: the daemon's journal sweeps leftovers
            pass
