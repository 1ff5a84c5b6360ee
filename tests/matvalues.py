"""What MATLAB holds in a .mat file, read without any of the readers under test.

``load(path)`` walks a MAT v5 file's elements (either byte order, compressed or not) or a
v7.3 file's HDF5 objects and gives each variable as a canonical tuple that keeps exactly
what MATLAB would see: class, size, complexity, the values' bits, field order, cell
layout, sparse structure. Two files hold the same variables when their ``load`` results
are equal. ``to_input`` turns such a value back into what ``matspool.save`` takes.

Canonical forms (dims are MATLAB's size, data column-major):
  ("num", class, dims, is_complex, bytes)     numeric and logical
  ("char", dims, UTF-16 code units)
  ("cell", dims, items)
  ("struct", dims, field names, elements)     each element a tuple of field values
  ("sparse", class, dims, is_complex, ir, jc, bytes)
  ("unsupported", what)                       objects, function handles, opaque
"""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import scipy.sparse as sp

__all__ = ["NotExpressible", "load", "load_v5", "load_v73", "to_input"]

_CLASS = {
    6: "double",
    7: "single",
    8: "int8",
    9: "uint8",
    10: "int16",
    11: "uint16",
    12: "int32",
    13: "uint32",
    14: "int64",
    15: "uint64",
}
_DTYPE = {
    "double": "f8",
    "single": "f4",
    "int8": "i1",
    "uint8": "u1",
    "int16": "i2",
    "uint16": "u2",
    "int32": "i4",
    "uint32": "u4",
    "int64": "i8",
    "uint64": "u8",
    "logical": "u1",
}
_MI = {1: "i1", 2: "u1", 3: "i2", 4: "u2", 5: "i4", 6: "u4", 7: "f4", 9: "f8", 12: "i8", 13: "u8"}


class NotExpressible(Exception):
    """A MATLAB value with no spelling in matspool's input (say, a 1x0 char)."""


def _num(cls: str, dims: tuple[int, ...], real: np.ndarray, imag: np.ndarray | None) -> tuple[Any, ...]:
    dt = np.dtype("<" + _DTYPE[cls])
    data = real.astype(dt).tobytes() + (imag.astype(dt).tobytes() if imag is not None else b"")
    return ("num", cls, dims, imag is not None, data)


# -- MAT v5 ------------------------------------------------------------------------------------
class _V5:
    def __init__(self, order: str) -> None:
        self.o = order

    def elements(self, buf: bytes) -> list[tuple[int, bytes]]:
        out, p = [], 0
        while p + 8 <= len(buf):
            mi, n = struct.unpack(self.o + "II", buf[p : p + 8])
            if mi >> 16:  # small data element
                n, mi = mi >> 16, mi & 0xFFFF
                out.append((mi, buf[p + 4 : p + 4 + n]))
                p += 8
                continue
            out.append((mi, buf[p + 8 : p + 8 + n]))
            p += 8 + n + (0 if mi == 15 else -n % 8)  # a compressed element is not padded
        return out

    def data(self, mi: int, raw: bytes) -> np.ndarray:
        return np.frombuffer(raw, dtype=self.o + _MI[mi])

    def matrix(self, body: bytes) -> tuple[str, Any]:
        el = self.elements(body)
        if not el:
            return "", ("num", "double", (0, 0), False, b"")  # an empty miMATRIX: []
        flags = self.data(6, el[0][1][:8])
        cls_id, is_complex, is_logical = int(flags[0]) & 0xFF, bool(flags[0] & 0x800), bool(flags[0] & 0x200)
        dims = tuple(int(d) for d in self.data(5, el[1][1]))
        name = el[2][1].decode("utf-8")
        if cls_id in (3, 16, 17):
            kind = {3: "object", 16: "function handle", 17: "opaque (string, datetime, table, ...)"}[cls_id]
            return name, ("unsupported", kind)
        rest = el[3:]
        n = math.prod(dims)
        if cls_id == 4:  # char
            mi, raw = rest[0] if rest else (16, b"")
            if mi == 16:
                units = np.frombuffer(raw.decode("utf-8").encode("utf-16-le"), "<u2")
            elif mi == 17:
                units = np.frombuffer(raw, self.o + "u2")
            elif mi == 18:
                units = np.frombuffer(
                    raw.decode("utf-32-le" if self.o == "<" else "utf-32-be").encode("utf-16-le"), "<u2"
                )
            else:
                units = self.data(mi, raw).astype("<u2")
            return name, ("char", dims, tuple(int(u) for u in units))
        if cls_id == 1:
            return name, ("cell", dims, tuple(self.matrix(b)[1] for _, b in rest[:n]))
        if cls_id == 2:
            width = int(self.data(5, rest[0][1])[0])
            raw = rest[1][1]
            names = tuple(raw[i : i + width].split(b"\0", 1)[0].decode() for i in range(0, len(raw), width))
            values = [self.matrix(b)[1] for _, b in rest[2:]]
            k = len(names)
            return name, ("struct", dims, names, tuple(tuple(values[i * k : (i + 1) * k]) for i in range(n)))
        if cls_id == 5:
            ir = tuple(int(x) for x in self.data(rest[0][0], rest[0][1]))
            jc = tuple(int(x) for x in self.data(rest[1][0], rest[1][1]))
            nnz = jc[-1] if jc else 0
            mi = 2 if is_logical and len(rest[2][1]) == nnz else rest[2][0]  # MATLAB: 1-byte logicals
            real = self.data(mi, rest[2][1])[:nnz]
            imag = self.data(rest[3][0], rest[3][1])[:nnz] if is_complex else None
            cls = "logical" if is_logical else "double"
            num = _num(cls, (nnz,), real != 0 if is_logical else real, imag)
            return name, ("sparse", cls, dims, is_complex, ir[:nnz], jc, num[4])
        cls = "logical" if is_logical else _CLASS[cls_id]
        real = self.data(rest[0][0], rest[0][1]) if rest else np.zeros(0)
        imag = self.data(rest[1][0], rest[1][1]) if is_complex else None
        return name, _num(cls, dims, real, imag)


