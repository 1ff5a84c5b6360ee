"""MAT v5, streamed straight from the ring.

scipy's ``savemat`` first makes ``arr.tobytes(order="F")``, a full copy of every
variable even when it is already column-major; the ring always is, so this writer hands
the ring's own memory to ``write()`` and the payload is copied once, into the page
cache. Only complex variables are split (v5 stores real and imaginary parts apart), in
bounded chunks. The element layout is MathWorks' "MAT-File Format" (miMATRIX with array
flags, dimensions, name, real and imaginary parts, each padded to 8 bytes), the same as
scipy writes; scipy, Octave and MATLAB read the result. Structs, cells, text and sparse
matrices are built in memory (``_matrix``) byte for byte as MATLAB writes them.
"""

from __future__ import annotations

import os
import struct
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, BinaryIO, Final, overload

import numpy as np

from matspool._matlab import STORED_DTYPES
from matspool._protocol import TreeSpec, Variable, VarSpec

from ..shmspan import ShmSpan
from ._deflate import BLOCK, zlib_stream
from ._direct import DIRECT_MIN_BYTES, direct_enabled, write_payload
from ._files import SELF_FD, WRITEBACK_STEP, fsync_wanted, start_writeback, write_new_file
from ._stamp import PerSecond
from ._values import Cell, Char, Sparse, Struct, column_bytes

__all__ = ["header", "small_image", "write_v5"]

_MI: Final = {
    "i1": 1,
    "u1": 2,
    "i2": 3,
    "u2": 4,
    "i4": 5,
    "u4": 6,
    "f4": 7,
    "f8": 9,
    "i8": 12,
    "u8": 13,
    "b1": 2,
}
_MX: Final = {
    "double": 6,
    "single": 7,
    "int8": 8,
    "uint8": 9,
    "int16": 10,
    "uint16": 11,
    "int32": 12,
    "uint32": 13,
    "int64": 14,
    "uint64": 15,
    "logical": 9,
    "char": 4,
}
_MI_MATRIX: Final = 14
_MI_COMPRESSED: Final = 15
_FLAG_COMPLEX: Final = 0x0800
_FLAG_LOGICAL: Final = 0x0200
_FLAG_SPARSE: Final = 0x1000  # undocumented; MATLAB sets it on every sparse array
_MX_CELL, _MX_STRUCT, _MX_CHAR, _MX_SPARSE = 1, 2, 4, 5
_MI_INT8, _MI_INT32, _MI_UTF8, _MI_UTF16 = 1, 5, 16, 17
_BUFFER: Final = 64 << 10  # under malloc's mmap threshold: no mmap/munmap per file
_CHUNK: Final = 16 << 20  # complex parts are split in pieces of this many elements' bytes


def header(now: float | None = None) -> bytes:
    stamp = time.strftime("%a %b %d %H:%M:%S %Y", time.localtime(now))
    text = f"MATLAB 5.0 MAT-file Platform: posix, Created on: {stamp}"
    return text.encode("ascii").ljust(116, b" ") + b"\x00" * 8 + b"\x00\x01IM"


def _pad(n: int) -> int:
    return -n % 8


def _element_size(nbytes: int) -> int:
    return 8 + nbytes + _pad(nbytes)


def _write_all(f: BinaryIO, data: bytes | memoryview) -> None:
    """A raw write may be short (disk full, signals): go on until all is written, so a
    full disk surfaces as ENOSPC from the next write instead of a silently cut file."""
    view = memoryview(data).cast("B")
    while view:
        view = view[f.write(view) :]


