"""The daemon under ordinary process life, provoked for real: a second daemon on a live
endpoint, a client stopped past its timeout, a daemon killed mid-write and restarted.

Real daemon processes, real signals; files read back and compared exactly.
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
import scipy.io

import matspool
from matspool._messages import ClientStatus, StatusQuery, StatusReply
from matspoold.probe import ask

from conftest import serve_cmd, start_daemon


def _serve(endpoint: str, root: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        serve_cmd(endpoint, root, *extra),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


# -- break 6: one daemon per endpoint ---------------------------------------------------------


def test_second_daemon_on_a_live_endpoint_exits_2_and_leaves_the_first_serving(
    tmp_path: Path, out_dir: Path
) -> None:
    d = start_daemon(out_dir, tmp_path / "sock")
    sock = d.endpoint[len("ipc://") :]
    try:
        with matspool.Spool(d.endpoint, ring_bytes=4 << 20, timeout=30) as spool:
            spool.save(out_dir / "a.mat", {"a": 1.0}).result(30)
            before = os.stat(sock).st_ino
            second = _serve(d.endpoint, out_dir)
            assert second.returncode == 2, second.stderr
            assert f"a daemon already serves {d.endpoint}, pid {d.proc.pid}" in second.stderr
            assert os.stat(sock).st_ino == before, "the second daemon replaced the socket"
            # the first daemon's clients still reach it
            spool.save(out_dir / "b.mat", {"b": np.arange(6.0).reshape(2, 3)}).result(30)
        assert (scipy.io.loadmat(out_dir / "b.mat")["b"] == np.arange(6.0).reshape(2, 3)).all()
        assert d.alive()
    finally:
        assert d.stop() == 0


def test_stale_socket_is_replaced(tmp_path: Path, out_dir: Path) -> None:
    sock_dir = tmp_path / "sock"
    sock_dir.mkdir()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock_dir / "d.sock"))  # a socket file nobody listens on (a killed daemon's)
    stale.close()
    d = start_daemon(out_dir, sock_dir)
    try:
        with matspool.Spool(d.endpoint, ring_bytes=4 << 20, timeout=30) as spool:
            spool.save(out_dir / "a.mat", {"a": 2.0}).result(30)
        assert scipy.io.loadmat(out_dir / "a.mat")["a"][0, 0] == 2.0
    finally:
        assert d.stop() == 0


def test_a_file_that_is_no_socket_is_never_replaced(tmp_path: Path, out_dir: Path) -> None:
    (tmp_path / "sock").mkdir()
    victim = tmp_path / "sock" / "d.sock"
    victim.write_bytes(b"someone's data")
    r = _serve(f"ipc://{victim}", out_dir)
    assert r.returncode == 2, r.stderr
    assert "exists and is not a socket" in r.stderr
    assert victim.read_bytes() == b"someone's data"


def test_daemon_removes_only_the_socket_it_created(tmp_path: Path, out_dir: Path) -> None:
    d = start_daemon(out_dir, tmp_path / "sock")
    sock = d.endpoint[len("ipc://") :]
    os.unlink(sock)  # someone else's socket now lives at the path
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(sock)
    try:
        assert d.stop() == 0
        assert os.path.exists(sock), "the daemon deleted a socket it did not create"
    finally:
        other.close()
    d2 = start_daemon(out_dir, tmp_path / "sock")  # nobody answers on it: stale, replaced
    assert d2.stop() == 0
    assert not os.path.exists(sock), "a daemon left its own socket behind"


# -- break 3: a stopped client is not a dead one --------------------------------------------

_STOPPED_CLIENT = textwrap.dedent("""
    import glob, os, sys, numpy as np, matspool
    from matspool._ring import RING_PREFIX, SHM_DIR
    endpoint, out, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    spool = matspool.Spool(endpoint, ring_bytes=64 << 20, timeout=60)
    futs = [spool.save(os.path.join(out, f"s{i}.mat"), {"a": np.full((512, 512), i, np.float64)})
            for i in range(n)]
    print("SAVED", flush=True)
    sys.stdin.readline()  # the test stops us, waits past the timeout, continues us, then writes
    later = [spool.save(os.path.join(out, f"s{i}.mat"), {"a": np.full((512, 512), i, np.float64)})
             for i in range(n, 2 * n)]
    for f in futs + later:
        f.result(60)
    rings = (glob.glob(os.path.join(SHM_DIR, f"{RING_PREFIX}{os.getpid()}-*"))
             if spool._ring.kind == "shm" else [spool._ring.name] * spool._ring.exists())
    spool.close()
    print("RINGS", len(rings), flush=True)
