"""Everyday use without surprises (issue 13): what a new user trips over first.

Each test drives the public API or the ``matspool`` command as a user would, in a
subprocess where the process's own children or signals are what is checked.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent


def _run_python(code: str, *, timeout: float = 120, env: dict[str, str] | None = None,
                cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    full = dict(os.environ)
    full.pop("MATSPOOL_ENDPOINT", None)
    full.update(env or {})
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout, env=full, cwd=cwd)


# -- one embedded daemon per process; a dropped spool frees its ring --------------------------

def test_many_spools_share_one_embedded_daemon_and_free_their_rings(tmp_path: Path) -> None:
    r = _run_python(f"""
        import gc, os
        import numpy as np
        import matspool

        def daemons():
            me = str(os.getpid())
            n = 0
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    with open(f"/proc/{{pid}}/stat") as f:
                        fields = f.read().rsplit(")", 1)[1].split()
                    with open(f"/proc/{{pid}}/cmdline", "rb") as f:
                        cmd = f.read().split(b"\\0")
                except OSError:
                    continue
                if fields[1] == me and fields[0] not in "ZX" and b"matspoold" in cmd and b"serve" in cmd:
                    n += 1
            return n

        seen = set()
        for i in range(20):
            s = matspool.Spool(ring_bytes=1 << 20, timeout=30)
            s.save({str(tmp_path)!r} + f"/f{{i}}.mat", {{"x": np.arange(3.0) + i}}).result(30)
            seen.add(s._embedded.proc.pid)
            assert daemons() == 1, daemons()
            if i % 2:
                s.close()
            del s
            gc.collect()
        rings = [n for n in os.listdir("/dev/shm") if n.startswith(f"matspool-{{os.getpid()}}-")]
        assert rings == [], rings
        assert daemons() <= 1
        print("daemons", len(seen))
        """)
    assert r.returncode == 0, r.stderr
    # dropped spools release the daemon too: with none left between two spools it may be
    # started again, but never more than one at a time (checked in the loop)
    assert "daemons" in r.stdout
    assert len(list(tmp_path.glob("f*.mat"))) == 20


def test_spools_alive_together_share_one_daemon(tmp_path: Path) -> None:
    r = _run_python(f"""
        import os
        import numpy as np
        import matspool
        spools = [matspool.Spool(ring_bytes=1 << 20, timeout=30) for _ in range(5)]
        assert len({{s._embedded.proc.pid for s in spools}}) == 1
        assert len({{s.endpoint for s in spools}}) == 1
        proc = spools[0]._embedded.proc
        for i, s in enumerate(spools):
            s.save({str(tmp_path)!r} + f"/g{{i}}.mat", {{"x": np.ones(2) * i}})
        for s in spools[:-1]:
            s.close()
            assert proc.poll() is None  # others still use it
        spools[-1].close()
        assert proc.wait(30) == 0  # the last one stopped it
        """)
    assert r.returncode == 0, r.stderr
    assert len(list(tmp_path.glob("g*.mat"))) == 5


# -- a wrong endpoint fails Spool() in seconds, saying what to do ----------------------------

def test_endpoint_without_scheme_is_refused_at_once() -> None:
    import matspool

    t0 = time.monotonic()
    with pytest.raises(matspool.InvalidOptionError, match=r"/tmp/x\.sock.*ipc://"):
        matspool.Spool("/tmp/x.sock", ring_bytes=1 << 20)
    assert time.monotonic() - t0 < 2
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"matspool-{os.getpid()}-")]


def test_env_endpoint_nobody_answers_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import matspool

    missing = f"ipc://{tmp_path}/nobody.sock"
    monkeypatch.setenv("MATSPOOL_ENDPOINT", missing)
    t0 = time.monotonic()
    with pytest.raises(matspool.DaemonUnavailable) as e:
        matspool.Spool(ring_bytes=1 << 20)
    assert time.monotonic() - t0 < 8
    assert f"MATSPOOL_ENDPOINT={missing}" in str(e.value) and "does not exist" in str(e.value)
    assert "matspool serve" in str(e.value)


def test_stale_socket_file_fails_fast(tmp_path: Path) -> None:
    import matspool

    path = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))  # bound, never listening: what a killed daemon leaves behind
    try:
        t0 = time.monotonic()
        with pytest.raises(matspool.DaemonUnavailable, match="refuses connections"):
            matspool.Spool(f"ipc://{path}", ring_bytes=1 << 20)
        assert time.monotonic() - t0 < 8
    finally:
        s.close()


def test_daemon_that_starts_late_is_still_reached(tmp_path: Path) -> None:
    """The grace period: a job script starting the daemon and the client together."""
    import matspool

    endpoint = f"ipc://{tmp_path}/late.sock"
    proc = subprocess.Popen([sys.executable, "-m", "matspoold", "serve", "--endpoint", endpoint,
                             "--root", str(tmp_path), "--log-level", "warning"])
    try:
        with matspool.Spool(endpoint, ring_bytes=1 << 20, timeout=30) as spool:
            spool.save(tmp_path / "late.mat", {"x": 1.0}).result(30)
    finally:
        proc.terminate()
        proc.wait(30)


# -- tensor subclasses saved as tensors; float8 widened exactly; refusals say what to do -------

torch = pytest.importorskip("torch")


class _Tagged(torch.Tensor):  # type: ignore[misc]
    """A user's own subclass, as ``as_subclass`` makes them (module ``tests...``, not torch)."""


