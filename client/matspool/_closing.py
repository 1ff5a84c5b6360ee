"""Releasing a spool's parts: on ``close()``, and when a spool is collected unclosed.

Apart from ``_spool`` because the finalizer must hold the parts, never the spool: the
functions here take only the parts. A copy stuck behind a CUDA stream holds the ring
mapped until it ends (``COPIES_CLOSE_TIMEOUT`` bounds how long ``close()`` waits for it).

Threads: the closing caller's, or the finalizer's (a thread of its own when collection
happened on one of the spool's own threads).
"""

from __future__ import annotations

import threading
from concurrent.futures import wait
from typing import Final

from . import _embedded
from ._copies import CopyPipeline
from ._errors import SpoolClosed
from ._link import Link
from ._pending import PendingTable, failing
from ._ring import Ring

__all__ = ["COPIES_CLOSE_TIMEOUT", "close_parts", "release_dropped"]

COPIES_CLOSE_TIMEOUT: Final = 10.0  # close(): how long a copy stuck behind a CUDA stream may hold it


def close_parts(
    copies: CopyPipeline | None,
    link: Link | None,
    embedded: _embedded.Share | None,
    ring: Ring | None,
    *,
    wait: bool = True,
) -> bool:
    """Stop the threads, leave the daemon (the last spool stops it; ``wait=False``:
    without waiting for its accepted writes), unlink the ring. True when a copy was stuck:
    the ring then goes when that copy ends, never under it."""
    stuck = copies is not None and not copies.close(COPIES_CLOSE_TIMEOUT)
    if link is not None:
        link.close()
    if embedded is not None:
        embedded.release(wait=wait)
    if ring is not None:
        if stuck:
            assert copies is not None
            copies.after_copies(ring.close)
        else:
            ring.close()
    return stuck


def release_dropped(
    table: PendingTable, copies: CopyPipeline, link: Link, embedded: _embedded.Share | None, ring: Ring
) -> None:
    """A spool collected without close(): its saves still finish (up to a minute), then its
    parts go. Run on a thread of its own when the collection happened on one of the
    spool's own threads (they cannot join themselves, and the I/O thread must go on
    answering the saves being waited for)."""

    def release() -> None:
        wait(table.futures(), 60.0)
        table.fail_unresolved(failing(SpoolClosed, "spool collected before the save finished"), keep=False)
        close_parts(copies, link, embedded, ring)

    if threading.current_thread().name.startswith("matspool-"):
        threading.Thread(target=release, name="spool-release").start()
    else:
        release()
