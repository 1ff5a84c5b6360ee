"""MAT v7.3 through h5py, laid out as MATLAB itself lays it out.

Matches ``shared/reference-mat/matlab_basic_v73.mat``: a 512-byte userblock whose first
128 bytes are the MAT header, superblock version 0 (``libver`` capped at v1.8 so MATLAB
before R2021b can read it), dims reversed (a column-major ``A`` of size [m n] is a
row-major (n, m) dataset: the ring bytes go in unchanged), ``MATLAB_class`` as a
fixed-length NULLTERM ASCII scalar attribute, logical as uint8 with
``MATLAB_int_decode`` = 1, complex as a ``{real, imag}`` compound, and empty arrays as a
uint64 vector of their size with ``MATLAB_empty`` = 1.

Structs, cells, text and sparse matrices (``_Tree``) follow the same file: char as UTF-16
code units with ``MATLAB_int_decode`` = 2; struct groups with ``MATLAB_fields`` (a vlen of
1-byte NULLTERM strings, left out of a one-field struct, moved into ``#refs#`` behind an
object reference once the names reach 4096 characters); cell elements and struct-array
fields as object references into ``#refs#``, which opens with MATLAB's ``canonical empty``;
``H5PATH`` as MATLAB stamps it; sparse as a group of ``data``/``ir``/``jc``.
"""

from __future__ import annotations

import itertools
import math
import os
import time
import zlib
from collections.abc import Sequence
from typing import Any

import h5py
import numpy as np

from matspool._matlab import STORED_DTYPES
from matspool._protocol import TreeSpec, Variable, VarSpec

from ._deflate import ordered_map
from ._direct import DIRECT_MIN_BYTES, write_payload
from ._files import pwrite_all, write_new_file
from ._layouts import _SPLITS, TEMPLATE_MAX_BYTES, TEMPLATES, _keep_split, _Split, _splits_lock, _Template
from ._values import Cell, Char, Sparse, Struct

__all__ = ["TEMPLATES", "TEMPLATE_MAX_BYTES", "USERBLOCK", "append_v73", "header", "write_v73"]

USERBLOCK = 512
#: large datasets start at a multiple of this from the userblock's end (``H5Pset_alignment``,
#: at most the userblock's size), so at a file offset a sector-aligned ``O_DIRECT`` write
#: can start at (``_direct``): at most 511 bytes of padding before a payload of 4 MiB or more
ALIGNMENT = 512


def header(now: float | None = None) -> bytes:
    """The 128-byte MAT 7.3 header MATLAB writes into the HDF5 userblock."""
    # C's asctime format, as MATLAB writes it: "Mon Dec  8 22:53:31 2025" (day space-padded)
    stamp = time.asctime(time.localtime(now))
    text = f"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: {stamp} HDF5 schema 1.00 ."
    return text.encode("ascii").ljust(116, b" ") + b"\x00" * 8 + b"\x00\x02IM"


def _str_attr(obj: h5py.HLObject, name: str, value: str) -> None:
    tid = h5py.h5t.C_S1.copy()
    tid.set_size(len(value))
    tid.set_strpad(h5py.h5t.STR_NULLTERM)
    aid = h5py.h5a.create(obj.id, name.encode(), tid, h5py.h5s.create(h5py.h5s.SCALAR))
    aid.write(np.array(value.encode("ascii"), dtype=f"S{len(value)}"), mtype=tid)


def _stored(spec: VarSpec, arr: np.ndarray) -> np.ndarray:
    """The ring bytes reinterpreted as the dataset: reversed dims, MATLAB's element types."""
    flat = arr.reshape(-1, order="F")  # a view: the ring is column-major
    return flat.view(_stored_dtype(arr.dtype)).reshape(spec.dims[::-1])


CHUNK_BYTES = 64 << 10  # MATLAB's own chunks are at most 64 KiB
_CHUNKS_PER_TASK = 32
_MIN_COMPRESS_BYTES = 1024  # like MATLAB: small variables stay contiguous


