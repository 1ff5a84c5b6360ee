"""MATLAB fidelity (issue 12): text beyond ASCII, v7.3 structs as MATLAB lays them out,
empties inside cells and structs, struct arrays, cells of any shape, char matrices,
logical/int edges, sparse matrices and ``matspool.savemat``.

Every value is saved by a real daemon in both formats and read back by independent readers
(scipy for v5; h5py, mat73 and hdf5storage for v7.3; GNU Octave for v5 where installed),
and the v7.3 layout is compared with ``tests/data/matlab_basic_v73.mat``, which
MATLAB wrote.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import warnings
import zlib
from pathlib import Path
from typing import Any

import h5py
import hdf5storage
import mat73
import numpy as np
import pytest
import scipy.io
import scipy.sparse as sp
import torch

import matspool

from conftest import DaemonProc
from readback import REFERENCE_V7, REFERENCE_V73

OCTAVE = shutil.which("octave")
needs_octave = pytest.mark.skipif(OCTAVE is None, reason="GNU Octave is not installed")
FORMATS = ("v5", "v7.3")


def save(spool: matspool.Spool, path: Path, variables: dict[str, Any], fmt: str) -> Path:
    res = spool.save(path, variables, format=fmt).result(timeout=60)
    assert res.path == str(path) and res.nbytes == path.stat().st_size
    return path


def octave(script: str) -> str:
    out = subprocess.run(
        [OCTAVE, "--no-gui", "--quiet", "--no-init-file", "--eval", script],  # type: ignore[list-item]
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def v5_elements(path: Path) -> dict[str, list[tuple[int, int, bytes]]]:
    """Each top-level variable's sub-elements (type, size, bytes) as the file holds them."""
    raw = path.read_bytes()
    out, pos = {}, 128
    while pos < len(raw):
        mi, n = struct.unpack("<II", raw[pos : pos + 8])
        body = raw[pos + 8 : pos + 8 + n]
        pos += 8 + n + (-n % 8)
        if mi == 15:
            body = zlib.decompress(body)
            mi, n = struct.unpack("<II", body[:8])
            body = body[8 : 8 + n]
        subs, p = [], 0
        while p < len(body):
            st, sn = struct.unpack("<II", body[p : p + 8])
            if st >> 16:
                subs.append((st & 0xFFFF, st >> 16, body[p + 4 : p + 4 + (st >> 16)]))
                p += 8
                continue
            subs.append((st, sn, body[p + 8 : p + 8 + sn]))
            p += 8 + sn + (-sn % 8)
        out[subs[2][2].decode()] = subs
    return out


def units(text: str) -> list[int]:
    return np.frombuffer(text.encode("utf-16-le"), "<u2").tolist()


# -- 1. text beyond ASCII ------------------------------------------------------------------------
TEXT = {
    "bmp": "Ωmega – ß ü",  # noqa: RUF001 - the EN DASH is the point: non-ASCII text
    "emoji": "a😀b",  # beyond the BMP: two UTF-16 code units
    "nul": "a\x00b\x00",  # NUL characters, one at the end
    "ascii": "plain",
    "long": "ü" * 3000,  # longer than a message carries inline: through the ring
}


def test_text_v5_as_matlab_writes_it(mspool: matspool.Spool, root: Path) -> None:
    p = save(mspool, root / "text.mat", TEXT, "v5")
    el = v5_elements(p)
    for name, text in TEXT.items():
        dims = struct.unpack("<2i", el[name][1][2])
        assert dims == (1, len(units(text))), (name, dims)  # UTF-16 code units
        mi, _, data = el[name][3]
        if text.isascii():
            assert mi == 16 and data == text.encode("ascii"), name  # miUTF8, as MATLAB
        else:
            assert mi == 17 and data == text.encode("utf-16-le"), name  # miUTF16, as MATLAB
    who = {n: (s, c) for n, s, c in scipy.io.whosmat(p)}
    assert who["emoji"][1] == "char"  # (whosmat does not report char sizes)
    m = scipy.io.loadmat(
        p, uint16_codec="utf-16-le", chars_as_strings=False, variable_names=["bmp", "nul", "ascii", "long"]
    )
    assert "".join(m["bmp"].ravel()) == TEXT["bmp"] and "".join(m["long"].ravel()) == TEXT["long"]
    assert m["nul"].shape == (1, 4)  # NUL survives (the bytes above); numpy shows it as ''


def test_text_v73_as_matlab_writes_it(mspool: matspool.Spool, root: Path) -> None:
    p = save(mspool, root / "text.mat", {**TEXT, "s": {"t": "😀", "c": ["é", "a\x00"]}}, "v7.3")
    with h5py.File(p, "r") as f:
        for name, text in TEXT.items():
            ds = f[name]
            assert ds.dtype == np.uint16 and ds.shape == (len(units(text)), 1), name
            assert ds[()].ravel().tolist() == units(text), name
            assert ds.attrs["MATLAB_int_decode"] == 2 and ds.attrs["MATLAB_class"] == b"char", name
    h = hdf5storage.loadmat(str(p), variable_names=list(TEXT))
    for name, text in TEXT.items():  # numpy str drops trailing NULs: hdf5storage's view
        assert h[name].tolist() == [[text.rstrip("\x00")]], name
    m = mat73.loadmat(p)
    assert m["nul"] == "a\x00b\x00" and m["bmp"] == TEXT["bmp"] and m["s"]["c"] == ["é", "a\x00"]


