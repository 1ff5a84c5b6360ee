"""What a finished job becomes: the daemon's counters, its client's books, its answer.

Why one place: every job ends here, whether a writer thread ran it (``drain``) or the
loop wrote it inline (``settle``), and a save's answer is remembered (``Client.remember``)
so that the same WRITE sent again after a reconnect is answered again, not written twice
(``seen``). A client's DONEs are gathered and go out together (``send_done``: one message
per client, ``replies.done_frames``).

Threads: an ``Outcomes`` belongs to the thread that runs ``Daemon.serve``; its counters
reach other threads only through ``Daemon.snapshot``.
"""

from __future__ import annotations

import logging

from matspool import _messages as msgs

from .replies import Sender, done_frames, error_msg
from .scheduler import Result, Scheduler
from .sessions import Client, Clients
from .sharded import ShardJob

__all__ = ["Outcomes"]

log = logging.getLogger("matspoold")


class Outcomes:
    """The daemon's counters and the DONEs not yet sent; answers go through ``guard``
    (the ROUTER's guard, made by ``Daemon.serve``)."""

    def __init__(self, clients: Clients) -> None:
        self.files_written = 0
        self.bytes_written = 0
        self.errors = 0
        self._clients = clients
        self._done: dict[bytes, list[tuple[int, int]]] = {}  # DONEs not yet sent, by client

    def seen(self, guard: Sender, client: Client, seq: object) -> bool:
        """A WRITE sent again (after a reconnect): still being written, its answer is on the
        way; written already, it is answered again, not written twice."""
        if not isinstance(seq, int):
            return False
        if seq in client.answered:
            guard.send_multipart([client.ident, *msgs.encode(client.answer(seq))])
            return True
        return seq in client.active

    def drain(self, guard: Sender, scheduler: Scheduler) -> None:
        """Answer the writers' finished jobs; a client's DONEs go out together."""
        while (result := scheduler.next_result()) is not None:
            self.settle(guard, result, result.job.ring_bytes)
        self.send_done(guard)

    def send_done(self, guard: Sender) -> None:
        """The DONEs gathered since the last call, one message per client (``replies``)."""
        if not self._done:
            return
        done, self._done = self._done, {}
        for ident, answers in done.items():
            for frames in done_frames(answers):
                guard.send_multipart([ident, *frames])

    def settle(self, guard: Sender, result: Result, ring_bytes: int) -> None:
        """Answer one finished job (a DONE waits in ``_done`` for ``send_done``);
        ``ring_bytes``: what it added to its client's ``payload_inflight``."""
        send = guard.send_multipart
        done = self._done
        job, nbytes, error = result
        req, client = job.request, job.client
        client.payload_inflight -= ring_bytes
        if isinstance(job, ShardJob):  # LAID_OUT, DONE or ERR, never counted as a file
            if error is not None:
                log.warning("sharded save's %s of %s failed: %s", job.op_name, job.op_path, error)
                self.errors += 1
            send(
                [
                    client.ident,
                    *msgs.encode(job.reply(nbytes) if error is None else error_msg(req.seq, error)),
                ]
            )
        elif job.kind == "part" and error is None:  # its ring space is free again
            assert job.part is not None
            send([client.ident, *msgs.encode(msgs.PartDone(req.seq, job.part.offset))])
        elif job.kind == "begin" and error is None:  # laid out: the small variables' ring
            send([client.ident, *msgs.encode(msgs.PartDone(req.seq, None))])  # space is free
        elif error is None:
            self.files_written += 1
            self.bytes_written += nbytes or 0
            client.files += 1
            client.bytes_written += nbytes or 0
            done.setdefault(client.ident, []).append((req.seq, nbytes or 0))
            client.remember(req.seq, nbytes or 0)
        else:
            log.warning("save %d to %s failed: %s", req.seq, req.path, error)
            self.errors += 1
            client.errors += 1
            reply = error_msg(req.seq, error)
            guard.send_multipart([client.ident, *msgs.encode(reply)])
            client.remember(req.seq, reply)
        if job.kind == "end":
            client.begun.pop(req.seq, None)
        client.inflight -= 1
        self._clients.settled(client)
