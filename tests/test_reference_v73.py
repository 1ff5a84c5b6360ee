"""Our v7.3 files against one MATLAB itself wrote (``tests/data/matlab_basic_v73.mat``).

The values each reference variable holds are saved through a real daemon (once from
numpy arrays, once from torch tensors); then the two files are compared at the HDF5
level: userblock and 128-byte header, superblock version, and per dataset the dtype,
shape, attribute names and values, and the low-level types of those attributes
(MATLAB_class: fixed-length ASCII string, NULLTERM, scalar dataspace), then the values.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import hdf5storage
import numpy as np
import pytest
import torch

import matspool

from conftest import start_daemon
from readback import REFERENCE_V73 as REFERENCE
from readback import attr_signature, dataset_value

NAMES = [
    "double_scalar",
    "double_array",
    "single_scalar",
    "single_array",
    *(
        f"{t}{bits}_{kind}"
        for t in ("int", "uint")
        for bits in (8, 16, 32, 64)
        for kind in ("scalar", "array")
    ),
    "logical_scalar",
    "logical_array",
    "logical_empty",
    "numeric_empty",
    "complex_scalar",
    "complex_array",
]


@pytest.fixture(scope="module")
def reference() -> Iterator[h5py.File]:
    with h5py.File(REFERENCE, "r") as f:
        yield f


@pytest.fixture(scope="module", params=["numpy", "torch"])
def ours(
    request: pytest.FixtureRequest, reference: h5py.File, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    """The reference's values saved by matspool (v7.3, default layout) from ``source``."""
    root = tmp_path_factory.mktemp(f"ref-{request.param}")
    out = root / "out"
    out.mkdir()
    values: dict[str, Any] = {}
    for name in NAMES:
        a = dataset_value(reference[name])
        values[name] = torch.from_numpy(a.copy()) if request.param == "torch" else a
    d = start_daemon(out, root / "sock")
    try:
        with matspool.Spool(d.endpoint, ring_bytes=8 << 20, timeout=30) as s:
            path = out / "ours.mat"
            r = s.save(path, values, format="v7.3").result(timeout=60)
            assert r.format == "v7.3" and r.path == str(path)
    finally:
        assert d.stop() == 0
    yield path


def test_reference_holds_what_we_think() -> None:
    """Guard: the reference's values are the documented ones (MATLAB 2x3 stored as (3, 2))."""
    with h5py.File(REFERENCE, "r") as f:
        np.testing.assert_array_equal(dataset_value(f["double_array"]), [[1.1, 2.2, 3.3], [4.4, 5.5, 6.6]])
        assert f["double_array"].shape == (3, 2)
        np.testing.assert_array_equal(dataset_value(f["double_scalar"]), [[3.14]])
        np.testing.assert_array_equal(
            dataset_value(f["int8_array"]), np.array([[1, 2, 3], [4, 5, 6]], np.int8)
        )
        np.testing.assert_array_equal(dataset_value(f["logical_array"]), [[True, False, True]])
        np.testing.assert_array_equal(dataset_value(f["complex_array"]), [[1 + 2j], [2 + 4j], [4 + 8j]])
        assert dataset_value(f["numeric_empty"]).shape == (0, 0)


# ---------------------------------------------------------------------------------------
# file level
# ---------------------------------------------------------------------------------------
_HEADER = re.compile(
    rb"MATLAB 7\.3 MAT-file, Platform: (?P<platform>[A-Z0-9]+), "
    rb"Created on: (?P<stamp>[A-Z][a-z]{2} [A-Z][a-z]{2} [ 123]\d \d\d:\d\d:\d\d \d{4}) "
    rb"HDF5 schema 1\.00 \.(?P<pad> *)"
)


def _check_header(block: bytes) -> re.Match[bytes]:
    assert len(block) >= 512
    m = _HEADER.fullmatch(block[:116])
    assert m is not None, block[:128]
    assert block[116:124] == b"\x00" * 8
    assert block[124:128] == b"\x00\x02IM"  # version 0x0200, little-endian marker
    assert block[128:512] == b"\x00" * 384  # the rest of the userblock
    assert block[512:520] == b"\x89HDF\r\n\x1a\n"  # the HDF5 superblock right after it
    return m


