"""Per-save metadata: dict -> struct, str -> char, non-numeric list -> 1xN cell.

One daemon serves the whole module. What is checked:

* round trip in both formats: v5 through ``scipy.io.loadmat`` (``simplify_cells`` and the
  raw struct arrays, ``whosmat`` for top-level classes), v7.3 through ``mat73``, ``h5py``
  (the raw HDF5 layout) and ``hdf5storage``; both formats give the same tree;
* layout against MATLAB's own files (``tests/data``): the reference's
  ``struct_*``, ``char_*`` and ``cell_*`` values saved by matspool and compared object by
  object, attribute by attribute (low-level HDF5 types included);
* GNU Octave loads the v5 metadata (field names, classes, sizes);
* errors: bad field names, unsupported leaves (the message names the path), nesting
  limits, and hostile trees straight into ``_protocol.parse_write``;
* Unicode text round-trips exactly in both formats.

The v7.3 layout is MATLAB's, and ``test_layout_matches_matlab`` allows no deviation:

* ``H5PATH``: an object inside ``#refs#`` carries its own path (``/#refs#/b``); a field
  carries its parent's H5PATH followed by the parent's name, so paths concatenate without
  separators (``/struct_nested``, ``/struct_nestedlevel1``, ``/#refs#/ww`` for a field of
  ``#refs#/w``); top-level objects and the ``canonical empty`` have none. NULLTERM strings.
* ``MATLAB_fields``: a vlen of 1-byte NULLTERM ASCII strings, left out of a one-field
  struct as MATLAB leaves it out.
* A struct with no fields (``{}``) is MATLAB's ``struct_no_fields``: a uint64 ``[1 1]``
  dataset with ``MATLAB_empty`` = 1; mat73 reads it (ours and MATLAB's) as ``[[[]]]``.
* Storage layout: MATLAB writes these small datasets COMPACT, we write CONTIGUOUS.

An empty string is stored as MATLAB stores ``''`` (size ``[0 0]``, ``MATLAB_empty``, no
``MATLAB_int_decode``), the 0x0 char our v5 files hold too.
* A multi-row char (``char_array``) and empty struct/cell arrays (``struct_empty``,
  ``cell_empty``) have no Python spelling here and are not compared.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import h5py
import hdf5storage
import mat73
import numpy as np
import pytest
import scipy.io
import torch

import matspool
from matspool import _protocol as proto
from matspool._convert import MAX_DEPTH

from conftest import DaemonProc
from readback import REFERENCE_V7, REFERENCE_V73, attr_signature

OCTAVE = shutil.which("octave")
FORMATS = ("v5", "v7.3")


# -- shared fixtures -----------------------------------------------------------------------
# mdaemon, mspool and root come from conftest.py


def save(spool: matspool.Spool, path: Path, variables: dict[str, Any], fmt: str) -> Path:
    res = spool.save(path, variables, format=fmt).result(timeout=60)
    assert res.path == str(path) and res.format == fmt
    assert res.nbytes == path.stat().st_size
    return path


_good = iter(range(1 << 30))


def assert_serves(spool: matspool.Spool, daemon: DaemonProc, directory: Path) -> None:
    """After a refused save the daemon (and the spool) still write a good file."""
    assert daemon.alive()
    k = next(_good)
    fmt = FORMATS[k % 2]
    path = save(spool, directory / f"good_{k}.mat", {"m": {"k": float(k), "s": "ok"}}, fmt)
    m = scipy.io.loadmat(path, simplify_cells=True) if fmt == "v5" else mat73.loadmat(path)
    assert m["m"] == {"k": float(k), "s": "ok"}


# -- the metadata ----------------------------------------------------------------------------
def metadata() -> dict[str, Any]:
    return {
        "params": {
            "dt": 1e-3,
            "solver": "rk4",
            "grid": np.arange(6).reshape(2, 3),
            "nested": {"a": [1, 2, 3], "flag": True},
        },
        "step": 120,
        "title": "run 1",
        "tags": ["a", "bc", 3.5, np.ones((2, 2))],
        "u": np.ones((2, 3), np.float32),
        "model": {
            "w": torch.arange(6, dtype=torch.float32).reshape(2, 3),
            "b": torch.tensor([0.5, -1.5], dtype=torch.float64),
            "n": torch.tensor(7, dtype=torch.int32),
            "mask": torch.tensor([True, False, True]),
        },
        "tensors": [torch.ones(2, dtype=torch.int16), torch.zeros(1, 3)],  # tensors -> a cell
        "empty_text": "",
        "names": ["x", "yy", "zzz"],
        "table": [[1, 2, 3], [4, 5, 6]],  # numeric list of lists -> a 2x3 array, not a cell
        "nothing": {},
    }


# What MATLAB sees, as (class, size, value in MATLAB index order) for arrays; str for char;
# dict for struct; list for a 1xN cell.
EXPECTED: dict[str, Any] = {
    "params": {
        "dt": ("double", (1, 1), np.array([[1e-3]])),
        "solver": "rk4",
        "grid": ("int64", (2, 3), np.arange(6).reshape(2, 3)),
        "nested": {
            "a": ("int64", (1, 3), np.array([[1, 2, 3]])),
            "flag": ("logical", (1, 1), np.array([[True]])),
        },
    },
    "step": ("int64", (1, 1), np.array([[120]])),
    "title": "run 1",
    "tags": ["a", "bc", ("double", (1, 1), np.array([[3.5]])), ("double", (2, 2), np.ones((2, 2)))],
    "u": ("single", (2, 3), np.ones((2, 3), np.float32)),
    "model": {
        "w": ("single", (2, 3), np.arange(6, dtype=np.float32).reshape(2, 3)),
        "b": ("double", (1, 2), np.array([[0.5, -1.5]])),
        "n": ("int32", (1, 1), np.array([[7]], np.int32)),
        "mask": ("logical", (1, 3), np.array([[True, False, True]])),
    },
    "tensors": [
        ("int16", (1, 2), np.ones((1, 2), np.int16)),
        ("single", (1, 3), np.zeros((1, 3), np.float32)),
    ],
    "empty_text": "",
    "names": ["x", "yy", "zzz"],
    "table": ("int64", (2, 3), np.array([[1, 2, 3], [4, 5, 6]])),
    "nothing": {},
}

_NP = {
    "double": np.float64,
    "single": np.float32,
    "int16": np.int16,
    "int32": np.int32,
    "int64": np.int64,
    "logical": np.bool_,
}
_V5_CLASS = {
    "double": "double",
    "single": "single",
    "int16": "int16",
    "int32": "int32",
    "int64": "int64",
    "logical": "uint8",
}  # whosmat reports logical as uint8


@pytest.fixture(scope="module")
def saved(mspool: matspool.Spool, mdaemon: DaemonProc) -> dict[str, Path]:
    """The metadata saved once per format."""
    d = mdaemon.root / "metadata"
    d.mkdir()
    return {fmt: save(mspool, d / f"meta_{fmt.replace('.', '')}.mat", metadata(), fmt) for fmt in FORMATS}


# -- v5 ------------------------------------------------------------------------------------------
def test_v5_whosmat_top_level(saved: dict[str, Path]) -> None:
    who = scipy.io.whosmat(saved["v5"])
    assert [w[0] for w in who] == list(EXPECTED)  # variables in the order given
    classes = {name: cls for name, _, cls in who}
    shapes = {name: shape for name, shape, _ in who}
    for name, e in EXPECTED.items():
        if isinstance(e, dict):
            assert (classes[name], shapes[name]) == ("struct", (1, 1)), name
        elif isinstance(e, list):
            assert (classes[name], shapes[name]) == ("cell", (1, len(e))), name
        elif isinstance(e, str):
            assert classes[name] == "char", name
        else:
            assert (classes[name], shapes[name]) == (_V5_CLASS[e[0]], e[1]), name


def _check_v5_raw(x: Any, e: Any, where: str) -> None:
    """One value of ``loadmat(..., chars_as_strings=False, squeeze_me=False)`` against EXPECTED."""
    if isinstance(e, dict):
        assert x.shape == (1, 1), where
        assert x.dtype.names == (tuple(e) or None), (where, x.dtype.names)  # field order kept
        for k, v in e.items():
            _check_v5_raw(x[0, 0][k], v, f"{where}.{k}")
    elif isinstance(e, list):
        assert x.dtype == object and x.shape == (1, len(e)), (where, x.dtype, x.shape)
        for i, v in enumerate(e):
            _check_v5_raw(x[0, i], v, f"{where}{{{i + 1}}}")
    elif isinstance(e, str):
        assert x.dtype.kind == "U", where
        assert x.shape == ((1, len(e)) if e else (0, 0)), (where, x.shape)  # '' is 0x0, as in MATLAB
        assert "".join(x.ravel()) == e, where
    else:
        cls, shape, value = e
        assert x.shape == shape, (where, x.shape)
        dtype = np.uint8 if cls == "logical" else _NP[cls]  # scipy reads logical as uint8
        assert x.dtype == dtype, (where, x.dtype)
        np.testing.assert_array_equal(x, value.astype(dtype), err_msg=where)


def test_v5_raw_struct_arrays(saved: dict[str, Path]) -> None:
    m = scipy.io.loadmat(saved["v5"], chars_as_strings=False, squeeze_me=False)
    for name, e in EXPECTED.items():
        _check_v5_raw(m[name], e, name)
    # chars_as_strings=True: a 1xN char is one string
    m = scipy.io.loadmat(saved["v5"])
    assert m["title"].tolist() == ["run 1"]
    assert m["params"][0, 0]["solver"].tolist() == ["rk4"]
    assert [c.tolist() for c in m["names"].ravel()] == [["x"], ["yy"], ["zzz"]]


def test_v5_simplify_cells(saved: dict[str, Path]) -> None:
    m = scipy.io.loadmat(saved["v5"], simplify_cells=True)
    p = m["params"]
    assert list(p) == ["dt", "solver", "grid", "nested"]
    assert p["dt"] == 1e-3 and p["solver"] == "rk4"
    np.testing.assert_array_equal(p["grid"], np.arange(6).reshape(2, 3))
    assert list(p["nested"]) == ["a", "flag"]
    np.testing.assert_array_equal(p["nested"]["a"], [1, 2, 3])
    assert p["nested"]["flag"] == 1
    assert m["step"] == 120 and m["title"] == "run 1"
    tags = m["tags"]
    assert tags.shape == (4,) and list(tags[:2]) == ["a", "bc"] and tags[2] == 3.5
    np.testing.assert_array_equal(tags[3], np.ones((2, 2)))
    assert list(m["names"]) == ["x", "yy", "zzz"]
    assert m["table"].shape == (2, 3) and m["table"].dtype == np.int64
    assert m["nothing"] == {}
    np.testing.assert_array_equal(m["model"]["w"], np.arange(6, dtype=np.float32).reshape(2, 3))


# -- v7.3 ----------------------------------------------------------------------------------------
def test_v73_mat73(saved: dict[str, Path]) -> None:
    m = mat73.loadmat(saved["v7.3"])
    assert sorted(m) == sorted(EXPECTED)
    p = m["params"]
    assert p["dt"] == 1e-3 and p["solver"] == "rk4"
    np.testing.assert_array_equal(p["grid"], np.arange(6).reshape(2, 3))
    assert p["grid"].dtype == np.int64
    np.testing.assert_array_equal(p["nested"]["a"], [1, 2, 3])
    assert p["nested"]["flag"] is True or p["nested"]["flag"] == np.bool_(True)
    assert m["step"] == 120 and m["step"].dtype == np.int64
    assert m["title"] == "run 1" and m["empty_text"] == ""
    assert m["tags"][:2] == ["a", "bc"] and m["tags"][2] == 3.5
    np.testing.assert_array_equal(m["tags"][3], np.ones((2, 2)))
    assert m["names"] == ["x", "yy", "zzz"]
    assert m["table"].shape == (2, 3) and m["table"].dtype == np.int64
    assert m["u"].dtype == np.float32 and m["u"].shape == (2, 3)
    assert m["model"]["mask"].dtype == np.bool_
    # a struct with no fields: MATLAB's own layout (uint64 [1 1], MATLAB_empty), which mat73
    # reads as it reads MATLAB's struct_no_fields
    assert m["nothing"] == [[[]]]


def _field_names(obj: h5py.Group) -> list[str]:
    if "MATLAB_fields" not in obj.attrs:  # MATLAB leaves it out of a one-field struct
        assert len(obj) == 1
        return list(obj)
    return [b"".join(f).decode("ascii") for f in obj.attrs["MATLAB_fields"]]


def _check_h5(f: h5py.File, obj: h5py.HLObject, e: Any, where: str, label: str = "") -> None:
    """One object of our v7.3 file against EXPECTED, at the HDF5 level; ``label`` is what
    MATLAB appends to this object's H5PATH for its children (see the module docstring)."""
    cls = obj.attrs["MATLAB_class"]
    assert isinstance(cls, bytes)
    if e == {}:  # a 1x1 struct with no fields, as MATLAB writes it: its size and MATLAB_empty
        assert isinstance(obj, h5py.Dataset) and cls == b"struct", where
        assert obj[()].tolist() == [1, 1] and obj.attrs["MATLAB_empty"] == 1, where
    elif isinstance(e, dict):
        assert isinstance(obj, h5py.Group) and cls == b"struct", where
        assert ("MATLAB_fields" in obj.attrs) == (len(e) > 1), where
        assert _field_names(obj) == list(e), where  # MATLAB_fields keeps the given order
        assert sorted(obj) == sorted(e), where
        inner = obj.attrs.get("H5PATH", b"").decode() + (label or obj.name)
        for k, v in e.items():
            child = obj[k]
            assert child.attrs["H5PATH"] == inner.encode(), (where, k)  # see the module docstring
            _check_h5(f, child, v, f"{where}.{k}", k)
    elif isinstance(e, list):
        assert isinstance(obj, h5py.Dataset) and cls == b"cell", where
        assert obj.dtype == h5py.ref_dtype and h5py.check_ref_dtype(obj.dtype) is h5py.Reference
        assert obj.shape == (len(e), 1), (where, obj.shape)  # MATLAB 1xN is stored (N, 1)
        for i, (ref, v) in enumerate(zip(obj[()].ravel(), e, strict=True)):
            target = f[ref]
            assert target.name.startswith("/#refs#/"), (where, target.name)
            assert target.attrs["H5PATH"] == target.name.encode(), where  # its own path
            _check_h5(f, target, v, f"{where}{{{i + 1}}}", target.name.rsplit("/", 1)[1])
    elif isinstance(e, str):
        assert isinstance(obj, h5py.Dataset) and cls == b"char", where
        if not e:  # '' as MATLAB writes it: its size [0 0], MATLAB_empty, no MATLAB_int_decode
            assert obj.dtype == np.uint64 and obj[()].tolist() == [0, 0], (where, obj[()])
            assert sorted(k for k in obj.attrs if k != "H5PATH") == ["MATLAB_class", "MATLAB_empty"], where
            assert obj.attrs["MATLAB_empty"] == 1
            return
        assert obj.dtype == np.uint16 and obj.shape == (len(e), 1), (where, obj.dtype, obj.shape)
        decode = obj.attrs["MATLAB_int_decode"]
        assert type(decode) is np.int32 and decode == 2, where
        assert obj.attrs.get_id("MATLAB_int_decode").dtype == np.int32
        assert obj[()].ravel().tolist() == [ord(c) for c in e], where
    else:
        mcls, shape, value = e
        assert isinstance(obj, h5py.Dataset) and cls == mcls.encode(), (where, cls)
        data = obj[()].T  # reversed dims
        assert data.shape == shape, (where, data.shape)
        if mcls == "logical":
            assert obj.dtype == np.uint8 and obj.attrs["MATLAB_int_decode"] == 1
            data = data.astype(bool)
        assert data.dtype == value.dtype, (where, data.dtype)
        np.testing.assert_array_equal(data, value, err_msg=where)


