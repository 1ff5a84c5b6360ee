"""The node daemon that writes as each job's user (``matspoold.userd``), with real users.

The node daemon runs as root, as deploy/systemd runs it; clients run as two other unix
users (``runuser``), with the default API (``MATSPOOL_ENDPOINT`` set, as taskprolog.sh
does) and nothing else: no group, no ``sg``, no ring mode. Each user's directory is
0700. The kernel is the judge throughout: a file is the user's because a process with the
user's ids created it; another user is refused because that process lacks the rights.

Needs root (a daemon that changes ids, second users); skips saying so otherwise.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from conftest import grant_traverse, system_user
from readback import assert_variables, read

REPO = Path(__file__).resolve().parent.parent
USERS = ("matspool-alice", "matspool-bob")
UNIT = REPO / "deploy" / "systemd" / "matspool.service"
# the unit's CapabilityBoundingSet=, as setpriv spells it (+setuid,+setgid,+chown)
UNIT_CAPS = ",".join(
    "+" + c.removeprefix("CAP_").lower()
    for ln in UNIT.read_text().splitlines()
    if ln.startswith("CapabilityBoundingSet=")
    for c in ln.split("=", 1)[1].split()
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: a daemon that writes as other users")


@dataclass
class User:
    name: str
    uid: int
    gid: int
    out: Path  # the user's own output directory, 0700


@dataclass
class Node:
    base: Path
    endpoint: str
    sock: Path
    proc: subprocess.Popen[bytes]
    log: Path
    alice: User
    bob: User


def _pids_of(uid: int) -> list[str]:
    """Processes running with ``uid`` (from their status: /proc/<pid> of a non-dumpable
    process belongs to root)."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            uids = next(ln for ln in (d / "status").read_text().splitlines() if ln.startswith("Uid:"))
            if int(uids.split()[1]) == uid:
                cmdline = (d / "cmdline").read_bytes().replace(b"\0", b" ")[:100]
                found.append(f"{d.name} {cmdline!r}")
        except (OSError, StopIteration):
            continue
    return found


def _start_broker(
    base: Path, endpoint: str, out: Path, user: str | None = None, state: Path | None = None
) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable,
        "-m",
        "matspoold.userd",
        "--endpoint",
        endpoint,
        "--state-dir",
        str(state or base / "state"),
        "--idle-exit",
        "2",
        "--",
        "--root",
        str(out),
        "--log-level",
        "info",
    ]
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{REPO}/client:{REPO}/service"}
    ids: dict[str, object] = {}
    if user is not None:  # started as that user directly, so a signal reaches the daemon itself
        e = pwd.getpwnam(user)
        ids = {"user": e.pw_uid, "group": e.pw_gid, "extra_groups": []}
    setpriv = shutil.which("setpriv", path="/usr/bin:/bin")
    if user is None and setpriv:  # root with only the capabilities deploy/systemd's unit keeps
        cmd = [setpriv, f"--bounding-set=-all,{UNIT_CAPS}", *cmd]
    log = (base / f"broker-{user or 'root'}.log").open("ab")
    proc = subprocess.Popen(
        cmd, env=env if user else {**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=log, cwd="/", **ids
    )
    log.close()
    hello = Path(endpoint[len("ipc://") :] + ".hello")
    deadline = time.monotonic() + 30
    while not hello.exists():
        assert proc.poll() is None, (base / f"broker-{user or 'root'}.log").read_text()
        assert time.monotonic() < deadline, "the node daemon did not start within 30 s"
        time.sleep(0.05)
    return proc


@pytest.fixture(scope="module")
def node() -> Iterator[Node]:
    entries = [system_user(n) for n in USERS]
    base = Path(tempfile.mkdtemp(prefix="matspool-node-user-", dir="/tmp"))
    base.chmod(0o755)
    restore: list[tuple[Path, int]] = []
    for p in (Path(os.path.realpath(sys.executable)), Path(sys.executable).parent, REPO / "client"):
        grant_traverse(p, restore)
    out = base / "out"
    out.mkdir(mode=0o755)
    users = []
    for e in entries:
        d = out / e.pw_name
        d.mkdir(mode=0o700)
        os.chown(d, e.pw_uid, e.pw_gid)
        users.append(User(e.pw_name, e.pw_uid, e.pw_gid, d))
    (base / "run").mkdir(mode=0o755)
    sock = base / "run" / "node.sock"
    endpoint = f"ipc://{sock}"
    n = Node(base, endpoint, sock, _start_broker(base, endpoint, out), base / "broker-root.log", *users)
    try:
        yield n
        # stopping: every user's writer drains and goes, and nothing of theirs stays
        proc = n.proc
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, (base / "broker-root.log").read_text()
        left = sorted(p.name for p in (base / "run").iterdir())
        assert left == ["node.sock.lock"], left
        for u in users:
            assert not _pids_of(u.uid), _pids_of(u.uid)
            assert not [p for p in u.out.iterdir() if "matspool-tmp" in p.name]
            assert not [
                n
                for n in os.listdir("/dev/shm")
                if n.startswith("matspool-") and os.stat(f"/dev/shm/{n}").st_uid == u.uid
            ]
    finally:
        if n.proc.poll() is None:
            n.proc.kill()
            n.proc.wait()
        for d, mode in reversed(restore):
            d.chmod(mode)
        shutil.rmtree(base, ignore_errors=True)


def job_env(node: Node) -> dict[str, str]:
    """All a job's process has: MATSPOOL_ENDPOINT (as taskprolog.sh exports it)."""
    return {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": f"{REPO}/client:{REPO}/service",
        "MATSPOOL_ENDPOINT": node.endpoint,
        "HOME": "/",
    }


def as_user(user: User) -> dict[str, object]:
    """Popen arguments that run a process as ``user`` (its uid and gid, no other group),
    itself and not behind runuser: a timeout or kill reaches it."""
    return {"user": user.uid, "group": user.gid, "extra_groups": [], "cwd": "/"}


def run_as(user: User, node: Node, code: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``code`` in a fresh python as ``user``, with only what a job has."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=job_env(node),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        **as_user(user),  # type: ignore[arg-type]
    )


def holder_as(user: User, node: Node, code: str) -> subprocess.Popen[str]:
    """A long-lived client of ``user`` that the test talks to through stdin/stdout."""
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=job_env(node),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        **as_user(user),  # type: ignore[arg-type]
    )


