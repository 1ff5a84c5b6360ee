"""MAT v7.3 through h5py, laid out as MATLAB itself lays it out.

Matches ``shared/reference-mat/matlab_basic_v73.mat``: a 512-byte userblock whose first
128 bytes are the MAT header, superblock version 0 (``libver`` capped at v1.8 so MATLAB
before R2021b can read it), dims reversed (a column-major ``A`` of size [m n] is a
row-major (n, m) dataset: the ring bytes go in unchanged), ``MATLAB_class`` as a
fixed-length NULLTERM ASCII scalar attribute, logical as uint8 with
``MATLAB_int_decode`` = 1, complex as a ``{real, imag}`` compound, and empty arrays as a
uint64 vector of their size with ``MATLAB_empty`` = 1.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import h5py
import hdf5storage
import numpy as np
from matspool._protocol import TreeSpec, Variable, VarSpec

from ._deflate import ordered_map
from ._files import pwrite_all, write_new_file

__all__ = ["TEMPLATES", "TEMPLATE_MAX_BYTES", "USERBLOCK", "header", "write_v73"]

USERBLOCK = 512


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


_TREE_OPTIONS = hdf5storage.Options(matlab_compatible=True, store_python_metadata=False,
                                    compress=False, oned_as="row")


def _write_trees(path: str, trees: dict[str, Any]) -> None:
    """Structs, cells and chars through hdf5storage (groups with ``MATLAB_fields``, cells
    as references into ``#refs#``, chars as uint16), then its attributes are retyped to
    MATLAB's own: fixed-length NULLTERM ``MATLAB_class``, int32 ``MATLAB_int_decode``."""
    hdf5storage.writes(trees, filename=path, truncate_existing=False, options=_TREE_OPTIONS)
    with h5py.File(path, "r+") as f:
        def retype(_: str, obj: h5py.HLObject) -> None:
            attrs = obj.attrs
            cls = None
            if "MATLAB_class" in attrs:
                cls = attrs["MATLAB_class"]
                cls = cls.decode() if isinstance(cls, bytes) else str(cls)
                del attrs["MATLAB_class"]
                _str_attr(obj, "MATLAB_class", cls)
            if cls == "char" and "MATLAB_empty" in attrs:
                # '' is 0x0 in MATLAB and in our v5 files: MATLAB stores [0 0] and no
                # MATLAB_int_decode; hdf5storage writes [1 0] (1x0) and MATLAB_int_decode 8
                obj[...] = np.zeros(2, dtype=np.uint64)
                if "MATLAB_int_decode" in attrs:
                    del attrs["MATLAB_int_decode"]
            if "MATLAB_int_decode" in attrs:
                attrs["MATLAB_int_decode"] = np.int32(attrs["MATLAB_int_decode"])

        f.visititems(retype)


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
    ds = f.create_dataset(name, shape=data.shape, dtype=data.dtype, chunks=chunk,
                          compression="gzip", compression_opts=level)
    origins = list(itertools.product(*(range(0, n, c) for n, c in zip(data.shape, chunk))))

    def compress(batch: list[tuple[int, ...]]) -> list[tuple[tuple[int, ...], bytes]]:
        out = []
        for origin in batch:
            block = data[tuple(slice(o, o + c) for o, c in zip(origin, chunk))]
            if block.shape != chunk:  # edge chunks are stored full size, padded
                full = np.zeros(chunk, dtype=data.dtype)
                full[tuple(slice(0, n) for n in block.shape)] = block
                block = full
            raw = np.ascontiguousarray(block).reshape(-1).view(np.uint8)
            out.append((origin, zlib.compress(raw, level)))
        return out

    batches = [origins[i:i + _CHUNKS_PER_TASK] for i in range(0, len(origins), _CHUNKS_PER_TASK)]
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
    dsid = h5py.h5d.create(f.id, name.encode(), h5py.h5t.py_create(dtype, logical=True), space,
                           dcpl=dcpl)
    return h5py.Dataset(dsid), dsid.get_offset()


@dataclass(frozen=True)
class _Template:
    """A small file as h5py laid it out: every byte but the payloads and the header's
    time stamp depends only on the variables' names, types and sizes."""

    image: bytes
    offsets: tuple[int | None, ...]  # each variable's payload offset; None: no payload


TEMPLATE_MAX_BYTES = 1 << 20  # above this h5py's ~0.5 ms per file is lost in the payload
_TEMPLATES_KEPT = 128


class _TemplateCache:
    """Recently written small layouts, so a time-step loop saving the same variables pays
    h5py's file creation (~0.5 ms, most of a small file's cost) once, not every step."""

    def __init__(self, size: int = _TEMPLATES_KEPT) -> None:
        self._size = size
        self._lock = threading.Lock()
        self._items: OrderedDict[tuple[Any, ...], _Template] = OrderedDict()

    def get(self, key: tuple[Any, ...]) -> _Template | None:
        with self._lock:
            t = self._items.get(key)
            if t is not None:
                self._items.move_to_end(key)
            return t

    def put(self, key: tuple[Any, ...], template: _Template) -> None:
        with self._lock:
            self._items[key] = template
            while len(self._items) > self._size:
                self._items.popitem(last=False)


TEMPLATES = _TemplateCache()


def _template_key(variables: Sequence[tuple[Variable, Any]], level: int) -> tuple[Any, ...] | None:
    """What fixes a file's layout, or None when it is not a plain small numeric save."""
    key = []
    total = 0
    for spec, _ in variables:
        if not isinstance(spec, VarSpec) or spec.deferred:
            return None
        if level and spec.nbytes >= _MIN_COMPRESS_BYTES:
            return None  # chunked and deflated: not a fixed layout
        total += spec.nbytes
        key.append((spec.name, spec.dtype, spec.dims))
    return tuple(key) if total <= TEMPLATE_MAX_BYTES else None


def _payloads(variables: Sequence[tuple[Variable, Any]], offsets: Sequence[int | None]) -> list[tuple[int, np.ndarray]]:
    return [(off, _stored(spec, arr).reshape(-1).view(np.uint8))  # type: ignore[arg-type]
            for (spec, arr), off in zip(variables, offsets) if off is not None]


def _write_from_template(path: str, t: _Template, variables: Sequence[tuple[Variable, Any]]) -> None:
    image = bytearray(t.image)
    for offset, data in _payloads(variables, t.offsets):
        image[offset:offset + data.nbytes] = memoryview(data)
    image[:128] = header()
    write_new_file(path, image)


def write_v73(path: str, variables: Sequence[tuple[Variable, Any]], level: int = 0) -> dict[str, list[int]]:
    """``level`` 1-9: deflate in chunks of at most 64 KiB, as MATLAB's ``save -v7.3`` does.

    Deferred variables (larger than the ring) get their space reserved; the returned
    file offsets are where their pieces go.
    """
    key = _template_key(variables, level)
    if key is not None and (template := TEMPLATES.get(key)) is not None:
        _write_from_template(path, template, variables)
        return {}
    holes: dict[str, list[int]] = {}
    trees = {spec.name: value for spec, value in variables if isinstance(spec, TreeSpec)}
    offsets: list[int | None] = []
    with h5py.File(path, "w-", userblock_size=USERBLOCK, libver=("earliest", "v108")) as f:
        for spec, arr in variables:
            offsets.append(None)
            if isinstance(spec, TreeSpec):
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
            if spec.matlab_class == "logical":
                ds.attrs.create("MATLAB_int_decode", np.int32(1))
    if trees:
        _write_trees(path, trees)
    fd = os.open(path, os.O_RDWR)
    try:
        for offset, data in _payloads(variables, offsets):
            pwrite_all(fd, data, offset)
        pwrite_all(fd, np.frombuffer(header(), np.uint8), 0)
        if key is not None:
            size = os.fstat(fd).st_size
            image = os.pread(fd, size, 0)
            if len(image) == size:
                TEMPLATES.put(key, _Template(image, tuple(offsets)))
    finally:
        os.close(fd)
    return holes