def test_v73_h5py_structure(saved: dict[str, Path]) -> None:
    with h5py.File(saved["v7.3"], "r") as f:
        assert sorted(f) == sorted([*EXPECTED, "#refs#"])
        for name, e in EXPECTED.items():
            assert "H5PATH" not in f[name].attrs  # top-level objects have none, as in MATLAB
            _check_h5(f, f[name], e, name)
            if isinstance(f[name], h5py.Group) and not f[name].attrs.get("MATLAB_sparse"):
                if len(EXPECTED[name]) < 2:
                    continue
                sig = attr_signature(f[name], "MATLAB_fields")
                assert sig["class"] == h5py.h5t.VLEN and sig["space"] == h5py.h5s.SIMPLE
                assert sig["super_class"] == h5py.h5t.STRING and sig["super_size"] == 1
                assert sig["super_cset"] == h5py.h5t.CSET_ASCII
                assert sig["super_strpad"] == h5py.h5t.STR_NULLTERM  # as MATLAB writes it
                assert sig["shape"] == (len(EXPECTED[name]),)


def test_v73_hdf5storage(saved: dict[str, Path]) -> None:
    # hdf5storage.loadmat crashes on a struct with no fields (a reader bug): leave it out
    names = [n for n in EXPECTED if n != "nothing"]
    m = hdf5storage.loadmat(str(saved["v7.3"]), variable_names=names)
    assert sorted(m) == sorted(names)
    assert m["title"].tolist() == [["run 1"]]
    assert m["step"].tolist() == [[120]] and m["step"].dtype == np.int64
    p = m["params"]
    assert p.dtype.names == ("dt", "solver", "grid", "nested")
    np.testing.assert_array_equal(p["grid"][0], np.arange(6).reshape(2, 3))
    assert p["nested"][0]["flag"].ravel().tolist() == [True]
    tags = m["tags"]
    assert tags.shape == (1, 4) and tags.dtype == object
    assert tags[0, 0].tolist() == [["a"]] and tags[0, 1].tolist() == [["bc"]]
    np.testing.assert_array_equal(tags[0, 3], np.ones((2, 2)))
    assert [c.tolist() for c in m["names"].ravel()] == [[["x"]], [["yy"]], [["zzz"]]]
    assert m["table"].shape == (2, 3)
    assert m["empty_text"].size == 0 and m["empty_text"].dtype.kind == "U"