A = np.arange(12.0).reshape(3, 4) * 1.5
B = (np.arange(24, dtype=np.int32) - 7).reshape(2, 3, 4)


def test_default_api_writes_into_the_users_0700_directory_as_the_user(node: Node) -> None:
    """matspool.save and Spool() with nothing but MATSPOOL_ENDPOINT: exact files owned by
    the user (uid and gid), through a memfd ring nobody else can open."""
    u = node.alice
    r = run_as(
        u,
        node,
        f"""
        import os, numpy as np, matspool
        a = np.arange(12.0).reshape(3, 4) * 1.5
        b = (np.arange(24, dtype=np.int32) - 7).reshape(2, 3, 4)
        matspool.save("{u.out}/plain.mat", {{"a": a}}).result(60)
        with matspool.Spool() as s:
            s.save("{u.out}/v73.mat", {{"b": b}}, format="v7.3").result(60)
            print("ring", s._ring.kind, flush=True)
            print("shm", [n for n in os.listdir("/dev/shm") if n.startswith(f"matspool-{{os.getpid()}}-")])
    """,
    )
    assert r.returncode == 0, r.stderr + node.log.read_text()
    assert "ring memfd" in r.stdout and "shm []" in r.stdout, r.stdout
    for name, fmt, want in (("plain.mat", "v5", {"a": A}), ("v73.mat", "v7.3", {"b": B})):
        path = u.out / name
        assert_variables(read(path, fmt), want, name)
        st = path.stat()
        assert (st.st_uid, st.st_gid) == (u.uid, u.gid), f"{name} is owned by {st.st_uid}:{st.st_gid}"
    # the writer was the user's own process, and it leaves once idle (--idle-exit 2)
    log = node.log.read_text()
    assert f"started the writer of uid {u.uid} gid {u.gid}" in log, log
    deadline = time.monotonic() + 30
    while _pids_of(u.uid):
        assert time.monotonic() < deadline, _pids_of(u.uid)
        time.sleep(0.2)
    assert not list((node.base / "run" / "node.sock.users").iterdir())


