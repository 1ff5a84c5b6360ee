"""Faults provoked for real: killed daemons and clients, full disks, SIGTERM, other users.

Each test is bounded in time; none uses mocks. The promise under test: once save()
returned a future, the data lands exactly once as a complete file, or the future
fails with a clear reason.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.io

import matspool
from matspool._ring import RING_PREFIX, SHM_DIR
from matspool._spool import Spool

from conftest import start_daemon, system_user, tmpfs


def _rings_of(pid: int) -> list[str]:
    return [n for n in os.listdir(SHM_DIR) if n.startswith(f"{RING_PREFIX}{pid}-")]


def _no_tmp_files(d: Path) -> bool:
    return not [p for p in d.rglob("*") if p.name.endswith(".matspool-tmp")]


def test_daemon_killed_and_restarted_resends_unacknowledged(tmp_path: Path, out_dir: Path) -> None:
    d = start_daemon(out_dir, tmp_path / "sock")
    with Spool(d.endpoint, ring_bytes=16 << 20, timeout=30) as spool:
        spool.save(out_dir / "before.mat", {"a": 1.0}).result(10)
        os.kill(d.proc.pid, signal.SIGSTOP)  # accepts nothing more: the saves stay unanswered
        futures = [spool.save(out_dir / f"f{i}.mat", {"a": np.full((64, 64), i, np.int32)}) for i in range(6)]
        time.sleep(0.3)
        os.kill(d.proc.pid, signal.SIGKILL)
        d.proc.wait()
        assert spool.pending == 6
        d2 = start_daemon(out_dir, tmp_path / "sock")
        try:
            spool.flush(30)
        finally:
            d2.stop()
    for i, f in enumerate(futures):
        assert f.result().path == str(out_dir / f"f{i}.mat")
        assert (scipy.io.loadmat(out_dir / f"f{i}.mat")["a"] == i).all()
    assert sorted(p.name for p in out_dir.iterdir()) == ["before.mat"] + [f"f{i}.mat" for i in range(6)]
    assert _no_tmp_files(out_dir)


def test_daemon_gone_for_good_fails_futures_and_flush(tmp_path: Path, out_dir: Path) -> None:
    d = start_daemon(out_dir, tmp_path / "sock")
    spool = Spool(d.endpoint, ring_bytes=4 << 20, timeout=2, heartbeat=0.2)
    try:
        os.kill(d.proc.pid, signal.SIGKILL)
        d.proc.wait()
        fut = spool.save(out_dir / "lost.mat", {"a": 1.0})
        t0 = time.monotonic()
        with pytest.raises(matspool.FlushError) as info:
            spool.flush(20)
        assert time.monotonic() - t0 < 15
        assert isinstance(info.value.errors[0], matspool.DaemonUnavailable)
        with pytest.raises(matspool.DaemonUnavailable, match="no word from the daemon"):
            fut.result(0)
        assert not (out_dir / "lost.mat").exists()
    finally:
        spool.close(timeout=1)


_CLIENT = textwrap.dedent("""
    import os, sys, time, numpy as np, matspool
    spool = matspool.Spool(sys.argv[1], ring_bytes=64 << 20)
    out = sys.argv[2]
    n = int(sys.argv[3])
    futs = [spool.save(os.path.join(out, f"c{i}.mat"), {"a": np.full((512, 512), i, np.float64)})
            for i in range(n)]
    # "signalled" = the daemon has every save (queued or written), not merely save() returned:
    # a save still in this process's send queue dies with it
    from matspool._messages import StatusQuery
    from matspoold.probe import ask
    while True:
        st = ask(sys.argv[1], StatusQuery(), 5)
        me = [c for c in st.clients if c.pid == os.getpid()]
        if me and me[0].queue_depth + me[0].files_written + me[0].errors == n:
            break
        time.sleep(0.01)
    print("SIGNALLED", flush=True)
    time.sleep(60)