def _simplify(x: Any) -> Any:
    """Finish scipy's ``simplify_cells``: it turns a struct inside a cell into a dict only
    when the cell's first item is a struct (a scipy limitation, not a file problem)."""
    if isinstance(x, scipy.io.matlab.mat_struct):
        return {f: _simplify(getattr(x, f)) for f in x._fieldnames}
    if isinstance(x, dict):
        return {k: _simplify(v) for k, v in x.items()}
    if isinstance(x, list) or (isinstance(x, np.ndarray) and x.dtype == object):
        return [_simplify(v) for v in (x.ravel() if isinstance(x, np.ndarray) else x)]
    return x


def _norm(x: Any) -> Any:
    """A reader's tree in one spelling: dict, list, str, a scalar, or (dtype, squeezed shape,
    values). Classes are checked per format elsewhere: scipy's simplify_cells gives 1x1
    arrays as Python scalars and logical as uint8."""
    if isinstance(x, dict):
        return {k: _norm(v) for k, v in x.items()}
    if isinstance(x, list | tuple) or (isinstance(x, np.ndarray) and x.dtype == object):
        return [_norm(v) for v in (x.ravel() if isinstance(x, np.ndarray) else x)]
    if isinstance(x, str):
        return x
    a = np.asarray(x)
    if a.dtype.kind == "U":  # scipy's simplify_cells gives '' as an empty <U1 array
        return "".join(a.ravel())
    if a.dtype == np.bool_:
        a = a.astype(np.uint8)
    a = np.squeeze(a)
    if a.ndim == 0:
        return ("scalar", a.item())
    return (a.dtype.str, a.shape, a.tolist())


