"""``ringio.prefault``: a sealed ring's pages mapped in one call before a writer reads them.

Seen by the process's own minor-fault count: reading a fresh mapping after ``prefault``
takes (almost) no page faults, without it one per fault-around block at least; and the
call never reaches past the mapping nor keeps it from being closed.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import resource
from pathlib import Path

import pytest

from matspoold import ringio

SIZE = 8 << 20


@pytest.fixture
def ring_fd() -> int:
    fd = os.memfd_create("prefault-test", os.MFD_CLOEXEC)
    os.ftruncate(fd, SIZE)
    os.pwrite(fd, os.urandom(SIZE), 0)  # the pages exist in the memfd, as a client's ring
    yield fd
    os.close(fd)


def _faults_reading(mm: mmap.mmap) -> int:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    hashlib.sha1(mm).digest()  # reads every byte, allocates nothing
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_prefault_maps_the_pages_in_one_call(ring_fd: int) -> None:
    cold = mmap.mmap(ring_fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ)
    try:
        without = _faults_reading(cold)
    finally:
        cold.close()
    mm = mmap.mmap(ring_fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ)
    try:
        ringio.prefault(mm, 0, SIZE)
        with_prefault = _faults_reading(mm)
    finally:
        mm.close()  # no buffer of it is left exported
    assert without >= 32, without  # 8 MiB in 64 KiB fault-around blocks: 128 faults
    assert with_prefault <= 8, with_prefault


def test_prefault_stays_inside_the_mapping(ring_fd: int) -> None:
    mm = mmap.mmap(ring_fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ)
    try:
        ringio.prefault(mm, SIZE - 4096, 64 << 20)  # a range reaching past the end
        ringio.prefault(mm, SIZE + 4096, 4 << 20)  # starting past the end
        ringio.prefault(mm, -4096, 4 << 20)
        assert mm[SIZE - 1 : SIZE] == os.pread(ring_fd, 1, SIZE - 1)
    finally:
        mm.close()


def test_v5_into_a_non_empty_temporary_leaves_no_old_bytes(tmp_path: Path) -> None:
    """The v5 writer opens the daemon's temporary without ``O_TRUNC`` (ext4 would start its
    writeback at close); a temporary that somehow holds bytes is still emptied first."""
    import numpy as np
    import scipy.io

    from matspool import _protocol as proto
    from matspoold.writers.v5 import write_v5

    arr = np.asfortranarray(np.arange(3 << 18, dtype=np.float64).reshape(768, 1024))  # 6 MiB
    spec = proto.VarSpec(name="x", dtype="<f8", dims=arr.shape, offset=0, nbytes=arr.nbytes)
    p = tmp_path / "t.mat"
    p.write_bytes(b"\xff" * (arr.nbytes * 2))  # longer than the file written into it
    fd = os.open(p, os.O_RDWR)
    try:
        write_v5(f"/proc/self/fd/{fd}", [(spec, arr)])
    finally:
        os.close(fd)
    back = scipy.io.loadmat(p)["x"]
    assert back.shape == arr.shape and np.array_equal(back, arr)
    assert p.stat().st_size < arr.nbytes + 512
