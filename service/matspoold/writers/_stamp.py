"""A file header that names the second it was made, made at most once a second.

Both formats' 128-byte headers say when the file was created, to the second; a small
file spent more formatting that time than writing its payload, so each writer keeps the
header of the current second (``PerSecond``).

Threads: any writer thread; the kept ``(second, header)`` pair is replaced whole (one
attribute store, atomic under the GIL), so a reader sees one pair or the other.
"""

from __future__ import annotations

import time
from collections.abc import Callable

__all__ = ["PerSecond"]


class PerSecond:
    """``make(now)`` for the current second, called at most once per second."""

    __slots__ = ("_kept", "_make")

    def __init__(self, make: Callable[[float], bytes]) -> None:
        self._make = make
        self._kept: tuple[int, bytes] = (-1, b"")

    def __call__(self) -> bytes:
        now = int(time.time())
        kept = self._kept
        if kept[0] != now:
            kept = self._kept = (now, self._make(now))
        return kept[1]
