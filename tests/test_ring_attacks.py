"""Issue 11 item 2: a client cannot kill or stall the daemon through its ring.

Real daemon processes (``conftest.start_daemon``), real rings:

- a ``/dev/shm`` ring (the fallback kind) truncated, by its own process or by another
  process of the same user, at many instants during v5, v7.3, compressed and stream
  writes of 32 MiB: the daemon never dies (before: SIGBUS, exit -7), each save fails
  with a clear ``ring`` error or succeeds with exact bytes, and the next save is served;
- the default ``memfd`` ring: truncation fails with EPERM, from the client and from
  another process, during the same writes, which all land exact;
- HELLO over the per-client or the total cap is refused with an ERR naming the size and
  the cap; a big allowed (sparse) ring is not populated on the control thread (before:
  the daemon's RSS grew by the whole ring and every client waited), and another client's
  PINGs are answered meanwhile.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

import matspool
from matspool._protocol import TAG
from matspool._ring import Ring

from conftest import DaemonProc, start_daemon
from readback import read

MIB = 1 << 20
PAYLOAD = 32 * MIB
RING_BYTES = 64 * MIB
DELAYS = (0.0, 0.001, 0.003, 0.01, 0.03, 0.1)  # s after the WRITE leaves, truncation lands
#: (name, format, compress, stream)
KINDS = (
    ("v5", "v5", 0, False),
    ("v73", "v7.3", 0, False),
    ("v73_deflate", "v7.3", 1, False),
    ("v5_deflate", "v5", 1, False),
    ("stream", "v7.3", 0, True),
)


class Raw:
    """A bare DEALER speaking the protocol."""

    def __init__(self, endpoint: str) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def send(self, msg: dict[str, Any]) -> None:
        self.sock.send_multipart([TAG, json.dumps(msg).encode()])

    def recv(self, wait: float) -> dict[str, Any] | None:
        if not self.sock.poll(int(wait * 1000)):
            return None
        frames = self.sock.recv_multipart()
        return json.loads(frames[1])

    def ask(self, msg: dict[str, Any], wait: float = 10.0) -> dict[str, Any] | None:
        self.send(msg)
        return self.recv(wait)

    def close(self) -> None:
        self.sock.close(linger=0)


def _hello(ring: Ring, **over: Any) -> dict[str, Any]:
    msg: dict[str, Any] = {"op": "HELLO", "ring": ring.name, "ring_bytes": ring.size, "pid": os.getpid()}
    if ring.kind == "memfd":
        msg["fd"] = ring.fd
    msg.update(over)
    return msg


def _alive(d: DaemonProc) -> None:
    rc = d.proc.poll()
    if rc is not None:
        how = f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exit status {rc}"
        pytest.fail(f"the daemon died ({how}): a client's ring killed every client's writer")


def _serves(d: DaemonProc, root: Path) -> None:
    """The daemon is alive and writes the next save of an honest client."""
    _alive(d)
    with matspool.Spool(d.endpoint, ring_bytes=MIB, timeout=30) as s:
        x = np.arange(12.0).reshape(3, 4)
        s.save(root / "next.mat", {"x": x}).result(30)
    assert (read(root / "next.mat", "v5")["x"] == x).all()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProc]:
    root = tmp_path / "out"
    root.mkdir()
    d = start_daemon(root, tmp_path / "sock", "--writers", "2")
    yield d
    if d.proc.poll() is None:
        d.stop()


class Truncator:
    """Another process of the same user that truncates a file on request."""

    def __init__(self) -> None:
        code = (
            "import os, sys\n"
            "for line in sys.stdin:\n"
            "    path, size = line.rsplit(' ', 1)\n"
            "    try:\n"
            "        os.truncate(path, int(size)); print('ok', flush=True)\n"
            "    except OSError as e:\n"
            "        print(e.errno, flush=True)\n"
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def truncate(self, path: str, size: int) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{path} {size}\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(10)


def _var(n: int) -> dict[str, Any]:
    return {"name": "x", "dtype": "<f8", "dims": [n // 8, 1], "offset": 0, "nbytes": n}


def test_a_shm_ring_truncated_during_writes_never_kills_the_daemon(daemon: DaemonProc) -> None:
    """The fallback ring cannot be sealed: the daemon reads it by ``preadv``, so a
    truncation is a short read for that save. Before: SIGBUS (exit -7) on the first one."""
    root = daemon.root
    ring = Ring(RING_BYTES, kind="shm")
    raw = Raw(daemon.endpoint)
    other = Truncator()
    want = np.arange(PAYLOAD // 8, dtype=np.float64)
    outcomes: dict[str, int] = {}
    try:
        assert (raw.ask(_hello(ring)) or {}).get("op") == "WELCOME"
        seq = 0
        for name, fmt, compress, stream in KINDS:
            for i, delay in enumerate(DELAYS):
                os.truncate(ring.path, ring.size)  # whole again (its tail zeros) before we touch it
                ring.array[:PAYLOAD] = want.view(np.uint8)
                path = str(root / f"{name}_{i}.mat")
                if stream:  # the stream's first step whole, the next one truncated under it
                    seq += 1
                    reply = raw.ask(
                        {
                            "op": "WRITE",
                            "seq": seq,
                            "path": path,
                            "format": fmt,
                            "fsync": False,
                            "mode": "create",
                            "vars": [_var(PAYLOAD)],
                        },
                        60,
                    )
                    assert reply is not None and reply["op"] == "DONE", reply
                seq += 1
                raw.send(
                    {
                        "op": "WRITE",
                        "seq": seq,
                        "path": path,
                        "format": fmt,
                        "fsync": False,
                        "compress": compress,
                        "mode": "append" if stream else "write",
                        "vars": [_var(PAYLOAD)],
                    }
                )
                time.sleep(delay)
                by_other = i % 2 == 1  # every other one from another process of this user
                if by_other:
                    assert other.truncate(ring.path, 4096) == "ok"
                else:
                    os.truncate(ring.path, 4096)
                reply = raw.recv(120)
                _alive(daemon)
                assert reply is not None, f"{name} at +{delay} s: no answer"
                if reply["op"] == "ERR":
                    assert reply["code"] == "ring" and "shrank" in reply["message"], reply
                    if not stream:
                        assert not os.path.exists(path), "a failed save left its file"
                    outcomes["failed"] = outcomes.get("failed", 0) + 1
                else:
                    assert reply["op"] == "DONE", reply
                    if not stream:  # read before the truncation landed: every byte exact
                        got = read(Path(path), "v7.3" if fmt == "v7.3" else "v5")["x"]
                        assert got.tobytes() == want.tobytes(), f"{name} at +{delay} s: other bytes"
                    outcomes["written"] = outcomes.get("written", 0) + 1
        assert not [p for p in os.listdir(root) if ".tmp" in p or p.startswith(".")], os.listdir(root)
    finally:
        other.close()
        raw.close()
        ring.close()
    print(f"\nshm ring truncated at {len(KINDS) * len(DELAYS)} instants: {outcomes}")
    assert outcomes.get("failed", 0) > 0, "no truncation landed inside a write: nothing was provoked"
    _serves(daemon, root)


@pytest.mark.parametrize(("name", "fmt", "compress", "stream"), KINDS, ids=[k[0] for k in KINDS])
def test_a_memfd_ring_cannot_be_truncated_during_writes(
    daemon: DaemonProc, name: str, fmt: str, compress: int, stream: bool
) -> None:
    """The default ring is sealed: ``ftruncate`` fails with EPERM for its own process
    and for another process of the same user, while 32 MiB saves are written; every
    save lands with exact bytes."""
    root = daemon.root
    other = Truncator()
    want = np.arange(PAYLOAD // 8, dtype=np.float64).reshape(-1, 1)
    try:
        with matspool.Spool(daemon.endpoint, ring_bytes=RING_BYTES, timeout=120) as s:
            ring = s._ring
            assert ring is not None and ring.kind == "memfd"
            assert fcntl.fcntl(ring.fd, fcntl.F_GET_SEALS) & (fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
            futures = []
            st = s.stream(root / f"{name}_s.mat", format=fmt, compress=compress) if stream else None
            for i, delay in enumerate(DELAYS):
                if st is not None:
                    futures.append(st.append({"x": want}))
                else:
                    futures.append(
                        s.save(root / f"{name}_{i}.mat", {"x": want}, format=fmt, compress=compress)
                    )
                time.sleep(delay)
                for size in (0, 4096, ring.size // 2, ring.size * 2):
                    with pytest.raises(PermissionError) as ei:
                        os.ftruncate(ring.fd, size)
                    assert ei.value.errno == errno.EPERM
                    assert other.truncate(f"/proc/{os.getpid()}/fd/{ring.fd}", size) == str(errno.EPERM)
            for f in futures:
                f.result(120)
            if st is not None:
                st.close(120)
        _alive(daemon)
        if stream:
            got = read(root / f"{name}_s.mat", "v7.3")["x"]
            assert got.shape[-1] == len(DELAYS) or got.size == want.size * len(DELAYS), got.shape
        else:
            for i in range(len(DELAYS)):
                got = read(root / f"{name}_{i}.mat", "v7.3" if fmt == "v7.3" else "v5")["x"]
                assert got.tobytes() == want.tobytes()
    finally:
        other.close()
    _serves(daemon, root)


def _sparse_memfd(name: str, size: int) -> int:
    """A sealed memfd of ``size`` bytes, none of them touched (a liar's ring)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd


def test_hello_over_the_caps_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "out"
    root.mkdir()
    d = start_daemon(
        root, tmp_path / "sock", "--max-ring-bytes", str(64 * MIB), "--max-total-ring-bytes", str(96 * MIB)
    )
    a, b = Raw(d.endpoint), Raw(d.endpoint)
    try:
        probe = Ring(4096)
        name = probe.name + "x"
        huge = 1 << 45  # 32 TiB, sparse: what the protocol alone lets through
        fd = _sparse_memfd(name, huge)
        reply = a.ask({"op": "HELLO", "ring": name, "ring_bytes": huge, "pid": os.getpid(), "fd": fd})
        os.close(fd)
        assert reply is not None and reply["op"] == "ERR" and reply["code"] == "ring", reply
        assert str(huge) in reply["message"] and str(64 * MIB) in reply["message"], reply
        assert "--max-ring-bytes" in reply["message"]
        with pytest.raises(matspool.RingError, match="--max-ring-bytes"):  # the client's view
            matspool.Spool(d.endpoint, ring_bytes=128 * MIB, connect_timeout=10)
        ra, rb = Ring(64 * MIB), Ring(64 * MIB)
        assert (a.ask(_hello(ra)) or {}).get("op") == "WELCOME"
        reply = b.ask(_hello(rb))  # 128 MiB together: over the total
        assert reply is not None and reply["op"] == "ERR" and reply["code"] == "ring", reply
        assert str(96 * MIB) in reply["message"] and "--max-total-ring-bytes" in reply["message"]
        a.send({"op": "BYE"})
        deadline = time.monotonic() + 10
        while (reply := b.ask(_hello(rb))) is not None and reply["op"] != "WELCOME":
            assert time.monotonic() < deadline, reply  # A's BYE lands first, then room
            time.sleep(0.05)
        for r in (probe, ra, rb):
            r.close()
        _serves(d, root)
    finally:
        a.close()
        b.close()
        d.stop()


def _rss_shmem(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssShmem:"):
                return int(line.split()[1]) * 1024
    return 0


@pytest.mark.parametrize("kind", ["memfd", "shm"])
def test_a_big_sparse_ring_is_not_populated_on_the_control_thread(daemon: DaemonProc, kind: str) -> None:
    """A 2 GiB ring nobody touched: before, HELLO made the daemon populate it on the
    control thread (its RSS +2 GiB, every client waiting seconds); now nothing is
    touched until a save reads it, and another client's PINGs are answered meanwhile."""
    size = 2 << 30
    probe = Ring(4096)
    name = f"{probe.name}big"
    if kind == "memfd":
        fd = _sparse_memfd(name, size)
        hello = {"op": "HELLO", "ring": name, "ring_bytes": size, "pid": os.getpid(), "fd": fd}
        path = None
    else:
        path = f"/dev/shm/{name}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        os.ftruncate(fd, size)
        hello = {"op": "HELLO", "ring": name, "ring_bytes": size, "pid": os.getpid()}
    a, b = Raw(daemon.endpoint), Raw(daemon.endpoint)
    rtts: list[float] = []
    stop = threading.Event()

    def pinger() -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            b.send({"op": "PING"})
            if b.recv(30) is not None:
                rtts.append(time.monotonic() - t0)

    try:
        before = _rss_shmem(daemon.proc.pid)
        t = threading.Thread(target=pinger)
        t.start()
        while len(rtts) < 5:
            time.sleep(0.005)
        answered_before = len(rtts)
        t0 = time.monotonic()
        reply = a.ask(hello, 60)
        hello_s = time.monotonic() - t0
        while len(rtts) < answered_before + 5:
            time.sleep(0.005)
        stop.set()
        t.join(30)
        grown = _rss_shmem(daemon.proc.pid) - before
        assert reply is not None and reply["op"] == "WELCOME", reply
        print(
            f"\n{kind} 2 GiB sparse ring: HELLO answered in {hello_s * 1e3:.1f} ms, daemon RssShmem "
            f"+{grown >> 20} MiB, other client's PING round trip max {max(rtts) * 1e3:.1f} ms "
            f"over {len(rtts)} pings"
        )
        assert grown < 64 * MIB, f"HELLO populated {grown >> 20} MiB of the ring on the control thread"
        a.send({"op": "BYE"})
        _serves(daemon, daemon.root)
    finally:
        stop.set()
        a.close()
        b.close()
        os.close(fd)
        if path is not None:
            os.unlink(path)
        probe.close()
