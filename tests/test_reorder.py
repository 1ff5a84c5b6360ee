"""C-ordered host arrays: snapshot in save(), reordered to column-major afterwards.

``save()`` copies such an array into a staging area of the ring (a memcpy) and returns;
the client's copy thread lays it out column-major and only then sends the WRITE. These
tests check what that must not change: exact files for every dtype and rank, values as
they were when save() returned, save order, behaviour when the ring is tight, and that a
save failing while its reorder runs does not hand its ring space to another save early.
The tiled, threaded kernel itself (``_transpose.reverse_axes``) is checked against numpy's
own transpose for every rank, dtype and stride pattern it takes, and refuses the rest.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch

import matspool
from matspool import _reorder, _transpose
from matspool._convert import copy_host, prepare
from matspool._errors import MatspoolError

from readback import assert_exact, read

MIB = 1 << 20


def _big(dtype: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "b":
        return rng.random(shape) > 0.5
    if np.dtype(dtype).kind == "c":
        return (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(dtype)
    if np.dtype(dtype).kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
    return rng.standard_normal(shape).astype(dtype)


CASES = [
    ("<f4", (512, 1024)),
    ("<f8", (300, 700)),
    ("<i2", (1024, 1025)),
    ("|b1", (1100, 1000)),
    ("<c8", (257, 513)),
    (">f8", (400, 400)),  # big-endian: converted during the reorder
    ("<u1", (64, 128, 160)),
    ("<f4", (8, 16, 32, 64)),
]


@pytest.mark.parametrize("fmt", ["v5", "v7.3"])
@pytest.mark.parametrize(("dtype", "shape"), CASES, ids=[f"{d}-{'x'.join(map(str, s))}" for d, s in CASES])
def test_deferred_reorder_is_exact(
    mspool: matspool.Spool, root: Path, fmt: str, dtype: str, shape: tuple[int, ...]
) -> None:
    x = _big(dtype, shape)
    assert x.flags.c_contiguous and x.nbytes >= _reorder.DEFER_MIN_BYTES
    mspool.save(root / "x.mat", {"x": x}, format=fmt).result(60)
    assert_exact(read(root / "x.mat", fmt)["x"], x.astype(x.dtype.newbyteorder("=")))


def test_float16_and_tensor_sources(mspool: matspool.Spool, root: Path) -> None:
    h = _big("<f2", (1024, 600))  # widened to single during the reorder
    t = torch.from_numpy(_big("<f4", (700, 800), seed=3))
    mspool.save(root / "m.mat", {"h": h, "t": t}, format="v7.3").result(60)
    got = read(root / "m.mat", "v7.3")
    assert got["h"].dtype == np.float32 and np.array_equal(got["h"], h.astype(np.float32))
    assert np.array_equal(got["t"], t.numpy())


def test_values_are_those_at_save_time(mspool: matspool.Spool, root: Path) -> None:
    x = _big("<f4", (1024, 512))
    wants = []
    for i in range(4):
        wants.append(x.copy())
        mspool.save(root / f"s{i}.mat", {"x": x}, format="v5")
        x += 1.0  # the caller moves on at once, as a time-step loop does
    mspool.flush(60)
    for i, want in enumerate(wants):
        assert np.array_equal(read(root / f"s{i}.mat", "v5")["x"], want)


def test_order_is_kept_behind_a_reorder(mspool: matspool.Spool, root: Path) -> None:
    """A later small save to the same path must not overtake a big one still reordering."""
    big = _big("<f8", (1024, 1024))
    for i in range(3):
        mspool.save(root / "same.mat", {"x": big, "i": np.float64(i)}, format="v7.3")
        mspool.save(root / "same.mat", {"i": np.float64(10 + i)}, format="v7.3")
    mspool.flush(60)
    with h5py.File(root / "same.mat", "r") as f:
        assert sorted(f) == ["i"] and f["i"][()].item() == 12.0
    with mspool.stream(root / "run.mat") as st:
        for step in range(3):
            st.append(u=_big("<f4", (512, 600), seed=step), t=np.float64(step))
    mspool.flush(60)
    with h5py.File(root / "run.mat", "r") as f:
        u = f["u"][()]  # (steps, 600, 512): one row-major slab per step
        assert np.array_equal(f["t"][()].ravel(), [0.0, 1.0, 2.0])
        for step in range(3):
            assert np.array_equal(u[step].T, _big("<f4", (512, 600), seed=step))


@pytest.mark.parametrize("ring_mib", [3, 5, 7])
def test_tight_ring(daemon, out_dir: Path, ring_mib: int) -> None:
    """3 MiB: a 2 MiB array cannot be staged beside its region and is reordered in the
    call; 5 and 7 MiB: the first save is staged, later ones are staged only where staging
    and region are free at once (7 MiB: staging found but no region, so the staging is
    given back and the caller reorders into its region), else reordered in the call."""
    xs = [_big("<f4", (1024, 512), seed=i) for i in range(6)]
    with matspool.Spool(daemon.endpoint, ring_bytes=ring_mib * MIB, timeout=60) as s:
        for i, x in enumerate(xs):
            s.save(out_dir / f"t{i}.mat", {"x": x}, format="v5")
        s.flush(60)
        assert s._ring.used == 0
    for i, x in enumerate(xs):
        assert np.array_equal(read(out_dir / f"t{i}.mat", "v5")["x"], x)


def test_failed_save_keeps_its_region_until_the_reorder_ends(
    daemon, out_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A save failed while its reorder still writes into its region: the region must not
    go to another save before the reorder has finished writing."""
    gate, started = threading.Event(), threading.Event()
    real_wait = _reorder.HostReorder.wait

    def slow_wait(self: _reorder.HostReorder) -> None:
        started.set()
        assert gate.wait(30)
        real_wait(self)

    monkeypatch.setattr(_reorder.HostReorder, "wait", slow_wait)
    with matspool.Spool(daemon.endpoint, ring_bytes=8 * MIB, timeout=60) as s:
        fut = s.save(out_dir / "a.mat", {"x": _big("<f4", (1024, 512))})
        assert started.wait(10)
        s._table.fail_unresolved(lambda _: MatspoolError("the daemon went away (simulated)"))
        with pytest.raises(MatspoolError):
            fut.result(5)
        assert s._ring.used >= 2 * MIB  # still held: the reorder has not written yet
        gate.set()
        deadline = time.monotonic() + 5
        while s._ring.used and time.monotonic() < deadline:
            time.sleep(0.01)
        assert s._ring.used == 0
        monkeypatch.setattr(_reorder.HostReorder, "wait", real_wait)
        s.save(out_dir / "b.mat", {"x": np.arange(6.0)}).result(30)


