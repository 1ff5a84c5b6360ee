"""The node daemon's users' writers: starting one as its user, stopping it, removing its
directory.

``userd`` (root) keeps the table; this module does what touches a writer's process or a
user's directory, so the root-side rules are in one place: a writer's directory and journal
are made by root and given to the user (``chown``), the process gets exactly the client's
ids from the kernel (``Popen(user=, group=, extra_groups=)``: ``setgroups``, ``setregid``,
``setreuid`` in the child before ``exec``, no capability survives), is stopped by closing
its control socket (no signal needed: the unit keeps no ``CAP_KILL``), and its directory is
removed by descriptor, taken back with ``chown`` first, never following a link (no
``CAP_DAC_OVERRIDE``).

Threads: called from ``userd``'s one thread only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from .peercred import Cred

__all__ = ["DROP_ENV", "Conn", "Writer", "collect", "kill", "remove_user_dir", "start_writer", "terminate"]

log = logging.getLogger("matspoold")

# environment not to pass to a user's writer (systemd's, and the broker's own endpoint)
DROP_ENV = (
    "NOTIFY_SOCKET",
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "STATE_DIRECTORY",
    "RUNTIME_DIRECTORY",
    "MATSPOOL_ENDPOINT",
    "MATSPOOL_CONFIG",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
)


@dataclass(eq=False)
class Conn:
    """A client in the handshake: its socket, its kernel-given ids, what it sent so far."""

    sock: socket.socket
    cred: Cred
    deadline: float
    buf: bytes = b""


@dataclass(eq=False)
class Writer:
    """One user's writer process (``userserve``) and the clients waiting for it."""

    key: str
    cred: Cred
    proc: subprocess.Popen[bytes]
    ctl: socket.socket
    directory: str
    endpoint: str
    started: float
    state: str = "starting"  # starting -> ready <-> stopping; gone when its ctl ends
    waiting: list[Conn] = field(default_factory=list)


def start_writer(
    key: str,
    cred: Cred,
    *,
    directory: str,
    state: str,
    idle: float,
    serve_args: Sequence[str],
    as_user: bool,
) -> Writer:
    """Start the writer of ``cred`` (as that user when ``as_user``: the broker is root) on
    ``<directory>/sock``, journalling in ``state``."""
    remove_user_dir(directory)
    os.mkdir(directory, 0o700)
    os.makedirs(os.path.dirname(state), mode=0o711, exist_ok=True)
    os.makedirs(state, mode=0o700, exist_ok=True)
    if as_user:
        for d in (directory, state):
            st = os.lstat(d)
            if not stat.S_ISDIR(st.st_mode):
                raise OSError(f"{d} is not a directory")
            os.chown(d, cred.uid, cred.gid, follow_symlinks=False)
    endpoint = f"ipc://{directory}/sock"
    argv = [
        sys.executable,
        "-m",
        "matspoold.userserve",
        str(idle),
        "--",
        "serve",
        "--endpoint",
        endpoint,
        "--socket-mode",
        "600",
        "--state-dir",
        state,
        *serve_args,
    ]
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    env = {k: v for k, v in os.environ.items() if k not in DROP_ENV}
    user: int | None = None
    group: int | None = None
    extra: list[int] | None = None
    if as_user:
        try:
            entry = pwd.getpwuid(cred.uid)
            env.update(HOME=entry.pw_dir, USER=entry.pw_name, LOGNAME=entry.pw_name)
        except KeyError:
            env.update(HOME="/", USER=str(cred.uid), LOGNAME=str(cred.uid))
        user, group, extra = cred.uid, cred.gid, list(cred.groups)
    try:
        proc = subprocess.Popen(
            argv,
            stdin=theirs.fileno(),
            stdout=subprocess.DEVNULL,
            cwd="/",
            env=env,
            close_fds=True,
            start_new_session=True,  # a signal to the broker's group is not theirs
            umask=0o022,
            user=user,  # setgroups, setregid, setreuid in the child, before exec
            group=group,
            extra_groups=extra,
        )
    finally:
        theirs.close()
    log.info("started the writer of uid %d gid %d (pid %d) on %s", cred.uid, cred.gid, proc.pid, endpoint)
    return Writer(key, cred, proc, ours, directory, endpoint, time.monotonic())


def terminate(w: Writer) -> None:
    """Ask ``w`` to stop: the end of its control socket (no signal: the unit keeps no
    CAP_KILL, and a writer is another user's process). It drains, then exits."""
    with contextlib.suppress(OSError):
        w.ctl.shutdown(socket.SHUT_WR)


def kill(w: Writer) -> None:
    """A writer that does not stop: SIGKILL where allowed (root with CAP_KILL, or a
    broker that is not root); else systemd's KillMode=mixed ends it at the stop timeout."""
    with contextlib.suppress(OSError):
        w.proc.kill()


def collect(w: Writer, timeout: float) -> None:
    """Wait up to ``timeout`` s for ``w`` to exit (it drains its accepted saves first),
    then kill it and wait 5 s more."""
    try:
        w.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        kill(w)
        with contextlib.suppress(subprocess.TimeoutExpired):
            w.proc.wait(5)


def remove_user_dir(path: str) -> None:
    """Remove ``path`` (a user's writer's directory, in the broker's own directory) and what
    the user put in it, without CAP_DAC_OVERRIDE and without following a link: each
    directory is taken back (chown to root, then 0700) before it is emptied."""
    try:
        fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return
    except OSError:  # not a directory (a file or link where one was): just unlink it
        with contextlib.suppress(OSError):
            os.unlink(path)
        return
    try:
        _empty(fd)
    finally:
        os.close(fd)
    with contextlib.suppress(OSError):
        os.rmdir(path)


def _empty(fd: int, depth: int = 0) -> None:
    here = f"/proc/self/fd/{fd}"
    with contextlib.suppress(OSError):
        os.chown(here, 0, 0)  # root owns it now: its mode is root's to set
        os.chmod(here, 0o700)
    try:
        names = os.listdir(here)
    except OSError:
        return
    for name in names:
        try:
            sub = os.open(name, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
        except OSError:  # not a directory
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=fd)
            continue
        try:
            if depth < 32:
                _empty(sub, depth + 1)
        finally:
            os.close(sub)
        with contextlib.suppress(OSError):
            os.rmdir(name, dir_fd=fd)
