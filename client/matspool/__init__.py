"""matspool: export tensors to MATLAB .mat files without making the GPU wait.

``Spool.save()`` copies into a pinned shared-memory ring and returns a future; a
writer daemon turns the bytes into MAT v5 or v7.3 files. See README.md.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future
from typing import Any

from ._errors import (
    DaemonUnavailable,
    FlushError,
    FormatLimitError,
    InvalidOptionError,
    InvalidVariableError,
    MatspoolError,
    PathNotAllowedError,
    PayloadTooLarge,
    ProtocolError,
    RingError,
    SpoolClosed,
    SpoolFull,
    UnknownClient,
    UnsupportedTypeError,
    WriteFailed,
)
from ._curve import ClientKeys
from ._savemat import savemat
from ._spool import SaveResult, Spool

__all__ = [
    "ClientKeys",
    "DaemonUnavailable",
    "FlushError",
    "FormatLimitError",
    "InvalidOptionError",
    "InvalidVariableError",
    "MatspoolError",
    "PathNotAllowedError",
    "PayloadTooLarge",
    "ProtocolError",
    "RingError",
    "SaveResult",
    "Spool",
    "SpoolClosed",
    "SpoolFull",
    "UnknownClient",
    "UnsupportedTypeError",
    "WriteFailed",
    "default_spool",
    "flush",
    "save",
    "savemat",
]

__version__ = "0.1.0"

_default: Spool | None = None
_default_lock = threading.Lock()


def default_spool() -> Spool:
    """The process-wide spool behind :func:`save`, created on first use, closed at exit."""
    global _default
    with _default_lock:
        if _default is None or _default._closed:
            _default = Spool()  # closed at exit like every live spool
        return _default


def save(path: str | os.PathLike[str], variables: dict[str, Any], **options: Any) -> Future[SaveResult]:
    """``Spool.save`` on the default spool."""
    return default_spool().save(path, variables, **options)


def flush(timeout: float | None = None) -> None:
    """``Spool.flush`` on the default spool (a no-op if it was never used)."""
    if _default is not None:
        _default.flush(timeout)