@needs_octave
def test_octave_reads_text(mspool: matspool.Spool, root: Path) -> None:
    p = save(mspool, root / "text_oct.mat", TEXT, "v5")
    out = octave(
        f"x = load('{p}'); printf('%d ', double(x.bmp)); printf('\\n'); "
        "printf('%d ', double(x.nul)); printf('\\n'); printf('%d ', double(x.emoji));"
    )
    lines = out.split("\n")
    # Octave holds text as UTF-8 bytes: our UTF-16 decoded exactly
    assert [int(v) for v in lines[0].split()] == list(TEXT["bmp"].encode("utf-8"))
    assert [int(v) for v in lines[1].split()] == [97, 0, 98, 0]
    assert [int(v) for v in lines[2].split()] == list(TEXT["emoji"].encode("utf-8"))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(
    ("variables", "said"),
    [
        ({"bad": "a\ud800"}, "'bad'"),
        ({"s": {"t": ["x", "\udfffz"]}}, "'s.t{2}'"),
        ({"c": np.array(["ok", "\ud83d"])}, "'c'"),
    ],
)
def test_lone_surrogate_is_refused_by_name(
    mspool: matspool.Spool, mdaemon: DaemonProc, root: Path, fmt: str, variables: dict[str, Any], said: str
) -> None:
    with pytest.raises(matspool.InvalidVariableError) as ei:
        mspool.save(root / "bad.mat", variables, format=fmt)
    assert said in str(ei.value) and "surrogate" in str(ei.value)
    assert not (root / "bad.mat").exists()
    p = save(mspool, root / "after.mat", {"x": "still fine"}, fmt)  # the daemon still serves
    got = scipy.io.loadmat(p, simplify_cells=True)["x"] if fmt == "v5" else mat73.loadmat(p)["x"]
    assert got == "still fine"


# -- 2. structs in v7.3 --------------------------------------------------------------------------
def _sig(obj: h5py.HLObject, name: str) -> tuple[Any, ...]:
    aid = obj.attrs.get_id(name)
    t, s = aid.get_type(), aid.get_space()
    sup = t.get_super() if t.get_class() == h5py.h5t.VLEN else None
    return (
        t.get_class(),
        s.get_simple_extent_type(),
        None if sup is None else (sup.get_class(), sup.get_size(), sup.get_strpad(), sup.get_cset()),
    )


def _fields(f: h5py.File, obj: h5py.HLObject) -> list[str]:
    a = obj.attrs["MATLAB_fields"]
    names = f[a][()] if isinstance(a, h5py.Reference) else a
    return [b"".join(n).decode() for n in names]


def test_matlab_fields_type_as_matlab(mspool: matspool.Spool, root: Path) -> None:
    p = save(
        mspool,
        root / "s.mat",
        {"struct_scalar": {"name": "test", "value": 123.0, "data": np.array([[1.0, 2], [3, 4]])}},
        "v7.3",
    )
    with h5py.File(p, "r") as mine, h5py.File(REFERENCE_V73, "r") as ref:
        assert _sig(mine["struct_scalar"], "MATLAB_fields") == _sig(ref["struct_scalar"], "MATLAB_fields")
        assert _fields(mine, mine["struct_scalar"]) == _fields(ref, ref["struct_scalar"])


@pytest.mark.parametrize(("long", "short", "in_refs"), [(4093, 0, True), (65, 0, False), (64, 2, True)])
def test_many_fields_as_matlab(
    mspool: matspool.Spool, root: Path, long: int, short: int, in_refs: bool
) -> None:
    """Field names adding up to 2^12 characters (65 x 63 = 4095 stay; 64 x 63 + 2 x 32 =
    4096 move) go into #refs# behind an object reference, as in MATLAB's struct_large;
    4093 names of 63 characters would otherwise exceed HDF5's 64 KiB attribute limit."""
    names = [f"f{i:04d}".ljust(63, "x") for i in range(long)] + [
        f"s{i:04d}".ljust(32, "y") for i in range(short)
    ]
    s = {n: float(i) for i, n in enumerate(names)}
    if long > 1000:  # twice that many fields do not fit one control message: refused up front
        with pytest.raises(matspool.FormatLimitError, match="control message"):
            mspool.save(root / "big.mat", {"s": s, "t": s}, format="v7.3")
    p = save(mspool, root / "big.mat", {"s": s} if long > 1000 else {"s": s, "t": np.array([s])}, "v7.3")
    with h5py.File(p, "r") as f, h5py.File(REFERENCE_V73, "r") as ref:
        assert isinstance(f["s"].attrs["MATLAB_fields"], h5py.Reference) is in_refs
        kind = "struct_large" if in_refs else "struct_scalar"
        assert _sig(f["s"], "MATLAB_fields") == _sig(ref[kind], "MATLAB_fields")
        if in_refs:
            target, theirs = f[f["s"].attrs["MATLAB_fields"]], ref[ref[kind].attrs["MATLAB_fields"]]
            assert target.parent.name == "/#refs#" and dict(target.attrs) == dict(theirs.attrs) == {}
            assert (
                target.id.get_type().get_super().get_strpad() == theirs.id.get_type().get_super().get_strpad()
            )
        assert _fields(f, f["s"]) == list(s)
    m = mat73.loadmat(p)
    assert list(m["s"]) == list(s) and m["s"][names[-1]] == float(len(names) - 1)
    p5 = save(mspool, root / "big5.mat", {"s": s}, "v5")
    assert list(scipy.io.loadmat(p5, simplify_cells=True)["s"]) == list(s)


