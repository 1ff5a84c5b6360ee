"""The messages of a save sharded over ranks: LAYOUT, PLACE, PUBLISH, DISCARD, LAID_OUT;
and STEP, a sharded stream's step (:mod:`matspool._shard_stream`).

One daemon lays the file out under a temporary name (LAYOUT, answered by LAID_OUT), every
rank's daemon writes its blocks in place (PLACE), one publishes it (PUBLISH) or throws it
away (DISCARD); see :mod:`matspool._shard`. Kept apart from :mod:`matspool._messages`, which
registers these types in its ``CLIENT_OPS``/``DAEMON_OPS`` so ``encode``, ``parse_request``
and ``decode_reply`` handle them like every other op. Stateless: any thread may use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Final

import numpy as np

from ._errors import FormatLimitError, ProtocolError
from ._matlab import STORED_DTYPES, V5_MAX_DIM, V5_MAX_VARIABLE_BYTES, check_name
from ._msgfields import _flag, _int, _opt_int, _Plain
from ._protocol import MAX_NDIM, MAX_VARS
from ._saves import SaveResult

__all__ = [
    "MAX_SHARD_BYTES",
    "MAX_SHARD_DIM",
    "SHARD_TMP_SUFFIX",
    "Discard",
    "LaidOut",
    "Layout",
    "LayoutResult",
    "Place",
    "Publish",
    "ShardVar",
    "StreamStep",
]

#: a sharded save's temporary file ends so (the daemon's ``writers._files.TMP_SUFFIX``)
SHARD_TMP_SUFFIX: Final = ".matspool-tmp"
MAX_SHARD_DIM: Final = 1 << 48
MAX_SHARD_BYTES: Final = 1 << 62


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


# -- a sharded stream's step (matspool._shard_stream) --------------------------------------
@dataclass(frozen=True, slots=True)
class StreamStep(_Plain):
    """Every block of one step of a sharded stream is in the laid-out temporary ``tmp``:
    make it the stream's first step (``create``: a new file at ``path``) or add it to the
    stream at ``path`` as one journaled append, then remove ``tmp``. ``level``: the
    deflate level of a stream created so (0: none)."""

    OP: ClassVar[str] = "STEP"
    seq: int
    path: str
    tmp: str
    create: bool = False
    fsync: bool = False
    level: int = 0

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> StreamStep:
        return cls(
            _int(raw, "seq"),
            _path(raw),
            _tmp(raw),
            _flag(raw, "create"),
            _flag(raw, "fsync"),
            _int(raw, "level", 0, 9) if "level" in raw else 0,
        )
