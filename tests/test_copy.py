"""The one host copy into the ring: column-major bytes, whichever path does the reorder."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from matspool._convert import copy_host, prepare

CASES = [
    ("c2d", lambda: np.arange(600 * 513, dtype=np.float32).reshape(600, 513)),
    ("f2d", lambda: np.asfortranarray(np.arange(300 * 257, dtype=np.int16).reshape(300, 257))),
    ("strided", lambda: np.arange(1000 * 700, dtype=np.float64).reshape(1000, 700)[::3, 5::2]),
    ("negative", lambda: np.arange(400 * 300, dtype=np.int32).reshape(400, 300)[::-1, ::-2]),
    ("3d", lambda: np.arange(30 * 40 * 50, dtype=np.complex64).reshape(30, 40, 50)),
    ("half", lambda: np.linspace(-3, 3, 500 * 300).astype(np.float16).reshape(500, 300)),
    ("bool", lambda: (np.arange(333 * 444) % 3 == 0).reshape(333, 444)),
    ("bigendian", lambda: np.arange(200 * 300, dtype=">f8").reshape(200, 300)),
    ("uint64", lambda: np.arange(100 * 90, dtype=np.uint64).reshape(100, 90)),
]


@pytest.mark.parametrize("with_torch", [True, False], ids=["torch-loaded", "numpy-only"])
@pytest.mark.parametrize(("make"), [m for _, m in CASES], ids=[i for i, _ in CASES])
def test_copy_host_is_column_major(make, with_torch: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if with_torch:
        pytest.importorskip("torch")
    else:
        monkeypatch.delitem(sys.modules, "torch", raising=False)
    x = make()
    for layout in ("matlab", "raw"):
        p = prepare("x", x, layout, "row")
        ring = np.full(p.nbytes + 128, 0xAB, dtype=np.uint8)
        copy_host(p, ring, 64)
        expected = np.asfortranarray(np.asarray(p.array).astype(np.dtype(p.dtype)))
        assert ring[64 : 64 + p.nbytes].tobytes() == expected.tobytes(order="F"), layout
        assert (ring[:64] == 0xAB).all() and (ring[64 + p.nbytes :] == 0xAB).all(), "wrote outside"
