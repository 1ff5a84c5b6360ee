"""The control loop: one ZeroMQ ROUTER, one thread, every message dispatched from here.

The control loop hands every file to the writer threads, so heartbeats and new requests
are answered while large files are written; only a tiny whole file without fsync is
written on the loop itself (``INLINE_BYTES``), since two thread hand-offs cost more than
such a file's whole write. Received messages wait in a backlog, handled in order for at
most ``INLINE_SLICE_S`` per turn, so a burst of small files still lets the loop answer.
Each WRITE is checked against the protocol schema, the sender's ring and the roots before
any byte is read; any failure becomes an ``ERR`` for that save, never an exception that
ends the daemon.

The daemon is split by job, each module owning its state:

- here: the socket, message dispatch, start and stop;
- ``sessions``: the client table (HELLO, BYE, reaping the dead);
- ``scheduler``: per-path order and the writer threads;
- ``intake``: a checked WRITE, PART, END or sharded op made into a writer's job;
- ``jobs``: what a writer does with one WRITE, PART or END;
- ``outcomes``: what a finished job becomes (the counters, its client's books, DONE);
- ``replies``: ERR and DONE messages;
- ``listen``: binding the socket; ``endpoint``: one daemon per ipc socket;
- ``cleanup``: leftovers of dead processes;
- ``guard``: what one connection can make the daemon hold (finite queues per peer, a
  reader that stops is cut, a connection cap below the descriptor limit);
- ``matspool._endpoint``: the socket's directory must be this user's (checked before bind).

Threads: everything in :class:`Daemon` belongs to the thread that runs ``serve``, except
``stop`` (any thread, a signal handler) and ``snapshot`` (replaced by the loop, read by
the metrics thread).
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import zmq

from matspool import _messages as msgs
from matspool import _protocol as proto
from matspool import _wirebin
from matspool._curve import is_tcp
from matspool._errors import ProtocolError
from matspool._msgshard import Discard, Layout, Place, Publish, StreamStep
from matspool._msgstatus import StatusReply

from . import binparse
from .binparse import BinWrite
from .cleanup import (
    TempJournal,
    default_state_dirs,
    open_journal,
    remove_stale_rings,
    sweep_dead,
)
from .guard import Guard
from .intake import piece_job, shard_job, write_job
from .jobs import Job, JobRunner
from .listen import Listener
from .outcomes import Outcomes
from .paths import normalize_roots
from .replies import refuse
from .scheduler import Result, Scheduler, file_key
from .sessions import DEFAULT_MAX_RING_BYTES, DEFAULT_MAX_TOTAL_RING_BYTES, Client, Clients
from .sharded import LAID
from .writers._files import TEMPS

__all__ = ["Daemon", "install_signal_handlers"]

log = logging.getLogger("matspoold")

MAX_REMOTE_FRAME = 1 << 32  # 4 GiB: larger arrays travel in pieces
#: a whole save this small, not fsynced, is written on the control thread itself: handing
#: it to a writer thread and its result back costs two thread wake-ups, more than the write
INLINE_BYTES = 64 << 10
#: the control loop handles received messages at most this long per turn, then polls
#: again (answers, new messages) before going on with the rest (``_backlog``)
INLINE_SLICE_S = 0.02


class Daemon:
    """One per node (``matspool serve``), one per client when embedded, or one per job's
    ranks on a node (``--idle-exit``: ``matspool._jobdaemon``)."""

    _guard: Guard  # the ROUTER's queues and connections, made by serve()

    def __init__(
        self,
        endpoint: str,
        roots: Sequence[str],
        *,
        writers: int = 4,
        socket_mode: int = 0o600,
        socket_group: str | None = None,
        parent_pid: int | None = None,
        idle_exit: float | None = None,
        clean_stale: bool = True,
        client_timeout: float = 30.0,
        curve_secret: str | None = None,
        curve_clients: str | None = None,
        write_delay: float = 0.0,
        state_dir: str | None = None,
        max_ring_bytes: int | None = None,
        max_total_ring_bytes: int | None = None,
    ) -> None:
        if not roots:
            raise ValueError("the daemon needs at least one --root")
        if writers < 1:
            raise ValueError(f"--writers must be at least 1, got {writers}")
        self.endpoint = endpoint
        self.roots = normalize_roots(roots)
        if is_tcp(endpoint) and not (curve_secret and curve_clients):
            raise ValueError(
                f"refusing to listen on {endpoint} without CURVE keys: pass --curve-secret "
                "(the server's .key_secret) and --curve-clients (a directory of authorized "
                "client .key files); `matspool keygen` makes both"
            )
        self.parent_pid = parent_pid
        # a job's shared daemon (--idle-exit): leaves once it has had no client that long
        self.idle_exit = idle_exit
        self._ctx = zmq.Context()
        self._jobs = JobRunner(self.roots, write_delay)
        self._scheduler = Scheduler(writers, self._jobs.run, self._ctx)
        self._clients = Clients(
            tcp=is_tcp(endpoint),
            clean_stale=clean_stale,
            client_timeout=client_timeout,
            forget=self._forget,
            max_ring_bytes=max_ring_bytes or DEFAULT_MAX_RING_BYTES,
            max_total_ring_bytes=max_total_ring_bytes or DEFAULT_MAX_TOTAL_RING_BYTES,
        )
        # a plain flag, not an Event: stop() runs in signal handlers, which may interrupt the
        # main thread inside an earlier stop(); Event.set() would then wait on its own lock
        self._stopping = False
        self._outcomes = Outcomes(self._clients)  # counters, DONEs not yet sent
        self.started = time.monotonic()
        self.instance = secrets.token_hex(8)  # tells clients this daemon from an earlier one
        self.clean_stale = clean_stale
        # the journal's directory: the one given, else the first usable default
        self.state_dirs = [state_dir] if state_dir else default_state_dirs(endpoint)
        self._journal: TempJournal | None = None
        self._listener = Listener(
            self._ctx,
            endpoint,
            curve_secret=curve_secret,
            curve_clients=curve_clients,
            socket_mode=socket_mode,
            socket_group=socket_group,
        )
        self.snapshot: StatusReply = self.status()  # refreshed by the loop; read by metrics
        # messages received, not yet handled, in arrival order: (sender, message, payload
        # frames, whether the daemon was stopping when it arrived)
        self._backlog: deque[tuple[bytes, dict[str, Any] | BinWrite, list[memoryview], bool]] = deque()

    # -- life cycle ----------------------------------------------------------------------
    def _forget(self, client: Client) -> None:
        """A dropped client: its unfinished saves in pieces, and the temporaries of sharded
        saves it laid out, leave no file behind."""
        self._jobs.forget(client)
        LAID.forget(client.ident, self.roots)

    def stop(self) -> None:
        """Finish the accepted writes, then leave ``serve()``. Safe from any thread and from a
        signal handler, re-entered or not: it takes no lock (the loop polls the flag)."""
        self._stopping = True

    def serve(self) -> None:
        router = self._ctx.socket(zmq.ROUTER)
        # locally payloads never cross the socket; from authenticated remote clients an
        # array's frame is at most as large as their ring (which caps what is in flight)
        router.setsockopt(
            zmq.MAXMSGSIZE, MAX_REMOTE_FRAME if is_tcp(self.endpoint) else proto.MAX_MESSAGE_BYTES + 4096
        )
        router.setsockopt(zmq.LINGER, 1000)
        # finite queues per peer, ROUTER_MANDATORY, a connection cap: see guard.py
        guard = self._guard = Guard(router)
        try:
            self._listener.bind(router, guard.listening)
            # after the bind: a daemon refused its endpoint must not sweep or journal
            self._journal = open_journal(self.state_dirs, TEMPS.tag)
            sweep_dead(os.path.dirname(self._journal.path))
            TEMPS.record = self._journal.record
        except BaseException:
            guard.close()
            router.close(linger=0)
            if self._listener.claim is not None:
                self._listener.claim.release(remove_lock=self.idle_exit is not None)
            raise
        wake = self._scheduler.wake_socket()
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(wake, zmq.POLLIN)
        if self.clean_stale:
            remove_stale_rings()
        log.info("serving %s, roots %s", self.endpoint, ", ".join(self.roots))
        next_reap = time.monotonic() + 1.0
        idle_since = time.monotonic()
        try:
            while True:
                events = dict(poller.poll(0 if self._backlog else 200))
                if wake in events:
                    while wake.poll(0):
                        wake.recv()
                self._outcomes.drain(guard, self._scheduler)
                if router in events:
                    for _ in range(256):  # bounded, so results are never starved
                        try:
                            frames = router.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._handle(router, frames)
                if self._backlog:
                    self._work(router)
                    self._outcomes.send_done(guard)
                if time.monotonic() >= next_reap:
                    self._clients.reap()
                    self.snapshot = self.status()  # what other threads (metrics) may read
                    next_reap = time.monotonic() + 1.0
                if self.parent_pid is not None and os.getppid() != self.parent_pid:
                    log.info("parent %d is gone; stopping", self.parent_pid)
                    self._stopping = True
                if self.idle_exit is not None and not self._stopping:
                    if self._clients.table or router in events:  # a PING counts: a HELLO follows
                        idle_since = time.monotonic()
                    elif time.monotonic() - idle_since >= self.idle_exit:
                        log.info("no client for %.1f s; stopping", self.idle_exit)
                        self._stopping = True
                if self._stopping and not self._backlog and not self._clients.busy():
                    break
        finally:
            self._scheduler.shutdown()
            self._outcomes.drain(guard, self._scheduler)
            self._jobs.abort_all()  # saves in pieces never ended: no temporary stays
            self._clients.release_all()
            TEMPS.record = None
            if self._journal is not None:
                self._journal.close()
            guard.close()
            router.close(linger=1000)
            if self._listener.auth is not None:
                self._listener.auth.stop()
            self._ctx.destroy(linger=0)  # also closes the writers' wake sockets
            if self._listener.claim is not None:
                # removes the socket only if it is still ours (a job's daemon: its lock file too)
                self._listener.claim.release(remove_lock=self.idle_exit is not None)
            log.info("stopped after %d files", self._outcomes.files_written)

    def status(self) -> StatusReply:
        now = time.monotonic()
        return StatusReply(
            os.getpid(),
            self.instance,
            self.endpoint,
            tuple(self.roots),
            now - self.started,
            self._outcomes.files_written,
            self._outcomes.bytes_written,
            self._outcomes.errors,
            tuple(self._clients.status(now)),
        )

    # -- control messages ----------------------------------------------------------------
    def _handle(self, router: zmq.Socket[bytes], frames: list[zmq.Frame]) -> None:
        if len(frames) < 2:
            return  # nothing to answer to
        ident, body = frames[0].bytes, frames[1:]
        self._guard.seen(ident, frames[0])
        try:
            if len(body) < 2:
                raise ProtocolError(f"expected 2 frames, got {len(body)}")
            tag, data = body[0].bytes, body[1].bytes
            # a binary WRITE (or BATCH of them) the fast path reads exactly as the
            # reference would (binparse); anything else, the reference and its errors
            fast = binparse.scan(data) if tag == proto.TAG and len(data) <= proto.MAX_MESSAGE_BYTES else None
            raw = proto.decode_head(tag, data) if fast is None else None
            op = raw["op"] if raw is not None else "BATCH" if data[1:2] == b"B" else "WRITE"
            payload = [f.buffer for f in body[2:]]
            sender = self._clients.get(ident)
            if payload and (op not in ("WRITE", "PART", "PLACE") or sender is None or sender.mm is not None):
                raise ProtocolError(
                    f"expected 2 frames, got {len(body)}: payload frames come "
                    "only with WRITE, PART or PLACE from a remote (tcp://) client"
                )
            raws: Sequence[dict[str, Any] | BinWrite]
            if raw is None:
                assert fast is not None
                raws = fast
            else:
                raws = msgs.Batch.from_wire(raw).msgs if op == "BATCH" else (raw,)
        except Exception as e:  # noqa: BLE001 - any bad message is refused to its sender; the loop lives on
            refuse(self._guard, ident, -1, e)
            return
        client = self._clients.get(ident)
        if client is not None:
            client.last_seen = time.monotonic()
        stopping = self._stopping
        self._backlog.extend([(ident, one, payload, stopping) for one in raws])

    def _work(self, router: zmq.Socket[bytes]) -> None:
        """Handle received messages in order for up to ``INLINE_SLICE_S``: small files are
        written here, so a burst of them must not keep the loop from its other duties."""
        backlog = self._backlog
        until = time.monotonic() + INLINE_SLICE_S
        while backlog:
            self._handle_one(router, *backlog.popleft())
            if time.monotonic() >= until:
                return

    def _handle_one(
        self,
        router: zmq.Socket[bytes],
        ident: bytes,
        raw: dict[str, Any] | BinWrite,
        payload: list[memoryview],
        stopping: bool = False,
    ) -> None:
        try:
            client = self._clients.get(ident)
            write_seq: object = None  # a WRITE's: one sent again is answered from what is known
            if isinstance(raw, BinWrite):
                write_seq = raw.seq
            elif raw["op"] == "WRITE":
                write_seq = raw.get("seq")
            if client is not None and self._outcomes.seen(self._guard, client, write_seq):
                return
            ring_bytes = None if client is None else client.ring_bytes
            if isinstance(raw, BinWrite):
                msg = raw.request(ring_bytes)  # what parse_request gives for the same bytes
            else:
                msg = msgs.parse_request(raw, ring_bytes)
            reply: msgs.Reply | None = None
            if isinstance(msg, proto.WriteRequest):  # first: a burst's every message
                assert client is not None  # parse_request refuses a WRITE before HELLO
                self._enqueue(write_job(client, msg, payload, stopping=stopping))
            elif isinstance(msg, msgs.Ping):
                reply = msgs.Pong(self.instance, os.getpid())
            elif isinstance(msg, msgs.StatusQuery):
                reply = self.status()
            elif isinstance(msg, msgs.Hello):
                self._clients.hello(ident, msg)
                # "binwrite": this daemon reads binary WRITEs (matspool._wirebin)
                reply = msgs.Welcome(os.getpid(), self.instance, f"{proto.TAG.decode()} {_wirebin.FEATURE}")
            elif isinstance(msg, (proto.Part, msgs.End)):
                self._enqueue(piece_job(self._clients.get(ident), msg, payload))
            elif isinstance(msg, (Layout, Place, Publish, Discard, StreamStep)):
                # a save sharded over ranks: sharded.py (a sharded stream's STEP: sharded_stream.py)
                self._enqueue(shard_job(client, msg, payload, stopping=stopping))
            elif isinstance(msg, msgs.Bye):
                self._clients.bye(ident)
            if reply is not None:
                self._guard.send_multipart([ident, *msgs.encode(reply)])
        except Exception as e:  # noqa: BLE001 - any failure is answered as ERR; the loop lives on
            refuse(self._guard, ident, raw.seq if isinstance(raw, BinWrite) else raw.get("seq", -1), e)

    def _enqueue(self, job: Job) -> None:
        job.client.inflight += 1
        ring_bytes = job.ring_bytes
        keys = None  # the file's keys: a stat, taken only when an order is to keep
        if self._inline(job, ring_bytes) and (
            self._scheduler.empty() or self._scheduler.idle(keys := file_key(job.request.path))
        ):
            self._outcomes.settle(self._guard, Result(job, *self._jobs.run(job)), 0)
            return
        job.client.payload_inflight += ring_bytes
        self._scheduler.enqueue(job, keys or file_key(job.request.path))

    def _inline(self, job: Job, ring_bytes: int) -> bool:
        """Whether ``job`` may be written here: a tiny whole file, no fsync, no compression
        (the caller then checks none of its file's saves is queued: their order)."""
        req = job.request
        return (
            type(job) is Job
            and job.kind == "write"
            and req.mode == "write"
            and not req.fsync
            and not req.compress
            and not req.append
            and not self._jobs.write_delay
            and ring_bytes <= INLINE_BYTES
        )


def install_signal_handlers(daemon: Daemon) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: daemon.stop())
