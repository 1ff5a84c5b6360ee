"""Shared fixtures: real daemon processes, never mocks.

``daemon`` starts ``matspool serve`` as a separate process on a private ipc endpoint,
rooted at the test's tmp_path; ``spool`` is a client connected to it.

The suite runs as if launched by hand, whatever runs it: the variables by which a
process knows it is a rank of a distributed job (``matspool._launcher``: an ``srun``
step, ``torchrun``, ``mpirun``) and ``MATSPOOL_ENDPOINT`` / ``MATSPOOL_SHARED`` are
removed from the environment when this file is imported, so tests and the processes
they start use the embedded daemon unless a test sets them itself.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import zmq

import matspool
from matspool._jobdaemon import serve_command

#: prefixes and names of the variables ``matspool._launcher`` reads (and the client's own)
LAUNCHER_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "PMIX_", "TORCHELASTIC_", "MV2_", "PALS_")
LAUNCHER_NAMES = (
    "MPI_LOCALRANKID",
    "LOCAL_RANK",
    "RANK",
    "WORLD_SIZE",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "MATSPOOL_ENDPOINT",
    "MATSPOOL_SHARED",
)


def launcher_free(env: dict[str, str]) -> dict[str, str]:
    """``env`` without any launcher's variables (nor MATSPOOL_ENDPOINT / MATSPOOL_SHARED)."""
    return {k: v for k, v in env.items() if not k.startswith(LAUNCHER_PREFIXES) and k not in LAUNCHER_NAMES}


# at import: before any test, and for every process a test starts with this environment
for _name in set(os.environ) - set(launcher_free(dict(os.environ))):
    del os.environ[_name]


@dataclass
class DaemonProc:
    endpoint: str
    root: Path
    proc: subprocess.Popen

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def system_user(name: str) -> pwd.struct_passwd:
    """The local user ``name``, created as a system user (with a shell, for the tests that
    run commands as it) when missing; the test is skipped, saying why, when that fails."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        r = subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/bin/bash", name],
            capture_output=True,
            text=True,
            check=False,
        )
        if r.returncode != 0:
            pytest.skip(f"cannot create the user {name}: {r.stderr.strip()}")
        return pwd.getpwnam(name)


def grant_traverse(path: Path, restore: list[tuple[Path, int]]) -> None:
    """o+x on every directory above ``path`` that lacks it, so another user reaches it
    (``/root`` for a pyenv python); ``restore`` collects the modes to put back."""
    for d in reversed([path, *path.parents] if path.is_dir() else list(path.parents)):
        mode = d.stat().st_mode
        if not mode & stat.S_IXOTH:
            restore.append((d, stat.S_IMODE(mode)))
            d.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


@contextlib.contextmanager
def tmpfs(path: Path, size: str, *options: str) -> Iterator[Path]:
    """A small tmpfs (``size``, mount ``options``) at ``path`` (created) while the block
    runs, unmounted after it; the test is skipped, saying why, without root or mount."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip(f"needs root and mount to make a {size} tmpfs")
    path.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *options]), "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a {size} tmpfs: {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def serve_cmd(endpoint: str, root: Path | str, *extra: str) -> list[str]:
    """The command line of a real daemon (``matspool serve``) on ``endpoint`` below ``root``;
    ``extra`` flags come last, so a later ``--log-level`` wins."""
    return serve_command(endpoint, None, *extra, root=str(root))


def start_daemon(root: Path, sock_dir: Path, *extra: str) -> DaemonProc:
    sock_dir.mkdir(parents=True, exist_ok=True)
    endpoint = f"ipc://{sock_dir}/d.sock"
    proc = subprocess.Popen(serve_cmd(endpoint, root, *extra))
    if not wait_ready(endpoint, proc):
        proc.kill()
        raise RuntimeError("daemon did not come up within 30 s")
    return DaemonProc(endpoint, root, proc)


def wait_ready(endpoint: str, proc: subprocess.Popen, timeout: float = 30) -> bool:
    """True once the daemon's ipc socket answers a PING; raises if the process exits."""
    ctx = zmq.Context.instance()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {proc.returncode} at start-up")
        if os.path.exists(endpoint[6:]):
            s = ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(endpoint)
            s.send_multipart([b"matspool/1", b'{"op":"PING"}'])
            ok = s.poll(2000)
            s.close()
            if ok:
                return True
        time.sleep(0.05)
    return False


def wait_tcp(endpoint: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    """Return once the daemon's tcp:// port accepts connections; raise if the process
    exits or the port stays closed. A client's own wait for a refusing port is only its
    grace (3 s), and a daemon starting on a loaded 2-core CI machine took longer."""
    host, _, port = endpoint[len("tcp://") :].rpartition(":")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited with {proc.returncode} at start-up")
        try:
            with socket.create_connection((host, int(port)), timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"no daemon listening at {endpoint} after {timeout} s")


@pytest.fixture
def out_dir(tmp_path: Path) -> Path:
    d = tmp_path / "out"
    d.mkdir()
    return d


@pytest.fixture
def daemon(tmp_path: Path, out_dir: Path) -> Iterator[DaemonProc]:
    d = start_daemon(out_dir, tmp_path / "sock")
    yield d
    d.stop()


@pytest.fixture
def spool(daemon: DaemonProc) -> Iterator[matspool.Spool]:
    with matspool.Spool(daemon.endpoint, ring_bytes=32 << 20, timeout=30) as s:
        yield s


# -- one daemon per test module, for suites whose cases only need it to survive them --------
@pytest.fixture(scope="module")
def mdaemon(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[DaemonProc]:
    base = tmp_path_factory.mktemp(request.module.__name__.rpartition(".")[2])
    root = base / "root"
    root.mkdir()
    d = start_daemon(root, base / "sock")
    yield d
    assert d.alive(), f"the daemon died during {request.module.__name__}"
    assert d.stop() == 0


@pytest.fixture(scope="module")
def mspool(mdaemon: DaemonProc) -> Iterator[matspool.Spool]:
    with matspool.Spool(mdaemon.endpoint, ring_bytes=4 << 20, timeout=30) as s:
        yield s


@pytest.fixture
def outside(mdaemon: DaemonProc, tmp_path: Path) -> Path:
    """A fresh directory outside the module daemon's root (a sentinel: the daemon never writes there)."""
    d = tmp_path / "outside"
    d.mkdir()
    assert not str(d.resolve()).startswith(str(mdaemon.root.resolve()) + os.sep)
    return d


@pytest.fixture
def root(mdaemon: DaemonProc, request: pytest.FixtureRequest) -> Path:
    """A fresh directory inside the module daemon's root."""
    d = mdaemon.root / request.node.name.replace("[", "_").replace("]", "").replace("/", "_")[:80]
    d.mkdir()
    return d
