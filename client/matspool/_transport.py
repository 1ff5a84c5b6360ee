"""Transports: how control messages reach one daemon and its answers come back.

A transport moves whole messages (lists of frames) and knows nothing of saves; the link
(``_link``) speaks the protocol over it. :class:`ZmqTransport` is the real one (a
ZeroMQ DEALER); :class:`MemoryTransport` calls a function instead, as httpx's
``MockTransport`` does, so unit tests run a whole :class:`~matspool.Spool` without a
daemon process.

Threads: ``wake`` may be called from any thread; everything else only from the link's
I/O thread, which owns the transport after ``open``. ``poll`` and ``send`` raise
:class:`~matspool.AuthenticationFailed` when ZeroMQ's monitor reports a failed CURVE
handshake, so a refused key fails ``Spool()`` at once instead of after the connect timeout.
"""

from __future__ import annotations

import errno
import os
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, Final, Protocol

import zmq
from zmq.utils.monitor import parse_monitor_message

from . import _messages as msgs
from . import _protocol as proto
from ._curve import ClientKeys, is_tcp
from ._endpoint import check_ipc_endpoint
from ._errors import AuthenticationFailed, DaemonUnavailable, MatspoolError
from ._handshake import resolve

__all__ = ["Handler", "MemoryTransport", "Transport", "ZmqTransport"]


class Transport(Protocol):
    """What the link needs from a connection to a daemon."""

    endpoint: str

    def open(self, identity: bytes) -> None:
        """Connect; ``identity`` names this client to the daemon (its ring's name)."""

    def send(self, frames: list[Any]) -> None: ...

    def poll(self, timeout: float) -> list[list[bytes]]:
        """Messages received within ``timeout`` s; returns early on ``wake``."""

    def reconnected(self) -> bool:
        """Whether the connection was re-established since the last call (answers in
        flight may have been lost)."""

    def wake(self) -> None:
        """Make a ``poll`` in progress return (there is something to send)."""

    def close(self) -> None: ...


