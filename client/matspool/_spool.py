"""The client: ``Spool.save()`` copies into the ring and returns a future at once.

A spool is composed of parts, each owning its state (see each module's docstring):

- ``_planner``: a save's values, checked and laid out (the caller's thread);
- ``_quick``: a repeated small save of ndarrays, copied and queued from the entry its
  layout left (``Spool._quick``; the caller's thread), or handed back to the general path;
- ``_ring`` and ``_leases``: the shared-memory ring and who may touch which region;
- ``_pending``: the futures by sequence number, the only place that resolves them;
- ``_copies``: host copies' end, CUDA copies and host reorders, on the copy thread;
- ``_link`` over a ``_transport``: the protocol on the I/O thread (ZeroMQ, or a
  function in unit tests);
- ``_lifecycle``: fork, exit and multiprocessing children;
- ``_closing``: releasing the parts on ``close()`` or when a spool is collected unclosed.

The caller's thread never waits on the disk, and on the ring only by ``on_full``.
A save that fits in the ring goes whole (``_whole``); larger ones go in pieces
(``_pieces``); sharded saves over ranks through ``_shard``.

Threads: the ``Spool`` object itself holds only settings and its parts; ``save()`` runs
in callers' threads (any number), and each part says which thread owns what in it.
"""

from __future__ import annotations

import itertools
import os
import sys
import threading
import weakref
from collections.abc import Mapping
from concurrent.futures import Future
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Final

from . import _closing, _embedded, _lifecycle, _quick, _reach, _shard
from ._convert import INT_AS
from ._copies import CopyPipeline
from ._cuda import eager, refuse_capture
from ._curve import ClientKeys
from ._errors import CudaError, FlushError, SpoolClosed
from ._leases import Leases
from ._link import Link
from ._matlab import normalize_format
from ._overlap import MIN_BYTES, send_overlapped
from ._pending import PendingTable, SaveFuture, failing
from ._pieces import send_in_pieces
from ._planner import ON_FULL, check_choice, level, plan
from ._ring import Ring
from ._saves import SaveResult
from ._spoolopts import connection
from ._transport import Transport, ZmqTransport
from ._waiting import wait_for_saves
from ._whole import send_whole

if TYPE_CHECKING:
    from ._stream import Stream

__all__ = ["DEFAULT_RING_BYTES", "SaveResult", "Spool"]

DEFAULT_RING_BYTES: Final = int(os.environ.get("MATSPOOL_RING_BYTES", 256 << 20))


