"""The daemon's fast path for binary WRITEs: decoded without the dict, parsed once per shape.

Why: in a burst of small saves the control thread is the bottleneck, and decoding a binary
WRITE into the dict the JSON form gives (``_wirebin.decode``) and checking that dict field
by field (``_protocol.parse_write``) took a third of its time (issue 14). Repeated saves
differ only in their seq, path and ring offsets; everything else (format, flags, the
variables' names, dtypes, dims and sizes: the message's *shape*) repeats byte for byte.

How it stays exactly as strict as the reference:

- :func:`scan` reads a binary body with the very checks ``_wirebin`` makes (lengths,
  codes, UTF-8, nothing after the end) and ``Batch.from_wire`` makes (1 to ``MAX_BATCH``
  WRITEs). Wherever it has any doubt it returns None and the daemon hands the whole body
  to the reference decoder, so a malformed message is refused with the reference's own
  error, and a message the scan does take is one the reference takes too, same fields.
- :meth:`BinWrite.request` accepts a WRITE only through a shape the reference's
  ``parse_request`` has accepted before (``SHAPES``, filled from its results), and then
  makes only the per-save checks the reference makes on the fields that change: seq in
  ``[0, 2**63)``, the path (non-empty, no NUL, at most 4096 characters), each offset and
  size inside the ring and the offset aligned for its dtype. Anything else (an unknown
  shape, a failed check, a sender without a ring) goes to ``parse_request`` with the
  message as its dict: same result, same error.

Threads: the control loop's; ``SHAPES`` is its alone.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable
from typing import Any, Final

import numpy as np

from matspool import _messages as msgs
from matspool import _protocol as proto
from matspool import _wirebin

__all__ = ["MAX_KEY_BYTES", "MAX_SHAPES", "SHAPES", "BinWrite", "Shape", "scan"]

_HEAD: Final = struct.Struct("<2sQBBBBHH")  # _wirebin's WRITE head
_VAR: Final = struct.Struct("<BBBxQQ")  # _wirebin's per-variable head
_COUNT: Final = struct.Struct("<2sH")
_LEN: Final = struct.Struct("<I")
_HEAD_SIZE: Final = _HEAD.size
_VAR_SIZE: Final = _VAR.size
_MAX_SEQ: Final = 2**63 - 1  # wire_int's bound on seq
_MAX_PATH: Final = 4096  # parse_write's bound on a path, in characters
MAX_SHAPES: Final = 256  # shapes kept; the table is emptied when full (a hostile client's variety)
MAX_KEY_BYTES: Final = 4096  # a longer shape (thousands of variables) is not kept


class Shape:
    """What the reference's parse of one WRITE shape found: the fixed fields, and per
    variable ``(name, dtype, dims, nbytes, alignment)``."""

    __slots__ = ("compress", "format", "fsync", "mode", "vars")

    def __init__(self, request: proto.WriteRequest) -> None:
        self.format = request.format
        self.fsync = request.fsync
        self.compress = request.compress
        self.mode = request.mode
        specs = [v for v in request.vars if isinstance(v, proto.VarSpec)]
        self.vars = tuple((v.name, v.dtype, v.dims, v.nbytes, _alignment(v.dtype)) for v in specs)

    @staticmethod
    def fits(request: msgs.Request) -> bool:
        """Whether a parsed request can be rebuilt from a shape: a plain whole WRITE (binary
        WRITEs are never anything else; checked all the same)."""
        return (
            type(request) is proto.WriteRequest
            and not request.append
            and all(type(v) is proto.VarSpec and not v.deferred and not v.mclass for v in request.vars)
        )


_VAR_FIELDS: Final = ("name", "dtype", "dims", "offset", "nbytes", "deferred", "mclass")
_WRITE_FIELDS: Final = ("seq", "path", "format", "fsync", "vars", "compress", "mode", "append")


def _makers() -> tuple[Callable[..., proto.VarSpec], Callable[..., proto.WriteRequest]]:
    """Constructors of a plain ``VarSpec`` and ``WriteRequest`` from every field in order
    that set their slots directly: a frozen dataclass's ``__init__`` sets each field
    through ``object.__setattr__``, half of the fast path's time (issue 14). The objects
    are equal to what the classes make (test_binparse); should the classes ever gain or
    reorder a field, or stop being slotted, the classes themselves are used."""
    fields = tuple(f.name for f in dataclasses.fields(proto.VarSpec))
    wfields = tuple(f.name for f in dataclasses.fields(proto.WriteRequest))
    slotted = all(hasattr(c, "__slots__") for c in (proto.VarSpec, proto.WriteRequest))
    if fields != _VAR_FIELDS or wfields != _WRITE_FIELDS or not slotted:
        return proto.VarSpec, proto.WriteRequest
    new = object.__new__
    v_name, v_dtype, v_dims, v_offset, v_nbytes, v_deferred, v_mclass = (
        getattr(proto.VarSpec, f).__set__ for f in _VAR_FIELDS
    )
    w_seq, w_path, w_format, w_fsync, w_vars, w_compress, w_mode, w_append = (
        getattr(proto.WriteRequest, f).__set__ for f in _WRITE_FIELDS
    )

    def var(name: str, dtype: str, dims: tuple[int, ...], offset: int, nbytes: int) -> proto.VarSpec:
        v = new(proto.VarSpec)
        v_name(v, name)
        v_dtype(v, dtype)
        v_dims(v, dims)
        v_offset(v, offset)
        v_nbytes(v, nbytes)
        v_deferred(v, False)
        v_mclass(v, None)
        return v

    def write(
        seq: int,
        path: str,
        fmt: str,
        fsync: bool,
        vars_: tuple[proto.Variable, ...],
        compress: int,
        mode: str,
    ) -> proto.WriteRequest:
        w = new(proto.WriteRequest)
        w_seq(w, seq)
        w_path(w, path)
        w_format(w, fmt)
        w_fsync(w, fsync)
        w_vars(w, vars_)
        w_compress(w, compress)
        w_mode(w, mode)
        w_append(w, False)
        return w

    return var, write


_var, _request = _makers()


def _alignment(dtype: str) -> int:
    return int(np.dtype(dtype).alignment)


#: shape key (the message's bytes that are not seq, path or offsets) -> its reference parse
SHAPES: dict[bytes, Shape] = {}


class BinWrite:
    """One binary WRITE as received: its changing fields, its shape's key, and where its
    bytes are (for the reference's dict, made only when the fast path cannot answer)."""

    __slots__ = ("body", "end", "key", "offsets", "path", "pos", "seq")

    def __init__(
        self, body: bytes, pos: int, end: int, seq: int, path: str, key: bytes, offsets: tuple[int, ...]
    ) -> None:
        self.body = body
        self.pos = pos
        self.end = end
        self.seq = seq
        self.path = path
        self.key = key
        self.offsets = offsets

    def raw(self) -> dict[str, Any]:
        """The dict the reference decode gives for this WRITE (the scan checked it decodes)."""
        raw, _ = _wirebin._write(self.body, self.pos, self.end)  # the reference decoder
        return raw

    def request(self, ring_bytes: int | None) -> msgs.Request:
        """The checked request, as ``parse_request(self.raw(), ring_bytes)`` gives it (or
        its error): from the shape where one is known and every per-save check passes."""
        shape = SHAPES.get(self.key)
        if shape is not None and ring_bytes is not None and self._fits(shape, ring_bytes):
            var = _var
            if len(shape.vars) == 1:  # one variable (most saves): no generator, no zip
                ((name, dtype, dims, nbytes, _),), (offset,) = shape.vars, self.offsets
                specs: tuple[proto.Variable, ...] = (var(name, dtype, dims, offset, nbytes),)
            else:
                specs = tuple(
                    var(name, dtype, dims, offset, nbytes)
                    for (name, dtype, dims, nbytes, _), offset in zip(shape.vars, self.offsets, strict=True)
                )
            return _request(self.seq, self.path, shape.format, shape.fsync, specs, shape.compress, shape.mode)
        request = msgs.parse_request(self.raw(), ring_bytes)  # the reference: its answer, its error
        if shape is None and len(self.key) <= MAX_KEY_BYTES and Shape.fits(request):
            assert isinstance(request, proto.WriteRequest)
            if len(SHAPES) >= MAX_SHAPES:
                SHAPES.clear()
            SHAPES[self.key] = Shape(request)
        return request

    def _fits(self, shape: Shape, ring_bytes: int) -> bool:
        """The reference's checks of the fields a shape does not fix."""
        path = self.path
        if not 0 <= self.seq <= _MAX_SEQ or not path or "\x00" in path or len(path) > _MAX_PATH:
            return False
        if len(shape.vars) == 1:
            ((_, _, _, nbytes, alignment),), (offset,) = shape.vars, self.offsets
            return offset <= ring_bytes and nbytes <= ring_bytes - offset and not offset % alignment
        for (_, _, _, nbytes, alignment), offset in zip(shape.vars, self.offsets, strict=True):
            if offset > ring_bytes or nbytes > ring_bytes - offset or offset % alignment:
                return False
        return True


def scan(body: bytes) -> list[BinWrite] | None:
    """A binary WRITE or BATCH of binary WRITEs as :class:`BinWrite` items, each one
    exactly what ``_wirebin.decode`` (and ``Batch.from_wire``) would accept; None for
    anything else, which the caller hands to the reference (and its errors)."""
    try:
        if body[:2] == _wirebin.WRITE_MAGIC:
            one = _scan(body, 0, len(body))
            return None if one is None else [one]
        if body[:2] == _wirebin.BATCH_MAGIC:
            return _scan_batch(body)
    except (struct.error, IndexError, UnicodeDecodeError):
        pass
    return None


def _scan_batch(body: bytes) -> list[BinWrite] | None:
    _, count = _COUNT.unpack_from(body, 0)
    if not 1 <= count <= proto.MAX_BATCH:
        return None
    pos, size = _COUNT.size, len(body)
    out: list[BinWrite] = []
    for _ in range(count):
        if pos + _LEN.size > size:
            return None
        (n,) = _LEN.unpack_from(body, pos)
        pos += _LEN.size
        end = pos + n
        if end > size or body[pos : pos + 2] != _wirebin.WRITE_MAGIC:
            return None  # past the end, or a JSON member: the reference decides
        one = _scan(body, pos, end)
        if one is None:
            return None
        out.append(one)
        pos = end
    return out if pos == size else None


def _scan(body: bytes, pos: int, end: int) -> BinWrite | None:
    """The binary WRITE in ``body[pos:end]`` if it decodes exactly as ``_wirebin._write``
    decodes it (every check it makes), else None."""
    if pos + _HEAD_SIZE > end:
        return None
    _, seq, fmt, fsync, _compress, mode, path_len, nvars = _HEAD.unpack_from(body, pos)
    if fmt >= len(_wirebin.FORMATS) or mode >= len(_wirebin.MODES) or fsync > 1:
        return None
    p = pos + _HEAD_SIZE
    q = p + path_len
    if q > end:
        return None
    path = body[p:q].decode("utf-8")
    if nvars == 1 and q + _VAR_SIZE <= end:  # one variable (most saves): no lists
        name_len, dtype_len, ndims, offset, _nbytes = _VAR.unpack_from(body, q)
        if q + _VAR_SIZE + name_len + dtype_len + 8 * ndims != end:
            return None
        key = body[pos + 10 : pos + 14] + body[q : q + 4] + body[q + 12 : end]
        if key not in SHAPES:
            q += _VAR_SIZE
            body[q : q + name_len].decode("utf-8")
            body[q + name_len : q + name_len + dtype_len].decode("utf-8")
        return BinWrite(body, pos, end, seq, path, key, (offset,))
    keys = [body[pos + 10 : pos + 14]]  # format, fsync, compress, mode
    offsets = []
    for _ in range(nvars):
        if q + _VAR_SIZE > end:
            return None
        name_len, dtype_len, ndims, offset, _nbytes = _VAR.unpack_from(body, q)
        stop = q + _VAR_SIZE + name_len + dtype_len + 8 * ndims
        if stop > end:
            return None
        keys += [body[q : q + 4], body[q + 12 : stop]]
        offsets.append(offset)
        q = stop
    if q != end:
        return None
    key = b"".join(keys)
    if key not in SHAPES:  # names and dtypes not yet seen decoded: the reference's UTF-8 check
        q = p + path_len
        for _ in range(nvars):
            name_len, dtype_len, ndims, _, _ = _VAR.unpack_from(body, q)
            q += _VAR_SIZE
            body[q : q + name_len].decode("utf-8")
            body[q + name_len : q + name_len + dtype_len].decode("utf-8")
            q += name_len + dtype_len + 8 * ndims
    return BinWrite(body, pos, end, seq, path, key, tuple(offsets))
