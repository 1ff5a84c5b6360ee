"""GNU Octave loads what matspool writes: class, size and every value bit for bit.

One Octave process per file: it loads the file and prints, per variable, a line
``VAR name|class|size|iscomplex|real-bytes|imag-bytes`` where the bytes are ``x(:)``
(column-major) as hex, so the comparison is exact whatever the type (NaN, -0.0,
uint64 max, ...). Octave 7 reads v5 completely, classes included; v7.3 only as plain
HDF5 (values and sizes, logical as uint8, empties as their size vector), which is
also how it reads MATLAB's own v7.3 files.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from readback import CLASS_DTYPES, REFERENCE_V73, assert_exact

OCTAVE = shutil.which("octave")
pytestmark = pytest.mark.skipif(OCTAVE is None, reason="GNU Octave is not installed (no `octave` on PATH)")

_SCRIPT = r"""
wanted = strsplit(getenv('MATSPOOL_VARS'), ',');
wanted = wanted(~cellfun(@isempty, wanted));
S = load(getenv('MATSPOOL_MAT'), wanted{:});
names = fieldnames(S);
for i = 1:numel(names)
  n = names{i};
  x = S.(n);
  if islogical(x)
    x = uint8(x);
  end
  r = real(x);
  im = [];
  if iscomplex(x)
    im = imag(x);
  end
  printf('VAR %s|%s|%s|%d|%s|%s\n', n, class(S.(n)), sprintf('%d,', size(x)), iscomplex(x), ...
         sprintf('%02x', typecast(r(:)', 'uint8')), sprintf('%02x', typecast(im(:)', 'uint8')));
