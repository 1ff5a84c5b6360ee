"""The writer daemon: a ZeroMQ ROUTER for control, a thread pool for the writes.

The control loop runs on one thread and never touches a disk, so heartbeats and new
requests are answered while large files are written. Each WRITE is checked against
the protocol schema, the sender's ring and the roots before any byte is read; any
failure becomes an ``ERR`` for that save, never an exception that ends the daemon.
Writes to the same path run in the order they arrived; different paths run in parallel.
"""

from __future__ import annotations

import logging
import mmap
import os
import queue
import secrets
import signal
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq
from matspool import _protocol as proto
from matspool._curve import is_tcp, load_secret
from matspool._errors import MatspoolError, ProtocolError, RingError, UnknownClient, WriteFailed
from matspool._ring import RING_PREFIX, open_ring_readonly, ring_path

from .cleanup import pid_alive, remove_stale_rings
from .paths import normalize_roots, resolve_target
from .writers import Session, write_atomic
from .writers._values import materialize
from .writers.stream import append_step

__all__ = ["Daemon"]

log = logging.getLogger("matspoold")

MAX_RING_BYTES = 1 << 46  # 64 TiB: anything larger is a lie
MAX_REMOTE_FRAME = 1 << 32  # 4 GiB: larger arrays travel in pieces
_DONE_BATCH = 4096  # answers per DONE message: far below the 1 MiB message limit
DONE_MEMORY = 4096  # per client: answers kept to re-send when a WRITE arrives twice


@dataclass(eq=False, slots=True)
class _Client:
    ident: bytes
    ring: str
    mm: mmap.mmap | None  # None: a remote client (tcp://), whose payloads come in frames
    fd: int  # kept open so each write can check the ring was not truncated under it
    pid: int
    ring_bytes: int = 0
    inflight: int = 0
    bye: bool = False
    dead: bool = False
    last_seen: float = 0.0
    active: dict[int, float] = field(default_factory=dict)  # seq accepted -> when
    begun: dict[int, proto.WriteRequest] = field(default_factory=dict)  # saves arriving in pieces
    answered: OrderedDict[int, dict[str, Any]] = field(default_factory=OrderedDict)
    joined: float = field(default_factory=time.monotonic)
    files: int = 0
    bytes_written: int = 0
    payload_inflight: int = 0
    errors: int = 0

    def status(self, now: float) -> dict[str, Any]:
        """What ``matspool status`` shows for this client."""
        age = max(now - self.joined, 1e-9)
        return {"pid": self.pid, "ring": self.ring, "ring_bytes": self.ring_bytes,
                "queue_depth": self.inflight, "ring_bytes_in_flight": self.payload_inflight,
                "files_written": self.files, "bytes_written": self.bytes_written, "errors": self.errors,
                "throughput_bytes_per_s": self.bytes_written / age, "connected_s": age,
                "oldest_pending_s": now - min(self.active.values()) if self.active else 0.0,
                "silent_s": now - self.last_seen, "dead": self.dead}

    def remember(self, seq: int, reply: dict[str, Any]) -> None:
        self.active.pop(seq, None)
        self.answered[seq] = reply
        if len(self.answered) > DONE_MEMORY:
            self.answered.popitem(last=False)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        try:
            if self.mm is not None:
                self.mm.close()
        except BufferError:
            pass  # a writer's view is still alive; the mapping goes with it


@dataclass(eq=False, slots=True)
class _Job:
    client: _Client
    request: proto.WriteRequest
    kind: str = "write"  # or "begin", "part", "end" for a save that arrives in pieces
    part: proto.Part | None = None
    payload: dict[int, memoryview] | None = None  # a remote client's arrays, by ring offset
    abort: bool = False  # an "end" that throws the save away

    @property
    def ring_bytes(self) -> int:
        """Payload bytes of the ring this job reads."""
        if self.part is not None:
            return self.part.nbytes
        if self.kind == "end":
            return 0
        return sum(leaf.nbytes for leaf in _in_ring(self.request))