def test_no_field_struct_as_matlab(mspool: matspool.Spool, root: Path) -> None:
    p = save(mspool, root / "nf.mat", {"struct_no_fields": {}, "c": np.array([{}])}, "v7.3")
    with h5py.File(p, "r") as f, h5py.File(REFERENCE_V73, "r") as ref:
        for a, b in (
            (f["struct_no_fields"], ref["struct_no_fields"]),
            (f[f["c"][0, 0]], ref["struct_no_fields"]),
        ):
            assert isinstance(a, h5py.Dataset) and a.dtype == b.dtype and a[()].tolist() == b[()].tolist()
            assert {k: a.attrs[k] for k in a.attrs if k != "H5PATH"} == dict(b.attrs)
    ours = hdf5storage.loadmat(str(p), variable_names=["struct_no_fields"])["struct_no_fields"]
    theirs = hdf5storage.loadmat(str(REFERENCE_V73), variable_names=["struct_no_fields"])["struct_no_fields"]
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype and ours.tolist() == theirs.tolist()
    assert (
        mat73.loadmat(p)["struct_no_fields"]
        == mat73.loadmat(REFERENCE_V73, only_include=["struct_no_fields"])["struct_no_fields"]
    )


# -- 3. empties inside cells and structs ----------------------------------------------------------
EMPTIES = {
    "c": [
        np.zeros((0, 3)),
        "",
        np.zeros((0, 0), bool),
        np.empty((1, 0), np.int8),
        np.empty((0, 0), object),
        1.5,
    ],
    "s": {"e": np.zeros((0, 0)), "t": "", "l": np.zeros((0, 2), bool), "k": np.empty((0, 0), object)},
}


def test_empties_v73_as_matlab(mspool: matspool.Spool, root: Path) -> None:
    p = save(mspool, root / "e.mat", EMPTIES, "v7.3")
    expect = [((0, 3), "double"), ((0, 0), "char"), ((0, 0), "logical"), ((1, 0), "int8"), ((0, 0), "cell")]
    with h5py.File(p, "r") as f:
        a = f["#refs#/a"]  # MATLAB's canonical empty, first in #refs#
        assert a[()].tolist() == [0, 0] and a.attrs["MATLAB_class"] == b"canonical empty"
        assert a.attrs["MATLAB_empty"] == 1 and "H5PATH" not in a.attrs
        refs = f["c"][()].ravel()
        for ref, (dims, cls) in zip(refs[: len(expect)], expect, strict=True):  # the empties; then 1.5
            ds = f[ref]
            assert ds.dtype == np.uint64 and tuple(ds[()]) == dims, (cls, ds[()])
            assert ds.attrs["MATLAB_class"] == cls.encode() and ds.attrs["MATLAB_empty"] == 1
            assert "MATLAB_int_decode" not in ds.attrs and ds.attrs["H5PATH"] == ds.name.encode()
        for k, dims in (("e", (0, 0)), ("t", (0, 0)), ("l", (0, 2)), ("k", (0, 0))):
            assert tuple(f["s"][k][()]) == dims and f["s"][k].attrs["MATLAB_empty"] == 1
    m = mat73.loadmat(p)
    assert m["c"][5] == 1.5 and len(m["c"]) == 6 and set(m["s"]) == {"e", "t", "l", "k"}
    h = hdf5storage.loadmat(str(p))
    assert h["c"].shape == (1, 6)
    char_empty = hdf5storage.loadmat(str(REFERENCE_V73), variable_names=["char_empty"])["char_empty"]
    assert [h["c"][0, i].shape for i in range(5)] == [(0, 3), char_empty.shape, (0, 0), (1, 0), (0, 0)]
    assert [h["c"][0, i].dtype.kind for i in range(5)] == ["f", "U", "b", "i", "O"]


def test_empties_v5(mspool: matspool.Spool, root: Path) -> None:
    p = save(mspool, root / "e5.mat", EMPTIES, "v5")
    m = scipy.io.loadmat(p)
    c = m["c"]
    assert c.shape == (1, 6)
    assert [c[0, i].shape for i in range(5)] == [(0, 3), (0,), (0, 0), (1, 0), (0, 0)]  # '': (0,) as
    assert scipy.io.loadmat(REFERENCE_V7, variable_names=["char_empty"])["char_empty"].shape == (
        0,
    )  # MATLAB's
    assert c[0, 3].dtype == np.int8 and c[0, 4].dtype == object
    assert m["s"][0, 0]["l"].shape == (0, 2)