end
printf('END %d\n', numel(names));
"""


def octave_load(
    path: Path, names: tuple[str, ...] = ()
) -> dict[str, tuple[str, tuple[int, ...], np.ndarray]]:
    """name -> (Octave class, size, values as numpy in MATLAB index order); all variables
    of the file, or only ``names``."""
    proc = subprocess.run(
        [OCTAVE, "--no-gui", "--no-window-system", "--norc", "-q", "--eval", _SCRIPT],
        env={**os.environ, "MATSPOOL_MAT": str(path), "MATSPOOL_VARS": ",".join(names)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"octave failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    lines = proc.stdout.splitlines()
    ends = [ln for ln in lines if ln.startswith("END ")]
    assert ends, f"octave did not finish:\n{proc.stdout}\n{proc.stderr}"
    out: dict[str, tuple[str, tuple[int, ...], np.ndarray]] = {}
    for ln in lines:
        if not ln.startswith("VAR "):
            continue
        name, cls, size, cplx, re_hex, im_hex = ln[4:].split("|")
        dims = tuple(int(d) for d in size.rstrip(",").split(","))
        # a logical's bytes as octave prints them: 0 or 1, one byte each
        dt = np.dtype(np.uint8 if cls == "logical" else CLASS_DTYPES.get(cls, np.uint8))
        values = np.frombuffer(bytes.fromhex(re_hex), dtype=dt).reshape(dims, order="F")
        if cplx == "1":
            imag = np.frombuffer(bytes.fromhex(im_hex), dtype=dt).reshape(dims, order="F")
            values = values.astype(np.complex64 if dt == np.float32 else np.complex128)
            values.imag = imag
        out[name] = (cls, dims, values)
    assert len(out) == int(ends[0].split()[1])
    return out


def _variables() -> tuple[dict[str, Any], dict[str, tuple[str, np.ndarray]]]:
    """Inputs and, per name, (Octave class, expected array in MATLAB index order)."""
    inputs: dict[str, Any] = {}
    expected: dict[str, tuple[str, np.ndarray]] = {}

    d = np.array([[0.1, np.nan, -0.0], [np.inf, -np.inf, 5e-324]])
    inputs["d"], expected["d"] = d, ("double", d)
    s = torch.tensor([[1.5, -2.25], [3.4028235e38, 1e-45], [float("nan"), 0.1]], dtype=torch.float32)
    inputs["s"], expected["s"] = s, ("single", s.numpy())
    h = torch.tensor([1.0, 65504.0, -0.5], dtype=torch.float16)  # widened to single
    inputs["h"], expected["h"] = h, ("single", np.array([[1.0, 65504.0, -0.5]], np.float32))
    for t in ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"):
        info = np.iinfo(t)
        a = np.array([[info.min, info.max, 0], [1, info.max - 1, 7]], dtype=t)
        inputs[f"i_{t}"] = a if t.startswith("u") else torch.from_numpy(a.copy())
        expected[f"i_{t}"] = (t, a)
    lg = np.array([[True, False, True], [False, False, True]])
    inputs["lg"], expected["lg"] = lg, ("logical", lg.astype(np.uint8))
    zc = np.array([[1 + 2j, -3.5 - 0.25j], [0.1j, np.inf - 1j]])
    inputs["zc"], expected["zc"] = zc, ("double", zc)
    zs = torch.tensor([1 - 1j, 2.5 + 0.5j], dtype=torch.complex64)
    inputs["zs"], expected["zs"] = zs, ("single", zs.numpy().reshape(1, 2))
    cube = np.arange(24, dtype=np.float64).reshape(2, 3, 4) * 0.5 - 3
    inputs["cube"], expected["cube"] = cube, ("double", cube)
    inputs["empty"], expected["empty"] = np.zeros((0, 3)), ("double", np.zeros((0, 3)))
    inputs["empty3"] = torch.zeros((2, 0, 4), dtype=torch.int16)
    expected["empty3"] = ("int16", np.zeros((2, 0, 4), np.int16))
    inputs["scalar"], expected["scalar"] = 42.5, ("double", np.array([[42.5]]))
    inputs["count"], expected["count"] = 7, ("int64", np.array([[7]], np.int64))
    inputs["flag"], expected["flag"] = True, ("logical", np.array([[1]], np.uint8))
    row = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)
    inputs["row"], expected["row"] = row, ("double", row.numpy().reshape(1, 5))
    return inputs, expected


def test_octave_loads_v5(spool, out_dir) -> None:
    inputs, expected = _variables()
    path = out_dir / "octave_v5.mat"
    assert spool.save(path, inputs, format="v5").result(timeout=60).format == "v5"
    seen = octave_load(path)
    assert sorted(seen) == sorted(expected)
    for name, (cls, e) in expected.items():
        got_cls, dims, values = seen[name]
        assert got_cls == cls, (name, got_cls, cls)
        assert dims == e.shape, (name, dims, e.shape)
        assert_exact(values, e, name)


def test_octave_loads_v5_layouts(spool, out_dir) -> None:
    """A(h,w,c) == x[c,h,w] for hwc and A(k,j,i) == x[i,j,k] for raw, as Octave indexes them."""
    x = torch.arange(2 * 3 * 4, dtype=torch.int32).reshape(2, 3, 4)  # C=2, H=3, W=4
    p_hwc, p_raw = out_dir / "hwc.mat", out_dir / "raw.mat"
    f1 = spool.save(p_hwc, {"x": x}, format="v5", layout="hwc")
    f2 = spool.save(
        p_raw,
        {"x": x, "col": torch.arange(3, dtype=torch.float64)},
        format="v5",
        layout="raw",
        oned_as="column",
    )
    f1.result(timeout=60), f2.result(timeout=60)
    xn = x.numpy()
    hwc = np.empty((3, 4, 2), np.int32)
    raw = np.empty((4, 3, 2), np.int32)
    for c, h, w in np.ndindex(*xn.shape):
        hwc[h, w, c] = xn[c, h, w]
        raw[w, h, c] = xn[c, h, w]
    cls, dims, values = octave_load(p_hwc)["x"]
    assert (cls, dims) == ("int32", (3, 4, 2))
    assert_exact(values, hwc, "hwc")
    seen = octave_load(p_raw)
    assert (seen["x"][0], seen["x"][1]) == ("int32", (4, 3, 2))
    assert_exact(seen["x"][2], raw, "raw")
    assert seen["col"][:2] == ("double", (3, 1))
    assert_exact(seen["col"][2], np.array([[0.0], [1.0], [2.0]]), "col")


def test_octave_reads_v73_values_and_sizes(spool, out_dir) -> None:
    """Octave reads v7.3 as plain HDF5: sizes and values of non-empty variables, with
    logical arriving as uint8 and single widened to double; it does exactly that to
    MATLAB's own v7.3 file too."""
    ref = octave_load(REFERENCE_V73, ("single_array", "logical_array", "int16_array", "numeric_empty"))
    assert ref["single_array"][0] == "double" and ref["logical_array"][0] == "uint8"
    assert ref["int16_array"][0] == "int16" and ref["numeric_empty"][0] == "uint64"
    inputs, expected = _variables()
    path = out_dir / "octave_v73.mat"
    assert spool.save(path, inputs, format="v7.3").result(timeout=60).format == "v7.3"
    seen = octave_load(path)
    assert sorted(seen) == sorted(expected)
    for name, (cls, e) in expected.items():
        got_cls, dims, values = seen[name]
        if e.size == 0:
            # an empty is stored as its MATLAB size (uint64, MATLAB_empty = 1); Octave shows that
            assert got_cls == "uint64", (name, got_cls)
            assert values.ravel().tolist() == list(e.shape), (name, values)
            continue
        octave_cls = {"logical": "uint8", "single": "double"}.get(cls, cls)
        assert got_cls == octave_cls, (name, got_cls, octave_cls)
        assert dims == e.shape, (name, dims, e.shape)
        if cls == "single":  # widening float32 -> float64 is exact, NaN and -0.0 included
            e = e.astype(np.complex128 if e.dtype.kind == "c" else np.float64)
        assert_exact(values, e, name)
