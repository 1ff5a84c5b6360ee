"""A remote writer: the client in one network namespace, the daemon in another, over TCP
with CURVE. Payloads travel as ZeroMQ frames straight from the client's ring.

The namespaces and the veth link between them are made by the test (root is needed; CI
runs as root). Where they cannot be made, the same checks run over loopback and the test
says so in its output.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import mat73
import numpy as np
import pytest
import scipy.io

from matspool._curve import make_keys

from conftest import serve_cmd

PORT = 5719
CLIENT = textwrap.dedent("""
    import json, sys, numpy as np, matspool
    endpoint, out, secret, server_pub = sys.argv[1:5]
    keys = matspool.ClientKeys(secret, server_pub)
    result = {}
    try:
        with matspool.Spool(endpoint, ring_bytes=1 << 20, curve=keys, connect_timeout=float(sys.argv[5]),
                            timeout=30) as spool:
            rng = np.random.default_rng(3)
            x = rng.standard_normal((300, 200))
            futs = [spool.save(f"{out}/r5.mat", {"x": x, "n": 7, "meta": {"host": "b"}}, format="v5"),
                    spool.save(f"{out}/r73.mat", {"x": x.astype(np.float32), "c": x[:4, :3] + 1j},
                               format="v7.3"),
                    spool.save(f"{out}/big.mat", {"big": rng.standard_normal((1000, 600))})]  # > ring
            with spool.stream(f"{out}/run.mat") as s:
                for k in range(3):
                    s.append(u=np.full((4, 5), k, np.float32))
            spool.flush()
            result["files"] = [f.result().path for f in futs]
    except matspool.MatspoolError as e:
        result["error"] = type(e).__name__
    print(json.dumps(result))
""")


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def hosts() -> Iterator[tuple[list[str], list[str], str]]:
    """(command prefix for the daemon's host, for the client's host, daemon address)."""
    tag = f"{os.getpid() % 100000}"
    a, b = f"mspa{tag}", f"mspb{tag}"
    made: list[str] = []
    try:
        if os.geteuid() != 0 or shutil.which("ip") is None:
            raise OSError("needs root and iproute2")
        for ns in (a, b):
            _ip("netns", "add", ns)
            made.append(ns)
        _ip("link", "add", f"va{tag}", "type", "veth", "peer", "name", f"vb{tag}")
        _ip("link", "set", f"va{tag}", "netns", a)
        _ip("link", "set", f"vb{tag}", "netns", b)
        _ip("-n", a, "addr", "add", "10.213.7.1/24", "dev", f"va{tag}")
        _ip("-n", b, "addr", "add", "10.213.7.2/24", "dev", f"vb{tag}")
        for ns, dev in ((a, f"va{tag}"), (b, f"vb{tag}")):
            _ip("-n", ns, "link", "set", dev, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield ["ip", "netns", "exec", a], ["ip", "netns", "exec", b], "10.213.7.1"
    except (OSError, subprocess.CalledProcessError) as e:
        print(f"\nnetwork namespaces unavailable ({e}); testing over loopback instead")
        yield [], [], "127.0.0.1"
    finally:
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def _client(
    prefix: list[str], endpoint: str, out: Path, secret: str, server_pub: str, connect_timeout: float
) -> dict:
    r = subprocess.run(
        [*prefix, sys.executable, "-c", CLIENT, endpoint, str(out), secret, server_pub, str(connect_timeout)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_remote_client_writes_through_tcp_and_unknown_keys_are_refused(hosts, tmp_path: Path) -> None:
    daemon_host, client_host, address = hosts
    out = tmp_path / "out"
    out.mkdir()
    server_pub, server_sec = make_keys(str(tmp_path / "server"), "server")
    _, client_sec = make_keys(str(tmp_path / "clients"), "client")
    _, rogue_sec = make_keys(str(tmp_path / "rogue"), "rogue")
    endpoint = f"tcp://{address}:{PORT}"
    daemon = subprocess.Popen(
        [
            *daemon_host,
            *serve_cmd(
                endpoint, out, "--curve-secret", server_sec, "--curve-clients", str(tmp_path / "clients")
            ),
        ]
    )
    try:
        time.sleep(1.5)
        assert daemon.poll() is None
        ok = _client(client_host, endpoint, out, client_sec, server_pub, 30)
        assert "error" not in ok, ok
        rng = np.random.default_rng(3)
        x = rng.standard_normal((300, 200))
        m = scipy.io.loadmat(out / "r5.mat")
        np.testing.assert_array_equal(m["x"], x)
        assert m["n"][0, 0] == 7 and m["meta"]["host"][0, 0][0] == "b"
        m = mat73.loadmat(out / "r73.mat")
        np.testing.assert_array_equal(m["x"], x.astype(np.float32))
        np.testing.assert_array_equal(m["c"], x[:4, :3] + 1j)
        np.testing.assert_array_equal(
            scipy.io.loadmat(out / "big.mat")["big"], rng.standard_normal((1000, 600))
        )
        run = mat73.loadmat(out / "run.mat")["u"]
        assert run.shape == (4, 5, 3) and (run[:, :, 2] == 2).all()

        rogue = _client(client_host, endpoint, tmp_path, rogue_sec, server_pub, 2)
        assert rogue == {"error": "AuthenticationFailed"}  # a DaemonUnavailable, by name
        assert daemon.poll() is None
        assert sorted(p.name for p in out.iterdir()) == ["big.mat", "r5.mat", "r73.mat", "run.mat"]
    finally:
        daemon.terminate()
        daemon.wait(30)
