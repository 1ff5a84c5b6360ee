"""``O_DIRECT`` payloads (``writers/_direct.py``, on with ``MATSPOOL_DIRECT_IO=1``).

Payloads come from a sealed-style ``memfd`` mapping, as a client's ring reaches the
daemon. Each case checks three things: what the path did (its counters), that the file
is exactly the bytes a buffered save writes (byte for byte but the header's time stamp)
and reads back exactly through scipy or h5py, and, for the direct case, that the payload
never entered the page cache (``mincore`` over the file: a buffered write leaves its pages
cached, a direct one does not). File systems without direct I/O are real ones: tmpfs,
and a ramfs mounted for the test (root only).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import scipy.io

import matspool
from matspool import _protocol as proto
from matspoold.writers import Session, _direct, write_atomic
from matspoold.writers._direct import DIRECT_MIN_BYTES, STATS, dio_alignment

from conftest import start_daemon

PAYLOAD = DIRECT_MIN_BYTES + (1 << 20) + 24  # not a whole number of sectors: a buffered tail
V5_PHASE = 192  # a 2-d v5 variable named "x" starts its payload 192 bytes past a 512 boundary


def _mount(kind: str, where: Path, *opts: str) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"mounting a {kind} needs root")
    where.mkdir()
    r = subprocess.run(["mount", *opts, str(where)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a {kind} here: {r.stderr.strip()}")


@pytest.fixture
def dio_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory on a file system that takes ``O_DIRECT``: the test's own when it does,
    else a loop-mounted ext4 image (root)."""
    probe = tmp_path / "probe"
    probe.write_bytes(b"")
    fd = os.open(probe, os.O_RDONLY)
    try:
        here = dio_alignment(fd)
    finally:
        os.close(fd)
    if here is not None:
        yield tmp_path
        return
    if shutil.which("mkfs.ext4") is None:
        pytest.skip(f"{tmp_path} takes no O_DIRECT and mkfs.ext4 is missing")
    image = tmp_path / "ext4.img"
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    mnt = tmp_path / "ext4"
    _mount("loop ext4 image", mnt, "-o", "loop", str(image))
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


@pytest.fixture
def ramfs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "ramfs"
    _mount("ramfs", mnt, "-t", "ramfs", "ramfs")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


