"""Issue 11 item 4: what a client of the socket can make the daemon hold.

Each attack runs for ``MATSPOOL_ATTACK_SECONDS`` (12 s here; 30 in a bench) against a
real daemon while an honest client saves small files the whole time:

- a client that asks and never reads its answers: before, the daemon's RSS grew without
  bound (``SNDHWM=0``); now its queue is finite and its connection is cut when full;
- a flood of bare connections at a 1,024-descriptor limit: before, libzmq's ipc listener
  aborted the daemon on ``EMFILE`` at ~1,100; now accepting pauses at a cap (and any
  connection accepted beyond it is cut).

Asserted: the daemon lives, its RSS and descriptor count stay flat (generous bounds),
and every honest save succeeds. The honest client's save round trips are printed (p50,
p99) with and without the attack: measured, not asserted (shared CI machines).
"""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import zmq

import matspool
from matspool._protocol import TAG

from conftest import serve_cmd, wait_ready
from readback import assert_variables, read

SECONDS = float(os.environ.get("MATSPOOL_ATTACK_SECONDS", "12"))


def _start(out: Path, sock: Path, nofile: int | None = None) -> tuple[str, subprocess.Popen]:
    sock.mkdir(mode=0o700)
    endpoint = f"ipc://{sock}/d.sock"

    def limit() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    proc = subprocess.Popen(
        serve_cmd(endpoint, out),
        preexec_fn=limit,
        stderr=subprocess.PIPE,
        text=True,  # serve refuses unknown MATSPOOL_*
        env={k: v for k, v in os.environ.items() if k != "MATSPOOL_ATTACK_SECONDS"},
    )
    assert wait_ready(endpoint, proc)
    return endpoint, proc


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class Honest:
    """Saves a small file, waits for it, again, on its own thread; keeps the round trips."""

    def __init__(self, endpoint: str, out: Path) -> None:
        self.spool = matspool.Spool(endpoint, ring_bytes=4 << 20, timeout=30)
        self.out = out
        self.times: list[float] = []
        self.failures: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            t0 = time.perf_counter()
            try:
                self.spool.save(self.out / f"h{i % 20}.mat", {"x": np.full((8, 8), i)}).result(30)
                self.times.append(time.perf_counter() - t0)
            except Exception as e:  # noqa: BLE001 - counted and asserted on
                self.failures.append(e)
            i += 1
            time.sleep(0.005)

    def take(self) -> list[float]:
        got, self.times = self.times, []
        return got

    def close(self) -> None:
        self._stop.set()
        self._thread.join(60)
        self.spool.close()


def _log_of(proc: subprocess.Popen, honest: Honest) -> str:
    """Stop the honest client, then the daemon; what the daemon logged."""
    honest.close()
    proc.terminate()
    return proc.communicate(timeout=60)[1]


def _rate_limited(log: str, words: str) -> None:
    """Logged, and at most once per 10 s (plus the first)."""
    n = sum(words in line for line in log.splitlines())
    assert 1 <= n <= SECONDS / 10 + 2, (n, log[-3000:])


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.array(xs) * 1e3, q)) if xs else float("nan")


def _connect(path: str, held: list[socket.socket]) -> bool:
    """One bare connection to ``path``, kept in ``held``; False when it did not connect (a
    paused daemon leaves connects waiting in the backlog: 0.2 s, then given up)."""
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(0.2)
    try:
        s.connect(path)
    except OSError:
        s.close()
        return False
    held.append(s)
    return True


def _drop(held: list[socket.socket], n: int | None = None) -> None:
    """Close the ``n`` oldest connections of ``held`` (all by default)."""
    gone = held[:n] if n is not None else held[:]
    for s in gone:
        s.close()
    del held[: len(gone)]


def _a_late_client_saves(endpoint: str, out: Path) -> None:
    """After a flood: a new client connects and its file is read back exact."""
    with matspool.Spool(endpoint, ring_bytes=1 << 20, timeout=30, connect_timeout=30) as late:
        late.save(out / "late.mat", {"a": 1.0}, format="v5").result(30)
    assert_variables(read(out / "late.mat", "v5"), {"a": np.full((1, 1), 1.0)})


@pytest.fixture
def honest_daemon(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., tuple]]:
    procs: list[subprocess.Popen] = []
    honest: list[Honest] = []

    def start(nofile: int | None = None) -> tuple[str, subprocess.Popen, Honest]:
        out = tmp_path / "out"
        out.mkdir()
        endpoint, proc = _start(out, tmp_path / "sock", nofile)
        procs.append(proc)
        h = Honest(endpoint, out)
        honest.append(h)
        return endpoint, proc, h

    yield start
    for h in honest:
        h.close()
    for p in procs:
        p.terminate()
        p.wait(30)


