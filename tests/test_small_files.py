"""Small files: the fast paths the daemon takes for them write exactly what the slow ones do.

v7.3 files up to ``TEMPLATE_MAX_BYTES`` reuse the layout h5py made for the same variables
(names, types, sizes) and only splice in the payloads and the header; v5 files leave in
one buffered write. A time-step loop saving the same variables is the case they serve,
so the tests run such loops with changing values and read every file back.
"""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import h5py
import mat73
import numpy as np
import pytest

import matspool
from matspool._protocol import Char, Struct, TreeSpec, VarSpec
from matspoold.writers import v73
from matspoold.writers._values import materialize

from readback import assert_variables, read, read_v73


def _step_values(rng: np.random.Generator, step: int) -> dict[str, np.ndarray]:
    return {
        "u": rng.standard_normal((16, 24)).astype(np.float32),
        "flags": rng.random((3, 5)) > 0.5,
        "z": rng.standard_normal((4, 1)) + 1j * rng.standard_normal((4, 1)),
        "empty": np.zeros((0, 3)),
        "n": np.array([[step]], dtype=np.int64),
        "i8": rng.integers(-128, 127, (2, 2), dtype=np.int8),
    }


@pytest.mark.parametrize("fmt", ["v5", "v7.3"])
def test_time_step_loop_files_are_exact(mspool: matspool.Spool, root: Path, fmt: str) -> None:
    rng = np.random.default_rng(11)
    sent = []
    for step in range(40):
        values = _step_values(rng, step)
        sent.append(values)
        mspool.save(root / f"step{step:03d}.mat", values, format=fmt)
    mspool.flush()
    for step, values in enumerate(sent):
        assert_variables(read(root / f"step{step:03d}.mat", fmt), values, f"step {step}")
    if fmt == "v7.3":
        last = mat73.loadmat(str(root / "step039.mat"))
        assert np.array_equal(last["u"], sent[-1]["u"])
        assert last["n"] == 39


def test_same_names_new_sizes_get_their_own_layout(mspool: matspool.Spool, root: Path) -> None:
    shapes = [(3, 3), (4, 4), (3, 3), (1, 9), (9, 1), (3, 3)]
    for i, shape in enumerate(shapes):
        mspool.save(root / f"s{i}.mat", {"x": np.full(shape, i, dtype=np.float64)}, format="v7.3")
    mspool.flush()
    for i, shape in enumerate(shapes):
        with h5py.File(root / f"s{i}.mat", "r") as f:
            assert f["x"].shape == shape[::-1]
            assert np.array_equal(f["x"][()].T, np.full(shape, i, dtype=np.float64))


def _vars(rng: np.random.Generator) -> list[tuple[VarSpec, np.ndarray]]:
    arrays = {
        "a": np.asfortranarray(rng.standard_normal((5, 7))),
        "b": np.asfortranarray(rng.random((2, 3, 4)) > 0.5),
        "c": np.asfortranarray(
            (rng.standard_normal((3, 1)) + 1j * rng.standard_normal((3, 1))).astype(np.complex64)
        ),
        "d": np.zeros((0, 4), dtype=np.float32, order="F"),
        "e": np.asfortranarray(rng.integers(0, 2**16, (6, 1), dtype=np.uint16)),
    }
    return [(VarSpec(k, v.dtype.str, v.shape, 0, v.nbytes), v) for k, v in arrays.items()]


def _write(path: Path, variables: list, level: int = 0) -> bytes:
    with mock.patch.object(v73, "header", lambda now=None: b"H" * 128):
        v73.write_v73(str(path), variables, level)
    return path.read_bytes()


def test_template_write_is_byte_identical_to_h5py(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    v73.TEMPLATES._items.clear()
    _write(tmp_path / "first.mat", _vars(rng))  # made by h5py; its layout is kept
    assert len(v73.TEMPLATES._items) == 1
    variables = _vars(rng)  # same layout, new values
    from_template = _write(tmp_path / "second.mat", variables)
    v73.TEMPLATES._items.clear()
    from_h5py = _write(tmp_path / "fresh.mat", variables)
    assert from_template == from_h5py
    got = read_v73(tmp_path / "second.mat")
    for spec, arr in variables:
        assert np.array_equal(got[spec.name], arr), spec.name


def test_what_is_not_templated(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    big = np.asfortranarray(rng.standard_normal((v73.TEMPLATE_MAX_BYTES // 8 + 1, 1)))
    spec = TreeSpec("s", Struct((("t", Char("hi")),)))
    tree = (spec, materialize(spec.tree, lambda leaf: None))
    deflated = np.asfortranarray(rng.standard_normal((64, 64)))
    small = np.asfortranarray(rng.standard_normal((4, 4)))
    cases = {
        "too big": ([(VarSpec("x", "<f8", big.shape, 0, big.nbytes), big)], 0),
        "struct": ([tree], 0),
        "deflated": ([(VarSpec("x", "<f8", deflated.shape, 0, deflated.nbytes), deflated)], 6),
    }
    for label, (variables, level) in cases.items():
        v73.TEMPLATES._items.clear()
        _write(tmp_path / f"{label}.mat", variables, level)
        assert not v73.TEMPLATES._items, label
    # compression asked for, but every variable is below MATLAB's 1 KiB threshold: contiguous
    v73.TEMPLATES._items.clear()
    _write(tmp_path / "small-deflate.mat", [(VarSpec("x", "<f8", small.shape, 0, small.nbytes), small)], 6)
    assert len(v73.TEMPLATES._items) == 1


def test_small_and_large_saves_to_one_path_keep_their_order(mspool: matspool.Spool, root: Path) -> None:
    """A tiny file is written on the daemon's control thread, a large one by a writer
    thread; saves to one path still land in the order they were made (the last one wins),
    also while a large save to that path is still being written."""
    big = np.arange(256 * 256, dtype=np.float64).reshape(256, 256)  # 512 KiB: a writer's
    path = root / "order.mat"
    expected: dict[str, np.ndarray] = {}
    for i in range(12):
        expected = {"x": big + i} if i % 3 == 0 else {"x": np.full((4, 4), float(i))}
        mspool.save(path, expected, format="v5" if i % 2 else "v7.3")
    for fmt in ("v5", "v7.3"):  # the same again, ending with a large and then a small save
        mspool.save(path, {"x": big}, format=fmt)
        mspool.save(path, {"x": np.eye(3)}, format=fmt)
        mspool.flush()
        assert_variables(read(path, fmt), {"x": np.eye(3)}, fmt)
    mspool.save(path, expected, format="v7.3")
    mspool.flush()
    assert_variables(read(path, "v7.3"), expected, "last")
