"""A departed client's ring mapping is taken down off the control thread, and taken down.

``ringio.unmap_later`` closes large mappings on a thread of its own (a populated 256 MiB
ring took the control thread 26 ms and more to unmap; ``python -m bench.departure``
measures the PING round trips around a BYE). These check that the mapping really goes:
for a large ring (the thread) and a small one (closed at once), a real daemon's
``/proc/<pid>/maps`` no longer lists the client's memfd after its BYE, and the daemon
goes on serving.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

import matspool
from matspoold.ringio import UNMAP_LATER_BYTES

from conftest import DaemonProc


def _maps_ring(pid: int, name: str) -> bool:
    with open(f"/proc/{pid}/maps") as f:
        return any(name in line for line in f)


@pytest.mark.parametrize("ring_bytes", [UNMAP_LATER_BYTES * 2, 1 << 20])
def test_a_departed_clients_ring_is_unmapped(daemon: DaemonProc, out_dir: Path, ring_bytes: int) -> None:
    arr = np.arange(ring_bytes // 16, dtype=np.float64)
    s = matspool.Spool(daemon.endpoint, ring_bytes=ring_bytes, timeout=30)
    try:
        s.save(out_dir / "x.mat", {"x": arr}, format="v7.3").result()
        ring = s._ring
        assert ring is not None
        name = ring.name
        assert _maps_ring(daemon.proc.pid, name)  # the daemon read the save from its mapping
    finally:
        s.close()
    deadline = time.monotonic() + 10
    while _maps_ring(daemon.proc.pid, name):
        assert time.monotonic() < deadline, f"the daemon still maps {name} 10 s after its client left"
        time.sleep(0.02)
    with matspool.Spool(daemon.endpoint, ring_bytes=1 << 20, timeout=30) as again:
        again.save(out_dir / "y.mat", {"y": arr[:8]}).result()
    assert daemon.alive() and os.path.getsize(out_dir / "y.mat") > 0
