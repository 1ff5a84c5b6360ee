"""How one MATLAB value becomes HDF5 objects in a v7.3 file, as MATLAB writes them: the
``MATLAB_class`` attributes, the stored element types (complex as ``{real, imag}``, logical
as uint8), chunked deflate compressed on every core, and struct/cell/char/sparse values as
trees (``_Tree``). ``v73`` decides the file around them: its userblock, where each payload
goes, the layouts it reuses.

Stateless: any writer thread may use it (a ``_Tree`` belongs to the one file it writes).
"""

from __future__ import annotations

import itertools
import math
import zlib
from collections.abc import Sequence
from typing import Any

import h5py
import numpy as np

from matspool._matlab import STORED_DTYPES
from matspool._protocol import VarSpec

from ._deflate import ordered_map
from ._values import Cell, Char, Sparse, Struct

__all__ = [
    "CHUNK_BYTES",
    "FIELDS_IN_REFS_CHARS",
    "_MIN_COMPRESS_BYTES",
    "_Tree",
    "_stored",
    "_stored_dtype",
    "_str_attr",
    "_write_deflated",
]


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