# -- 4. struct arrays, cells of any shape, char matrices, logical/int edges ---------------------
SHAPES = {
    "sa": [{"id": 1.0, "info": "first"}, {"id": 2.0, "info": "second"}],
    "rec": np.array(
        [[(1, 2.0), (3, 4.0), (5, 6.0)], [(7, 8.0), (9, 10.0), (11, 12.0)]],
        dtype=[("x", "<i4"), ("y", "<f8")],
    ),
    "rec0": np.zeros((0, 0), dtype=[("x", "<f8")]),
    "mixed": [{"a": 1.0}, {"b": 2.0}],  # different fields: a cell of structs
    "c23": np.array([[1.0, "a", None], [2.0, "b", None]], dtype=object)[:, :2].copy(),
    "c00": np.empty((0, 0), dtype=object),
    "c31": np.array([[1.0], ["x"], [np.ones(2)]], dtype=object),
    "arrays": [np.ones(3), np.zeros(3)],  # a cell, never stacked
    "cm": np.array(["ab", "cde", ""]),
    "l0": np.zeros((0, 0), bool),
    "l1": np.bool_(True),
    "i64": np.array([np.iinfo(np.int64).min, np.iinfo(np.int64).max, 0]),
    "u64": np.array([np.iinfo(np.uint64).max], np.uint64),
}


@pytest.fixture(scope="module")
def shapes(mspool: matspool.Spool, mdaemon: DaemonProc) -> dict[str, Path]:
    d = mdaemon.root / "shapes"
    d.mkdir()
    return {fmt: save(mspool, d / f"shapes_{fmt}.mat", SHAPES, fmt) for fmt in FORMATS}


def test_shapes_v5(shapes: dict[str, Path]) -> None:
    who = {n: (s, c) for n, s, c in scipy.io.whosmat(shapes["v5"])}
    assert (
        who["sa"] == ((1, 2), "struct")
        and who["rec"] == ((2, 3), "struct")
        and who["rec0"] == ((0, 0), "struct")
    )
    assert (
        who["mixed"] == ((1, 2), "cell") and who["c23"] == ((2, 2), "cell") and who["c00"] == ((0, 0), "cell")
    )
    assert who["c31"] == ((3, 1), "cell") and who["arrays"] == ((1, 2), "cell")
    assert struct.unpack("<2i", v5_elements(shapes["v5"])["cm"][1][2]) == (3, 3)
    assert who["cm"][1] == "char" and who["l0"] == ((0, 0), "logical") and who["l1"] == ((1, 1), "logical")
    m = scipy.io.loadmat(shapes["v5"])
    rec = m["rec"]
    assert rec.dtype.names == ("x", "y")
    assert [[int(rec[i, j]["x"][0, 0]) for j in range(3)] for i in range(2)] == [[1, 3, 5], [7, 9, 11]]
    assert rec[1, 2]["x"].dtype == np.int32
    assert m["sa"][0, 1]["info"][0] == "second"
    assert m["c23"][1, 1][0] == "b"
    assert m["cm"].tolist() == ["ab ", "cde", "   "]  # rows padded with spaces
    np.testing.assert_array_equal(m["arrays"][0, 1], np.zeros((1, 3)))
    assert m["i64"].tolist() == [[np.iinfo(np.int64).min, np.iinfo(np.int64).max, 0]]
    assert m["u64"].tolist() == [[np.iinfo(np.uint64).max]]


def test_shapes_v73(shapes: dict[str, Path]) -> None:
    with h5py.File(shapes["v7.3"], "r") as f, h5py.File(REFERENCE_V73, "r") as ref:
        sa, rsa = f["sa"], ref["struct_array"]  # MATLAB's 1x2 struct array with fields id, info
        assert isinstance(sa, h5py.Group) and dict(sa.attrs).keys() == dict(rsa.attrs).keys()
        for k in ("id", "info"):
            assert sa[k].dtype == rsa[k].dtype and sa[k].shape == rsa[k].shape and dict(sa[k].attrs) == {}
        assert f["rec"]["x"].shape == (3, 2)
        assert tuple(f["rec0"][()]) == (0, 0) and f["rec0"].attrs["MATLAB_class"] == b"struct"
        assert f["c00"].attrs["MATLAB_empty"] == 1
        assert f["cm"].shape == (3, 3) and f["cm"].attrs["MATLAB_int_decode"] == 2
        assert f["l0"].attrs["MATLAB_class"] == b"logical" and "MATLAB_int_decode" not in f["l0"].attrs
        assert {k: f["l0"].attrs[k] for k in f["l0"].attrs} == dict(ref["logical_empty"].attrs)
    m = mat73.loadmat(shapes["v7.3"])
    ref_sa = mat73.loadmat(REFERENCE_V73, only_include=["struct_array"])["struct_array"]
    assert m["sa"] == {"id": [1.0, 2.0], "info": ["first", "second"]} and set(ref_sa) == set(m["sa"])
    assert m["i64"].tolist() == [np.iinfo(np.int64).min, np.iinfo(np.int64).max, 0]
    h = hdf5storage.loadmat(str(shapes["v7.3"]), variable_names=["c31", "cm", "rec", "arrays"])
    assert h["c31"].shape == (3, 1) and h["arrays"].shape == (1, 2)
    assert h["cm"].ravel().tolist() == ["ab ", "cde", "   "]
    assert h["rec"].shape == (2, 3) and int(h["rec"][1, 2]["x"][0, 0]) == 11