def load_v5(path: Path) -> dict[str, Any]:
    raw = Path(path).read_bytes()
    v5 = _V5("<" if raw[126:128] == b"IM" else ">")
    out = {}
    for mi, body in v5.elements(raw[128:]):
        if mi == 15:
            ((mi, body),) = v5.elements(zlib.decompress(body))
        if mi != 14:
            continue
        name, value = v5.matrix(body)
        out[name] = value
    return out


# -- MAT v7.3 ----------------------------------------------------------------------------------
def _attr(obj: h5py.HLObject, name: str) -> str:
    v = obj.attrs.get(name, b"")
    return v.decode() if isinstance(v, bytes) else str(v)


def _fields(f: h5py.File, obj: h5py.HLObject) -> tuple[str, ...] | None:
    if "MATLAB_fields" not in obj.attrs:
        return None
    a = obj.attrs["MATLAB_fields"]
    names = f[a][()] if isinstance(a, h5py.Reference) else a
    return tuple(b"".join(n).decode() for n in names)


def _v73(f: h5py.File, obj: h5py.HLObject) -> Any:
    cls = _attr(obj, "MATLAB_class")
    if cls in ("function_handle",) or _attr(obj, "MATLAB_object_decode"):
        return ("unsupported", cls or "object")
    if isinstance(obj, h5py.Group):
        if "MATLAB_sparse" in obj.attrs:
            m = int(obj.attrs["MATLAB_sparse"])
            jc = tuple(int(x) for x in obj["jc"][()])
            ir = tuple(int(x) for x in obj["ir"][()]) if "ir" in obj else ()
            data = obj["data"][()] if "data" in obj else np.zeros(0)
            cplx = data.dtype.names is not None
            real, imag = (data["real"], data["imag"]) if cplx else (data, None)
            num = _num(cls, (len(ir),), real, imag)
            return ("sparse", cls, (m, len(jc) - 1), cplx, ir, jc, num[4])
        names = _fields(f, obj) or tuple(obj)
        if not names:  # a group without fields (not MATLAB's layout, but readable)
            return ("struct", (1, 1), (), ((),))
        first = obj[names[0]]
        if (
            isinstance(first, h5py.Dataset)
            and h5py.check_ref_dtype(first.dtype) is not None
            and "MATLAB_class" not in first.attrs
        ):
            dims = first.shape[::-1]
            cols = [[_v73(f, f[r]) for r in obj[k][()].ravel()] for k in names]
            return ("struct", dims, names, tuple(zip(*cols, strict=True)))
        return ("struct", (1, 1), names, (tuple(_v73(f, obj[k]) for k in names),))
    if obj.attrs.get("MATLAB_empty", 0):
        dims = tuple(int(d) for d in obj[()])
        if cls == "char":
            return ("char", dims, ())
        if cls == "cell":
            return ("cell", dims, ())
        if cls == "struct":
            elems = () if math.prod(dims) == 0 else ((),) * math.prod(dims)
            return ("struct", dims, _fields(f, obj) or (), elems)
        return ("num", cls, dims, False, b"")
    data = obj[()]
    dims = data.shape[::-1]
    if cls == "cell":
        return ("cell", dims, tuple(_v73(f, f[r]) for r in data.ravel()))
    if cls == "char":
        return ("char", dims, tuple(int(u) for u in data.ravel()))
    if data.dtype.names:
        return _num(cls, dims, data["real"].ravel(), data["imag"].ravel())
    return _num(cls, dims, data.ravel(), None)


