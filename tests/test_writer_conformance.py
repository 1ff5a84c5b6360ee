"""One conformance suite for every writer (zarr's ``StoreTests`` is the model).

:class:`WriterTests` holds the round-trip cases; each writer subclasses it, naming the
writer and how to read its files back with an independent reader (scipy for v5, h5py and
mat73 for v7.3). Every case writes through the writer interface and the atomic publish
(``write_atomic``, ``Session``), reads back, and compares dtype, shape and values
exactly. Cases that need a capability are run against the flag: a writer without it
must refuse with ``ProtocolError``, not write something else.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

import mat73
import numpy as np
import pytest

from matspool._errors import FormatLimitError, ProtocolError
from matspool._protocol import VarSpec
from matspoold.writers import WRITERS, Session, Writer, write_atomic, writer_for

from readback import read_v5, read_v73

_DTYPES = ["<f8", "<f4", "|i1", "|u1", "<i2", "<u2", "<i4", "<u4", "<i8", "<u8", "|b1", "<c16", "<c8"]


def _value(dtype: str, dims: tuple[int, ...], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    n = int(np.prod(dims))
    if dt.kind == "b":
        flat = rng.integers(0, 2, n).astype(bool)
    elif dt.kind in "iu":
        info = np.iinfo(dt)
        flat = rng.integers(info.min, info.max, n, dtype=dt, endpoint=True)
    elif dt.kind == "c":
        flat = (rng.standard_normal(n) + 1j * rng.standard_normal(n)).astype(dt)
    else:
        flat = rng.standard_normal(n).astype(dt)
    return np.asfortranarray(flat.reshape(dims, order="F"))


def _vars(**values: np.ndarray) -> list[tuple[VarSpec, Any]]:
    """Variables as the daemon hands them to a writer: a spec and a column-major view."""
    out: list[tuple[VarSpec, Any]] = []
    offset = 0
    for name, v in values.items():
        spec = VarSpec(name, v.dtype.str if v.dtype.kind != "b" else "|b1", tuple(v.shape), offset, v.nbytes)
        out.append((spec, v))
        offset += -(-v.nbytes // 64) * 64
    return out


def _temporaries(d: Path) -> list[str]:
    return [n for n in os.listdir(d) if n.endswith(".matspool-tmp")]


class WriterTests:
    """Round trips every writer must pass. Subclasses set ``fmt`` and ``read``."""

    fmt: ClassVar[str]
    takes_empty: ClassVar[bool] = True  # a 0-by-n variable

    @property
    def writer(self) -> Writer:
        return writer_for(self.fmt)

    def read(self, path: Path) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def expected(self, value: np.ndarray) -> np.ndarray:
        """What the reader sees for ``value`` (a stream's file holds one step)."""
        return value

    def roundtrip(self, tmp_path: Path, level: int = 0, **values: np.ndarray) -> None:
        final = tmp_path / "x.mat"
        size = write_atomic(str(final), self.fmt, _vars(**values), fsync=False, compress=level)
        assert size == final.stat().st_size
        assert _temporaries(tmp_path) == []
        got = self.read(final)
        assert sorted(got) == sorted(values)
        for name, value in values.items():
            want = self.expected(value)
            assert got[name].dtype == want.dtype, name
            assert got[name].shape == want.shape, name
            assert np.array_equal(got[name], want), name

    # -- cases ---------------------------------------------------------------------------
    def test_is_registered(self) -> None:
        assert WRITERS[self.fmt] is self.writer and self.writer.name == self.fmt

    @pytest.mark.parametrize("dtype", _DTYPES)
    def test_every_class(self, tmp_path: Path, dtype: str) -> None:
        self.roundtrip(tmp_path, x=_value(dtype, (3, 5)))

    @pytest.mark.parametrize("dims", [(1, 1), (1, 7), (7, 1), (2, 3, 4), (2, 1, 3, 1, 2), (0, 3)])
    def test_shapes(self, tmp_path: Path, dims: tuple[int, ...]) -> None:
        if 0 in dims and not self.takes_empty:
            with pytest.raises(FormatLimitError, match="empty"):
                self.roundtrip(tmp_path, x=_value("<f8", dims))
            assert os.listdir(tmp_path) == []
            return
        self.roundtrip(tmp_path, x=_value("<f8", dims))

    def test_several_variables(self, tmp_path: Path) -> None:
        self.roundtrip(
            tmp_path, a=_value("<f8", (4, 4), 1), b=_value("<i4", (2, 9), 2), c=_value("|b1", (5, 1), 3)
        )

    def test_large(self, tmp_path: Path) -> None:  # past the small-file and template paths
        self.roundtrip(tmp_path, x=_value("<f4", (700, 900)), z=_value("<c16", (300, 300), 1))

    @pytest.mark.parametrize("level", [1, 6])
    def test_compression(self, tmp_path: Path, level: int) -> None:
        x = np.asfortranarray(np.tile(np.arange(512.0), (256, 1)))  # compressible
        if not self.writer.supports_compression:
            with pytest.raises(ProtocolError):
                self.roundtrip(tmp_path, level, x=x)
            return
        self.roundtrip(tmp_path, level, x=x, y=_value("<i2", (100, 100)))

    def test_replaces_an_existing_file_whole(self, tmp_path: Path) -> None:
        self.roundtrip(tmp_path, x=_value("<f8", (50, 50), 1))
        self.roundtrip(tmp_path, y=_value("<u8", (3, 3), 2))

    def test_failed_write_leaves_nothing(self, tmp_path: Path) -> None:
        ((spec, _),) = _vars(x=_value("<f8", (4, 4)))
        with pytest.raises(Exception):  # noqa: B017 - a value that is no array at all
            write_atomic(str(tmp_path / "x.mat"), self.fmt, [(spec, object())], fsync=False)
        assert os.listdir(tmp_path) == []

    @pytest.mark.parametrize("dtype", ["<c16", "<f4"])  # v5 stores complex parts apart
    def test_parts(self, tmp_path: Path, dtype: str) -> None:
        """A save whose largest variable arrives in pieces after the file is laid out."""
        small, big = _value("<f8", (3, 3), 1), _value(dtype, (64, 48), 2)
        (s_spec, _), (b_spec, _) = _vars(small=small, big=big)
        b_spec = VarSpec(b_spec.name, b_spec.dtype, b_spec.dims, 0, b_spec.nbytes, deferred=True)
        final = tmp_path / "x.mat"
        variables: list[tuple[Any, Any]] = [(s_spec, small), (b_spec, None)]
        if not self.writer.supports_parts:
            with pytest.raises(ProtocolError):
                Session.begin(str(final), self.fmt, variables, fsync=False)
            assert os.listdir(tmp_path) == []
            return
        session = Session.begin(str(final), self.fmt, variables, fsync=False)
        assert not final.exists(), "a save in pieces appeared before its end"
        raw = big.reshape(-1, order="F").view(np.uint8)
        step = 16 * 100
        for start in reversed(range(0, raw.nbytes, step)):  # any order
            session.write(1, start, raw[start : start + step])
        assert session.end() == final.stat().st_size
        assert _temporaries(tmp_path) == []
        got = self.read(final)
        assert np.array_equal(got["small"], self.expected(small))
        assert got["big"].dtype == big.dtype and np.array_equal(got["big"], self.expected(big))

    def test_aborted_parts_leave_nothing(self, tmp_path: Path) -> None:
        if not self.writer.supports_parts:
            return  # test_parts checks the refusal
        big = _value("<f8", (64, 64))
        ((spec, _),) = _vars(big=big)
        spec = VarSpec(spec.name, spec.dtype, spec.dims, 0, spec.nbytes, deferred=True)
        session = Session.begin(str(tmp_path / "x.mat"), self.fmt, [(spec, None)], fsync=False)
        session.abort()
        assert os.listdir(tmp_path) == []

    def test_streaming(self, tmp_path: Path) -> None:
        steps = [_value("<f4", (4, 3), i) for i in range(5)]
        final = tmp_path / "x.mat"
        write_atomic(str(final), self.fmt, _vars(u=steps[0]), fsync=False)
        if not self.writer.supports_streaming:
            with pytest.raises(ProtocolError):
                self.writer.append(str(final), _vars(u=steps[1]), fsync=False)
            return
        for s in steps[1:]:
            assert self.writer.append(str(final), _vars(u=s), fsync=True) == final.stat().st_size
        got = read_v73(final)["u"]
        assert got.dtype == np.float32 and np.array_equal(got, np.stack(steps, axis=-1))


class TestV5(WriterTests):
    fmt = "v5"

    def read(self, path: Path) -> dict[str, np.ndarray]:
        assert path.read_bytes()[:19] == b"MATLAB 5.0 MAT-file"
        return read_v5(path)


class TestV73(WriterTests):
    fmt = "v7.3"

    def read(self, path: Path) -> dict[str, np.ndarray]:
        assert path.read_bytes()[:19] == b"MATLAB 7.3 MAT-file"
        got = read_v73(path)
        # a second, independent reader agrees on every value (mat73 squeezes 1-element
        # dims and turns logical into bool; compare values only)
        other = mat73.loadmat(str(path))
        for name, value in got.items():
            if value.size:  # mat73 reads an empty array as None
                assert np.array_equal(np.squeeze(np.asarray(other[name])), np.squeeze(value)), name
        return got


class TestStream(WriterTests):
    fmt = "stream"
    takes_empty = False  # a step of nothing has no chunk to grow by

    def read(self, path: Path) -> dict[str, np.ndarray]:
        assert path.read_bytes()[:19] == b"MATLAB 7.3 MAT-file"
        return read_v73(path)

    def expected(self, value: np.ndarray) -> np.ndarray:
        return value[..., np.newaxis]  # one step along a new trailing MATLAB dimension
