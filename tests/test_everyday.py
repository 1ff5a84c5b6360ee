"""Everyday use without surprises (issue 13): what a new user trips over first.

Each test drives the public API or the ``matspool`` command as a user would, in a
subprocess where the process's own children or signals are what is checked.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import matspool

from conftest import serve_cmd, start_daemon
from readback import read

HERE = Path(__file__).resolve().parent


def _run_python(
    code: str, *, timeout: float = 120, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    full = dict(os.environ)
    full.pop("MATSPOOL_ENDPOINT", None)
    full.update(env or {})
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full,
        cwd=cwd,
    )


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
    t0 = time.monotonic()
    with pytest.raises(matspool.InvalidOptionError, match=r"/tmp/x\.sock.*ipc://"):
        matspool.Spool("/tmp/x.sock", ring_bytes=1 << 20)
    assert time.monotonic() - t0 < 2
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"matspool-{os.getpid()}-")]


def test_env_endpoint_nobody_answers_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = f"ipc://{tmp_path}/nobody.sock"
    monkeypatch.setenv("MATSPOOL_ENDPOINT", missing)
    t0 = time.monotonic()
    with pytest.raises(matspool.DaemonUnavailable) as e:
        matspool.Spool(ring_bytes=1 << 20)
    assert time.monotonic() - t0 < 8
    assert f"MATSPOOL_ENDPOINT={missing}" in str(e.value) and "does not exist" in str(e.value)
    assert "matspool serve" in str(e.value)


def test_stale_socket_file_fails_fast(tmp_path: Path) -> None:
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
    endpoint = f"ipc://{tmp_path}/late.sock"
    proc = subprocess.Popen(serve_cmd(endpoint, tmp_path))
    try:
        with matspool.Spool(endpoint, ring_bytes=1 << 20, timeout=30) as spool:
            spool.save(tmp_path / "late.mat", {"x": 1.0}).result(30)
    finally:
        proc.terminate()
        proc.wait(30)


# -- Python ints as MATLAB double, on request ---------------------------------------------------


@pytest.mark.parametrize("fmt", ["v5", "v7.3"])
def test_int_as_double(spool: Any, out_dir: Path, daemon: Any, fmt: str) -> None:
    values: dict[str, Any] = {
        "step": 7,
        "counts": [1, 2, 3],
        "flag": True,
        "t": 0.5,
        "arr": np.array([4, 5], dtype=np.int32),
    }
    if fmt == "v5":  # (the v7.3 reader here reads plain datasets only)
        values["meta"] = {"n": 2**53, "label": "x"}
    spool.save(out_dir / "d.mat", values, format=fmt, int_as="double").result(30)
    spool.save(out_dir / "i.mat", {"step": 7}, format=fmt).result(30)  # default: numpy's int64
    got = read(out_dir / "d.mat", fmt)
    assert got["step"].dtype == np.float64 and got["step"].item() == 7.0
    assert got["counts"].dtype == np.float64 and got["counts"].tolist() == [[1.0, 2.0, 3.0]]
    assert got["arr"].dtype == np.int32  # arrays keep their class
    assert got["flag"].dtype == bool
    if fmt == "v5":
        assert got["meta"]["n"][0, 0].dtype == np.float64 and got["meta"]["n"][0, 0].item() == 2.0**53
    assert read(out_dir / "i.mat", fmt)["step"].dtype == np.int64
    # the spool's default, and a refusal for an int double cannot hold
    with matspool.Spool(daemon.endpoint, ring_bytes=1 << 20, int_as="double") as s2:
        s2.save(out_dir / "s.mat", {"k": 3}, format=fmt).result(30)
        with pytest.raises(matspool.InvalidVariableError, match=r"'big'.*not exact"):
            s2.save(out_dir / "big.mat", {"big": 2**53 + 1})
    assert read(out_dir / "s.mat", fmt)["k"].dtype == np.float64
    with pytest.raises(matspool.InvalidOptionError, match="int_as"):
        spool.save(out_dir / "x.mat", {"k": 1}, int_as="float")


# -- Ctrl-C while close()/flush() waits; progress from tqdm ------------------------------------

_SLOW_CLIENT = """
    import sys
    import numpy as np
    import matspool
    s = matspool.Spool(sys.argv[1], ring_bytes=1 << 20, timeout=60)
    for i in range(6):
        s.save(f"{sys.argv[2]}/c{i}.mat", {"x": np.full(4, float(i))})
    print("waiting", flush=True)
    getattr(s, sys.argv[3])()
    print("returned", flush=True)
"""


@pytest.mark.parametrize("call", ["close", "flush"])
def test_ctrl_c_says_what_the_wait_is_for_and_twice_abandons(
    tmp_path: Path, out_dir: Path, call: str
) -> None:
    d = start_daemon(out_dir, tmp_path / "sock", "--writers", "1", "--debug-write-delay", "1.0")
    env = {**os.environ, "MATSPOOL_PROGRESS": "0"}
    env.pop("MATSPOOL_ENDPOINT", None)
    try:
        p = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(_SLOW_CLIENT), d.endpoint, str(out_dir), call],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert p.stdout is not None
        assert p.stdout.readline().strip() == "waiting"
        time.sleep(1.0)
        p.send_signal(signal.SIGINT)
        time.sleep(0.8)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        d.stop()
    lines = [ln for ln in err.splitlines() if ln.startswith("matspool:")]
    assert len(lines) == 2, err
    want = rf"{call}\(\) is waiting for [1-6] saves .*\(oldest: .*/c[0-5]\.mat\)"
    assert re.search(want, lines[0]), lines[0]
    assert "Ctrl-C again" in lines[0]
    assert f"{call}() abandoned" in lines[1] and "not confirmed written" in lines[1], lines[1]
    assert "c5.mat" in lines[1]
    assert "returned" not in out
    assert p.returncode != 0  # the KeyboardInterrupt went on up


def test_slow_flush_shows_tqdm_progress_quick_one_does_not(tmp_path: Path, out_dir: Path) -> None:
    d = start_daemon(out_dir, tmp_path / "sock", "--writers", "1", "--debug-write-delay", "0.5")
    code = """
        import sys
        import numpy as np
        import matspool
        with matspool.Spool(sys.argv[1], ring_bytes=1 << 20, timeout=60) as s:
            s.save(f"{sys.argv[2]}/q.mat", {"x": 1.0}).result(30)
            print("QUICK", file=sys.stderr, flush=True)
            s.flush()  # nothing pending: no bar
            for i in range(4):
                s.save(f"{sys.argv[2]}/p{i}.mat", {"x": float(i)})
            s.flush()
            print("SLOW", file=sys.stderr, flush=True)
            s.save(f"{sys.argv[2]}/r.mat", {"x": 1.0})
            s.flush()  # one save, under a second: no bar
        """
    try:
        runs = {}
        for setting in ("1", "0"):
            env = {**os.environ, "MATSPOOL_PROGRESS": setting}
            runs[setting] = subprocess.run(
                [sys.executable, "-c", textwrap.dedent(code), d.endpoint, str(out_dir)],
                capture_output=True,
                text=True,
                timeout=120,
                env=env,
            )
    finally:
        d.stop()
    shown = runs["1"]
    assert shown.returncode == 0, shown.stderr
    before, _, rest = shown.stderr.partition("QUICK")
    slow, _, after = rest.partition("SLOW")
    assert "matspool flush" not in before and "matspool flush" not in after, shown.stderr
    assert "matspool flush" in slow and "/4" in slow, slow  # tqdm's "n/4 [..., save/s]"
    assert "matspool flush" not in runs["0"].stderr