def _run_attack(
    proc: subprocess.Popen, honest: Honest, attack: Callable[[threading.Event], None], name: str
) -> dict[str, float]:
    time.sleep(3)  # warm: the honest client alone
    base = honest.take()
    rss0, fds0 = _rss_mib(proc.pid), _fds(proc.pid)
    stop = threading.Event()
    t = threading.Thread(target=attack, args=(stop,), daemon=True)
    t.start()
    time.sleep(SECONDS)
    assert proc.poll() is None, f"the daemon died under {name}: {proc.stderr.read() if proc.stderr else ''}"
    rss1, fds1 = _rss_mib(proc.pid), _fds(proc.pid)
    under = honest.take()
    stop.set()
    t.join(30)
    result = {
        "rss_start_mib": rss0,
        "rss_end_mib": rss1,
        "fds_start": fds0,
        "fds_end": fds1,
        "p50_ms_alone": _pct(base, 50),
        "p99_ms_alone": _pct(base, 99),
        "p50_ms_attack": _pct(under, 50),
        "p99_ms_attack": _pct(under, 99),
        "saves_alone": len(base),
        "saves_attack": len(under),
    }
    print(f"\n{name} ({SECONDS:.0f} s): " + ", ".join(f"{k}={v:.1f}" for k, v in result.items()))
    assert not honest.failures, honest.failures[:3]
    assert under, "the honest client saved nothing during the attack"
    return result


def test_client_that_never_reads_cannot_grow_the_daemon(honest_daemon) -> None:
    endpoint, proc, honest = honest_daemon()

    def attack(stop: threading.Event) -> None:
        ctx = zmq.Context()
        socks = []
        for _ in range(4):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.RCVHWM, 1)  # its libzmq stops reading the connection at once
            s.setsockopt(zmq.SNDHWM, 0)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(endpoint)
            socks.append(s)
        status = [TAG, b'{"op":"STATUS"}']
        while not stop.is_set():
            for s in socks:
                for _ in range(200):
                    try:
                        s.send_multipart(status, zmq.NOBLOCK)
                    except zmq.Again:
                        break
            time.sleep(0.001)
        for s in socks:
            s.close(0)
        ctx.term()

    r = _run_attack(proc, honest, attack, "never-reading client")
    assert r["rss_end_mib"] - r["rss_start_mib"] < 96, r  # before: +209 MiB in 12 s, growing
    assert r["fds_end"] - r["fds_start"] < 32, r
    _rate_limited(_log_of(proc, honest), "does not read its answers")


def test_connection_flood_at_the_descriptor_limit(honest_daemon) -> None:
    endpoint, proc, honest = honest_daemon(nofile=1024)
    path = endpoint[len("ipc://") :]

    def flood(stop: threading.Event) -> None:
        """Connect as fast as one thread can, hold 1,500, then churn 300 at a time. Three
        of these without pause killed the daemon in 3 of 3 tries when the cap only cut
        connections after libzmq accepted them (the issue's 50 per 10 ms: 1 in 5 on CI)."""
        held: list[socket.socket] = []
        while not stop.is_set():
            if len(held) < 1500:
                for _ in range(100):
                    _connect(path, held)
            else:  # churn: new connections replace old ones
                _drop(held, 300)
        _drop(held)

    def attack(stop: threading.Event) -> None:
        threads = [threading.Thread(target=flood, args=(stop,), daemon=True) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)

    r = _run_attack(proc, honest, attack, "connection flood")
    assert r["fds_end"] < 1024, r
    assert r["rss_end_mib"] - r["rss_start_mib"] < 96, r
    # the daemon still takes new clients once the flood is over
    time.sleep(2)
    _a_late_client_saves(endpoint, honest.out)
    log = _log_of(proc, honest)
    _rate_limited(log, "paused accepting")  # the door (door.py) shut at the cap
    assert sum("refused a connection" in line for line in log.splitlines()) <= SECONDS / 10 + 2, log[-3000:]


