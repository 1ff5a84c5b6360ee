"""The c10d store keys sharded saves and sharded streams use, named in one place.

A sharded save's keys live under :func:`save_prefix`, a sharded stream step's under
:func:`step_prefix`; below the prefix every save (and step) writes the same keys:

- ``blocks/<r>``: rank ``r``'s blocks, or the error its ``save()`` raised (or, with
  ``closed``, that its spool or stream was closed before it made this save or step);
- ``layout``: rank 0's verdict on the blocks: the temporary and data offsets, or the error;
- ``done/<r>``: rank ``r``'s blocks are written (or why not);
- ``result``: rank 0's outcome: the file's size, or the error;
- ``read/<r>``: rank ``r`` has its outcome. Rank 0 waits for every rank's, then deletes
  every key of the save (:func:`every_key`): none is left in the store once every rank
  has its outcome, and rank 0 (which holds the store under ``env://``) keeps it up until then;
- ``gone``: ranks done with a save that rank 0 does not make (nobody to delete the
  keys): each rank whose spool or stream was closed before it, and each that read a
  closed rank 0's word; the one that makes it the group's size deletes them
  (``_shard_coord.notice``).

Threads: none; names only.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "BLOCKS",
    "DONE",
    "GONE",
    "LAYOUT",
    "READ",
    "RESULT",
    "every_key",
    "rank_key",
    "save_prefix",
    "step_prefix",
]

BLOCKS: Final = "blocks"
DONE: Final = "done"
READ: Final = "read"
LAYOUT: Final = "layout"
RESULT: Final = "result"
GONE: Final = "gone"


def save_prefix(group: str, number: int) -> str:
    """The keys of this process's ``number``-th sharded save on ``group``."""
    return f"matspool/shard/{group}/{number}/"


def step_prefix(group: str, stream: int, step: int) -> str:
    """The keys of step ``step`` of this process's ``stream``-th sharded stream on ``group``."""
    return f"matspool/sstream/{group}/{stream}/{step}/"


def rank_key(what: str, rank: int) -> str:
    return f"{what}/{rank}"


def every_key(size: int) -> list[str]:
    """Every key a save (or step) of ``size`` ranks may write, below its prefix."""
    return [LAYOUT, RESULT, GONE] + [rank_key(k, r) for k in (BLOCKS, DONE, READ) for r in range(size)]
