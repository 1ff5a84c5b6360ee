"""Reverse every axis of a host array into a C-ordered buffer: the column-major reorder.

A C-ordered array ``m`` of shape ``(a, ..., c)`` is column-major in MATLAB's order once
written as ``dst[k, ..., i] = m[i, ..., k]``. numpy's strided copy of the permuted view
and torch's ``copy_`` walk one side a full row apart per element (cache and TLB misses,
and for power-of-two shapes every row in the same cache set): 3-5x a memcpy in 2-d and
10-30x in 3-d. Here the copy is cut into 2-d tiles: for each index of the middle axes,
``m[i0:i1, J, k0:k1].T`` goes to ``dst[k0:k1, J reversed, i0:i1]``; both sides of a tile
are a few KiB of whole cache lines, so each tile runs from L1/L2. A 3-d array whose first
axis is shorter than a tile (an image's channels) is tiled over its middle and last axes
instead. Tiles are split across threads by blocks of the first axis (of the middle where
the first is short); numpy's copy releases the GIL, so the Python loop is the only serial
part.

Threads: a pool of worker threads (made on first use, forgotten in a forked child) that
every caller shares; ``_lock`` guards making it. ``reverse_axes`` may run in any thread
and returns only once every thread has stopped writing.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any, Final

import numpy as np

__all__ = ["MIN_BYTES", "reverse_axes", "tiled"]

#: Below this the copy fits in cache and a single numpy call is as fast.
MIN_BYTES: Final = 1 << 18
#: Rows x columns of a tile by element size: a few KiB a side (measured, 64 MiB arrays).
_TILES: Final = {1: (64, 1024), 2: (32, 1024), 4: (16, 512), 8: (32, 256), 16: (32, 128)}
#: Fewer elements a tile (a short first or last axis) and the Python loop costs more than
#: it saves: (64, 1024, 64) float32 took 22 ms tiled, 13 ms by torch; (2, 4096, 4096) 185
#: against 115; (1024, 1024, 3) 102 against 5 (torch's strided copy of short rows is fast).
_MIN_TILE_ELEMENTS: Final = 2048
_MAX_THREADS: Final = 8
THREAD_MIN_BYTES: Final = 1 << 21  # below this a thread hand-off costs more than it saves

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
threads = min(os.cpu_count() or 1, _MAX_THREADS)  # module-level so a benchmark can set it


def _forget_pool() -> None:
    """In a forked child: the parent's workers and a lock it may have held are not ours."""
    global _lock, _pool
    _lock, _pool = threading.Lock(), None


os.register_at_fork(after_in_child=_forget_pool)


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(_MAX_THREADS, thread_name_prefix="matspool-reorder")
        return _pool


def _merged_stride(src: np.ndarray) -> int | None:
    """The byte stride of the middle axes merged into one, or None where they cannot
    be (a slice that skips within them); size-1 axes do not count."""
    axes = [j for j in range(1, src.ndim - 1) if src.shape[j] > 1]
    for j, nxt in itertools.pairwise(axes):
        if src.strides[j] != src.strides[nxt] * src.shape[nxt]:
            return None
    return src.strides[axes[-1]] if axes else 0


