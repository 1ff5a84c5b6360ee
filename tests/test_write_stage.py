"""The large-file write stage: fsync'd saves write in steps that start writeback early
(``sync_file_range``), and every byte still lands where it belongs, read back by
independent readers (scipy, h5py) and compared exactly."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io

from matspool import _protocol as proto
from matspoold.writers import write_atomic
from matspoold.writers._files import WRITEBACK_STEP


@pytest.mark.parametrize("fmt", ["v5", "v7.3"])
@pytest.mark.parametrize("fsync", [True, False])
def test_large_variable_written_in_writeback_steps_reads_back_exactly(
    tmp_path: Path, fmt: str, fsync: bool
) -> None:
    rows = (2 * WRITEBACK_STEP + 3 * 4096 + 8) // (8 * 512)  # not a whole number of steps
    arr = np.asfortranarray(np.random.default_rng(5).random((rows, 512)))
    small = np.asfortranarray(np.arange(12, dtype=np.int16).reshape(3, 4))
    specs = [
        (proto.VarSpec(name="big", dtype="<f8", dims=arr.shape, offset=0, nbytes=arr.nbytes), arr),
        (proto.VarSpec(name="small", dtype="<i2", dims=small.shape, offset=0, nbytes=small.nbytes), small),
    ]
    path = tmp_path / "x.mat"
    write_atomic(str(path), fmt, specs, fsync=fsync)
    if fmt == "v5":
        back = scipy.io.loadmat(path)
        assert np.array_equal(back["big"], arr) and np.array_equal(back["small"], small)
    else:
        with h5py.File(path, "r") as f:
            assert np.array_equal(f["big"][()].T, arr) and np.array_equal(f["small"][()].T, small)
    assert [p.name for p in tmp_path.iterdir()] == ["x.mat"]  # no temporary left beside it


def test_large_v73_from_the_cached_layout_is_h5pys_file(tmp_path: Path) -> None:
    """The second save of a large variable with the same name, type and size skips h5py
    (its layout is cached); the file is byte for byte what h5py made for the first save,
    but for the payload and the header's time stamp, and reads back exactly."""
    from matspoold.writers import v73

    shape = (1024, 300)  # 2.3 MiB of float64: above the small-file templates
    rng = np.random.default_rng(9)
    first, second = (np.asfortranarray(rng.random(shape)) for _ in range(2))
    spec = proto.VarSpec(name="w", dtype="<f8", dims=shape, offset=0, nbytes=first.nbytes)
    v73._SPLITS.clear()
    write_atomic(str(tmp_path / "a.mat"), "v7.3", [(spec, first)], fsync=False)
    assert len(v73._SPLITS) == 1  # the layout was kept
    write_atomic(str(tmp_path / "b.mat"), "v7.3", [(spec, second)], fsync=False)
    a, b = (tmp_path / "a.mat").read_bytes(), (tmp_path / "b.mat").read_bytes()
    assert len(a) == len(b)
    diff = np.flatnonzero(np.frombuffer(a, np.uint8) != np.frombuffer(b, np.uint8))
    offset = next(iter(v73._SPLITS.values())).offset
    outside = diff[(diff >= 128) & ((diff < offset) | (diff >= offset + first.nbytes))]
    assert outside.size == 0, outside[:10]
    with h5py.File(tmp_path / "b.mat", "r") as f:
        assert np.array_equal(f["w"][()].T, second)
        assert f["w"].attrs["MATLAB_class"] == b"double"