def test_another_user_cannot_write_into_the_first_users_directory(node: Node) -> None:
    """bob asks for a file in alice's 0700 directory: his writer runs as bob, and the
    kernel says no. bob cannot reach alice's writer either."""
    a, b = node.alice, node.bob
    holder = holder_as(
        a,
        node,
        """
        import matspool, sys
        s = matspool.Spool()
        print("up", flush=True)
        sys.stdin.read()
    """,
    )  # alice's client, alive, so her writer is up
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "up"
        users_dir = node.base / "run" / "node.sock.users"
        (alice_dir,) = [d for d in users_dir.iterdir() if d.stat().st_uid == a.uid]
        assert stat.S_IMODE(alice_dir.stat().st_mode) == 0o700
        r = run_as(
            b,
            node,
            f"""
            import errno, socket, matspool
            try:
                matspool.save("{a.out}/stolen.mat", {{"x": 1.0}}).result(60)
                print("written")
            except matspool.WriteFailed as e:
                print("refused", e.errno == errno.EACCES, str(e)[:300])
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect("{alice_dir}/sock")
                print("reached alice's writer")
            except PermissionError:
                print("alice's writer: permission denied")
            try:
                print(__import__("os").listdir("{users_dir}"))
            except PermissionError:
                print("users: permission denied")
        """,
        )
        assert r.returncode == 0, r.stderr
        assert "refused True" in r.stdout and "Permission denied" in r.stdout, r.stdout
        assert "alice's writer: permission denied" in r.stdout, r.stdout
        assert "users: permission denied" in r.stdout, r.stdout
        assert not (a.out / "stolen.mat").exists()
        # what alice leaves in her writer's directory goes with it, links never followed
        junk = run_as(
            a,
            node,
            f"""
            import os
            os.makedirs("{alice_dir}/deep/er")
            os.symlink("{a.out}", "{alice_dir}/deep/link")
            os.chmod("{alice_dir}/deep/er", 0)
            os.chmod("{alice_dir}/deep", 0)
        """,
        )
        assert junk.returncode == 0, junk.stderr
        assert not [p for p in a.out.iterdir() if "stolen" in p.name]
    finally:
        holder.communicate("", timeout=60)
    deadline = time.monotonic() + 30
    while alice_dir.exists():
        assert time.monotonic() < deadline, "alice's writer directory stayed"
        time.sleep(0.2)
    assert a.out.is_dir() and stat.S_IMODE(a.out.stat().st_mode) == 0o700


def test_a_client_lying_about_itself_gains_nothing(node: Node) -> None:
    """bob's handshake claims alice's uid and a pid of hers: he gets his own writer. His
    HELLO there names alice's live memfd ring: his writer (bob) cannot open it, nor can
    he; and her ring is nowhere in /dev/shm."""
    a, b = node.alice, node.bob
    holder = holder_as(
        a,
        node,
        """
        import os, sys, matspool
        s = matspool.Spool()
        print(os.getpid(), s._ring.name, s._ring.fd, s._ring.size, flush=True)
        sys.stdin.read()
    """,
    )
    try:
        assert holder.stdout is not None
        pid, ring, fd, size = holder.stdout.readline().split()
        assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"matspool-{pid}-")]
        r = run_as(
            b,
            node,
            f"""
            import json, os, socket, zmq
            s = socket.socket(socket.AF_UNIX)
            s.connect("{node.sock}.hello")
            lie = {{"op": "USER_HELLO", "uid": {a.uid}, "gid": {a.gid}, "pid": {pid}}}
            s.sendall(json.dumps(lie).encode() + b"\\n")
            answer = json.loads(s.makefile().readline())
            endpoint = answer["endpoint"]
            print("owner", os.stat(os.path.dirname(endpoint[6:])).st_uid)
            d = zmq.Context.instance().socket(zmq.DEALER)
            d.setsockopt(zmq.LINGER, 0)
            d.connect(endpoint)
            hello = {{"op": "HELLO", "ring": "{ring}", "ring_bytes": {size}, "pid": {pid}, "fd": {fd}}}
            d.send_multipart([b"matspool/1", json.dumps(hello).encode()])
            assert d.poll(30000), "no answer"
            print("answer", d.recv_multipart()[1].decode())
            try:
                open("/proc/{pid}/fd/{fd}", "rb")
                print("bob opened alice's ring")
            except PermissionError:
                print("ring: permission denied")
            r = socket.socket(socket.AF_UNIX)
            r.connect("{node.sock}.hello")
            r.sendall(json.dumps({{"op": "RELEASE_USER", "uid": {a.uid}}}).encode() + b"\\n")
            print("release", r.makefile().readline().strip())
        """,
        )
        assert r.returncode == 0, r.stderr
        assert f"owner {b.uid}" in r.stdout, r.stdout
        answer = json.loads(r.stdout.split("answer ", 1)[1].splitlines()[0])
        assert answer["op"] == "ERR" and answer.get("errno") in (1, 13), answer
        assert "ring: permission denied" in r.stdout, r.stdout
        release = json.loads(r.stdout.split("release ", 1)[1].splitlines()[0])
        assert release["ok"] is False and "only root" in release["message"], release
    finally:
        holder.communicate("", timeout=60)


