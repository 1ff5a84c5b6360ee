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

from conftest import start_daemon


def _serve(endpoint: str, root: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "matspoold", "serve", "--endpoint", endpoint,
                           "--root", str(root), "--log-level", "warning", *extra],
                          capture_output=True, text=True, timeout=30)


# -- break 6: one daemon per endpoint ---------------------------------------------------------

def test_second_daemon_on_a_live_endpoint_exits_2_and_leaves_the_first_serving(
        tmp_path: Path, out_dir: Path) -> None:
    d = start_daemon(out_dir, tmp_path / "sock")
    sock = d.endpoint[len("ipc://"):]
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


def test_daemon_removes_only_the_socket_it_created(tmp_path: Path, out_dir: Path) -> None:
    d = start_daemon(out_dir, tmp_path / "sock")
    sock = d.endpoint[len("ipc://"):]
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
