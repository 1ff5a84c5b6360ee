"""Client sessions: who is connected, with which ring, and when a client is gone.

A local client says HELLO with the name of its ring: a sealed memfd (with its pid and
descriptor number), which the daemon maps read-only, lazily (no page is touched on this
thread), or a ``/dev/shm`` file, which it only reads by copy (``ringio``). It keeps
either until the client says BYE or is dead. A remote client (tcp://) has no ring here:
its payloads come in message frames. Rings are capped per client and in total
(``--max-ring-bytes``, ``--max-total-ring-bytes``): a HELLO over a cap is refused.

Threads: the table and every :class:`Client` belong to the control thread. Writer
threads read a job's client (its mapping, ``fd``, ``ident``) but change nothing in it;
the mapping is released only when the client has no job in flight.
"""

from __future__ import annotations

import logging
import mmap
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from matspool import _messages as msgs
from matspool import _protocol as proto
from matspool._errors import ProtocolError, RingError
from matspool._messages import MAX_RING_BYTES
from matspool._msgstatus import ClientStatus
from matspool._ringopen import open_ring_readonly
from matspool._segment import RING_PREFIX, ring_path

from .cleanup import pid_alive
from .ringio import ShmRing, unmap_later

__all__ = [
    "DEFAULT_MAX_RING_BYTES",
    "DEFAULT_MAX_TOTAL_RING_BYTES",
    "DONE_MEMORY",
    "MAX_RING_BYTES",
    "Client",
    "Clients",
]

log = logging.getLogger("matspoold")

DONE_MEMORY = 4096  # per client: answers kept to re-send when a WRITE arrives twice
_PID_GRACE = 2.0  # s of silence before a vanished pid counts (its BYE may be on the way)
DEFAULT_MAX_RING_BYTES = 4 << 30  # per client: 16 x the client's default ring
DEFAULT_MAX_TOTAL_RING_BYTES = 64 << 30  # every client together


@dataclass(eq=False, slots=True)
class Client:
    """One connected client: its ring, its saves in flight, its counters."""

    ident: bytes
    ring: str
    # a sealed memfd ring, mapped; a /dev/shm ring, read by copy; None: a remote client
    # (tcp://), whose payloads come in frames
    mm: mmap.mmap | ShmRing | None
    fd: int  # the ring's descriptor (-1 remote), closed in release()
    pid: int
    ring_bytes: int = 0
    inflight: int = 0
    bye: bool = False
    dead: bool = False
    last_seen: float = 0.0
    active: dict[int, float] = field(default_factory=dict)  # seq accepted -> when
    begun: dict[int, proto.WriteRequest] = field(default_factory=dict)  # saves arriving in pieces
    # seq -> its answer: an ERR, or a DONE's file size (its Done made only if asked again)
    answered: OrderedDict[int, msgs.Reply | int] = field(default_factory=OrderedDict)
    joined: float = field(default_factory=time.monotonic)
    files: int = 0
    bytes_written: int = 0
    payload_inflight: int = 0
    errors: int = 0
    memfd: bool = False  # its ring is a memfd: nothing to unlink when it dies

    def status(self, now: float) -> ClientStatus:
        """What ``matspool status`` shows for this client."""
        age = max(now - self.joined, 1e-9)
        return ClientStatus(
            pid=self.pid,
            ring=self.ring,
            ring_bytes=self.ring_bytes,
            queue_depth=self.inflight,
            ring_bytes_in_flight=self.payload_inflight,
            files_written=self.files,
            bytes_written=self.bytes_written,
            errors=self.errors,
            throughput_bytes_per_s=self.bytes_written / age,
            connected_s=age,
            oldest_pending_s=now - min(self.active.values()) if self.active else 0.0,
            silent_s=now - self.last_seen,
            dead=self.dead,
        )

    def remember(self, seq: int, reply: msgs.Reply | int) -> None:
        """Keep the answer to save ``seq`` (an int: DONE with that file size): a WRITE
        re-sent after a reconnect gets it again."""
        self.active.pop(seq, None)
        answered = self.answered
        answered[seq] = reply
        if len(answered) > DONE_MEMORY:
            answered.popitem(last=False)

    def answer(self, seq: int) -> msgs.Reply:
        """The answer remembered for save ``seq`` (which must be in ``answered``)."""
        reply = self.answered[seq]
        return msgs.Done(((seq, reply),)) if type(reply) is int else reply  # type: ignore[return-value]

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if isinstance(self.mm, mmap.mmap):
            if not self.mm.closed:
                unmap_later(self.mm)  # a large one off this (the control) thread: ringio
        elif self.mm is not None:
            self.mm.close()


