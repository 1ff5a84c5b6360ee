"""Values of ``matspool serve``'s settings: parsing each from a TOML file or an environment
variable, and checking the resolved ones. ``config`` names the source of each error.

Threads: pure functions, called once at start.
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Callable
from typing import Any, Final

__all__ = ["LOG_LEVELS", "PARSE", "PATHS", "BadValue", "absolute", "check", "parse_roots", "suggest"]

LOG_LEVELS: Final = ("debug", "info", "warning", "error")


class BadValue(Exception):
    """A value's problem, without its source; turned into a ConfigError with one."""


# -- values from each source ------------------------------------------------------------


def _int(value: Any, text: bool) -> int:
    if text:
        try:
            return int(value.strip(), 10)
        except ValueError:
            raise BadValue(f"not an integer: {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadValue(f"must be an integer, got {value!r}")
    return value


def _float(value: Any, text: bool) -> float:
    if text:
        try:
            value = float(value.strip())
        except ValueError:
            raise BadValue(f"not a number: {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadValue(f"must be a number, got {value!r}")
    return float(value)


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _bool(value: Any, text: bool) -> bool:
    if text:
        low = value.strip().lower()
        if low in _TRUE or low in _FALSE:
            return low in _TRUE
        raise BadValue(f"not a boolean: {value!r} (use true/false or 1/0)")
    if not isinstance(value, bool):
        raise BadValue(f"must be true or false, got {value!r}")
    return value


def _mode(value: Any, text: bool) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        # TOML's 0o660 and 432 read the same: only a string says which digits were meant
        raise BadValue(f'write the mode as an octal string, e.g. "660" (got the integer {value!r})')
    if not isinstance(value, str):
        raise BadValue(f'must be an octal mode string like "660", got {value!r}')
    digits = value.strip()
    try:
        mode = int(digits[2:] if digits[:2].lower() == "0o" else digits, 8)
    except ValueError:
        raise BadValue(f"not an octal mode: {value!r}") from None
    return mode


def _str(value: Any, text: bool) -> str:
    if not isinstance(value, str):
        raise BadValue(f"must be a string, got {value!r}")
    return value


def _level(value: Any, text: bool) -> str:
    return _str(value, text).strip().lower()


def parse_roots(value: Any, text: bool) -> tuple[str, ...]:
    if text:
        parts = value.split(os.pathsep)
    elif isinstance(value, str):
        parts = [value]
    elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        parts = list(value)
    else:
        raise BadValue(f"must be a list of directories, got {value!r}")
    parts = [p for p in parts if p]
    if not parts:
        raise BadValue("needs at least one directory")
    return tuple(parts)


PARSE: Final[dict[str, Callable[[Any, bool], Any]]] = {
    "endpoint": _str,
    "roots": parse_roots,
    "writers": _int,
    "compress_threads": _int,
    "socket_mode": _mode,
    "group": _str,
    "clean_stale": _bool,
    "client_timeout": _float,
    "max_ring_bytes": _int,
    "max_total_ring_bytes": _int,
    "state_dir": _str,
    "curve_secret": _str,
    "curve_clients": _str,
    "log_level": _level,
    "log_format": _str,
    "metrics": _str,
}
PATHS: Final = ("roots", "curve_secret", "curve_clients", "state_dir")


def absolute(name: str, value: Any, base: str) -> Any:
    """Paths made absolute against ``base`` (the config file's directory, or the cwd)."""
    if value is None or name not in PATHS:
        return value

    def join(p: str) -> str:
        return os.path.abspath(os.path.join(base, os.path.expanduser(p)))

    return tuple(join(p) for p in value) if name == "roots" else join(value)


# -- checks on the resolved values ---------------------------------------------------------


def check(name: str, value: Any) -> None:
    if name == "endpoint":
        if "://" not in value or value.endswith("://"):
            raise BadValue(f"not a ZeroMQ endpoint (ipc://PATH or tcp://HOST:PORT): {value!r}")
    elif name in ("max_ring_bytes", "max_total_ring_bytes"):
        if value is not None and value < 4096:
            raise BadValue(f"must be at least 4096 bytes, got {value}")
    elif name in ("writers", "compress_threads"):
        if value < 1:
            raise BadValue(f"must be at least 1, got {value}")
    elif name == "socket_mode":
        if not 0 <= value <= 0o777:
            raise BadValue(f"mode out of range (000-777): {value:o}")
    elif name == "client_timeout":
        if not (math.isfinite(value) and value > 0):
            raise BadValue(f"must be a positive number of seconds, got {value}")
    elif name == "log_level":
        if value not in LOG_LEVELS:
            raise BadValue(f"must be one of {', '.join(LOG_LEVELS)}, got {value!r}")
    elif name == "log_format":
        if value not in ("text", "json"):
            raise BadValue(f"must be 'text' or 'json', got {value!r}")
    elif name == "metrics" and value is not None:
        _host, _, port = value.rpartition(":")
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise BadValue(f"must be [HOST:]PORT with a port in 1-65535, got {value!r}")
    elif name == "roots":
        for r in value:
            if not os.path.exists(r):
                raise BadValue(f"root directory {r!r} does not exist")
            if not os.path.isdir(r):
                raise BadValue(f"root {r!r} is not a directory")
    elif name == "curve_secret" and value is not None:
        if not os.path.isfile(value):
            raise BadValue(f"no such key file: {value!r}")
    elif name == "curve_clients" and value is not None:
        if not os.path.isdir(value):
            raise BadValue(f"not a directory of client keys: {value!r}")
    elif name == "group" and value is not None:
        import grp

        try:
            grp.getgrnam(value)
        except KeyError:
            raise BadValue(f"no such group: {value!r}") from None


def suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
