"""Large arrays of a ``/dev/shm`` ring copied into the file by the kernel, not through the daemon.

A ``/dev/shm`` ring is never mapped (``ringio``: it cannot be sealed), so its bytes used
to be copied into a fresh buffer of the daemon's (``ShmRing.payload``: page faults on
new memory, a second copy, the save's size in the daemon's private memory) and then
written. The ring is a file, though: :meth:`ShmSpan.copy_to` moves its pages into the
output file with ``splice`` through a pipe of :data:`PIPE_BYTES` (the pipe holds
references to the ring's pages, not copies; the splice into the file is the one copy,
into the page cache). Measured on this VM (64 MiB, ext4 page cache): 18-25 ms, against
17 ms for a ``write`` from memory, 28 ms for ``sendfile`` (its internal pipe is 64 KiB)
and 39-44 ms for the old copy out and write. ``copy_file_range`` from tmpfs into another
file system is refused (``EXDEV``) by current kernels.

Which arrays (:func:`spans`): those of a whole, uncompressed, not-appending v5 or v7.3
save that are plain real numbers (no complex: v5 splits those; no char) of at least
:data:`SPAN_MIN_BYTES` (above the small-file paths, which assemble files in memory).
The writers (``writers/v5``, ``writers/v73``) write a span where they would ``pwrite``
the array's view. A ring shrunk under the save ends the splice early: a
:class:`~matspool.RingError` for that save, as ``ShmRing.read`` raises; no mapping, so
no ``SIGBUS``.

Threads: a span belongs to the job that made it (one writer thread); each copy uses a
pipe of its own, closed before it returns.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass
from typing import Final

import numpy as np

from matspool import _protocol as proto
from matspool._errors import RingError

__all__ = ["PIPE_BYTES", "SPAN_MIN_BYTES", "ShmSpan", "part_span", "spans"]

#: smaller arrays are copied out as before (the small-file paths build files in memory)
SPAN_MIN_BYTES: Final = 2 << 20
#: the pipe's capacity (``F_SETPIPE_SZ``; 1 MiB is the unprivileged maximum by default)
PIPE_BYTES: Final = 1 << 20
_F_SETPIPE_SZ: Final = 1031  # linux/fcntl.h
_enabled = True  # bench.writestage's A/B switch (``-shm-copy``: the old copy out)


@dataclass(frozen=True, slots=True)
class ShmSpan:
    """``nbytes`` at ``offset`` of the ring open at ``fd``: one array's bytes, as they go
    into the file (column-major; the writers take its ``dtype`` and ``nbytes``)."""

    fd: int
    offset: int
    nbytes: int
    dtype: np.dtype

    def copy_to(self, out: int, at: int) -> None:
        """Write the span at offset ``at`` of the file open at ``out``."""
        from .writers._files import WRITEBACK_STEP, start_writeback  # writers import this module

        r, w = os.pipe2(os.O_CLOEXEC)
        try:
            try:
                fcntl.fcntl(w, _F_SETPIPE_SZ, PIPE_BYTES)
            except OSError:
                pass  # a smaller pipe (the user's pipe quota): more rounds, same bytes
            done = since = 0
            while done < self.nbytes:
                try:
                    n = os.splice(self.fd, w, self.nbytes - done, offset_src=self.offset + done)
                except OSError as e:
                    raise RingError(f"cannot read the client's ring: {e.strerror}") from e
                if n == 0:
                    raise RingError(
                        f"the client's ring shrank under a save: {self.offset + done} bytes "
                        f"readable, this save needs {self.offset + self.nbytes}"
                    )
                while n:
                    k = os.splice(r, out, n, offset_dst=at + done)
                    done, n, since = done + k, n - k, since + k
                if since >= WRITEBACK_STEP:  # with fsync: start writeback as it goes
                    start_writeback(out, at + done - since, since)
                    since = 0
            start_writeback(out, at + done - since, since)
        finally:
            os.close(r)
            os.close(w)


def spans(request: proto.WriteRequest, fd: int) -> dict[str, ShmSpan]:
    """The arrays of ``request`` (by name) to write from the ring at ``fd`` as spans."""
    if not _enabled or request.mode != "write" or request.append or request.compress:
        return {}
    if request.format not in ("v5", "v7.3"):
        return {}
    out = {}
    for v in request.vars:
        if not isinstance(v, proto.VarSpec) or v.deferred or v.mclass or v.nbytes < SPAN_MIN_BYTES:
            continue
        dt = np.dtype(v.dtype)
        if dt.kind in "iufb":
            out[v.name] = ShmSpan(fd, v.offset, v.nbytes, dt)
    return out


def part_span(fd: int, offset: int, nbytes: int) -> ShmSpan | None:
    """A PART's bytes in the ring at ``fd`` as a span (a large save's slab), or None
    where they are copied out (small, or the A/B switch off)."""
    if not _enabled or nbytes < SPAN_MIN_BYTES:
        return None
    return ShmSpan(fd, offset, nbytes, np.dtype(np.uint8))
