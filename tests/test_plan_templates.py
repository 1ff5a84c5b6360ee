"""Plan templates: a plain save of ndarrays reuses the layout checked for an earlier save
with the same names, dtypes, shapes and strides. A reused template must give the very
plan the full checks give, and must never let through a save the checks refuse.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import matspool
from matspool import _planner
from matspool._errors import InvalidVariableError, MatspoolError

from readback import assert_variables, read

RING = 64 << 20


def _plain(path: str, variables: dict[str, np.ndarray], **kw: object) -> _planner.Plan:
    args: dict[str, object] = dict(
        fmt="auto", layout="matlab", oned_as="row", fsync=False, compress=0, mode="write", ring_size=RING
    )
    args.update(kw)
    return _planner.plan(path, variables, **args)  # type: ignore[arg-type]


def _full(path: str, variables: dict[str, np.ndarray], **kw: object) -> _planner.Plan:
    args: dict[str, object] = dict(
        fmt="auto",
        layout="matlab",
        oned_as="row",
        fsync=False,
        compress=0,
        mode="write",
        ring_size=RING,
        append=False,
        int_as="int64",
    )
    args.update(kw)
    return _planner._plan(path, variables, **args)  # type: ignore[arg-type]


CASES = {
    "c-order": lambda: {"x": np.arange(12, dtype=np.float32).reshape(3, 4)},
    "f-order": lambda: {"x": np.asfortranarray(np.arange(12.0).reshape(3, 4))},
    "strided": lambda: {"x": np.arange(48, dtype=np.int16).reshape(6, 8)[::2, ::2]},
    "1-d": lambda: {"v": np.arange(5, dtype=np.uint8)},
    "0-d": lambda: {"s": np.array(2.5)},
    "several": lambda: {
        "a": np.ones((2, 3), dtype=np.complex64),
        "b": np.zeros((0, 4)),
        "c": np.array([[True, False]]),
    },
    "big for v5": lambda: {"x": np.zeros((3, 4, 5), dtype=np.float64)},
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize(("layout", "oned_as"), [("matlab", "row"), ("raw", "column")])
def test_template_plan_equals_the_checked_plan(case: str, layout: str, oned_as: str) -> None:
    _planner._TEMPLATES.clear()
    first = CASES[case]()
    _plain("/tmp/a.mat", first, layout=layout, oned_as=oned_as)  # makes the template
    again = CASES[case]()
    reused = _plain("/tmp/b.mat", again, layout=layout, oned_as=oned_as)
    assert _planner._TEMPLATES, "a plain save of ndarrays keeps a template"
    checked = _full("/tmp/b.mat", again, layout=layout, oned_as=oned_as)
    assert (reused.path, reused.format, reused.total) == (checked.path, checked.format, checked.total)
    assert reused.specs(4096) == checked.specs(4096)
    for r, c in zip(reused.arrays, checked.arrays, strict=True):
        assert (r.name, r.dtype, r.dims) == (c.name, c.dtype, c.dims)
        assert np.array_equal(np.asarray(r.array), np.asarray(c.array))
        assert r.array.strides == c.array.strides


def test_a_template_skips_none_of_the_checks() -> None:
    _planner._TEMPLATES.clear()
    a = np.ones((4, 4), dtype=np.float32)
    _plain("/tmp/ok.mat", {"x": a})
    assert len(_planner._TEMPLATES) == 1
    with pytest.raises(TypeError, match="fsync must be a bool"):
        _plain("/tmp/ok.mat", {"x": a}, fsync=1)  # 1 == True: equal keys must not let it by
    with pytest.raises(ValueError, match="NUL"):
        _plain("/tmp/bad\x00.mat", {"x": a})
    with pytest.raises(TypeError, match="path must be a str"):
        _plain(5, {"x": a})  # type: ignore[arg-type]
    with pytest.raises(MatspoolError, match="layout"):
        _plain("/tmp/ok.mat", {"x": a}, layout="nope")
    # a refused save leaves no template behind for a later one to reuse
    with pytest.raises(InvalidVariableError):
        _plain("/tmp/ok.mat", {"1x": a})
    with pytest.raises(InvalidVariableError):
        _plain("/tmp/ok.mat", {"1x": a})
    # not plain ndarrays (a subclass, a tensor-like, a Mapping that is not a dict, records,
    # text): the general path, no template
    _planner._TEMPLATES.clear()
    _plain("/tmp/ok.mat", {"x": np.ma.masked_array(a)})
    _plain("/tmp/ok.mat", {"t": np.array(["ab", "cd"])})
    _plain("/tmp/ok.mat", {"r": np.zeros(2, dtype=[("f", "f8")])})
    assert not _planner._TEMPLATES


def test_the_template_cache_stays_bounded() -> None:
    _planner._TEMPLATES.clear()
    for n in range(1, _planner._MAX_TEMPLATES + 20):
        _plain("/tmp/a.mat", {"x": np.zeros((1, n), dtype=np.float32)})
    assert 0 < len(_planner._TEMPLATES) <= _planner._MAX_TEMPLATES


@pytest.mark.parametrize("fmt", ["v5", "v7.3"])
def test_a_loop_through_templates_writes_every_file_exactly(
    mspool: matspool.Spool, root: Path, fmt: str
) -> None:
    """Same names and shapes every step, but the data, the memory order and the strides
    change under them: each file holds exactly its step's values."""
    rng = np.random.default_rng(3)
    sent = []
    for step in range(30):
        base = rng.standard_normal((8, 12)).astype(np.float32)
        x = (base, np.asfortranarray(base), base[::1, ::1].copy())[step % 3]
        v = np.arange(step, step + 5, dtype=np.int32).reshape(1, 5)
        values = {"x": x, "v": v, "w": rng.standard_normal((16, 24))[::2, ::2]}
        sent.append({k: np.array(val, copy=True) for k, val in values.items()})
        mspool.save(root / f"t{step:02d}.mat", values, format=fmt)
    mspool.flush()
    for step, values in enumerate(sent):
        assert_variables(read(root / f"t{step:02d}.mat", fmt), values, f"step {step}")