def test_a_node_daemon_not_root_serves_only_its_own_user(node: Node) -> None:
    """Run by alice, the node daemon writes alice's files as before and refuses bob,
    saying why."""
    a, b = node.alice, node.bob
    base = node.base / "alice-node"
    base.mkdir(mode=0o755)
    os.chown(base, a.uid, a.gid)
    endpoint = f"ipc://{base}/node.sock"
    state = node.base / "alice-state"
    state.mkdir(mode=0o700)
    os.chown(state, a.uid, a.gid)
    proc = _start_broker(node.base, endpoint, node.base / "out", user=a.name, state=state)
    try:
        mine = Node(node.base, endpoint, base / "node.sock", proc, node.base / f"broker-{a.name}.log", a, b)
        r = run_as(
            a,
            mine,
            f"""
            import matspool
            matspool.save("{a.out}/own.mat", {{"a": 2.5}}).result(60)
        """,
        )
        assert r.returncode == 0, r.stderr + mine.log.read_text()
        assert (a.out / "own.mat").stat().st_uid == a.uid
        r = run_as(
            b,
            mine,
            """
            import matspool
            try:
                matspool.Spool(connect_timeout=30)
            except matspool.DaemonUnavailable as e:
                print("refused:", e)
        """,
        )
        assert r.returncode == 0, r.stderr
        assert f"serves only uid {a.uid}" in r.stdout, r.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    assert sorted(p.name for p in base.iterdir()) == ["node.sock.lock"]


def test_an_old_style_hello_on_the_node_endpoint_is_refused_with_the_way_in(node: Node) -> None:
    """The node endpoint itself answers PING (Slurm's prolog) and refuses a HELLO,
    naming the handshake socket; it never maps a ring or writes a file."""
    import zmq

    d = zmq.Context.instance().socket(zmq.DEALER)
    d.setsockopt(zmq.LINGER, 0)
    try:
        d.connect(node.endpoint)
        d.send_multipart([b"matspool/1", b'{"op":"PING"}'])
        assert d.poll(10000)
        assert json.loads(d.recv_multipart()[1])["op"] == "PONG"
        d.send_multipart([b"matspool/1", b'{"op":"HELLO","ring":"matspool-1-x","ring_bytes":4096,"pid":1}'])
        assert d.poll(10000)
        err = json.loads(d.recv_multipart()[1])
        assert err["op"] == "ERR" and f"{node.sock}.hello" in err["message"], err
    finally:
        d.close()
    with socket.socket(socket.AF_UNIX) as s:  # garbage on the handshake socket: refused
        s.settimeout(10)
        s.connect(f"{node.sock}.hello")
        s.sendall(b"\x00\xffnot json\n")
        answer = json.loads(s.makefile().readline())
        assert answer["ok"] is False and "bad handshake" in answer["message"]


