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
   from it. A rank whose wait for ``result`` times out discards the temporary itself;
5. every rank puts ``read/<r>``; rank 0 waits for them all, deletes the save's keys and
   only then resolves its own future (``_shard_coord``).

Keys (``_shard_keys``) live under ``matspool/shard/<group>/<n>/``, ``n`` counting this
process's sharded saves on the group (``_shard_conns.next_number``): every rank must make
its sharded saves in the same order, as for any collective.

The ring side (this rank's blocks cut into pieces, copied into its ring) is ``_shard_ring``;
the store side (keys, waits, the end of a save) ``_shard_coord``; this module is the steps
and the requests to this rank's daemon.

Threads: ``save_sharded`` runs in the caller's thread (checks, copies into the ring);
each save then has one ``matspool-shard`` thread of its own, with a store connection of
its own while it runs (from the spool's pool, ``_shard_conns``: a blocking wait on a
shared one would hold up the other saves' requests), which alone touches its store keys
and its sub-requests' futures.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from . import _shard_keys as keys
from ._errors import DaemonUnavailable, InvalidOptionError, MatspoolError, SpoolClosed, SpoolFull
from ._leases import Lease
from ._msgshard import Discard, Layout, LayoutResult, Place, Publish, ShardVar
from ._pending import Save
from ._saves import SaveResult
from ._shard_blocks import Failed, Shard, ShardError, Var, check_blocks, is_sharded
from ._shard_conns import Conns, conns, next_number
from ._shard_coord import GRACE, Coord, StoreGone, closed, closing, early_failure, gone
from ._shard_ring import Piece, copy_piece, landed, prepare, release

if TYPE_CHECKING:
    from ._spool import Spool

__all__ = ["Shard", "ShardError", "closed", "closing", "is_sharded", "save_sharded"]


def _store(dist: Any, group: Any) -> tuple[Any, str]:
    """The group's c10d store and the name its keys go under."""
    if group is None:
        return dist.distributed_c10d._get_default_store(), "default"
    return dist.distributed_c10d._get_process_group_store(group), str(getattr(group, "group_name", id(group)))


def _member(group: Any, what: str) -> tuple[int, int, Any, str]:
    """This process's rank in ``group`` (None: the default group), the group's size, its
    store and the name its keys go under; ``what`` (a sharded save or stream) names the
    caller in the errors: torch.distributed not initialised, not a member."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise InvalidOptionError(f"{what} needs torch.distributed initialised (init_process_group)")
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    if rank < 0:
        raise InvalidOptionError("this process is not a member of the group given")
    store, gname = _store(dist, group)
    return rank, size, store, gname


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
    if layout != "matlab":
        raise InvalidOptionError(f"a sharded save takes layout='matlab' only, not {layout!r}")
    if compress or append:
        raise InvalidOptionError(
            "a sharded save cannot be compressed or appended (blocks are written in place)"
        )
    rank, size, store, gname = _member(group, "a sharded save")
    n = next_number(gname)
    full = os.path.abspath(os.fspath(path))
    prefix = keys.save_prefix(gname, n)
    pool = conns(spool, gname, store, rank, size)
    job = _start_job(
        _Job,
        spool,
        variables,
        (fmt, oned_as, fsync),
        lambda why: (f"sharded save to {full!r}: {why}",) * 2,
        pool=pool,
        base=store,
        prefix=prefix,
        rank=rank,
        size=size,
        path=full,
    )
    threading.Thread(target=job.run, name=f"matspool-shard-{n}", daemon=True).start()
    return job.save.future


_J = TypeVar("_J", bound="_Job")


def _start_job(
    cls: type[_J],
    spool: Spool,
    variables: Mapping[str, Any],
    opts: tuple[str, str, bool],
    said: Callable[[str], tuple[str, str]],
    *,
    pool: Conns,
    base: Any,
    prefix: str,
    rank: int,
    size: int,
    path: str,
    **extra: Any,
) -> _J:
    """This rank's job (a save's or a stream step's: ``cls``, with ``extra`` its own
    fields), its blocks prepared; ``opts``: format, oned_as, fsync. A closed spool or
    blocks that cannot be prepared fail the job on every rank at once (rank 0 fails it
    for all), not by a timeout: ``said(why)`` is the text told to the others and the
    layout's; then the error is raised here."""
    fmt, oned_as, fsync = opts
    timeout = float(spool.timeout) if spool.timeout else 60.0
    try:
        spool._check_open()  # a closed spool on one rank fails the save on every rank, at once
        vars_, pieces, save = prepare(spool, path, variables, rank, oned_as, fmt)
    except BaseException as e:
        text, layout = said(f"rank {rank}: {type(e).__name__}: {e}")
        early_failure(pool, base, prefix, text, layout, timeout)
        raise
    return cls(
        pool=pool,
        base=base,
        prefix=prefix,
        rank=rank,
        size=size,
        path=path,
        timeout=timeout,
        spool=spool,
        save=save,
        fsync=fsync,
        vars=vars_,
        pieces=pieces,
        **extra,
    )


@dataclass(eq=False, kw_only=True)
class _Job(Coord):
    """One sharded save's coordination, on its own thread (see the module docstring)."""

    spool: Spool
    save: Save
    fsync: bool
    vars: list[Var]
    pieces: list[Piece]
    tmp: str | None = None

    def run(self) -> None:
        ok = False
        try:
            self._connect()
            nbytes = self._run()
            ok = True
        except BaseException as e:  # noqa: BLE001 - every failure reaches the future
            # a verdict or the daemon's error leaves the connection as good as it was
            ok = isinstance(e, MatspoolError) and not isinstance(e, StoreGone)
            release(self.spool, self.pieces)
            self.spool._table.fail(self.save.seq, self._error(e))
        else:
            self.save.future.set_result(SaveResult(self.path, nbytes, self.save.format))
        finally:
            self._disconnect(ok)
            self.base = None  # rank 0: the store may go once every rank has its outcome
        self.spool._table.forget(self.save)

    def _error(self, e: BaseException) -> MatspoolError:
        """The error the future gets: a store error as a ShardError saying what it was."""
        if isinstance(e, StoreGone):  # internal: the caller sees a ShardError
            return ShardError(str(e))
        if isinstance(e, MatspoolError):
            return e
        if gone(e):
            return ShardError(str(self._gone_error(e)))
        return ShardError(f"{self._what()}: {type(e).__name__}: {str(e).strip()[:300]}")

    # -- the daemon -----------------------------------------------------------------------
    def _ask(self, message: Any) -> SaveResult:
        """Send one request to this rank's daemon and wait for its answer."""
        return self._send(message).result(self.timeout + GRACE)

    def _send(self, message: Any, lease: Lease | None = None) -> Future[SaveResult]:
        """Send one request to this rank's daemon; its future (``lease``: the ring region
        it names, which goes back when the daemon answers)."""
        spool = self.spool
        link = spool._link
        assert link is not None
        if link.closed:  # its close() gave up on this save: no answer would come, fail now
            raise SpoolClosed(
                "the Spool was closed (its close() stopped waiting for this save) before this "
                "rank's blocks were written"
            )
        sub = spool._table.add(message.seq, self.path, self.save.format, [lease] if lease else [])
        sub.ended, sub.outstanding, sub.instance = True, 1, link.instance
        if lease is not None:
            lease.instance = link.instance
        link.send(message)
        return sub.future

    # -- the steps ------------------------------------------------------------------------
    def _run(self) -> int:
        self._put(
            keys.rank_key(keys.BLOCKS, self.rank),
            {"path": self.path, "format": self.save.format, "vars": {v.name: v.wire() for v in self.vars}},
        )
        if self.rank == 0:
            self._lay_out()
        try:
            self._wait([keys.LAYOUT], self.timeout + GRACE)
        except StoreGone:
            raise
        except Exception as e:  # noqa: BLE001 - a timeout
            raise ShardError(
                f"{self._what()}: rank 0 did not lay the file out within {self.timeout + GRACE:g} s, "
                f"or it died (the store said: {str(e).strip()[:200] or type(e).__name__})"
            ) from None
        laid = self._get(keys.LAYOUT)
        if "error" in laid:
            self._read(laid)
            self._refused(laid)
            text = laid["error"]  # a closed rank 0's word names no path: say which save
            raise ShardError(text if self.path in text else f"{self._what()}: {text}")
        self.tmp = laid["tmp"]
        status: dict[str, Any] = {"ok": True}
        try:
            self._place(laid["offsets"])
        except BaseException as e:  # noqa: BLE001 - told to rank 0, then raised below
            status = {"error": f"rank {self.rank}: {type(e).__name__}: {e}"}
        self._put(keys.rank_key(keys.DONE, self.rank), status)
        if self.rank == 0:
            self._finish()
        try:
            self._wait([keys.RESULT], self.timeout + GRACE)
        except Exception as e:
            self._discard()
            if isinstance(e, StoreGone):
                raise
            raise ShardError(
                f"{self._what()}: no result from rank 0 within {self.timeout + GRACE:g} s "
                "(it or its daemon died); nothing was published"
            ) from None
        result = self._get(keys.RESULT)
        self._read()
        if "error" in result:
            raise ShardError(result["error"])
        return int(result["nbytes"])

    def _lay_out(self) -> None:
        """Rank 0: check every rank's blocks, have the file laid out, tell everyone."""
        try:
            late = self._wait_ranks(keys.BLOCKS)
            if late:
                raise Failed(late)
            ranks = [self._get(keys.rank_key(keys.BLOCKS, r)) for r in range(self.size)]
            for got in ranks:
                if "closed" in got:  # a rank's spool (or stream) was closed: it never comes
                    self._put(keys.LAYOUT, {"error": self._said(got["error"]), "closed": got["closed"]})
                    return
            fmt, shard_vars = check_blocks(self.path, ranks)
            self._put(keys.LAYOUT, self._laid(fmt, shard_vars))
        except StoreGone:
            raise
        except Failed as e:
            self._put(keys.LAYOUT, {"error": self._said(str(e))})
        except BaseException as e:  # noqa: BLE001 - every rank must hear of it
            self._put(keys.LAYOUT, {"error": f"{self._what()}: rank 0: {type(e).__name__}: {e}"})

    def _refused(self, laid: dict[str, Any]) -> None:
        """Rank 0's verdict was an error (``laid``); a stream step remembers a closed rank."""

    def _laid(self, fmt: str, shard_vars: list[ShardVar]) -> dict[str, Any]:
        """Rank 0, the blocks checked: the file laid out; what every rank is told."""
        laid = self._ask(Layout(next(self.spool._seq), self.path, fmt, tuple(shard_vars)))
        assert isinstance(laid, LayoutResult)
        return {"tmp": laid.path, "offsets": laid.offsets}

    def _said(self, text: str) -> str:
        """``text`` as this save's error (a closed rank's word names no path: say which)."""
        return text if self.path in text else f"{self._what()}: {text}"

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
            landed(self.spool, piece)  # a CUDA snapshot's D2H: in the ring before its PLACE goes
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
            future.result(self.timeout + GRACE)

    def _room(self, nbytes: int, sent: list[Future[SaveResult]]) -> Lease:
        """A ring region for a piece. No room because the daemon died (or went silent)
        says so: the pieces in flight fail first with the reason."""
        try:
            return self.spool._leases.take(nbytes, block=True, timeout=self.timeout)
        except SpoolFull:
            for future in sent:
                error = future.exception(self.timeout + GRACE)
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
        """Rank 0: every rank done: publish (``_end``); else discard. Then tell everyone."""
        try:
            late = self._wait_ranks(keys.DONE)
            errors = [late] if late else []
            if not late:
                errors = [
                    d["error"]
                    for r in range(self.size)
                    if "error" in (d := self._get(keys.rank_key(keys.DONE, r)))
                ]
            if errors:
                self._discard()
                self._put(keys.RESULT, {"error": self._not_ended(errors)})
                return
            self._put(keys.RESULT, {"nbytes": self._end()})
        except StoreGone:
            self._discard()
            raise
        except BaseException as e:  # noqa: BLE001 - every rank must hear of it
            self._discard()
            self._put(keys.RESULT, {"error": f"{self._what()}: rank 0: {type(e).__name__}: {e}"})

    def _not_ended(self, errors: list[str]) -> str:
        """Rank 0: what every rank is told when some rank failed its blocks."""
        return "; ".join(errors) + "; nothing was published"

    def _end(self) -> int:
        """Rank 0, every rank done: the temporary published; its bytes."""
        assert self.tmp is not None
        return self._ask(Publish(next(self.spool._seq), self.path, self.tmp, self.fsync)).nbytes

    def _discard(self) -> None:
        if self.tmp is None:
            return
        try:
            self._ask(Discard(next(self.spool._seq), self.path, self.tmp))
        except Exception:  # noqa: BLE001 - best effort: the daemon's journal sweeps leftovers
            pass
