"""``matspool verify FILE...``: read .mat files back with independent readers and say what
MATLAB would see in them.

v5 files (``MATLAB 5.0 MAT-file`` header) are walked element by element (a file cut short
inside a variable is caught even where scipy would quietly return fewer variables), then
listed with ``scipy.io.whosmat`` and read with ``scipy.io.loadmat``. v7.3 files (the HDF5
signature at byte 512, behind MATLAB's 512-byte userblock) are checked for the userblock
header, their top-level objects' ``MATLAB_class`` attributes are read with h5py, and every
variable is read with ``mat73``. The two views of each file must agree.

Exit status 0 when every file is readable and consistent, 1 otherwise.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import re
import struct
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .writers import TMP_SUFFIX

__all__ = ["FileReport", "VarReport", "format_report", "run_verify", "verify_file"]

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
USERBLOCK = 512
HEADER_BYTES = 128
V5_TEXT = b"MATLAB 5.0 MAT-file"
V73_TEXT = b"MATLAB 7.3 MAT-file"
MI_MATRIX, MI_COMPRESSED = 14, 15

# MATLAB class -> the numpy element types its data may have
_NUMERIC = {
    "double": "f8", "single": "f4", "int8": "i1", "uint8": "u1", "int16": "i2", "uint16": "u2",
    "int32": "i4", "uint32": "u4", "int64": "i8", "uint64": "u8",
}


@dataclass
class VarReport:
    name: str
    matlab_class: str
    size: list[int]
    complex: bool = False
    logical: bool = False
    sparse: bool = False
    fields: list[str] | None = None  # structs: field names, one level
    class_attribute: bool | None = None  # v7.3: the MATLAB_class attribute is there

    @property
    def size_text(self) -> str:
        return "x".join(str(n) for n in self.size)


@dataclass
class FileReport:
    path: str
    ok: bool = False
    format: str | None = None
    header: str | None = None
    userblock_valid: bool | None = None  # v7.3 only
    nbytes: int | None = None
    variables: list[VarReport] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


# -- helpers -------------------------------------------------------------------------------

@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """mat73 prints and logs on its own (a file name not ending in .mat, a variable not
    found); none of that may land in the report, least of all in --json output."""
    logging.disable(logging.CRITICAL)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.disable(logging.NOTSET)


def _header_text(head: bytes) -> str:
    return head[:116].decode("ascii", "replace").rstrip(" \x00")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


# -- v5 ------------------------------------------------------------------------------------

def _walk_v5(path: str, head: bytes, size: int, rep: FileReport) -> int | None:
    """The number of top-level variables, from the element tags; None after an error."""
    endian = {b"IM": "<", b"MI": ">"}.get(head[126:128])
    if endian is None:
        rep.errors.append(f"bad v5 header: endian indicator {head[126:128]!r} (MATLAB writes 'IM')")
        return None
    version = struct.unpack(endian + "H", head[124:126])[0]
    if version != 0x0100:
        rep.errors.append(f"bad v5 header: version 0x{version:04x}, MATLAB needs 0x0100")
        return None
    count, offset = 0, HEADER_BYTES
    with open(path, "rb") as f:
        while offset < size:
            f.seek(offset)
            tag = f.read(8)
            if len(tag) < 8:
                rep.errors.append(f"truncated: {size - offset} stray bytes at byte {offset}, "
                                  "after the last complete variable")
                return None
            mdtype, nbytes = struct.unpack(endian + "II", tag)
            if mdtype not in (MI_MATRIX, MI_COMPRESSED):
                rep.errors.append(f"corrupt: data element of type {mdtype} at byte {offset} "
                                  "(a variable starts with miMATRIX or miCOMPRESSED)")
                return None
            end = offset + 8 + nbytes
            if end > size:
                rep.errors.append(
                    f"truncated: variable #{count + 1} at byte {offset} needs {nbytes} bytes, "
                    f"the file ends {size - offset - 8} bytes into it ({size} bytes in all)")
                return None
            if mdtype == MI_MATRIX:
                end += -nbytes % 8
            count, offset = count + 1, end
    return count


def _verify_v5(path: str, head: bytes, size: int, rep: FileReport) -> None:
    import scipy.io
    import scipy.sparse

    rep.format, rep.header = "v5", _header_text(head)
    count = _walk_v5(path, head, size, rep)
    if count is None:
        return
    try:
        listed = scipy.io.whosmat(path)
    except Exception as e:  # noqa: BLE001 - any reader failure is the finding
        rep.errors.append(f"scipy.io.whosmat cannot read it: {type(e).__name__}: {e}")
        return
    if len(listed) != count:
        rep.errors.append(f"inconsistent: {_plural(count, 'variable')} in the file, "
                          f"scipy.io.whosmat lists {len(listed)}")
    for name, shape, cls in listed:
        try:  # one variable at a time: memory stays at the largest one, not the file
            value = scipy.io.loadmat(path, variable_names=[name],
                                     chars_as_strings=False, squeeze_me=False)[name]
        except Exception as e:  # noqa: BLE001
            rep.errors.append(f"variable {name!r}: scipy.io.loadmat cannot read it: "
                              f"{type(e).__name__}: {e}")
            continue
        dims = list(getattr(value, "shape", shape))
        var = VarReport(name, cls, dims if cls == "char" else list(shape),
                        logical=cls == "logical")
        rep.variables.append(var)
        if scipy.sparse.issparse(value):  # whosmat says "sparse" (or "logical")
            var.sparse, var.complex = True, bool(np.iscomplexobj(value))
            var.matlab_class = "logical" if cls == "logical" or value.dtype == np.bool_ else "double"
            var.logical = var.matlab_class == "logical"
        if cls != "char" and tuple(dims) != tuple(shape):
            rep.errors.append(f"variable {name!r}: whosmat says {var.size_text}, loadmat reads "
                              f"{'x'.join(map(str, dims))}")
        if cls == "struct":
            var.fields = list(value.dtype.names or ())
        elif cls in _NUMERIC:
            # the stored element type may be narrower than the class (MATLAB keeps a double
            # of small integers as uint8), so only "numeric at all" is checked
            var.complex = bool(np.iscomplexobj(value))
            if value.dtype.kind not in "biufc":
                rep.errors.append(f"variable {name!r}: class {cls} but its data reads as {value.dtype}")


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
            return [b"".join(np.asarray(chars).ravel().tolist()).decode("ascii", "replace")
                    for chars in raw]
    except (OSError, TypeError, ValueError):
        pass
    return list(group.keys())


def _dtype_ok(cls: str, dt: np.dtype, h5py: Any) -> bool:
    code: str = dt.str[1:]  # without the byte order
    if cls in _NUMERIC:
        if dt.names is not None:
            real: str = dt["real"].str[1:]
            return set(dt.names) == {"real", "imag"} and real == _NUMERIC[cls]
        return code == _NUMERIC[cls]
    if cls == "logical":
        return code == "u1"
    if cls == "char":
        return code == "u2"
    if cls == "cell":
        return h5py.check_dtype(ref=dt) is not None
    return True  # classes matspool does not write are reported as they are


def _mat73_value(path: str, name: str) -> tuple[bool, Any]:
    import mat73

    with _quiet():
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
            rep.errors.append(f"{where}: mat73 reads a sparse matrix of shape "
                              f"{getattr(value, 'shape', None)}, the attributes say {var.size_text}")
    elif var.matlab_class == "struct":
        if not var.fields:  # a struct without fields (MATLAB_empty): nothing to compare
            return
        if not isinstance(value, dict) or sorted(value) != sorted(var.fields):
            got = sorted(value) if isinstance(value, dict) else type(value).__name__
            rep.errors.append(f"{where}: mat73 reads fields {got}, MATLAB_fields say {var.fields}")
    elif var.matlab_class == "cell":
        if not isinstance(value, list) and n:
            rep.errors.append(f"{where}: mat73 reads {type(value).__name__}, not a cell")
    elif var.matlab_class in _NUMERIC or var.matlab_class == "logical":
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


def _verify_v73(path: str, head: bytes, size: int, rep: FileReport) -> None:
    import h5py

    rep.format, rep.header = "v7.3", _header_text(head)
    rep.userblock_valid = head.startswith(V73_TEXT) and head[124:128] == b"\x00\x02IM"
    if not rep.userblock_valid:
        rep.errors.append("the userblock holds no MATLAB 7.3 header (text 'MATLAB 7.3 MAT-file', "
                          "version 0x0200, 'IM'): MATLAB does not take it for a MAT-file")
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
        var = VarReport(name, cls or "sparse?", [int(obj.attrs["MATLAB_sparse"]), len(obj["jc"]) - 1],
                        sparse=True, logical=cls == "logical", class_attribute=has_class)
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
        if (isinstance(first, h5py.Dataset) and "MATLAB_class" not in first.attrs
                and h5py.check_dtype(ref=first.dtype) is not None):
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


# -- one file, many files ------------------------------------------------------------------

def verify_file(path: str) -> FileReport:
    rep = FileReport(path)
    if os.path.basename(path).endswith(TMP_SUFFIX):
        rep.errors.append(f"a matspool temporary file ({TMP_SUFFIX}): a write that did not "
                          "finish or was abandoned, not a result; the finished file has the name "
                          "without the leading '.' and this suffix")
        return rep
    try:
        st = os.stat(path)
        if os.path.isdir(path):
            rep.errors.append("a directory, not a file")
            return rep
        with open(path, "rb") as f:
            head = f.read(USERBLOCK + len(HDF5_SIGNATURE))
    except FileNotFoundError:
        rep.errors.append("missing: no such file")
        return rep
    except OSError as e:
        rep.errors.append(f"cannot read it: {e.strerror or e}")
        return rep
    size = rep.nbytes = st.st_size
    try:
        if head[USERBLOCK:USERBLOCK + 8] == HDF5_SIGNATURE:
            _verify_v73(path, head, size, rep)
        elif head.startswith(V5_TEXT):
            if size < HEADER_BYTES:
                rep.format = "v5"
                rep.errors.append(f"truncated: {size} bytes, less than the {HEADER_BYTES}-byte header")
            else:
                _verify_v5(path, head, size, rep)
        elif head.startswith(V73_TEXT):
            rep.format, rep.header = "v7.3", _header_text(head)
            rep.errors.append(f"truncated: {size} bytes, the HDF5 file behind the v7.3 header "
                              f"starts at byte {USERBLOCK}" if size < USERBLOCK + 8 else
                              f"corrupt: v7.3 header but no HDF5 signature at byte {USERBLOCK}")
        elif head.startswith(HDF5_SIGNATURE):
            rep.errors.append("not a MAT file: plain HDF5 without MATLAB's 512-byte userblock "
                              "header, which MATLAB's load does not take for a v7.3 MAT-file")
        elif size == 0:
            rep.errors.append("not a MAT file: empty (0 bytes)")
        else:
            rep.errors.append("not a MAT file: no 'MATLAB 5.0 MAT-file' header and no HDF5 "
                              f"signature at byte {USERBLOCK}")
    except Exception as e:  # noqa: BLE001 - never a traceback for one bad file
        rep.errors.append(f"cannot be checked: {type(e).__name__}: {e}")
    rep.ok = not rep.errors
    return rep


_FIELDS_SHOWN = 8


def _flags(var: VarReport) -> str:
    out = []
    if var.sparse:
        out.append("sparse")
    if var.complex:
        out.append("complex")
    if var.logical:
        out.append("logical")
    if var.fields is not None:
        shown = ", ".join(var.fields[:_FIELDS_SHOWN]) if var.fields else "(none)"
        if len(var.fields) > _FIELDS_SHOWN:
            shown += f", ... ({len(var.fields)} fields; --json lists all)"
        out.append("fields: " + shown)
    if var.class_attribute is not None:
        out.append("MATLAB_class ok" if var.class_attribute else "MATLAB_class MISSING")
    return "  ".join(out)


def format_report(rep: FileReport) -> list[str]:
    if rep.format is None and not rep.variables:
        return [f"{rep.path}: BAD: {'; '.join(rep.errors)}"]
    what = rep.format or "?"
    if rep.format == "v7.3" and rep.userblock_valid is not None:
        what += ", userblock header " + ("valid" if rep.userblock_valid else "INVALID")
    if rep.header:
        what += f" ({rep.header!r})" if not rep.header.isprintable() else f" ({rep.header})"
    lines = [f"{rep.path}: {'OK' if rep.ok else 'BAD'}, {what}, {_plural(len(rep.variables), 'variable')}"]
    if rep.variables:
        w_name = max(len(v.name) for v in rep.variables)
        w_cls = max(len(v.matlab_class) for v in rep.variables)
        w_size = max(len(v.size_text) for v in rep.variables)
        for v in rep.variables:
            lines.append(f"  {v.name:<{w_name}}  {v.matlab_class:<{w_cls}}  {v.size_text:<{w_size}}"
                         f"  {_flags(v)}".rstrip())
    lines += [f"  error: {e}" for e in rep.errors]
    return lines


def run_verify(paths: list[str], *, as_json: bool = False) -> int:
    reports = [verify_file(p) for p in paths]
    ok = all(r.ok for r in reports)
    if as_json:
        json.dump({"ok": ok, "files": [asdict(r) for r in reports]}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        for r in reports:
            print("\n".join(format_report(r)))
        bad = sum(not r.ok for r in reports)
        print(f"{_plural(len(reports), 'file')} checked: {len(reports) - bad} ok, {bad} bad")
    return 0 if ok else 1
