"""Large saves that fit in the ring, sent in slabs whose writes overlap their copies
(``matspool._overlap``): exact files in both formats and layouts, and failures half-way
that leave no file and give the ring back."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import scipy.io

import matspool
from matspool import Spool, _overlap, _spool, _transpose

RING = 128 << 20


@pytest.fixture
def taken(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Whether each save went overlapped (True) or whole (False)."""
    seen: list[bool] = []
    real = _overlap.send_overlapped
    monkeypatch.setattr(_overlap, "ENABLED", True)  # whatever this machine's cores

    def spy(*args: Any) -> Any:
        try:
            fut = real(*args)
        except BaseException:
            seen.append(True)  # raised in save(): it had begun overlapped
            raise
        seen.append(fut is not None)
        return fut

    monkeypatch.setattr(_spool, "send_overlapped", spy)
    return seen


def _read(path: Path, fmt: str) -> dict[str, np.ndarray]:
    if fmt == "v5":
        return {k: v for k, v in scipy.io.loadmat(path).items() if not k.startswith("__")}
    out = {}
    with h5py.File(path) as f:  # h5py sees MATLAB's dims reversed, complex as a compound
        for k in f:
            v = f[k][()].T
            if v.dtype.names == ("real", "imag"):
                v = v["real"] + 1j * v["imag"].astype(v.dtype["real"])
            out[k] = v
    return out


def _settled(s: Spool) -> None:
    """Every region back (a failed save's regions return with its END's answer)."""
    deadline = time.monotonic() + 30
    while (s._ring.used or s.pending) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert s._ring.used == 0 and s.pending == 0


@pytest.mark.parametrize("fmt", ["v5", "v7.3"])
@pytest.mark.parametrize("layout", ["raw", "matlab"])
@pytest.mark.parametrize("mode", [0o600, 0o640], ids=["memfd", "shm"])
def test_overlapped_save_is_exact(
    daemon: Any, out_dir: Path, taken: list[bool], fmt: str, layout: str, mode: int
) -> None:
    """A ``/dev/shm`` ring (mode 0o640) is never mapped by the daemon: its slabs are
    spliced into the file, v5's complex ones copied out (real and imaginary apart)."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((3001, 1237)).astype(np.float32)  # 14.2 MiB: slabs of 8 MiB, one short
    y = rng.integers(-9, 9, (1111, 2003), dtype=np.int64)  # 17 MiB, the largest: overlapped
    z = (rng.standard_normal((2049, 1031)) + 1j * rng.standard_normal((2049, 1031))).astype(np.complex64)
    small = np.arange(12.0).reshape(3, 4)
    with Spool(daemon.endpoint, ring_bytes=RING, timeout=30, ring_mode=mode) as s:
        assert s._ring.kind == ("memfd" if mode == 0o600 else "shm")
        values = {"x": x, "y": y, "z": z, "small": small}
        res = s.save(out_dir / "big.mat", values, format=fmt, layout=layout).result(60)
        _settled(s)
    assert taken == [True]
    assert res.nbytes == (out_dir / "big.mat").stat().st_size
    got = _read(out_dir / "big.mat", fmt)
    for name, v in values.items():
        want = v.T if layout == "raw" else v
        assert got[name].dtype == want.dtype and got[name].shape == want.shape, name
        assert got[name].tobytes() == np.ascontiguousarray(want).tobytes(), name
    assert [p.name for p in out_dir.iterdir()] == ["big.mat"]


def test_what_cannot_overlap_goes_whole(daemon: Any, out_dir: Path, taken: list[bool]) -> None:
    """Compressed, fsynced, a 3-d array to reorder, a ring without room for a snapshot
    and the slabs at once: whole saves, exact."""
    rng = np.random.default_rng(4)
    flat = rng.standard_normal((2048, 1100))  # 17 MiB
    cube = rng.standard_normal((64, 128, 260))  # 16.3 MiB, C order: a 3-d reorder
    with Spool(daemon.endpoint, ring_bytes=RING, timeout=30) as s:
        hold = s._leases.take(RING - flat.nbytes * 3 // 2, block=False, timeout=None, daemon=False)
        try:  # the ring is empty: the hold is one block from its start, the rest one block
            s.save(out_dir / "tight.mat", {"x": flat}).result(60)
        finally:
            s._leases.copied(hold)
        s.save(out_dir / "c.mat", {"x": flat}, compress=True).result(60)
        s.save(out_dir / "f.mat", {"x": flat}, fsync=True).result(60)
        s.save(out_dir / "cube.mat", {"x": cube}, format="v7.3").result(60)
        _settled(s)
    assert taken == [False, False, False, False]
    for name in ("c", "f", "tight"):
        np.testing.assert_array_equal(_read(out_dir / f"{name}.mat", "v5")["x"], flat)
    np.testing.assert_array_equal(_read(out_dir / "cube.mat", "v7.3")["x"], cube)


def _fail_on(monkeypatch: pytest.MonkeyPatch, module: Any, name: str, call: int) -> None:
    real = getattr(module, name)
    calls = [0]

    def failing(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == call:
            raise RuntimeError("injected copy failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, failing)


@pytest.mark.parametrize("fmt", ["v5", "v7.3"])
def test_a_slab_reorder_failing_halfway_leaves_no_file(
    daemon: Any, out_dir: Path, taken: list[bool], monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    """The third slab's reorder (copy thread) fails after two slabs were written: the
    future fails, END aborts the file, every region returns."""
    x = np.random.default_rng(5).standard_normal((4096, 1100)).astype(np.float32)  # 17 MiB, 3 slabs
    with Spool(daemon.endpoint, ring_bytes=RING, timeout=30) as s:
        _fail_on(monkeypatch, _transpose, "reverse_axes", 3)
        fut = s.save(out_dir / "x.mat", {"x": x}, format=fmt)
        with pytest.raises(matspool.MatspoolError, match="injected copy failure"):
            fut.result(60)
        _settled(s)
        monkeypatch.undo()
        s.save(out_dir / "y.mat", {"x": x}, format=fmt).result(60)  # the spool carries on
        _settled(s)
    assert taken == [True]
    assert sorted(p.name for p in out_dir.iterdir()) == ["y.mat"]
    np.testing.assert_array_equal(_read(out_dir / "y.mat", fmt)["x"], x)


def test_a_slab_copy_failing_in_the_caller_leaves_no_file(
    daemon: Any, out_dir: Path, taken: list[bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    """layout="raw": the caller copies each slab; the third copy raises in save() itself."""
    x = np.random.default_rng(6).standard_normal((4096, 1100)).astype(np.float32)
    with Spool(daemon.endpoint, ring_bytes=RING, timeout=30) as s:
        _fail_on(monkeypatch, _overlap, "copy_host", 3)
        with pytest.raises(RuntimeError, match="injected copy failure"):
            s.save(out_dir / "x.mat", {"x": x}, layout="raw")
        _settled(s)
        assert taken == [True]
    assert list(out_dir.iterdir()) == []


def test_a_missing_directory_fails_and_frees_the_ring(daemon: Any, out_dir: Path, taken: list[bool]) -> None:
    x = np.random.default_rng(7).standard_normal((2048, 1100))  # 17 MiB
    with Spool(daemon.endpoint, ring_bytes=RING, timeout=30) as s:
        for layout in ("raw", "matlab"):
            fut = s.save(out_dir / "missing" / "x.mat", {"x": x}, layout=layout)
            with pytest.raises(matspool.WriteFailed, match="does not exist"):
                fut.result(60)
            _settled(s)
    assert taken == [True, True]
    assert list(out_dir.iterdir()) == []