C222 = np.arange(8).reshape(2, 2, 2).astype(float).astype(object)


@pytest.mark.parametrize("fmt", FORMATS)
def test_nd_cell(mspool: matspool.Spool, root: Path, fmt: str) -> None:
    """A 2x2x2 cell (mat73 reads cells as nested 2-d lists and cannot read it: not asked)."""
    p = save(mspool, root / "c222.mat", {"c": C222}, fmt)
    if fmt == "v5":
        c = scipy.io.loadmat(p)["c"]
    else:
        with h5py.File(p, "r") as f:
            assert f["c"].shape == (2, 2, 2) and f["c"].attrs["MATLAB_class"] == b"cell"
        c = hdf5storage.loadmat(str(p))["c"]
    assert c.shape == (2, 2, 2)
    assert [[[c[i, j, k][0, 0] for k in range(2)] for j in range(2)] for i in range(2)] == C222.tolist()


# -- 5. sparse -------------------------------------------------------------------------------
DENSE = np.array([[0, 2.5, 0, 0], [-1, 0, 0, 3], [0, 0, 0, 0]])
SPARSE = {
    "csr": sp.csr_matrix(DENSE),
    "coo": sp.coo_matrix(DENSE),
    "lil": sp.lil_matrix(DENSE),
    "f32": sp.csc_matrix(DENSE.astype(np.float32)),  # MATLAB sparse is double
    "cplx": sp.csc_matrix(DENSE + 1j * (DENSE != 0)),
    "logic": sp.csr_matrix(DENSE != 0),
    "empty": sp.csc_matrix((0, 0)),
    "zeros": sp.csc_matrix((3, 2)),
    "dup": sp.coo_matrix(([1.0, 2.0, 0.0], ([0, 0, 1], [1, 1, 0])), shape=(2, 2)),  # summed; zero dropped
    "tcoo": torch.tensor(DENSE).to_sparse(),
    "tcsr": torch.tensor(DENSE, dtype=torch.float32).to_sparse_csr(),
    "inside": {"m": sp.eye(3, format="csr"), "c": [sp.csc_matrix(DENSE)]},
}
DENSE_OF = {
    "csr": DENSE,
    "coo": DENSE,
    "lil": DENSE,
    "f32": DENSE,
    "cplx": DENSE + 1j * (DENSE != 0),
    "logic": DENSE != 0,
    "empty": np.zeros((0, 0)),
    "zeros": np.zeros((3, 2)),
    "dup": np.array([[0, 3.0], [0, 0]]),
    "tcoo": DENSE,
    "tcsr": DENSE,
}


@pytest.fixture(scope="module")
def sparse_files(mspool: matspool.Spool, mdaemon: DaemonProc) -> dict[str, Path]:
    d = mdaemon.root / "sparse"
    d.mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: sparse CSR is beta
        return {fmt: save(mspool, d / f"sparse_{fmt}.mat", SPARSE, fmt) for fmt in FORMATS}


def test_sparse_v5(sparse_files: dict[str, Path]) -> None:
    m = scipy.io.loadmat(sparse_files["v5"])
    who = {n: (s, c) for n, s, c in scipy.io.whosmat(sparse_files["v5"])}
    ref_who = {n: c for n, _, c in scipy.io.whosmat(REFERENCE_V7)}  # MATLAB's own, as scipy names them
    for name, dense in DENSE_OF.items():
        got = m[name]
        assert sp.issparse(got) and got.shape == dense.shape, name
        np.testing.assert_array_equal(got.toarray(), dense, err_msg=name)
        assert who[name] == (dense.shape, ref_who["sparse_logical" if name == "logic" else "sparse_nnz"]), (
            name
        )
    assert m["logic"].dtype == np.uint8 or m["logic"].dtype == bool
    assert m["dup"].nnz == 1  # no stored zero, as MATLAB
    np.testing.assert_array_equal(m["inside"][0, 0]["c"][0, 0].toarray(), DENSE)
    el = v5_elements(sparse_files["v5"])
    flags = struct.unpack("<II", el["logic"][0][2])
    assert flags[0] & 0xFF == 5 and flags[0] & 0x0200 and flags[0] & 0x1000  # logical, as MATLAB
    assert struct.unpack("<II", el["empty"][0][2])[1] == 1  # nzmax 1, as MATLAB