@pytest.fixture
def tmpfs_dir(tmp_path: Path) -> Iterator[Path]:
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm")
    d = Path("/dev/shm") / f"matspool-test-direct-{os.getpid()}-{tmp_path.name}"
    d.mkdir()
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def ring() -> Iterator[mmap.mmap]:
    """Random bytes in a memfd mapped read-only and page-aligned, as the daemon maps a ring."""
    size = PAYLOAD + 8192
    fd = os.memfd_create("direct-test", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        os.pwrite(fd, np.random.default_rng(14).integers(0, 256, size, dtype=np.uint8).tobytes(), 0)
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
    finally:
        os.close(fd)
    yield mm
    mm.close()


@pytest.fixture
def direct_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MATSPOOL_DIRECT_IO", "1")
    STATS.reset()


def _var(mm: mmap.mmap, at: int, name: str = "x") -> tuple[proto.VarSpec, np.ndarray]:
    dims = (8, PAYLOAD // 8)
    spec = proto.VarSpec(name=name, dtype="|u1", dims=dims, offset=at, nbytes=PAYLOAD)
    return spec, np.ndarray(dims, dtype=np.uint8, buffer=mm, offset=at, order="F")


def _read(path: Path, fmt: str) -> np.ndarray:
    if fmt == "v5":
        return np.asarray(scipy.io.loadmat(path)["x"])
    with h5py.File(path, "r") as f:
        return np.asarray(f["x"][()]).T


def _same_but_header_time(a: Path, b: Path) -> None:
    x, y = a.read_bytes(), b.read_bytes()
    assert len(x) == len(y)
    diff = np.flatnonzero(np.frombuffer(x, np.uint8) != np.frombuffer(y, np.uint8))
    assert diff.size == 0 or diff.max() < 116, diff[:10]  # only the header's text (its time)


def _cached_pages(path: Path, start: int, nbytes: int) -> int:
    """Pages of ``path`` in ``[start, start + nbytes)`` that sit in the page cache."""
    libc = ctypes.CDLL(None, use_errno=True)
    page = mmap.PAGESIZE
    first, last = start // page, (start + nbytes - 1) // page
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        base = np.frombuffer(mm, np.uint8).ctypes.data
        vec = (ctypes.c_ubyte * (last - first + 1))()
        rc = libc.mincore(ctypes.c_void_p(base + first * page), (last - first + 1) * page, vec)
        assert rc == 0, ctypes.get_errno()
        return sum(v & 1 for v in vec)


def _payload_offset(path: Path, fmt: str) -> int:
    if fmt == "v7.3":
        with h5py.File(path, "r") as f:
            return int(f["x"].id.get_offset())
    return path.stat().st_size - PAYLOAD  # one variable, its payload last (PAYLOAD % 8 == 0)


@pytest.mark.parametrize(("fmt", "at"), [("v7.3", 0), ("v5", 512 + V5_PHASE)])
def test_fsync_payload_goes_direct_and_the_file_is_exact(
    dio_dir: Path, ring: mmap.mmap, direct_on: None, fmt: str, at: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec, value = _var(ring, at)
    direct = dio_dir / "direct.mat"
    write_atomic(str(direct), fmt, [(spec, value)], fsync=True)
    assert STATS.direct_bytes >= PAYLOAD - 8192, STATS
    assert STATS.misaligned == STATS.unsupported == STATS.refused == 0, STATS
    start = _payload_offset(direct, fmt)
    # the aligned middle of the payload never entered the page cache
    assert _cached_pages(direct, start + 4096, PAYLOAD - 8192) == 0
    monkeypatch.delenv("MATSPOOL_DIRECT_IO")
    buffered = dio_dir / "buffered.mat"
    write_atomic(str(buffered), fmt, [(spec, value)], fsync=True)
    _same_but_header_time(direct, buffered)
    assert _read(direct, fmt).tobytes("F") == value.tobytes("F")


def test_v5_payload_out_of_phase_with_its_file_offset_is_written_buffered(
    dio_dir: Path, ring: mmap.mmap, direct_on: None
) -> None:
    """A v5 payload whose ring address and file offset differ by other than a sector
    cannot be written direct (both must be aligned): buffered, counted, exact."""
    spec, value = _var(ring, 4096)  # page-aligned in the ring, 192 past a sector in the file
    path = dio_dir / "x.mat"
    write_atomic(str(path), "v5", [(spec, value)], fsync=True)
    assert STATS.direct_bytes == 0 and STATS.misaligned >= 1, STATS
    assert _read(path, "v5").tobytes("F") == value.tobytes("F")


def test_without_fsync_nothing_goes_direct(dio_dir: Path, ring: mmap.mmap, direct_on: None) -> None:
    spec, value = _var(ring, 0)
    write_atomic(str(dio_dir / "x.mat"), "v7.3", [(spec, value)], fsync=False)
    assert STATS.direct_bytes == 0 and STATS.buffered_bytes == 0, STATS
    assert _read(dio_dir / "x.mat", "v7.3").tobytes("F") == value.tobytes("F")


def test_pieces_of_a_deferred_variable_go_direct(dio_dir: Path, ring: mmap.mmap, direct_on: None) -> None:
    spec, value = _var(ring, 0)
    deferred = proto.VarSpec(name="x", dtype="|u1", dims=spec.dims, offset=0, nbytes=PAYLOAD, deferred=True)
    path = dio_dir / "x.mat"
    session = Session.begin(str(path), "v7.3", [(deferred, None)], fsync=True)
    half = DIRECT_MIN_BYTES  # two pieces: the first one large and aligned, the second the rest
    flat = np.frombuffer(ring, np.uint8, PAYLOAD)
    session.write(0, 0, flat[:half])
    session.write(0, half, flat[half:])
    session.end()
    assert STATS.direct_bytes >= half, STATS
    assert _read(path, "v7.3").tobytes("F") == value.tobytes("F")


@pytest.mark.parametrize("fs", ["tmpfs", "ramfs"])
def test_file_systems_without_direct_io_get_buffered_writes(
    fs: str, request: pytest.FixtureRequest, ring: mmap.mmap, direct_on: None
) -> None:
    where: Path = request.getfixturevalue("tmpfs_dir" if fs == "tmpfs" else "ramfs")
    spec, value = _var(ring, 0)
    for fmt in ("v7.3", "v5"):
        path = where / f"x-{fmt}.mat"
        write_atomic(str(path), fmt, [(spec, value)], fsync=True)
        assert _read(path, fmt).tobytes("F") == value.tobytes("F")
    assert STATS.direct_bytes == 0 and STATS.unsupported == 2, STATS


def test_a_refused_direct_write_falls_back_to_buffered(
    ramfs: Path, ring: mmap.mmap, direct_on: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file system that claims direct I/O but refuses it (EINVAL from the real kernel:
    ramfs has no direct I/O, its statx answer is overridden here)."""
    monkeypatch.setattr(_direct, "dio_alignment", lambda fd: (512, 512))
    spec, value = _var(ring, 0)
    path = ramfs / "x.mat"
    write_atomic(str(path), "v7.3", [(spec, value)], fsync=True)
    assert STATS.refused == 1 and STATS.direct_bytes == 0, STATS
    assert _read(path, "v7.3").tobytes("F") == value.tobytes("F")


def test_daemon_with_direct_io_writes_exact_files_past_the_page_cache(
    dio_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MATSPOOL_DIRECT_IO", "1")  # inherited by the daemon
    root = dio_dir / "root"
    root.mkdir()
    d = start_daemon(root, dio_dir / "sock")
    try:
        arr: Any = np.asfortranarray(np.random.default_rng(3).random((1024, 1000)))  # 7.8 MiB
        with matspool.Spool(d.endpoint, ring_bytes=16 << 20, timeout=30) as s:
            s.save(root / "x.mat", {"x": arr}, format="v7.3", fsync=True).result()
        with h5py.File(root / "x.mat", "r") as f:
            start = int(f["x"].id.get_offset())
            # before the payload is read: its aligned middle never entered the page cache
            assert _cached_pages(root / "x.mat", start + 4096, arr.nbytes - 8192) == 0
            got = f["x"][()].T
        assert np.array_equal(got, arr)
        assert d.alive()
    finally:
        d.stop()