def load_v73(path: Path) -> dict[str, Any]:
    with h5py.File(path, "r") as f:
        return {k: _v73(f, f[k]) for k in f if not k.startswith("#")}


def load(path: Path) -> dict[str, Any]:
    return load_v73(path) if h5py.is_hdf5(path) else load_v5(path)


# -- back to matspool's input -----------------------------------------------------------------------
def _fill(dims: tuple[int, ...], items: list[Any], dtype: Any = object) -> np.ndarray:
    arr = np.empty(math.prod(dims), dtype=dtype)
    for i, v in enumerate(items):
        arr[i] = v
    return arr.reshape(dims, order="F")


def to_input(v: Any) -> Any:
    """The value to pass to ``matspool.save`` for canonical value ``v``."""
    kind = v[0]
    if kind == "unsupported":
        raise NotExpressible(f"MATLAB {v[1]} (UnsupportedTypeError)")
    if kind == "num":
        _, cls, dims, cplx, data = v
        dt = np.dtype("<" + _DTYPE[cls])
        flat = np.frombuffer(data, dtype=dt)
        if cplx:
            half = flat.size // 2
            flat = flat[:half] + 1j * flat[half:].astype(flat.dtype)
            flat = flat.astype(np.complex64 if cls == "single" else np.complex128)
            if cls not in ("double", "single"):
                raise NotExpressible(f"complex {cls}")
        if cls == "logical":
            flat = flat != 0
        return flat.reshape(dims, order="F").copy()
    if kind == "char":
        _, dims, units = v
        text = np.array(units, dtype="<u2")
        if dims == (0, 0):
            return ""
        if len(dims) != 2 or 0 in dims:
            raise NotExpressible(f"a {'x'.join(map(str, dims))} char")
        rows = text.reshape(dims, order="F")
        strs = [r.tobytes().decode("utf-16-le", "surrogatepass") for r in rows]
        if any(s.endswith("\0") for s in strs) and dims[0] != 1:
            raise NotExpressible("a char matrix with trailing NULs (numpy str drops them)")
        return strs[0] if dims[0] == 1 else np.array(strs)
    if kind == "cell":
        _, dims, items = v
        return _fill(dims, [to_input(x) for x in items])
    if kind == "struct":
        _, dims, names, elems = v
        if dims == (1, 1):
            return {k: to_input(x) for k, x in zip(names, elems[0], strict=True)}
        dt = np.dtype([(k, object) for k in names])
        arr = np.empty(math.prod(dims), dtype=dt)
        for i, e in enumerate(elems):
            for k, x in zip(names, e, strict=True):
                arr[i][k] = to_input(x)
        return arr.reshape(dims, order="F")
    _, cls, dims, cplx, ir, jc, data = v
    flat = np.frombuffer(data, dtype="<f8" if cls == "double" else "<u1")
    if cplx:
        flat = flat[: len(ir)] + 1j * flat[len(ir) :]
    if cls == "logical":
        flat = flat != 0
    return sp.csc_matrix((flat, np.array(ir, dtype=np.int64), np.array(jc, dtype=np.int64)), shape=dims)
