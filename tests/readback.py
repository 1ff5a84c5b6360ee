"""Independent readers for the tests: what MATLAB would load, as numpy arrays.

v5 through scipy (logical back to bool, by the class ``whosmat`` reports); v7.3 through
h5py, checking MATLAB's attributes on the way (dims reversed, ``{real, imag}`` complex,
``MATLAB_int_decode`` on logical, ``MATLAB_empty`` size vectors).
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import scipy.io

__all__ = ["REFERENCE_DIR", "REFERENCE_V7", "REFERENCE_V73", "read", "read_v5", "read_v73"]

#: MAT files MATLAB itself wrote, committed with the tests (see data/PROVENANCE.md)
REFERENCE_DIR = Path(__file__).resolve().parent / "data"
REFERENCE_V73 = REFERENCE_DIR / "matlab_basic_v73.mat"
REFERENCE_V7 = REFERENCE_DIR / "matlab_basic_v7.mat"


def read_v73(path: Path) -> dict[str, np.ndarray]:
    out = {}
    with h5py.File(path, "r") as f:
        for name, ds in f.items():
            cls = ds.attrs["MATLAB_class"].decode()
            if ds.attrs.get("MATLAB_empty", 0):
                out[name] = np.zeros(tuple(int(d) for d in ds[()]), dtype=np.float64)
                continue
            data = ds[()]
            if data.dtype.names == ("real", "imag"):
                c = np.empty(data.shape, np.result_type(data["real"].dtype, np.complex64))
                c.real, c.imag = data["real"], data["imag"]
                data = c
            if cls == "logical":
                assert ds.attrs["MATLAB_int_decode"] == 1
                data = data.astype(bool)
            out[name] = data.T  # HDF5 keeps MATLAB's column-major bytes: dims reversed
    return out


def read_v5(path: Path) -> dict[str, np.ndarray]:
    classes = {name: cls for name, _, cls in scipy.io.whosmat(path)}
    m = scipy.io.loadmat(path, squeeze_me=False)
    return {k: (v.astype(bool) if classes[k] == "logical" else v)
            for k, v in m.items() if not k.startswith("__")}


def read(path: Path, fmt: str) -> dict[str, np.ndarray]:
    """Read ``path`` as ``fmt``, after checking its header says so."""
    with open(path, "rb") as f:
        head = f.read(128)
    assert head.startswith(b"MATLAB 5.0 MAT-file" if fmt == "v5" else b"MATLAB 7.3 MAT-file"), head[:20]
    return read_v5(path) if fmt == "v5" else read_v73(path)
