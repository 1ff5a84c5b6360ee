"""The binary form of WRITE and BATCH: the small-save hot path's wire format (issue 14).

A save of a few small arrays spent more of its caller's time building and JSON-encoding
its WRITE than copying its bytes; this fixed layout packs in a fifth of the time and
unpacks in half. It is only a different spelling: :func:`decode` turns it back into the
very dict the JSON form parses to, and the daemon checks that dict as it checks every
WRITE (``_protocol.parse_write``: path, format, ranges inside the ring ...). A body that
does not fit the layout exactly (short, trailing bytes, bad UTF-8, unknown codes, a batch
in a batch) is refused with :class:`ProtocolError`.

A body is binary when its first byte is ``\\x01`` (a JSON body starts with ``{``); the
protocol tag is unchanged: a daemon that reads this form says so in its WELCOME (``version``
``"matspool/1 binwrite"``), and only then does a client send it. All integers
little-endian::

    WRITE  "\\x01W" seq:u64 format:u8 fsync:u8 compress:u8 mode:u8 path_len:u16 nvars:u16
           path (UTF-8), then per variable:
           name_len:u8 dtype_len:u8 ndims:u8 pad:u8 offset:u64 nbytes:u64 name dtype dims:u64*ndims
    BATCH  "\\x01B" count:u16, then per message: len:u32 body (a WRITE, binary or JSON)

Only WRITEs of plain variables (no struct/cell/char trees, none deferred, no ``mclass``,
no ``append``) take this form; :func:`encode_write` returns None for the others, which stay
JSON. Stateless: any thread may use it.
"""

from __future__ import annotations

import json
import struct
from typing import Any, Final

from ._errors import ProtocolError
from ._specs import VarSpec

__all__ = [
    "BATCH_MAGIC",
    "BINARY",
    "FEATURE",
    "WRITE_MAGIC",
    "as_json",
    "decode",
    "encode_write",
    "join_batch",
]

#: what a daemon that reads this form lists in its WELCOME's ``version``, after the tag
#: (``"matspool/1 binwrite"``); a client sends binary WRITEs only to such a daemon, so an
#: older daemon keeps getting JSON
FEATURE: Final = "binwrite"

BINARY: Final = b"\x01"
WRITE_MAGIC: Final = b"\x01W"
BATCH_MAGIC: Final = b"\x01B"
FORMATS: Final = ("v5", "v7.3")
MODES: Final = ("write", "create", "append", "begin")
_FORMAT_CODE: Final = {f: i for i, f in enumerate(FORMATS)}
_MODE_CODE: Final = {m: i for i, m in enumerate(MODES)}
_HEAD: Final = struct.Struct("<2sQBBBBHH")
_VAR: Final = struct.Struct("<BBBxQQ")
_COUNT: Final = struct.Struct("<2sH")
_LEN: Final = struct.Struct("<I")
_U64: Final = 2**64 - 1


def encode_write(msg: Any) -> bytes | None:
    """The binary body of a WRITE of plain variables; None when it needs JSON."""
    if msg.append or msg.format not in _FORMAT_CODE or msg.mode not in _MODE_CODE:
        return None
    if type(msg.seq) is not int or not 0 <= msg.seq <= _U64 or type(msg.compress) is not int:
        return None
    if not 0 <= msg.compress <= 255 or type(msg.fsync) is not bool or len(msg.vars) > 0xFFFF:
        return None
    try:
        path = msg.path.encode()
    except UnicodeEncodeError:
        return None  # JSON escapes it; the daemon refuses it there, with its reason
    if len(path) > 0xFFFF:
        return None
    out = [
        _HEAD.pack(
            WRITE_MAGIC,
            msg.seq,
            _FORMAT_CODE[msg.format],
            msg.fsync,
            msg.compress,
            _MODE_CODE[msg.mode],
            len(path),
            len(msg.vars),
        ),
        path,
    ]
    for v in msg.vars:
        if type(v) is not VarSpec or v.deferred or v.mclass:
            return None
        name, dtype, dims = v.name.encode(), v.dtype.encode(), v.dims
        if len(name) > 255 or len(dtype) > 255 or len(dims) > 255:
            return None
        if not all(type(x) is int and 0 <= x <= _U64 for x in (v.offset, v.nbytes, *dims)):
            return None
        out += [
            _VAR.pack(len(name), len(dtype), len(dims), v.offset, v.nbytes),
            name,
            dtype,
            struct.pack(f"<{len(dims)}Q", *dims),
        ]
    return b"".join(out)


