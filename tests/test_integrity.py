"""The client's promise under ring pressure, stopped processes and unobserved failures.

Every case runs real daemon processes (and real signals where it says so) and compares
each file on disk, byte for byte as loaded, with what was saved under its name.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.io

import matspool
from matspool import Spool
from matspool._ring import RING_PREFIX, SHM_DIR

from conftest import DaemonProc, start_daemon


def _same(path: Path, name: str, expected: np.ndarray) -> None:
    got = scipy.io.loadmat(path)[name]
    assert got.dtype == expected.dtype and got.shape == expected.shape, path
    assert got.tobytes() == expected.tobytes(), f"{path} holds other bytes than were saved"


def test_a_failed_save_in_slabs_frees_its_ring_space(daemon: DaemonProc, out_dir: Path) -> None:
    """Issue 16 item 1: a 32 MiB save through an 8 MiB ring into a missing directory."""
    with Spool(daemon.endpoint, ring_bytes=8 << 20, timeout=10) as s:
        for round in range(3):
            big = np.random.default_rng(round).standard_normal((1024, 4096))  # 32 MiB: in slabs
            fut = s.save(out_dir / "missing" / "big.mat", {"x": big})
            with pytest.raises(matspool.WriteFailed, match="does not exist"):
                fut.result(60)
            for i in range(4):
                v = np.random.default_rng(10 * round + i).standard_normal((512, 512))  # 2 MiB
                s.save(out_dir / f"s{round}{i}.mat", {"v": v}).result(60)
                _same(out_dir / f"s{round}{i}.mat", "v", v)
        assert s.pending == 0 and s._ring.used == 0
    assert not (out_dir / "missing").exists()


def _files_match(out_dir: Path, saved: dict[str, np.ndarray]) -> int:
    """Every .mat file under ``out_dir`` holds exactly what was saved under its name."""
    n = 0
    for path in sorted(out_dir.glob("*.mat")):
        assert path.name in saved, f"{path.name} was never saved"
        _same(path, "v", saved[path.name])
        n += 1
    return n


def test_a_stopped_daemon_never_has_its_regions_reused(tmp_path: Path, out_dir: Path) -> None:
    """Break 2: SIGSTOP the daemon with saves in flight for longer than the client's
    timeout, keep saving, SIGCONT. Failed futures say the outcome is unknown; no file
    may hold another save's bytes."""
    d = start_daemon(out_dir, tmp_path / "sock")
    saved: dict[str, np.ndarray] = {}
    futures = []
    rng = np.random.default_rng(7)
    spool = Spool(d.endpoint, ring_bytes=1 << 20, timeout=1.5, heartbeat=0.2)
    try:
        k = 0
        for stop_after in (0, 2, 5):  # saves made before each stop
            for _ in range(stop_after):
                name = f"f{k}.mat"
                saved[name] = rng.standard_normal((128, 128))  # 128 KiB
                futures.append(spool.save(out_dir / name, {"v": saved[name]}))
                k += 1
            os.kill(d.proc.pid, signal.SIGSTOP)
            try:
                deadline = time.monotonic() + 5  # past the client's timeout
                while time.monotonic() < deadline:
                    name = f"f{k}.mat"
                    value = rng.standard_normal((128, 128))
                    try:
                        futures.append(spool.save(out_dir / name, {"v": value}))
                    except matspool.SpoolFull:
                        continue  # backpressure: the ring is held by the stopped daemon
                    saved[name] = value
                    k += 1
            finally:
                os.kill(d.proc.pid, signal.SIGCONT)
            for f in futures:
                f.exception(60)
        unknown = [f.exception() for f in futures if f.exception() is not None]
        assert unknown, "no save outlived the client's timeout: the test provoked nothing"
        after = rng.standard_normal((64, 64))
        saved["after.mat"] = after
        spool.save(out_dir / "after.mat", {"v": after}).result(60)
        time.sleep(1)  # answers for the failed saves may still be on their way
    finally:
        try:
            spool.close(10)
        finally:
            d.stop()
    assert _files_match(out_dir, saved) >= len(saved) - len(unknown)
    for e in unknown:
        assert isinstance(e, matspool.DaemonUnavailable) and "outcome" in str(e), e