""")


def _client_status(endpoint: str, pid: int) -> ClientStatus | None:
    st = ask(endpoint, StatusQuery(), 10)
    assert isinstance(st, StatusReply), "the daemon stopped answering"
    return next((c for c in st.clients if c.pid == pid), None)


def test_client_stopped_past_client_timeout_keeps_its_ring_and_saves(tmp_path: Path, out_dir: Path) -> None:
    n = 6
    # a slow disk (0.4 s a file, one writer): saves are still queued when the client stops
    d = start_daemon(
        out_dir, tmp_path / "sock", "--client-timeout", "2", "--writers", "1", "--debug-write-delay", "0.4"
    )
    client = subprocess.Popen(
        [sys.executable, "-c", _STOPPED_CLIENT, d.endpoint, str(out_dir), str(n)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert client.stdout.readline().strip() == "SAVED"
        deadline = time.monotonic() + 120  # a hang guard, far beyond any expected wait
        while True:  # until the daemon holds every save: then stop the client mid-way
            me = _client_status(d.endpoint, client.pid)
            if me is not None and me.queue_depth + me.files_written == n:
                break
            assert time.monotonic() < deadline, f"the daemon never received all {n} saves: {me}"
            time.sleep(0.01)
        os.kill(client.pid, signal.SIGSTOP)
        assert me is not None and me.queue_depth > 0, "no save was in flight when the client stopped"
        deadline = time.monotonic() + 120
        while True:  # silent for well past --client-timeout, and its saves all written
            me = _client_status(d.endpoint, client.pid)
            if me is None or (me.silent_s > 4 and me.queue_depth == 0):
                break
            assert time.monotonic() < deadline, f"the stopped client's saves were never written: {me}"
            time.sleep(0.1)
        os.kill(client.pid, signal.SIGCONT)
        out, _ = client.communicate("go\n", timeout=120)
        assert client.returncode == 0, out
        assert "RINGS 1" in out, f"the client's ring was gone after it continued: {out}"
        for i in range(2 * n):
            assert (scipy.io.loadmat(out_dir / f"s{i}.mat")["a"] == np.full((512, 512), i)).all()
        assert d.alive()
    finally:
        if client.poll() is None:
            os.kill(client.pid, signal.SIGCONT)
            client.kill()
            client.wait()
        d.stop()


# -- break 4: a killed daemon's temporaries are removed by the next one ----------------------


def _temporaries(d: Path) -> list[Path]:
    return [p for p in d.rglob("*") if p.name.endswith(".matspool-tmp")]


def test_killed_daemons_leave_no_temporaries_and_every_file_whole(tmp_path: Path, out_dir: Path) -> None:
    from readback import read

    rng = np.random.default_rng(20261201)
    state = tmp_path / "state"
    args = ("--state-dir", str(state), "--writers", "2")
    (out_dir / "sub").mkdir()
    saved: dict[Path, tuple[str, np.ndarray]] = {}
    futures = []
    seen_mid_write = 0
    d = start_daemon(out_dir, tmp_path / "sock", *args)
    with matspool.Spool(d.endpoint, ring_bytes=256 << 20, timeout=120) as spool:
        for kill in range(12):  # 48 large saves, each kill mid-write or between
            for i in range(6):
                fmt = ("v5", "v7.3")[i % 2]
                n = (2048, 64)[i % 3 == 2]  # 32 MiB or 32 KiB of float64
                path = out_dir / ("sub" if i % 4 == 3 else "") / f"k{kill}_{i}.mat"
                value = (
                    rng.standard_normal((n, n // 8 or 1))
                    if n == 64
                    else np.full((n, n), kill * 10 + i, np.float64)
                )
                saved[path] = (fmt, value)
                futures.append(spool.save(path, {"x": value}, format=fmt))
            time.sleep(rng.uniform(0.0, 0.4))
            os.kill(d.proc.pid, signal.SIGKILL)
            d.proc.wait()
            seen_mid_write += len(_temporaries(out_dir))
            d = start_daemon(out_dir, tmp_path / "sock", *args)  # resends what was unanswered
        try:
            spool.flush(300)
            assert not _temporaries(out_dir), f"temporaries left: {_temporaries(out_dir)}"
            journals = [p.name for p in state.iterdir()]
            assert len(journals) == 1 and journals[0].startswith(f"tmp-{d.proc.pid}-"), (
                f"dead daemons' journals stayed: {journals}"
            )
        finally:
            assert d.stop() == 0
    assert seen_mid_write > 0, "no kill landed mid-write: the test provoked nothing"
    assert all(f.done() and f.exception() is None for f in futures)
    for path, (fmt, value) in saved.items():
        got = read(path, fmt)["x"]
        assert got.dtype == value.dtype and got.shape == value.shape and (got == value).all(), path
    assert not _temporaries(out_dir)
    assert list(state.iterdir()) == [], "a clean exit left its journal"


def test_restart_removes_only_a_dead_daemons_own_temporaries(tmp_path: Path, out_dir: Path) -> None:
    state = tmp_path / "state"
    live = start_daemon(out_dir, tmp_path / "live", "--state-dir", str(state))
    dead = start_daemon(out_dir, tmp_path / "sock", "--state-dir", str(state))
    try:
        for d in (live, dead):  # each journals out_dir
            with matspool.Spool(d.endpoint, ring_bytes=4 << 20, timeout=30) as spool:
                spool.save(out_dir / f"{d.proc.pid}.mat", {"a": 1.0}).result(30)
        tags = {d.proc.pid: next(state.glob(f"tmp-{d.proc.pid}-*.journal")).name[4:-8] for d in (live, dead)}
        os.kill(dead.proc.pid, signal.SIGKILL)
        dead.proc.wait()
        elsewhere = tmp_path / "not-journaled"
        elsewhere.mkdir()
        plant = {
            out_dir / f".a.mat.{tags[dead.proc.pid]}-7.matspool-tmp": False,  # the dead one's: goes
            out_dir / f".b.mat.{tags[live.proc.pid]}-7.matspool-tmp": True,  # a live daemon's
            out_dir / ".c.mat.1-0123456789abcdef-7.matspool-tmp": True,  # another tag
            out_dir / f"{tags[dead.proc.pid]}-7.matspool-tmp": True,  # not a temporary's name
            out_dir / f".d.mat.{tags[dead.proc.pid]}-7.matspool-tmp.mat": True,
            elsewhere / f".e.mat.{tags[dead.proc.pid]}-7.matspool-tmp": True,  # dir not journaled
        }
        for p in plant:
            p.write_bytes(b"x")
        restarted = start_daemon(out_dir, tmp_path / "sock", "--state-dir", str(state))
        assert restarted.stop() == 0
        assert {p: p.exists() for p in plant} == plant
        assert (out_dir / f"{dead.proc.pid}.mat").exists() and (out_dir / f"{live.proc.pid}.mat").exists()
        assert [p.name for p in state.iterdir()] == [f"tmp-{tags[live.proc.pid]}.journal"]
    finally:
        assert live.stop() == 0
    assert list(state.iterdir()) == []