def join_batch(bodies: list[bytes]) -> bytes:
    """A binary BATCH of encoded WRITE bodies (binary or JSON), without re-encoding."""
    if not 1 <= len(bodies) <= 0xFFFF:
        raise ValueError(f"a BATCH holds 1 to 65535 messages, got {len(bodies)}")
    out = [_COUNT.pack(BATCH_MAGIC, len(bodies))]
    for body in bodies:
        out += [_LEN.pack(len(body)), body]
    return b"".join(out)


def as_json(frames: list[Any]) -> list[Any]:
    """``frames`` (tag, body, payload...) with a binary body spelled as JSON; others as
    they are. A save encoded for a daemon that offered :data:`FEATURE` and re-sent to
    the one that replaced it, which did not, must go in the form that one reads."""
    if bytes(frames[1][:1]) != BINARY:
        return frames
    body = json.dumps(decode(bytes(frames[1])), separators=(",", ":")).encode()
    return [frames[0], body, *frames[2:]]


def decode(body: bytes) -> dict[str, Any]:
    """The dict a binary body stands for, as the JSON form would give it."""
    try:
        if body[:2] == WRITE_MAGIC:
            raw, end = _write(body, 0, len(body))
            if end != len(body):
                raise ProtocolError(f"binary WRITE: {len(body) - end} bytes after its end")
            return raw
        if body[:2] == BATCH_MAGIC:
            return _batch(body)
    except (struct.error, UnicodeDecodeError, IndexError) as e:
        raise ProtocolError(f"malformed binary message: {e}") from None
    raise ProtocolError(f"unknown binary message {bytes(body[:2])!r}")


def _batch(body: bytes) -> dict[str, Any]:
    _, count = _COUNT.unpack_from(body, 0)
    pos, msgs = _COUNT.size, []
    for _ in range(count):
        (n,) = _LEN.unpack_from(body, pos)
        pos += _LEN.size
        end = pos + n
        if end > len(body):
            raise ProtocolError("binary BATCH: a message runs past the end of the body")
        if body[pos : pos + 2] == WRITE_MAGIC:
            raw, stop = _write(body, pos, end)
            if stop != end:
                raise ProtocolError("binary BATCH: a WRITE does not fill its length")
        elif body[pos : pos + 1] == b"{":
            try:
                raw = json.loads(body[pos:end])
            except (ValueError, RecursionError) as e:
                raise ProtocolError(f"binary BATCH: a message is not JSON: {e}") from None
        else:
            raise ProtocolError("binary BATCH holds only WRITE messages")
        msgs.append(raw)
        pos = end
    if pos != len(body):
        raise ProtocolError(f"binary BATCH: {len(body) - pos} bytes after its end")
    return {"op": "BATCH", "msgs": msgs}


def _write(body: bytes, pos: int, end: int) -> tuple[dict[str, Any], int]:
    _, seq, fmt, fsync, compress, mode, path_len, nvars = _HEAD.unpack_from(body, pos)
    if fmt >= len(FORMATS) or mode >= len(MODES) or fsync > 1:
        raise ProtocolError(f"binary WRITE: unknown format {fmt}, mode {mode} or fsync {fsync}")
    pos += _HEAD.size
    path = _text(body, pos, path_len, end)
    pos += path_len
    variables = []
    for _ in range(nvars):
        if pos + _VAR.size > end:
            raise ProtocolError("binary WRITE: its variables run past its end")
        name_len, dtype_len, ndims, offset, nbytes = _VAR.unpack_from(body, pos)
        pos += _VAR.size
        name = _text(body, pos, name_len, end)
        pos += name_len
        dtype = _text(body, pos, dtype_len, end)
        pos += dtype_len
        if pos + 8 * ndims > end:
            raise ProtocolError("binary WRITE: its dims run past its end")
        dims = list(struct.unpack_from(f"<{ndims}Q", body, pos))
        pos += 8 * ndims
        variables.append({"name": name, "dtype": dtype, "dims": dims, "offset": offset, "nbytes": nbytes})
    raw = {
        "op": "WRITE",
        "seq": seq,
        "path": path,
        "format": FORMATS[fmt],
        "fsync": bool(fsync),
        "compress": compress,
        "mode": MODES[mode],
        "vars": variables,
    }
    return raw, pos


def _text(body: bytes, pos: int, n: int, end: int) -> str:
    if pos + n > end:
        raise ProtocolError("binary WRITE: a string runs past its end")
    return bytes(body[pos : pos + n]).decode("utf-8")