def test_both_formats_give_the_same_tree(saved: dict[str, Path]) -> None:
    v5 = _simplify(scipy.io.loadmat(saved["v5"], simplify_cells=True))
    v73 = mat73.loadmat(saved["v7.3"])
    assert v73["nothing"] == [[[]]]  # how mat73 reads MATLAB's no-field struct
    v73["nothing"] = {}
    a = _norm({k: v for k, v in v5.items() if not k.startswith("__")})
    b = _norm(v73)
    assert a == b


@pytest.mark.parametrize("fmt", FORMATS)
def test_compressed_metadata_reads_the_same(
    mspool: matspool.Spool, root: Path, saved: dict[str, Path], fmt: str
) -> None:
    path = mspool.save(root / "z.mat", metadata(), format=fmt, compress=True).result(timeout=60).path
    if fmt == "v5":

        def load(p: Any) -> Any:
            m = _simplify(scipy.io.loadmat(p, simplify_cells=True))
            return _norm({k: v for k, v in m.items() if not k.startswith("__")})

        assert scipy.io.whosmat(path) == scipy.io.whosmat(saved[fmt])
        assert Path(path).read_bytes()[128:132] == (15).to_bytes(4, "little")  # miCOMPRESSED
    else:

        def load(p: Any) -> Any:
            return _norm(mat73.loadmat(p))

    assert load(path) == load(saved[fmt])


def test_empty_struct_and_empty_string(mspool: matspool.Spool, root: Path) -> None:
    values = {"s": {}, "c": "", "inner": {"e": {}, "t": ""}, "cell": ["", {}]}
    p5 = save(mspool, root / "e5.mat", values, "v5")
    p7 = save(mspool, root / "e73.mat", values, "v7.3")
    m = _simplify(scipy.io.loadmat(p5, simplify_cells=True))
    assert m["s"] == {} and m["inner"]["e"] == {}
    assert m["cell"][1] == {}
    raw = scipy.io.loadmat(p5, squeeze_me=False, chars_as_strings=False)
    assert raw["c"].shape == (0, 0) and raw["inner"][0, 0]["t"].shape == (0, 0)
    assert raw["s"].shape == (1, 1) and raw["s"].dtype.names is None
    m = mat73.loadmat(p7)
    # mat73 reads a no-field struct as [[[]]], MATLAB's own struct_no_fields too
    assert m == {"s": [[[]]], "c": "", "inner": {"e": [[[]]], "t": ""}, "cell": ["", [[[]]]]}
    with h5py.File(p7, "r") as f:
        for path in ("c", "inner/t"):
            assert f[path][()].tolist() == [0, 0]  # '' is 0x0, as in v5 and in MATLAB
        for path in ("s", "inner/e"):  # MATLAB's struct_no_fields: uint64 [1 1], MATLAB_empty
            assert f[path][()].tolist() == [1, 1] and f[path].attrs["MATLAB_empty"] == 1


@pytest.mark.parametrize("fmt", FORMATS)
def test_nesting_exactly_at_the_limit(mspool: matspool.Spool, root: Path, fmt: str) -> None:
    value: Any = np.float64(2.5)
    for i in range(MAX_DEPTH):
        value = {f"l{i}": value} if i % 2 else ["tag", value]
    path = save(mspool, root / "deep.mat", {"deep": value}, fmt)
    loaded = _simplify(scipy.io.loadmat(path, simplify_cells=True)) if fmt == "v5" else mat73.loadmat(path)
    got = loaded["deep"]
    for i in reversed(range(MAX_DEPTH)):
        if i % 2:
            assert list(got) == [f"l{i}"]
            got = got[f"l{i}"]
        else:
            assert len(got) == 2 and got[0] == "tag"
            got = got[1]
    assert got == 2.5


# -- layout against MATLAB's own file -------------------------------------------------------------
# The reference's values as Python: saved by matspool, they must come out laid out as MATLAB did.
REFERENCE_VALUES: dict[str, Any] = {
    "struct_scalar": {"name": "test", "value": 123.0, "data": np.array([[1.0, 2.0], [3.0, 4.0]])},
    "struct_nested": {
        "level1": {"level2": {"level3": {"value": 42.0}, "cell": [["nested", {"a": 1.0, "b": 2.0}]]}}
    },
    "char_scalar": "Hello",
    "char_empty": "",
    "cell_scalar": ["text"],
    # {'A', [1 2; 3 4], {true, false}}: a list of bools would be a logical array, tensors make a cell
    "cell_array": ["A", np.array([[1.0, 2.0], [3.0, 4.0]]), [torch.tensor(True), torch.tensor(False)]],
    "cell_nested": [["level1", [["level2", [["level3", 123.0]]]]]],
}


