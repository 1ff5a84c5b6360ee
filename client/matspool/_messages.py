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

The last four carry a save sharded over ranks (``_shard``): one daemon lays the file out
under a temporary name, every rank's daemon writes its blocks in place, one publishes it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Final

import numpy as np

from . import _wirebin
from ._errors import FormatLimitError, ProtocolError
from ._matlab import STORED_DTYPES, V5_MAX_DIM, V5_MAX_VARIABLE_BYTES, check_name
from ._protocol import (
    MAX_BATCH,
    MAX_NDIM,
    MAX_VARS,
    TAG,
    Part,
    WriteRequest,
    decode_head,
    parse_part,
    parse_write,
)
from ._saves import SaveResult

__all__ = [
    "CLIENT_OPS",
    "DAEMON_OPS",
    "MAX_RING_BYTES",
    "SHARD_TMP_SUFFIX",
    "Batch",
    "Bye",
    "ClientStatus",
    "Discard",
    "Done",
    "End",
    "Err",
    "Hello",
    "LaidOut",
    "Layout",
    "LayoutResult",
    "Message",
    "PartDone",
    "Ping",
    "Place",
    "Pong",
    "Publish",
    "Reply",
    "Request",
    "ShardVar",
    "StatusQuery",
    "StatusReply",
    "Welcome",
    "decode_reply",
    "encode",
    "parse_request",
    "wire_fields",
]

#: a sharded save's temporary file ends so (the daemon's ``writers._files.TMP_SUFFIX``)
SHARD_TMP_SUFFIX: Final = ".matspool-tmp"
MAX_SHARD_DIM: Final = 1 << 48
MAX_SHARD_BYTES: Final = 1 << 62

MAX_RING_BYTES: Final = 1 << 46  # 64 TiB: a HELLO claiming more is a lie
_MAX_TEXT: Final = 4096
_I64: Final = 2**63 - 1


def _int(raw: dict[str, Any], key: str, lo: int = 0, hi: int = _I64) -> int:
    value = raw.get(key)
    if type(value) is not int or not lo <= value <= hi:
        raise ProtocolError(f"{raw.get('op')}: {key} must be an integer in [{lo}, {hi}], got {value!r}"[:300])
    return value


def _opt_int(raw: dict[str, Any], key: str, lo: int = 0, hi: int = _I64) -> int | None:
    return None if raw.get(key) is None else _int(raw, key, lo, hi)


def _text(raw: dict[str, Any], key: str, limit: int = _MAX_TEXT) -> str:
    value = raw.get(key)
    if not isinstance(value, str) or len(value) > limit:
        raise ProtocolError(f"{raw.get('op')}: {key} must be a string of at most {limit} characters")
    return value


def _float(raw: dict[str, Any], key: str) -> float:
    value = raw.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProtocolError(f"{raw.get('op')}: {key} must be a number, got {value!r}"[:300])
    return float(value)


def _flag(raw: dict[str, Any], key: str) -> bool:
    value = raw.get(key, False)
    if not isinstance(value, bool):
        raise ProtocolError(f"{raw.get('op')}: {key} must be true or false")
    return value


class _Plain:
    """A message whose wire form is its fields, as they are."""

    __slots__ = ()
    OP: ClassVar[str]

    def to_wire(self) -> dict[str, Any]:
        return {"op": self.OP, **{f.name: getattr(self, f.name) for f in fields(self)}}  # type: ignore[arg-type]


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


# -- a save sharded over ranks (client -> daemon) ------------------------------------------
def _path(raw: dict[str, Any]) -> str:
    path = raw.get("path")
    if not isinstance(path, str) or not path or "\x00" in path or len(path) > 4096:
        raise ProtocolError(
            f"{raw.get('op')}: path must be a non-empty string without NUL, at most 4096 characters"
        )
    return path


def _tmp(raw: dict[str, Any]) -> str:
    """A temporary's name: one name in the final file's directory, a matspool temporary."""
    tmp = raw.get("tmp")
    if (
        not isinstance(tmp, str)
        or not 1 <= len(tmp) <= 255
        or "/" in tmp
        or "\x00" in tmp
        or not tmp.startswith(".")
        or not tmp.endswith(SHARD_TMP_SUFFIX)
    ):
        raise ProtocolError(
            f"{raw.get('op')}: tmp must be a matspool temporary's name (.*{SHARD_TMP_SUFFIX}, "
            "no '/', at most 255 characters)"
        )
    return tmp