""")


def test_client_killed_after_signalling_saves_is_written_and_ring_removed(
    tmp_path: Path, out_dir: Path
) -> None:
    d = start_daemon(out_dir, tmp_path / "sock")
    try:
        client = subprocess.Popen(
            [sys.executable, "-c", _CLIENT, d.endpoint, str(out_dir), "8"], stdout=subprocess.PIPE, text=True
        )
        assert client.stdout.readline().strip() == "SIGNALLED"
        client.kill()
        client.wait()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (
            _rings_of(client.pid) or len(list(out_dir.glob("c*.mat"))) < 8
        ):
            time.sleep(0.1)
        for i in range(8):
            assert (scipy.io.loadmat(out_dir / f"c{i}.mat")["a"] == i).all()
        assert _rings_of(client.pid) == [], "the dead client's ring is still in /dev/shm"
        assert _no_tmp_files(out_dir)
        assert d.alive()
    finally:
        d.stop()


def test_stale_rings_are_removed_at_daemon_start(tmp_path: Path, out_dir: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = Path(SHM_DIR) / f"{RING_PREFIX}{dead.pid}-deadbeef0000"
    stale.write_bytes(b"\0" * 4096)
    alive = Path(SHM_DIR) / f"{RING_PREFIX}{os.getpid()}-aliveaaaaaaa"
    alive.write_bytes(b"\0" * 4096)
    try:
        d = start_daemon(out_dir, tmp_path / "sock")
        d.stop()
        assert not stale.exists()
        assert alive.exists(), "a ring of a live process was removed"
    finally:
        for p in (stale, alive):
            p.unlink(missing_ok=True)


def test_sigterm_finishes_accepted_writes(tmp_path: Path, out_dir: Path) -> None:
    d = start_daemon(out_dir, tmp_path / "sock")
    spool = Spool(d.endpoint, ring_bytes=256 << 20, timeout=30)
    try:
        big = np.arange(8 << 20, dtype=np.float64).reshape(-1, 1024)  # 64 MiB each
        futures = [spool.save(out_dir / f"big{i}.mat", {"a": big}, format="v7.3") for i in range(3)]
        time.sleep(0.3)  # accepted by the daemon, still being written
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(60) == 0
        done = [f for f in futures if f.exception(30) is None]
        assert done, "SIGTERM dropped every accepted write"
        for f in done:
            import h5py

            with h5py.File(f.result().path) as h:
                assert h["a"].shape == (1024, 8192)
                assert h["a"][5, 7] == big[7, 5]
        for f in futures:  # anything not written failed loudly, and left no file
            if f.exception() is not None:
                assert isinstance(f.exception(), (matspool.WriteFailed, matspool.DaemonUnavailable))
        assert _no_tmp_files(out_dir)
    finally:
        spool.close(timeout=1)


def test_a_burst_of_sigterms_still_stops_the_daemon(tmp_path: Path, out_dir: Path) -> None:
    """Slurm signals a step's whole process tree and the per-job script's wrapper forwards the
    signal too, so the daemon gets SIGTERM twice within microseconds. A handler interrupted
    by the next one must not deadlock on its own lock (it did: the daemon hung for good,
    seen as a per-job Slurm test timing out)."""
    for attempt in range(3):
        d = start_daemon(out_dir, tmp_path / f"sock{attempt}")
        deadline = time.monotonic() + 5
        while d.proc.poll() is None and time.monotonic() < deadline:  # a signal every few us
            os.kill(d.proc.pid, signal.SIGTERM)
        try:
            assert d.proc.wait(20) == 0, "the daemon did not exit after a burst of SIGTERMs"
        except subprocess.TimeoutExpired:
            d.proc.kill()
            pytest.fail(f"attempt {attempt}: the daemon hung after a burst of SIGTERMs")


def test_process_exit_without_close_loses_nothing(out_dir: Path) -> None:
    script = textwrap.dedent("""
        import sys, numpy as np, matspool
        out = sys.argv[1]
        for i in range(20):
            matspool.save(f"{out}/e{i}.mat", {"a": np.full((256, 256), i, np.int16)})
        spool = matspool.Spool(ring_bytes=16 << 20)
        spool.save(f"{out}/own.mat", {"b": np.ones(3)}, format="v7.3")
        # no close(), no flush(): interpreter exit must still finish the saves
    """)
    env = {k: v for k, v in os.environ.items() if k != "MATSPOOL_ENDPOINT"}
    proc = subprocess.Popen([sys.executable, "-c", script, str(out_dir)], env=env)
    assert proc.wait(120) == 0
    for i in range(20):
        assert (scipy.io.loadmat(out_dir / f"e{i}.mat")["a"] == i).all()
    assert (out_dir / "own.mat").exists()
    assert _rings_of(proc.pid) == [], "the exiting process left its rings behind"
    assert _no_tmp_files(out_dir)


def test_full_disk_fails_the_future_names_the_path_and_daemon_goes_on(tmp_path: Path, out_dir: Path) -> None:
    small = out_dir / "small"
    with tmpfs(small, "2m"):
        d = start_daemon(out_dir, tmp_path / "sock")
        try:
            with Spool(d.endpoint, ring_bytes=16 << 20, timeout=30) as spool:
                big = np.ones((1024, 1024), np.float64)  # 8 MiB: cannot fit
                for fmt in ("v5", "v7.3"):
                    fut = spool.save(small / f"full_{fmt}.mat", {"a": big}, format=fmt)
                    with pytest.raises(matspool.WriteFailed) as info:
                        fut.result(30)
                    assert str(small / f"full_{fmt}.mat") in str(info.value)
                    assert "space" in str(info.value).lower()
                    assert not (small / f"full_{fmt}.mat").exists()
                assert list(small.iterdir()) == [], "a partial or temporary file was left behind"
                assert spool._ring.used == 0, "ring space of failed saves was not freed"
                spool.save(small / "fits.mat", {"a": np.ones(10)}).result(10)
                assert scipy.io.loadmat(small / "fits.mat")["a"].shape == (1, 10)
        finally:
            d.stop()


def test_read_only_filesystem_fails_with_the_path(tmp_path: Path, out_dir: Path, spool) -> None:
    ro = out_dir / "ro"
    with tmpfs(ro, "1m", "ro"):
        for fmt in ("v5", "v7.3"):
            with pytest.raises(matspool.WriteFailed, match=str(ro / "x.mat")):
                spool.save(ro / "x.mat", {"a": 1.0}, format=fmt).result(10)
        spool.save(out_dir / "after.mat", {"a": 2.0}).result(10)


def test_other_user_cannot_connect_or_map_a_ring(tmp_path: Path, out_dir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to create a second local user")
    entry = system_user("matspool-test")
    tmp_path.chmod(0o755)  # the socket's directory is reachable; the socket itself must not be
    d = start_daemon(out_dir, tmp_path / "sock")
    (tmp_path / "sock").chmod(0o755)
    try:
        with Spool(d.endpoint, ring_bytes=1 << 20) as spool:
            ring = spool._ring.path
            assert os.stat(ring).st_mode & 0o777 == 0o600
            assert os.stat(d.endpoint[6:]).st_mode & 0o777 == 0o600
            assert _as_user(entry.pw_uid, entry.pw_gid, lambda: _read(ring)) == "denied"
            assert _as_user(entry.pw_uid, entry.pw_gid, lambda: _connect(d.endpoint[6:])) == "denied"
            assert _as_user(os.getuid(), os.getgid(), lambda: _read(ring)) == "ok"  # the probe works
    finally:
        d.stop()


def _read(path: str) -> None:
    with open(path, "rb"):
        pass


def _connect(path: str) -> None:
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
    finally:
        s.close()


def _as_user(uid: int, gid: int, action) -> str:
    """Run ``action`` in a forked child under ``uid``; 'ok', 'denied' or 'error'."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 3
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            action()
            code = 0
        except PermissionError:
            code = 1
        except BaseException:  # noqa: BLE001 - anything else is reported as 'error'
            code = 2
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return {0: "ok", 1: "denied"}.get(os.waitstatus_to_exitcode(status), "error")


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_overload_blocks_or_raises_by_policy_and_loses_nothing(tmp_path: Path, out_dir: Path) -> None:
    d = start_daemon(out_dir, tmp_path / "sock", "--writers", "1", "--debug-write-delay", "0.15")
    try:
        idle = _rss_kib(d.proc.pid)
        payload = np.ones((1 << 17,), np.float64)  # 1 MiB a save, 4 fit in the ring
        with Spool(d.endpoint, ring_bytes=4 << 20, on_full="raise") as fast_fail:
            accepted = []
            # Stopped, the daemon frees nothing, so exactly 4 fit however loaded the
            # machine (with it running, a slow loop let 2 saves finish first: 6 accepted)
            os.kill(d.proc.pid, signal.SIGSTOP)
            try:
                with pytest.raises(matspool.SpoolFull, match="ring full"):
                    for i in range(10):
                        accepted.append(fast_fail.save(out_dir / f"r{i}.mat", {"a": payload * i}))
            finally:
                os.kill(d.proc.pid, signal.SIGCONT)
            assert len(accepted) == 4
            fast_fail.flush(30)
        with Spool(d.endpoint, ring_bytes=4 << 20, on_full="block", timeout=30) as blocking:
            t0 = time.monotonic()
            futures = [blocking.save(out_dir / f"b{i}.mat", {"a": payload * i}) for i in range(16)]
            blocked_for = time.monotonic() - t0
            peak = max(_rss_kib(d.proc.pid), idle)
            blocking.flush(60)
        assert blocked_for > 1.0, "16 saves through a 4-save ring and a slow disk never blocked"
        assert peak - idle < 64 << 10, f"daemon RSS grew by {(peak - idle) >> 10} MiB"
        for i, f in enumerate(futures):
            assert (scipy.io.loadmat(f.result().path)["a"] == i).all()
        for i in range(4):
            assert (scipy.io.loadmat(out_dir / f"r{i}.mat")["a"] == i).all()
    finally:
        d.stop()