def _pieces(data: np.ndarray, block: int) -> Iterator[bytes | memoryview]:
    """A 1-d column-major view of the ring as buffers of at most ``block`` bytes."""
    step = max(1, block // max(1, data.itemsize))
    if data.flags.c_contiguous:
        view = data.data.cast("B")
        yield from (view[i : i + step * data.itemsize] for i in range(0, len(view), step * data.itemsize))
    else:  # the real or imaginary half of a complex array: strided, copied block by block
        for i in range(0, data.size, step):
            yield np.ascontiguousarray(data[i : i + step]).data


class Hole(int):
    """Bytes of a deferred variable: skipped now, written by its pieces later."""


Source = np.ndarray | ShmSpan  # a view of the ring, or a /dev/shm ring's span


@overload
def _element(spec: VarSpec, arr: np.ndarray, block: int) -> Iterator[bytes | memoryview]: ...
@overload
def _element(
    spec: VarSpec, arr: Source | None, block: int
) -> Iterator[bytes | memoryview | Hole | ShmSpan]: ...
def _element(spec: VarSpec, arr: Source | None, block: int) -> Iterator[bytes | memoryview | Hole | ShmSpan]:
    """The bytes of one miMATRIX element, in order, without copying real payloads
    (``arr`` None: the variable is deferred and its parts are ``Hole``s)."""
    dt = np.dtype(spec.dtype)
    is_complex = dt.kind == "c"
    part_dt = np.dtype(f"<f{dt.itemsize // 2}") if is_complex else np.dtype("|u1") if dt.kind == "b" else dt
    if arr is None:
        parts: list[np.ndarray | Hole | ShmSpan] = [Hole(spec.nbytes // (2 if is_complex else 1))] * (
            2 if is_complex else 1
        )
    elif isinstance(arr, ShmSpan):  # a /dev/shm ring's array: the kernel copies it (shmspan)
        parts = [arr]
    else:
        flat = arr.reshape(-1, order="F")  # a view: the ring is column-major
        parts = [flat.real, flat.imag] if is_complex else [flat.view(part_dt)]
    mi = _MI_UTF16 if spec.mclass == "char" else _MI[part_dt.str[1:]]
    sizes = [p if isinstance(p, Hole) else p.nbytes for p in parts]
    name = spec.name.encode("ascii")
    ndim = len(spec.dims)
    body = 16 + _element_size(4 * ndim) + _element_size(len(name)) + sum(_element_size(n) for n in sizes)
    flags = _MX[spec.matlab_class] | (_FLAG_COMPLEX if is_complex else 0)
    flags |= _FLAG_LOGICAL if spec.matlab_class == "logical" else 0
    head = struct.pack("<II", _MI_MATRIX, body)
    head += struct.pack("<IIII", 6, 8, flags, 0)  # array flags: miUINT32, 8 bytes
    head += struct.pack(f"<II{ndim}i", 5, 4 * ndim, *spec.dims) + b"\x00" * _pad(4 * ndim)
    head += struct.pack("<II", 1, len(name)) + name + b"\x00" * _pad(len(name))
    yield head
    for part, n in zip(parts, sizes, strict=True):
        yield struct.pack("<II", mi, n)
        if isinstance(part, (Hole, ShmSpan)):
            yield part
        else:
            yield from _pieces(part, block)
        yield b"\x00" * _pad(n)


def _coalesce(buffers: Iterable[bytes | memoryview], size: int) -> Iterator[bytes | memoryview]:
    """Merge small buffers (headers, padding) so every deflate block is worth a task."""
    small = bytearray()
    for b in buffers:
        if len(b) >= size // 4:
            if small:
                yield bytes(small)
                small.clear()
            yield b
        else:
            small += b
            if len(small) >= size:
                yield bytes(small)
                small.clear()
    if small:
        yield bytes(small)


def _write_compressed(f: BinaryIO, buffers: Iterable[bytes | memoryview], level: int) -> None:
    """An miCOMPRESSED element: its size is known only at the end, so it is patched in."""
    start = f.tell()
    _write_all(f, struct.pack("<II", _MI_COMPRESSED, 0))
    n = 0
    for out in zlib_stream(_coalesce(buffers, BLOCK), level):
        _write_all(f, out)
        n += len(out)
    if n >= 2**32:
        raise ValueError("compressed variable exceeds the v5 element size limit")
    end = f.tell()
    f.seek(start + 4)
    _write_all(f, struct.pack("<I", n))
    f.seek(end)


def _write_var(f: BinaryIO, spec: VarSpec, arr: Source | None, level: int) -> list[int]:
    """Write one variable; returns the file offsets of its holes (deferred parts)."""
    if level:
        _write_compressed(f, _element(spec, arr, BLOCK), level)  # type: ignore[arg-type]
        return []
    holes = []
    for buf in _element(spec, arr, WRITEBACK_STEP):
        if isinstance(buf, Hole):
            holes.append(f.tell())
            f.seek(buf, os.SEEK_CUR)
        elif isinstance(buf, ShmSpan):
            f.flush()
            buf.copy_to(f.fileno(), at := f.tell())
            f.seek(at + buf.nbytes)
        elif len(buf) >= DIRECT_MIN_BYTES and fsync_wanted() and direct_enabled():  # maybe O_DIRECT
            f.flush()
            at = f.tell()
            write_payload(f.fileno(), buf, at)
            f.seek(at + len(buf))
        else:
            _write_all(f, buf)
            if len(buf) >= WRITEBACK_STEP // 2:  # a payload piece, written past the buffer
                start_writeback(f.fileno(), f.tell() - len(buf), len(buf))
    return holes


def _tagged(mi: int, data: bytes) -> bytes:
    return struct.pack("<II", mi, len(data)) + data + b"\x00" * _pad(len(data))


def _matrix_head(cls: int, dims: tuple[int, ...], name: str, nzmax: int = 0) -> bytes:
    """Array flags, dimensions and name: the start of every miMATRIX."""
    return (
        struct.pack("<IIII", 6, 8, cls, nzmax)
        + _tagged(_MI_INT32, struct.pack(f"<{len(dims)}i", *dims))
        + _tagged(_MI_INT8, name.encode("ascii"))
    )


def _numeric(arr: np.ndarray) -> tuple[int, bytes]:
    """Array flags and data elements of a numeric or logical array."""
    dt = arr.dtype
    flat = arr.reshape(-1, order="F")
    cls = _MX[STORED_DTYPES[dt.str]]
    if dt.kind == "c":
        part = f"<f{dt.itemsize // 2}"
        return cls | _FLAG_COMPLEX, (
            _tagged(_MI[part[1:]], flat.real.astype(part).tobytes())
            + _tagged(_MI[part[1:]], flat.imag.astype(part).tobytes())
        )
    flags = cls | (_FLAG_LOGICAL if dt.kind == "b" else 0)
    return flags, _tagged(_MI[dt.str[1:]], flat.view(np.uint8 if dt.kind == "b" else dt).tobytes())


def _matrix(name: str, value: Any) -> bytes:
    """One miMATRIX element for any value of a tree, as MATLAB lays it out: ASCII text as
    miUTF8 and any other text as UTF-16 code units (miUTF16, as in MATLAB's own
    ``testunicode`` files); struct field names padded to
    the longest name plus its NUL; sparse with MATLAB's sparse flag and nzmax >= 1."""
    if isinstance(value, Char):
        units = value.units.reshape(-1, order="F")
        ascii_only = not units.size or int(units.max()) < 0x80
        data = (
            _tagged(_MI_UTF8, units.astype(np.uint8).tobytes())
            if ascii_only
            else _tagged(_MI_UTF16, units.astype("<u2").tobytes())
        )
        body = _matrix_head(_MX_CHAR, value.units.shape, name) + data
    elif isinstance(value, Cell):
        body = _matrix_head(_MX_CELL, value.dims, name) + b"".join(_matrix("", v) for v in value.items)
    elif isinstance(value, Struct):
        width = max((len(n) for n in value.names), default=0) + 1
        names = b"".join(n.encode("ascii").ljust(width, b"\x00") for n in value.names)
        body = (
            _matrix_head(_MX_STRUCT, value.dims, name)
            + struct.pack("<HHI", _MI_INT32, 4, width)  # the small-element form MATLAB uses
            + _tagged(_MI_INT8, names)
            + b"".join(_matrix("", v) for e in value.elems for v in e)
        )
    elif isinstance(value, Sparse):
        logical = value.data.dtype.kind == "b"
        is_complex = value.data.dtype.kind == "c"
        flags = (
            _MX_SPARSE
            | _FLAG_SPARSE
            | (_FLAG_LOGICAL if logical else 0)
            | (_FLAG_COMPLEX if is_complex else 0)
        )
        body = (
            _matrix_head(flags, value.dims, name, max(1, value.data.size))
            + _tagged(_MI_INT32, value.ir.astype("<i4").tobytes())
            + _tagged(_MI_INT32, value.jc.astype("<i4").tobytes())
        )
        if logical:
            body += _tagged(_MI["u1"], value.data.view(np.uint8).tobytes())
        else:
            body += _tagged(_MI["f8"], value.data.real.astype("<f8").tobytes())
            if is_complex:
                body += _tagged(_MI["f8"], value.data.imag.astype("<f8").tobytes())
    else:
        arr = np.asarray(value)
        flags, data = _numeric(arr)
        body = _matrix_head(flags, arr.shape, name) + data
    return struct.pack("<II", _MI_MATRIX, len(body)) + body


def _write_tree(f: BinaryIO, spec: Variable, value: Any, level: int) -> None:
    """Structs, cells, chars and sparse matrices (small and nested: built in memory)."""
    element = _matrix(spec.name, value)
    if level:
        _write_compressed(f, [element], level)
    else:
        _write_all(f, element)


_SMALL_FILE: Final = 1 << 20


def small_image(variables: Sequence[tuple[Variable, Any]]) -> bytes | None:
    """The whole file of a small plain numeric save without compression, assembled in
    memory (for one ``write()``), or None for any other save (``write_v5`` then)."""
    total = 0
    for spec, _ in variables:
        if not isinstance(spec, VarSpec) or spec.deferred or spec.mclass:
            return None
        total += spec.nbytes
    return _small(variables) if total <= _SMALL_FILE else None  # type: ignore[arg-type]


def _small(variables: Sequence[tuple[VarSpec, np.ndarray]]) -> bytes:
    """A small plain numeric file's bytes: for 4 KiB variables the file object and its
    per-call overheads cost more than the bytes. A real (not complex) variable's tags come
    from a template made by ``_element`` for the same name, type and size (a time-step
    loop saves those again and again)."""
    bufs: list[bytes | memoryview] = [_header_now()]
    for spec, value in variables:
        key = (spec.name, spec.dtype, spec.dims, spec.mclass)
        frame = _FRAMES.get(key)
        if frame is None:
            parts = list(_element(spec, value, _CHUNK))
            if np.dtype(spec.dtype).kind != "c" and len(parts) == 4:  # head, tag, payload, pad
                if len(_FRAMES) >= _MAX_FRAMES:
                    _FRAMES.clear()
                _FRAMES[key] = (bytes(parts[0]) + bytes(parts[1]), bytes(parts[3]))
            bufs += parts
        else:
            bufs += [frame[0], column_bytes(value), frame[1]]
    return b"".join(bufs)


# (name, dtype, dims, mclass) -> (the element's bytes before its payload, after it); only
# writer threads use it: a lookup and a store are single dict operations under the GIL
_FRAMES: dict[tuple[str, str, tuple[int, ...], str | None], tuple[bytes, bytes]] = {}
_MAX_FRAMES: Final = 256
#: ``header()`` of the current second (a small file's header, made once a second)
_header_now: Final = PerSecond(lambda now: header(now))  # looked up per call: a replaced header is used


def _open_new(path: str) -> BinaryIO:
    """``path`` opened empty for buffered writing. The daemon's temporary (``/proc/self/
    fd/N``, created empty) is opened without ``O_TRUNC``: on ext4 a truncate, even of an
    empty file, marks it to be flushed to disk when closed (``auto_da_alloc``), which made
    every large v5 file start its writeback inside the save (measured: 64 MiB written and
    closed in 33 ms with ``O_TRUNC``, 24 ms without). Any other path is truncated."""
    if not (path.startswith(SELF_FD) and path[len(SELF_FD) :].isdigit()):
        return open(path, "wb", buffering=_BUFFER)
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        if os.fstat(fd).st_size:
            os.ftruncate(fd, 0)
        return open(fd, "wb", buffering=_BUFFER)
    except BaseException:
        os.close(fd)
        raise


def write_v5(path: str, variables: Sequence[tuple[Variable, Any]], level: int = 0) -> dict[str, list[int]]:
    """``level`` 1-9 deflates every variable (``miCOMPRESSED``, what ``save -v7`` does).

    Deferred variables leave holes (the real part, and the imaginary part of a complex
    one); the returned file offsets are where their pieces go.
    """
    if not level and (image := small_image(variables)) is not None:
        write_new_file(path, image)
        return {}
    holes: dict[str, list[int]] = {}
    # buffered: headers, tags and padding leave together; payloads larger than the
    # buffer still go to write() straight from the ring, uncopied
    with _open_new(path) as f:  # the daemon's temporary, by descriptor
        _write_all(f, header())
        for spec, value in variables:
            if isinstance(spec, TreeSpec):
                _write_tree(f, spec, value, level)
            elif spec.mclass and not spec.deferred:
                _write_tree(f, spec, Char(value), level)
            elif spec.deferred:
                holes[spec.name] = _write_var(f, spec, None, level)
            else:
                _write_var(f, spec, value, level)
        if holes:
            f.truncate(f.tell())  # a hole at the very end still counts in the file's size
    return holes
