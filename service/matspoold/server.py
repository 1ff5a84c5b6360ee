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
import signal
import threading
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq
from matspool import _protocol as proto
from matspool._errors import MatspoolError, ProtocolError, RingError, WriteFailed
from matspool._ring import open_ring_readonly

from .paths import normalize_roots, resolve_target
from .writers import write_atomic

__all__ = ["Daemon"]

log = logging.getLogger("matspoold")

MAX_RING_BYTES = 1 << 46  # 64 TiB: anything larger is a lie


@dataclass(eq=False, slots=True)
class _Client:
    ident: bytes
    ring: str
    mm: mmap.mmap
    pid: int
    inflight: int = 0
    bye: bool = False

    def release(self) -> None:
        try:
            self.mm.close()
        except BufferError:
            pass  # a writer's view is still alive; the mapping goes with it


@dataclass(eq=False, slots=True)
class _Job:
    client: _Client
    request: proto.WriteRequest


def _views(client: _Client, request: proto.WriteRequest) -> list[tuple[proto.VarSpec, np.ndarray]]:
    out = []
    for spec in request.vars:
        dt = np.dtype(spec.dtype)
        if spec.nbytes == 0:
            arr = np.zeros(spec.dims, dtype=dt, order="F")
        else:
            arr = np.ndarray(spec.dims, dtype=dt, buffer=client.mm, offset=spec.offset, order="F")
        out.append((spec, arr))
    return out