def _matlab_h5path(obj: h5py.HLObject) -> str:
    """The H5PATH MATLAB stamps: an object in ``#refs#`` its own path; a field its parent's
    H5PATH followed by the parent's name (with a leading ``/`` for a top-level variable)."""
    parent = obj.parent
    if parent.name == "/#refs#":
        return obj.name
    base = parent.name.rsplit("/", 1)[1]
    label = f"/{base}" if parent.parent.name == "/" else base
    return parent.attrs.get("H5PATH", b"").decode() + label


def _compare_layout(mine: h5py.HLObject, ref: h5py.HLObject, where: str, deviations: set[str]) -> None:
    """Our object against MATLAB's, recursively (cells through their references)."""
    assert type(mine) is type(ref), (where, type(mine), type(ref))
    mine_attrs, ref_attrs = set(mine.attrs), set(ref.attrs)
    assert mine_attrs == ref_attrs, (where, sorted(mine_attrs), sorted(ref_attrs))
    for attr in sorted(ref_attrs):
        ms, rs = attr_signature(mine, attr), attr_signature(ref, attr)
        if attr == "H5PATH":
            # MATLAB's value: its own path in #refs#, else the parent's H5PATH + its label
            assert ms["class"] == rs["class"] == h5py.h5t.STRING and not ms["vlen"], (where, ms, rs)
            assert (ms["strpad"], ms["cset"]) == (rs["strpad"], rs["cset"]), where
            # #refs# names follow save order, so compare the rule both files follow
            for obj in (mine, ref):
                if obj.attrs[attr].decode() != _matlab_h5path(obj):
                    deviations.add(f"H5PATH {obj.attrs[attr].decode()} at {obj.name} in {obj.file.filename}")
            continue
        if attr == "MATLAB_fields":
            assert _field_names(mine) == _field_names(ref), where
            assert ms["class"] == rs["class"] == h5py.h5t.VLEN, where
            assert ms["space"] == rs["space"] == h5py.h5s.SIMPLE and ms["shape"] == rs["shape"], where
            assert ms["super_class"] == rs["super_class"] == h5py.h5t.STRING, where
            assert ms["super_size"] == rs["super_size"] == 1, where
            assert ms["super_cset"] == rs["super_cset"] == h5py.h5t.CSET_ASCII, where
            assert ms["super_strpad"] == rs["super_strpad"] == h5py.h5t.STR_NULLTERM, where
            continue
        assert ms == rs, (where, attr, ms, rs)  # MATLAB_class, MATLAB_int_decode, MATLAB_empty
        mv, rv = mine.attrs[attr], ref.attrs[attr]
        assert type(mv) is type(rv) and mv == rv, (where, attr, mv, rv)
    if "MATLAB_class" in ref_attrs:
        cls = attr_signature(mine, "MATLAB_class")
        assert cls["class"] == h5py.h5t.STRING and not cls["vlen"], where
        assert cls["strpad"] == h5py.h5t.STR_NULLTERM and cls["cset"] == h5py.h5t.CSET_ASCII, where
        assert cls["space"] == h5py.h5s.SCALAR, where
    if isinstance(ref, h5py.Group):
        assert sorted(mine) == sorted(ref), where
        for k in ref:
            _compare_layout(mine[k], ref[k], f"{where}.{k}", deviations)
        return
    assert mine.dtype == ref.dtype and mine.shape == ref.shape, (
        where,
        mine.dtype,
        ref.dtype,
        mine.shape,
        ref.shape,
    )
    assert mine.chunks is None and mine.id.get_create_plist().get_nfilters() == 0, where
    if mine.dtype == h5py.ref_dtype:
        assert h5py.check_ref_dtype(mine.dtype) is h5py.Reference
        for i, (a, b) in enumerate(zip(mine[()].ravel(), ref[()].ravel(), strict=True)):
            ta, tb = mine.file[a], ref.file[b]
            assert ta.name.startswith("/#refs#/") and tb.name.startswith("/#refs#/"), (where, ta.name)
            _compare_layout(ta, tb, f"{where}{{{i + 1}}}", deviations)
    else:
        np.testing.assert_array_equal(mine[()], ref[()], err_msg=where)


@pytest.fixture(scope="module")
def ours_like_reference(mspool: matspool.Spool, mdaemon: DaemonProc) -> dict[str, Path]:
    d = mdaemon.root / "reference"
    d.mkdir()
    return {
        fmt: save(mspool, d / f"ref_{fmt.replace('.', '')}.mat", REFERENCE_VALUES, fmt) for fmt in FORMATS
    }


def test_reference_values_are_what_we_think() -> None:
    m = mat73.loadmat(
        REFERENCE_V73,
        only_include=[
            "struct_scalar",
            "char_scalar",
            "char_empty",
            "cell_scalar",
            "cell_array",
            "cell_nested",
        ],
    )
    assert m["char_scalar"] == "Hello" and m["char_empty"] == "" and m["cell_scalar"] == ["text"]
    assert m["struct_scalar"]["name"] == "test" and m["struct_scalar"]["value"] == 123
    np.testing.assert_array_equal(m["struct_scalar"]["data"], [[1, 2], [3, 4]])
    assert m["cell_array"][0] == "A" and m["cell_array"][2] == [True, False]
    assert m["cell_nested"] == [["level1", [["level2", [["level3", 123.0]]]]]]
    with h5py.File(REFERENCE_V73, "r") as f:
        assert f["char_scalar"].shape == (5, 1)  # MATLAB's 1x5 char
        assert f["cell_array"].shape == (3, 1)  # MATLAB's 1x3 cell
        assert _field_names(f["struct_scalar"]) == ["name", "value", "data"]
        assert f["struct_nested/level1/level2/level3/value"][()].tolist() == [[42.0]]


