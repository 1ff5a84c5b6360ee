"""``matspool verify`` for v7.3 files: MATLAB's userblock header, each top-level object's
``MATLAB_class`` read with h5py, every variable read with ``mat73``, the two views compared.

Threads: the caller's.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from .verify_report import NUMERIC, USERBLOCK, V73_TEXT, FileReport, VarReport, header_text, quiet

__all__ = ["verify_v73"]

# -- v7.3 ----------------------------------------------------------------------------------


def _attr_text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("ascii", "replace")
    if isinstance(value, np.ndarray) and value.dtype.kind == "S":
        return b"".join(value.ravel().tolist()).decode("ascii", "replace")
    return str(value)


def _field_names(group: Any) -> list[str]:
    """MATLAB_fields (in MATLAB's order); the group's members where that attribute is
    missing or not a list of names (MATLAB stores it differently for hundreds of fields)."""
    try:
        raw = group.attrs.get("MATLAB_fields")
        if isinstance(raw, np.ndarray) and raw.dtype == object and raw.ndim == 1:
            return [b"".join(np.asarray(chars).ravel().tolist()).decode("ascii", "replace") for chars in raw]
    except (OSError, TypeError, ValueError):
        pass
    return list(group.keys())


def _dtype_ok(cls: str, dt: np.dtype, h5py: Any) -> bool:
    code: str = dt.str[1:]  # without the byte order
    if cls in NUMERIC:
        if dt.names is not None:
            real: str = dt["real"].str[1:]
            return set(dt.names) == {"real", "imag"} and real == NUMERIC[cls]
        return code == NUMERIC[cls]
    if cls == "logical":
        return code == "u1"
    if cls == "char":
        return code == "u2"
    if cls == "cell":
        return h5py.check_dtype(ref=dt) is not None
    return True  # classes matspool does not write are reported as they are


def _mat73_value(path: str, name: str) -> tuple[bool, Any]:
    import mat73

    with quiet():
        data = mat73.loadmat(path, only_include=[name], verbose=False)
    return name in data, data.get(name)


def _cross_check(rep: FileReport, var: VarReport, found: bool, value: Any) -> None:
    """What mat73 read must be what the attributes say."""
    where = f"variable {var.name!r}"
    if not found:
        rep.errors.append(f"{where}: mat73 does not find it")
        return
    n = math.prod(var.size)
    if var.sparse:
        if tuple(getattr(value, "shape", ())) != tuple(var.size):
            rep.errors.append(
                f"{where}: mat73 reads a sparse matrix of shape "
                f"{getattr(value, 'shape', None)}, the attributes say {var.size_text}"
            )
    elif var.matlab_class == "struct":
        if not var.fields:  # a struct without fields (MATLAB_empty): nothing to compare
            return
        if not isinstance(value, dict) or sorted(value) != sorted(var.fields):
            got = sorted(value) if isinstance(value, dict) else type(value).__name__
            rep.errors.append(f"{where}: mat73 reads fields {got}, MATLAB_fields say {var.fields}")
    elif var.matlab_class == "cell":
        if not isinstance(value, list) and n:
            rep.errors.append(f"{where}: mat73 reads {type(value).__name__}, not a cell")
    elif var.matlab_class in NUMERIC or var.matlab_class == "logical":
        if value is None:  # mat73's empty array
            if n:
                rep.errors.append(f"{where}: mat73 reads nothing, the size is {var.size_text}")
            return
        arr = np.asarray(value)
        if arr.size != n:
            rep.errors.append(f"{where}: mat73 reads {arr.size} elements, {var.size_text} has {n}")
        if bool(np.iscomplexobj(arr)) != var.complex:
            rep.errors.append(f"{where}: complex in one reader, real in the other")
        if var.logical and arr.dtype != np.bool_:
            rep.errors.append(f"{where}: logical, but mat73 reads {arr.dtype}")


def verify_v73(path: str, head: bytes, size: int, rep: FileReport) -> None:
    import h5py

    rep.format, rep.header = "v7.3", header_text(head)
    rep.userblock_valid = head.startswith(V73_TEXT) and head[124:128] == b"\x00\x02IM"
    if not rep.userblock_valid:
        rep.errors.append(
            "the userblock holds no MATLAB 7.3 header (text 'MATLAB 7.3 MAT-file', "
            "version 0x0200, 'IM'): MATLAB does not take it for a MAT-file"
        )
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        m = re.search(r"truncated file: eof = (\d+), sblock->base_addr = (\d+), stored_eof = (\d+)", str(e))
        if m:
            _, base, stored = map(int, m.groups())
            rep.errors.append(f"truncated: {size} bytes, its HDF5 superblock says {base + stored}")
        else:
            rep.errors.append(f"h5py cannot open it: {e}")
        return
    with f:
        if f.userblock_size != USERBLOCK:
            rep.errors.append(f"HDF5 userblock of {f.userblock_size} bytes, MATLAB's is {USERBLOCK}")
        for name, obj in f.items():
            if name.startswith("#"):  # #refs#, #subsystem#: MATLAB's own bookkeeping
                continue
            where = f"variable {name!r}"
            try:
                var = _describe_h5(name, obj, h5py, rep)
            except Exception as e:  # noqa: BLE001
                rep.errors.append(f"{where}: h5py cannot read it: {type(e).__name__}: {e}")
                continue
            rep.variables.append(var)
    for var in rep.variables:
        if var.matlab_class == "cell" and len(var.size) > 2:
            continue  # mat73 reads cells as nested 2-d lists: an N-d cell is beyond it, MATLAB's too
        try:
            found, value = _mat73_value(path, var.name)
        except Exception as e:  # noqa: BLE001
            rep.errors.append(f"variable {var.name!r}: mat73 cannot read it: {type(e).__name__}: {e}")
            continue
        _cross_check(rep, var, found, value)


def _describe_h5(name: str, obj: Any, h5py: Any, rep: FileReport) -> VarReport:
    where = f"variable {name!r}"
    has_class = "MATLAB_class" in obj.attrs
    cls = _attr_text(obj.attrs["MATLAB_class"]) if has_class else None
    if not has_class:
        rep.errors.append(f"{where}: no MATLAB_class attribute, so MATLAB cannot tell its class")
    if isinstance(obj, h5py.Group) and "MATLAB_sparse" in obj.attrs:
        # MATLAB's sparse: CSC arrays data/ir/jc, the row count in MATLAB_sparse
        var = VarReport(
            name,
            cls or "sparse?",
            [int(obj.attrs["MATLAB_sparse"]), len(obj["jc"]) - 1],
            sparse=True,
            logical=cls == "logical",
            class_attribute=has_class,
        )
        data = obj.get("data")
        var.complex = data is not None and data.dtype.names is not None
        return var
    if isinstance(obj, h5py.Group):
        var = VarReport(name, cls or "struct?", [1, 1], class_attribute=has_class)
        var.fields = _field_names(obj)
        missing = [k for k in var.fields if k not in obj]
        if missing:
            rep.errors.append(f"{where}: MATLAB_fields lists {missing}, which the group lacks")
        first = obj.get(var.fields[0]) if var.fields and not missing else None
        if (
            isinstance(first, h5py.Dataset)
            and "MATLAB_class" not in first.attrs
            and h5py.check_dtype(ref=first.dtype) is not None
        ):
            # a struct array: each field is an array of references, one per element
            var.size = list(reversed(first.shape)) + [1] * (first.ndim < 2)
        return var
    if not isinstance(obj, h5py.Dataset):
        raise TypeError(f"an HDF5 {type(obj).__name__}, not a dataset or group")
    dt = obj.dtype
    if obj.attrs.get("MATLAB_empty"):
        dims = [int(d) for d in np.asarray(obj[()]).ravel()]
    else:
        dims = list(reversed(obj.shape)) or [1, 1]  # HDF5 dims are MATLAB's, reversed
        if len(dims) == 1:
            dims.append(1)
    var = VarReport(name, cls or f"? ({dt})", dims, class_attribute=has_class)
    var.complex = dt.names is not None and set(dt.names) == {"real", "imag"}
    if cls == "struct":  # only a struct without fields is a dataset (MATLAB_empty)
        var.fields = []
    var.logical = cls == "logical"
    if var.logical and not obj.attrs.get("MATLAB_empty") and "MATLAB_int_decode" not in obj.attrs:
        rep.errors.append(f"{where}: logical without MATLAB_int_decode")
    if cls and not obj.attrs.get("MATLAB_empty") and not _dtype_ok(cls, dt, h5py):
        rep.errors.append(f"{where}: class {cls} but the dataset holds {dt}")
    return var