def _chunk_shape(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """Fill the fastest axes first, up to CHUNK_BYTES per chunk."""
    chunk = [1] * len(shape)
    budget = max(1, CHUNK_BYTES // itemsize)
    for ax in reversed(range(len(shape))):
        take = max(1, min(shape[ax], budget))
        chunk[ax] = take
        budget //= take
        if take < shape[ax]:
            break
    return tuple(chunk)


def _write_deflated(f: h5py.File, name: str, data: np.ndarray, level: int) -> h5py.Dataset:
    """A chunked, deflated dataset whose chunks are compressed on every core and handed to
    HDF5 already compressed (``write_direct_chunk``), so HDF5's lock never serialises zlib."""
    chunk = _chunk_shape(data.shape, data.dtype.itemsize)
    ds = f.create_dataset(
        name, shape=data.shape, dtype=data.dtype, chunks=chunk, compression="gzip", compression_opts=level
    )
    origins = list(itertools.product(*(range(0, n, c) for n, c in zip(data.shape, chunk, strict=True))))

    def compress(batch: list[tuple[int, ...]]) -> list[tuple[tuple[int, ...], bytes]]:
        out = []
        for origin in batch:
            block = data[tuple(slice(o, o + c) for o, c in zip(origin, chunk, strict=True))]
            if block.shape != chunk:  # edge chunks are stored full size, padded
                full = np.zeros(chunk, dtype=data.dtype)
                full[tuple(slice(0, n) for n in block.shape)] = block
                block = full
            raw = np.ascontiguousarray(block).reshape(-1).view(np.uint8)
            out.append((origin, zlib.compress(raw.data, level)))
        return out

    batches = [origins[i : i + _CHUNKS_PER_TASK] for i in range(0, len(origins), _CHUNKS_PER_TASK)]
    for done in ordered_map(compress, batches):
        for origin, payload in done:
            ds.id.write_direct_chunk(origin, payload)
    return ds


def _stored_dtype(dt: np.dtype) -> np.dtype:
    if dt.kind == "c":
        part = np.dtype(f"<f{dt.itemsize // 2}")
        return np.dtype([("real", part), ("imag", part)])
    return np.dtype(np.uint8) if dt.kind == "b" else dt


def _reserve(f: h5py.File, name: str, shape: tuple[int, ...], dtype: np.dtype) -> tuple[h5py.Dataset, int]:
    """A contiguous dataset whose space is allocated now and never filled; returns it and
    the absolute file offset of its bytes. The payload is written there afterwards with
    ``pwrite`` straight from the ring: no copy, and outside h5py's global lock, so the
    writer threads of different files really overlap."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_layout(h5py.h5d.CONTIGUOUS)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    dcpl.set_obj_track_times(False)  # no timestamps: same variables, same bytes (templates)
    space = h5py.h5s.create_simple(shape)
    dsid = h5py.h5d.create(f.id, name.encode(), h5py.h5t.py_create(dtype, logical=True), space, dcpl=dcpl)
    return h5py.Dataset(dsid), dsid.get_offset()


#: MATLAB moves a struct's field names out of the attribute into ``#refs#`` once their
#: characters add up to 2^12 (and so never meets HDF5's 64 KiB attribute limit).
FIELDS_IN_REFS_CHARS = 4096
_S1 = h5py.h5t.C_S1.copy()
_S1.set_size(1)
_S1.set_strpad(h5py.h5t.STR_NULLTERM)
_VLEN_S1 = h5py.h5t.vlen_create(_S1)  # MATLAB_fields: vlen of 1-byte NULLTERM ASCII strings
_HVL = np.dtype([("len", np.uintp), ("p", np.uintp)])  # HDF5's hvl_t


def _vlen_names(names: Sequence[str]) -> tuple[np.ndarray, list[np.ndarray]]:
    """``names`` as an hvl_t buffer in MATLAB's exact string type; h5py's own conversion
    would pad the strings (NULLPAD) or, into NULLTERM, cut each byte to its terminator."""
    bufs = [np.frombuffer(n.encode("ascii"), dtype=np.uint8).copy() for n in names]
    hvl = np.array([(len(b), b.ctypes.data) for b in bufs], dtype=_HVL)
    return hvl, bufs  # the buffers must outlive the write


def _ref_name(i: int) -> str:
    """a, b, ..., z, aa, ab, ...: the names MATLAB gives objects in ``#refs#``."""
    out = ""
    i += 1
    while i:
        i, r = divmod(i - 1, 26)
        out = chr(97 + r) + out
    return out


class _Tree:
    """Writes struct/cell/char/sparse values into an open file as MATLAB does: cell
    elements and struct-array fields as object references into ``#refs#`` (whose first
    object is MATLAB's ``canonical empty``), empties as their size with ``MATLAB_empty``,
    and ``H5PATH`` where MATLAB stamps it."""

    def __init__(self, f: h5py.File, level: int) -> None:
        self.f = f
        self.level = level
        self.refs: h5py.Group | None = None
        self.count = 0

    def _new_ref(self) -> str:
        if self.refs is None and "#refs#" in self.f:  # appending to a file that has one
            self.refs = self.f["#refs#"]
        if self.refs is None:
            self.refs = self.f.create_group("#refs#")
            ds = self.refs.create_dataset("a", data=np.zeros(2, dtype=np.uint64))
            _str_attr(ds, "MATLAB_class", "canonical empty")
            ds.attrs.create("MATLAB_empty", np.uint8(1))
            self.count = 1
        name = _ref_name(self.count)
        self.count += 1
        while name in self.refs:  # names an earlier save already took
            name = _ref_name(self.count)
            self.count += 1
        return name

    def _in_refs(self, value: Any) -> h5py.Reference:
        name = self._new_ref()
        assert self.refs is not None
        return self.write(self.refs, name, value, f"/#refs#/{name}", name).ref

    def _fields_attr(self, obj: h5py.HLObject, names: Sequence[str]) -> None:
        hvl, keep = _vlen_names(names)
        if sum(map(len, names)) < FIELDS_IN_REFS_CHARS:
            aid = h5py.h5a.create(obj.id, b"MATLAB_fields", _VLEN_S1, h5py.h5s.create_simple((len(names),)))
            aid.write(hvl, mtype=_VLEN_S1)
        else:
            name = self._new_ref()
            assert self.refs is not None
            space = h5py.h5s.create_simple((len(names),))
            dsid = h5py.h5d.create(self.refs.id, name.encode(), _VLEN_S1, space)
            dsid.write(h5py.h5s.ALL, h5py.h5s.ALL, hvl, mtype=_VLEN_S1)
            obj.attrs.create("MATLAB_fields", h5py.Dataset(dsid).ref, dtype=h5py.ref_dtype)
        del keep

    def _empty(self, group: h5py.Group, name: str, dims: Sequence[int], cls: str) -> h5py.Dataset:
        ds = group.create_dataset(name, data=np.array(dims, dtype=np.uint64))
        _str_attr(ds, "MATLAB_class", cls)
        ds.attrs.create("MATLAB_empty", np.uint8(1))
        return ds

    def write(
        self, group: h5py.Group, name: str, value: Any, h5path: str | None, label: str
    ) -> h5py.HLObject:
        """``value`` as ``group[name]``; ``h5path`` its H5PATH (None: none), ``label`` what
        its children's H5PATH appends (MATLAB's concatenation: ``/s`` then ``/slevel1``)."""
        obj = self._write(group, name, value, h5path, label)
        if h5path is not None:
            _str_attr(obj, "H5PATH", h5path)
        return obj

    def _write(
        self, group: h5py.Group, name: str, value: Any, h5path: str | None, label: str
    ) -> h5py.HLObject:
        inner = (h5path or "") + label
        if isinstance(value, Char):
            if value.units.size == 0:
                return self._empty(group, name, value.units.shape, "char")
            ds = group.create_dataset(
                name, data=value.units.reshape(-1, order="F").astype("<u2").reshape(value.units.shape[::-1])
            )
            _str_attr(ds, "MATLAB_class", "char")
            ds.attrs.create("MATLAB_int_decode", np.int32(2))
            return ds
        if isinstance(value, Cell):
            if not value.items:
                return self._empty(group, name, value.dims, "cell")
            refs = np.array([self._in_refs(v) for v in value.items], dtype=h5py.ref_dtype)
            ds = group.create_dataset(name, data=refs.reshape(value.dims[::-1]))
            _str_attr(ds, "MATLAB_class", "cell")
            return ds
        if isinstance(value, Struct):
            n = math.prod(value.dims)
            if n == 0 or not value.names:
                ds = self._empty(group, name, value.dims, "struct")
                if value.names:
                    self._fields_attr(ds, value.names)
                return ds
            g = group.create_group(name)
            _str_attr(g, "MATLAB_class", "struct")
            if len(value.names) > 1:  # MATLAB leaves the attribute out of a one-field struct
                self._fields_attr(g, value.names)
            for j, field in enumerate(value.names):
                if value.dims == (1, 1):
                    self.write(g, field, value.elems[0][j], inner, field)
                else:
                    refs = np.array([self._in_refs(e[j]) for e in value.elems], dtype=h5py.ref_dtype)
                    g.create_dataset(field, data=refs.reshape(value.dims[::-1]))
            return g
        if isinstance(value, Sparse):
            g = group.create_group(name)
            _str_attr(g, "MATLAB_class", value.matlab_class)
            if value.matlab_class == "logical":
                g.attrs.create("MATLAB_int_decode", np.int32(1))
            g.attrs.create("MATLAB_sparse", np.uint64(value.dims[0]))
            if value.data.size:
                g.create_dataset("data", data=value.data.view(_stored_dtype(value.data.dtype)))
                g.create_dataset("ir", data=value.ir.astype(np.uint64))
            g.create_dataset("jc", data=value.jc.astype(np.uint64))
            return g
        arr = np.asarray(value)
        cls = STORED_DTYPES[arr.dtype.str]
        if arr.size == 0:
            return self._empty(group, name, arr.shape, cls)
        data = arr.reshape(-1, order="F").view(_stored_dtype(arr.dtype)).reshape(arr.shape[::-1])
        if self.level and data.nbytes >= _MIN_COMPRESS_BYTES:
            ds = _write_deflated(group, name, data, self.level)
        else:
            ds = group.create_dataset(name, data=data)
        _str_attr(ds, "MATLAB_class", cls)
        if cls == "logical":
            ds.attrs.create("MATLAB_int_decode", np.int32(1))
        return ds


def _split_key(variables: Sequence[tuple[Variable, Any]], level: int) -> tuple[Any, ...] | None:
    """The layout key of a save of one plain, uncompressed variable above the small-file
    templates' size (a training loop saving the same large tensor every step), or None."""
    if len(variables) != 1 or level:
        return None
    spec = variables[0][0]
    if not isinstance(spec, VarSpec) or spec.deferred or spec.mclass or spec.nbytes <= TEMPLATE_MAX_BYTES:
        return None
    return (spec.name, spec.dtype, spec.dims)


def _write_from_split(path: str, t: _Split, variables: Sequence[tuple[Variable, Any]]) -> None:
    """h5py's layout without h5py: its metadata from the cache (only the MAT header's time
    stamp is new), the payload straight from the ring; three ``pwrite``s into the empty
    temporary, opened without ``O_TRUNC`` (on ext4 that would flush the file at close)."""
    ((_, payload),) = _payloads(variables, (t.offset,))
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        if os.fstat(fd).st_size:
            os.ftruncate(fd, 0)
        pwrite_all(fd, header() + t.head[128:], 0)
        write_payload(fd, payload, t.offset)
        pwrite_all(fd, t.tail, t.offset + payload.nbytes)
    finally:
        os.close(fd)


def _template_key(variables: Sequence[tuple[Variable, Any]], level: int) -> tuple[Any, ...] | None:
    """What fixes a file's layout, or None when it is not a plain small numeric save."""
    key = []
    total = 0
    for spec, _ in variables:
        if not isinstance(spec, VarSpec) or spec.deferred or spec.mclass:
            return None
        if level and spec.nbytes >= _MIN_COMPRESS_BYTES:
            return None  # chunked and deflated: not a fixed layout
        total += spec.nbytes
        key.append((spec.name, spec.dtype, spec.dims))
    return tuple(key) if total <= TEMPLATE_MAX_BYTES else None


def _payloads(
    variables: Sequence[tuple[Variable, Any]], offsets: Sequence[int | None]
) -> list[tuple[int, np.ndarray]]:
    return [
        (off, _stored(spec, arr).reshape(-1).view(np.uint8))  # type: ignore[arg-type]
        for (spec, arr), off in zip(variables, offsets, strict=True)
        if off is not None
    ]


def _write_from_template(path: str, t: _Template, variables: Sequence[tuple[Variable, Any]]) -> None:
    image = bytearray(t.image)
    for offset, data in _payloads(variables, t.offsets):
        image[offset : offset + data.nbytes] = data.data
    image[:128] = header()
    write_new_file(path, image)


def _fill(
    f: h5py.File, variables: Sequence[tuple[Variable, Any]], level: int
) -> tuple[list[int | None], dict[str, list[int]]]:
    """Lay the variables out in ``f``; returns each one's payload offset (None: written
    already, or none) and the holes of deferred variables."""
    holes: dict[str, list[int]] = {}
    offsets: list[int | None] = []
    tree = _Tree(f, level)
    for spec, arr in variables:
        offsets.append(None)
        if isinstance(spec, TreeSpec):
            tree.write(f, spec.name, arr, None, f"/{spec.name}")
            continue
        if spec.mclass and not spec.deferred:
            tree.write(f, spec.name, Char(arr), None, f"/{spec.name}")
            continue
        if math.prod(spec.dims) == 0:
            ds = f.create_dataset(spec.name, data=np.array(spec.dims, dtype=np.uint64))
            _str_attr(ds, "MATLAB_class", spec.matlab_class)
            ds.attrs.create("MATLAB_empty", np.uint8(1))
            continue
        if spec.deferred:
            ds, offset = _reserve(f, spec.name, spec.dims[::-1], _stored_dtype(np.dtype(spec.dtype)))
            holes[spec.name] = [offset]
        elif level and (data := _stored(spec, arr)).nbytes >= _MIN_COMPRESS_BYTES:
            ds = _write_deflated(f, spec.name, data, level)
        else:
            data = _stored(spec, arr)
            ds, offsets[-1] = _reserve(f, spec.name, data.shape, data.dtype)
        _str_attr(ds, "MATLAB_class", spec.matlab_class)
        if spec.matlab_class in ("logical", "char"):
            ds.attrs.create("MATLAB_int_decode", np.int32(1 if spec.matlab_class == "logical" else 2))
    return offsets, holes


def append_v73(path: str, variables: Sequence[tuple[Variable, Any]], level: int = 0) -> None:
    """Add or replace ``variables`` in the v7.3 file at ``path`` (a private copy of the
    user's file: the caller renames it into place). A replaced variable's old objects in
    ``#refs#`` are left unreferenced, as MATLAB leaves them."""
    with h5py.File(path, "r+", libver=("earliest", "v108")) as f:
        for spec, _ in variables:
            if spec.name in f:
                del f[spec.name]
        offsets, _ = _fill(f, variables, level)
    fd = os.open(path, os.O_RDWR)
    try:
        for offset, data in _payloads(variables, offsets):
            pwrite_all(fd, data, offset)
    finally:
        os.close(fd)


def write_v73(path: str, variables: Sequence[tuple[Variable, Any]], level: int = 0) -> dict[str, list[int]]:
    """``level`` 1-9: deflate in chunks of at most 64 KiB, as MATLAB's ``save -v7.3`` does.

    Deferred variables (larger than the ring) get their space reserved; the returned
    file offsets are where their pieces go.
    """
    key = _template_key(variables, level)
    if key is not None and (template := TEMPLATES.get(key)) is not None:
        _write_from_template(path, template, variables)
        return {}
    split_key = _split_key(variables, level)
    if split_key is not None:
        with _splits_lock:
            split = _SPLITS.get(split_key)
        if split is not None:
            _write_from_split(path, split, variables)
            return {}
    with h5py.File(
        path,
        "w",
        userblock_size=USERBLOCK,
        libver=("earliest", "v108"),
        alignment_threshold=DIRECT_MIN_BYTES,
        alignment_interval=ALIGNMENT,
    ) as f:
        offsets, holes = _fill(f, variables, level)
    fd = os.open(path, os.O_RDWR)
    try:
        for offset, data in _payloads(variables, offsets):
            write_payload(fd, data, offset)
        pwrite_all(fd, np.frombuffer(header(), np.uint8), 0)
        if key is not None:
            size = os.fstat(fd).st_size
            image = os.pread(fd, size, 0)
            if len(image) == size:
                TEMPLATES.put(key, _Template(image, tuple(offsets)))
        first = variables[0][0]
        if split_key is not None and offsets[0] is not None and isinstance(first, VarSpec):
            _keep_split(fd, split_key, offsets[0], first.nbytes)
    finally:
        os.close(fd)
    return holes
