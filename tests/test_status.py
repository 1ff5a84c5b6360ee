"""`matspool status` and `matspool ping` against a real daemon."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from matspool._spool import Spool

from conftest import start_daemon


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "matspoold", *args], capture_output=True, text=True, timeout=60
    )


def test_status_shows_queue_ring_use_files_and_errors(tmp_path: Path, out_dir: Path) -> None:
    d = start_daemon(out_dir, tmp_path / "sock", "--writers", "1", "--debug-write-delay", "1.0")
    try:
        with Spool(d.endpoint, ring_bytes=8 << 20) as spool:
            futures = [spool.save(out_dir / f"s{i}.mat", {"x": np.ones((256, 256))}) for i in range(4)]
            bad = spool.save(out_dir / "missing_dir" / "x.mat", {"x": 1.0})
            time.sleep(0.5)
            busy = json.loads(_cli("status", "--endpoint", d.endpoint, "--json").stdout)
            (me,) = [c for c in busy["clients"] if c["pid"] == spool_pid()]
            assert me["queue_depth"] >= 3
            assert me["ring_bytes_in_flight"] >= 3 * 256 * 256 * 8
            assert me["ring_bytes"] == 8 << 20
            assert me["oldest_pending_s"] > 0.3
            for f in futures:
                f.result(30)
            bad.exception(30)
            done = json.loads(_cli("status", "--endpoint", d.endpoint, "--json").stdout)
            (me,) = [c for c in done["clients"] if c["pid"] == spool_pid()]
            assert me["queue_depth"] == 0 and me["ring_bytes_in_flight"] == 0
            assert me["files_written"] == 4 and me["errors"] == 1
            assert me["bytes_written"] == sum(f.result().nbytes for f in futures)
            table = _cli("status", "--endpoint", d.endpoint)
            assert table.returncode == 0 and "4 files" in table.stdout and str(spool_pid()) in table.stdout
        assert _cli("ping", "--endpoint", d.endpoint).returncode == 0
    finally:
        d.stop()
    assert _cli("ping", "--endpoint", d.endpoint, "--timeout", "0.5").returncode == 1
    assert _cli("status", "--endpoint", d.endpoint, "--timeout", "0.5").returncode == 1


def spool_pid() -> int:
    import os

    return os.getpid()