def _in_ring(request: proto.WriteRequest) -> list[proto.VarSpec]:
    return [leaf for v in request.vars for leaf in proto.leaves(v) if not leaf.deferred]


Source = mmap.mmap | dict[int, memoryview]  # a local client's ring, or a remote one's frames


def _array(src: Source, spec: proto.VarSpec) -> np.ndarray:
    """A read-only column-major view of the ring (or of the frame that carried the array
    from a remote client): the writers read it in place."""
    dt = np.dtype(spec.dtype)
    if spec.nbytes == 0:
        return np.zeros(spec.dims, dtype=dt, order="F")
    if isinstance(src, dict):
        return np.ndarray(spec.dims, dtype=dt, buffer=src[spec.offset], order="F")
    return np.ndarray(spec.dims, dtype=dt, buffer=src, offset=spec.offset, order="F")


def _materialize(mm: Source, node: proto.Tree) -> Any:
    """A struct/cell/char/sparse tree as the values the writers lay out (writers/_values.py)."""
    return materialize(node, lambda spec: _array(mm, spec))


def _views(job: _Job) -> list[tuple[proto.Variable, Any]]:
    src: Source = job.payload if job.payload is not None else job.client.mm  # type: ignore[assignment]
    return [(v, None if isinstance(v, proto.VarSpec) and v.deferred else
             _array(src, v) if isinstance(v, proto.VarSpec) else _materialize(src, v.tree))
            for v in job.request.vars]


def _payload(request: proto.WriteRequest, frames: list[memoryview]) -> dict[int, memoryview]:
    """A remote WRITE's payload frames, matched to its arrays (ring order) and checked."""
    want = _in_ring(request)
    want = [leaf for leaf in want if leaf.nbytes]
    if len(frames) != len(want):
        raise ProtocolError(f"{len(want)} payload frames expected, got {len(frames)}")
    for leaf, frame in zip(want, frames):
        if len(frame) != leaf.nbytes:
            raise ProtocolError(f"payload frame for {leaf.name!r} is {len(frame)} bytes, not {leaf.nbytes}")
    return {leaf.offset: frame for leaf, frame in zip(want, frames)}


def _check_ring_size(client: _Client, request: proto.WriteRequest) -> None:
    """Refuse to read past the end of a ring its client has truncated (that would be SIGBUS)."""
    if client.mm is None:
        return  # remote: the bytes are in frames the daemon holds
    end = max((leaf.offset + leaf.nbytes for leaf in _in_ring(request)), default=0)
    size = os.fstat(client.fd).st_size
    if size < end:
        raise RingError(f"the client's ring shrank to {size} bytes; this save needs {end}")


def _error_msg(seq: object, err: BaseException) -> dict[str, Any]:
    code = err.code if isinstance(err, MatspoolError) else "error"
    seq = seq if isinstance(seq, int) and not isinstance(seq, bool) and seq >= 0 else -1
    return {"op": "ERR", "seq": seq, "code": code, "message": str(err)}


def _error_reply(ident: bytes, seq: object, err: BaseException) -> list[bytes]:
    return [ident, *proto.encode(_error_msg(seq, err))]


def _refuse(router: zmq.Socket, ident: bytes, seq: object, err: Exception) -> None:
    """Answer a message with ERR. Called from an ``except`` block: a bug of ours (not a
    MatspoolError) is logged with its traceback, and must not take the daemon down either."""
    if isinstance(err, MatspoolError):
        log.warning("client %r: %s", ident[:64], err)
    else:
        log.exception("client %r: unexpected error", ident[:64])
    router.send_multipart(_error_reply(ident, seq, err))


