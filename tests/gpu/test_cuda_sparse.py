"""CUDA sparse tensors (COO, CSR): indices and values stay on the GPU and are copied like
dense tensors; the file holds the same MATLAB sparse matrix as the CPU tensor's.
Skipped cleanly where CUDA is not available."""

from __future__ import annotations

import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io

import matspool

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _dense() -> np.ndarray:
    rng = np.random.default_rng(0)
    d = rng.standard_normal((50, 40))
    d[rng.random((50, 40)) < 0.9] = 0
    return d


@pytest.mark.parametrize("fmt", ["v5", "v7.3"])
@pytest.mark.parametrize("layout", ["coo", "csr"])
def test_cuda_sparse_round_trips(tmp_path: Path, fmt: str, layout: str) -> None:
    dense = _dense()
    t = torch.tensor(dense, device="cuda", dtype=torch.float32)
    t = t.to_sparse() if layout == "coo" else t.to_sparse_csr()
    with warnings.catch_warnings(), matspool.Spool() as spool:
        warnings.simplefilter("ignore", UserWarning)
        path = (
            spool.save(tmp_path / "s.mat", {"s": t, "l": t.to_dense().ne(0).to_sparse()}, format=fmt)
            .result(timeout=60)
            .path
        )
    want = dense.astype(np.float32).astype(np.float64)  # MATLAB sparse is double
    if fmt == "v5":
        m = scipy.io.loadmat(path)
        np.testing.assert_array_equal(m["s"].toarray(), want)
        np.testing.assert_array_equal(m["l"].toarray() != 0, want != 0)
    else:
        with h5py.File(path, "r") as f:
            g = f["s"]
            assert g.attrs["MATLAB_sparse"] == 50 and g.attrs["MATLAB_class"] == b"double"
            jc, ir, data = g["jc"][()], g["ir"][()], g["data"][()]
            got = np.zeros((50, 40))
            for j in range(40):
                got[ir[jc[j] : jc[j + 1]], j] = data[jc[j] : jc[j + 1]]
            np.testing.assert_array_equal(got, want)
            assert f["l"].attrs["MATLAB_class"] == b"logical"
