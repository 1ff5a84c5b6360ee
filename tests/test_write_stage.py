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