def test_sparse_v73(sparse_files: dict[str, Path]) -> None:
    m = mat73.loadmat(sparse_files["v7.3"])
    for name, dense in DENSE_OF.items():
        got = m[name]
        assert sp.issparse(got) and got.shape == dense.shape, name
        if got.dtype.names:  # mat73 keeps MATLAB's {real, imag} compound
            got = sp.csc_matrix(
                (got.data["real"] + 1j * got.data["imag"], got.indices, got.indptr), got.shape
            )
        arr = got.toarray()
        np.testing.assert_array_equal(arr, dense, err_msg=name)
    pairs = {
        "csr": "sparse_nnz",
        "cplx": "sparse_complex",
        "logic": "sparse_logical",
        "empty": "sparse_empty",
        "zeros": "sparse_all_zeros",
    }
    with h5py.File(sparse_files["v7.3"], "r") as f, h5py.File(REFERENCE_V73, "r") as ref:
        for mine, theirs in pairs.items():
            a, b = f[mine], ref[theirs]
            assert sorted(a.attrs) == sorted(b.attrs) and sorted(a) == sorted(b), mine
            for k in a.attrs:
                if k != "MATLAB_sparse":
                    assert a.attrs[k] == b.attrs[k] and type(a.attrs[k]) is type(b.attrs[k]), (mine, k)
            assert type(a.attrs["MATLAB_sparse"]) is type(b.attrs["MATLAB_sparse"])
            for k in b:
                assert a[k].dtype == b[k].dtype and a[k].ndim == b[k].ndim == 1, (mine, k)
        assert f["csr"].attrs["MATLAB_sparse"] == 3 and f["csr/jc"][()].tolist() == [0, 1, 2, 2, 3]


@needs_octave
def test_octave_reads_sparse_and_struct_arrays(
    sparse_files: dict[str, Path], shapes: dict[str, Path], mspool: matspool.Spool, root: Path
) -> None:
    c222 = save(mspool, root / "c222_oct.mat", {"c": C222}, "v5")
    out = octave(
        f"x = load('{sparse_files['v5']}'); r = load('{REFERENCE_V7}'); y = load('{shapes['v5']}'); "
        f"z = load('{c222}'); printf('%d\\n', issparse(x.csr), issparse(x.logic)); "
        "printf('%g ', full(x.csr)); printf('\\n%s %s\\n', class(x.logic), class(r.sparse_logical)); "
        "printf('%d ', size(x.zeros), size(y.rec), y.rec(2,3).x, size(z.c), z.c{2,1,2}); "
        "printf('\\n%s|%s|%s\\n', y.sa(2).info, class(y.cm), y.cm(1,:));"
    )
    lines = out.rstrip("\n").split("\n")
    assert lines[:2] == ["1", "1"]
    assert [float(v) for v in lines[2].split()] == DENSE.ravel(order="F").tolist()
    ours, matlabs = lines[3].split()
    assert ours == matlabs  # Octave reads a logical sparse (MATLAB's too) as double
    assert [int(v) for v in lines[4].split()] == [3, 2, 2, 3, 11, 2, 2, 2, 5]
    assert lines[5] == "second|char|ab "


# -- 6. savemat --------------------------------------------------------------------------------
def test_savemat_like_scipy(mspool: matspool.Spool, root: Path) -> None:
    mdict = {"a": np.arange(3.0), "s": {"k": 1.0}, "t": "text"}
    fut = matspool.savemat(str(root / "sm"), mdict, spool=mspool)  # appendmat adds .mat
    assert fut.result(timeout=60).format == "v5" and (root / "sm.mat").is_file()
    scipy.io.savemat(root / "sc.mat", mdict)
    ours = scipy.io.loadmat(root / "sm.mat", simplify_cells=True)
    theirs = scipy.io.loadmat(root / "sc.mat", simplify_cells=True)
    for k in mdict:
        np.testing.assert_equal(ours[k], theirs[k])
    empties = {"e": [], "z": np.zeros(0, np.int8), "s": {"e": []}, "c": [np.zeros(0), "x"]}
    scipy.io.savemat(root / "sce.mat", empties)
    r = matspool.savemat(root / "sme.mat", empties, spool=mspool).result(timeout=60)
    assert scipy.io.whosmat(r.path) == [
        *scipy.io.whosmat(root / "sce.mat")[:2],
        ("s", (1, 1), "struct"),
        ("c", (1, 2), "cell"),
    ]
    m = scipy.io.loadmat(r.path)
    assert m["e"].shape == m["z"].shape == m["s"][0, 0]["e"].shape == m["c"][0, 0].shape == (0, 0)
    col = matspool.savemat(root / "col.mat", {"a": np.arange(3.0)}, oned_as="column", spool=mspool)
    assert scipy.io.loadmat(col.result(timeout=60).path)["a"].shape == (3, 1)
    for fmt in ("7.3", "-v7.3", "v7.3"):
        r = matspool.savemat(root / "h.mat", mdict, format=fmt, spool=mspool).result(timeout=60)
        assert r.format == "v7.3" and h5py.is_hdf5(r.path)
    z = matspool.savemat(root / "z.mat", {"a": np.zeros(4096)}, do_compression=True, spool=mspool)
    assert z.result(timeout=60).nbytes < 4096
    assert (root / "z.mat").read_bytes()[128:132] == (15).to_bytes(4, "little")  # miCOMPRESSED
    with pytest.warns(UserWarning, match="'_hidden'"):
        r = matspool.savemat(root / "u.mat", {"_hidden": 1.0, "shown": 2.0}, spool=mspool).result(timeout=60)
    assert [n for n, _, _ in scipy.io.whosmat(r.path)] == ["shown"]


