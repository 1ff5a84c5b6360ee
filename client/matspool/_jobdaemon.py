"""One daemon per node for the ranks of a distributed job: connect to it, or start it.

Ranks of one job (``_launcher.detect``) on one node meet at one ipc endpoint in this
user's private directory, named after the job key (``job-<digest>.sock``). Whoever finds
no daemon there starts one; which rank does is decided by the daemon's own endpoint claim
(``matspoold.endpoint``: an exclusive ``flock`` on ``<socket>.lock``, then a PING), not
by local rank numbers, so 4-8 ranks arriving at once start exactly one:

1. the lock is held: a daemon serves (or is binding); PING it until it answers;
2. the lock is free: no daemon; start ``matspool serve --idle-exit``: local rank 0 at
   once, the others only after :data:`_DEFER_S` (no python start-up wasted on a start
   that loses). Several may start one at once (no local rank given, or rank 0 late);
   the losers find the lock taken and exit with ``BUSY_EXIT``, silently, and everyone
   PINGs the winner. A socket left by a crashed earlier run of the same job is stale
   (nobody holds its lock) and the new daemon replaces it.

A daemon may leave at any moment before a rank's HELLO is answered (the rank stalled
past the idle grace after its PING, or the daemon was stopping), and a daemon that was
killed (SIGKILL, the OOM killer) leaves its ranks connected to nothing. Either way the
rank notices it gone (:meth:`JobDaemon.exit_status`: from ``Spool()``'s wait for WELCOME
and from the spool's I/O thread) and connects to, or starts, the job's daemon again on
the same endpoint, up to :data:`RESTARTS` times: its link meets the new instance there,
says HELLO again and sends its unanswered whole saves again (a save in pieces fails).
Only when that fails is the daemon reported gone, in a ``DaemonUnavailable`` naming the
endpoint and what happened. (The daemon restarts its idle time on every message, a PING
too; a longer grace after a PING would only move the window a stall falls into, so the
retry is what covers it.)

Threads: the caller's (``_embedded.acquire``, under its lock), and the I/O threads of
the spools using a :class:`JobDaemon` (``exit_status``: a restart is under the
daemon's own lock); a reaper thread per daemon this process started, which only waits
for it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import stat
import subprocess
import sys
import threading
import time
from typing import Final

from ._endpoint import check_ipc_endpoint, default_base, make_private_dirs
from ._errors import DaemonUnavailable
from ._launcher import BUSY_EXIT, JobKey, job_endpoint, process_start

__all__ = [
    "IDLE_EXIT_S",
    "RESTARTS",
    "START_TIMEOUT_S",
    "JobDaemon",
    "connect_or_start",
    "place_problem",
    "serve_command",
    "sweep",
]

log = logging.getLogger("matspool")

#: a job's daemon exits once no client has been connected this long
IDLE_EXIT_S: Final = 3.0
#: how long ``Spool()`` waits for the job's daemon to answer
START_TIMEOUT_S: Final = 30.0
#: how many times a rank connects to (or starts) the job's daemon again after it went
RESTARTS: Final = 3
#: a lock file nobody holds, untouched this long, is swept (a daemon takes the lock within
#: microseconds of creating the file, and writes its pid into it when it does)
_STALE_LOCK_S: Final = 5.0
_PING_S: Final = 0.5
#: a rank whose local rank is not 0 lets local rank 0 start the daemon for this long first
#: (no python start-up wasted on a start that loses); it starts one itself after that
_DEFER_S: Final = 3.0
_SUN_PATH_MAX: Final = 107  # bytes of a unix socket's path
_OPT_OUT: Final = "MATSPOOL_SHARED=0 gives each process a daemon of its own"


class JobDaemon:
    """The job's daemon on this node as one of its ranks sees it: ``proc`` only in the
    rank that started it. When it is gone it is connected to (or started) again."""

    def __init__(
        self,
        key: JobKey,
        endpoint: str,
        pid: int,
        proc: subprocess.Popen[bytes] | None,
        *,
        writers: int | None = None,
    ) -> None:
        self.key = key
        self.endpoint = endpoint
        self.writers = writers
        self.restarts = 0
        self._lock = threading.Lock()
        self._set(pid, proc)

    def _set(self, pid: int, proc: subprocess.Popen[bytes] | None) -> None:
        self.pid = pid
        self.proc = proc
        self._started = process_start(pid)

    def _gone(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is not None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass  # exists (another user's pid now: then its start time differs)
        if _zombie(self.pid):
            return True  # dead, not yet reaped by whoever started it
        return self._started is not None and process_start(self.pid) != self._started

    def exit_status(self) -> int | None:
        """None while the job's daemon serves: if the one we knew is gone, the job's daemon
        is connected to or started again (at most :data:`RESTARTS` times), and our link
        meets it on the same endpoint. Raises :class:`DaemonUnavailable`, saying what
        happened, when that fails."""
        with self._lock:
            if not self._gone():
                return None
            what = self._what()
            if self.proc is not None:
                _reap(self.proc)
            if self.restarts >= RESTARTS:
                raise DaemonUnavailable(
                    f"{what}; it was started again {self.restarts} times already, not again: "
                    f"saves not yet written fail. {_OPT_OUT}"
                )
            self.restarts += 1
            try:
                again = connect_or_start(self.key, writers=self.writers, endpoint=self.endpoint)
            except DaemonUnavailable as e:
                raise DaemonUnavailable(
                    f"{what}; starting it again failed ({e}): saves not yet written fail"
                ) from e
            log.warning(
                "matspool: %s; now served by pid %d (%s); unanswered saves are sent to it again",
                what,
                again.pid,
                "started by this process" if again.proc is not None else "another rank's",
            )
            self._set(again.pid, again.proc)
            return None

    def _what(self) -> str:
        """What became of the daemon we knew, for a message."""
        who = f"the shared daemon of this {self.key.launcher} job at {self.endpoint} (pid {self.pid}"
        if self.proc is None:
            return f"{who}, started by another rank) is gone (killed, or it stopped)"
        rc = self.proc.returncode
        if rc is not None and rc < 0:
            try:
                how = f"was killed by {signal.Signals(-rc).name}"
            except ValueError:
                how = f"was killed by signal {-rc}"
        else:
            how = f"exited with status {rc}"
        return f"{who}, started by this process) {how}"

    def stop(self, timeout: float = 30.0, *, wait: bool = True) -> None:
        """This process leaves; the daemon stays for the job's other ranks and exits by
        itself when the last has gone. Our child is reaped when it does (no zombie)."""
        if self.proc is not None:
            _reap(self.proc)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[:1] in ([b"Z"], [b"X"])
    except (OSError, IndexError):
        return False


def _reap(proc: subprocess.Popen[bytes]) -> None:
    """Wait for our child on a thread of its own (at interpreter exit: nothing to do, it
    is reparented)."""
    if proc.poll() is None:
        try:
            threading.Thread(target=proc.wait, name="matspool-reap", daemon=True).start()
        except RuntimeError:
            pass  # the interpreter is shutting down


def _lock_held(lock: str) -> bool:
    """Whether a daemon holds the endpoint's lock (a shared probe, released at once)."""
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # drops our probe's lock
    return False