class ZmqTransport:
    """A ZeroMQ DEALER to the daemon's ROUTER, with an inproc pair to wake the I/O thread."""

    def __init__(self, endpoint: str, curve: ClientKeys | None = None) -> None:
        self.endpoint = endpoint
        self._curve = curve
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        # the I/O thread's wake-up: an eventfd (a pipe where there is none) that poll watches
        # beside the sockets; a caller's wake() is one write(2), no ZeroMQ send and no lock
        self._wake_r, self._wake_w = _wake_fds()
        self._wake_lock = threading.Lock()  # never a write to the fd number once closed
        self._dealer: zmq.Socket[bytes] | None = None
        self._connections = 0
        self._cut = 0  # CURVE handshakes cut in a row (see _CUT_LIMIT)
        self._node = False  # the endpoint is a node daemon's; we speak to this user's writer
        self._lost = False
        self._next_ask = 0.0

    def open(self, identity: bytes) -> None:
        check_ipc_endpoint(self.endpoint)  # before a byte (a path, a ring name) goes there
        # a node daemon writing as each user: this user's writer (its handshake, _handshake)
        target = resolve(self.endpoint)
        self._node = target != self.endpoint
        if self._node:
            check_ipc_endpoint(target)
        dealer = self._dealer = self._ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.ROUTING_ID, identity)
        dealer.setsockopt(zmq.SNDHWM, 0)
        dealer.setsockopt(zmq.RCVHWM, 0)  # every answer must get through, however many
        dealer.setsockopt(zmq.LINGER, 0)
        if self._curve is not None and is_tcp(self.endpoint):
            self._curve.apply(dealer)
        self._monitor = dealer.get_monitor_socket(
            zmq.EVENT_CONNECTED
            | zmq.EVENT_HANDSHAKE_SUCCEEDED
            | _HANDSHAKE_FAILED
            | (zmq.EVENT_DISCONNECTED if self._node else 0)
        )
        dealer.connect(target)
        self._poller = zmq.Poller()
        for sock in (dealer, self._wake_r, self._monitor):
            self._poller.register(sock, zmq.POLLIN)

    def send(self, frames: list[Any]) -> None:
        """Never blocks: a DEALER whose only connection was dropped after a failed
        handshake has no peer to queue for, and a blocking send would hold the I/O thread
        forever (with ``SNDHWM=0`` a connected one always takes the message)."""
        assert self._dealer is not None
        try:
            # a control message or a BATCH (two frames, at most 1 MiB) is copied: cheaper
            # than zero-copy's Frame objects; a remote WRITE's payload frames are not
            self._dealer.send_multipart(frames, copy=len(frames) == 2, flags=zmq.NOBLOCK)
        except zmq.Again:
            self._check_monitor()
            raise DaemonUnavailable(
                f"cannot send to {self.endpoint}: no connection to queue on (the handshake failed?)"
            ) from None

    def _check_monitor(self) -> None:
        """Count connections; raise :class:`AuthenticationFailed` on a failed handshake."""
        while self._monitor.poll(0):
            event = parse_monitor_message(self._monitor.recv_multipart())
            kind, value = int(event["event"]), int(event["value"])
            if kind == zmq.EVENT_CONNECTED:
                self._connections += 1
                self._lost = False
            elif kind == zmq.EVENT_DISCONNECTED:
                self._lost = True  # the node daemon restarted? (_ask_again)
            elif kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._cut = 0
            elif kind & _HANDSHAKE_FAILED:
                if not _transient(kind, value):
                    raise self._refused(kind, value)
                if self._curve is not None and is_tcp(self.endpoint):
                    self._cut += 1
                    if self._cut >= _CUT_LIMIT:
                        raise self._refused(kind, value)

    def _refused(self, event: int, value: int) -> MatspoolError:
        """Which key the failed handshake was about, in words a user can act on."""
        if self._curve is None or not is_tcp(self.endpoint):
            return DaemonUnavailable(
                f"the handshake with {self.endpoint} failed (ZeroMQ event {event:#x}, value {value})"
            )
        mine, server = self._curve.public_keys()
        if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            return AuthenticationFailed(
                f"the daemon at {self.endpoint} refused this client's public key {mine} "
                f"(from {self._curve.client_secret_file}; status {value}): copy the client's "
                ".key file into the daemon's --curve-clients directory"
            )
        return AuthenticationFailed(
            f"the CURVE handshake with {self.endpoint} failed before the daemon could check "
            f"this client: the daemon is probably not the server this client expected, with "
            f"public key {server} (from {self._curve.server_public_file}); check "
            "MATSPOOL_CURVE_SERVER_PUBLIC / ClientKeys.server_public_file against the "
            f"daemon's --curve-secret (ZeroMQ event {event:#x}, errno {value})"
        )

    def poll(self, timeout: float) -> list[list[bytes]]:
        assert self._dealer is not None
        events = dict(self._poller.poll(int(timeout * 1000)))
        if self._wake_r in events:
            try:
                os.read(self._wake_r, 8)  # an eventfd's count back to 0 (a pipe: up to 8 bytes)
            except BlockingIOError:
                pass
        if self._monitor in events:
            self._check_monitor()
        if self._lost:
            self._ask_again()
        got: list[list[bytes]] = []
        if self._dealer in events:
            recv = self._dealer.recv_multipart
            while True:  # until empty: a failed NOBLOCK receive costs less than a poll each
                try:
                    got.append(recv(zmq.NOBLOCK))
                except zmq.Again:
                    break
        return got

    def _ask_again(self) -> None:
        """Lost the user's writer under a node daemon (the service restarted): handshake
        again, at most once a second, so the node daemon starts the writer again on the same
        path, where libzmq reconnects by itself (then the link registers and re-sends)."""
        now = time.monotonic()
        if now < self._next_ask:
            return
        self._next_ask = now + 1.0
        try:
            resolve(self.endpoint)
        except DaemonUnavailable:
            pass  # not back yet: the link's timeout decides

    def reconnected(self) -> bool:
        again = self._connections > 1
        self._connections = min(self._connections, 1)
        return again

    def wake(self) -> None:
        with self._wake_lock:
            if self._wake_w < 0:
                return  # closed: no I/O thread to wake
            try:
                os.write(self._wake_w, _ONE)
            except BlockingIOError:
                pass  # a full pipe: a wake-up is pending already

    def close(self) -> None:
        if self._dealer is not None:
            self._dealer.disable_monitor()
            self._monitor.close(linger=0)
            self._dealer.close(linger=0)
            self._dealer = None
        with self._wake_lock:
            for fd in {self._wake_r, self._wake_w} - {-1}:
                os.close(fd)
            self._wake_r = self._wake_w = -1


