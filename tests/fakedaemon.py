"""One fake daemon for the tests, built on the typed protocol (``matspool._messages``).

:class:`FakeDaemon` is the daemon's side as a function of typed requests: it maps the
client's ring on HELLO, reads the bytes each WRITE names and answers DONE (or the ERR in
``fail_with``), or, with ``hold=True``, records the WRITE and answers nothing until a test
says so. Hand it to ``MemoryTransport`` to run a whole Spool in one process, or serve it
on a real socket with :class:`ZmqFake`, where a test can also inject raw (even malformed)
replies.

Threads: the handler runs on whichever thread delivers requests (the link's I/O thread, or
ZmqFake's); the lock guards what tests read from theirs.
"""

from __future__ import annotations

import errno
import mmap
import os
import threading
from typing import Any

import zmq

from matspool import _messages as m
from matspool import _protocol as proto
from matspool import _wirebin
from matspool._ring import open_ring_readonly

__all__ = ["FakeDaemon", "ZmqFake"]


class FakeDaemon:
    """Answers like matspoold. ``silent`` holds answers back (PONG too) until cleared;
    ``instance`` can change to play a restarted daemon; ``binwrite`` offers binary WRITEs
    in WELCOME (served by :class:`ZmqFake`, a fake without it refuses them as an older
    daemon does)."""

    def __init__(self, *, hold: bool = False, binwrite: bool = False, instance: str = "fake") -> None:
        self.hold = hold
        self.binwrite = binwrite
        self.mm: mmap.mmap | None = None
        self.files: dict[str, dict[str, bytes]] = {}  # path -> variable -> bytes as read
        self.writes: list[proto.WriteRequest] = []
        self.silent = threading.Event()
        self.held: list[m.Reply] = []
        self.fail_with: dict[str, Any] | None = None  # Err fields for every WRITE
        self.instance = instance
        self.hellos: list[m.Hello] = []
        self.refuse_memfd = False  # refuse a sealed memfd ring, as a daemon of another user must
        self.lock = threading.Lock()

    def n_writes(self) -> int:
        with self.lock:
            return len(self.writes)

    def paths(self) -> list[str]:
        with self.lock:
            return [w.path for w in self.writes]

    def _welcome(self) -> m.Welcome:
        version = f"{proto.TAG.decode()} {_wirebin.FEATURE}" if self.binwrite else proto.TAG.decode()
        return m.Welcome(os.getpid(), self.instance, version)

    def __call__(self, msg: m.Request) -> list[m.Reply]:
        if isinstance(msg, m.Hello):
            self.hellos.append(msg)
            if msg.ring is None:  # remote: payloads would come in frames
                return [self._welcome()]
            if msg.fd is not None and self.refuse_memfd:  # as a daemon of another user does
                return [
                    m.Err(
                        -1,
                        "ring",
                        f"cannot open /proc/{msg.pid}/fd/{msg.fd}: Permission denied",
                        errno.EACCES,
                    )
                ]
            mm, fd = open_ring_readonly(msg.ring, msg.ring_bytes, pid=msg.pid, fd=msg.fd)
            if mm is None:  # a /dev/shm ring: the daemon reads it by copy, the fake maps it
                with open(fd, "rb") as f:
                    self.mm = mmap.mmap(f.fileno(), msg.ring_bytes, prot=mmap.PROT_READ)
            else:
                self.mm = mm
                os.close(fd)
            return [self._welcome()]
        if isinstance(msg, proto.WriteRequest):
            return self._write(msg)
        if isinstance(msg, m.Ping):
            if self.silent.is_set():
                return []
            held, self.held = self.held, []
            return [*held, m.Pong(self.instance, os.getpid())]
        return []

    def _write(self, msg: proto.WriteRequest) -> list[m.Reply]:
        with self.lock:
            self.writes.append(msg)
        if self.hold:
            return []
        reply: m.Reply
        if self.fail_with is not None:
            reply = m.Err(msg.seq, **self.fail_with)
        else:
            assert self.mm is not None
            self.files[msg.path] = {
                v.name: bytes(self.mm[v.offset : v.offset + v.nbytes])
                for v in msg.vars
                if isinstance(v, proto.VarSpec)
            }
            reply = m.Done(((msg.seq, 128),))
        if self.silent.is_set():
            self.held.append(reply)
            return []
        return [reply]


class ZmqFake:
    """Serves a :class:`FakeDaemon` on a real ROUTER socket at ``endpoint``."""

    def __init__(self, daemon: FakeDaemon, endpoint: str) -> None:
        self.daemon = daemon
        self.endpoint = endpoint
        self._ident: bytes | None = None
        self._todo: list[m.Reply | dict[str, Any] | bytes] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self.binary = 0  # binary WRITE/BATCH bodies received
        self.refused = 0  # of those, refused because the fake did not offer binwrite
        self._thread = threading.Thread(target=self._loop, name="fake-daemon", daemon=True)
        self._thread.start()
        assert self._ready.wait(10)

    def reply(self, msg: m.Reply | dict[str, Any] | bytes) -> None:
        """Send ``msg`` to the client: a typed reply, or a raw (possibly malformed) one: a
        dict as JSON, bytes as the body frame itself."""
        with self._lock:
            self._todo.append(msg)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _loop(self) -> None:
        sock = zmq.Context.instance().socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(self.endpoint)
        self._ready.set()
        ring_bytes: int | None = None
        try:
            while not self._stop.is_set():
                if sock.poll(20):
                    ident, *frames = sock.recv_multipart()
                    self._ident = ident
                    if frames[1][:1] == _wirebin.BINARY:
                        self.binary += 1
                        if not self.daemon.binwrite:  # an older daemon reads JSON only
                            self.refused += 1
                            bad = m.Err(-1, "protocol", "malformed message: not JSON")
                            sock.send_multipart([ident, *m.encode(bad)])
                            continue
                    raw = proto.decode(frames)
                    for one in m.Batch.from_wire(raw).msgs if raw["op"] == "BATCH" else (raw,):
                        request = m.parse_request(one, ring_bytes)
                        if isinstance(request, m.Hello):
                            ring_bytes = request.ring_bytes
                        for answer in self.daemon(request):
                            sock.send_multipart([ident, *m.encode(answer)])
                with self._lock:
                    todo, self._todo = self._todo, []
                for item in todo:
                    assert self._ident is not None
                    if isinstance(item, bytes):
                        out = [proto.TAG, item]
                    else:
                        out = proto.encode(item) if isinstance(item, dict) else m.encode(item)
                    sock.send_multipart([self._ident, *out])
        finally:
            sock.close(linger=0)
