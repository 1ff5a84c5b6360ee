"""Sharded saves through a remote (tcp://, CURVE) daemon: a rank's blocks travel as frames
of their PLACE messages (no ring is shared with a daemon on another host).

One rank of a gloo group (its store is all a sharded save uses) against a daemon on
loopback tcp with CURVE keys: blocks that fit the 1 MiB ring, a block beyond it (in
pieces), a v5 complex variable (real and imaginary parts placed apart) and a sharded
stream's two steps; every file read back and compared exactly.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from ranks import free_port

from matspool._curve import make_keys

from conftest import serve_cmd, wait_tcp

pytest.importorskip("torch")

_RANK = textwrap.dedent("""
    import sys, numpy as np, torch.distributed as dist
    import matspool
    sys.path.insert(0, {tests!r})
    from readback import assert_exact, read
    dist.init_process_group("gloo", init_method="file://{tmp}/store", rank=0, world_size=1)
    rng = np.random.default_rng(4)
    u = rng.standard_normal((300, 200))                      # 480 KB: fits the ring
    big = rng.standard_normal((600, 500))                    # 2.4 MB: beyond it, in pieces
    c = rng.standard_normal((6, 5)) + 1j * rng.standard_normal((6, 5))
    keys = matspool.ClientKeys({secret!r}, {public!r})
    S = matspool.Shard
    with matspool.Spool({endpoint!r}, ring_bytes=1 << 20, curve=keys, timeout=60) as s:
        s.save("{out}/a.mat", {{"u": S(u, (0, 0), u.shape), "big": S(big, (0, 0), big.shape)}},
               format="v7.3").result(60)
        s.save("{out}/c.mat", {{"c": S(c, (0, 0), c.shape), "n": 3.0}}, format="v5").result(60)
        st = s.stream("{out}/s.mat")
        for k in range(2):
            st.append(u=S(u[:, :50] + k, (0, 0), (300, 50))).result(60)
        st.close()
    a = read("{out}/a.mat", "v7.3")
    assert_exact(a["u"], u, "u")
    assert_exact(a["big"], big, "big")
    v5 = read("{out}/c.mat", "v5")
    assert_exact(v5["c"], c, "c")
    assert_exact(read("{out}/s.mat", "v7.3")["u"], np.stack([u[:, :50], u[:, :50] + 1], axis=-1), "stream")
    dist.destroy_process_group()
    print("exact")
""")


def test_sharded_saves_through_a_tcp_daemon(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    server_pub, server_sec = make_keys(str(tmp_path / "server"), "server")
    _, client_sec = make_keys(str(tmp_path / "clients"), "client")
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    cmd = serve_cmd(endpoint, out, "--curve-secret", server_sec, "--curve-clients", str(tmp_path / "clients"))
    daemon = subprocess.Popen(cmd)
    try:
        wait_tcp(endpoint, daemon)
        code = _RANK.format(
            tests=str(Path(__file__).parent),
            tmp=tmp_path,
            out=out,
            endpoint=endpoint,
            secret=client_sec,
            public=server_pub,
        )
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "exact" in r.stdout, r.stderr[-3000:]
        assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary left
    finally:
        daemon.terminate()
        daemon.wait(10)