def _ping(endpoint: str, timeout: float) -> int | None:
    """The pid of the daemon answering on ``endpoint``, None when none does in time."""
    import zmq

    from . import _messages as msgs

    if not os.path.exists(endpoint[len("ipc://") :]):
        return None
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        sock.send_multipart(msgs.encode(msgs.Ping()))
        if not sock.poll(int(timeout * 1000)):
            return None
        reply = msgs.decode_reply(sock.recv_multipart())
    except Exception:  # noqa: BLE001 - a garbled answer is no daemon of ours either
        return None
    finally:
        sock.close()
    return reply.pid if isinstance(reply, msgs.Pong) and reply.pid else None


def sweep(keep: str | None = None) -> None:
    """Remove the job sockets and lock files of this user's daemons that were killed before
    they could (SIGKILL, a job's end): those whose lock nobody holds and nobody touched for
    :data:`_STALE_LOCK_S` (``keep``: a lock file to leave alone).

    A daemon starting meanwhile is not harmed: one that holds its lock is skipped; one
    that opened the file and finds it locked by this sweep for a moment exits with
    ``BUSY_EXIT`` and its rank starts another (``connect_or_start``); one that locks the
    file after it was unlinked sees that and opens the path again (``claim_ipc``)."""
    directory = os.path.join(default_base(), "matspool")
    try:
        check_ipc_endpoint(f"ipc://{directory}/job.sock", missing_ok=False)  # ours alone
        names = os.listdir(directory)
    except (OSError, DaemonUnavailable):
        return  # none yet, or not a directory of this user's alone: nothing of ours to sweep
    now = time.time()
    for name in names:
        lock = os.path.join(directory, name)
        if not (name.startswith("job-") and name.endswith(".sock.lock")) or lock == keep:
            continue
        try:
            fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            if now - os.fstat(fd).st_mtime < _STALE_LOCK_S:
                continue
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            here, st = os.stat(lock), os.fstat(fd)
            if (here.st_dev, here.st_ino) != (st.st_dev, st.st_ino):
                continue
            sock = lock[: -len(".lock")]
            if os.path.lexists(sock) and stat.S_ISSOCK(os.lstat(sock).st_mode):
                os.unlink(sock)
            os.unlink(lock)  # while held: a daemon that opened it meanwhile opens again
        except OSError:
            continue  # held (a live daemon), or gone already
        finally:
            os.close(fd)


