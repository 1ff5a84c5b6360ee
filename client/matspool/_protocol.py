"""The frames of the control protocol, and the two messages that carry a save: WRITE
and PART.

Every message is two ZeroMQ frames: the protocol tag :data:`TAG` and one UTF-8 JSON
object with an ``op`` field. JSON keeps the wire free of pickle and readable in a
capture; payload bytes never travel here, only offsets into the client's ring (a remote
client's WRITE or PART is followed by payload frames). The other messages are typed in
``_messages``; the variables a WRITE names, in ``_specs``.

``parse_write`` is the schema check the daemon runs on every WRITE before it touches a
ring or a path: anything that does not fit raises :class:`ProtocolError` (or the more
specific error the field calls for).

Threads: none of its own; immutable values and pure functions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, ClassVar, Final

from . import _wirebin
from ._errors import ProtocolError

# the specs of a save's variables, re-exported: every module reads them as ``proto.X``
from ._specs import (
    MAX_DEFERRED_BYTES,
    MAX_NDIM,
    MAX_TREE_DEPTH,
    MAX_TREE_NODES,
    Cell,
    Char,
    Sparse,
    Struct,
    StructArray,
    Tree,
    TreeSpec,
    Variable,
    VarSpec,
    check_stream_step,
    check_v5_limits,
    leaves,
    parse_var,
    wire_int,
)

__all__ = [
    "FORMATS",
    "MAX_BATCH",
    "MAX_DEFERRED_BYTES",
    "MAX_MESSAGE_BYTES",
    "MAX_NDIM",
    "MAX_TREE_DEPTH",
    "MAX_TREE_NODES",
    "MAX_VARS",
    "MODES",
    "TAG",
    "Cell",
    "Char",
    "Part",
    "Sparse",
    "Struct",
    "StructArray",
    "Tree",
    "TreeSpec",
    "VarSpec",
    "Variable",
    "WriteRequest",
    "check_stream_step",
    "check_v5_limits",
    "decode",
    "decode_head",
    "encode",
    "leaves",
    "parse_part",
    "parse_write",
]

TAG: Final = b"matspool/1"
MODES: Final = ("write", "create", "append", "begin")
FORMATS: Final = ("v5", "v7.3")
MAX_MESSAGE_BYTES: Final = 1 << 20
MAX_VARS: Final = 4096


@dataclass(frozen=True, slots=True)
class WriteRequest:
    OP: ClassVar[str] = "WRITE"
    seq: int
    path: str
    format: str
    fsync: bool
    vars: tuple[Variable, ...]
    compress: int = 0  # deflate level, 0 = off
    mode: str = "write"  # or a stream's first step ("create") and the steps after ("append")
    append: bool = False  # MATLAB's save -append: into an existing file, which keeps its format

    def to_wire(self) -> dict[str, Any]:
        wire = {
            "op": "WRITE",
            "seq": self.seq,
            "path": self.path,
            "format": self.format,
            "fsync": self.fsync,
            "compress": self.compress,
            "mode": self.mode,
            "vars": [v.to_wire() for v in self.vars],
        }
        if self.append:
            wire["append"] = True
        return wire


def encode(msg: dict[str, Any]) -> list[bytes]:
    return [TAG, json.dumps(msg, separators=(",", ":")).encode()]


def decode(frames: list[bytes]) -> dict[str, Any]:
    """Parse a message's frames; raise :class:`ProtocolError` on anything malformed."""
    if len(frames) != 2:
        raise ProtocolError(f"expected 2 frames, got {len(frames)}")
    return decode_head(frames[0], frames[1])


def decode_head(tag: bytes, body: bytes) -> dict[str, Any]:
    """The tag and JSON frames of a message; a remote client's WRITE or PART is followed by
    payload frames, one per array in the ring's order (see the daemon)."""
    if tag != TAG:
        raise ProtocolError(f"unknown protocol tag {bytes(tag[:32])!r}; this daemon speaks {TAG!r}")
    if len(body) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(body)} bytes exceeds {MAX_MESSAGE_BYTES}")
    if body[:1] == _wirebin.BINARY:  # a WRITE or BATCH in the binary form (_wirebin)
        return _wirebin.decode(body)
    try:
        msg = json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # RecursionError: [[[[...
        raise ProtocolError(f"message is not JSON: {e}") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("op"), str):
        raise ProtocolError("message must be a JSON object with a string 'op'")
    return msg


MAX_BATCH: Final = 4096


def parse_write(msg: dict[str, Any], ring_bytes: int) -> WriteRequest:
    """Validate a WRITE message against a ring of ``ring_bytes``; every range stays inside it."""
    seq = wire_int(msg.get("seq"), "seq")
    path = msg.get("path")
    if not isinstance(path, str) or not path or "\x00" in path or len(path) > 4096:
        raise ProtocolError("path must be a non-empty string without NUL, at most 4096 characters")
    fmt = msg.get("format")
    if fmt not in FORMATS:
        raise ProtocolError(f"format must be one of {FORMATS}, got {fmt!r}")
    fsync = msg.get("fsync")
    if not isinstance(fsync, bool):
        raise ProtocolError("fsync must be true or false")
    compress = wire_int(msg.get("compress", 0), "compress", 0, 9)
    mode = msg.get("mode", "write")
    if mode not in MODES:
        raise ProtocolError(f"mode must be one of {MODES}, got {mode!r}")
    raw_vars = msg.get("vars")
    if not isinstance(raw_vars, list) or not 1 <= len(raw_vars) <= MAX_VARS:
        raise ProtocolError(f"vars must be a list of 1 to {MAX_VARS} variables")
    vars_ = tuple(parse_var(v, ring_bytes) for v in raw_vars)
    names = [v.name for v in vars_]
    if len(set(names)) != len(names):
        raise ProtocolError("variable names repeat within one save")
    if fmt == "v5":
        check_v5_limits(vars_)
    deferred = [v for v in vars_ if isinstance(v, VarSpec) and v.deferred]
    if deferred and (mode != "begin" or compress):
        raise ProtocolError("deferred variables come only with mode 'begin' and no compression")
    if mode in ("create", "append"):
        check_stream_step(fmt, vars_)
    append = msg.get("append", False)
    if not isinstance(append, bool) or (append and (mode != "write" or deferred)):
        raise ProtocolError("append must be true or false, and true only for a whole save (mode 'write')")
    return WriteRequest(seq, path, fmt, fsync, vars_, compress, mode, append)


@dataclass(frozen=True, slots=True)
class Part:
    """Bytes ``[start, start + nbytes)`` of deferred variable ``var`` of save ``seq``,
    now at ``offset`` in the ring."""

    OP: ClassVar[str] = "PART"
    seq: int
    var: int
    start: int
    offset: int
    nbytes: int

    def to_wire(self) -> dict[str, Any]:
        return {
            "op": "PART",
            "seq": self.seq,
            "var": self.var,
            "start": self.start,
            "offset": self.offset,
            "nbytes": self.nbytes,
        }


def parse_part(msg: dict[str, Any], ring_bytes: int) -> Part:
    """Bounds against the ring here; against the variable where its save is known."""
    offset = wire_int(msg.get("offset"), "offset", 0, ring_bytes)
    return Part(
        wire_int(msg.get("seq"), "seq"),
        wire_int(msg.get("var"), "var", 0, MAX_VARS),
        wire_int(msg.get("start"), "start", 0, MAX_DEFERRED_BYTES),
        offset,
        wire_int(msg.get("nbytes"), "nbytes", 1, ring_bytes - offset),
    )
