"""What ``matspool verify`` found in one file, and how it is shown (text or JSON).

Threads: the caller's; reports are plain values.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

__all__ = [
    "HDF5_SIGNATURE",
    "HEADER_BYTES",
    "MI_COMPRESSED",
    "MI_MATRIX",
    "NUMERIC",
    "USERBLOCK",
    "V5_TEXT",
    "V73_TEXT",
    "FileReport",
    "VarReport",
    "format_report",
    "header_text",
    "plural",
    "quiet",
]

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
USERBLOCK = 512
HEADER_BYTES = 128
V5_TEXT = b"MATLAB 5.0 MAT-file"
V73_TEXT = b"MATLAB 7.3 MAT-file"
MI_MATRIX, MI_COMPRESSED = 14, 15

# MATLAB class -> the numpy element types its data may have
NUMERIC = {
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
def quiet() -> Iterator[None]:
    """mat73 prints and logs on its own (a file name not ending in .mat, a variable not
    found); none of that may land in the report, least of all in --json output."""
    logging.disable(logging.CRITICAL)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.disable(logging.NOTSET)


def header_text(head: bytes) -> str:
    return head[:116].decode("ascii", "replace").rstrip(" \x00")


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


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
    lines = [f"{rep.path}: {'OK' if rep.ok else 'BAD'}, {what}, {plural(len(rep.variables), 'variable')}"]
    if rep.variables:
        w_name = max(len(v.name) for v in rep.variables)
        w_cls = max(len(v.matlab_class) for v in rep.variables)
        w_size = max(len(v.size_text) for v in rep.variables)
        for v in rep.variables:
            lines.append(
                f"  {v.name:<{w_name}}  {v.matlab_class:<{w_cls}}  {v.size_text:<{w_size}}"
                f"  {_flags(v)}".rstrip()
            )
    lines += [f"  error: {e}" for e in rep.errors]
    return lines