def test_layout_matches_matlab(ours_like_reference: dict[str, Path]) -> None:
    deviations: set[str] = set()
    with h5py.File(ours_like_reference["v7.3"], "r") as mine, h5py.File(REFERENCE_V73, "r") as ref:
        for name in REFERENCE_VALUES:
            _compare_layout(mine[name], ref[name], name, deviations)
        # the canonical empty MATLAB puts first into #refs#
        _compare_layout(mine["#refs#/a"], ref["#refs#/a"], "#refs#/a", deviations)
        assert isinstance(mine["#refs#"], h5py.Group)
        assert dict(mine["#refs#"].attrs) == dict(ref["#refs#"].attrs)
    # no deviation left: attribute names, types, values (H5PATH too) and dataset shapes
    assert deviations == set(), deviations


def test_v5_reads_like_matlabs_v7(ours_like_reference: dict[str, Path]) -> None:
    """Same classes, sizes, field order and values as MATLAB's v7 file, through scipy."""
    names = list(REFERENCE_VALUES)
    who_mine = {w[0]: w[1:] for w in scipy.io.whosmat(ours_like_reference["v5"])}
    who_ref = {w[0]: w[1:] for w in scipy.io.whosmat(REFERENCE_V7) if w[0] in names}
    assert who_mine == who_ref
    opts = {"chars_as_strings": False, "squeeze_me": False, "mat_dtype": True}
    mine = scipy.io.loadmat(ours_like_reference["v5"], variable_names=names, **opts)
    ref = scipy.io.loadmat(REFERENCE_V7, variable_names=names, **opts)

    def same(a: Any, b: Any, where: str) -> None:
        assert type(a) is type(b) and a.dtype.names == b.dtype.names, (where, a.dtype, b.dtype)
        assert a.shape == b.shape, (where, a.shape, b.shape)
        if a.dtype.names:
            for k in a.dtype.names:
                same(a[0, 0][k], b[0, 0][k], f"{where}.{k}")
        elif a.dtype == object:
            for i, (x, y) in enumerate(zip(a.ravel(), b.ravel(), strict=True)):
                same(x, y, f"{where}{{{i + 1}}}")
        else:
            assert a.dtype == b.dtype, (where, a.dtype, b.dtype)
            np.testing.assert_array_equal(a, b, err_msg=where)

    for name in names:
        same(mine[name], ref[name], name)


# -- Octave ------------------------------------------------------------------------------------------
_OCTAVE_SCRIPT = r"""
S = load(getenv('MATSPOOL_MAT'));
p = S.params;
printf('params.fields=%s\n', strjoin(fieldnames(p)', ','));
printf('params.class=%s\n', class(p));
printf('dt=%s %.17g\n', class(p.dt), p.dt);
printf('solver=%s %s %s\n', class(p.solver), mat2str(size(p.solver)), p.solver);
printf('grid=%s %s %s\n', class(p.grid), mat2str(size(p.grid)), mat2str(p.grid));
printf('nested.fields=%s\n', strjoin(fieldnames(p.nested)', ','));
printf('nested.a=%s %s %s\n', class(p.nested.a), mat2str(size(p.nested.a)), mat2str(p.nested.a));
printf('nested.flag=%s %s\n', class(p.nested.flag), mat2str(p.nested.flag));
printf('step=%s %d\n', class(S.step), S.step);
printf('title=%s %s %s\n', class(S.title), mat2str(size(S.title)), S.title);
printf('tags=%s %s\n', class(S.tags), mat2str(size(S.tags)));
for i = 1:numel(S.tags)
  printf('tag%d.class=%s %s\n', i, class(S.tags{i}), mat2str(size(S.tags{i})));
end
printf('tags1=%s\n', S.tags{1});
printf('tags2=%s\n', S.tags{2});
printf('tags3=%.17g\n', S.tags{3});
printf('names=%s %s %d %s\n', class(S.names), mat2str(size(S.names)), iscellstr(S.names), ...
       strjoin(S.names, ','));
printf('table=%s %s %s\n', class(S.table), mat2str(size(S.table)), mat2str(S.table));
printf('u=%s %s\n', class(S.u), mat2str(size(S.u)));
printf('model.fields=%s\n', strjoin(fieldnames(S.model)', ','));
printf('model.w=%s %s %s\n', class(S.model.w), mat2str(size(S.model.w)), mat2str(S.model.w));
printf('model.mask=%s %s\n', class(S.model.mask), mat2str(S.model.mask));
printf('model.n=%s %d\n', class(S.model.n), S.model.n);
printf('tensors=%s %s %s %s\n', class(S.tensors), mat2str(size(S.tensors)), ...
       class(S.tensors{1}), class(S.tensors{2}));
printf('empty_text=%s %s\n', class(S.empty_text), mat2str(size(S.empty_text)));
printf('nothing=%s %s %d\n', class(S.nothing), mat2str(size(S.nothing)), numel(fieldnames(S.nothing)));
printf('END\n');
"""