def _error_reply(ident: bytes, seq: object, err: BaseException) -> list[bytes]:
    code = err.code if isinstance(err, MatspoolError) else "error"
    seq = seq if isinstance(seq, int) and not isinstance(seq, bool) and seq >= 0 else -1
    return [ident, *proto.encode({"op": "ERR", "seq": seq, "code": code, "message": str(err)})]


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
    ) -> None:
        if not roots:
            raise ValueError("the daemon needs at least one --root")
        if writers < 1:
            raise ValueError(f"--writers must be at least 1, got {writers}")
        self.endpoint = endpoint
        self.roots = normalize_roots(roots)
        self.socket_mode = socket_mode
        self.socket_group = socket_group
        self.parent_pid = parent_pid
        self._pool = ThreadPoolExecutor(max_workers=writers, thread_name_prefix="matspool-writer")
        self._clients: dict[bytes, _Client] = {}
        self._by_path: dict[str, deque[_Job]] = {}
        self._results: queue.SimpleQueue[tuple[_Job, int | None, BaseException | None]] = queue.SimpleQueue()
        self._ctx = zmq.Context()
        self._wake_addr = f"inproc://matspoold-wake-{id(self)}"
        self._local = threading.local()
        self._stop = threading.Event()
        self.files_written = 0

    # -- life cycle ----------------------------------------------------------------------
    def stop(self) -> None:
        """Finish the accepted writes, then leave ``serve()``."""
        self._stop.set()

    def _bind(self, sock: zmq.Socket) -> None:
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
        router.setsockopt(zmq.MAXMSGSIZE, proto.MAX_MESSAGE_BYTES + 4096)
        router.setsockopt(zmq.LINGER, 1000)
        self._bind(router)
        wake = self._ctx.socket(zmq.PULL)
        wake.bind(self._wake_addr)
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(wake, zmq.POLLIN)
        log.info("serving %s, roots %s", self.endpoint, ", ".join(self.roots))
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
                            frames = router.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._handle(router, frames)
                if self.parent_pid is not None and os.getppid() != self.parent_pid:
                    log.info("parent %d is gone; stopping", self.parent_pid)
                    self._stop.set()
                if self._stop.is_set() and not self._busy():
                    break
        finally:
            self._pool.shutdown(wait=True)
            self._drain_results(router)
            for c in self._clients.values():
                c.release()
            router.close(linger=1000)
            self._ctx.destroy(linger=0)  # also closes the writers' wake sockets
            if self.endpoint.startswith("ipc://"):
                try:
                    os.unlink(self.endpoint[len("ipc://"):])
                except FileNotFoundError:
                    pass
            log.info("stopped after %d files", self.files_written)

    def _busy(self) -> bool:
        return any(c.inflight for c in self._clients.values())

    # -- control messages ----------------------------------------------------------------
    def _handle(self, router: zmq.Socket, frames: list[bytes]) -> None:
        if len(frames) < 2:
            return  # nothing to answer to
        ident, body = frames[0], frames[1:]
        seq: object = -1
        try:
            msg = proto.decode(body)
            seq = msg.get("seq", -1)
            op = msg["op"]
            if op == "PING":
                router.send_multipart([ident, *proto.encode({"op": "PONG"})])
            elif op == "HELLO":
                self._hello(ident, msg)
                router.send_multipart([ident, *proto.encode({"op": "WELCOME", "pid": os.getpid(),
                                                             "version": proto.TAG.decode()})])
            elif op == "WRITE":
                self._write(ident, msg)
            elif op == "BYE":
                self._bye(ident)
            else:
                raise ProtocolError(f"unknown op {op[:40]!r}")
        except MatspoolError as e:
            log.warning("client %r: %s", ident[:64], e)
            router.send_multipart(_error_reply(ident, seq, e))
        except Exception as e:  # a bug of ours must not take the daemon down either
            log.exception("client %r: unexpected error", ident[:64])
            router.send_multipart(_error_reply(ident, seq, e))

    def _hello(self, ident: bytes, msg: dict[str, Any]) -> None:
        ring, size, pid = msg.get("ring"), msg.get("ring_bytes"), msg.get("pid")
        if not isinstance(ring, str):
            raise ProtocolError("HELLO needs a ring name")
        if type(size) is not int or not 0 < size <= MAX_RING_BYTES:
            raise ProtocolError(f"HELLO: bad ring_bytes {size!r}")
        if type(pid) is not int:
            raise ProtocolError("HELLO: pid must be an integer")
        mm = open_ring_readonly(ring, size)
        old = self._clients.get(ident)
        if old is not None and not old.inflight:
            old.release()
        self._clients[ident] = _Client(ident, ring, mm, pid)
        log.info("client pid %d joined with a %d MiB ring", pid, size >> 20)

    def _bye(self, ident: bytes) -> None:
        c = self._clients.get(ident)
        if c is None:
            return
        c.bye = True
        if not c.inflight:
            del self._clients[ident]
            c.release()

    def _write(self, ident: bytes, msg: dict[str, Any]) -> None:
        client = self._clients.get(ident)
        if client is None:
            raise ProtocolError("WRITE before HELLO: this daemon does not know the client's ring")
        if client.mm.closed:
            raise RingError("the client's ring is no longer mapped")
        if self._stop.is_set():
            raise WriteFailed("the daemon is shutting down and takes no new writes")
        request = proto.parse_write(msg, len(client.mm))
        job = _Job(client, request)
        client.inflight += 1
        key = os.path.normpath(request.path)
        waiting = self._by_path.get(key)
        if waiting is None:
            self._by_path[key] = deque()
            self._submit(job)
        else:
            waiting.append(job)  # same file: keep the order the client saved in

    # -- writes --------------------------------------------------------------------------
    def _submit(self, job: _Job) -> None:
        self._pool.submit(self._run, job)

    def _run(self, job: _Job) -> None:
        nbytes: int | None = None
        error: BaseException | None = None
        try:
            req = job.request
            final = resolve_target(req.path, self.roots)
            nbytes = write_atomic(final, req.format, _views(job.client, req), fsync=req.fsync)
        except MatspoolError as e:
            error = e
        except OSError as e:
            error = WriteFailed(f"cannot write {job.request.path!r}: {e.strerror or e}")
        except Exception as e:
            log.exception("writer failed on %s", job.request.path)
            error = WriteFailed(f"cannot write {job.request.path!r}: {type(e).__name__}: {e}")
        self._results.put((job, nbytes, error))
        sock = getattr(self._local, "wake", None)
        if sock is None:
            sock = self._local.wake = self._ctx.socket(zmq.PUSH)
            sock.connect(self._wake_addr)
        sock.send(b"", zmq.NOBLOCK)

    def _drain_results(self, router: zmq.Socket) -> None:
        while True:
            try:
                job, nbytes, error = self._results.get_nowait()
            except queue.Empty:
                return
            req, client = job.request, job.client
            if error is None:
                self.files_written += 1
                reply = proto.encode({"op": "DONE", "seq": req.seq, "nbytes": nbytes})
                router.send_multipart([client.ident, *reply])
            else:
                log.warning("save %d to %s failed: %s", req.seq, req.path, error)
                router.send_multipart(_error_reply(client.ident, req.seq, error))
            client.inflight -= 1
            if client.bye and not client.inflight:
                self._clients.pop(client.ident, None)
                client.release()
            key = os.path.normpath(req.path)
            waiting = self._by_path[key]
            if waiting:
                self._submit(waiting.popleft())
            else:
                del self._by_path[key]


def install_signal_handlers(daemon: Daemon) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: daemon.stop())