@pytest.mark.parametrize("fmt", ["v5", "v7.3"])
def test_tensor_subclasses_saved_as_tensors(spool: Any, out_dir: Path, fmt: str) -> None:
    from readback import assert_variables, read

    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    values = {"tagged": base.as_subclass(_Tagged),
              "param": torch.nn.Parameter(base * 2),
              "double": (base.double() + 0.5).as_subclass(_Tagged)}
    spool.save(out_dir / "sub.mat", values, format=fmt).result(30)
    want = {k: v.detach().as_subclass(torch.Tensor).numpy() for k, v in values.items()}
    assert_variables(read(out_dir / "sub.mat", fmt), want)


@pytest.mark.parametrize("fmt", ["v5", "v7.3"])
def test_float8_widens_exactly_to_single(spool: Any, out_dir: Path, fmt: str) -> None:
    from readback import read

    kinds = [getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz",
                                         "float8_e5m2fnuz") if hasattr(torch, n)]
    assert kinds, "this torch has no float8 types"
    src = torch.tensor([0.0, 1.0, -2.5, 0.125, 448.0, -0.001953125, 3.0e-3, 57344.0])
    values = {f"v{i}": src.to(k) for i, k in enumerate(kinds)}
    spool.save(out_dir / "f8.mat", values, format=fmt).result(30)
    got = read(out_dir / "f8.mat", fmt)
    for name, t in values.items():
        want = t.to(torch.float32).numpy().reshape(1, -1)
        assert got[name].dtype == np.float32, (name, got[name].dtype)
        np.testing.assert_array_equal(got[name].reshape(1, -1), want, err_msg=name)


def test_dtensor_refused_with_what_to_do(tmp_path: Path) -> None:
    """A DTensor (one rank of gloo here) is refused naming the variable and the way out;
    its local tensor is saved like any tensor."""
    r = _run_python(f"""
        import os
        import numpy as np, scipy.io, torch, torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import distribute_tensor, Shard
        import matspool
        dist.init_process_group("gloo", init_method="file://{tmp_path}/store", rank=0, world_size=1)
        mesh = init_device_mesh("cpu", (1,))
        d = distribute_tensor(torch.arange(6.0).reshape(2, 3), mesh, [Shard(0)])
        with matspool.Spool(ring_bytes=1 << 20, timeout=30) as s:
            try:
                s.save("{tmp_path}/d.mat", {{"field": d}})
            except matspool.UnsupportedTypeError as e:
                print("refused:", e)
            s.save("{tmp_path}/d.mat", {{"field": d.to_local()}}, format="v5").result(30)
        np.testing.assert_array_equal(scipy.io.loadmat("{tmp_path}/d.mat")["field"],
                                      np.arange(6.0).reshape(2, 3))
        dist.destroy_process_group()
        """)
    assert r.returncode == 0, r.stderr
    assert "refused:" in r.stdout and "'field'" in r.stdout and ".full_tensor()" in r.stdout