def test_v5_small_file_frames_write_what_the_general_path_writes(tmp_path: Path) -> None:
    """The daemon's v5 small-file templates (tags reused per name, type and size): the same
    bytes as the elements built from scratch, for every kind of plain array."""
    from matspool._protocol import VarSpec
    from matspoold.writers import v5

    rng = np.random.default_rng(5)
    arrays = {
        "f4": rng.standard_normal((3, 4)).astype(np.float32),
        "f8": rng.standard_normal((5, 1)),
        "b": rng.random((2, 3)) > 0.5,
        "i8": rng.integers(-9, 9, (4, 4), dtype=np.int8),
        "u2": rng.integers(0, 9, (1, 7), dtype=np.uint16),
        "c16": rng.standard_normal((2, 2)) + 1j,
        "e": np.zeros((0, 3)),
        "big_name_" + "x" * 50: np.arange(6, dtype=np.int64).reshape(2, 3),
    }
    variables = []
    for name, a in arrays.items():
        f = np.asfortranarray(a)
        dtype = "|b1" if a.dtype.kind == "b" else a.dtype.str
        variables.append((VarSpec(name, dtype, a.shape, 0, a.nbytes), f))
    v5._FRAMES.clear()
    v5.write_v5(str(tmp_path / "first.mat"), variables)  # the small path: makes the frames
    assert len(v5._FRAMES) == 6  # not the complex one, not the empty one
    for step in range(3):  # new values under the same names, types and sizes
        for _, f in variables:
            f[...] = np.asfortranarray(rng.standard_normal(f.shape)).astype(f.dtype)
        v5.write_v5(str(tmp_path / f"again{step}.mat"), variables)
        expected = b"".join(b for spec, f in variables for b in v5._element(spec, f, v5._CHUNK))
        got = (tmp_path / f"again{step}.mat").read_bytes()
        assert got[:20] == b"MATLAB 5.0 MAT-file " and got[124:128] == b"\x00\x01IM"
        assert got[128:] == expected  # the header's text says when: compared apart
    # the same values in any other layout (row-major, strided): copied in column order
    for make in (np.ascontiguousarray, lambda f: np.repeat(f, 2, axis=0)[::2]):
        v5.write_v5(str(tmp_path / "other.mat"), [(spec, make(f)) for spec, f in variables])
        assert (tmp_path / "other.mat").read_bytes()[128:] == expected