def _dims(raw: dict[str, Any], key: str, lo: int = 0) -> tuple[int, ...]:
    value = raw.get(key)
    if (
        not isinstance(value, list)
        or not 2 <= len(value) <= MAX_NDIM
        or not all(type(d) is int and lo <= d <= MAX_SHARD_DIM for d in value)
    ):
        raise ProtocolError(
            f"{raw.get('op')}: {key} must be a list of 2 to {MAX_NDIM} integers in [{lo}, {MAX_SHARD_DIM}]"
        )
    return tuple(value)


def _dtype(raw: dict[str, Any]) -> str:
    dtype = raw.get("dtype")
    if dtype not in STORED_DTYPES:
        raise ProtocolError(
            f"{raw.get('op')}: dtype must be one of {sorted(STORED_DTYPES)}, got {dtype!r}"[:300]
        )
    assert isinstance(dtype, str)
    return dtype


def _nbytes(dtype: str, dims: tuple[int, ...], op: str) -> int:
    n = int(np.dtype(dtype).itemsize)
    for d in dims:
        n *= d
    if n > MAX_SHARD_BYTES:
        raise ProtocolError(f"{op}: a variable of {dims} {dtype} exceeds {MAX_SHARD_BYTES} bytes")
    return n


@dataclass(frozen=True, slots=True)
class ShardVar:
    """One global variable of a sharded save: name, ring dtype, MATLAB size."""

    name: str
    dtype: str
    dims: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return _nbytes(self.dtype, self.dims, "LAYOUT")

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "dims": list(self.dims)}

    @classmethod
    def from_wire(cls, raw: object) -> ShardVar:
        if not isinstance(raw, dict):
            raise ProtocolError("LAYOUT: each variable must be an object")
        name = raw.get("name")
        try:
            check_name(name)
        except ValueError as e:
            raise ProtocolError(f"LAYOUT: {e}") from None
        assert isinstance(name, str)
        raw = {**raw, "op": "LAYOUT"}
        var = cls(name, _dtype(raw), _dims(raw, "dims"))
        _ = var.nbytes  # bounded
        return var


@dataclass(frozen=True, slots=True)
class Layout:
    """Lay a sharded save's file out under a temporary name beside ``path``: contiguous
    datasets of the global sizes, allocated and never filled; answered by LAID_OUT."""

    OP: ClassVar[str] = "LAYOUT"
    seq: int
    path: str
    format: str
    vars: tuple[ShardVar, ...]

    def to_wire(self) -> dict[str, Any]:
        return {
            "op": self.OP,
            "seq": self.seq,
            "path": self.path,
            "format": self.format,
            "vars": [v.to_wire() for v in self.vars],
        }

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> Layout:
        fmt = raw.get("format")
        if fmt not in ("v5", "v7.3"):
            raise ProtocolError(f"LAYOUT: format must be 'v5' or 'v7.3', got {fmt!r}"[:300])
        vars_ = raw.get("vars")
        if not isinstance(vars_, list) or not 1 <= len(vars_) <= MAX_VARS:
            raise ProtocolError(f"LAYOUT: vars must be a list of 1 to {MAX_VARS} variables")
        parsed = tuple(ShardVar.from_wire(v) for v in vars_)
        if len({v.name for v in parsed}) != len(parsed):
            raise ProtocolError("LAYOUT: variable names repeat")
        if fmt == "v5":
            for v in parsed:
                if v.nbytes > V5_MAX_VARIABLE_BYTES or max(v.dims) > V5_MAX_DIM:
                    raise FormatLimitError(
                        f"LAYOUT: variable {v.name!r} of size {list(v.dims)} exceeds MAT v5's limits"
                    )
        return cls(_int(raw, "seq"), _path(raw), fmt, parsed)


