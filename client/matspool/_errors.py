"""The matspool error tree.

Every error inherits from :class:`MatspoolError` and, where one fits, the matching
builtin, so ``except ValueError`` or ``except OSError`` keeps working::

    MatspoolError(Exception)
    ├── InvalidVariableError(MatspoolError, ValueError)    bad MATLAB variable name
    ├── InvalidOptionError(MatspoolError, ValueError)      unknown format/layout/option value
    ├── UnsupportedTypeError(MatspoolError, TypeError)     value with no MATLAB class
    ├── FormatLimitError(MatspoolError, ValueError)        variable too large for the format
    ├── PayloadTooLarge(MatspoolError, ValueError)         one save larger than the whole ring
    ├── SpoolFull(MatspoolError, BufferError)              ring full and the policy says stop
    ├── PathNotAllowedError(MatspoolError, PermissionError) path outside the daemon's roots
    ├── WriteFailed(MatspoolError, OSError)                the daemon could not write the file
    ├── DaemonUnavailable(MatspoolError, ConnectionError)  no daemon answers
    │   └── AuthenticationFailed                           a tcp:// daemon refused the CURVE keys
    ├── ProtocolError(MatspoolError, ValueError)           the daemon refused a malformed request
    │   └── UnknownClient                                  WRITE from a client it has no ring for
    ├── RingError(MatspoolError, OSError)                  shared memory could not be set up
    ├── SpoolClosed(MatspoolError, RuntimeError)           save() after close()
    ├── CudaError(MatspoolError, RuntimeError)             the CUDA path could not copy (no
    │   │                                                  staging memory, copies stuck)
    │   └── CudaCaptureError                               save() during CUDA graph capture
    └── FlushError(MatspoolError)                          flush() saw failed saves (``.errors``)

Threads: none; plain exception classes.

The daemon reports failures by :data:`ERROR_CODES` name; the client turns the code
back into the class here, so a future fails with the same type a local check raises.

Errors about one save carry its context, as httpx's carry their request: ``path`` (the
file), ``seq`` (the save's sequence number on its spool) and, for :class:`WriteFailed`,
``errno`` (the OS error the daemon met, when it said). Each is ``None`` when unknown.
"""

from __future__ import annotations

__all__ = [
    "ERROR_CODES",
    "AuthenticationFailed",
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
    "SpoolClosed",
    "SpoolFull",
    "UnknownClient",
    "UnsupportedTypeError",
    "WriteFailed",
    "error_from_code",
    "with_context",
]


class MatspoolError(Exception):
    """Base of every error matspool raises."""

    code = "error"
    path: str | None = None  # the file a save was for
    seq: int | None = None  # that save's sequence number on its spool


class InvalidVariableError(MatspoolError, ValueError):
    code = "invalid_variable"


class InvalidOptionError(MatspoolError, ValueError):
    """An option value (format, layout, oned_as, ...) outside its valid set; the message
    lists the valid values."""

    code = "invalid_option"


class UnsupportedTypeError(MatspoolError, TypeError):
    code = "unsupported_type"


class FormatLimitError(MatspoolError, ValueError):
    code = "format_limit"


class PayloadTooLarge(MatspoolError, ValueError):
    code = "payload_too_large"


class SpoolFull(MatspoolError, BufferError):
    code = "spool_full"


class PathNotAllowedError(MatspoolError, PermissionError):
    code = "path_not_allowed"


class WriteFailed(MatspoolError, OSError):
    code = "write_failed"


class DaemonUnavailable(MatspoolError, ConnectionError):
    code = "daemon_unavailable"


class AuthenticationFailed(DaemonUnavailable):
    """The CURVE handshake with a tcp:// daemon failed: it does not know this client's
    public key, or the client expected another server key. Raised by ``Spool()`` as soon as
    ZeroMQ reports the failed handshake; the message names the endpoint and the key."""

    code = "authentication_failed"


class ProtocolError(MatspoolError, ValueError):
    code = "protocol"


class UnknownClient(ProtocolError):
    """The daemon has no ring for this client: it restarted. The client says HELLO again."""

    code = "unknown_client"


class RingError(MatspoolError, OSError):
    code = "ring"


class SpoolClosed(MatspoolError, RuntimeError):
    code = "closed"


class CudaError(MatspoolError, RuntimeError):
    """The CUDA copy path failed in the client: not even the smallest staging buffer fit
    on the device, or copies into the ring did not end within a bounded wait (a stream
    they wait on is stuck). Never raised by the daemon."""

    code = "cuda"


class CudaCaptureError(CudaError):
    """``save()`` was called while the current CUDA stream is capturing a graph. A save
    cannot be captured: replaying the graph would copy into ring offsets long reused.
    Save the graph's outputs after ``replay()`` instead."""

    code = "cuda_capture"


class FlushError(MatspoolError):
    """Raised by ``flush()`` and ``close()``; ``errors`` holds every failed save's exception."""

    code = "flush"

    def __init__(self, message: str, errors: list[BaseException]) -> None:
        super().__init__(message)
        self.errors = errors


ERROR_CODES: dict[str, type[MatspoolError]] = {
    cls.code: cls
    for cls in (
        MatspoolError,
        InvalidVariableError,
        InvalidOptionError,
        UnsupportedTypeError,
        FormatLimitError,
        PayloadTooLarge,
        SpoolFull,
        PathNotAllowedError,
        WriteFailed,
        DaemonUnavailable,
        AuthenticationFailed,
        ProtocolError,
        UnknownClient,
        RingError,
        SpoolClosed,
    )
}


def error_from_code(
    code: str, message: str, *, path: str | None = None, seq: int | None = None, errno: int | None = None
) -> MatspoolError:
    """The exception a daemon ``ERR`` reply stands for (unknown codes: the base class)."""
    return with_context(ERROR_CODES.get(code, MatspoolError)(message), path=path, seq=seq, errno=errno)


def with_context(
    err: MatspoolError, *, path: str | None = None, seq: int | None = None, errno: int | None = None
) -> MatspoolError:
    """``err`` with the save it is about; ``errno`` only where the class is an OSError."""
    err.path, err.seq = path, seq
    if errno is not None and isinstance(err, OSError):
        err.errno = errno
    return err
