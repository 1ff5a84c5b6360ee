"""From a checked request to the job a writer thread runs: WRITE (or BEGIN), PART and END
of a save in pieces, and the ops of a save sharded over ranks.

Split out of ``server`` so the control loop reads as dispatch; these functions refuse what
the daemon cannot take (a ring no longer mapped, a piece of a save it did not begin, new
work while stopping) and record the save in its client's table (``active``, ``begun``).

Threads: the control loop's (``server``), which owns the client table they update.
"""

from __future__ import annotations

import time

from matspool import _messages as msgs
from matspool import _protocol as proto
from matspool._errors import ProtocolError, RingError, UnknownClient, WriteFailed
from matspool._msgshard import Discard, Layout, Place, Publish, StreamStep

from .jobs import Job, payload_of
from .sessions import Client
from .sharded import ShardJob
from .sharded_stream import StepJob

__all__ = ["piece_job", "shard_job", "write_job"]


def write_job(
    client: Client, request: proto.WriteRequest, payload: list[memoryview] | None = None, *, stopping: bool
) -> Job:
    """A WRITE (or the BEGIN of a save in pieces): its job, the save now in flight."""
    if client.mm is not None and client.mm.closed:
        raise RingError("the client's ring is no longer mapped")
    if stopping:
        raise WriteFailed("the daemon is shutting down and takes no new writes")
    job = Job(
        client,
        request,
        "begin" if request.mode == "begin" else "write",
        payload=payload_of(request, payload or []) if client.mm is None else None,
    )
    client.active[request.seq] = time.monotonic()
    if job.kind == "begin":
        client.begun[request.seq] = request
    return job


def shard_job(
    client: Client | None,
    msg: Layout | Place | Publish | Discard | StreamStep,
    payload: list[memoryview] | None = None,
    *,
    stopping: bool,
) -> ShardJob:
    """LAYOUT, PLACE, PUBLISH or DISCARD of a save sharded over ranks (``sharded``), or
    STEP of a sharded stream (``sharded_stream``). A remote (tcp://) client's PLACE
    brings its block as one payload frame of exactly its size."""
    if client is None:
        raise UnknownClient(f"{msg.OP} before HELLO: this daemon does not know the client")
    if stopping and not isinstance(msg, Discard):
        raise WriteFailed("the daemon is shutting down and takes no new writes")
    if isinstance(msg, StreamStep):
        return StepJob.of_step(client, msg)
    if isinstance(msg, Place) and client.mm is None:
        if not payload or len(payload) != 1 or len(payload[0]) != msg.nbytes:
            got = [len(p) for p in payload or []]
            raise ProtocolError(f"PLACE of {msg.nbytes} bytes from a remote client came with frames {got}")
        return ShardJob.of(client, msg, payload[0])
    return ShardJob.of(client, msg)


def piece_job(
    client: Client | None, msg: proto.Part | msgs.End, payload: list[memoryview] | None = None
) -> Job:
    """PART (bytes of a deferred variable) or END (the save is complete) of a begun save."""
    if client is None:
        raise UnknownClient(f"{msg.OP} before HELLO: this daemon does not know the client's ring")
    request = client.begun.get(msg.seq)
    if request is None:
        raise ProtocolError(f"{msg.OP} for save {msg.seq!r}, which this daemon did not begin")
    if isinstance(msg, proto.Part):
        part = msg
        data = None
        if client.mm is None:
            if not payload or len(payload) != 1 or len(payload[0]) != part.nbytes:
                raise ProtocolError(f"a remote PART carries one payload frame of {part.nbytes} bytes")
            data = {part.offset: payload[0]}
        return Job(client, request, "part", part, payload=data)
    else:
        return Job(client, request, "end", abort=msg.abort)