def test_soak_short(tmp_path: Path) -> None:
    """The soak of bench/soak.py, bounded to 20 s: every file exact, RSS and fds flat."""
    out = tmp_path / "soak.json"
    repo = Path(__file__).resolve().parents[1]
    r = subprocess.run(
        [sys.executable, "-m", "bench.soak", "--seconds", "20", "--producers", "8", "--json", str(out)],
        cwd=repo,
        timeout=600,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    import json

    res = json.loads(out.read_text())
    assert res["files_failed"] == 0 and res["files_verified"] > 50
    assert res["anon_rss_last_third_mib"] - res["anon_rss_middle_third_mib"] < 32, res
    assert res["fds_last_third"] - res["fds_middle_third"] <= 4, res


def test_answers_are_never_dropped_for_a_slow_client(tmp_path: Path, out_dir: Path) -> None:
    """A ROUTER drops what it cannot queue for a peer: 5,000 requests from a client that
    reads nothing until the end must all be answered, and so must a flood of saves."""
    import json

    import zmq

    from matspool._protocol import TAG

    d = start_daemon(out_dir, tmp_path / "sock")
    try:
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(d.endpoint)
        for _ in range(5000):
            sock.send_multipart([TAG, b'{"op":"PING"}'])
        time.sleep(1.0)  # let the answers pile up unread
        got = 0
        while sock.poll(3000):
            assert json.loads(sock.recv_multipart()[1])["op"] == "PONG"
            got += 1
        sock.close()
        assert got == 5000
        with Spool(d.endpoint, ring_bytes=16 << 20, timeout=30) as spool:
            futures = [spool.save(out_dir / f"s{i % 50}.mat", {"x": np.full((4, 4), i)}) for i in range(3000)]
            spool.flush(120)
        assert all(f.done() and f.exception() is None for f in futures)
    finally:
        d.stop()