KERNEL_DTYPES = ["<f4", "<f8", "<i2", "|u1", "|b1", "<c8", "<c16", "<i8", ">f8", "<f2"]
KERNEL_SHAPES = [
    (2, 3),
    (17, 33),
    (300, 257),
    (33, 1, 70),
    (5, 7, 9, 11),
    (3, 4, 5, 6, 7),
    (3, 40, 130),
    (2, 30, 41),
    (9, 2, 2),
]


def _views(a: np.ndarray) -> list[np.ndarray]:
    """``a`` and views of it with other strides: reversed rows, every other row, a slab
    of its last axis (how a save in pieces cuts an array), reversed columns."""
    return [a, a[::-1], a[::2], a[..., 1:], a[..., ::-1]]


def _small_tiles(monkeypatch: pytest.MonkeyPatch, tiny: bool) -> None:
    """Threads and tiles even for small arrays; ``tiny``: 3x5 tiles, so that every array
    here has several tiles a side and ragged ones at its edges."""
    monkeypatch.setattr(_transpose, "THREAD_MIN_BYTES", 1)
    monkeypatch.setattr(_transpose, "_MIN_TILE_ELEMENTS", 1)
    if tiny:
        monkeypatch.setattr(_transpose, "_TILES", dict.fromkeys((1, 2, 4, 8, 16), (3, 5)))


