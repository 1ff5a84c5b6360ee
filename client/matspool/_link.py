"""The link: the protocol spoken to one daemon, on the I/O thread, over a transport.

Callers put messages in an outbox and wake the I/O thread only when it waits in ``poll``
(``_idle``), so a burst of saves costs one wake-up, not one per time the thread has
emptied the outbox; WRITEs queued together leave as one BATCH. The I/O
thread hands the daemon's answers to the pending table, sends heartbeats, and keeps the
registration alive:

- a new daemon instance on the endpoint (its id changed): the old one is dead, so the
  regions it held are released, and every unanswered whole save is sent again;
- a daemon that cannot reach a ``memfd`` ring (it runs as another user, in another pid
  namespace, or predates them; the refusal's errno says so): the ring moves to
  ``/dev/shm`` and HELLO is said again;
- a daemon that forgot this client (``unknown_client``, e.g. it took a stopped client
  for dead): register again, in a new ring if the daemon unlinked ours, and send the
  unanswered saves again;
- a daemon that refuses binary WRITEs as malformed (one that reads JSON only took our
  daemon's place; they were queued across the reconnect): JSON from then on, HELLO again,
  and the unanswered saves go again as JSON;
- a daemon that answers PING but has not answered our first HELLO for 5 s (the HELLO
  went to a job's daemon that died before answering it, and ``_jobdaemon`` started the
  next one on the endpoint): say HELLO again (a daemon takes a repeated HELLO as one);
- a silent daemon: after ``timeout`` s the open futures fail (the outcome is unknown:
  the file may still appear, whole), but the regions stay leased until that daemon
  answers or its pid is gone.

Threads: the I/O thread owns the transport and the registration state; ``send`` and
``close`` are called from others (``closed``, set by ``close``, is read by a sharded
save's thread, which then sends nothing more).
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Final

from . import _messages as msgs
from . import _protocol as proto
from . import _wirebin
from ._errors import (
    DaemonUnavailable,
    MatspoolError,
    ProtocolError,
    RingError,
    UnknownClient,
    error_from_code,
)
from ._leases import Lease
from ._msgshard import LaidOut
from ._pending import PendingTable, failing
from ._reach import exit_text, pid_alive
from ._ring import Ring
from ._transport import Transport
from ._wire import remote_frames

__all__ = ["Encoded", "Link"]

log = logging.getLogger("matspool")

_BATCH_BYTES: Final = proto.MAX_MESSAGE_BYTES // 2
#: how often a busy I/O thread asks whether the embedded daemon ended (a waitpid each
#: time; once per turn cost a system call per save waited for)
_EXIT_CHECK_S: Final = 0.05
#: errnos of a HELLO refused because the daemon cannot reach a memfd ring where it is
_UNREACHABLE: Final = frozenset({errno.EACCES, errno.EPERM, errno.ENOENT, errno.ESRCH, errno.ENXIO})


class Encoded:
    """A WRITE already encoded (binary, for a local daemon that offered it): what
    ``_quick`` hands to the copy pipeline and ``send`` queues as it is."""

    __slots__ = ("frames", "seq")
    OP: Final = "WRITE"

    def __init__(self, seq: int, frames: list[bytes]) -> None:
        self.seq = seq
        self.frames = frames


class Link:
    """Speaks to one daemon for one spool; see the module docstring."""

    def __init__(
        self,
        transport: Transport,
        ring: Ring,
        table: PendingTable,
        *,
        timeout: float | None,
        heartbeat: float,
        remote: bool,
        # None while the embedded daemon runs; a job's shared daemon raises DaemonUnavailable
        # when it is gone for good (it is started again otherwise)
        daemon_exit: Callable[[], int | None] | None = None,
    ) -> None:
        self.transport = transport
        self.endpoint = transport.endpoint
        self._ring = ring
        self._table = table
        self._timeout = timeout
        self._heartbeat = heartbeat
        self._remote = remote
        self._daemon_exit = daemon_exit
        self.broken: MatspoolError | None = None
        self.instance: str | None = None
        self.daemon_pid: int | None = None
        self.binary = False  # the daemon's WELCOME said it reads binary WRITEs (_wirebin)
        self._json_only = False  # a daemon refused them: one that reads JSON only replaced ours
        self._hello_pending = False
        self._hello_at = 0.0
        self._welcome = threading.Event()
        self._outbox: deque[tuple[str, int, list[Any], Lease | None]] = deque()
        self._outbox_lock = threading.Lock()
        # the I/O thread is about to wait in (or waits in) poll with an empty outbox, and
        # no one has woken it since: the next message must (under _outbox_lock)
        self._idle = False
        self._io: threading.Thread | None = None
        self._abandoned = False  # close() gave up waiting for the BYE: the I/O thread ends
        self.closed = False  # close() began: nothing sent from now on is answered

    # -- other threads ------------------------------------------------------------------
    def open(
        self, connect_timeout: float, probe: Callable[[], None] | None = None, grace: float = 0.0
    ) -> None:
        """Start the I/O thread and say HELLO; returns once the daemon has answered.

        ``probe`` (after ``grace`` s, then every second) raises when nobody can be
        listening, so a wrong endpoint fails long before ``connect_timeout``."""
        self.transport.open(self._ring.name.encode())
        self._io = threading.Thread(target=self._loop, name="matspool-io", daemon=True)
        self._io.start()
        self._hello_at = time.monotonic()
        self.send(self._hello_msg())
        start = time.monotonic()
        deadline = start + connect_timeout
        next_probe = start + grace
        while not self._welcome.wait(0.05):
            if probe is not None and time.monotonic() >= next_probe:
                probe()
                next_probe = time.monotonic() + 1.0
            if self.broken is not None:
                raise self.broken
            if self._daemon_exit is not None and (rc := self._daemon_exit()) is not None:
                raise DaemonUnavailable(f"the embedded daemon {exit_text(rc)} during start-up")
            if time.monotonic() > deadline:
                raise DaemonUnavailable(
                    f"no matspool daemon answered at {self.endpoint} within {connect_timeout} s"
                )

    def send(self, message: msgs.Request | Encoded, lease: Lease | None = None) -> None:
        """Queue ``message``; ``lease``: the region it names, released here if the message
        never goes."""
        frames: list[Any]
        if type(message) is Encoded:  # a small save's WRITE, encoded by _quick
            frames = message.frames
        else:
            frames = [
                *msgs.encode(message, binary=self.binary),  # type: ignore[arg-type]
                *(remote_frames(self._ring.array, message) if self._remote else []),  # type: ignore[arg-type]
            ]
        self.queue(message.OP, getattr(message, "seq", -1), frames, lease)

    def queue(self, op: str, seq: int, frames: list[Any], lease: Lease | None) -> None:
        """Queue ``frames`` already encoded (``send``'s, or a WRITE ``_quick`` encoded:
        binary, only while ``binary``) and wake the I/O thread if it waits."""
        with self._outbox_lock:
            self._outbox.append((op, seq, frames, lease))
            wake, self._idle = self._idle, False
        if wake:  # a wake-up that comes late is harmless: one more turn of the loop
            self.transport.wake()

    def close(self) -> None:
        self.closed = True
        if self._io is not None and self._io.is_alive():
            self.send(msgs.Bye())  # the I/O thread forwards it to the daemon, then stops
            self._io.join(timeout=5)
            if self._io.is_alive():  # e.g. a HELLO unanswered holds the BYE: stop anyway,
                self._abandoned = True  # before the ring closes under the thread
                self.transport.wake()
                self._io.join(timeout=2)
        if self._io is None or not self._io.is_alive():
            self.transport.close()

    # -- the I/O thread -----------------------------------------------------------------
    def _hello_msg(self) -> msgs.Hello:
        if self._remote:  # the daemon is on another host: it gets payloads in frames
            return msgs.Hello(None, self._ring.size, os.getpid(), remote=True)
        fd = self._ring.fd if self._ring.kind == "memfd" else None
        return msgs.Hello(self._ring.name, self._ring.size, os.getpid(), fd=fd)

    def _hello(self) -> None:
        """Register again with a daemon that does not know us. Until it answers, the
        outbox is held: a save sent now would be accepted before the unanswered ones
        re-sent after WELCOME, and overtake them (two saves to one path, a stream's steps)."""
        if not self._remote and not self._ring.exists():
            self._ring.move()  # the daemon took us for dead and unlinked the ring
            log.warning(
                "matspool: the daemon had dropped this client and removed its ring; "
                "registered again with ring %s",
                self._ring.name,
            )
        self._hello_pending = True
        self._hello_at = time.monotonic()
        self.transport.send(msgs.encode(self._hello_msg()))

    def _on_message(self, msg: msgs.Reply) -> None:
        if type(msg) is msgs.Done:  # first: nearly every message is one
            self._table.answer_done(msg.answers)
        elif isinstance(msg, msgs.Welcome):
            if self.instance is not None and msg.instance != self.instance:
                self._instance_gone(self.instance)
            again = self._hello_pending or self.instance is not None
            self.instance, self._hello_pending = msg.instance, False
            self.daemon_pid = msg.pid
            self.binary = _wirebin.FEATURE in msg.version.split() and not self._json_only
            self._welcome.set()
            if again:
                self._resend()
        elif isinstance(msg, msgs.Pong):
            if self.instance is None and not self._hello_pending:
                if time.monotonic() - self._hello_at > max(5.0, 3 * self._heartbeat):
                    # a daemon answers but never welcomed us: our HELLO went to one that died
                    # before answering it (a job's daemon, started again on this endpoint)
                    self._hello_at = time.monotonic()
                    self.transport.send(msgs.encode(self._hello_msg()))
            elif self.instance is not None and msg.instance != self.instance and not self._hello_pending:
                self._hello()  # a new daemon on the same endpoint: register again
        elif isinstance(msg, msgs.PartDone):
            self._table.answer(msg.seq, part=msg.offset)
        elif isinstance(msg, msgs.Err):
            self._on_error(msg)
        elif isinstance(msg, LaidOut):  # a sharded save's file is laid out (_shard)
            self._table.answer(msg.seq, result=lambda save: msg.result(save.format))
        else:
            log.warning("matspool: ignoring a %s message from the daemon", msg.OP)

    def _on_error(self, msg: msgs.Err) -> None:
        if msg.code == UnknownClient.code:  # the daemon forgot us: the save is re-sent after HELLO
            if not self._hello_pending:
                self._hello()
            return
        if (
            msg.code == ProtocolError.code
            and msg.seq < 0
            and (self.binary or (self._json_only and self._hello_pending))
        ):
            # binary WRITEs (queued across a reconnect) reached a daemon that reads JSON only,
            # an older one in our daemon's place: JSON from now on, and after its WELCOME
            # the unanswered saves go again in that form
            self.binary, self._json_only = False, True
            if not self._hello_pending:
                self._hello()
            return
        err = error_from_code(msg.code, msg.message, errno=msg.errno)
        seq = msg.seq
        if seq >= 0:
            self._table.answer(seq, error=err)
        elif self._hello_pending and isinstance(err, RingError) and not self._ring.exists():
            self._hello()  # our ring went between our check and the daemon's open
        elif (
            isinstance(err, RingError)
            and self._ring.kind == "memfd"
            and err.errno in _UNREACHABLE
            and (self.instance is None or self._hello_pending)
        ):
            # this daemon cannot open /proc/<pid>/fd (another user, another pid namespace,
            # an older daemon): a ring in /dev/shm, which it reads without mapping
            log.warning(
                "matspool: the daemon at %s cannot reach a memfd ring (%s); using %s",
                self.endpoint,
                err,
                "/dev/shm",
            )
            self._ring.move(kind="shm")
            self._hello()
        else:  # about the connection itself (e.g. the ring could not be mapped)
            self.broken = err
            self._table.fail_unresolved(failing(type(err), str(err)))

    def _instance_gone(self, instance: str) -> None:
        """Another daemon instance answered: ``instance`` is dead and reads nothing more.
        Its failed saves free their regions; its open whole saves are sent again."""
        for save in self._table.handed_to(instance):
            if save.pieces and not save.future.done():  # its slabs went to the dead one
                self._table.fail(
                    save.seq,
                    DaemonUnavailable("the daemon restarted during a save in pieces; nothing was written"),
                )
            if save.future.done():
                self._table.forget(save)
            else:
                save.outstanding = 1

    def _resend(self) -> None:
        """Send again every whole save the daemon accepted but never answered; their
        bytes are still in the ring (a region is released only on an answer). A file
        the daemon had already renamed into place is replaced by an identical one."""
        again = [s for s in self._table.handed_to(None) if s.wire is not None and not s.pieces]
        for save in again:
            save.instance = self.instance
            if not self.binary:  # encoded for a daemon that read binary WRITEs, replaced since
                save.wire = _wirebin.as_json(save.wire)  # type: ignore[arg-type]
            self.transport.send(save.wire)  # type: ignore[arg-type]
        if again:
            log.warning("matspool: (re)connected to the daemon; re-sent %d unanswered saves", len(again))

    def _forward(self) -> bool:
        """Pass the outbox's messages to the daemon; False on BYE."""
        if not self._outbox:  # (read without the lock: one queued meanwhile wakes the next turn)
            return True
        with self._outbox_lock:
            items = list(self._outbox)
            self._outbox.clear()
        batch: list[bytes] = []  # bodies of local WRITEs that go together as one BATCH
        size = 0
        for op, seq, frames, lease in items:
            if op == "END" and self._table.failed(seq):
                frames = msgs.encode(msgs.End(seq, True))
            elif op == "WRITE" and not self.binary:  # queued before this daemon's WELCOME
                frames = _wirebin.as_json(frames)
            if op in ("WRITE", "PART", "END") and not self._table.sent(seq, op, frames, self.instance, lease):
                continue
            if op == "WRITE" and len(frames) == 2:  # no payload frames to keep apart
                if size + len(frames[1]) > _BATCH_BYTES or len(batch) >= proto.MAX_BATCH:
                    self._send_batch(batch)
                    batch, size = [], 0
                batch.append(frames[1])
                size += len(frames[1])
                continue
            self._send_batch(batch)
            batch, size = [], 0
            self.transport.send(frames)
            if op == "BYE":
                return False
        self._send_batch(batch)
        return True

    def _send_batch(self, bodies: list[bytes]) -> None:
        """Saves queued together reach the daemon as one message: one receive there, not
        one per save, which is most of a small file's cost in the daemon's control loop."""
        if len(bodies) == 1:
            self.transport.send([proto.TAG, bodies[0]])
        elif bodies:
            self.transport.send([proto.TAG, msgs.Batch.join(bodies)])

    def _loop(self) -> None:
        last_rx = last_ping = last_turn = last_exit = time.monotonic()
        silence_limit = max(self._timeout if self._timeout else 60.0, 3 * self._heartbeat)
        try:
            while not self._abandoned:
                with self._outbox_lock:  # a message queued after this wakes us (send)
                    # (the outbox waits while a HELLO is unanswered: the WELCOME wakes us)
                    idle = self._idle = not self._outbox or self._hello_pending
                got = self.transport.poll(self._heartbeat if idle else 0)
                self._idle = False
                now = time.monotonic()
                if now - last_turn > 2 * self._heartbeat + 1.0:
                    last_rx = now  # this process was stopped: the daemon's silence is ours
                last_turn = now
                if got:
                    last_rx = now
                for frames in got:
                    try:
                        self._on_message(msgs.decode_reply(frames))
                    except Exception as e:  # noqa: BLE001 - e.g. a DONE whose seq is a list: this thread
                        # must live on, or every pending future would hang forever
                        log.warning("matspool: bad message from the daemon: %r", e)
                if self.transport.reconnected():
                    self._resend()  # answers in flight may have been lost
                if not self._hello_pending:
                    if not self._forward():
                        return
                elif now - self._hello_at > max(5.0, 3 * self._heartbeat):
                    self._hello()  # unanswered (lost across a reconnect): say it again
                if now - last_ping >= self._heartbeat:
                    self.transport.send(msgs.encode(msgs.Ping()))
                    last_ping = now
                    self._release_if_dead()
                if (
                    self._daemon_exit is not None
                    and now - last_exit >= _EXIT_CHECK_S
                    and (rc := self._daemon_exit()) is not None
                ):
                    self.broken = DaemonUnavailable(
                        f"the embedded daemon {exit_text(rc)}; saves not yet written fail"
                    )
                    self._table.fail_unresolved(failing(DaemonUnavailable, str(self.broken)), keep=False)
                    return
                if now - last_exit >= _EXIT_CHECK_S:
                    last_exit = now
                if idle and not got and now - last_rx > self._heartbeat / 2 and not self._table.unresolved():
                    # silence while no save waits is nobody's timeout: without this, a save
                    # made after an idle outage (a stopped or restarted daemon) failed in the
                    # turn it woke; now it waits its timeout (less at most one heartbeat).
                    # Only on a turn that found nothing to send: at most one count a heartbeat
                    last_rx = now
                elif now - last_rx > silence_limit and self._table.unresolved():
                    dead = self._daemon_dead()
                    outcome = (
                        "it is gone"
                        if dead
                        else "the outcome of this save is unknown: "
                        "the file may still appear, whole, if the daemon resumes"
                    )
                    silent = (
                        f"no word from the daemon at {self.endpoint} for {now - last_rx:.1f} s; {outcome}"
                    )
                    self._table.fail_unresolved(failing(DaemonUnavailable, silent), keep=not dead)
                    last_rx = now
        except (RingError, DaemonUnavailable) as e:  # the ring could not be moved, or the
            self.broken = e  # transport saw its handshake refused: nothing more can be sent
            self._table.fail_unresolved(failing(type(e), str(e)), keep=False)

    def _daemon_dead(self) -> bool:
        """Known dead: a local daemon whose pid is gone (a remote one is never known so)."""
        pid = self.daemon_pid
        return pid is not None and not self._remote and not pid_alive(pid)

    def _release_if_dead(self) -> None:
        """Regions of failed saves held by a daemon whose pid is gone go back."""
        if not self._table.held_by_silence() or not self._daemon_dead():
            return
        for save in self._table.handed_to(None):
            if save.future.done():
                self._table.forget(save)
