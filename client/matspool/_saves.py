"""What the client keeps per save between ``save()`` and the daemon's answer."""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from ._convert import Prepared
from ._ring import ALIGN

__all__ = ["End", "Pending", "SaveResult", "aligned", "place"]


@dataclass(frozen=True, slots=True)
class SaveResult:
    """What a save's future resolves to once the file is complete under its final name."""

    path: str
    nbytes: int  # size of the file written
    format: str


@dataclass(slots=True)
class Pending:
    future: Future[SaveResult]
    offset: int
    path: str
    format: str
    wire: list[Any] | None = None  # the WRITE's frames as sent, kept to re-send to a restarted daemon
    sent: bool = False
    parts: set[int] | None = None  # ring offsets of pieces in flight (a save larger than the ring)
    holds: int = 1  # the region is freed when the answer came and, if any, the copy into it ended


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