_UNOBSERVED = """
import sys
import matspool
spool = matspool.Spool(sys.argv[1], ring_bytes=1 << 20, timeout=30)
spool.save(sys.argv[2], {"a": 1.0})            # fails in the daemon; nobody looks
spool.save(sys.argv[3], {"a": 2.0}).result(30)  # succeeds
ok = spool.save(sys.argv[4], {"a": 3.0})
try:
    ok.result(30)
except matspool.WriteFailed:
    pass                                         # failed, and looked at
if sys.argv[5] == "close":
    try:
        spool.close()
    except matspool.FlushError as e:
        print("RAISED", type(e.errors[0]).__name__, e.errors[0].path, e.errors[0].errno)
        print(e)
"""


@pytest.mark.parametrize("how", ["close", "exit"])
def test_failures_nobody_looked_at_are_reported(
    daemon: DaemonProc, out_dir: Path, tmp_path: Path, how: str
) -> None:
    """Break 7: a failed save whose future nobody inspects, then close() or a normal exit."""
    script = tmp_path / "unobserved.py"
    script.write_text(_UNOBSERVED)
    lost, good, seen = out_dir / "no" / "lost.mat", out_dir / "good.mat", out_dir / "no" / "seen.mat"
    proc = subprocess.run(
        [sys.executable, str(script), daemon.endpoint, str(lost), str(good), str(seen), how],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert good.exists()
    if how == "close":
        assert proc.stdout.startswith(f"RAISED WriteFailed {lost} "), proc.stdout + proc.stderr
        report = proc.stdout
    else:
        report = proc.stderr
        assert report.count("matspool") == 1 and "at exit" in report, report
    assert str(lost) in report and "does not exist" in report, report
    assert str(seen) not in report and str(good) not in report, report


_STOPPED_CLIENT = """
import os, signal, sys
import numpy as np
import matspool
out = sys.argv[2]
spool = matspool.Spool(sys.argv[1], ring_bytes=4 << 20, timeout=60, heartbeat=0.2)
value = lambda seed: np.random.default_rng(seed).standard_normal((128, 128))
futures = [spool.save(f"{out}/a{i}.mat", {"v": value(i)}) for i in range(10)]
os.kill(os.getpid(), signal.SIGSTOP)  # with saves in flight; the test continues us
futures += [spool.save(f"{out}/b{i}.mat", {"v": value(100 + i)}) for i in range(10)]
spool.flush(60)
spool.close()
print("OK")
"""


def _stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "T"


def test_a_client_stopped_past_the_daemons_timeout_carries_on(tmp_path: Path, out_dir: Path) -> None:
    """Break 3, client side: the daemon (silence decides, --no-clean-stale) drops the
    stopped client and unlinks its ring; continued, the client registers again in a new
    ring and every save lands."""
    d = start_daemon(
        out_dir, tmp_path / "sock", "--no-clean-stale", "--client-timeout", "2", "--debug-write-delay", "0.1"
    )
    script = tmp_path / "stopped.py"
    script.write_text(_STOPPED_CLIENT)
    try:
        proc = subprocess.Popen(
            [sys.executable, str(script), d.endpoint, str(out_dir)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            while not _stopped(proc.pid):
                assert proc.poll() is None, proc.communicate()
                time.sleep(0.05)
            time.sleep(5)  # past --client-timeout
            rings = [n for n in os.listdir(SHM_DIR) if n.startswith(f"{RING_PREFIX}{proc.pid}-")]
            assert not rings, "the daemon kept the stopped client's ring: nothing was provoked"
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        out, err = proc.communicate(timeout=120)
    finally:
        d.stop()
    assert proc.returncode == 0 and out.strip() == "OK", out + err
    for i in range(10):
        for name, seed in ((f"a{i}.mat", i), (f"b{i}.mat", 100 + i)):
            _same(out_dir / name, "v", np.random.default_rng(seed).standard_normal((128, 128)))