_ONE: Final = (1).to_bytes(8, "little")  # what an eventfd's write adds


def _wake_fds() -> tuple[int, int]:
    """A non-blocking eventfd (read and write end alike), or a pipe's two ends."""
    if hasattr(os, "eventfd"):
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        return fd, fd
    r, w = os.pipe()
    os.set_blocking(r, False)
    os.set_blocking(w, False)
    return r, w


#: A handshake cut by the connection itself (the daemon killed or restarting mid-handshake):
#: libzmq reconnects and keeps the queued messages. Without CURVE that is all it can mean;
#: with CURVE a server holding another key also just drops the connection, so there only
#: ``_CUT_LIMIT`` cuts in a row with no successful handshake between them mean a key problem.
_CONNECTION_ERRNOS: Final = frozenset(
    {
        errno.ECONNRESET,
        errno.EPIPE,
        errno.ECONNABORTED,
        errno.ECONNREFUSED,
        errno.ENOTCONN,
        errno.ETIMEDOUT,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
    }
)


#: a daemon restarting cuts one or two handshakes; a server with another key cuts every one
#: (at libzmq's 100 ms reconnect interval this decides within about half a second)
_CUT_LIMIT: Final = 5


def _transient(event: int, value: int) -> bool:
    """A failed handshake that says nothing about keys or protocol: the connection broke."""
    return event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL and value in _CONNECTION_ERRNOS


#: ZeroMQ's reports that a connection was made but its handshake (CURVE keys) failed
_HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
)

Handler = Callable[[msgs.Request], list[msgs.Reply]]


class MemoryTransport:
    """A transport that hands each message to ``handler`` and delivers what it returns.

    ``handler(request) -> [reply, ...]`` sees the typed messages a daemon would parse
    (WRITE and PART checked against the ring the HELLO named) and returns typed replies;
    it runs on the link's I/O thread. BATCHes are unpacked first.
    """

    def __init__(self, handler: Handler, endpoint: str = "memory://") -> None:
        self.endpoint = endpoint
        self._handler = handler
        self._ring_bytes: int | None = None
        self._inbox: queue.SimpleQueue[list[bytes] | None] = queue.SimpleQueue()

    def open(self, identity: bytes) -> None:
        self.identity = identity

    def send(self, frames: list[Any]) -> None:
        raw = proto.decode([bytes(frames[0]), bytes(frames[1])])
        for one in msgs.Batch.from_wire(raw).msgs if raw["op"] == "BATCH" else [raw]:
            request = msgs.parse_request(one, self._ring_bytes)
            if isinstance(request, msgs.Hello):
                self._ring_bytes = request.ring_bytes
            for reply in self._handler(request):
                self._inbox.put(msgs.encode(reply))

    def poll(self, timeout: float) -> list[list[bytes]]:
        got: list[list[bytes]] = []
        try:
            first = self._inbox.get(timeout=timeout)
        except queue.Empty:
            return got
        for item in [first, *iter(lambda: self._get_nowait(), None)]:
            if item:
                got.append(item)
        return got

    def _get_nowait(self) -> list[bytes] | None:
        try:
            return self._inbox.get_nowait() or []
        except queue.Empty:
            return None

    def reconnected(self) -> bool:
        return False

    def wake(self) -> None:
        self._inbox.put(None)

    def close(self) -> None:
        pass
