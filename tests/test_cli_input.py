"""Every ``matspool`` command given bad input exits 2 with one line naming the problem
(issue 13), never a traceback; ``--version``; ``keygen`` keeps keys without ``--force``;
``status --watch`` refreshes until Ctrl-C, which is a normal exit."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import start_daemon


def _cli(*args: str, cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("MATSPOOL_ENDPOINT", None)
    return subprocess.run(
        [sys.executable, "-m", "matspoold", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=cwd,
    )


@pytest.fixture
def busy_port() -> Iterator[int]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    try:
        yield s.getsockname()[1]
    finally:
        s.close()


def _bad_inputs(tmp: Path, port: int) -> dict[str, tuple[list[str], str]]:
    """name -> (argv, a word the one line must hold)."""
    bad_toml = tmp / "bad.toml"
    bad_toml.write_text("[serve]\nwriterz = 2\n")
    sock = f"ipc://{tmp}/d.sock"
    return {
        "demo unwritable --out": (
            ["demo", "--out", "/proc/nope/out", "--steps", "1", "--size", "8"],
            "/proc/nope/out",
        ),
        "demo --steps 0": (["demo", "--steps", "0"], "--steps"),
        "demo --size x": (["demo", "--size", "x"], "--size"),
        "ping endpoint without scheme": (["ping", "--endpoint", "/tmp/x.sock"], "ipc://"),
        "status endpoint without scheme": (["status", "--endpoint", "/tmp/x.sock"], "ipc://"),
        "status --watch 0": (["status", "--watch", "0"], "--watch"),
        "status --timeout -1": (["status", "--timeout", "-1"], "--timeout"),
        "serve endpoint without scheme": (
            ["serve", "--endpoint", "/tmp/x.sock", "--root", str(tmp)],
            "/tmp/x.sock",
        ),
        "serve busy --metrics": (
            ["serve", "--endpoint", sock, "--root", str(tmp), "--metrics", f"127.0.0.1:{port}"],
            str(port),
        ),
        "serve unknown key": (["serve", "--config", str(bad_toml)], "writerz"),
        "serve unknown flag": (["serve", "--writerz", "2"], "--writerz"),
        "serve --writers 0": (["serve", "--writers", "0", "--endpoint", sock, "--root", str(tmp)], "writers"),
        "serve missing root": (["serve", "--endpoint", sock, "--root", str(tmp / "nope")], "nope"),
        "serve missing config": (["serve", "--config", str(tmp / "none.toml")], "none.toml"),
        "keygen into a missing dir": (["keygen", "/proc/nope"], "/proc/nope"),
        "unknown command": (["frobnicate"], "frobnicate"),
        "verify without files": (["verify"], "FILE"),
    }


def test_every_command_given_bad_input_exits_2_with_one_line(tmp_path: Path, busy_port: int) -> None:
    failures = []
    for name, (argv, word) in _bad_inputs(tmp_path, busy_port).items():
        r = _cli(*argv, cwd=tmp_path)
        lines = r.stderr.strip().splitlines()
        ok = r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr and word in lines[0]
        if not ok:
            failures.append(f"{name}: exit {r.returncode}, stderr {r.stderr!r}")
    assert not failures, "\n".join(failures)


def test_version() -> None:
    r = _cli("--version")
    assert r.returncode == 0 and r.stdout.startswith("matspool "), r
    assert r.stdout.split()[1][0].isdigit() or "unknown" in r.stdout


def test_keygen_keeps_existing_keys_without_force(tmp_path: Path) -> None:
    assert _cli("keygen", str(tmp_path)).returncode == 0
    secret = tmp_path / "matspool.key_secret"
    before = secret.read_bytes()
    r = _cli("keygen", str(tmp_path))
    assert r.returncode == 2 and "--force" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert secret.read_bytes() == before
    r = _cli("keygen", str(tmp_path), "--force")
    assert r.returncode == 0, r.stderr
    assert secret.read_bytes() != before
    assert secret.stat().st_mode & 0o077 == 0


def test_status_watch_refreshes_until_ctrl_c(tmp_path: Path, out_dir: Path) -> None:
    d = start_daemon(out_dir, tmp_path / "sock")
    try:
        p = subprocess.Popen(
            [sys.executable, "-m", "matspoold", "status", "--endpoint", d.endpoint, "--watch", "0.2"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert p.stdout is not None
        heads = 0
        deadline = time.monotonic() + 30
        while heads < 3 and time.monotonic() < deadline:
            line = p.stdout.readline()
            heads += line.startswith("matspool status --watch")
            if line.startswith("daemon pid"):
                assert d.endpoint in line
        assert heads == 3, "the table was not refreshed"
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=30)
    finally:
        d.stop()
    assert p.returncode == 0, err
    assert "Traceback" not in err