def test_savemat_refuses_what_scipy_refuses(mspool: matspool.Spool, root: Path) -> None:
    long = {"s": {"f" * 32: 1.0}}
    with pytest.raises(matspool.InvalidVariableError, match="long_field_names"):
        matspool.savemat(root / "l.mat", long, spool=mspool)
    r = matspool.savemat(root / "l.mat", long, long_field_names=True, spool=mspool).result(timeout=60)
    assert list(scipy.io.loadmat(r.path, simplify_cells=True)["s"]) == ["f" * 32]
    for bad in ("4", "v8", "", None):
        with pytest.raises(matspool.InvalidOptionError, match=r"'7\.3'") as ei:
            matspool.savemat(root / "x.mat", {"a": 1.0}, format=bad, spool=mspool)  # type: ignore[arg-type]
        assert isinstance(ei.value, ValueError)
    with pytest.raises(matspool.InvalidOptionError, match="'row', 'column'"):
        matspool.savemat(root / "x.mat", {"a": 1.0}, oned_as="diag", spool=mspool)
    with pytest.raises(matspool.InvalidOptionError, match="'matlab'"):
        mspool.save(root / "x.mat", {"a": 1.0}, layout="fortran")
    with open(root / "f.mat", "wb") as fh, pytest.raises(matspool.UnsupportedTypeError, match="file objects"):
        matspool.savemat(fh, {"a": 1.0}, spool=mspool)  # type: ignore[arg-type]


@pytest.mark.parametrize("alias", ["5", "7", "-v7", "v5", "7.3", "-v7.3", "v7.3"])
def test_save_takes_format_aliases(mspool: matspool.Spool, root: Path, alias: str) -> None:
    r = mspool.save(root / "alias.mat", {"a": 1.0}, format=alias).result(timeout=60)
    assert r.format == ("v7.3" if "7.3" in alias else "v5")


# -- the wire: new tree kinds are schema-checked like the old ones --------------------------------
RING = 1 << 16


def _msg(tree: Any) -> dict[str, Any]:
    return {
        "op": "WRITE",
        "seq": 1,
        "path": "/tmp/x.mat",
        "format": "v7.3",
        "fsync": False,
        "vars": [{"name": "v", "tree": tree}],
    }


def _leaf(dtype: str = "<f8", n: int = 1, offset: int = 0, **extra: Any) -> dict[str, Any]:
    return {"dtype": dtype, "dims": [n, 1], "offset": offset, "nbytes": n * np.dtype(dtype).itemsize, **extra}


def _sparse(data: Any = None, ir: Any = None, jc: Any = None, dims: Any = (2, 2)) -> dict[str, Any]:
    return {
        "sparse": {
            "data": data or _leaf("<f8", 1),
            "ir": ir or _leaf("<i8", 1, 8),
            "jc": jc or _leaf("<i8", 3, 16),
        },
        "dims": list(dims),
    }


def test_parse_write_accepts_new_kinds() -> None:
    from matspool import _protocol as proto

    tree = {
        "struct": [
            [
                "sa",
                {
                    "structs": ["a", "b"],
                    "dims": [1, 2],
                    "elems": [[_leaf(), {"char": "x"}], [_leaf(offset=8), {"char": ""}]],
                },
            ],
            ["sp", _sparse()],
            ["txt", _leaf("<u2", 3, 64, mclass="char")],
            ["c3", {"cell": [{"char": "a"}] * 8, "dims": [2, 2, 2]}],
        ]
    }
    (var,) = proto.parse_write(_msg(tree), RING).vars
    kinds = [type(v).__name__ for _, v in var.tree.fields]
    assert kinds == ["StructArray", "Sparse", "VarSpec", "Cell"]
    assert var.tree.fields[2][1].matlab_class == "char"
    assert len(proto.leaves(var)) == 6
    again = proto.parse_write(proto.parse_write(_msg(tree), RING).to_wire(), RING)
    assert again.vars == (var,)  # the wire form round-trips


HOSTILE_NEW = [
    ("structs_dims_mismatch", {"structs": ["a"], "dims": [1, 3], "elems": [[_leaf()]]}),
    ("structs_elem_short", {"structs": ["a", "b"], "dims": [1, 1], "elems": [[_leaf()]]}),
    ("structs_bad_field", {"structs": ["1a"], "dims": [1, 1], "elems": [[_leaf()]]}),
    ("structs_repeat", {"structs": ["a", "a"], "dims": [1, 1], "elems": [[_leaf(), _leaf()]]}),
    ("structs_no_elems", {"structs": ["a"], "dims": [0, 0]}),
    ("sparse_int_data", _sparse(data=_leaf("<i4", 1))),
    ("sparse_short_jc", _sparse(jc=_leaf("<i8", 2, 16))),
    ("sparse_ir_float", _sparse(ir=_leaf("<f8", 1, 8))),
    ("sparse_missing_jc", {"sparse": {"data": _leaf(), "ir": _leaf("<i8", 1, 8)}, "dims": [2, 2]}),
    ("sparse_3d", _sparse(dims=(2, 2, 1))),
    ("sparse_past_ring", _sparse(data=_leaf("<f8", 1, RING))),
    ("mclass_other", _leaf("<f8", 1, mclass="string")),
    ("mclass_char_wrong_dtype", _leaf("<f8", 1, mclass="char")),
    ("cell_nd_too_many_dims", {"cell": [{"char": "a"}], "dims": [1] * 40}),
]