@pytest.mark.parametrize("tiny", [False, True], ids=["tiles", "tiny-tiles"])
@pytest.mark.parametrize("dtype", KERNEL_DTYPES)
def test_reverse_axes_is_exact(dtype: str, tiny: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every tile, every thread split (first axis, or the middle when the first is
    short), every stride pattern the kernel accepts: the bytes numpy's transpose gives."""
    _small_tiles(monkeypatch, tiny)
    out = np.dtype(dtype).newbyteorder("=") if dtype != "<f2" else np.dtype("<f4")
    tiled = 0
    for shape in KERNEL_SHAPES:
        for src in _views(_big(dtype, shape)):
            dst = np.empty(src.shape[::-1], out)
            if not _transpose.tiled(src, dst):
                # refused only for a reversed last axis, or a first or last axis of one element
                assert src.strides[-1] != src.itemsize or min(src.shape[0], src.shape[-1]) < 2, src.shape
                continue
            for nthreads in (1, 2, 3):
                dst.fill(0)
                _transpose.reverse_axes(src, dst, nthreads=nthreads)
                assert_exact(dst, src.transpose().astype(out), f"{shape} {src.strides} {nthreads}")
                tiled += 1
    assert tiled >= 3 * 3 * len(KERNEL_SHAPES)


def test_tiled_refuses_what_it_cannot_tile() -> None:
    f4 = np.float32
    a = np.zeros((64, 8, 256), f4)
    assert _transpose.tiled(a, np.empty((256, 8, 64), f4))
    assert _transpose.tiled(a[:, ::2], np.empty((256, 4, 64), f4))  # 3-d: one middle axis, any stride
    a4 = np.zeros((32, 4, 4, 256), f4)
    assert _transpose.tiled(a4, np.empty((256, 4, 4, 32), f4))
    assert not _transpose.tiled(a4[:, ::2], np.empty((256, 4, 2, 32), f4))  # middle axes not mergeable
    wide = np.broadcast_to(np.arange(512.0), (512, 512))
    assert not _transpose.tiled(wide.T, np.empty((512, 512)))  # a broadcast: stride 0
    assert not _transpose.tiled(np.zeros((0, 512), f4), np.empty((512, 0), f4))
    assert not _transpose.tiled(np.zeros((512, 1), f4), np.empty((1, 512), f4))
    assert not _transpose.tiled(np.empty((64, 64), object), np.empty((64, 64), object))
    assert _transpose.tiled(np.zeros((3, 256, 256), f4), np.empty((256, 256, 3), f4))  # CHW: by middle
    # short first and last axes: tiles too small for the loop to pay (torch's copy is faster)
    assert not _transpose.tiled(np.zeros((2, 4096, 2), f4), np.empty((2, 4096, 2), f4))
    assert not _transpose.tiled(np.zeros((64, 1024, 64), f4), np.empty((64, 1024, 64), f4))
    assert not _transpose.tiled(np.zeros((1024, 1024, 3), f4), np.empty((3, 1024, 1024), f4))


@pytest.mark.parametrize("with_torch", [True, False], ids=["torch-loaded", "numpy-only"])
def test_copy_host_every_rank(with_torch: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """1-d to 5-d, zero-size and non-contiguous inputs through the one copy into the ring:
    the bytes ``np.asfortranarray`` gives, nothing written outside the region."""
    import sys

    if not with_torch:
        monkeypatch.delitem(sys.modules, "torch", raising=False)
    monkeypatch.setattr(_transpose, "MIN_BYTES", 0)
    _small_tiles(monkeypatch, tiny=True)
    arrays = [
        _big("<f4", (1000,)),
        _big("<f8", (300, 500)),
        _big("<c8", (20, 30, 40)),
        _big("|b1", (6, 7, 8, 9)),
        _big("<i2", (3, 4, 5, 6, 7)),
        _big("<f4", (0, 50)),
        _big("<f8", (40, 0, 3)),
        _big("<u1", (100, 200, 3))[::-1, 10:],
        _big("<f4", (64, 80, 90))[:, :, 7:50],
        _big("<f8", (2, 50, 70)),  # a short first axis: tiles over the middle and last axes
    ]
    for x in arrays:
        p = prepare("x", x, "matlab", "row")
        ring = np.full(p.nbytes + 128, 0xAB, dtype=np.uint8)
        copy_host(p, ring, 64)
        expected = np.asfortranarray(np.asarray(p.array).astype(np.dtype(p.dtype)))
        assert ring[64 : 64 + p.nbytes].tobytes() == expected.tobytes(order="F"), x.shape
        assert (ring[:64] == 0xAB).all() and (ring[64 + p.nbytes :] == 0xAB).all(), "wrote outside"


def test_in_pieces_3d(daemon, out_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 3-d array bigger than the ring goes in slabs of its last axis; each slab is
    reordered by the tiled kernel straight into its region."""
    slabs = []
    real = _transpose.reverse_axes

    def counted(src: np.ndarray, dst: np.ndarray, **kw: int) -> None:
        slabs.append(src.shape)
        real(src, dst, **kw)

    monkeypatch.setattr(_transpose, "reverse_axes", counted)
    x = _big("<f4", (32, 40, 1200))  # 6 MiB through a 3 MiB ring: slabs of 153 planes
    with matspool.Spool(daemon.endpoint, ring_bytes=3 * MIB, timeout=60) as s:
        s.save(out_dir / "p.mat", {"x": x}, format="v7.3").result(60)
    assert_exact(read(out_dir / "p.mat", "v7.3")["x"], x)
    assert len(slabs) >= 3 and all(sh[:2] == (32, 40) and sh[2] < 1200 for sh in slabs), slabs


def _reverse_in_child(conn: Any) -> None:
    src = _big("<f8", (300, 40, 64))
    dst = np.empty(src.shape[::-1])
    _transpose.reverse_axes(src, dst, nthreads=3)
    conn.send(bool(np.array_equal(dst, src.transpose())))


def test_forked_child_gets_its_own_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """The parent's pool has workers; a child forked after it has none and must not
    hand its tiles to them (it would wait forever)."""
    import multiprocessing

    monkeypatch.setattr(_transpose, "THREAD_MIN_BYTES", 1)
    src = _big("<f4", (200, 600))
    dst = np.empty((600, 200), np.float32)
    _transpose.reverse_axes(src, dst, nthreads=3)  # the parent's pool now has workers
    ctx = multiprocessing.get_context("fork")
    mine, theirs = ctx.Pipe()
    child = ctx.Process(target=_reverse_in_child, args=(theirs,))
    child.start()
    try:
        assert mine.poll(30), "the child's reorder did not finish"
        assert mine.recv() is True
        child.join(10)
        assert child.exitcode == 0
    finally:
        if child.is_alive():
            child.kill()
