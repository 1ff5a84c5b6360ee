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

import json
import os
import struct
import sys
from dataclasses import asdict

import numpy as np

from .verify_report import (
    HDF5_SIGNATURE,
    HEADER_BYTES,
    MI_COMPRESSED,
    MI_MATRIX,
    NUMERIC,
    USERBLOCK,
    V5_TEXT,
    V73_TEXT,
    FileReport,
    VarReport,
    format_report,
    header_text,
    plural,
)
from .verify_v73 import verify_v73
from .writers import TMP_SUFFIX

__all__ = ["FileReport", "VarReport", "format_report", "run_verify", "verify_file"]

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
                rep.errors.append(
                    f"truncated: {size - offset} stray bytes at byte {offset}, "
                    "after the last complete variable"
                )
                return None
            mdtype, nbytes = struct.unpack(endian + "II", tag)
            if mdtype not in (MI_MATRIX, MI_COMPRESSED):
                rep.errors.append(
                    f"corrupt: data element of type {mdtype} at byte {offset} "
                    "(a variable starts with miMATRIX or miCOMPRESSED)"
                )
                return None
            end = offset + 8 + nbytes
            if end > size:
                rep.errors.append(
                    f"truncated: variable #{count + 1} at byte {offset} needs {nbytes} bytes, "
                    f"the file ends {size - offset - 8} bytes into it ({size} bytes in all)"
                )
                return None
            if mdtype == MI_MATRIX:
                end += -nbytes % 8
            count, offset = count + 1, end
    return count


def _verify_v5(path: str, head: bytes, size: int, rep: FileReport) -> None:
    import scipy.io
    import scipy.sparse

    rep.format, rep.header = "v5", header_text(head)
    count = _walk_v5(path, head, size, rep)
    if count is None:
        return
    try:
        listed = scipy.io.whosmat(path)
    except Exception as e:  # noqa: BLE001 - any reader failure is the finding
        rep.errors.append(f"scipy.io.whosmat cannot read it: {type(e).__name__}: {e}")
        return
    if len(listed) != count:
        rep.errors.append(
            f"inconsistent: {plural(count, 'variable')} in the file, scipy.io.whosmat lists {len(listed)}"
        )
    for name, shape, cls in listed:
        try:  # one variable at a time: memory stays at the largest one, not the file
            value = scipy.io.loadmat(path, variable_names=[name], chars_as_strings=False, squeeze_me=False)[
                name
            ]
        except Exception as e:  # noqa: BLE001
            rep.errors.append(f"variable {name!r}: scipy.io.loadmat cannot read it: {type(e).__name__}: {e}")
            continue
        dims = list(getattr(value, "shape", shape))
        var = VarReport(name, cls, dims if cls == "char" else list(shape), logical=cls == "logical")
        rep.variables.append(var)
        if scipy.sparse.issparse(value):  # whosmat says "sparse" (or "logical")
            var.sparse, var.complex = True, bool(np.iscomplexobj(value))
            var.matlab_class = "logical" if cls == "logical" or value.dtype == np.bool_ else "double"
            var.logical = var.matlab_class == "logical"
        if cls != "char" and tuple(dims) != tuple(shape):
            rep.errors.append(
                f"variable {name!r}: whosmat says {var.size_text}, loadmat reads {'x'.join(map(str, dims))}"
            )
        if cls == "struct":
            var.fields = list(value.dtype.names or ())
        elif cls in NUMERIC:
            # the stored element type may be narrower than the class (MATLAB keeps a double
            # of small integers as uint8), so only "numeric at all" is checked
            var.complex = bool(np.iscomplexobj(value))
            if value.dtype.kind not in "biufc":
                rep.errors.append(f"variable {name!r}: class {cls} but its data reads as {value.dtype}")


# -- one file, many files ------------------------------------------------------------------


def verify_file(path: str) -> FileReport:
    rep = FileReport(path)
    if os.path.basename(path).endswith(TMP_SUFFIX):
        rep.errors.append(
            f"a matspool temporary file ({TMP_SUFFIX}): a write that did not "
            "finish or was abandoned, not a result; the finished file has the name "
            "without the leading '.' and this suffix"
        )
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
        if head[USERBLOCK : USERBLOCK + 8] == HDF5_SIGNATURE:
            verify_v73(path, head, size, rep)
        elif head.startswith(V5_TEXT):
            if size < HEADER_BYTES:
                rep.format = "v5"
                rep.errors.append(f"truncated: {size} bytes, less than the {HEADER_BYTES}-byte header")
            else:
                _verify_v5(path, head, size, rep)
        elif head.startswith(V73_TEXT):
            rep.format, rep.header = "v7.3", header_text(head)
            rep.errors.append(
                f"truncated: {size} bytes, the HDF5 file behind the v7.3 header starts at byte {USERBLOCK}"
                if size < USERBLOCK + 8
                else f"corrupt: v7.3 header but no HDF5 signature at byte {USERBLOCK}"
            )
        elif head.startswith(HDF5_SIGNATURE):
            rep.errors.append(
                "not a MAT file: plain HDF5 without MATLAB's 512-byte userblock "
                "header, which MATLAB's load does not take for a v7.3 MAT-file"
            )
        elif size == 0:
            rep.errors.append("not a MAT file: empty (0 bytes)")
        else:
            rep.errors.append(
                f"not a MAT file: no 'MATLAB 5.0 MAT-file' header and no HDF5 signature at byte {USERBLOCK}"
            )
    except Exception as e:  # noqa: BLE001 - never a traceback for one bad file
        rep.errors.append(f"cannot be checked: {type(e).__name__}: {e}")
    rep.ok = not rep.errors
    return rep


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
        print(f"{plural(len(reports), 'file')} checked: {len(reports) - bad} ok, {bad} bad")
    return 0 if ok else 1
