"""Independent readers for the tests: what MATLAB would load, as numpy arrays, and one exact
comparison.

v5 through scipy (logical back to bool, by the class ``whosmat`` reports); v7.3 through
h5py, checking MATLAB's attributes on the way (dims reversed, ``{real, imag}`` complex,
``MATLAB_int_decode`` on logical, ``MATLAB_empty`` size vectors). ``assert_exact`` is the
comparison every round trip uses: same dtype, same shape, same bytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import h5py
import numpy as np
import scipy.io

__all__ = [
    "CLASS_DTYPES",
    "REFERENCE_DIR",
    "REFERENCE_V7",
    "REFERENCE_V73",
    "assert_exact",
    "assert_variables",
    "attr_signature",
    "dataset_value",
    "read",
    "read_v5",
    "read_v73",
]

#: MAT files MATLAB itself wrote, committed with the tests (see data/PROVENANCE.md)
REFERENCE_DIR = Path(__file__).resolve().parent / "data"
REFERENCE_V73 = REFERENCE_DIR / "matlab_basic_v73.mat"
REFERENCE_V7 = REFERENCE_DIR / "matlab_basic_v7.mat"

#: numpy dtype of each numeric or logical MATLAB class
CLASS_DTYPES: dict[str, type[np.generic]] = {
    "double": np.float64,
    "single": np.float32,
    "logical": np.bool_,
    "int8": np.int8,
    "int16": np.int16,
    "int32": np.int32,
    "int64": np.int64,
    "uint8": np.uint8,
    "uint16": np.uint16,
    "uint32": np.uint32,
    "uint64": np.uint64,
}


def dataset_value(ds: h5py.Dataset) -> np.ndarray:
    """The array MATLAB sees for one numeric or logical v7.3 dataset (``A(i,j) == a[i,j]``)."""
    cls = ds.attrs["MATLAB_class"].decode()
    if ds.attrs.get("MATLAB_empty", 0):  # an empty is stored as its MATLAB size
        return np.zeros(tuple(int(d) for d in ds[()]), dtype=CLASS_DTYPES[cls])
    data = ds[()]
    if data.dtype.names == ("real", "imag"):
        c = np.empty(data.shape, np.result_type(data["real"].dtype, np.complex64))
        c.real, c.imag = data["real"], data["imag"]
        data = c
    elif cls == "logical":
        assert ds.attrs["MATLAB_int_decode"] == 1
        data = data.astype(bool)
    return np.ascontiguousarray(data.T)  # HDF5 keeps MATLAB's column-major bytes: dims reversed


def attr_signature(obj: h5py.HLObject, name: str) -> dict[str, Any]:
    """Everything MATLAB might look at in one HDF5 attribute but its value: type and dataspace."""
    aid = obj.attrs.get_id(name)
    tid, space = aid.get_type(), aid.get_space()
    sig: dict[str, Any] = {
        "class": tid.get_class(),
        "size": tid.get_size(),
        "space": space.get_simple_extent_type(),
        "shape": space.shape,
    }
    if tid.get_class() == h5py.h5t.STRING:
        sig.update(cset=tid.get_cset(), strpad=tid.get_strpad(), vlen=tid.is_variable_str())
    elif tid.get_class() == h5py.h5t.INTEGER:
        sig.update(sign=tid.get_sign(), order=tid.get_order())
    elif tid.get_class() == h5py.h5t.VLEN:
        st = tid.get_super()
        sig.update(super_class=st.get_class(), super_size=st.get_size())
        if st.get_class() == h5py.h5t.STRING:
            sig.update(super_cset=st.get_cset(), super_strpad=st.get_strpad())
    return sig


def read_v73(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        return {name: dataset_value(ds) for name, ds in f.items()}


def read_v5(path: Path) -> dict[str, np.ndarray]:
    classes = {name: cls for name, _, cls in scipy.io.whosmat(path)}
    m = scipy.io.loadmat(path, squeeze_me=False)
    return {
        k: (v.astype(bool) if classes[k] == "logical" else v) for k, v in m.items() if not k.startswith("__")
    }


def read(path: Path, fmt: str) -> dict[str, np.ndarray]:
    """Read ``path`` as ``fmt``, after checking its header says so."""
    with open(path, "rb") as f:
        head = f.read(128)
    assert head.startswith(b"MATLAB 5.0 MAT-file" if fmt == "v5" else b"MATLAB 7.3 MAT-file"), head[:20]
    return read_v5(path) if fmt == "v5" else read_v73(path)


def assert_exact(actual: Any, expected: Any, what: str = "") -> None:
    """Same dtype, same shape, same values, and the same bytes (NaN payloads and -0.0 count)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype}, expected {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape}, expected {expected.shape}"
    np.testing.assert_array_equal(actual, expected, err_msg=what)
    assert np.ascontiguousarray(actual).tobytes() == np.ascontiguousarray(expected).tobytes(), (
        f"{what}: bit patterns differ"
    )


def assert_variables(got: dict[str, Any], want: dict[str, Any], what: str = "") -> None:
    """The same variable names, each :func:`assert_exact`."""
    assert sorted(got) == sorted(want), (what, sorted(got), sorted(want))
    for name, w in want.items():
        assert_exact(got[name], w, f"{what} {name}".strip())
