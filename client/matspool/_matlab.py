"""MATLAB facts both sides check: variable names, classes, and the per-format limits."""

from __future__ import annotations

import functools
import re
from typing import Final

import numpy as np

from ._errors import InvalidOptionError, InvalidVariableError, UnsupportedTypeError

__all__ = [
    "FLOAT8",
    "FORMAT_ALIASES",
    "MATLAB_KEYWORDS",
    "MAX_NAME_LENGTH",
    "STORED_DTYPES",
    "V5_MAX_DIM",
    "V5_MAX_VARIABLE_BYTES",
    "check_name",
    "matlab_class",
    "normalize_format",
    "stored_dtype",
]

#: ``iskeyword`` list of MATLAB R2024b; a variable may not take any of these names.
MATLAB_KEYWORDS: Final = frozenset(
    [
        "break",
        "case",
        "catch",
        "classdef",
        "continue",
        "else",
        "elseif",
        "end",
        "for",
        "function",
        "global",
        "if",
        "otherwise",
        "parfor",
        "persistent",
        "return",
        "spmd",
        "switch",
        "try",
        "while",
        "arguments",
        "enumeration",
        "events",
        "methods",
        "properties",
    ]
)
MAX_NAME_LENGTH: Final = 63
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*\Z")

#: MathWorks documents 2^31 bytes as the largest variable a v5/v7 file holds.
V5_MAX_VARIABLE_BYTES: Final = 2**31 - 1
#: v5 stores every dimension as int32.
V5_MAX_DIM: Final = 2**31 - 1

#: dtype in the ring (little-endian numpy string) -> MATLAB class.
STORED_DTYPES: Final[dict[str, str]] = {
    "<f8": "double",
    "<f4": "single",
    "|i1": "int8",
    "<i2": "int16",
    "<i4": "int32",
    "<i8": "int64",
    "|u1": "uint8",
    "<u2": "uint16",
    "<u4": "uint32",
    "<u8": "uint64",
    "|b1": "logical",
    "<c8": "single",
    "<c16": "double",
}

# Inputs that are widened on the way in: MATLAB has no half precision.
# float8 (torch's and ml_dtypes' spellings): every value is exact in single.
FLOAT8: Final = ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu")
_WIDEN = {"float16": "<f4", "bfloat16": "<f4", "complex32": "<c8", **dict.fromkeys(FLOAT8, "<f4")}


def check_name(name: object) -> str:
    """Raise :class:`InvalidVariableError` unless ``name`` is a legal MATLAB variable name."""
    if not isinstance(name, str):
        raise InvalidVariableError(f"variable name must be a str, not {type(name).__name__}: {name!r}")
    if not _NAME.match(name):
        raise InvalidVariableError(
            f"invalid MATLAB variable name {name!r}: it must start with a letter and contain "
            "only letters, digits and '_'"
        )
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidVariableError(
            f"invalid MATLAB variable name {name[:20]!r}...: {len(name)} characters, "
            f"MATLAB allows at most {MAX_NAME_LENGTH}"
        )
    if name in MATLAB_KEYWORDS:
        raise InvalidVariableError(f"invalid MATLAB variable name {name!r}: it is a MATLAB keyword")
    return name


@functools.lru_cache(maxsize=256)
def _stored_dtype(source: str) -> str | None:
    if source in _WIDEN:
        return _WIDEN[source]
    try:
        dt = np.dtype(source).newbyteorder("<") if source not in ("bool",) else np.dtype("|b1")
    except TypeError:
        dt = None
    return dt.str if dt is not None and dt.str in STORED_DTYPES else None


def stored_dtype(name: str, source: str) -> str:
    """The ring dtype for an input dtype called ``source`` (numpy or torch spelling).

    ``name`` only makes the error message say which variable was wrong.
    """
    stored = _stored_dtype(source)
    if stored is not None:
        return stored
    raise UnsupportedTypeError(
        f"variable {name!r}: dtype {source} has no MATLAB class (supported: float64/32/16, "
        "bfloat16, float8, int8-64, uint8-64, bool, complex64/128)"
    )


def matlab_class(dtype: str) -> str:
    return STORED_DTYPES[dtype]


#: Every spelling of a format ``save()`` and ``savemat()`` take -> the format written.
#: scipy's "5" and MATLAB's "-v6"/"-v7" are all the v5 container (``-v7`` compresses in
#: MATLAB: pass ``compress=True`` / ``do_compression=True`` for that).
FORMAT_ALIASES: Final[dict[str, str]] = {
    "auto": "auto",
    "v5": "v5",
    "5": "v5",
    "7": "v5",
    "v7": "v5",
    "-v7": "v5",
    "v6": "v5",
    "-v6": "v5",
    "v7.3": "v7.3",
    "7.3": "v7.3",
    "-v7.3": "v7.3",
}


def normalize_format(fmt: object) -> str:
    """``"auto"``, ``"v5"`` or ``"v7.3"`` for any accepted spelling; anything else raises
    :class:`InvalidOptionError` listing the valid values."""
    if isinstance(fmt, str) and fmt in FORMAT_ALIASES:
        return FORMAT_ALIASES[fmt]
    raise InvalidOptionError(
        f"format must be one of {', '.join(map(repr, FORMAT_ALIASES))}, got {fmt!r}"
        + ("; MAT v4 is not written" if fmt in ("4", "v4") else "")
    )
