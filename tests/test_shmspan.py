"""Large arrays of a ``/dev/shm`` ring go into the file by ``splice`` (``shmspan``): every
byte lands where it belongs (read back by scipy and h5py, compared exactly), beside the
arrays still copied out (small, complex, in a tree); a ring shrunk under the save fails
that save and leaves no file."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io

import matspool
from matspool import _protocol as proto
from matspool._errors import RingError
from matspoold import shmspan
from matspoold.jobs import Job, JobRunner, _array, payload_of
from matspoold.ringio import ShmRing
from matspoold.sessions import Client

from conftest import DaemonProc

BIG = shmspan.SPAN_MIN_BYTES + 4096 + 8  # not a whole number of pipe rounds


@pytest.fixture
def ring() -> Iterator[tuple[str, int]]:
    path = f"/dev/shm/matspool-test-span-{os.getpid()}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    yield path, fd
    os.close(fd)
    os.unlink(path)


def _place(fd: int, arrays: dict[str, np.ndarray]) -> list[proto.VarSpec]:
    """The arrays written column-major into the ring file, one after another (64-byte aligned)."""
    specs, at = [], 0
    for name, arr in arrays.items():
        raw = np.asfortranarray(arr).reshape(-1, order="F").view(np.uint8)
        os.pwrite(fd, raw, at)
        specs.append(
            proto.VarSpec(name=name, dtype=arr.dtype.str, dims=arr.shape, offset=at, nbytes=arr.nbytes)
        )
        at += -(-arr.nbytes // 64) * 64
    return specs


def _run(fd: int, path: Path, fmt: str, specs: list[proto.VarSpec], fsync: bool = False) -> None:
    req = proto.WriteRequest(seq=1, path=str(path), format=fmt, fsync=fsync, vars=tuple(specs))
    size = os.fstat(fd).st_size
    client = Client(ident=b"t", ring="t", mm=ShmRing(fd, size), fd=-1, pid=os.getpid())
    _, err = JobRunner([str(path.parent)]).run(Job(client, req))
    if err is not None:
        raise err


def _read(path: Path, fmt: str, name: str) -> np.ndarray:
    if fmt == "v5":
        return scipy.io.loadmat(path)[name]
    with h5py.File(path, "r") as f:
        data = f[name][()].T
    return data["real"] + 1j * data["imag"] if data.dtype.names else data


@pytest.mark.parametrize("fmt", ["v5", "v7.3"])
@pytest.mark.parametrize("fsync", [False, True])
def test_spans_and_copied_arrays_read_back_exactly(
    ring: tuple[str, int], tmp_path: Path, fmt: str, fsync: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(3)
    arrays = {
        "f": rng.random((BIG // 4 // 8, 8), dtype=np.float32),
        "small": np.arange(12, dtype=np.int16).reshape(3, 4),
        "i": rng.integers(-(2**15), 2**15, (BIG // 2,), dtype=np.int16).reshape(-1, 1),
        "z": (rng.random((300, 300)) + 1j * rng.random((300, 300))),  # complex: copied out
    }
    copied: list[int] = []
    real = shmspan.ShmSpan.copy_to

    def counting(self: shmspan.ShmSpan, out: int, at: int) -> None:
        copied.append(self.nbytes)
        real(self, out, at)

    monkeypatch.setattr(shmspan.ShmSpan, "copy_to", counting)
    path = tmp_path / "x.mat"
    specs = _place(ring[1], arrays)
    for _ in range(2):
        _run(ring[1], path, fmt, specs, fsync)
        for name, arr in arrays.items():
            back = _read(path, fmt, name)
            assert back.dtype == arr.dtype and np.array_equal(back, arr), name
    for _ in range(2):  # one variable: v7.3's second save reuses the first's layout (no h5py)
        _run(ring[1], path, fmt, specs[:1], fsync)
        assert np.array_equal(_read(path, fmt, "f"), arrays["f"])
    assert sorted(copied) == sorted([arrays["f"].nbytes] * 4 + [arrays["i"].nbytes] * 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.mat"]


def test_logical_span_reads_back(ring: tuple[str, int], tmp_path: Path) -> None:
    arr = np.random.default_rng(4).random((BIG, 1)) > 0.5
    specs = _place(ring[1], {"b": arr})
    for fmt in ("v5", "v7.3"):
        _run(ring[1], tmp_path / "b.mat", fmt, specs)
        if fmt == "v5":
            assert np.array_equal(scipy.io.loadmat(tmp_path / "b.mat")["b"].astype(bool), arr)
        else:
            with h5py.File(tmp_path / "b.mat", "r") as f:
                assert f["b"].attrs["MATLAB_class"] == b"logical"
                assert np.array_equal(f["b"][()].T.astype(bool), arr)


@pytest.mark.parametrize("fmt", ["v5", "v7.3"])
def test_a_ring_shrunk_under_the_save_fails_it(ring: tuple[str, int], tmp_path: Path, fmt: str) -> None:
    arr = np.ones((BIG // 8, 1))
    specs = _place(ring[1], {"x": arr})
    os.ftruncate(ring[1], arr.nbytes // 2)  # a mapping read past here would be SIGBUS
    with pytest.raises(RingError, match="shrank"):
        _run(ring[1], tmp_path / "x.mat", fmt, specs)
    assert list(tmp_path.iterdir()) == []  # no temporary, no x.mat


def test_a_shm_ring_client_saves_large_arrays_through_the_daemon(daemon: DaemonProc) -> None:
    arr = np.random.default_rng(6).random((BIG // 8 // 16, 16))
    with matspool.Spool(daemon.endpoint, ring_bytes=16 << 20, ring_mode=0o660, timeout=30) as spool:
        assert spool._ring is not None and spool._ring.kind == "shm"
        for fmt in ("v5", "v7.3"):
            spool.save(str(daemon.root / f"{fmt}.mat"), {"x": arr}, format=fmt).result(30)
            assert np.array_equal(_read(daemon.root / f"{fmt}.mat", fmt, "x"), arr)


def test_an_array_sharing_a_spans_offset_is_copied_out_too(ring: tuple[str, int], tmp_path: Path) -> None:
    """Arrays may overlap in the ring (a mapped ring reads them so): small ones at a
    span's offset are still copied out, and two copied out from one offset (8 and 4
    elements) each get all of their bytes."""
    big = np.random.default_rng(7).random((BIG // 8, 1))
    specs = _place(ring[1], {"big": big})
    heads = [proto.VarSpec(name=f"h{n}", dtype="<f8", dims=(n, 1), offset=0, nbytes=8 * n) for n in (8, 4)]
    for fmt in ("v5", "v7.3"):
        _run(ring[1], tmp_path / "o.mat", fmt, [*specs, *heads])  # the shorter copy last
        assert np.array_equal(_read(tmp_path / "o.mat", fmt, "big"), big)
        for n in (8, 4):
            assert np.array_equal(_read(tmp_path / "o.mat", fmt, f"h{n}"), big[:n])


def test_remote_frames_sharing_an_offset_each_read_back_whole() -> None:
    """A remote client's frames, matched by offset: the longer of two arrays at one offset
    is not cut to the shorter one's frame."""
    data = np.arange(8.0)
    specs = [proto.VarSpec(name=f"h{n}", dtype="<f8", dims=(n, 1), offset=0, nbytes=8 * n) for n in (8, 4)]
    req = proto.WriteRequest(seq=1, path="/x.mat", format="v5", fsync=False, vars=tuple(specs))
    frames = [memoryview(data.tobytes()), memoryview(data[:4].tobytes())]
    src = payload_of(req, frames)
    for spec in specs:
        assert np.array_equal(_array(src, spec).reshape(-1), data[: spec.dims[0]])