def test_userblock_and_header(ours: Path, reference: h5py.File) -> None:
    ref = _check_header(REFERENCE.read_bytes()[:520])
    mine = _check_header(ours.read_bytes()[:520])
    assert ref["platform"] == b"PCWIN64"
    assert mine["platform"] in (b"GLNXA64", b"MACA64", b"MACI64", b"PCWIN64")
    # the stamp is C's asctime format, as MATLAB writes it ("Mon Dec  8 ...": day space-padded)
    stamp = mine["stamp"].decode()
    assert time.asctime(time.strptime(stamp, "%a %b %d %H:%M:%S %Y")) == stamp
    assert abs(time.mktime(time.strptime(stamp, "%a %b %d %H:%M:%S %Y")) - time.time()) < 600
    with h5py.File(ours, "r") as f:
        assert f.userblock_size == reference.userblock_size == 512
        assert f.id.get_create_plist().get_userblock() == 512


def test_header_bytes_match_matlab_for_the_same_time() -> None:
    """Given MATLAB's creation time, our header is MATLAB's byte for byte (but the platform)."""
    from matspoold.writers.v73 import header

    ref = REFERENCE.read_bytes()[:128]
    when = time.mktime((2025, 12, 8, 22, 53, 31, 0, 0, -1))  # "Mon Dec  8 22:53:31 2025", local
    assert header(when) == ref.replace(b"Platform: PCWIN64", b"Platform: GLNXA64")


def test_superblock(ours: Path, reference: h5py.File) -> None:
    with h5py.File(ours, "r") as f:
        mine, ref = f.id.get_create_plist(), reference.id.get_create_plist()
        assert mine.get_version()[0] == 0  # readable by MATLAB before R2021b
        assert mine.get_version() == ref.get_version()
        assert mine.get_sizes() == ref.get_sizes()
        assert dict(f.attrs) == dict(reference.attrs) == {}
        assert sorted(f) == sorted(NAMES)


# ---------------------------------------------------------------------------------------
# per dataset
# ---------------------------------------------------------------------------------------
def _attr_signature(obj: h5py.Dataset, name: str) -> dict[str, Any]:
    """Everything MATLAB might look at in one attribute: value, type, dataspace."""
    return {"value": obj.attrs[name], **attr_signature(obj, name)}


@pytest.mark.parametrize("name", NAMES)
def test_dataset_structure(ours: Path, reference: h5py.File, name: str) -> None:
    ref = reference[name]
    with h5py.File(ours, "r") as f:
        ds = f[name]
        assert isinstance(ds, h5py.Dataset)
        assert ds.dtype == ref.dtype, (ds.dtype, ref.dtype)
        if ref.dtype.names:
            assert ds.dtype.names == ref.dtype.names == ("real", "imag")
            assert ds.dtype.fields == ref.dtype.fields and ds.dtype.itemsize == ref.dtype.itemsize
        assert ds.shape == ref.shape
        assert sorted(ds.attrs) == sorted(ref.attrs)
        for attr in ref.attrs:
            mine, theirs = _attr_signature(ds, attr), _attr_signature(ref, attr)
            assert type(mine["value"]) is type(theirs["value"]), (attr, mine, theirs)
            assert mine["value"] == theirs["value"], (attr, mine, theirs)
            assert mine == theirs, (attr, mine, theirs)
        cls = _attr_signature(ds, "MATLAB_class")
        assert cls["class"] == h5py.h5t.STRING and not cls["vlen"]
        assert cls["cset"] == h5py.h5t.CSET_ASCII and cls["strpad"] == h5py.h5t.STR_NULLTERM
        assert cls["space"] == h5py.h5s.SCALAR
        # MATLAB wrote these small datasets COMPACT; contiguous is what we write. Either
        # way: not chunked, no filters.
        dcpl = ds.id.get_create_plist()
        assert ref.id.get_create_plist().get_layout() == h5py.h5d.COMPACT
        assert dcpl.get_layout() in (h5py.h5d.COMPACT, h5py.h5d.CONTIGUOUS)
        assert dcpl.get_nfilters() == 0 and ds.chunks is None


@pytest.mark.parametrize("name", NAMES)
def test_dataset_values(ours: Path, reference: h5py.File, name: str) -> None:
    with h5py.File(ours, "r") as f:
        mine, ref = f[name][()], reference[name][()]
    assert mine.dtype == ref.dtype and mine.shape == ref.shape
    assert mine.tobytes() == ref.tobytes()  # bit for bit, complex compounds included


def test_hdf5storage_reads_both_alike(ours: Path) -> None:
    mine = hdf5storage.loadmat(str(ours))
    ref = hdf5storage.loadmat(str(REFERENCE), variable_names=NAMES)
    assert sorted(mine) == sorted(NAMES)
    for name in NAMES:
        a, b = mine[name], ref[name]
        assert a.dtype == b.dtype and a.shape == b.shape, (name, a.dtype, b.dtype, a.shape, b.shape)
        np.testing.assert_array_equal(a, b, err_msg=name)
