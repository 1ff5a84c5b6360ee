"""``scipy.io.savemat``'s signature and semantics on top of :meth:`Spool.save`, so that
replacing ``from scipy.io import savemat`` with ``from matspool import savemat`` is the
whole migration; the call returns the save's future instead of blocking.

Where scipy and matspool map a value differently, matspool's mapping (the table in docs/formats.md)
holds: a list of str is a cell of char rows (scipy makes a char matrix), a list of arrays a
cell (scipy stacks them when it can). An empty 1-d array or list is 0x0, as in scipy.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from ._errors import InvalidOptionError, InvalidVariableError, UnsupportedTypeError
from ._matlab import normalize_format
from ._numeric import ONED_AS

if TYPE_CHECKING:
    from ._spool import Spool

__all__ = ["SHORT_FIELD_NAME_LENGTH", "savemat"]

#: scipy's limit on field names without ``long_field_names`` (MATLAB before 7.6).
SHORT_FIELD_NAME_LENGTH: Final = 31


def _check_field_lengths(label: str, value: object, depth: int = 0) -> None:
    """scipy refuses a field name longer than 31 characters unless ``long_field_names``."""
    if depth > 32:
        return  # prepare_value reports the nesting limit
    names: list[str] = []
    children: list[tuple[str, object]] = []
    if isinstance(value, Mapping):
        names = [k for k in value if isinstance(k, str)]
        children = [(f"{label}.{k}", v) for k, v in value.items()]
    elif isinstance(value, np.ndarray) and value.dtype.names:
        names = list(value.dtype.names)
        children = [(f"{label}.{k}", value[k]) for k in names if value.dtype[k].kind == "O"]
    elif isinstance(value, list | tuple) or (isinstance(value, np.ndarray) and value.dtype.kind == "O"):
        items = value.ravel() if isinstance(value, np.ndarray) else value
        children = [(f"{label}{{{i + 1}}}", v) for i, v in enumerate(items)]
    for k in names:
        if len(k) > SHORT_FIELD_NAME_LENGTH:
            raise InvalidVariableError(
                f"struct {label!r}: field name {k[:20]!r}... has {len(k)} characters, more than "
                f"{SHORT_FIELD_NAME_LENGTH}: pass long_field_names=True (MATLAB 7.6+ reads up to 63)"
            )
    for lab, v in children:
        if isinstance(v, Mapping | list | tuple | np.ndarray):
            _check_field_lengths(lab, v, depth + 1)


def _scipy_empties(value: Any, depth: int = 0) -> Any:
    """scipy saves an empty 1-d array or list as MATLAB's ``[]`` (0x0), where ``save()``
    follows ``oned_as`` (1x0); keep scipy's answer here, at any depth."""
    if depth > 32:
        return value
    if isinstance(value, np.ndarray) and value.ndim == 1 and value.size == 0 and value.dtype.kind in "biufc":
        return value.reshape(0, 0)
    if isinstance(value, list | tuple) and not value:
        return np.zeros((0, 0))
    if isinstance(value, Mapping):
        return {k: _scipy_empties(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple) and any(
        isinstance(v, list | tuple | Mapping | np.ndarray) for v in value
    ):
        return type(value)(_scipy_empties(v, depth + 1) for v in value)
    if isinstance(value, np.ndarray) and value.dtype.kind == "O":
        out = np.empty(value.shape, dtype=object)
        for i, v in enumerate(value.flat):
            out.flat[i] = _scipy_empties(v, depth + 1)
        return out
    return value


def savemat(
    file_name: str | os.PathLike[str],
    mdict: Mapping[str, Any],
    appendmat: bool = True,
    format: str = "5",
    long_field_names: bool = False,
    do_compression: bool = False,
    oned_as: str = "row",
    *,
    spool: Spool | None = None,
    fsync: bool = False,
) -> Future[Any]:
    """Save ``mdict`` like ``scipy.io.savemat`` does, through the writer daemon.

    ``format``: ``"5"`` (scipy's default), ``"7.3"``, or any spelling ``save()`` takes
    (``"7"``, ``"-v7.3"``, ``"v5"``, ``"auto"``). ``appendmat`` adds ``.mat`` to a name
    without it; names starting with ``_`` are skipped with a warning, as scipy does.
    ``spool`` defaults to ``matspool.default_spool()``. Returns the future of the save.
    """
    if isinstance(file_name, os.PathLike):
        file_name = os.fspath(file_name)
    if not isinstance(file_name, str):
        raise UnsupportedTypeError(
            f"file_name must be a path (str or os.PathLike), got {type(file_name).__name__}: the "
            "daemon writes the file itself, so file objects cannot be passed"
        )
    if appendmat and not file_name.endswith(".mat"):
        file_name += ".mat"
    fmt = normalize_format(format)
    if oned_as not in ONED_AS:
        raise InvalidOptionError(f"oned_as must be one of {', '.join(map(repr, ONED_AS))}, got {oned_as!r}")
    for what, flag in (
        ("appendmat", appendmat),
        ("long_field_names", long_field_names),
        ("do_compression", do_compression),
    ):
        if not isinstance(flag, bool | np.bool_):
            raise InvalidOptionError(f"{what} must be True or False, got {flag!r}")
    if not isinstance(mdict, Mapping):
        raise UnsupportedTypeError(f"mdict must be a mapping of names to values, got {type(mdict).__name__}")
    variables = {}
    for name, value in mdict.items():
        if isinstance(name, str) and name.startswith("_"):
            warnings.warn(
                f"variable {name!r} starts with '_' and is not saved (as in scipy.io.savemat)",
                UserWarning,
                stacklevel=2,
            )
            continue
        if not long_field_names:
            _check_field_lengths(str(name), value)
        variables[name] = _scipy_empties(value)
    if spool is None:
        from . import default_spool

        spool = default_spool()
    return spool.save(
        file_name, variables, format=fmt, oned_as=oned_as, compress=bool(do_compression), fsync=fsync
    )
