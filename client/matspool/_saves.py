"""Small value types of a save: its result and its placement in the ring.

Threads: none of its own; immutable values.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._numeric import Prepared
from ._ring import ALIGN

__all__ = ["SaveResult", "aligned", "place"]


@dataclass(frozen=True, slots=True)
class SaveResult:
    """What a save's future resolves to once the file is complete under its final name."""

    path: str
    nbytes: int  # size of the file written
    format: str


def aligned(nbytes: int) -> int:
    return (nbytes + ALIGN - 1) // ALIGN * ALIGN


def place(arrays: list[Prepared]) -> tuple[dict[int, int], int]:
    """Offsets (by id) relative to a save's ring region, each cache-line aligned."""
    offsets, off = {}, 0
    for a in arrays:
        offsets[id(a)] = off
        off += aligned(a.nbytes)
    return offsets, off