class Spool:
    """A connection to a writer daemon plus this process's ring.

    ``endpoint`` defaults to ``$MATSPOOL_ENDPOINT``; with neither, the process's embedded
    daemon is used (started by the first such spool, stopped when the last one closes), or,
    in a rank of a torchrun, Slurm or MPI job, the job's daemon on this node, shared by its
    ranks there (``MATSPOOL_SHARED=0``: one per process; see ``_jobdaemon``).
    An endpoint that is not ``ipc://PATH`` or ``tcp://HOST:PORT`` raises
    :class:`InvalidOptionError`; one nobody listens at raises :class:`DaemonUnavailable`
    within a few seconds. ``int_as="double"`` stores Python ints as MATLAB double. A
    spool dropped without ``close()`` finishes its saves and frees its ring when collected.
    ``timeout`` bounds how long ``save()`` blocks on a full ring (``on_full="block"``)
    and how long the daemon may stay silent before pending saves
    fail with :class:`DaemonUnavailable`. ``transport`` replaces the connection (unit
    tests pass a :class:`~matspool._transport.MemoryTransport`).

    After ``os.fork()`` the child's first use of an inherited spool opens one of its own
    (own ring and connection, same settings); the parent's is untouched.
    """

    def __init__(
        self,
        endpoint: str | None = None,
        ring_bytes: int = DEFAULT_RING_BYTES,
        on_full: str = "block",
        timeout: float = 60.0,
        *,
        ring_mode: int = 0o600,
        heartbeat: float = 1.0,
        connect_timeout: float = 30.0,
        curve: ClientKeys | None = None,
        compress: bool | int = False,
        int_as: str = "int64",
        transport: Transport | None = None,
    ) -> None:
        self.on_full = check_choice("on_full", on_full, ON_FULL)
        self.int_as = check_choice("int_as", int_as, INT_AS)
        self.compress = level(compress)
        if timeout is not None and timeout < 0:
            raise ValueError(f"timeout must be >= 0 or None, got {timeout!r}")
        self.timeout = timeout
        self._heartbeat = heartbeat
        self._closed = False
        self._fork_lock = threading.Lock()
        self._transport = transport
        self._settings, self._from_env, self._remote = connection(
            endpoint, transport, curve, ring_bytes, ring_mode, heartbeat, connect_timeout
        )
        self._embedded: _embedded.Share | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._open()

    def _open(self) -> None:
        """Open this process's parts: ring, leases, pending table, link, copy pipeline."""
        s = self._settings
        self._pid = os.getpid()
        self._seq = itertools.count()
        self._ring: Ring | None = None
        self._link: Link | None = None
        self._copies: CopyPipeline | None = None
        self._quick: dict[tuple[Any, ...], list[_quick.Entry]] = {}  # small repeated saves
        try:
            self._ring = Ring(s.ring_bytes, mode=s.ring_mode)
            self._leases = Leases(self._ring)
            self._table = PendingTable(self._leases)
            if s.endpoint is None:
                self._embedded = _embedded.acquire()
                self._settings = s = replace(s, endpoint=self._embedded.endpoint)
            assert s.endpoint is not None
            self.endpoint = s.endpoint
            transport = self._transport or ZmqTransport(s.endpoint, s.curve)
            emb = self._embedded
            self._link = Link(
                transport,
                self._ring,
                self._table,
                timeout=self.timeout,
                heartbeat=s.heartbeat,
                remote=self._remote,
                daemon_exit=emb.exit_status if emb is not None else None,
            )
            self._copies = CopyPipeline(self._ring, self._leases, self._table, self._link.send)
            endpoint = s.endpoint
            probe = (
                None
                if self._transport is not None or self._embedded is not None
                else lambda: _reach.probe(endpoint, from_env=self._from_env)
            )
            self._link.open(s.connect_timeout, probe, _reach.GRACE_S)
        except BaseException:
            self._teardown()
            raise
        # A spool dropped without close() frees its ring and its share of the daemon when
        # it is collected; the parts, not the spool, are what the finalizer holds.
        self._finalizer = weakref.finalize(
            self, _closing.release_dropped, self._table, self._copies, self._link, self._embedded, self._ring
        )
        self._finalizer.atexit = False  # at exit _lifecycle closes live spools (and reports)
        _lifecycle.after_open(self)

    # -- fork -----------------------------------------------------------------------------
    def _forked(self) -> None:
        """In a forked child (from ``_lifecycle``): the parent's parts are not ours."""
        self._fork_lock = threading.Lock()
        if self._finalizer is not None:
            self._finalizer.detach()  # the parent's parts: never ours to release

    def _own(self) -> None:
        """After a fork, open parts of this process's own before first use."""
        if self._pid == os.getpid():
            return
        with self._fork_lock:
            if self._pid == os.getpid():
                return
            if self._transport is not None:
                raise SpoolClosed(
                    "a spool on a given transport cannot follow a fork; open a new one in the child"
                )
            self._embedded = None  # the parent's daemon: the child connects, the parent stops it
            self._open()

    # -- public API --------------------------------------------------------------------
    def save(
        self,
        path: str | os.PathLike[str],
        variables: Mapping[str, Any],
        *,
        format: str = "auto",
        layout: str = "matlab",
        oned_as: str = "row",
        fsync: bool = False,
        compress: bool | int | None = None,
        append: bool = False,
        stream: Any = None,
        int_as: str | None = None,
        group: Any = None,
    ) -> Future[SaveResult]:
        """Queue ``variables`` for ``path``; returns a future at once.

        Checks happen here (names, types, format limits); write failures arrive
        through the future. ``layout="matlab"`` keeps indices (``A(i,j) == x[i,j]``),
        ``"raw"`` stores C-order bytes as they are (MATLAB sees the dims reversed),
        ``"hwc"`` turns 3-d CHW / 4-d NCHW images into HxWxC(xN). ``compress``
        (default: the spool's) deflates in the daemon: True is level 3, or give 1-9.
        ``append=True`` is MATLAB's ``save -append``: the variables are added to (or
        replace those in) an existing file, which keeps its format; atomically.
        ``stream``: the ``torch.cuda.Stream`` the CUDA tensors were produced on, when not
        the caller's current one (the snapshot is ordered after its work).
        Inside a ``torch.compile``d function a save runs eagerly, behind a graph break;
        during CUDA graph capture it raises :class:`CudaCaptureError`.
        ``int_as`` (default: the spool's, ``"int64"``): ``"double"`` stores Python ints
        (in dicts and lists too) as MATLAB double, which MATLAB arithmetic expects of a
        step number or a count; numpy and torch integer arrays keep their class.

        A :class:`matspool.Shard` or a DTensor among the variables makes it a sharded save
        (``_shard``): every rank of the torch.distributed ``group`` (default: the world)
        saves its blocks, and one file holds the global arrays (docs/distributed.md).
        """
        if append is False and group is None and int_as is None and type(variables) is dict:
            # a repeated small save of ndarrays (_quick); None: anything else, the long way
            fast = _quick.save if "torch._dynamo" not in sys.modules else eager(_quick.save)
            quick: SaveFuture | None = fast(self, path, variables, format, layout, oned_as, fsync, compress)
            if quick is not None:
                return quick
        if not isinstance(append, bool):
            raise TypeError(f"append must be a bool, got {append!r}")
        if group is not None or _shard.is_sharded(variables):
            fut: Future[SaveResult] = _shard.save_sharded(
                self,
                path,
                variables,
                fmt=normalize_format(format),
                layout=layout,
                oned_as=oned_as,
                fsync=fsync,
                compress=compress,
                append=append,
                group=group,
            )
            return fut
        submit = eager(Spool._submit)  # under torch.compile: eager, behind a graph break
        future: SaveFuture = submit(
            self,
            path,
            variables,
            normalize_format(format),
            layout,
            oned_as,
            fsync,
            compress,
            "write",
            append,
            stream,
            int_as,
        )
        return future

    def stream(
        self,
        path: str | os.PathLike[str],
        *,
        format: str = "v7.3",
        layout: str = "matlab",
        oned_as: str = "row",
        fsync: bool = False,
        compress: bool | int | None = None,
        group: Any = None,
    ) -> Stream:
        """A file that grows by one step per ``append``: MATLAB sees ``[dims... n_steps]``.

        The first append replaces any file at ``path``; each later one extends every
        variable along a new trailing dimension. Only v7.3 can grow a variable.
        A :class:`matspool.Shard` or a DTensor in the first step (or ``group``) makes it a
        stream sharded over the ranks of ``group`` (default: the world): every rank appends
        its blocks, one file grows the global series (``_shard_stream``, docs/distributed.md).
        """
        from ._shard_conns import track
        from ._shard_stream import Unstarted, append_sharded
        from ._stream import Stream

        def sharded(stream: Stream, variables: dict[str, Any]) -> Future[SaveResult]:
            return append_sharded(self, stream, variables, group)

        stream = Stream(
            self._submit,
            path,
            format=format,
            layout=layout,
            oned_as=oned_as,
            fsync=fsync,
            compress=compress,
            sharded=sharded,
            group=group,
        )
        if group is not None:  # sharded from its open: a close before its first step says so
            stream._unstarted = Unstarted(self, stream, group)
            track(self, stream._unstarted)
        return stream

    def _submit(
        self,
        path: str | os.PathLike[str],
        variables: Mapping[str, Any],
        fmt: str,
        layout: str,
        oned_as: str,
        fsync: bool,
        compress: bool | int | None,
        mode: str,
        append: bool = False,
        stream: Any = None,
        int_as: str | None = None,
    ) -> SaveFuture:
        refuse_capture()  # before anything is reserved or queued
        self._check_open()
        ring = self._ring
        assert ring is not None
        if type(variables) is dict and mode == "write" and not append:
            variables = _quick.host_views(variables)  # small CPU tensors: planned as ndarrays
        p = plan(
            path,
            variables,
            fmt,
            layout,
            oned_as,
            fsync,
            self.compress if compress is None else level(compress),
            mode,
            ring.size,
            append,
            self.int_as if int_as is None else int_as,
        )
        block = self.on_full == "block"
        assert self._copies is not None and self._link is not None
        if p.plain and mode == "write" and self._link.binary and not self._remote:
            _quick.remember(self, p, variables, fmt, layout, oned_as)  # the next such save: _quick
        if p.slabs is not None:
            return send_in_pieces(
                p,
                next(self._seq),
                self._leases,
                self._table,
                self._copies,
                block=block,
                timeout=self.timeout,
                stream=stream,
            )
        if p.total >= MIN_BYTES:  # the snapshot overlapped with the write (or None: whole)
            overlapped = send_overlapped(p, self._seq, self._leases, self._table, self._copies)
            if overlapped is not None:
                return overlapped
        return send_whole(
            p,
            self._seq,
            ring,
            self._leases,
            self._table,
            self._copies,
            block=block,
            timeout=self.timeout,
            stream=stream,
        )

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every save made so far is on disk; raise if any failed."""
        if self._pid != os.getpid():
            return  # a forked child that has not saved through this spool yet
        futures = self._table.futures()
        not_done = wait_for_saves(futures, timeout, "flush()")
        if not_done:
            raise TimeoutError(
                f"flush: {len(not_done)} of {len(futures)} saves still pending after {timeout} s"
            )
        # Every save that failed since the last flush(), including those that had already
        # failed (and so left the table) before this call.
        errors = self._table.take_failures()
        if errors:
            raise FlushError(
                f"{len(errors)} saves failed since the last flush; first: {errors[0]}", errors
            ) from errors[0]

    def close(self, timeout: float | None = 60.0) -> None:
        """Wait up to ``timeout`` for pending saves, then release the ring and the daemon.

        Saves still pending after that fail with :class:`SpoolClosed`. The other ranks of
        a group this spool saved or streamed sharded on learn that this rank makes no
        further sharded save there, nor step of those streams: theirs fail at once
        (docs/distributed.md). Raises :class:`FlushError` naming every save that failed
        and that nobody looked at (no ``result()``, ``exception()`` or ``flush()`` saw it).
        """
        if self._closed:
            return
        self._closed = True
        _lifecycle.forget(self)
        if self._pid != os.getpid():
            return  # the parent's parts: not ours to close
        _shard.closing(self)  # the other ranks' sharded saves waiting on this spool fail at once
        try:
            wait_for_saves(self._table.futures(), timeout, "close()")
        except KeyboardInterrupt:  # a second Ctrl-C (named the saves) or one with none left
            self._table.fail_unresolved(
                failing(SpoolClosed, "close() was interrupted before the save finished"), keep=False
            )
            self._teardown(wait=False)
            raise
        finally:  # this rank's pending stream steps are over: the others' next steps fail at once
            _shard.closed(self)
        self._table.fail_unresolved(
            failing(SpoolClosed, f"spool closed before the save finished (waited {timeout} s)"), keep=False
        )
        stuck = self._teardown()
        if stuck is not None:
            raise stuck
        unobserved = self._table.unobserved()
        if unobserved is not None:
            raise unobserved

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            self.close()
        except FlushError as e:
            if not isinstance(exc, BaseException):
                raise
            # the caller's error stays the one raised, the flush error a note on it
            if sys.version_info >= (3, 11):
                exc.add_note(str(e))
            else:  # no add_note before 3.11: PEP 678's attribute, which pytest also prints
                vars(exc).setdefault("__notes__", []).append(str(e))

    @property
    def pending(self) -> int:
        """Saves whose future is still open (in this process)."""
        return 0 if self._pid != os.getpid() else self._table.unresolved()

    # -- internals -----------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise SpoolClosed("save() on a closed Spool")
        self._own()
        if self._link is not None and self._link.broken is not None:
            raise self._link.broken

    def _teardown(self, *, wait: bool = True) -> CudaError | None:
        """Close every part; a copy stuck behind a CUDA stream is waited for only so
        long, then the ring is unmapped when it ends (never while the GPU may write into
        it) and the error saying so is returned."""
        self._closed = True
        if self._finalizer is not None:
            self._finalizer.detach()
        if not _closing.close_parts(self._copies, self._link, self._embedded, self._ring, wait=wait):
            return None
        return CudaError(
            f"close(): a copy into the ring did not end within {_closing.COPIES_CLOSE_TIMEOUT} s "
            "(a CUDA stream it waits on is stuck, or a host reorder still runs); the ring is "
            "unmapped once it ends"
        )