@pytest.mark.parametrize("tree", [t for _, t in HOSTILE_NEW], ids=[i for i, _ in HOSTILE_NEW])
def test_parse_write_refuses_bad_new_kinds(tree: Any) -> None:
    from matspool import _protocol as proto

    with pytest.raises(matspool.MatspoolError) as ei:
        proto.parse_write(_msg(tree), RING)
    assert isinstance(ei.value, matspool.ProtocolError | matspool.InvalidVariableError) and str(ei.value)


def test_daemon_refuses_inconsistent_sparse_indices() -> None:
    """Row indices out of range or falling column starts are caught before any byte is written."""
    from matspool import _protocol as proto
    from matspoold.writers._values import materialize

    ring = np.zeros(64, np.uint8)
    ring[:8] = np.frombuffer(np.float64(1.0).tobytes(), np.uint8)
    ring[8:16] = np.frombuffer(np.int64(5).tobytes(), np.uint8)  # row 5 of a 2-row matrix
    ring[16:40] = np.frombuffer(np.array([0, 1, 1], np.int64).tobytes(), np.uint8)
    (var,) = proto.parse_write(_msg(_sparse()), RING).vars

    def array(spec: Any) -> np.ndarray:
        return np.ndarray(spec.dims, dtype=spec.dtype, buffer=ring, offset=spec.offset, order="F")

    with pytest.raises(matspool.ProtocolError, match="row indices"):
        materialize(var.tree, array)


def test_verify_accepts_what_we_write(shapes: dict[str, Path], sparse_files: dict[str, Path]) -> None:
    from matspoold.verify import verify_file

    for p in [*shapes.values(), *sparse_files.values()]:
        rep = verify_file(str(p))
        assert rep.ok, (p, rep.errors)


# -- save(..., append=True): MATLAB's save -append ------------------------------------------------
@pytest.mark.parametrize("fmt", FORMATS)
def test_append_adds_and_replaces(mspool: matspool.Spool, root: Path, fmt: str) -> None:
    p = save(mspool, root / "ap.mat", {"a": np.arange(3.0), "b": "old", "s": {"c": ["x", 1.0]}}, fmt)
    r = mspool.save(p, {"b": "new", "t": {"d": ["y", np.ones(2)]}}, format=fmt, append=True).result(
        timeout=60
    )
    assert r.nbytes == p.stat().st_size
    got = matvalues_load(p)
    assert list(got) == ["a", "s", "b", "t"] if fmt == "v5" else sorted(got) == ["a", "b", "s", "t"]
    m = scipy.io.loadmat(p, simplify_cells=True) if fmt == "v5" else mat73.loadmat(p)
    np.testing.assert_array_equal(m["a"], np.arange(3.0))
    assert m["b"] == "new" and m["s"]["c"][0] == "x" and m["t"]["d"][0] == "y"


@pytest.mark.parametrize("name", ["matlab_basic_v7.mat", "matlab_basic_v73.mat"])
def test_append_to_matlabs_own_file(mspool: matspool.Spool, root: Path, name: str) -> None:
    """MATLAB's file keeps its format (v7 compressed elements copied byte for byte) and every
    variable it had; the save's own format is not used, as in MATLAB."""
    p = root / name
    shutil.copyfile(REFERENCE_V73.with_name(name), p)
    before = matvalues_load(p)
    mspool.save(p, {"added": {"x": [1.0, "two"]}, "double_scalar": 2.5}, format="v5", append=True).result(
        timeout=60
    )
    after = matvalues_load(p)
    assert h5py.is_hdf5(p) == name.endswith("v73.mat")
    assert {k: v for k, v in after.items() if k not in ("added", "double_scalar")} == {
        k: v for k, v in before.items() if k != "double_scalar"
    }
    assert after["double_scalar"] == ("num", "double", (1, 1), False, np.float64(2.5).tobytes())
    assert after["added"][2] == ("x",)


def test_append_is_atomic_and_creates(mspool: matspool.Spool, root: Path) -> None:
    p = save(mspool, root / "new.mat", {"a": 1.0}, "v7.3")  # (a plain save, for comparison)
    fresh = root / "fresh.mat"
    mspool.save(fresh, {"a": 1.0}, format="v7.3", append=True).result(timeout=60)  # no file yet
    assert matvalues_load(fresh) == matvalues_load(p)
    junk = root / "junk.mat"
    junk.write_bytes(b"not a MAT file at all" * 10)
    fut = mspool.save(junk, {"a": 1.0}, format="v5", append=True)
    with pytest.raises(matspool.UnsupportedTypeError, match="not a MAT"):
        fut.result(timeout=60)
    assert junk.read_bytes() == b"not a MAT file at all" * 10  # the old file is untouched
    assert not [q for q in root.iterdir() if "matspool-tmp" in q.name]


def matvalues_load(p: Path) -> dict[str, Any]:
    from matvalues import load

    return load(p)