@pytest.mark.skipif(OCTAVE is None, reason="GNU Octave is not installed (no `octave` on PATH)")
def test_octave_reads_v5_metadata(saved: dict[str, Path]) -> None:
    proc = subprocess.run(
        [OCTAVE, "--no-gui", "--no-window-system", "--norc", "-q", "--eval", _OCTAVE_SCRIPT],
        env={**os.environ, "MATSPOOL_MAT": str(saved["v5"])},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"octave failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    lines = proc.stdout.splitlines()
    assert "END" in lines, proc.stdout + proc.stderr
    got = dict(ln.split("=", 1) for ln in lines if "=" in ln)
    assert got == {
        "params.fields": "dt,solver,grid,nested",
        "params.class": "struct",
        "dt": "double 0.001",
        "solver": "char [1 3] rk4",
        "grid": "int64 [2 3] [0 1 2;3 4 5]",
        "nested.fields": "a,flag",
        "nested.a": "int64 [1 3] [1 2 3]",
        "nested.flag": "logical true",
        "step": "int64 120",
        "title": "char [1 5] run 1",
        "tags": "cell [1 4]",
        "tag1.class": "char [1 1]",
        "tag2.class": "char [1 2]",
        "tag3.class": "double [1 1]",
        "tag4.class": "double [2 2]",
        "tags1": "a",
        "tags2": "bc",
        "tags3": "3.5",
        "names": "cell [1 3] 1 x,yy,zzz",
        "table": "int64 [2 3] [1 2 3;4 5 6]",
        "u": "single [2 3]",
        "model.fields": "w,b,n,mask",
        "model.w": "single [2 3] [0 1 2;3 4 5]",
        "model.mask": "logical [true false true]",
        "model.n": "int32 7",
        "tensors": "cell [1 2] int16 single",
        "empty_text": "char [0 0]",
        "nothing": "struct [1 1] 0",
    }


# -- errors -----------------------------------------------------------------------------------------
BAD_FIELDS: list[tuple[Any, str]] = [
    ("1a", "'1a'"),
    ("a-b", "'a-b'"),
    ("end", "'end'"),
    ("a" * 64, "64 characters"),
    ("_x", "'_x'"),
    ("", "''"),
    (1, "str, not int"),
    (("a",), "str, not tuple"),
]


@pytest.mark.parametrize(("key", "said"), BAD_FIELDS, ids=[repr(k)[:12] for k, _ in BAD_FIELDS])
def test_invalid_field_name(
    mspool: matspool.Spool, mdaemon: DaemonProc, root: Path, key: Any, said: str
) -> None:
    with pytest.raises(matspool.InvalidVariableError) as ei:
        mspool.save(root / "bad.mat", {"meta": {"ok": 1.0, "inner": {key: 1.0}}}, format="v7.3")
    msg = str(ei.value)
    assert "field" in msg and "'meta.inner'" in msg and said in msg, msg
    assert isinstance(ei.value, ValueError)
    with pytest.raises(matspool.InvalidVariableError):  # also inside a cell
        mspool.save(root / "bad.mat", {"meta": ["x", {key: 1.0}]}, format="v5")
    assert not (root / "bad.mat").exists()
    assert_serves(mspool, mdaemon, root)


BAD_LEAVES: list[tuple[str, Any, str]] = [
    ("object", {"bad": {"inner": object()}}, "'bad.inner'"),
    ("bytes", {"bad": {"inner": b"abc"}}, "'bad.inner'"),
    ("none", {"bad": {"inner": None}}, "'bad.inner'"),
    ("none_in_cell", {"bad": {"inner": ["a", None]}}, "'bad.inner{2}'"),
    ("bytes_in_cell", {"bad": ["a", {"x": [b"q", "z"]}]}, "'bad{2}.x{1}'"),
    ("set", {"bad": {"inner": {1, 2}}}, "'bad.inner'"),
    ("object_array", {"bad": {"inner": np.array([object()])}}, "'bad.inner{1}'"),  # a cell
]


@pytest.mark.parametrize(
    ("variables", "said"), [(v, s) for _, v, s in BAD_LEAVES], ids=[i for i, _, _ in BAD_LEAVES]
)
def test_unsupported_leaf_names_its_path(
    mspool: matspool.Spool, mdaemon: DaemonProc, root: Path, variables: dict[str, Any], said: str
) -> None:
    for fmt in FORMATS:
        with pytest.raises(matspool.UnsupportedTypeError) as ei:
            mspool.save(root / "bad.mat", variables, format=fmt)
        assert said in str(ei.value), str(ei.value)
        assert isinstance(ei.value, TypeError)
    assert not (root / "bad.mat").exists()
    assert_serves(mspool, mdaemon, root)


@pytest.mark.parametrize("kind", ["struct", "cell"])
def test_nesting_deeper_than_the_limit(
    mspool: matspool.Spool, mdaemon: DaemonProc, root: Path, kind: str
) -> None:
    value: Any = 1.0
    for _ in range(MAX_DEPTH + 1):
        value = {"a": value} if kind == "struct" else ["x", value]
    with pytest.raises(matspool.MatspoolError) as ei:
        mspool.save(root / "bad.mat", {"deep": value}, format="v7.3")
    assert str(MAX_DEPTH) in str(ei.value), str(ei.value)
    assert not (root / "bad.mat").exists()
    assert mspool._ring.used == 0  # nothing was placed
    assert_serves(mspool, mdaemon, root)


# -- hostile trees straight into parse_write ---------------------------------------------------------
RING = 1 << 16


def _write_msg(tree: Any, **over: Any) -> dict[str, Any]:
    msg = {
        "op": "WRITE",
        "seq": 1,
        "path": "/tmp/x.mat",
        "format": "v7.3",
        "fsync": False,
        "vars": [{"name": "meta", "tree": tree}],
    }
    msg.update(over)
    return msg


def _chain(depth: int, kind: str) -> dict[str, Any]:
    """A tree whose deepest node sits at ``depth`` (the root is at 0)."""
    node: dict[str, Any] = {"char": "x"}
    for _ in range(depth):
        node = {"struct": [["a", node]]} if kind == "struct" else {"cell": [node], "dims": [1, 1]}
    return node


def _leaf(offset: int = 0, nbytes: int = 8, dims: list[int] | None = None) -> dict[str, Any]:
    return {"dtype": "<f8", "dims": dims or [1, 1], "offset": offset, "nbytes": nbytes}


def test_parse_write_accepts_a_good_tree() -> None:
    tree = {
        "struct": [
            ["a", _leaf()],
            ["s", {"char": "hi"}],
            ["c", {"cell": [{"char": "x"}, _leaf(8)], "dims": [1, 2]}],
        ]
    }
    req = proto.parse_write(_write_msg(tree), RING)
    (var,) = req.vars
    assert isinstance(var, proto.TreeSpec) and var.name == "meta"
    assert [k for k, _ in var.tree.fields] == ["a", "s", "c"]
    assert [leaf.offset for leaf in proto.leaves(var)] == [0, 8]
    assert proto.parse_write(req.to_wire(), RING) == req  # the wire form parses back the same
    for kind in ("struct", "cell"):  # exactly at the depth limit
        proto.parse_write(_write_msg(_chain(proto.MAX_TREE_DEPTH, kind)), RING)
    n = proto.MAX_TREE_NODES - 1  # the root cell and its items: exactly the node limit
    proto.parse_write(_write_msg({"cell": [{"char": ""}] * n, "dims": [1, n]}), RING)


HOSTILE: list[tuple[str, Any, type[Exception]]] = [
    ("too_deep_struct", _chain(proto.MAX_TREE_DEPTH + 1, "struct"), matspool.ProtocolError),
    ("too_deep_cell", _chain(proto.MAX_TREE_DEPTH + 1, "cell"), matspool.ProtocolError),
    (
        "too_many_nodes",
        {"cell": [{"char": ""}] * proto.MAX_TREE_NODES, "dims": [1, proto.MAX_TREE_NODES]},
        matspool.ProtocolError,
    ),
    (
        "too_many_nodes_nested",
        {"cell": [{"cell": [{"char": ""}] * 300, "dims": [300, 1]}] * 300, "dims": [1, 300]},
        matspool.ProtocolError,
    ),
    ("cell_dims_too_many", {"cell": [{"char": "a"}], "dims": [1, 2]}, matspool.ProtocolError),
    ("cell_dims_too_few", {"cell": [{"char": "a"}, {"char": "b"}], "dims": [1, 1]}, matspool.ProtocolError),
    ("cell_dims_zero", {"cell": [{"char": "a"}], "dims": [0, 1]}, matspool.ProtocolError),
    ("cell_dims_negative", {"cell": [{"char": "a"}], "dims": [-1, -1]}, matspool.ProtocolError),
    ("cell_dims_one", {"cell": [{"char": "a"}], "dims": [1]}, matspool.ProtocolError),
    ("cell_dims_three_wrong", {"cell": [{"char": "a"}], "dims": [1, 1, 2]}, matspool.ProtocolError),
    ("cell_dims_missing", {"cell": [{"char": "a"}]}, matspool.ProtocolError),
    ("cell_dims_float", {"cell": [{"char": "a"}], "dims": [1.0, 1]}, matspool.ProtocolError),
    ("cell_dims_bool", {"cell": [{"char": "a"}], "dims": [True, True]}, matspool.ProtocolError),
    ("cell_dims_huge", {"cell": [], "dims": [2**40, 0]}, matspool.ProtocolError),
    ("cell_not_list", {"cell": {"0": {"char": "a"}}, "dims": [1, 1]}, matspool.ProtocolError),
    ("duplicate_fields", {"struct": [["a", {"char": "x"}], ["a", {"char": "y"}]]}, matspool.ProtocolError),
    ("struct_not_list", {"struct": {"a": {"char": "x"}}}, matspool.ProtocolError),
    ("struct_str", {"struct": "a"}, matspool.ProtocolError),
    ("struct_pair_of_three", {"struct": [["a", {"char": "x"}, "extra"]]}, matspool.ProtocolError),
    ("struct_pair_not_list", {"struct": [{"a": {"char": "x"}}]}, matspool.ProtocolError),
    ("field_bad_name", {"struct": [["1a", {"char": "x"}]]}, matspool.InvalidVariableError),
    ("field_keyword", {"struct": [["end", {"char": "x"}]]}, matspool.InvalidVariableError),
    ("field_not_str", {"struct": [[1, {"char": "x"}]]}, matspool.InvalidVariableError),
    ("field_too_long", {"struct": [["a" * 64, {"char": "x"}]]}, matspool.InvalidVariableError),
    ("char_not_str", {"char": 5}, matspool.ProtocolError),
    ("char_list", {"char": ["a"]}, matspool.ProtocolError),
    ("node_not_object", {"cell": [5], "dims": [1, 1]}, matspool.ProtocolError),
    ("tree_not_object", ["struct"], matspool.ProtocolError),
    ("empty_node", {}, matspool.ProtocolError),
    ("leaf_past_ring", {"struct": [["a", _leaf(RING)]]}, matspool.ProtocolError),
    ("leaf_bad_nbytes", {"cell": [_leaf(0, 16)], "dims": [1, 1]}, matspool.ProtocolError),
    (
        "leaf_bad_dtype",
        {"cell": [{"dtype": "|O", "dims": [1, 1], "offset": 0, "nbytes": 8}], "dims": [1, 1]},
        matspool.ProtocolError,
    ),
]


@pytest.mark.parametrize(("tree", "error"), [(t, e) for _, t, e in HOSTILE], ids=[i for i, _, _ in HOSTILE])
def test_parse_write_refuses_hostile_trees(tree: Any, error: type[Exception]) -> None:
    with pytest.raises(error) as ei:
        proto.parse_write(_write_msg(tree), RING)
    assert type(ei.value) is error, repr(ei.value)
    assert str(ei.value)


def test_hostile_tree_in_a_v5_request_too() -> None:
    with pytest.raises(matspool.ProtocolError):
        proto.parse_write(_write_msg(_chain(proto.MAX_TREE_DEPTH + 1, "struct"), format="v5"), RING)
    with pytest.raises(matspool.ProtocolError):  # a tree and a plain array under one name
        proto.parse_write(
            _write_msg({"char": "x"}, vars=[{"name": "m", "tree": {"char": "x"}}, {"name": "m", **_leaf()}]),
            RING,
        )


# -- Unicode -------------------------------------------------------------------------------------------
UNICODE = {
    "label": "run α",
    "meta": {"title": "日本", "mixed": "Ωmega – ß ü", "cell": ["run α", "日本", "ascii"]},
}


@pytest.mark.parametrize("fmt", FORMATS)
def test_unicode_text_round_trips(mspool: matspool.Spool, root: Path, fmt: str) -> None:
    path = save(mspool, root / "unicode.mat", UNICODE, fmt)
    if fmt == "v5":
        m = scipy.io.loadmat(path, simplify_cells=True)
        got = {k: v for k, v in m.items() if not k.startswith("__")}
        got["meta"]["cell"] = list(got["meta"]["cell"])
        assert got == UNICODE
        raw = scipy.io.loadmat(path, chars_as_strings=False)
        assert raw["label"].shape == (1, 5)  # one MATLAB char per character
    else:
        assert mat73.loadmat(path) == UNICODE
        with h5py.File(path, "r") as f:  # UTF-16 code units, one per character here (BMP)
            assert f["label"][()].ravel().tolist() == [ord(c) for c in "run α"]
            assert f["meta/title"][()].ravel().tolist() == [0x65E5, 0x672C]
            assert f["meta/title"].shape == (2, 1)