def _tile(src: np.ndarray, dst: np.ndarray) -> tuple[int, int]:
    ti, tk = _TILES.get(max(src.itemsize, dst.itemsize), (32, 128))
    if src.ndim == 2 and src.shape[-1] < tk:
        # a narrow column block (a large save's slab, ``_overlap``): taller tiles of as many
        # elements, else the per-tile call dominates (64 MiB float32 in 128-column slabs:
        # 53-66 ms with 16x128 tiles, 32-35 with 64x128, a whole 16384x1024 reorder 27)
        ti *= min(4, tk // src.shape[-1])
    return ti, tk


def tiled(src: np.ndarray, dst: np.ndarray) -> bool:
    """Whether ``reverse_axes`` can tile ``src`` into ``dst``: at least 2-d, both last
    axes longer than one and contiguous, the middle axes mergeable (any C-ordered array,
    its row slices and slabs), and first and last axes long enough for tiles of at least
    ``_MIN_TILE_ELEMENTS``."""
    if src.ndim < 2 or src.size == 0 or src.dtype.hasobject or src.shape[-1] < 2 or src.shape[0] < 2:
        return False
    if src.strides[-1] != src.itemsize or not dst.flags.c_contiguous or _merged_stride(src) is None:
        return False
    ti, tk = _tile(src, dst)
    rows = src.shape[1] if _short_first(src, ti) else src.shape[0]
    return bool(min(rows, ti) * min(src.shape[-1], tk) >= _MIN_TILE_ELEMENTS)


def _short_first(src: np.ndarray, ti: int) -> bool:
    """A 3-d array whose first axis is shorter than a tile (an image's channels): its
    tiles run over the middle and last axes instead, one copy per first index."""
    return src.ndim == 3 and src.shape[0] < ti


def reverse_axes(src: np.ndarray, dst: np.ndarray, *, nthreads: int | None = None) -> None:
    """``dst[k, ..., j, i] = src[i, j, ..., k]`` for a C-contiguous ``dst`` of shape
    ``src.shape[::-1]``; ``src`` and ``dst`` must pass :func:`tiled`. Casts as ``np.copyto``
    (``same_kind``), so a float16 or big-endian source is converted on the way."""
    a, c = src.shape[0], src.shape[-1]
    mid = src.shape[1:-1]
    m = math.prod(mid)
    merged = _merged_stride(src)
    assert merged is not None  # tiled(src, dst)
    # (a, m, c) and (c, m, a) views; middle row r of the source is middle row order[r] of dst
    s3 = np.lib.stride_tricks.as_strided(
        src, (a, m, c), (src.strides[0], merged, src.strides[-1]), writeable=False
    )
    d3 = dst.reshape(c, m, a)
    order = (
        range(m)
        if len(mid) <= 1
        else np.ravel_multi_index(np.unravel_index(np.arange(m), mid), mid, order="F").tolist()
    )
    ti, tk = _tile(src, dst)
    short = _short_first(src, ti)
    blocks = -(-a // ti)
    n = max(1, min(nthreads if nthreads is not None else threads, src.nbytes // THREAD_MIN_BYTES))
    if n > 1 and blocks >= n and not short:  # split the first axis, whole tiles to each thread
        per = -(-blocks // n) * ti
        parts = [(r, min(a, r + per), 0, m) for r in range(0, a, per)]
    elif n > 1 and m >= n:  # a short first axis: split the middle
        per = -(-m // n)
        if short:
            per = -(-per // ti) * ti  # whole tiles to each thread
        parts = [(0, a, j, min(m, j + per)) for j in range(0, m, per)]
    else:
        parts = [(0, a, 0, m)]
    work: Callable[..., None] = _short_tiles if short else _tiles
    futures: list[Future[None]] = [
        _executor().submit(work, s3, d3, order, *part, ti, tk) for part in parts[1:]
    ]
    try:
        work(s3, d3, order, *parts[0], ti, tk)
    finally:
        wait(futures)  # every thread has stopped writing before the region can be freed
    for f in futures:
        f.result()


def _tiles(s3: Any, d3: Any, order: Any, r0: int, r1: int, j0: int, j1: int, ti: int, tk: int) -> None:
    """Source rows ``r0:r1``, middle rows ``j0:j1``, every column, tile by tile."""
    copy = np.copyto
    c = s3.shape[2]
    for i in range(r0, r1, ti):
        e = min(i + ti, r1)
        s = s3[i:e]
        d = d3[:, :, i:e]
        for j in range(j0, j1):
            sj = s[:, j]
            dj = d[:, order[j]]
            for k in range(0, c, tk):
                copy(dj[k : k + tk], sj[:, k : k + tk].T, casting="same_kind")


def _short_tiles(s3: Any, d3: Any, order: Any, r0: int, r1: int, j0: int, j1: int, tj: int, tk: int) -> None:
    """``_tiles`` for a 3-d array with a short first axis (``order`` is the identity):
    tiles of ``tj`` middle x ``tk`` last indices, each copied once per first index while
    its destination lines are in cache (CHW images: 2-2.3x faster than torch's copy)."""
    copy = np.copyto
    c = s3.shape[2]
    for j in range(j0, j1, tj):
        e = min(j + tj, j1)
        for k in range(0, c, tk):
            d = d3[k : k + tk, j:e]
            s = s3[:, j:e, k : k + tk]
            for i in range(r0, r1):
                copy(d[:, :, i], s[i].T, casting="same_kind")
