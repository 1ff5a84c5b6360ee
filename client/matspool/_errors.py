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
    ├── ProtocolError(MatspoolError, ValueError)           the daemon refused a malformed request
    │   └── UnknownClient                                  WRITE from a client it has no ring for
    ├── RingError(MatspoolError, OSError)                  shared memory could not be set up
    ├── SpoolClosed(MatspoolError, RuntimeError)           save() after close()
    └── FlushError(MatspoolError)                          flush() saw failed saves (``.errors``)

The daemon reports failures by :data:`ERROR_CODES` name; the client turns the code
back into the class here, so a future fails with the same type a local check raises.
"""

from __future__ import annotations

__all__ = [
    "DaemonUnavailable",
    "ERROR_CODES",
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
]


class MatspoolError(Exception):
    """Base of every error matspool raises."""

    code = "error"


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


class ProtocolError(MatspoolError, ValueError):
    code = "protocol"


class UnknownClient(ProtocolError):
    """The daemon has no ring for this client: it restarted. The client says HELLO again."""

    code = "unknown_client"


class RingError(MatspoolError, OSError):
    code = "ring"


class SpoolClosed(MatspoolError, RuntimeError):
    code = "closed"


class FlushError(MatspoolError):
    """Raised by ``flush()``; ``errors`` holds every failed save's exception."""

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
        ProtocolError,
        UnknownClient,
        RingError,
        SpoolClosed,
    )
}


def error_from_code(code: str, message: str) -> MatspoolError:
    """The exception a daemon ``ERR`` reply stands for (unknown codes: the base class)."""
    return ERROR_CODES.get(code, MatspoolError)(message)
