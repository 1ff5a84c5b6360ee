"""A stream's large steps go from the ring to the file without a step-sized buffer.

HDF5's own write path copies a step into a chunk buffer of the step's size first (a
256 MiB step took the daemon from 28 to 290 MiB of private memory, ``bench.daemon_rss``);
``stream._put_step`` writes large uncompressed steps as raw chunks instead. Measured by
the process's peak RSS (``ru_maxrss``, a high-water mark: no sampling to miss the peak)
in a fresh process whose ring pages are already resident. The files hold the chunks and
attributes HDF5's own path writes (byte for byte the same file where nothing else is
allocated around the first chunk).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from matspool import _protocol as proto
from matspoold.writers import WRITERS, write_atomic
from matspoold.writers import stream as stream_mod

STEP_MIB = 64

_SCRIPT = textwrap.dedent(
    """
    import hashlib, mmap, os, resource, sys
    import numpy as np
    from matspool import _protocol as proto
    from matspoold.writers import WRITERS, write_atomic

    n = {mib} << 20
    fd = os.memfd_create("ring")
    os.ftruncate(fd, n)
    rng = np.random.default_rng(1)
    for at in range(0, n, 1 << 20):  # in small pieces: no ring-sized temporary raises the peak
        os.pwrite(fd, rng.random((1 << 20) // 8).tobytes(), at)
    mm = mmap.mmap(fd, n, mmap.MAP_SHARED, mmap.PROT_READ)
    hashlib.sha1(mm).digest()  # the ring's pages resident, as a client's ring is
    dims = (1024, n // 8 // 1024)
    value = np.ndarray(dims, dtype="<f8", buffer=mm, order="F")
    spec = proto.VarSpec(name="u", dtype="<f8", dims=dims, offset=0, nbytes=n)
    import h5py  # loaded before the baseline: its libraries are not the step's cost
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    write_atomic(sys.argv[1], "stream", [(spec, value)], fsync=False)
    WRITERS["stream"].append(sys.argv[1], [(spec, value)], fsync=False)
    print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)
    """
)


def test_large_stream_steps_need_no_step_sized_buffer(tmp_path: Path) -> None:
    path = tmp_path / "s.mat"
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT.format(mib=STEP_MIB), str(path)],
        capture_output=True,
        text=True,
        check=True,
    )
    grew_mib = int(out.stdout.strip())
    assert grew_mib < STEP_MIB // 4, f"peak RSS grew {grew_mib} MiB writing {STEP_MIB} MiB steps"
    with h5py.File(path, "r") as f:
        assert f["u"].shape == (2, STEP_MIB * 1024 * 1024 // 8 // 1024, 1024)


@pytest.mark.parametrize(
    ("dtype", "dims"),
    [("<f8", (1024, 160)), ("<c16", (512, 160)), ("|b1", (1024, 1100)), ("<f4", (3, 5)), ("|b1", (7, 1))],
)
def test_raw_chunk_steps_hold_what_hdf5_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: str, dims: tuple[int, int]
) -> None:
    rng = np.random.default_rng(4)
    steps = [
        np.asfortranarray(
            rng.random(dims) > 0.5
            if dtype == "|b1"
            else (rng.random(dims) + 1j * rng.random(dims)).astype(dtype)
            if dtype[1] == "c"
            else rng.random(dims).astype(dtype)
        )
        for _ in range(3)
    ]
    spec = proto.VarSpec(name="u", dtype=dtype, dims=dims, offset=0, nbytes=steps[0].nbytes)

    def write(path: Path) -> bytes:
        write_atomic(str(path), "stream", [(spec, steps[0])], fsync=False)
        for s in steps[1:]:
            WRITERS["stream"].append(str(path), [(spec, s)], fsync=False)
        return path.read_bytes()

    ours = write(tmp_path / "raw.mat")
    monkeypatch.setattr(stream_mod, "DIRECT_CHUNK_BYTES", 1 << 62)  # HDF5's own path only
    theirs = write(tmp_path / "hdf5.mat")
    assert len(ours) == len(theirs)
    if dtype == "<f8":  # nothing else allocated around the first chunk: the very same file
        diff = np.flatnonzero(np.frombuffer(ours, np.uint8) != np.frombuffer(theirs, np.uint8))
        assert diff.size == 0 or diff.max() < 116, diff[:10]  # the header's time stamp only
    seen = []  # else the same chunks and attributes (HDF5 placed its first chunk later)
    for name in ("raw.mat", "hdf5.mat"):
        with h5py.File(tmp_path / name, "r") as f:
            ds = f["u"]
            chunks = [ds.id.read_direct_chunk((i, 0, 0)) for i in range(len(steps))]
            seen.append((chunks, dict(ds.attrs), ds.dtype, ds.shape, ds.chunks, ds.maxshape))
    assert seen[0] == seen[1]
    with h5py.File(tmp_path / "raw.mat", "r") as f:
        got = f["u"][()]
    for i, s in enumerate(steps):
        want = s.reshape(-1, order="F")
        if dtype[1] == "c":
            assert np.array_equal(got[i]["real"].reshape(-1), want.real)
            assert np.array_equal(got[i]["imag"].reshape(-1), want.imag)
        else:
            assert np.array_equal(got[i].reshape(-1), want.view(np.uint8) if dtype == "|b1" else want)
