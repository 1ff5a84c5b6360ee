"""The client's promise under ring pressure, stopped processes and unobserved failures.

Every case runs real daemon processes (and real signals where it says so) and compares
each file on disk, byte for byte as loaded, with what was saved under its name.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.io

import matspool
from matspool import Spool

from conftest import DaemonProc


def _same(path: Path, name: str, expected: np.ndarray) -> None:
    got = scipy.io.loadmat(path)[name]
    assert got.dtype == expected.dtype and got.shape == expected.shape, path
    assert got.tobytes() == expected.tobytes(), f"{path} holds other bytes than were saved"


def test_a_failed_save_in_slabs_frees_its_ring_space(daemon: DaemonProc, out_dir: Path) -> None:
    """Issue 16 item 1: a 32 MiB save through an 8 MiB ring into a missing directory."""
    with Spool(daemon.endpoint, ring_bytes=8 << 20, timeout=20) as s:
        big = np.random.default_rng(1).standard_normal((1024, 4096))  # 32 MiB: in slabs
        fut = s.save(out_dir / "missing" / "big.mat", {"x": big})
        with pytest.raises(matspool.MatspoolError):
            fut.result(60)
        for i in range(6):
            v = np.random.default_rng(i).standard_normal((512, 512))  # 2 MiB each
            s.save(out_dir / f"s{i}.mat", {"v": v}).result(60)
            _same(out_dir / f"s{i}.mat", "v", v)
        s.flush(60)
        assert s._ring.used == 0
    assert not (out_dir / "missing").exists()