@dataclass(frozen=True, slots=True)
class Place:
    """Write the block at ``ring_offset`` (column-major, ``box_shape``) into the laid-out
    temporary ``tmp`` beside ``path``: the variable whose bytes start at ``data_offset``
    has MATLAB size ``dims``; the block's first element is at ``box_offset`` in it."""

    OP: ClassVar[str] = "PLACE"
    seq: int
    path: str
    tmp: str
    data_offset: int
    dtype: str
    dims: tuple[int, ...]
    box_offset: tuple[int, ...]
    box_shape: tuple[int, ...]
    ring_offset: int
    fsync: bool = False  # the writer fsyncs its blocks before it answers
    imag_offset: int | None = None  # v5 complex: the imaginary parts' data offset

    @property
    def nbytes(self) -> int:
        return _nbytes(self.dtype, self.box_shape, "PLACE")

    def to_wire(self) -> dict[str, Any]:
        return {
            "op": self.OP,
            "seq": self.seq,
            "path": self.path,
            "tmp": self.tmp,
            "data_offset": self.data_offset,
            "dtype": self.dtype,
            "dims": list(self.dims),
            "box_offset": list(self.box_offset),
            "box_shape": list(self.box_shape),
            "ring_offset": self.ring_offset,
            "fsync": self.fsync,
            "imag_offset": self.imag_offset,
        }

    @classmethod
    def from_wire(cls, raw: dict[str, Any], ring_bytes: int) -> Place:
        dims = _dims(raw, "dims")
        box_offset, box_shape = _dims(raw, "box_offset"), _dims(raw, "box_shape", 1)
        if not len(dims) == len(box_offset) == len(box_shape) or any(
            o + n > d for o, n, d in zip(box_offset, box_shape, dims, strict=True)
        ):
            raise ProtocolError(
                f"PLACE: a block at {list(box_offset)} of size {list(box_shape)} does not fit in {list(dims)}"
            )
        dtype = _dtype(raw)
        _nbytes(dtype, dims, "PLACE")
        place = cls(
            _int(raw, "seq"),
            _path(raw),
            _tmp(raw),
            _int(raw, "data_offset", 0, MAX_SHARD_BYTES),
            dtype,
            dims,
            box_offset,
            box_shape,
            _int(raw, "ring_offset", 0, ring_bytes),
            _flag(raw, "fsync"),
            _opt_int(raw, "imag_offset", 0, MAX_SHARD_BYTES),
        )
        if place.imag_offset is not None and not dtype.startswith("<c"):
            raise ProtocolError(f"PLACE: imag_offset comes only with a complex dtype, not {dtype}")
        if place.nbytes > ring_bytes - place.ring_offset:
            raise ProtocolError(
                f"PLACE: {place.nbytes} bytes at ring offset {place.ring_offset} leave the ring"
            )
        return place


@dataclass(frozen=True, slots=True)
class Publish(_Plain):
    """Every block is on disk: fsync (``fsync``) and rename ``tmp`` to ``path``."""

    OP: ClassVar[str] = "PUBLISH"
    seq: int
    path: str
    tmp: str
    fsync: bool = False

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> Publish:
        return cls(_int(raw, "seq"), _path(raw), _tmp(raw), _flag(raw, "fsync"))


@dataclass(frozen=True, slots=True)
class Discard(_Plain):
    """The sharded save failed: remove ``tmp`` (gone already is fine)."""

    OP: ClassVar[str] = "DISCARD"
    seq: int
    path: str
    tmp: str

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> Discard:
        return cls(_int(raw, "seq"), _path(raw), _tmp(raw))


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
        if not isinstance(done, list) or not all(
            isinstance(a, list) and len(a) == 2 and all(type(x) is int and x >= 0 for x in a) for a in done
        ):
            raise ProtocolError("DONE: done must be a list of [seq, nbytes] pairs")
        return cls(tuple((a[0], a[1]) for a in done))


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