def serve_command(endpoint: str, writers: int | None, *flags: str, root: str = "/") -> list[str]:
    """The command line of a daemon this process starts (its own embedded one, or the job's
    shared one; the tests' and benches' too): ``matspool serve`` on ``endpoint``, writing
    below ``root`` (anywhere the user may by default), then ``flags`` (those that say when
    it stops; last, so a later ``--log-level`` wins)."""
    cmd = [sys.executable, "-m", "matspoold", "serve", "--endpoint", endpoint, "--root", root]
    cmd += ["--log-level", "warning"]
    if writers:
        cmd += ["--writers", str(writers)]
    return [*cmd, *flags]


def _spawn(endpoint: str, writers: int | None) -> subprocess.Popen[bytes]:
    cmd = serve_command(endpoint, writers, "--idle-exit", str(IDLE_EXIT_S))
    # a session of its own: a launcher's kill of the starting rank's group spares it
    # stdout: nothing (a caller reading a rank's output through a pipe is not held up by it);
    # stderr: the starting rank's, for the daemon's warnings
    return subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, close_fds=True, start_new_session=True
    )


def place_problem(key: JobKey) -> str | None:
    """Why the job's socket cannot be made where it belongs (None: it can): its directory
    cannot be created or is not this user's alone, or the path is too long for a socket."""
    endpoint = job_endpoint(key)
    path = endpoint[len("ipc://") :]
    if len(os.fsencode(path)) > _SUN_PATH_MAX:
        return f"{path} is longer than a socket path may be ({_SUN_PATH_MAX} bytes)"
    try:
        make_private_dirs(endpoint)
        check_ipc_endpoint(endpoint, missing_ok=False)
    except (OSError, DaemonUnavailable) as e:
        return str(e)
    return None


def connect_or_start(
    key: JobKey, *, timeout: float = START_TIMEOUT_S, writers: int | None = None, endpoint: str | None = None
) -> JobDaemon:
    """The job's daemon on this node, started by this process if none runs (``endpoint``:
    where, when not the job's own: the one it was first found at)."""
    endpoint = endpoint or job_endpoint(key)
    path = endpoint[len("ipc://") :]
    check_ipc_endpoint(endpoint, missing_ok=False)  # raises DaemonUnavailable: unsafe dir
    sweep(keep=path + ".lock")
    proc: subprocess.Popen[bytes] | None = None
    start = time.monotonic()
    deadline = start + timeout
    defer = start + (_DEFER_S if key.local_rank else 0.0)
    while True:
        if _lock_held(path + ".lock"):
            pid = _ping(endpoint, _PING_S)
            if pid is not None:
                ours = proc if proc is not None and proc.pid == pid else None
                if proc is not None and ours is None:  # lost the race: reap it as it exits
                    _reap(proc)
                return JobDaemon(key, endpoint, pid, ours, writers=writers)
        elif (proc is None and time.monotonic() >= defer) or (proc is not None and proc.poll() is not None):
            if proc is not None and proc.returncode not in (0, BUSY_EXIT):
                raise DaemonUnavailable(
                    f"the shared daemon of this {key.launcher} job (at {endpoint}) exited with "
                    f"status {proc.returncode} while starting; its message is above. " + _OPT_OUT
                )
            proc = _spawn(endpoint, writers)
        if time.monotonic() > deadline:
            raise DaemonUnavailable(
                f"the shared daemon of this {key.launcher} job did not answer at {endpoint} "
                f"within {timeout:.0f} s; " + _OPT_OUT
            )
        time.sleep(0.05)
