"""matspool: export tensors to MATLAB .mat files without making the GPU wait.

``Spool.save()`` copies into a pinned shared-memory ring and returns a future; a
writer daemon turns the bytes into MAT v5 or v7.3 files. See README.md.
"""

import os as _os
import threading as _threading
from concurrent.futures import Future as _Future
from importlib import metadata as _metadata
from typing import Any as _Any

from ._curve import ClientKeys
from ._errors import (
    AuthenticationFailed,
    CudaCaptureError,
    CudaError,
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
from ._savemat import savemat
from ._shard import Shard, ShardError
from ._spool import SaveResult, Spool
from ._stream import Stream

__all__ = [
    "AuthenticationFailed",
    "ClientKeys",
    "CudaCaptureError",
    "CudaError",
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
    "Shard",
    "ShardError",
    "Spool",
    "SpoolClosed",
    "SpoolFull",
    "Stream",
    "UnknownClient",
    "UnsupportedTypeError",
    "WriteFailed",
    "default_spool",
    "flush",
    "save",
    "savemat",
]

try:  # pyproject.toml's version is the only one
    __version__: str = _metadata.version("matspool")
except _metadata.PackageNotFoundError:  # a source tree on sys.path, never installed
    __version__ = "0+unknown"

_default: Spool | None = None
_default_lock = _threading.Lock()


def _fresh_lock_in_child() -> None:
    global _default_lock
    _default_lock = _threading.Lock()  # another thread may have held it at the fork


_os.register_at_fork(after_in_child=_fresh_lock_in_child)


def default_spool() -> Spool:
    """The process-wide spool behind :func:`save`, created on first use, closed at exit.

    In a forked child it is the parent's spool object, which opens its own parts there."""
    global _default
    with _default_lock:
        if _default is None or _default._closed:
            _default = Spool()  # closed at exit like every live spool
        return _default


def save(path: str | _os.PathLike[str], variables: dict[str, _Any], **options: _Any) -> _Future[SaveResult]:
    """``Spool.save`` on the default spool."""
    return default_spool().save(path, variables, **options)


def flush(timeout: float | None = None) -> None:
    """``Spool.flush`` on the default spool (a no-op if it was never used)."""
    if _default is not None:
        _default.flush(timeout)
