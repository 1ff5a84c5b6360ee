"""Every control message between a client and the daemon, as a type.

The one module both sides and the tests build and read messages with: each message is a
frozen dataclass with its ``OP``, ``to_wire()`` (the JSON object sent) and ``from_wire()``
(the schema check: anything that does not fit raises :class:`ProtocolError`, so neither
side ever reads a field of an unchecked ``dict``). A save's contents (``WRITE``, ``PART``)
are checked against the sender's ring as well, in :mod:`matspool._protocol`.

On the wire a message is two ZeroMQ frames, :data:`TAG` and one UTF-8 JSON object with an
``op`` field (see ``_protocol.encode``); a remote client's WRITE or PART is followed by
its payload frames. A WRITE of plain variables and a BATCH may instead be binary
(:mod:`matspool._wirebin`), once the daemon's WELCOME ``version`` lists the feature
``binwrite`` after the tag. Stateless: any thread may use it.

client -> daemon                              daemon -> client
  HELLO  {ring, ring_bytes, pid, remote, fd}    WELCOME   {pid, instance, version}
  WRITE  {seq, path, format, fsync, vars, ...}  DONE      {seq, nbytes} | {done: [[seq, nbytes]]}
  BATCH  {msgs: [WRITE, ...]}                   ERR       {seq, code, message, errno}
  PART   {seq, var, start, offset, nbytes}      PART_DONE {seq, offset}
  END    {seq, abort}                           PONG      {instance, pid}
  PING   {}                                     STATUS    {pid, instance, ..., clients}
  STATUS {}
  BYE    {}
  LAYOUT  {seq, path, format, vars}             LAID_OUT  {seq, tmp, offsets}
  PLACE   {seq, path, tmp, data_offset, dtype,  (LAYOUT; PLACE, PUBLISH, DISCARD: DONE/ERR)
           dims, box_offset, box_shape, ring_offset}
  PUBLISH {seq, path, tmp, fsync}
  DISCARD {seq, path, tmp}
  STEP    {seq, path, tmp, create, fsync, level}  (DONE/ERR)

The last five carry a save sharded over ranks (``_shard``): one daemon lays the file out
under a temporary name, every rank's daemon writes its blocks in place, one publishes it
(or, STEP, adds it to a sharded stream as one step: ``_shard_stream``).
Their types live in :mod:`matspool._msgshard`, STATUS's answer in :mod:`matspool._msgstatus`,
the field checks all of them share in :mod:`matspool._msgfields`; this module registers every
op in ``CLIENT_OPS``/``DAEMON_OPS``, which ``encode``, ``parse_request`` and ``decode_reply``
dispatch on.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Final

from . import _wirebin
from ._errors import ProtocolError
from ._msgfields import _flag, _int, _opt_int, _Plain, _text
from ._msgshard import Discard, LaidOut, Layout, Place, Publish, StreamStep
from ._msgstatus import ClientStatus, StatusReply
from ._protocol import (
    MAX_BATCH,
    TAG,
    Part,
    WriteRequest,
    decode_head,
    parse_part,
    parse_write,
)

__all__ = [
    "CLIENT_OPS",
    "DAEMON_OPS",
    "MAX_RING_BYTES",
    "Batch",
    "Bye",
    "ClientStatus",
    "Done",
    "End",
    "Err",
    "Hello",
    "Message",
    "PartDone",
    "Ping",
    "Pong",
    "Reply",
    "Request",
    "StatusQuery",
    "StatusReply",
    "Welcome",
    "decode_reply",
    "encode",
    "parse_request",
    "wire_fields",
]

MAX_RING_BYTES: Final = 1 << 46  # 64 TiB: a HELLO claiming more is a lie


# -- client -> daemon ---------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Hello(_Plain):
    """Register a ring (``remote``: no ring here, payloads come in frames over tcp://).

    ``fd``: a sealed ``memfd`` ring, which the daemon opens as ``/proc/<pid>/fd/<fd>``;
    absent, ``ring`` names a file in ``/dev/shm`` (see ``matspool._ring``)."""

    OP: ClassVar[str] = "HELLO"
    ring: str | None
    ring_bytes: int
    pid: int
    remote: bool = False
    fd: int | None = None

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> Hello:
        remote = _flag(raw, "remote")
        ring = raw.get("ring")
        if not remote and not isinstance(ring, str):
            raise ProtocolError("HELLO needs a ring name")
        if ring is not None and (not isinstance(ring, str) or len(ring) > 255):
            raise ProtocolError("HELLO: ring must be a name of at most 255 characters")
        return cls(
            ring,
            _int(raw, "ring_bytes", 1, MAX_RING_BYTES),
            _int(raw, "pid", 0, 2**31),
            remote,
            _opt_int(raw, "fd", 0, 2**31 - 1),
        )


@dataclass(frozen=True, slots=True)
class Batch:
    """WRITEs a client queued together, as one message; each is checked on its own, so
    one bad save fails alone."""

    OP: ClassVar[str] = "BATCH"
    msgs: tuple[dict[str, Any], ...]

    def to_wire(self) -> dict[str, Any]:
        return {"op": self.OP, "msgs": list(self.msgs)}

    @staticmethod
    def join(bodies: list[bytes]) -> bytes:
        """The wire body of a BATCH from WRITE bodies already encoded (no re-encoding):
        binary (``_wirebin``) when any of them is, else JSON."""
        if any(b[:1] == _wirebin.BINARY for b in bodies):
            return _wirebin.join_batch(bodies)
        return b'{"op":"BATCH","msgs":[' + b",".join(bodies) + b"]}"

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> Batch:
        msgs = raw.get("msgs")
        if (
            not isinstance(msgs, list)
            or not 1 <= len(msgs) <= MAX_BATCH
            or not all(isinstance(m, dict) and m.get("op") == "WRITE" for m in msgs)
        ):
            raise ProtocolError(f"BATCH must hold a list 'msgs' of 1 to {MAX_BATCH} WRITE messages")
        return cls(tuple(msgs))


@dataclass(frozen=True, slots=True)
class End(_Plain):
    """The last message of a save in pieces; ``abort`` throws the save away."""

    OP: ClassVar[str] = "END"
    seq: int
    abort: bool = False

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> End:
        return cls(_int(raw, "seq"), _flag(raw, "abort"))


@dataclass(frozen=True, slots=True)
class Ping(_Plain):
    OP: ClassVar[str] = "PING"

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> Ping:
        return cls()


@dataclass(frozen=True, slots=True)
class StatusQuery(_Plain):
    OP: ClassVar[str] = "STATUS"

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> StatusQuery:
        return cls()


@dataclass(frozen=True, slots=True)
class Bye(_Plain):
    """The client closes: its ring goes once its saves in flight are answered."""

    OP: ClassVar[str] = "BYE"

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> Bye:
        return cls()


# -- daemon -> client ---------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Welcome(_Plain):
    """HELLO accepted. ``instance`` tells this daemon from an earlier one on the endpoint."""

    OP: ClassVar[str] = "WELCOME"
    pid: int
    instance: str
    version: str

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> Welcome:
        return cls(_int(raw, "pid", 0, 2**31), _text(raw, "instance", 64), _text(raw, "version", 64))


@dataclass(frozen=True, slots=True)
class Pong(_Plain):
    """The answer to PING: which daemon instance (and process) is on the endpoint."""

    OP: ClassVar[str] = "PONG"
    instance: str | None = None
    pid: int | None = None

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> Pong:
        return cls(
            None if raw.get("instance") is None else _text(raw, "instance", 64),
            _opt_int(raw, "pid", 0, 2**31),
        )


@dataclass(frozen=True, slots=True)
class Done:
    """Saves complete under their final names: ``(seq, file size)`` each. One answer goes
    as ``{seq, nbytes}``, several as one list, so a burst of small files costs one message."""

    OP: ClassVar[str] = "DONE"
    answers: tuple[tuple[int, int], ...]

    def to_wire(self) -> dict[str, Any]:
        if len(self.answers) == 1:
            seq, nbytes = self.answers[0]
            return {"op": self.OP, "seq": seq, "nbytes": nbytes}
        return {"op": self.OP, "done": [list(a) for a in self.answers]}

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> Done:
        if "done" not in raw:
            return cls(((_int(raw, "seq"), _int(raw, "nbytes")),))
        done = raw["done"]
        if not isinstance(done, list):
            raise ProtocolError("DONE: done must be a list of [seq, nbytes] pairs")
        answers = []
        for a in done:  # a loop, not nested all()s: a burst's DONE lists ~50 pairs
            if not (
                isinstance(a, list)
                and len(a) == 2
                and type(a[0]) is int
                and type(a[1]) is int
                and a[0] >= 0
                and a[1] >= 0
            ):
                raise ProtocolError("DONE: done must be a list of [seq, nbytes] pairs")
            answers.append((a[0], a[1]))
        return cls(tuple(answers))


@dataclass(frozen=True, slots=True)
class Err(_Plain):
    """A save (``seq`` >= 0) or the connection itself (``seq`` -1) failed; ``code`` names
    the error class (``_errors.ERROR_CODES``), ``errno`` the OS error where there was one."""

    OP: ClassVar[str] = "ERR"
    seq: int
    code: str
    message: str
    errno: int | None = None

    def to_wire(self) -> dict[str, Any]:
        wire = {"op": self.OP, "seq": self.seq, "code": self.code, "message": self.message}
        if self.errno is not None:
            wire["errno"] = self.errno
        return wire

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> Err:
        return cls(
            _int(raw, "seq", -1),
            _text(raw, "code", 64),
            _text(raw, "message", 1 << 16),
            _opt_int(raw, "errno", 0, 4096),
        )


@dataclass(frozen=True, slots=True)
class PartDone(_Plain):
    """A piece of a save in pieces is written (``offset`` None: the laid-out save's small
    variables): its ring space may be reused while the rest is still arriving."""

    OP: ClassVar[str] = "PART_DONE"
    seq: int
    offset: int | None

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> PartDone:
        return cls(_int(raw, "seq"), _opt_int(raw, "offset"))


Request = (
    Hello
    | WriteRequest
    | Batch
    | Part
    | End
    | Ping
    | StatusQuery
    | Bye
    | Layout
    | Place
    | Publish
    | Discard
    | StreamStep
)
Reply = Welcome | Done | Err | PartDone | Pong | StatusReply | LaidOut
Message = Request | Reply

CLIENT_OPS: Final[dict[str, type[Any]]] = {
    c.OP: c for c in (Hello, Batch, End, Ping, StatusQuery, Bye, Layout, Place, Publish, Discard, StreamStep)
} | {
    "WRITE": WriteRequest,
    "PART": Part,
}
DAEMON_OPS: Final[dict[str, type[Any]]] = {
    c.OP: c for c in (Welcome, Done, Err, PartDone, Pong, StatusReply, LaidOut)
}


def wire_fields(op: str, *, from_client: bool) -> tuple[str, ...]:
    """The JSON fields of ``op`` besides ``op`` itself (for docs/daemon.md's table and its test)."""
    cls = (CLIENT_OPS if from_client else DAEMON_OPS)[op]
    if cls is WriteRequest:
        return ("seq", "path", "format", "fsync", "compress", "mode", "vars")
    if cls is Done:
        return ("seq", "nbytes", "done")
    return tuple(f.name for f in fields(cls))


def encode(msg: Message, *, binary: bool = False) -> list[bytes]:
    """The frames of a message (tag, body): JSON, or with ``binary`` (the daemon's WELCOME
    listed ``_wirebin.FEATURE``) for a WRITE of plain variables the binary form of
    :mod:`matspool._wirebin` (the small-save hot path, issue 14)."""
    if binary and type(msg) is WriteRequest and (body := _wirebin.encode_write(msg)) is not None:
        return [TAG, body]
    return [TAG, json.dumps(msg.to_wire(), separators=(",", ":")).encode()]


def parse_request(raw: dict[str, Any], ring_bytes: int | None) -> Request:
    """A client's message, checked; WRITE and PART against a ring of ``ring_bytes``
    (None: the sender has not registered one, which only HELLO, PING, STATUS, BYE allow)."""
    op = raw["op"]
    cls = CLIENT_OPS.get(op)
    if cls is None:
        raise ProtocolError(f"unknown op {op[:40]!r}")
    if cls in (WriteRequest, Part, Place):
        if ring_bytes is None:
            from ._errors import UnknownClient

            raise UnknownClient(f"{op} before HELLO: this daemon does not know the client's ring")
        if cls is Place:
            return Place.from_wire(raw, ring_bytes)
        return parse_write(raw, ring_bytes) if cls is WriteRequest else parse_part(raw, ring_bytes)
    return cls.from_wire(raw)  # type: ignore[no-any-return]


#: the DONE of one save, as the daemon spells it (``matspoold.replies.done_frames``): read
#: without JSON, since it lies between a waited-for save's file and its caller's wake-up.
#: At most 18 digits (below 2**63, ``_int``'s bound) and no leading zero (not JSON);
#: any other spelling goes through ``decode_head``, which checks it as before
_N: Final = rb"(0|[1-9][0-9]{0,17})"
_ONE_DONE: Final = re.compile(rb'\{"op":"DONE","seq":' + _N + rb',"nbytes":' + _N + rb"\}").fullmatch


def decode_reply(frames: list[bytes]) -> Reply:
    """A daemon's message, checked: the client never reads an unchecked field."""
    if len(frames) != 2:
        raise ProtocolError(f"expected 2 frames, got {len(frames)}")
    if frames[0] == TAG and (one := _ONE_DONE(frames[1])) is not None:
        return Done(((int(one[1]), int(one[2])),))
    raw = decode_head(frames[0], frames[1])
    cls = DAEMON_OPS.get(raw["op"])
    if cls is None:
        raise ProtocolError(f"unknown op {raw['op'][:40]!r} from the daemon")
    return cls.from_wire(raw)  # type: ignore[no-any-return]
