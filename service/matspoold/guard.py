"""Bounded resources per connection: what one client can make the daemon hold.

Two attacks a client of the socket could mount with a few lines of Python:

- never read answers while asking for more: with an unbounded send queue (``SNDHWM=0``)
  the daemon's memory grew without end (+209 MiB in 12 s);
- open connections until the daemon runs out of descriptors: libzmq's ipc listener
  asserts on ``EMFILE`` and aborts the whole daemon (~1,100 connections at 1,024 fds).

The answers here:

- each peer's send queue is finite (:data:`PEER_SNDHWM` messages) and the ROUTER is
  ``ROUTER_MANDATORY``, so a full queue is an ``EAGAIN`` here instead of a silent drop
  or an unbounded queue. The peer that cannot take more is *cut*: its connection is
  shut down (``shutdown(2)`` on the descriptor it last spoke from, which libzmq
  then sees as a hang-up and frees its queue). Nothing is lost silently for an honest
  client that was merely slow: its DEALER reconnects, the client re-sends every save
  still unanswered, and the daemon answers those from ``Client.answered`` without writing
  twice. Only the answers to PING/STATUS and PART acknowledgements of that connection are
  gone, and a client that queued 10,000 unread answers is not reading anyway;
- connections are counted from the ROUTER's monitor (ACCEPTED, DISCONNECTED), by a
  thread of their own that blocks on it, and the ones beyond :func:`connection_cap`
  (the descriptor limit less a reserve for files, rings and bursts; the soft limit is
  first raised to the hard one) are cut as they come;
- every refusal is logged at most once per :data:`LOG_EVERY` seconds and kind, with the
  number suppressed meanwhile.

Threads: a :class:`Guard` belongs to the daemon's control thread (the ROUTER's owner),
except its watcher thread, which alone reads the monitor socket (``close`` closes it after
the thread ended) and writes the set of connections kept (under a lock) and the count
refused. Cutting a connection from there is safe: ``shutdown(2)`` is a system call on
the socket, not a call into libzmq.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import resource
import socket
import stat
import threading
import time
from typing import Any, Final

import zmq
from zmq.utils.monitor import parse_monitor_message

from .door import Door, find_door

__all__ = ["LOG_EVERY", "PEER_RCVHWM", "PEER_SNDHWM", "Guard", "RateLimitedLog", "connection_cap"]

log = logging.getLogger("matspoold")

#: answers queued for one connection before it counts as not reading (an honest client's
#: I/O thread reads continuously; 5,000 unread PONGs must still all arrive)
PEER_SNDHWM: Final = 10_000
#: requests queued from one connection before libzmq stops reading it (back-pressure)
PEER_RCVHWM: Final = 1_000
LOG_EVERY: Final = 10.0  # s between two log lines of one kind
#: descriptors kept for everything but connections: writers' files, rings, the journal,
#: libzmq's own, and a margin for a burst accepted before its events are read here
_RESERVE_MIN: Final = 128


def connection_cap(limit: int | None = None) -> int:
    """How many client connections this daemon keeps at once. Raises the soft
    ``RLIMIT_NOFILE`` to the hard one first; then half (at least 128) is reserved: the cap
    is enforced after libzmq has accepted, so the reserve must absorb every connection a
    flood opens while this daemon is not scheduled (a quarter, 256 of 1,024, was crossed
    on a loaded 2-core machine, and libzmq aborts on EMFILE)."""
    if limit is None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or hard > soft:
            target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                soft = target
            except (ValueError, OSError):
                pass
        limit = soft
    return max(16, limit - max(_RESERVE_MIN, limit // 2))


class RateLimitedLog:
    """At most one warning per kind per ``every`` seconds; the rest are counted and the
    count is told with the next line."""

    def __init__(self, every: float = LOG_EVERY) -> None:
        self.every = every
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def allow(self, kind: str) -> bool:
        """True when a line of ``kind`` may be logged now; else it is counted."""
        now = time.monotonic()
        if now - self._last.get(kind, -1e9) < self.every:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return False
        self._last[kind] = now
        return True

    def warning(self, kind: str, message: str, *args: Any) -> None:
        if not self.allow(kind):
            return
        n = self._suppressed.pop(kind, 0)
        log.warning(message + (f" ({n} more like this in the last {self.every:.0f} s)" if n else ""), *args)


_libc = ctypes.CDLL(None, use_errno=True)


def _cut(fd: int) -> bool:
    """Shut a connection down under libzmq, which then closes it as a hang-up.
    ``shutdown(2)`` acts on the socket, and is called on libzmq's own descriptor through
    libc: no dup, which would need a free descriptor exactly when a flood has taken them
    all (a failed dup left the connection uncut for good, and the flood went on to the
    EMFILE that aborts libzmq)."""
    try:
        if not stat.S_ISSOCK(os.fstat(fd).st_mode):
            return False
    except OSError:
        return False
    return bool(_libc.shutdown(fd, socket.SHUT_RDWR) == 0)


class Guard:
    """The ROUTER's connections and send queues; see the module docstring."""

    def __init__(self, router: zmq.Socket[bytes], cap: int | None = None) -> None:
        self.router = router
        self.cap = connection_cap() if cap is None else cap
        router.setsockopt(zmq.SNDHWM, PEER_SNDHWM)
        router.setsockopt(zmq.RCVHWM, PEER_RCVHWM)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._lock = threading.Lock()  # guards ``open`` (the watcher writes; tests and status read)
        self.open: set[int] = set()  # descriptors of the connections kept
        self._fd_of: dict[bytes, int] = {}  # routing id -> descriptor it last spoke from
        self._id_of: dict[int, bytes] = {}  # and back (control thread, both)
        self.refused = 0  # connections cut at the cap (written by the watcher only)
        self.paused = 0  # times accepting was paused at the cap (the watcher only)
        self.dropped = 0  # connections cut for not reading
        self.log = RateLimitedLog()
        self._door_log = RateLimitedLog()  # the watcher's own: no dict shared across threads
        self._door: Door | None = None  # libzmq's accept, paused at the cap (door.py)
        self._mon: zmq.Socket[bytes] | None = None  # the watcher's end of the monitor
        self._stop = threading.Event()
        self._failed: BaseException | None = None
        addr = f"inproc://matspoold-guard-{id(self):x}"
        # not ACCEPT_FAILED: a tcp listener out of descriptors fails an accept per epoll report,
        # and this queue is unbounded; an arm a failed accept used up (rare on unix sockets:
        # a connection closed in the backlog is still accepted) is renewed at the next poll
        router.monitor(addr, zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        ready = threading.Event()
        self._watcher = threading.Thread(
            target=self._watch, args=(router.context, addr, ready), name="matspoold-guard", daemon=True
        )
        self._watcher.start()
        ready.wait()
        failed: BaseException | None = self._failed  # set by the watcher before ready
        if failed is not None:
            router.disable_monitor()
            raise failed

    def listening(self, endpoint: str) -> None:
        """The ROUTER is bound at ``endpoint``: find the door that pauses its accepting
        (ipc on Linux), while descriptors are free. Control thread, once, after bind.
        Armed here, before the watcher sees it: until then libzmq accepts all it hears of,
        and a flood already knocking when the daemon starts aborted it (3 of 3 at 64
        descriptors)."""
        door = find_door(endpoint)
        if door is not None and door.arm():
            self._door = door
        elif door is not None:
            door.release()

    def close(self) -> None:
        """Disable the monitor first: an event libzmq's I/O thread sends once nobody reads
        the monitor blocks that thread for good, holding the lock ``disable_monitor`` waits
        for (a daemon stopped during a flood hung). Then stop the watcher and close its
        socket. The door stays as it is: the ROUTER is closed next, and accepting its
        backlog now, uncounted, could still run out of descriptors."""
        self.router.disable_monitor()
        self._stop.set()
        self._watcher.join()
        if self._mon is not None:
            self._mon.close(linger=0)
        if self._door is not None:
            self._door.release()

    # -- connections: the watcher thread ---------------------------------------------------
    def _watch(self, ctx: zmq.Context[Any], addr: str, ready: threading.Event) -> None:
        """Own the monitor socket and cut connections beyond the cap as they are accepted.
        A thread of its own, blocked on the monitor: the control thread may spend a slice
        writing small files, and a flood opening 5,000 connections a second fills the
        reserve in a tenth of that. No event may be lost either (an ACCEPTED dropped is a
        connection never counted nor cut), so the monitor's queue is unbounded: an event is
        a few dozen bytes, and this thread reads them as they come."""
        try:
            mon = ctx.socket(zmq.PAIR)
            mon.setsockopt(zmq.RCVHWM, 0)  # before connect: the inproc pipe takes it then
            mon.connect(addr)
            self._mon = mon  # closed by close(), never here: see there
        except BaseException as e:  # noqa: BLE001 - raised in the constructor's thread
            self._failed = e
            ready.set()
            return
        ready.set()
        next_check = time.monotonic() + 1.0
        try:
            while not self._stop.is_set():
                try:
                    if mon.poll(200):
                        self._events(mon)
                    if time.monotonic() >= next_check:
                        self._reconcile()
                        next_check = time.monotonic() + 1.0
                    self._doorkeep()
                except zmq.ContextTerminated:
                    raise
                except Exception:  # the watcher outlives one bad event or read
                    if self._door_log.allow("watcher"):
                        log.exception("connection guard: an event could not be handled; going on")
                    time.sleep(0.01)
        except zmq.ContextTerminated:
            pass

    def _doorkeep(self) -> None:
        """Below the cap let libzmq accept one more connection (``Door.arm``: it is counted
        here before the next is let in); at the cap shut the door, and connections wait in
        the kernel's backlog instead of taking descriptors."""
        door = self._door
        if door is None:
            return
        n = len(self.open)
        if n < self.cap:
            ok = door.arm()
        elif not door.shut:
            ok = door.close()
            self.paused += ok
            if ok:
                self._door_log.warning(
                    "pause", "paused accepting: %d connections are open, the cap is %d", n, self.cap
                )
        else:
            return
        if not ok:
            self._door = None
            log.warning("libzmq's watch of the listening socket changed: floods are now cut, not paused")

    def _events(self, mon: zmq.Socket[bytes]) -> None:
        """Read the monitor: count new connections, cut those beyond the cap."""
        while True:
            try:
                event = parse_monitor_message(mon.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            fd = int(event["value"])
            if event["event"] == zmq.EVENT_ACCEPTED:
                with self._lock:
                    keep = len(self.open) < self.cap
                    if keep:
                        self.open.add(fd)
                if not keep:
                    self.refused += 1
                    _cut(fd)
                    self._door_log.warning(
                        "cap",
                        "refused a connection: %d are open, the cap is %d (descriptor limit less a reserve)",
                        len(self.open),
                        self.cap,
                    )
            elif event["event"] == zmq.EVENT_DISCONNECTED:
                with self._lock:
                    self.open.discard(fd)

    def _reconcile(self) -> None:
        """Forget descriptors that are no longer sockets (a late or odd event must not
        shrink the cap for good). Once a second."""
        with self._lock:
            kept = list(self.open)
        gone = []
        for fd in kept:
            try:
                ok = stat.S_ISSOCK(os.fstat(fd).st_mode)
            except OSError:
                ok = False
            if not ok:
                gone.append(fd)
        with self._lock:
            self.open.difference_update(gone)

    def seen(self, ident: bytes, frame: zmq.Frame) -> None:
        """Note which connection ``ident`` spoke from (the one to cut if it stops reading)."""
        try:
            fd = int(frame.get(zmq.SRCFD))
        except (zmq.ZMQError, ValueError, TypeError):
            return
        if self._fd_of.get(ident) == fd:
            return
        # one id per descriptor: the id that spoke from it before is gone with its
        # connection (the number was reused), so both maps stay as small as the
        # descriptors in use, whatever ids come and go
        old = self._id_of.get(fd)
        if old is not None:
            self._fd_of.pop(old, None)
        prev = self._fd_of.get(ident)
        if prev is not None:
            self._id_of.pop(prev, None)
        self._fd_of[ident] = fd
        self._id_of[fd] = ident

    # -- answers --------------------------------------------------------------------------
    def send_multipart(self, frames: list[Any]) -> None:
        """Send an answer without ever blocking or queueing without bound: a peer gone is
        skipped (its client re-sends on reconnect); a peer whose queue is full is cut."""
        try:
            self.router.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.Again:
            ident = bytes(frames[0])
            fd = self._fd_of.pop(ident, None)
            if fd is not None:
                self._id_of.pop(fd, None)
            self.dropped += 1
            cut = fd is not None and _cut(fd)
            self.log.warning(
                "slow",
                "client %r does not read its answers (%d queued): %s",
                ident[:64],
                PEER_SNDHWM,
                "connection cut; it may reconnect and ask again"
                if cut
                else "answer dropped; its connection is unknown",
            )
        except zmq.ZMQError as e:
            if e.errno != errno.EHOSTUNREACH:
                raise
            # the peer has gone: its client re-sends unanswered saves when it reconnects
