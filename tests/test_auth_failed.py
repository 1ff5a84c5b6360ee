"""Issue 11 item 5: a refused CURVE key fails ``Spool()`` at once, by name, leaving no thread.

Before: an unknown client key took the whole connect timeout (10 s in the issue) to fail
with "no matspool daemon answered", and the I/O thread stayed blocked in a send. Now
ZeroMQ's handshake-failure monitor events become :class:`matspool.AuthenticationFailed`
naming the endpoint and the key. Each case runs against a real daemon on 127.0.0.1.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import test_security
import zmq.auth
from test_security import _free_port, _serve

import matspool
from matspool import ClientKeys
from matspool._curve import make_keys
from matspool._transport import _CUT_LIMIT

from conftest import wait_tcp

keys = test_security.keys  # the fixture, shared

CONNECT_TIMEOUT = 20.0  # the failures must come long before this


@pytest.fixture
def tcp_daemon(keys: dict[str, str], out_dir: Path) -> Iterator[str]:
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    proc = _serve(endpoint, out_dir, "--curve-secret", keys["server_sec"], "--curve-clients", keys["clients"])
    try:
        wait_tcp(endpoint, proc)
        good = ClientKeys(keys["client_sec"], keys["server_pub"])  # up and serving
        with matspool.Spool(endpoint, ring_bytes=1 << 20, curve=good, connect_timeout=30):
            pass
        yield endpoint
        assert proc.poll() is None, "the daemon died"
    finally:
        proc.terminate()
        proc.wait(30)


def _refused(endpoint: str, curve: ClientKeys | None) -> tuple[BaseException, float]:
    before = set(threading.enumerate())
    t0 = time.monotonic()
    with pytest.raises(Exception) as info:
        matspool.Spool(endpoint, ring_bytes=1 << 20, curve=curve, connect_timeout=CONNECT_TIMEOUT)
    took = time.monotonic() - t0
    time.sleep(0.2)
    left = [t for t in set(threading.enumerate()) - before if t.is_alive()]
    assert not left, f"threads left behind: {left}"
    return info.value, took


def test_unknown_client_key(tcp_daemon: str, keys: dict[str, str]) -> None:
    rogue = ClientKeys(keys["rogue_sec"], keys["server_pub"])
    err, took = _refused(tcp_daemon, rogue)
    assert isinstance(err, matspool.AuthenticationFailed), repr(err)
    assert isinstance(err, matspool.DaemonUnavailable)
    public = zmq.auth.load_certificate(keys["rogue_sec"])[0].decode()
    assert tcp_daemon in str(err) and public in str(err) and "refused this client's public key" in str(err)
    assert took < 5, f"took {took:.1f} s"


def test_wrong_server_key(tcp_daemon: str, keys: dict[str, str], tmp_path: Path) -> None:
    other_pub, _ = make_keys(str(tmp_path / "impostor"), "impostor")
    wrong = ClientKeys(keys["client_sec"], other_pub)
    err, took = _refused(tcp_daemon, wrong)
    assert isinstance(err, matspool.AuthenticationFailed), repr(err)
    expected = zmq.auth.load_certificate(other_pub)[0].decode()
    assert tcp_daemon in str(err) and expected in str(err) and "server" in str(err)
    assert took < 5, f"took {took:.1f} s"


def test_no_keys(tcp_daemon: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MATSPOOL_CURVE_CLIENT_SECRET", raising=False)
    monkeypatch.delenv("MATSPOOL_CURVE_SERVER_PUBLIC", raising=False)
    err, took = _refused(tcp_daemon, None)
    assert isinstance(err, ValueError) and "TCP endpoint" in str(err) and "ClientKeys" in str(err)
    assert took < 1


def _cut_handshakes(port: int, count: int, ready: threading.Event) -> None:
    """Stand in for a daemon killed mid-handshake ``count`` times: accept on ``port``, read
    the client's greeting, and reset the connection (SO_LINGER 0: an RST, as a kill gives)."""
    import socket
    import struct

    with socket.socket() as srv:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", port))
        srv.listen(8)
        ready.set()
        srv.settimeout(20)
        for _ in range(count):
            conn, _ = srv.accept()
            with conn:
                conn.settimeout(5)
                try:
                    conn.recv(64)
                except OSError:
                    pass
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def test_curve_handshake_cut_by_a_dying_daemon_is_retried(keys: dict[str, str], out_dir: Path) -> None:
    """A CURVE daemon killed (or restarted) mid-handshake cuts the connection; that says
    nothing about keys, so the client reconnects to the daemon that comes back instead of
    failing for good with AuthenticationFailed (it did: one cut handshake was fatal)."""
    port = _free_port()
    endpoint = f"tcp://127.0.0.1:{port}"
    ready = threading.Event()
    cutter = threading.Thread(target=_cut_handshakes, args=(port, _CUT_LIMIT - 1, ready), daemon=True)
    cutter.start()
    assert ready.wait(10)
    result: dict[str, object] = {}

    def connect() -> None:
        good = ClientKeys(keys["client_sec"], keys["server_pub"])
        try:
            with matspool.Spool(endpoint, ring_bytes=1 << 20, curve=good, connect_timeout=30) as s:
                result["saved"] = s.save(out_dir / "after-cuts.mat", {"x": [1.0, 2.0]}).result(30)
        except Exception as e:  # noqa: BLE001 - the test reports it
            result["error"] = e

    client = threading.Thread(target=connect)
    client.start()
    cutter.join(30)
    assert not cutter.is_alive(), "the client did not try twice"
    proc = _serve(endpoint, out_dir, "--curve-secret", keys["server_sec"], "--curve-clients", keys["clients"])
    try:
        client.join(60)
        assert "error" not in result, repr(result.get("error"))
        assert (out_dir / "after-cuts.mat").exists()
    finally:
        proc.terminate()
        proc.wait(30)