class _Writers:
    """Writer threads taking jobs from one queue. (ThreadPoolExecutor's Future per task
    costs the control thread more than a small file's whole write.)"""

    def __init__(self, n: int, run: Callable[[_Job], None]) -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._run = run
        self._threads = [threading.Thread(target=self._loop, name=f"matspool-writer-{i}", daemon=True)
                         for i in range(n)]
        for t in self._threads:
            t.start()

    def submit(self, job: _Job) -> None:
        self._jobs.put(job)

    def _loop(self) -> None:
        while (job := self._jobs.get()) is not None:
            self._run(job)

    def shutdown(self) -> None:
        """Finish the queued jobs, then stop."""
        for _ in self._threads:
            self._jobs.put(None)
        for t in self._threads:
            t.join()


class Daemon:
    """One per node (``matspool serve``), or one per client when embedded."""

    def __init__(
        self,
        endpoint: str,
        roots: Sequence[str],
        *,
        writers: int = 4,
        socket_mode: int = 0o600,
        socket_group: str | None = None,
        parent_pid: int | None = None,
        clean_stale: bool = True,
        client_timeout: float = 30.0,
        curve_secret: str | None = None,
        curve_clients: str | None = None,
        write_delay: float = 0.0,
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
        self.write_delay = write_delay  # a deliberately slow disk, for overload tests
        self.curve_secret = curve_secret
        self.curve_clients = curve_clients
        self.socket_mode = socket_mode
        self.socket_group = socket_group
        self.parent_pid = parent_pid
        self._pool = _Writers(writers, self._run)
        self._clients: dict[bytes, _Client] = {}
        self._by_path: dict[str, deque[_Job]] = {}
        # writers' outcomes; only the one that finds it empty wakes the control loop
        self._results: deque[tuple[_Job, int | None, BaseException | None]] = deque()
        self._results_lock = threading.Lock()
        self._ctx = zmq.Context()
        self._wake_addr = f"inproc://matspoold-wake-{id(self)}"
        self._local = threading.local()
        self._stop = threading.Event()
        self._sessions: dict[tuple[bytes, int], Session] = {}
        self.files_written = 0
        self.bytes_written = 0
        self.errors = 0
        self.started = time.monotonic()
        self.instance = secrets.token_hex(8)  # tells clients this daemon from an earlier one
        self.clean_stale = clean_stale
        self.client_timeout = client_timeout
        self.snapshot: dict[str, Any] = self.status()  # refreshed by the loop; read by metrics

    # -- life cycle ----------------------------------------------------------------------
    def stop(self) -> None:
        """Finish the accepted writes, then leave ``serve()``."""
        self._stop.set()

    def _bind(self, sock: zmq.Socket) -> None:
        if is_tcp(self.endpoint):
            from zmq.auth.thread import ThreadAuthenticator

            if not os.path.isdir(self.curve_clients or ""):
                raise ValueError(f"--curve-clients {self.curve_clients!r} is not a directory")
            self._auth = ThreadAuthenticator(self._ctx)
            self._auth.start()
            self._auth.configure_curve(domain="*", location=self.curve_clients)
            public, secret = load_secret(self.curve_secret)  # type: ignore[arg-type]
            sock.curve_publickey, sock.curve_secretkey = public, secret
            sock.curve_server = True
            sock.bind(self.endpoint)
            return
        if not self.endpoint.startswith("ipc://"):
            sock.bind(self.endpoint)
            return
        path = self.endpoint[len("ipc://"):]
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        old = os.umask(0o177)  # no window in which the socket is open to others
        try:
            sock.bind(self.endpoint)
        finally:
            os.umask(old)
        if self.socket_group is not None:
            import grp

            os.chown(path, -1, grp.getgrnam(self.socket_group).gr_gid)
        os.chmod(path, self.socket_mode)

    def serve(self) -> None:
        router = self._ctx.socket(zmq.ROUTER)
        # locally payloads never cross the socket; from authenticated remote clients an
        # array's frame is at most as large as their ring (which caps what is in flight)
        router.setsockopt(zmq.MAXMSGSIZE, MAX_REMOTE_FRAME if is_tcp(self.endpoint)
                          else proto.MAX_MESSAGE_BYTES + 4096)
        router.setsockopt(zmq.LINGER, 1000)
        # a ROUTER silently drops what it cannot queue for a peer: a busy client must get
        # every answer late rather than never (answers are small; the rings bound them)
        router.setsockopt(zmq.SNDHWM, 0)
        router.setsockopt(zmq.RCVHWM, 0)
        self._bind(router)
        wake = self._ctx.socket(zmq.PULL)
        wake.bind(self._wake_addr)
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(wake, zmq.POLLIN)
        if self.clean_stale:
            remove_stale_rings()
        log.info("serving %s, roots %s", self.endpoint, ", ".join(self.roots))
        next_reap = time.monotonic() + 1.0
        try:
            while True:
                events = dict(poller.poll(200))
                if wake in events:
                    while wake.poll(0):
                        wake.recv()
                self._drain_results(router)
                if router in events:
                    for _ in range(256):  # bounded, so results are never starved
                        try:
                            frames = router.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._handle(router, frames)
                if time.monotonic() >= next_reap:
                    self._reap_dead_clients()
                    self.snapshot = self.status()  # what other threads (metrics) may read
                    next_reap = time.monotonic() + 1.0
                if self.parent_pid is not None and os.getppid() != self.parent_pid:
                    log.info("parent %d is gone; stopping", self.parent_pid)
                    self._stop.set()
                if self._stop.is_set() and not self._busy():
                    break
        finally:
            self._pool.shutdown()
            self._drain_results(router)
            for c in self._clients.values():
                c.release()
            router.close(linger=1000)
            if getattr(self, "_auth", None) is not None:
                self._auth.stop()
            self._ctx.destroy(linger=0)  # also closes the writers' wake sockets
            if self.endpoint.startswith("ipc://"):
                try:
                    os.unlink(self.endpoint[len("ipc://"):])
                except FileNotFoundError:
                    pass
            log.info("stopped after %d files", self.files_written)

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        return {"op": "STATUS", "pid": os.getpid(), "instance": self.instance, "endpoint": self.endpoint,
                "roots": list(self.roots), "uptime_s": now - self.started, "files_written": self.files_written,
                "bytes_written": self.bytes_written, "errors": self.errors,
                "clients": [c.status(now) for c in self._clients.values()]}

    def _busy(self) -> bool:
        return any(c.inflight for c in self._clients.values())

    # -- control messages ----------------------------------------------------------------
    def _handle(self, router: zmq.Socket, frames: list[zmq.Frame]) -> None:
        if len(frames) < 2:
            return  # nothing to answer to
        ident, body = frames[0].bytes, frames[1:]
        try:
            if len(body) < 2:
                raise ProtocolError(f"expected 2 frames, got {len(body)}")
            msg = proto.decode_head(body[0].bytes, body[1].bytes)
            payload = [f.buffer for f in body[2:]]
            if payload and (msg["op"] not in ("WRITE", "PART") or ident not in self._clients
                            or self._clients[ident].mm is not None):
                raise ProtocolError(f"expected 2 frames, got {len(body)}: payload frames come "
                                    "only with WRITE or PART from a remote (tcp://) client")
            msgs = proto.parse_batch(msg) if msg["op"] == "BATCH" else [msg]
        except Exception as e:
            _refuse(router, ident, -1, e)
            return
        client = self._clients.get(ident)
        if client is not None:
            client.last_seen = time.monotonic()
        for m in msgs:
            self._handle_one(router, ident, m, payload)

    def _handle_one(self, router: zmq.Socket, ident: bytes, msg: dict[str, Any],
                    payload: list[memoryview]) -> None:
        seq: object = msg.get("seq", -1)
        op = msg["op"]
        try:
            if op == "PING":
                router.send_multipart([ident, *proto.encode({"op": "PONG", "instance": self.instance})])
            elif op == "STATUS":
                router.send_multipart([ident, *proto.encode(self.status())])
            elif op == "HELLO":
                self._hello(ident, msg)
                router.send_multipart([ident, *proto.encode({"op": "WELCOME", "pid": os.getpid(),
                                                             "instance": self.instance,
                                                             "version": proto.TAG.decode()})])
            elif op == "WRITE":
                self._write(router, ident, msg, payload)
            elif op in ("PART", "END"):
                self._piece(ident, msg, payload)
            elif op == "BYE":
                self._bye(ident)
            else:
                raise ProtocolError(f"unknown op {op[:40]!r}")
        except Exception as e:
            _refuse(router, ident, seq, e)

    def _hello(self, ident: bytes, msg: dict[str, Any]) -> None:
        ring, size, pid = msg.get("ring"), msg.get("ring_bytes"), msg.get("pid")
        if type(size) is not int or not 0 < size <= MAX_RING_BYTES:
            raise ProtocolError(f"HELLO: bad ring_bytes {size!r}")
        if type(pid) is not int:
            raise ProtocolError("HELLO: pid must be an integer")
        if msg.get("remote") is True:  # its ring is on another host: payloads come in frames
            if not is_tcp(self.endpoint):
                raise ProtocolError("remote clients are served on tcp:// endpoints only")
            old = self._clients.get(ident)
            if old is not None:
                old.bye = True
            self._clients[ident] = _Client(ident, "(remote)", None, -1, pid, ring_bytes=size,
                                           last_seen=time.monotonic())
            log.info("remote client pid %d joined", pid)
            return
        if not isinstance(ring, str):
            raise ProtocolError("HELLO needs a ring name")
        mm, fd = open_ring_readonly(ring, size)
        if not ring.startswith(f"{RING_PREFIX}{pid}-"):
            # reaping trusts the pid: it must be the one that named (created) the ring
            mm.close()
            os.close(fd)
            raise ProtocolError(f"HELLO: ring {ring[:80]!r} was not created by pid {pid}")
        old = self._clients.get(ident)
        if old is not None:  # the same client again (it saw a restart): the old mapping goes
            old.bye = True  # as soon as its writes in flight are answered
            if not old.inflight:
                old.release()
        self._clients[ident] = _Client(ident, ring, mm, fd, pid, ring_bytes=size, last_seen=time.monotonic())
        log.info("client pid %d joined with a %d MiB ring", pid, size >> 20)

    def _bye(self, ident: bytes) -> None:
        c = self._clients.get(ident)
        if c is None:
            return
        c.bye = True
        if not c.inflight:
            self._drop_client(c)

    def _drop_client(self, c: _Client) -> None:
        if self._clients.get(c.ident) is c:
            del self._clients[c.ident]
        for seq in c.begun:  # saves in pieces that will never end: no partial file stays
            session = self._sessions.pop((c.ident, seq), None)
            if session is not None:
                session.abort()
        c.release()
        if c.dead:  # its process cannot unlink the ring any more: do it for it
            try:
                os.unlink(ring_path(c.ring))
                log.info("client pid %d died; its saves are written and its ring removed", c.pid)
            except OSError as e:
                log.warning("client pid %d died; cannot remove its ring %s: %s", c.pid, c.ring, e)

    def _reap_dead_clients(self) -> None:
        """Clients gone without BYE: finish their accepted saves, then free their rings.

        Dead means its pid is gone here (after a short grace) or it was silent for
        ``client_timeout`` (clients ping every second; pids of another namespace lie).
        """
        now = time.monotonic()
        for c in list(self._clients.values()):
            silent = now - c.last_seen
            # pids mean something only in our own pid namespace: with --no-clean-stale
            # (clients in other containers) silence alone decides
            pid_gone = self.clean_stale and silent > 2.0 and not pid_alive(c.pid)
            if c.dead or not (silent > self.client_timeout or pid_gone):
                continue
            c.dead = True
            if not c.inflight:
                self._drop_client(c)

    def _write(self, router: zmq.Socket, ident: bytes, msg: dict[str, Any],
               payload: list[memoryview] | None = None) -> None:
        client = self._clients.get(ident)
        if client is None:
            raise UnknownClient("WRITE before HELLO: this daemon does not know the client's ring")
        seq = msg.get("seq")
        if isinstance(seq, int) and seq in client.active:
            return  # a re-send of a save being written: its answer is on the way
        if isinstance(seq, int) and seq in client.answered:
            router.send_multipart([ident, *proto.encode(client.answered[seq])])  # written once, answered again
            return
        if client.mm is not None and client.mm.closed:
            raise RingError("the client's ring is no longer mapped")
        if self._stop.is_set():
            raise WriteFailed("the daemon is shutting down and takes no new writes")
        request = proto.parse_write(msg, client.ring_bytes)
        job = _Job(client, request, "begin" if request.mode == "begin" else "write",
                   payload=_payload(request, payload or []) if client.mm is None else None)
        client.active[request.seq] = time.monotonic()
        if job.kind == "begin":
            client.begun[request.seq] = request
        self._enqueue(job)

    def _piece(self, ident: bytes, msg: dict[str, Any], payload: list[memoryview] | None = None) -> None:
        """PART (bytes of a deferred variable) or END (the save is complete) of a begun save."""
        client = self._clients.get(ident)
        if client is None:
            raise UnknownClient("PART/END before HELLO: this daemon does not know the client's ring")
        seq = msg.get("seq")
        request = client.begun.get(seq) if isinstance(seq, int) else None
        if request is None:
            raise ProtocolError(f"{msg['op']} for save {seq!r}, which this daemon did not begin")
        if msg["op"] == "PART":
            part = proto.parse_part(msg, client.ring_bytes)
            data = None
            if client.mm is None:
                if not payload or len(payload) != 1 or len(payload[0]) != part.nbytes:
                    raise ProtocolError(f"a remote PART carries one payload frame of {part.nbytes} bytes")
                data = {part.offset: payload[0]}
            self._enqueue(_Job(client, request, "part", part, payload=data))
        else:
            self._enqueue(_Job(client, request, "end", abort=msg.get("abort") is True))

    def _enqueue(self, job: _Job) -> None:
        client, request = job.client, job.request
        client.inflight += 1
        client.payload_inflight += job.ring_bytes
        key = os.path.normpath(request.path)
        waiting = self._by_path.get(key)
        if waiting is None:
            self._by_path[key] = deque()
            self._submit(job)
        else:
            waiting.append(job)  # same file: keep the order the client saved in

    # -- writes --------------------------------------------------------------------------
    def _submit(self, job: _Job) -> None:
        self._pool.submit(job)

    def _run(self, job: _Job) -> None:
        nbytes: int | None = None
        error: BaseException | None = None
        try:
            if self.write_delay:
                time.sleep(self.write_delay)
            nbytes = self._run_piece(job) if job.kind in ("part", "end") else self._run_file(job)
        except MatspoolError as e:
            error = e
        except OSError as e:
            error = WriteFailed(f"cannot write {job.request.path!r}: {e.strerror or e}")
        except Exception as e:
            log.exception("writer failed on %s", job.request.path)
            error = WriteFailed(f"cannot write {job.request.path!r}: {type(e).__name__}: {e}")
        with self._results_lock:
            self._results.append((job, nbytes, error))
            if len(self._results) > 1:
                return  # an earlier result's wake-up is pending: the loop drains them all
        sock = getattr(self._local, "wake", None)
        if sock is None:
            sock = self._local.wake = self._ctx.socket(zmq.PUSH)
            sock.connect(self._wake_addr)
        try:
            sock.send(b"", zmq.NOBLOCK)
        except zmq.Again:
            pass  # wake-ups are already queued; the loop also looks every 200 ms

    def _run_file(self, job: _Job) -> int | None:
        """A whole save, a stream step, or the layout of a save whose pieces follow."""
        req = job.request
        final = resolve_target(req.path, self.roots)
        _check_ring_size(job.client, req)
        views = _views(job)
        if job.kind == "begin":
            self._sessions[(job.client.ident, req.seq)] = Session.begin(final, req.format, views, req.fsync)
            return None
        if req.mode == "append":
            return append_step(final, views, fsync=req.fsync)  # type: ignore[arg-type]
        fmt = "stream" if req.mode == "create" else req.format
        return write_atomic(final, fmt, views, fsync=req.fsync, compress=req.compress, append=req.append)

    def _run_piece(self, job: _Job) -> int | None:
        """Write one piece, or finish the file; after a failure, pieces are let go quietly
        (the save's ERR has gone out) and END answers with that failure."""
        key = (job.client.ident, job.request.seq)
        session = self._sessions.get(key)
        if job.kind == "end":
            self._sessions.pop(key, None)
            if session is not None and session.error is None and job.abort:
                session.abort()
                raise WriteFailed(f"the client abandoned the save to {job.request.path!r}; nothing was written")
            if session is None or session.error is not None:
                raise (session.error if session is not None else
                       WriteFailed(f"cannot write {job.request.path!r}: the save failed before its end"))
            return session.end()
        part = job.part
        assert part is not None
        if session is None or session.error is not None:
            return None
        try:
            if job.payload is not None:
                data = np.frombuffer(job.payload[part.offset], np.uint8)
            else:
                end = part.offset + part.nbytes
                if os.fstat(job.client.fd).st_size < end:
                    raise RingError(f"the client's ring shrank below {end} bytes")
                data = np.frombuffer(job.client.mm, np.uint8, part.nbytes, part.offset)
            session.write(part.var, part.start, data)
        except BaseException as e:
            session.error = e if isinstance(e, MatspoolError) else WriteFailed(
                f"cannot write {job.request.path!r}: {getattr(e, 'strerror', None) or e}")
            session.abort()
            raise session.error from e
        return None

    def _drain_results(self, router: zmq.Socket) -> None:
        # a client's finished saves go out together, as one DONE with a list: one message,
        # not one per file, when many small files finish at once
        done: dict[bytes, list[list[int]]] = {}
        while True:
            with self._results_lock:
                if not self._results:
                    break
                job, nbytes, error = self._results.popleft()
            req, client = job.request, job.client
            client.payload_inflight -= job.ring_bytes
            if job.kind == "part" and error is None:  # its ring space is free again
                assert job.part is not None
                router.send_multipart([client.ident, *proto.encode(
                    {"op": "PART_DONE", "seq": req.seq, "offset": job.part.offset})])
            elif job.kind == "begin" and error is None:  # laid out: the small variables' ring
                router.send_multipart([client.ident, *proto.encode(  # space is free
                    {"op": "PART_DONE", "seq": req.seq, "offset": None})])
            elif error is None:
                self.files_written += 1
                self.bytes_written += nbytes or 0
                client.files += 1
                client.bytes_written += nbytes or 0
                done.setdefault(client.ident, []).append([req.seq, nbytes or 0])
                client.remember(req.seq, {"op": "DONE", "seq": req.seq, "nbytes": nbytes})
            else:
                log.warning("save %d to %s failed: %s", req.seq, req.path, error)
                self.errors += 1
                client.errors += 1
                reply = _error_msg(req.seq, error)
                router.send_multipart([client.ident, *proto.encode(reply)])
                client.remember(req.seq, reply)
            if job.kind == "end":
                client.begun.pop(req.seq, None)
            client.inflight -= 1
            if (client.bye or client.dead) and not client.inflight:
                self._drop_client(client)
            key = os.path.normpath(req.path)
            waiting = self._by_path[key]
            if waiting:
                self._submit(waiting.popleft())
            else:
                del self._by_path[key]
        for ident, answers in done.items():
            if len(answers) == 1:
                router.send_multipart([ident, *proto.encode(
                    {"op": "DONE", "seq": answers[0][0], "nbytes": answers[0][1]})])
                continue
            for i in range(0, len(answers), _DONE_BATCH):
                router.send_multipart([ident, *proto.encode(
                    {"op": "DONE", "done": answers[i:i + _DONE_BATCH]})])


def install_signal_handlers(daemon: Daemon) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: daemon.stop())