@dataclass(frozen=True, slots=True)
class LaidOut:
    """LAYOUT done: the temporary's name beside the final one, and each variable's data
    offset in it (a variable with no elements has none)."""

    OP: ClassVar[str] = "LAID_OUT"
    seq: int
    tmp: str
    offsets: tuple[tuple[str, tuple[int, ...]], ...]  # v5 complex: real part's, imaginary part's

    def to_wire(self) -> dict[str, Any]:
        offsets = [[name, *at] for name, at in self.offsets]
        return {"op": self.OP, "seq": self.seq, "tmp": self.tmp, "offsets": offsets}

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> LaidOut:
        offsets = raw.get("offsets")
        if (
            not isinstance(offsets, list)
            or len(offsets) > MAX_VARS
            or not all(
                isinstance(o, list)
                and len(o) in (2, 3)
                and isinstance(o[0], str)
                and len(o[0]) <= 64
                and all(type(x) is int and 0 <= x <= MAX_SHARD_BYTES for x in o[1:])
                for o in offsets
            )
        ):
            raise ProtocolError("LAID_OUT: offsets must be a list of [name, offset(, imaginary offset)]")
        return cls(_int(raw, "seq"), _tmp(raw), tuple((o[0], tuple(o[1:])) for o in offsets))

    def result(self, fmt: str) -> SaveResult:
        """As the LAYOUT's future resolves: a :class:`LayoutResult`."""
        return LayoutResult(self.tmp, 0, fmt, dict(self.offsets))


@dataclass(frozen=True, slots=True)
class LayoutResult(SaveResult):
    """A LAYOUT's outcome: ``path`` is the temporary's name, ``offsets`` by variable."""

    offsets: dict[str, tuple[int, ...]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ClientStatus:
    """One client as ``matspool status`` shows it."""

    pid: int
    ring: str
    ring_bytes: int
    queue_depth: int
    ring_bytes_in_flight: int
    files_written: int
    bytes_written: int
    errors: int
    throughput_bytes_per_s: float
    connected_s: float
    oldest_pending_s: float
    silent_s: float
    dead: bool

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> ClientStatus:
        if not isinstance(raw, dict):
            raise ProtocolError("STATUS: each client must be an object")
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.type == "int":
                values[f.name] = _int(raw, f.name, -1)
            elif f.type == "float":
                values[f.name] = _float(raw, f.name)
            elif f.type == "bool":
                values[f.name] = _flag(raw, f.name)
            else:
                values[f.name] = _text(raw, f.name)
        return cls(**values)


@dataclass(frozen=True, slots=True)
class StatusReply:
    """What the daemon is doing, for ``matspool status`` and the metrics endpoint."""

    OP: ClassVar[str] = "STATUS"
    pid: int
    instance: str
    endpoint: str
    roots: tuple[str, ...]
    uptime_s: float
    files_written: int
    bytes_written: int
    errors: int
    clients: tuple[ClientStatus, ...] = field(default=())

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"op": self.OP}
        for f in fields(self):
            wire[f.name] = getattr(self, f.name)
        wire["roots"] = list(self.roots)
        wire["clients"] = [{g.name: getattr(c, g.name) for g in fields(c)} for c in self.clients]
        return wire

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> StatusReply:
        roots, clients = raw.get("roots"), raw.get("clients")
        if not isinstance(roots, list) or not all(isinstance(r, str) for r in roots):
            raise ProtocolError("STATUS: roots must be a list of strings")
        if not isinstance(clients, list):
            raise ProtocolError("STATUS: clients must be a list")
        return cls(
            _int(raw, "pid", 0, 2**31),
            _text(raw, "instance", 64),
            _text(raw, "endpoint"),
            tuple(roots),
            _float(raw, "uptime_s"),
            _int(raw, "files_written"),
            _int(raw, "bytes_written"),
            _int(raw, "errors"),
            tuple(ClientStatus.from_wire(c) for c in clients),
        )


Request = (
    Hello | WriteRequest | Batch | Part | End | Ping | StatusQuery | Bye | Layout | Place | Publish | Discard
)
Reply = Welcome | Done | Err | PartDone | Pong | StatusReply | LaidOut
Message = Request | Reply

CLIENT_OPS: Final[dict[str, type[Any]]] = {
    c.OP: c for c in (Hello, Batch, End, Ping, StatusQuery, Bye, Layout, Place, Publish, Discard)
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


def decode_reply(frames: list[bytes]) -> Reply:
    """A daemon's message, checked: the client never reads an unchecked field."""
    if len(frames) != 2:
        raise ProtocolError(f"expected 2 frames, got {len(frames)}")
    raw = decode_head(frames[0], frames[1])
    cls = DAEMON_OPS.get(raw["op"])
    if cls is None:
        raise ProtocolError(f"unknown op {raw['op'][:40]!r} from the daemon")
    return cls.from_wire(raw)  # type: ignore[no-any-return]
