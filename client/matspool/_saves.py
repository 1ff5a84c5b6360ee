"""Small value types of a save: its result, the END of a save in pieces, ring placement.

Threads: none of its own; immutable values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ._convert import Prepared
from ._ring import ALIGN

__all__ = ["End", "SaveResult", "aligned", "place"]


@dataclass(frozen=True, slots=True)
class SaveResult:
    """What a save's future resolves to once the file is complete under its final name."""

    path: str
    nbytes: int  # size of the file written
    format: str


@dataclass(frozen=True, slots=True)
class End:
    """The last message of a save in pieces; ``abort`` throws the save away."""

    seq: int
    abort: bool

    def to_wire(self) -> dict[str, Any]:
        return {"op": "END", "seq": self.seq, "abort": self.abort}


def aligned(nbytes: int) -> int:
    return (nbytes + ALIGN - 1) // ALIGN * ALIGN


def place(arrays: list[Prepared]) -> tuple[dict[int, int], int]:
    """Offsets (by id) relative to a save's ring region, each cache-line aligned."""
    offsets, off = {}, 0
    for a in arrays:
        offsets[id(a)] = off
        off += aligned(a.nbytes)
    return offsets, off