class Clients:
    """The client table: HELLO, BYE, and reaping the dead.

    ``forget`` is called when a client is dropped, to abort its saves in pieces that will
    never end (the jobs' temporary files).
    """

    def __init__(
        self,
        *,
        tcp: bool,
        clean_stale: bool,
        client_timeout: float,
        forget: Callable[[Client], None],
        max_ring_bytes: int = DEFAULT_MAX_RING_BYTES,
        max_total_ring_bytes: int = DEFAULT_MAX_TOTAL_RING_BYTES,
    ) -> None:
        self.table: dict[bytes, Client] = {}
        self.max_ring_bytes = max_ring_bytes
        self.max_total_ring_bytes = max_total_ring_bytes
        self._tcp = tcp
        self._clean_stale = clean_stale
        self._client_timeout = client_timeout
        self._forget = forget

    def get(self, ident: bytes) -> Client | None:
        return self.table.get(ident)

    def busy(self) -> bool:
        return any(c.inflight for c in self.table.values())

    def status(self, now: float) -> list[ClientStatus]:
        return [c.status(now) for c in self.table.values()]

    def release_all(self) -> None:
        for c in self.table.values():
            c.release()

    def hello(self, ident: bytes, msg: msgs.Hello) -> None:
        """Register (or re-register, after a restart it saw) the client ``ident``; the
        message's fields are checked already (``_messages.Hello``)."""
        ring, size, pid = msg.ring, msg.ring_bytes, msg.pid
        self._check_caps(ident, size)
        if msg.remote:  # its ring is on another host: payloads come in frames
            if not self._tcp:
                raise ProtocolError("remote clients are served on tcp:// endpoints only")
            self._replace(ident)
            self.table[ident] = Client(
                ident, "(remote)", None, -1, pid, ring_bytes=size, last_seen=time.monotonic()
            )
            log.info("remote client pid %d joined", pid)
            return
        if not isinstance(ring, str):
            raise ProtocolError("HELLO needs a ring name")
        mapped, fd = open_ring_readonly(ring, size, pid=pid, fd=msg.fd)
        if not ring.startswith(f"{RING_PREFIX}{pid}-"):
            # reaping trusts the pid: it must be the one that named (created) the ring
            if mapped is not None:
                mapped.close()
            os.close(fd)
            raise ProtocolError(f"HELLO: ring {ring[:80]!r} was not created by pid {pid}")
        mm = mapped if mapped is not None else ShmRing(fd, size)
        self._replace(ident)
        self.table[ident] = Client(
            ident, ring, mm, fd, pid, ring_bytes=size, last_seen=time.monotonic(), memfd=msg.fd is not None
        )
        log.info(
            "client pid %d joined with a %d MiB %s ring",
            pid,
            size >> 20,
            "memfd" if msg.fd is not None else "/dev/shm",
        )

    def _check_caps(self, ident: bytes, size: int) -> None:
        """Refuse a ring over the cap per client, or one that would take every client's
        rings together over the daemon's cap (a client saying HELLO again is not counted
        twice)."""
        if size > self.max_ring_bytes:
            raise RingError(
                f"a ring of {size} bytes ({size / 2**30:.2f} GiB) is over this daemon's "
                f"cap of {self.max_ring_bytes} bytes per client (--max-ring-bytes); "
                "create the Spool with a smaller ring_bytes"
            )
        others = sum(c.ring_bytes for i, c in self.table.items() if i != ident)
        if others + size > self.max_total_ring_bytes:
            raise RingError(
                f"a ring of {size} bytes would take this daemon's clients' rings to "
                f"{others + size} bytes, over its cap of {self.max_total_ring_bytes} bytes "
                "for all clients (--max-total-ring-bytes); try again later or with a "
                "smaller ring_bytes"
            )

    def _replace(self, ident: bytes) -> None:
        old = self.table.get(ident)
        if old is not None:  # the same client again (it saw a restart): the old mapping goes
            old.bye = True  # as soon as its writes in flight are answered
            if not old.inflight:
                old.release()

    def bye(self, ident: bytes) -> None:
        c = self.table.get(ident)
        if c is None:
            return
        c.bye = True
        if not c.inflight:
            self.drop(c)

    def settled(self, c: Client) -> None:
        """A job of ``c`` finished: a client leaving (BYE) or dead goes when its last did."""
        if (c.bye or c.dead) and not c.inflight:
            self.drop(c)

    def drop(self, c: Client) -> None:
        if self.table.get(c.ident) is c:
            del self.table[c.ident]
        self._forget(c)  # saves in pieces that will never end: no partial file stays
        c.release()
        if c.dead and not c.memfd and c.mm is not None:  # its process cannot unlink it any more
            try:
                os.unlink(ring_path(c.ring))
                log.info("client pid %d died; its saves are written and its ring removed", c.pid)
            except OSError as e:
                log.warning("client pid %d died; cannot remove its ring %s: %s", c.pid, c.ring, e)
        elif c.dead and c.memfd:
            log.info("client pid %d died; its saves are written and its memfd ring released", c.pid)

    def reap(self) -> None:
        """Clients gone without BYE: finish their accepted saves, then free their rings.

        A local client is dead when its pid is gone (after a short grace): silence alone is
        not death, since a process stopped by SIGSTOP, a debugger or swap comes back and
        must find its registration and ring. Pids mean something only in our own pid
        namespace, so with ``--no-clean-stale`` (clients in other containers), and for
        remote clients, silence past ``client_timeout`` decides.
        """
        now = time.monotonic()
        for c in list(self.table.values()):
            silent = now - c.last_seen
            if c.dead:
                continue
            if self._clean_stale and c.mm is not None:
                dead = silent > _PID_GRACE and not pid_alive(c.pid)
            else:
                dead = silent > self._client_timeout
            if not dead:
                continue
            c.dead = True
            if not c.inflight:
                self.drop(c)