def test_a_client_repeating_a_refused_message_gets_every_err_but_floods_no_log(tmp_path: Path) -> None:
    """2,000 malformed messages as fast as a socket sends them: each answered with ERR and
    its reason, the daemon's log takes one line for them (plus the count), not 2,000."""
    out = tmp_path / "out"
    out.mkdir()
    endpoint, proc = _start(out, tmp_path / "sock")
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        n = 2000
        for _ in range(n):
            sock.send_multipart([b"matspool/1", b'{"op":"SHUTDOWN"}'])
        replies = []
        for _ in range(n):
            assert sock.poll(30_000), f"no answer after {len(replies)} of {n}"
            replies.append(json.loads(sock.recv_multipart()[1]))
        assert all(r["op"] == "ERR" and "unknown op" in r["message"] for r in replies)
    finally:
        sock.close()
        proc.terminate()
        log = proc.communicate(timeout=60)[1]
    lines = [line for line in log.splitlines() if "unknown op" in line]
    assert 1 <= len(lines) <= 3, log[-3000:]


def test_a_connection_flood_at_a_small_descriptor_limit(tmp_path: Path) -> None:
    """At 256 descriptors the cap is 128 and the reserve behind it 112: a flood accepted by
    libzmq's I/O thread faster than the guard's thread hears of it went through the reserve
    before the door shut, and the daemon aborted (EMFILE) in 3 of 3 tries. Each accept must
    be counted before the next is allowed. Afterwards an honest client saves as usual."""
    out = tmp_path / "out"
    out.mkdir()
    endpoint, proc = _start(out, tmp_path / "sock", nofile=128)
    path = endpoint[len("ipc://") :]

    def flood() -> None:
        held: list[socket.socket] = []
        for _ in range(10_000):
            _connect(path, held)
            if len(held) >= 300:
                _drop(held, 100)
        _drop(held)

    threads = [threading.Thread(target=flood) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert proc.poll() is None, proc.communicate(timeout=30)[1][-3000:]
    _a_late_client_saves(endpoint, out)
    proc.terminate()
    assert proc.wait(30) == 0


def test_a_daemon_stopped_during_a_connection_flood_exits(tmp_path: Path) -> None:
    """SIGTERM while bare connections come and go at the cap: the daemon exits, three times
    of three. Before, the guard's thread closed its end of the monitor before the monitor
    was disabled; the next ACCEPTED or DISCONNECTED blocked libzmq's I/O thread for good,
    holding the lock ``disable_monitor`` waited for (4 of 6 stops hung)."""
    for i in range(3):
        out = tmp_path / f"out{i}"
        out.mkdir()
        endpoint, proc = _start(out, tmp_path / f"sock{i}", nofile=128)
        path = endpoint[len("ipc://") :]
        stop = threading.Event()

        def churn(path: str = path, stop: threading.Event = stop) -> None:
            held: list[socket.socket] = []
            while not stop.is_set():
                _connect(path, held)
                if len(held) >= 12:  # three of these keep the cap (16) full and churning
                    _drop(held, 1)
            _drop(held)

        threads = [threading.Thread(target=churn) for _ in range(3)]
        for t in threads:
            t.start()
        try:
            time.sleep(1.0)  # the flood fills the cap (a stop before it does must exit too)
            assert proc.poll() is None
            proc.terminate()
            try:
                rc = proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise AssertionError(
                    f"round {i}: the daemon did not exit on SIGTERM during a flood"
                ) from None
            assert rc == 0, proc.communicate(timeout=30)[1][-3000:]
        finally:
            stop.set()
            for t in threads:
                t.join()


def test_a_daemon_started_into_a_running_connection_flood_lives(tmp_path: Path) -> None:
    """Bare connections already knock at the path when the daemon starts, at 64
    descriptors (cap 16). Before, libzmq accepted from the moment it listened, and the
    flood ran the daemon out of descriptors before the guard's door was found: EMFILE
    aborted it in 3 of 3 starts. Afterwards an honest client saves as usual."""
    out = tmp_path / "out"
    out.mkdir()
    sock = tmp_path / "sock"
    sock.mkdir(mode=0o700)
    endpoint = f"ipc://{sock}/d.sock"
    path = endpoint[len("ipc://") :]
    up = threading.Event()

    def flood() -> None:
        held: list[socket.socket] = []
        tries = 0
        while tries < 5000:  # counted once the socket is there
            tries += _connect(path, held) or up.is_set()
            if len(held) >= 100:
                _drop(held, 30)
        _drop(held)

    threads = [threading.Thread(target=flood) for _ in range(3)]
    for t in threads:
        t.start()
    proc = subprocess.Popen(
        serve_cmd(endpoint, out),
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64)),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        while not os.path.exists(path) and proc.poll() is None:
            time.sleep(0.01)
        up.set()
        for t in threads:
            t.join()
        assert proc.poll() is None, proc.communicate(timeout=30)[1][-3000:]
        _a_late_client_saves(endpoint, out)
    finally:
        up.set()
        for t in threads:
            t.join()
        proc.terminate()
    assert proc.wait(30) == 0
