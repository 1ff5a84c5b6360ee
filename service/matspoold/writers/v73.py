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

How each value becomes HDF5 objects (attributes, stored types, deflated chunks, the
trees) is ``_v73values``; this module lays out the file around them: the userblock, each
payload's place (written with ``pwrite`` from the ring, or spliced from a ``/dev/shm``
ring: ``shmspan``), the layouts kept for reuse.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from typing import Any, Final

import h5py
import numpy as np

from matspool._protocol import TreeSpec, Variable, VarSpec

from ..shmspan import ShmSpan
from ._direct import DIRECT_MIN_BYTES, write_payload
from ._files import pwrite_all, write_new_file
from ._layouts import _SPLITS, TEMPLATE_MAX_BYTES, TEMPLATES, _keep_split, _Split, _splits_lock, _Template
from ._stamp import PerSecond
from ._v73values import _MIN_COMPRESS_BYTES, _stored, _stored_dtype, _str_attr, _Tree, _write_deflated
from ._values import Char, column_bytes

__all__ = [
    "TEMPLATES",
    "TEMPLATE_MAX_BYTES",
    "USERBLOCK",
    "append_v73",
    "header",
    "image_from_template",
    "template_for",
    "write_from_template",
    "write_v73",
]

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
        _put(fd, payload, t.offset)
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
) -> list[tuple[int, np.ndarray | ShmSpan]]:
    return [
        (off, arr if isinstance(arr, ShmSpan) else _stored(spec, arr).reshape(-1).view(np.uint8))  # type: ignore[arg-type]
        for (spec, arr), off in zip(variables, offsets, strict=True)
        if off is not None
    ]


def _put(fd: int, data: np.ndarray | ShmSpan, offset: int) -> None:
    """A payload at its dataset's offset: from the ring (``_direct``), or a ``/dev/shm``
    ring's span copied by the kernel (``shmspan``)."""
    if isinstance(data, ShmSpan):
        data.copy_to(fd, offset)
    else:
        write_payload(fd, data, offset)


def image_from_template(t: _Template, variables: Sequence[tuple[Variable, Any]]) -> bytearray:
    """The whole file of ``variables`` laid out as ``t`` (from :func:`template_for`), in
    memory: the template's bytes, this save's payloads and header."""
    image = bytearray(t.image)
    for (_, arr), offset in zip(variables, t.offsets, strict=True):
        if offset is not None:  # the ring's bytes as they are: what _stored reinterprets
            assert isinstance(arr, np.ndarray)  # templates are smaller than any span
            image[offset : offset + arr.nbytes] = column_bytes(arr)
    image[:128] = _header_now()
    return image


#: ``header()`` of the current second: a small file from a template spent more on
#: formatting the time than on its payload
_header_now: Final = PerSecond(lambda now: header(now))  # looked up per call: a replaced header is used


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
        elif isinstance(arr, ShmSpan):  # its bytes are copied in after the layout
            ds, offsets[-1] = _reserve(f, spec.name, spec.dims[::-1], _stored_dtype(arr.dtype))
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


def template_for(variables: Sequence[tuple[Variable, Any]], level: int = 0) -> _Template | None:
    """The layout a small plain save of ``variables`` is written from, if one is known (the
    caller then holds it: a later eviction from the cache does not take it away)."""
    key = _template_key(variables, level)
    return None if key is None else TEMPLATES.get(key)


def write_from_template(path: str, template: _Template, variables: Sequence[tuple[Variable, Any]]) -> None:
    """``variables`` into ``path`` (the new, empty temporary, by descriptor) laid out as
    ``template`` (from :func:`template_for`): no HDF5, so ``path`` may have no name."""
    write_new_file(path, image_from_template(template, variables))


def write_v73(path: str, variables: Sequence[tuple[Variable, Any]], level: int = 0) -> dict[str, list[int]]:
    """``level`` 1-9: deflate in chunks of at most 64 KiB, as MATLAB's ``save -v7.3`` does.

    Deferred variables (larger than the ring) get their space reserved; the returned
    file offsets are where their pieces go.
    """
    key = _template_key(variables, level)
    if key is not None and (template := TEMPLATES.get(key)) is not None:
        write_new_file(path, image_from_template(template, variables))
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
            _put(fd, data, offset)
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
