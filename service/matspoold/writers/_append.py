"""MATLAB's ``save -append``: variables added to, or replaced in, an existing .mat file.

The file keeps its own format (as in MATLAB, whatever the save asked for). The result is
built under the temporary name the caller renames into place, so the old file stays whole
until the new one is complete: v5 copies the kept elements byte for byte; v7.3 copies the
file and edits the copy in place.
"""

from __future__ import annotations

import mmap
import shutil
import struct
import zlib
from collections.abc import Sequence
from typing import Any

import h5py

from matspool._errors import UnsupportedTypeError
from matspool._protocol import Variable

from .v5 import _MI_COMPRESSED, _MI_MATRIX, _pad, _write_all, header, write_v5
from .v73 import append_v73

__all__ = ["append_into", "append_v5", "file_format", "variable_names"]


def file_format(path: str) -> str:
    """``"v5"`` or ``"v7.3"`` for a MAT file; anything else cannot be appended to."""
    if h5py.is_hdf5(path):
        return "v7.3"
    with open(path, "rb") as f:
        head = f.read(128)
    if head.startswith(b"MATLAB 5.0 MAT-file") and len(head) == 128:
        return "v5"
    raise UnsupportedTypeError(f"{path} is not a MAT v5 or v7.3 file: append=True cannot add to it")


def append_into(existing: str, tmp: str, variables: Sequence[tuple[Variable, Any]], level: int) -> None:
    """``existing`` plus ``variables`` (replacing those of the same names), written to ``tmp``."""
    if file_format(existing) == "v7.3":
        shutil.copyfile(existing, tmp)
        append_v73(tmp, variables, level)
    else:
        append_v5(existing, tmp, variables, level)


def _element_name(mi: int, body: bytes) -> str:
    """The variable name inside a top-level element (a plain or compressed miMATRIX)."""
    if mi == _MI_COMPRESSED:
        head = zlib.decompressobj().decompress(body, 1024)
        mi, body = struct.unpack("<I", head[:4])[0], head[8:]
    if mi != _MI_MATRIX:
        return ""
    p = 16  # past the array flags
    for _ in range(2):  # the dimensions, then the name
        tag, n = struct.unpack("<II", body[p : p + 8])
        if tag >> 16:
            n, data, p = tag >> 16, body[p + 4 : p + 4 + (tag >> 16)], p + 8
        else:
            data, p = body[p + 8 : p + 8 + n], p + 8 + n + _pad(n)
    return data.decode("utf-8", "replace")


def variable_names(data: bytes | memoryview | mmap.mmap) -> list[tuple[str, int, int]]:
    """(name, start, end) of every top-level element of a little-endian v5 file's bytes."""
    out, pos = [], 128
    while pos + 8 <= len(data):
        mi, n = struct.unpack("<II", data[pos : pos + 8])
        end = pos + 8 + n + (0 if mi == _MI_COMPRESSED else _pad(n))
        out.append(
            (_element_name(mi, bytes(data[pos + 8 : min(end, pos + 8 + 4096)])), pos, min(end, len(data)))
        )
        pos = end
    return out


def append_v5(existing: str, path: str, variables: Sequence[tuple[Variable, Any]], level: int = 0) -> None:
    """MATLAB's ``save -append``: ``path`` gets ``existing``'s variables, but for those
    ``variables`` replace, byte for byte, then ``variables`` at the end."""
    write_v5(path, variables, level)
    with open(existing, "rb") as src, mmap.mmap(src.fileno(), 0, access=mmap.ACCESS_READ) as old:
        if old[126:128] != b"IM":
            raise UnsupportedTypeError(f"{existing}: a big-endian MAT file cannot be appended to")
        replaced = {spec.name for spec, _ in variables}
        kept = [(start, end) for name, start, end in variable_names(old) if name not in replaced]
        with open(path, "rb") as new:
            new.seek(128)
            fresh = new.read()
        with open(path, "wb") as out:
            _write_all(out, header())
            for start, end in kept:
                _write_all(out, old[start:end])
            _write_all(out, fresh)
