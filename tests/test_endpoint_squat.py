"""Issue 11 item 3: another local user squats the default endpoint's directory.

With no ``XDG_RUNTIME_DIR`` the default endpoint is ``/tmp/matspool-<uid>/matspool/
matspool.sock``. A second real unix user (the squatter) makes that directory first and
runs a fake daemon there that answers DONE to everything. Before the fix the victim's
save "succeeded" with no file (and its paths went to the squatter); now the client
refuses to connect and ``matspool serve`` exits with 2 and one line, both naming the
directory. The unit cases cover the rules themselves (symlink, mode, group).

Both users run as forked children of this (root) process that drop to their uid, since
the interpreter's own files are not readable by other users here.
"""

from __future__ import annotations

import contextlib
import grp
import io
import json
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import zmq

import matspool
import matspool._spool
from matspool import _messages as msgs
from matspool import _protocol as proto
from matspool._endpoint import check_ipc_endpoint
from matspoold import cli, server  # noqa: F401 - likewise

from conftest import serve_cmd, system_user, wait_ready

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run as two local users")


def _fork_as(user: pwd.struct_passwd, action: Callable[[], str]) -> tuple[int, int]:
    """Start ``action`` in a child running as ``user``; (pid, read end of its report)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os.close(r)
        text = "error: no report"
        try:
            os.setgroups([])
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
            os.environ.pop("XDG_RUNTIME_DIR", None)
            os.environ["HOME"] = "/tmp"
            text = action()
        except BaseException as e:  # noqa: BLE001 - reported to the parent
            text = f"raised {type(e).__name__}: {e}"
        os.write(w, text.encode()[:60000])
        os._exit(0)
    os.close(w)
    return pid, r


def _report(pid: int, r: int, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    with os.fdopen(r, "rb") as f:
        return f.read().decode()


def _fake_daemon(endpoint: str, seen: str, ready: str) -> Callable[[], str]:
    """The squatter: makes the victim's default directory, binds there, answers everything
    with success, and writes down the paths it was told about."""

    def run() -> str:
        path = endpoint[len("ipc://") :]
        os.makedirs(os.path.dirname(path), mode=0o777, exist_ok=True)
        for d in (os.path.dirname(path), os.path.dirname(os.path.dirname(path))):
            os.chmod(d, 0o777)
        ctx = zmq.Context()
        sock = ctx.socket(zmq.ROUTER)
        sock.bind(endpoint)
        os.chmod(path, 0o777)
        Path(ready).write_text("1")
        paths: list[str] = []
        end = time.monotonic() + 25
        while time.monotonic() < end and not os.path.exists(ready + ".stop"):
            if not sock.poll(100):
                continue
            ident, tag, body, *_ = sock.recv_multipart()
            raw = proto.decode_head(tag, body)
            for one in msgs.Batch.from_wire(raw).msgs if raw["op"] == "BATCH" else [raw]:
                op = one["op"]
                if op == "HELLO":
                    reply: msgs.Reply = msgs.Welcome(os.getpid(), "squatter", proto.TAG.decode())
                elif op == "PING":
                    reply = msgs.Pong("squatter", os.getpid())
                elif op == "WRITE":
                    paths.append(one["path"])
                    reply = msgs.Done(((one["seq"], 128),))
                else:
                    continue
                sock.send_multipart([ident, *msgs.encode(reply)])
        Path(seen).write_text(json.dumps(paths))
        sock.close(0)
        ctx.term()
        return "served"

    return run


@pytest.fixture
def squatted() -> Iterator[dict[str, object]]:
    squatter, victim = system_user("matspool-test"), system_user("matspool-victim")
    base = Path(f"/tmp/matspool-{victim.pw_uid}")
    shutil.rmtree(base, ignore_errors=True)
    tmp_path = Path(tempfile.mkdtemp(prefix="matspool-squat-"))  # pytest's is root's alone
    tmp_path.chmod(0o777)  # both users leave notes here
    endpoint = f"ipc://{base}/matspool/matspool.sock"
    seen, ready = str(tmp_path / "seen.json"), str(tmp_path / "ready")
    pid, r = _fork_as(squatter, _fake_daemon(endpoint, seen, ready))
    deadline = time.monotonic() + 20
    while not os.path.exists(ready) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert os.path.exists(ready), _report(pid, r, 1)
    out = tmp_path / "victim-out"
    out.mkdir()
    os.chown(out, victim.pw_uid, victim.pw_gid)
    try:
        yield {"victim": victim, "endpoint": endpoint, "out": out, "base": base, "seen": seen}
    finally:
        Path(ready + ".stop").write_text("1")
        _report(pid, r, 10)
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(tmp_path, ignore_errors=True)


def test_client_refuses_a_default_endpoint_another_user_made(squatted: dict) -> None:
    victim, out = squatted["victim"], squatted["out"]

    def save() -> str:
        os.environ["MATSPOOL_ENDPOINT"] = squatted["endpoint"]
        try:
            with matspool.Spool(ring_bytes=1 << 20, connect_timeout=5, timeout=5) as sp:
                sp.save(out / "secret.mat", {"a": np.arange(3.0)}).result(5)
        except matspool.DaemonUnavailable as e:
            return f"refused: {e}"
        return "saved, file exists" if (out / "secret.mat").exists() else "saved, NO FILE"

    report = _report(*_fork_as(victim, save))
    # before the fix: "saved, NO FILE", and the squatter had the path
    assert report.startswith("refused: unsafe endpoint directory"), report
    assert str(squatted["base"]) in report and "matspool-test" in report, report
    Path(squatted["seen"]).parent.joinpath("ready.stop").write_text("1")
    time.sleep(0.5)
    seen = json.loads(Path(squatted["seen"]).read_text()) if Path(squatted["seen"]).exists() else []
    assert not any("secret" in p for p in seen), seen


def test_serve_refuses_a_default_endpoint_another_user_made(squatted: dict) -> None:
    victim, out = squatted["victim"], squatted["out"]

    def serve() -> str:
        os.environ.pop("MATSPOOL_ENDPOINT", None)
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                rc = cli.main(["serve", "--root", str(out), "--log-level", "warning"])
            except SystemExit as e:
                rc = e.code  # type: ignore[assignment]
        return json.dumps({"rc": rc, "stderr": err.getvalue()})

    got = json.loads(_report(*_fork_as(squatted["victim"], serve)))
    assert got["rc"] == 2, got
    lines = got["stderr"].strip().splitlines()
    assert len(lines) == 1 and "unsafe endpoint directory" in lines[0], got
    assert str(squatted["base"]) in lines[0] and "Traceback" not in got["stderr"], got
    del victim


def test_ping_refuses_a_default_endpoint_another_user_made(squatted: dict) -> None:
    def ping() -> str:
        os.environ.pop("MATSPOOL_ENDPOINT", None)
        err, out = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            rc = cli.main(["ping"])
        return json.dumps({"rc": rc, "stderr": err.getvalue(), "stdout": out.getvalue()})

    got = json.loads(_report(*_fork_as(squatted["victim"], ping)))
    # before: rc 0, "matspool daemon at ... is up (instance squatter)"
    assert got["rc"] == 2 and "unsafe endpoint directory" in got["stderr"], got
    assert "squatter" not in got["stdout"], got


# -- the rules, one by one, as this (root) user ---------------------------------------------
def test_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    sock = tmp_path / "d"
    sock.mkdir(mode=0o755)
    check_ipc_endpoint(f"ipc://{sock}/s.sock")  # ours, not writable by others: fine
    check_ipc_endpoint(f"ipc://{tmp_path}/missing/s.sock")  # nothing there yet
    sock.chmod(0o757)
    with pytest.raises(matspool.DaemonUnavailable, match="any user can replace"):
        check_ipc_endpoint(f"ipc://{sock}/s.sock")
    sock.chmod(0o775)
    with pytest.raises(matspool.DaemonUnavailable, match="chmod g-w"):
        check_ipc_endpoint(f"ipc://{sock}/s.sock")
    check_ipc_endpoint(f"ipc://{sock}/s.sock", group_gid=os.stat(sock).st_gid)  # --group
    sock.chmod(0o755)
    with pytest.raises(matspool.DaemonUnavailable, match="configured --group"):
        check_ipc_endpoint(f"ipc://{sock}/s.sock", group_gid=os.stat(sock).st_gid + 1)
    link = tmp_path / "link"
    link.symlink_to(sock)
    with pytest.raises(matspool.DaemonUnavailable, match="symbolic link"):
        check_ipc_endpoint(f"ipc://{link}/s.sock")
    with pytest.raises(matspool.DaemonUnavailable, match="any user can replace"):
        check_ipc_endpoint("ipc:///tmp/loose.sock")  # /tmp itself: a directory of its own, please


def test_default_endpoint_dirs_must_be_private(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    d = tmp_path / "matspool"
    d.mkdir(mode=0o750)
    d.chmod(0o750)
    endpoint = f"ipc://{d}/matspool.sock"
    with pytest.raises(matspool.DaemonUnavailable, match=f"chmod 700 {d}"):
        check_ipc_endpoint(endpoint)
    d.chmod(0o700)
    check_ipc_endpoint(endpoint)
    other = system_user("matspool-test")
    os.chown(d, other.pw_uid, -1)
    with pytest.raises(matspool.DaemonUnavailable, match="belongs to matspool-test"):
        check_ipc_endpoint(endpoint)


def test_node_directory_of_the_daemon_account_in_a_root_parent(tmp_path: Path) -> None:
    """``/run/matspool`` owned by the daemon's account and group: clients accept it,
    since only root could have put it in a parent only root writes to."""
    other = system_user("matspool-test")
    parent = tmp_path / "run"
    parent.mkdir(mode=0o755)
    node = parent / "matspool"
    node.mkdir(mode=0o750)
    os.chown(node, other.pw_uid, grp.getgrnam("matspool-test").gr_gid)
    check_ipc_endpoint(f"ipc://{node}/matspool.sock")
    parent.chmod(0o1777)  # ... but in a directory anyone writes to, anyone could have
    with pytest.raises(matspool.DaemonUnavailable, match="belongs to matspool-test"):
        check_ipc_endpoint(f"ipc://{node}/matspool.sock")


def test_serve_checks_the_group_of_a_shared_socket_directory(tmp_path: Path) -> None:
    """``--group``: the directory's group must be the configured one (a node socket)."""
    system_user("matspool-test")
    group = "matspool-test"
    sock = tmp_path / "run"
    sock.mkdir(mode=0o750)
    out = tmp_path / "out"
    out.mkdir()
    endpoint = f"ipc://{sock}/matspool.sock"
    cmd = serve_cmd(endpoint, out, "--group", group, "--socket-mode", "660")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r
    assert r.stderr.count("\n") == 1 and "configured --group" in r.stderr and str(sock) in r.stderr, r
    os.chown(sock, -1, grp.getgrnam(group).gr_gid)
    proc = subprocess.Popen(cmd)
    try:
        assert wait_ready(endpoint, proc)
        st = os.stat(endpoint[len("ipc://") :])
        assert st.st_gid == grp.getgrnam(group).gr_gid and st.st_mode & 0o777 == 0o660
    finally:
        proc.terminate()
        proc.wait(30)
