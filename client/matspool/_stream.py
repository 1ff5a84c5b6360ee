"""A run's history in one v7.3 file: each ``append`` adds one step to every variable.

Threads: the caller's; a stream is not shared between threads. It knows its spool only
as the function that submits a step (and ``sharded``, the one that appends a step sharded
over ranks: ``_shard_stream``), so this module imports nothing of ``_spool``. Closing a
sharded stream tells the group's other ranks that this rank appends no further step
(``_shard_stream.ShardedStream.end``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import Future, wait
from typing import Any

from ._errors import FlushError, FormatLimitError, SpoolClosed
from ._saves import SaveResult
from ._shard_blocks import is_sharded

Submit = Callable[..., Future[SaveResult]]
ShardedAppend = Callable[["Stream", dict[str, Any]], Future[SaveResult]]

__all__ = ["Stream"]


class Stream:
    """Made by :meth:`Spool.stream`. Steps are written in order; after ``flush()`` the file
    is complete and readable (h5py, mat73, hdf5storage, MATLAB) with every step so far."""

    def __init__(
        self,
        submit: Submit,
        path: str | os.PathLike[str],
        *,
        format: str,
        layout: str,
        oned_as: str,
        fsync: bool,
        compress: bool | int | None,
        sharded: ShardedAppend | None = None,
        group: Any = None,
    ) -> None:
        if format != "v7.3":
            raise FormatLimitError(
                f"a stream needs format='v7.3', not {format!r}: MAT v5 cannot grow a variable in "
                "place; for v5 save one file per step with save()"
            )
        self._submit = submit
        self.path = os.path.abspath(os.fspath(path))
        self._opts = (layout, oned_as, fsync, compress)
        self._futures: list[Future[SaveResult]] = []
        self.steps = 0
        self.closed = False
        self._sharded_append = sharded
        self._group = group
        self._shards: Any = None  # sharded over ranks: its _shard_stream.ShardedStream
        self._unstarted: Any = None  # opened with group=: its _shard_stream.Unstarted

    def append(self, variables: dict[str, Any] | None = None, /, **named: Any) -> Future[SaveResult]:
        """Add one step: ``s.append(u=u, t=t)`` or ``s.append({"u": u})``. Every step must
        hold the same names with the same class and size as the first. A
        :class:`matspool.Shard` or a DTensor in the first step makes the stream sharded
        over ranks: every rank of the group appends its blocks of each step, and the file
        grows the global series (docs/distributed.md, "Streams of shards")."""
        if self.closed:
            raise SpoolClosed(f"append() on the closed stream {self.path}")
        values = {**(variables or {}), **named}
        if self._sharded_append is not None and (
            self._shards is not None or self._group is not None or is_sharded(values)
        ):  # a Shard or DTensor: every rank of the group appends its blocks (_shard_stream)
            fut = self._sharded_append(self, values)
            self.steps += 1
            self._futures.append(fut)
            return fut
        layout, oned_as, fsync, compress = self._opts
        mode = "create" if self.steps == 0 else "append"
        fut = self._submit(self.path, values, "v7.3", layout, oned_as, fsync, compress, mode)
        self.steps += 1
        self._futures.append(fut)
        return fut

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every step appended so far is in the file; raise if one failed."""
        futures, self._futures = self._futures, []
        _, not_done = wait(futures, timeout)
        if not_done:
            self._futures = list(not_done) + self._futures
            raise TimeoutError(f"stream {self.path}: {len(not_done)} steps still pending after {timeout} s")
        errors = [e for f in futures if (e := f.exception()) is not None]
        if errors:
            raise FlushError(
                f"stream {self.path}: {len(errors)} steps failed; first: {errors[0]}", errors
            ) from errors[0]

    def close(self, timeout: float | None = None) -> None:
        """Wait for every step (``flush``); a sharded stream's other ranks then learn that
        this rank appends no further step, so their next one fails at once."""
        if not self.closed:
            self.closed = True
            try:
                self.flush(timeout)
            finally:
                self._end()

    def _end(self) -> None:
        ending = self._shards if self._shards is not None else self._unstarted
        if ending is not None:
            ending.end("stream")

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        elif not self.closed:
            self.closed = True  # do not mask the caller's error with a flush error
            self._end()
