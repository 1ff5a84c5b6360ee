"""The client's side of the socket: the I/O thread and what it sends and receives.

Only the I/O thread touches the ZeroMQ DEALER (sockets are not thread-safe). Callers put
messages in an outbox and wake the thread only when the outbox was empty, so a burst of
saves costs one wake-up; WRITEs queued together leave as one BATCH. The thread turns
DONE/ERR into future results, sends heartbeats, notices a restarted daemon (its instance
id changes) and re-sends every unanswered save after any reconnect.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Final

import zmq

from . import _protocol as proto
from ._curve import ClientKeys, is_tcp
from ._errors import DaemonUnavailable, MatspoolError, UnknownClient, error_from_code
from ._saves import SaveResult

if TYPE_CHECKING:
    from ._embedded import EmbeddedDaemon
    from ._ring import Ring
    from ._saves import Pending

__all__ = ["DaemonLink"]

log = logging.getLogger("matspool")

_BATCH_BYTES: Final = proto.MAX_MESSAGE_BYTES // 2


def _send_batch(dealer: zmq.Socket, bodies: list[bytes]) -> None:
    """Saves queued together reach the daemon as one message: one receive there, not one
    per save, which is most of a small file's cost in the daemon's control loop."""
    if len(bodies) == 1:
        dealer.send_multipart([proto.TAG, bodies[0]])
    elif bodies:
        dealer.send_multipart([proto.TAG, b'{"op":"BATCH","msgs":[' + b",".join(bodies) + b"]}"])


class DaemonLink:
    """The I/O half of :class:`matspool.Spool` (a mixin: it shares the spool's state)."""

    endpoint: str
    timeout: float | None
    _heartbeat: float
    _lock: threading.Lock
    _pending: dict[int, Pending]
    _ring: Ring | None
    _embedded: EmbeddedDaemon | None
    _curve: ClientKeys | None
    _remote: bool
    _broken: MatspoolError | None
    _instance: str | None
    _hello_sent: bool
    _hello_at: float = 0.0

    def _open_link(self, connect_timeout: float) -> None:
        """Start the I/O thread and say HELLO; returns once the daemon has answered."""
        self._ctx = zmq.Context.instance()
        self._outbox: deque[tuple[str, int, list[Any]]] = deque()
        self._wake_lock = threading.Lock()
        inproc = f"inproc://matspool-{id(self)}"
        self._rx = self._ctx.socket(zmq.PULL)
        self._rx.bind(inproc)
        self._tx = self._ctx.socket(zmq.PUSH)
        self._tx.connect(inproc)
        self._welcome = threading.Event()
        self._io = threading.Thread(target=self._io_loop, name="matspool-io", daemon=True)
        self._io.start()
        self._send(self._hello_msg())
        self._await_welcome(connect_timeout)

    def _close_link(self) -> None:
        io = getattr(self, "_io", None)
        if io is not None and io.is_alive():
            self._send({"op": "BYE"})  # the I/O thread forwards it to the daemon, then stops
            io.join(timeout=5)
        for name in ("_tx", "_rx"):
            sock = getattr(self, name, None)
            if sock is not None:
                sock.close(linger=0)

    if TYPE_CHECKING:  # the spool's side, used here
        def _resolve(self, seq: int, result: SaveResult | None = None,
                     error: BaseException | None = None) -> None: ...

        def _fail_all(self, error: MatspoolError) -> None: ...

        def _part_done(self, seq: object, offset: object) -> None: ...

        @property
        def pending(self) -> int: ...

    def _send(self, msg: dict[str, Any], payload: list[memoryview] | tuple[()] = ()) -> None:
        item = (msg["op"], msg.get("seq", -1), [*proto.encode(msg), *payload])
        with self._wake_lock:
            self._outbox.append(item)
            if len(self._outbox) == 1:
                self._tx.send(b"")

    def _payload(self, message: Any) -> list[memoryview] | tuple[()]:
        """For a remote (tcp://) daemon, which cannot map our ring: the arrays as frames,
        zero-copy views of the ring, in the ring order the daemon expects."""
        if not self._remote or self._ring is None:
            return ()
        ring = self._ring.array
        if isinstance(message, proto.WriteRequest):
            spans = [(leaf.offset, leaf.nbytes) for v in message.vars for leaf in proto.leaves(v)
                     if not leaf.deferred and leaf.nbytes]
        elif isinstance(message, proto.Part):
            spans = [(message.offset, message.nbytes)]
        else:
            return ()
        return [memoryview(ring[off:off + n]) for off, n in spans]

    def _await_welcome(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self._welcome.wait(0.05):
            if self._broken is not None:
                raise self._broken
            if self._embedded is not None and (rc := self._embedded.exit_status()) is not None:
                raise DaemonUnavailable(f"the embedded daemon exited with status {rc} during start-up")
            if time.monotonic() > deadline:
                raise DaemonUnavailable(f"no matspool daemon answered at {self.endpoint} within {timeout} s")

    def _on_message(self, dealer: zmq.Socket, msg: dict[str, Any]) -> None:
        op = msg.get("op")
        instance = msg.get("instance")
        if op == "WELCOME":
            restarted = self._instance is not None and instance != self._instance
            self._instance, self._hello_sent = instance, False
            self._welcome.set()
            if restarted:
                self._resend(dealer)
        elif op == "PONG":
            if self._instance is not None and instance != self._instance and not self._hello_sent:
                self._hello(dealer)  # a new daemon on the same endpoint: register again
        elif op == "PART_DONE":
            self._part_done(msg.get("seq"), msg.get("offset"))
        elif op == "DONE":  # one save ({seq, nbytes}) or several ({done: [[seq, nbytes], ...]})
            answers = msg["done"] if "done" in msg else [[msg.get("seq"), msg.get("nbytes", 0)]]
            for seq, nbytes in answers:
                p = self._pending.get(seq)
                if p is not None:
                    self._resolve(seq, SaveResult(p.path, int(nbytes), p.format))
        elif op == "ERR":
            code, seq = str(msg.get("code")), msg.get("seq")
            if code == UnknownClient.code:  # the daemon restarted: the save is re-sent after HELLO
                if not self._hello_sent:
                    self._hello(dealer)
                return
            err = error_from_code(code, str(msg.get("message")))
            if isinstance(seq, int) and seq >= 0:
                self._resolve(seq, error=err)
            else:  # about the connection itself (e.g. the ring could not be mapped)
                self._broken = err
                self._fail_all(err)
        else:
            log.warning("matspool: ignoring unknown message %r from the daemon", op)

    def _hello_msg(self) -> dict[str, Any]:
        assert self._ring is not None
        if self._remote:  # the daemon is on another host: it gets payloads in frames
            return {"op": "HELLO", "remote": True, "ring": None, "ring_bytes": self._ring.size,
                    "pid": os.getpid()}
        return {"op": "HELLO", "ring": self._ring.name, "ring_bytes": self._ring.size, "pid": os.getpid()}

    def _hello(self, dealer: zmq.Socket) -> None:
        """Register again with a daemon that does not know us (it restarted). Until it
        answers, the outbox is held: a save sent now would be accepted before the
        unanswered ones re-sent after WELCOME, and overtake them (a stream's steps, or
        two saves to one path, would land out of order)."""
        self._hello_sent = True
        self._hello_at = time.monotonic()
        dealer.send_multipart(proto.encode(self._hello_msg()))

    def _resend(self, dealer: zmq.Socket) -> None:
        """Send again every save the previous daemon accepted but never answered.

        Their bytes are still in the ring (space is freed only on an answer); a file the
        old daemon had already renamed into place is replaced by an identical one.
        """
        with self._lock:
            again = [p.wire for p in self._pending.values() if p.sent]
        for wire in again:
            dealer.send_multipart(wire, copy=False)
        if again:
            log.warning("matspool: (re)connected to the daemon; re-sent %d unanswered saves", len(again))

    def _forward(self, dealer: zmq.Socket) -> bool:
        """Pass the outbox's messages to the daemon; False on BYE."""
        with self._wake_lock:
            items = list(self._outbox)
            self._outbox.clear()
        batch: list[bytes] = []  # bodies of local WRITEs that go together as one BATCH
        size = 0
        for op, seq, frames in items:
            if op == "WRITE" and len(frames) == 2:  # no payload frames to keep apart
                if self._mark_sent(seq, frames):
                    if size + len(frames[1]) > _BATCH_BYTES:
                        _send_batch(dealer, batch)
                        batch, size = [], 0
                    batch.append(frames[1])
                    size += len(frames[1])
                continue
            _send_batch(dealer, batch)
            batch, size = [], 0
            if not self._forward_one(dealer, op, seq, frames):
                return False
        _send_batch(dealer, batch)
        return True

    def _mark_sent(self, seq: int, frames: list[Any]) -> bool:
        """Keep a WRITE's frames to re-send; False if the save failed or closed meanwhile."""
        with self._lock:
            p = self._pending.get(seq)
            if p is None:
                return False
            p.wire, p.sent = frames, True
            return True

    def _forward_one(self, dealer: zmq.Socket, op: str, seq: int, frames: list[Any]) -> bool:
        if op == "WRITE" and not self._mark_sent(seq, frames):
            return True
        dealer.send_multipart(frames, copy=False)
        return op != "BYE"

    def _io_loop(self) -> None:
        dealer = self._ctx.socket(zmq.DEALER)
        assert self._ring is not None
        dealer.setsockopt(zmq.ROUTING_ID, self._ring.name.encode())
        dealer.setsockopt(zmq.SNDHWM, 0)
        dealer.setsockopt(zmq.RCVHWM, 0)  # every answer must get through, however many
        dealer.setsockopt(zmq.LINGER, 0)
        if self._curve is not None and is_tcp(self.endpoint):
            self._curve.apply(dealer)
        # a reconnect (a network blip on tcp://) may have lost answers in flight: the
        # daemon drops what it cannot deliver. Re-sending the unanswered saves then is safe:
        # it answers a seq it has written again, and ignores one it is still writing.
        monitor = dealer.get_monitor_socket(zmq.EVENT_CONNECTED)
        dealer.connect(self.endpoint)
        poller = zmq.Poller()
        poller.register(dealer, zmq.POLLIN)
        poller.register(self._rx, zmq.POLLIN)
        poller.register(monitor, zmq.POLLIN)
        connections = 0
        last_rx = last_ping = time.monotonic()
        silence_limit = self.timeout if self.timeout else 60.0
        try:
            while True:
                events = dict(poller.poll(int(self._heartbeat * 1000)))
                now = time.monotonic()
                if self._rx in events:
                    while self._rx.poll(0):
                        self._rx.recv()
                if dealer in events:
                    last_rx = now
                    while dealer.poll(0):
                        try:
                            self._on_message(dealer, proto.decode(dealer.recv_multipart()))
                        except Exception as e:  # e.g. a DONE whose seq is a list: this thread
                            # must live on, or every pending future would hang forever
                            log.warning("matspool: bad message from the daemon: %r", e)
                if monitor in events:
                    while monitor.poll(0):
                        monitor.recv_multipart()
                        connections += 1
                        if connections > 1:
                            self._resend(dealer)
                if not self._hello_sent:  # not waiting for a re-HELLO's WELCOME (see _hello)
                    if not self._forward(dealer):
                        return
                elif now - self._hello_at > max(5.0, 3 * self._heartbeat):
                    self._hello(dealer)  # unanswered (lost across a reconnect): say it again
                if now - last_ping >= self._heartbeat:
                    dealer.send_multipart(proto.encode({"op": "PING"}))
                    last_ping = now
                if self._embedded is not None and (rc := self._embedded.exit_status()) is not None:
                    self._broken = DaemonUnavailable(f"the embedded daemon exited with status {rc}")
                    self._fail_all(self._broken)
                    return
                if self.pending and now - last_rx > max(silence_limit, 3 * self._heartbeat):
                    self._fail_all(DaemonUnavailable(
                        f"no word from the daemon at {self.endpoint} for {now - last_rx:.1f} s"))
                    last_rx = now
        finally:
            dealer.disable_monitor()
            monitor.close(linger=0)
            dealer.close(linger=0)
