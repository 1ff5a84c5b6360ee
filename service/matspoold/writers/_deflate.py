"""Deflate on every core, never on the caller's thread.

zlib releases the GIL while it compresses, so one process-wide thread pool spreads the
blocks of a variable over all cores. Two uses:

- ``zlib_stream``: one zlib stream (v5's ``miCOMPRESSED``) built pigz-style from blocks
  deflated independently: each block but the last ends with a sync flush (byte-aligned,
  not final), so the raw blocks concatenate into one valid deflate stream; the
  Adler-32 of the whole is combined from the blocks' own.
- ``compress_many``: independent zlib buffers (v7.3 chunks, HDF5's deflate filter).

Results come back in order, with a bounded number of blocks in flight, so memory stays
at a few blocks per writer whatever the variable's size.
"""

from __future__ import annotations

import os
import threading
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Final, TypeVar

__all__ = ["BLOCK", "adler32_combine", "compress_many", "set_threads", "threads", "zlib_stream"]

BLOCK: Final = 1 << 20  # bytes per deflate block of a v5 stream
_BASE: Final = 65521
_HEADER: Final = {
    lvl: b"\x78" + (b"\x01" if lvl <= 1 else b"\x5e" if lvl < 6 else b"\x9c" if lvl == 6 else b"\xda")
    for lvl in range(10)
}

T = TypeVar("T")
R = TypeVar("R")

_pool: ThreadPoolExecutor | None = None
_threads = os.cpu_count() or 1
_lock = threading.Lock()


def set_threads(n: int) -> None:
    """How many cores compression may use (``--compress-threads``); call before writing."""
    global _threads, _pool
    if n < 1:
        raise ValueError(f"compression threads must be at least 1, got {n}")
    with _lock:
        _threads = n
        if _pool is not None:
            _pool.shutdown(wait=True)
            _pool = None


def threads() -> int:
    return _threads


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=_threads, thread_name_prefix="matspool-deflate")
        return _pool


def ordered_map(fn: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
    """``map`` on the pool, results in order, at most 2 x threads items in flight."""
    pool, window = _executor(), 2 * _threads
    pending: deque[Future[R]] = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= window:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def compress_many(buffers: Iterable[bytes | memoryview], level: int) -> Iterator[bytes]:
    return ordered_map(lambda b: zlib.compress(b, level), buffers)


def adler32_combine(a1: int, a2: int, len2: int) -> int:
    """zlib's adler32_combine: the checksum of A+B from those of A and B (Python lacks it)."""
    rem = len2 % _BASE
    sum1 = a1 & 0xFFFF
    sum2 = (rem * sum1) % _BASE
    sum1 += (a2 & 0xFFFF) + _BASE - 1
    sum2 += ((a1 >> 16) & 0xFFFF) + ((a2 >> 16) & 0xFFFF) + _BASE - rem
    if sum1 >= _BASE:
        sum1 -= _BASE
    if sum1 >= _BASE:
        sum1 -= _BASE
    if sum2 >= _BASE << 1:
        sum2 -= _BASE << 1
    if sum2 >= _BASE:
        sum2 -= _BASE
    return sum1 | (sum2 << 16)


def _deflate_block(args: tuple[bytes | memoryview, int, bool]) -> tuple[bytes, int, int]:
    data, level, last = args
    c = zlib.compressobj(level, zlib.DEFLATED, -15)
    out = c.compress(data) + c.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)
    return out, zlib.adler32(data), len(data)


def zlib_stream(blocks: Iterable[bytes | memoryview], level: int) -> Iterator[bytes]:
    """One zlib stream over ``blocks`` (each up to ~BLOCK bytes), deflated in parallel."""

    def tagged() -> Iterator[tuple[bytes | memoryview, int, bool]]:
        prev = None
        for b in blocks:
            if prev is not None:
                yield prev, level, False
            prev = b
        yield (prev if prev is not None else b""), level, True

    yield _HEADER[min(level, 9)]
    adler = 1
    for out, a, n in ordered_map(_deflate_block, tagged()):
        adler = adler32_combine(adler, a, n)
        yield out
    yield adler.to_bytes(4, "big")