def test_a_restarted_node_daemon_takes_its_clients_back(node: Node) -> None:
    """The service restarts under a live client (systemctl restart): its writer drains and
    goes; the client handshakes again, its new writer starts on the same path, and the same
    spool saves on, as the user."""
    a = node.alice
    holder = holder_as(
        a,
        node,
        f"""
        import sys, matspool
        s = matspool.Spool(timeout=120)
        s.save("{a.out}/before.mat", {{"a": 1.0}}).result(60)
        print("saved", flush=True)
        sys.stdin.readline()
        s.save("{a.out}/after.mat", {{"b": 2.0}}).result(120)
        print("saved again", flush=True)
        s.close()
    """,
    )
    try:
        assert holder.stdout is not None and holder.stdin is not None
        assert holder.stdout.readline().strip() == "saved"
        node.proc.send_signal(signal.SIGTERM)
        assert node.proc.wait(60) == 0, node.log.read_text()[-3000:]
        node.proc = _start_broker(node.base, node.endpoint, node.base / "out")
        holder.stdin.write("go\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "saved again", node.log.read_text()[-3000:]
        assert holder.wait(60) == 0
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    for name, want in (("before.mat", {"a": np.array([[1.0]])}), ("after.mat", {"b": np.array([[2.0]])})):
        assert_variables(read(a.out / name, "v5"), want, name)
        assert (a.out / name).stat().st_uid == a.uid


def test_one_user_holding_handshakes_does_not_lock_out_another(node: Node) -> None:
    """bob opens handshakes and says nothing: past his cap (16) he is refused, saying so,
    while alice still gets her writer; his silent ones are dropped after 5 s."""
    a, b = node.alice, node.bob
    bob = holder_as(
        b,
        node,
        f"""
        import socket, sys
        held = []
        for _ in range(16):
            s = socket.socket(socket.AF_UNIX)
            s.connect("{node.sock}.hello")
            held.append(s)
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(10)
        s.connect("{node.sock}.hello")
        print(s.makefile().readline().strip(), flush=True)
        sys.stdin.readline()
        held[0].settimeout(15)
        print(held[0].makefile().readline().strip(), flush=True)
    """,
    )
    try:
        assert bob.stdout is not None and bob.stdin is not None
        refused = json.loads(bob.stdout.readline())
        assert refused["ok"] is False and "handshakes in progress" in refused["message"], refused
        r = run_as(
            a,
            node,
            f"""
            from matspool._handshake import resolve
            print(resolve("{node.endpoint}"))
        """,
        )
        assert r.returncode == 0, r.stderr
        assert r.stdout.startswith(f"ipc://{node.sock}.users/{a.uid}-"), r.stdout
        bob.stdin.write("\n")
        bob.stdin.flush()
        dropped = json.loads(bob.stdout.readline())
        assert dropped["ok"] is False and "no handshake request within" in dropped["message"], dropped
        assert bob.wait(30) == 0
    finally:
        if bob.poll() is None:
            bob.kill()
            bob.wait()


def _status_as(user: User | None, node: Node, *flags: str) -> subprocess.CompletedProcess[str]:
    """``matspool status`` on the node endpoint, as ``user`` (None: as root)."""
    return subprocess.run(
        [sys.executable, "-m", "matspoold", "status", "--endpoint", node.endpoint, *flags],
        env=job_env(node),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        **(as_user(user) if user is not None else {"cwd": "/"}),  # type: ignore[arg-type]
    )


def test_status_on_the_node_endpoint_shows_the_users_own_writer_only(node: Node) -> None:
    """``matspool status`` on the node endpoint: a user sees the node daemon, their own
    writer and that writer's clients (their holder), and nothing of another user's
    (neither uid, nor endpoint); root sees every user's writer."""
    a, b = node.alice, node.bob
    code = """
        import os, sys, matspool
        with matspool.Spool() as s:
            print(os.getpid(), flush=True)
            sys.stdin.read()
    """
    holders = [holder_as(u, node, code) for u in (a, b)]  # both users' writers up
    try:
        pids = []
        for h in holders:
            assert h.stdout is not None
            pids.append(int(h.stdout.readline()))
        r = _status_as(a, node, "--json")
        assert r.returncode == 0, r.stderr + node.log.read_text()
        raw = json.loads(r.stdout)
        assert raw["node"]["pid"] == node.proc.pid and raw["node"]["root"] is True
        (mine,) = raw["writers"]
        assert (mine["uid"], mine["gid"], mine["state"]) == (a.uid, a.gid, "ready"), mine
        assert mine["endpoint"].startswith(f"ipc://{node.sock}.users/{a.uid}-")
        assert [c["pid"] for c in mine["status"]["clients"]] == [pids[0]], mine["status"]
        assert f".users/{b.uid}-" not in r.stdout and f'"uid": {b.uid},' not in r.stdout, r.stdout
        text = _status_as(a, node)
        assert text.returncode == 0, text.stderr
        assert f"writer of uid {a.uid} gid {a.gid}: ready" in text.stdout, text.stdout
        assert f"{pids[0]:>8}" in text.stdout and f"uid {b.uid} " not in text.stdout, text.stdout
        root = _status_as(None, node, "--json")
        assert root.returncode == 0, root.stderr
        everyone = json.loads(root.stdout)["writers"]
        assert sorted(w["uid"] for w in everyone) == sorted([a.uid, b.uid]), everyone
        assert not [w for w in everyone if "status" in w]  # root does not connect into users' directories
    finally:
        for h in holders:
            h.communicate("", timeout=60)
