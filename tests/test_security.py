"""TCP endpoints: CURVE keys are mandatory on both sides; unauthorized clients are refused.

Loopback only: the ring is still shared memory on this host (payload over TCP for remote
hosts is a separate feature), so what is tested is the door, not the data path.
"""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import zmq

import matspool
from matspool import ClientKeys
from matspool._curve import make_keys

from conftest import serve_cmd, wait_tcp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def keys(tmp_path: Path) -> dict[str, str]:
    server_pub, server_sec = make_keys(str(tmp_path / "server"), "server")
    _, client_sec = make_keys(str(tmp_path / "authorized"), "client")
    _, rogue_sec = make_keys(str(tmp_path / "rogue"), "rogue")
    return {
        "server_pub": server_pub,
        "server_sec": server_sec,
        "clients": str(tmp_path / "authorized"),
        "client_sec": client_sec,
        "rogue_sec": rogue_sec,
    }


def _serve(endpoint: str, root: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        serve_cmd(endpoint, root, *extra),
        stderr=subprocess.PIPE,
        text=True,
    )


def test_tcp_without_keys_refuses_to_start(out_dir: Path) -> None:
    proc = _serve(f"tcp://127.0.0.1:{_free_port()}", out_dir)
    assert proc.wait(30) == 2
    assert "refusing to listen" in proc.stderr.read()


def test_client_needs_keys_for_tcp(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MATSPOOL_CURVE_CLIENT_SECRET", raising=False)
    with pytest.raises(ValueError, match="TCP endpoint"):
        matspool.Spool("tcp://127.0.0.1:1", ring_bytes=1 << 20)


def test_curve_authorized_client_writes_and_rogue_is_refused(keys, out_dir: Path) -> None:
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    proc = _serve(endpoint, out_dir, "--curve-secret", keys["server_sec"], "--curve-clients", keys["clients"])
    try:
        wait_tcp(endpoint, proc)
        good = ClientKeys(keys["client_sec"], keys["server_pub"])
        with matspool.Spool(endpoint, ring_bytes=1 << 20, curve=good, connect_timeout=20) as spool:
            spool.save(out_dir / "tcp.mat", {"a": np.arange(6.0)}).result(10)
        assert (scipy.io.loadmat(out_dir / "tcp.mat")["a"] == np.arange(6.0)).all()

        rogue = ClientKeys(keys["rogue_sec"], keys["server_pub"])
        with pytest.raises(matspool.DaemonUnavailable):
            matspool.Spool(endpoint, ring_bytes=1 << 20, curve=rogue, connect_timeout=2)

        plain = zmq.Context.instance().socket(zmq.DEALER)  # no CURVE at all: no answer
        plain.setsockopt(zmq.LINGER, 0)
        plain.connect(endpoint)
        plain.send_multipart([b"matspool/1", b'{"op":"PING"}'])
        assert plain.poll(1500) == 0
        plain.close()
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(30)


def test_no_pickle_on_the_wire() -> None:
    root = Path(__file__).resolve().parents[1]
    for src in [*root.glob("client/**/*.py"), *root.glob("service/**/*.py")]:
        code = [ln for ln in src.read_text().splitlines() if not ln.lstrip().startswith(("#", '"'))]
        for word in ("import pickle", "pickle.", "recv_pyobj", "send_pyobj", "cPickle"):
            assert not any(word in ln for ln in code), f"{src}: {word}"
