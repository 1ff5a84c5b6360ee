"""The daemon of a client that was given no endpoint: the process's own, or its job's.

The daemon runs as a separate process (``python -m matspoold``) started by exec, never
by fork, so it is safe after CUDA has been initialised. Its socket lives in a fresh
owner-only directory; it exits when the last spool using it closes, or when the
process that started it dies (``--parent-pid``).

One daemon per process: every ``Spool()`` without an endpoint in this process shares it
(:func:`acquire` / :meth:`Share.release`), so a notebook re-running a cell, or a library
opening a spool of its own, does not start a daemon (and its writer processes) each time.
A forked child's spool connects to its parent's embedded daemon; only the parent stops
it, and a ``Spool()`` made new in the child starts the child's own.

A rank of a distributed job (torchrun, Slurm, MPI: ``_launcher``) uses its job's daemon
on this node instead, shared with the job's other ranks there (``_jobdaemon``): it is
started by whichever rank comes first, no rank stops it, and it exits by itself when the
last has left; when it is gone (killed, or it left before our HELLO) a rank connects to
or starts it again. ``MATSPOOL_SHARED=0`` keeps one daemon per process. Every start
sweeps what killed job daemons of this user left (``_jobdaemon.sweep``).

Threads: any (the share count is under a lock); ``exit_status`` from I/O threads too.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import threading
import warnings

from . import _jobdaemon, _launcher
from ._errors import DaemonUnavailable

__all__ = ["EmbeddedDaemon", "Share", "acquire"]


class EmbeddedDaemon:
    """One ``matspool serve`` child process on a private ipc:// endpoint."""

    def __init__(self, *, writers: int | None = None) -> None:
        self._dir = tempfile.mkdtemp(prefix="matspool-")  # mode 0700
        self.endpoint = f"ipc://{self._dir}/daemon.sock"
        cmd = _jobdaemon.serve_command(self.endpoint, writers, "--parent-pid", str(os.getpid()))
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, close_fds=True)

    def exit_status(self) -> int | None:
        return self.proc.poll()

    def stop(self, timeout: float = 30.0, *, wait: bool = True) -> None:
        """SIGTERM: the daemon finishes accepted writes, then exits; ``wait=False`` (a
        close() abandoned by Ctrl-C) lets it finish them without us."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            if not wait:
                shutil.rmtree(self._dir, ignore_errors=True)  # no new client finds it
                return
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self._dir, ignore_errors=True)


_lock = threading.Lock()
_shared: EmbeddedDaemon | _jobdaemon.JobDaemon | None = None
_users = 0


class Share:
    """One spool's use of the process's embedded daemon; ``release`` once when done."""

    def __init__(self, daemon: EmbeddedDaemon | _jobdaemon.JobDaemon) -> None:
        self.daemon = daemon
        self.endpoint = daemon.endpoint
        self._released = False

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        """The daemon's process when this process started it."""
        return self.daemon.proc

    @property
    def shared(self) -> bool:
        """Whether this is the job's daemon, shared with its other ranks on this node."""
        return isinstance(self.daemon, _jobdaemon.JobDaemon)

    def exit_status(self) -> int | None:
        """None while the daemon serves; an own daemon's exit status once it has gone. A
        job's daemon that went is started again, or raises ``DaemonUnavailable`` saying
        what happened (``_jobdaemon.JobDaemon.exit_status``)."""
        return self.daemon.exit_status()

    def release(self, *, wait: bool = True) -> None:
        """The last user of the daemon stops it (it finishes accepted writes first;
        ``wait=False``: without waiting for them)."""
        global _shared, _users
        with _lock:
            if self._released:
                return
            self._released = True
            if _shared is not self.daemon:
                last = True  # a daemon replaced after it died: nobody else uses it
            else:
                _users -= 1
                last = _users == 0
                if last:
                    _shared = None
        if last:
            self.daemon.stop(wait=wait)


def acquire() -> Share:
    """The process's embedded daemon, started on first use (or again if it died); in a
    job's rank, the job's daemon on this node, connected to (or started) on first use."""
    global _shared, _users
    with _lock:
        if _shared is None or _gone(_shared):
            _shared, _users = _start(), 0
        _users += 1
        return Share(_shared)


def _gone(daemon: EmbeddedDaemon | _jobdaemon.JobDaemon) -> bool:
    try:
        return daemon.exit_status() is not None
    except DaemonUnavailable:
        return True  # a job's daemon that could not be restarted: start afresh


def _start() -> EmbeddedDaemon | _jobdaemon.JobDaemon:
    job = _launcher.detect() if _launcher.sharing_enabled() else None
    if job is None:
        _jobdaemon.sweep()  # what killed job daemons left, at a plain process's start too
    if job is not None and (problem := _jobdaemon.place_problem(job)) is not None:
        warnings.warn(
            f"matspool: this {job.launcher} rank cannot share its job's daemon ({problem}); "
            "it starts one of its own (point XDG_RUNTIME_DIR at a directory of yours, or set "
            "MATSPOOL_SHARED=0 to silence this)",
            RuntimeWarning,
            stacklevel=4,
        )
        job = None
    return EmbeddedDaemon() if job is None else _jobdaemon.connect_or_start(job)


def _after_fork_in_child() -> None:
    """The parent's daemon is not the child's to share or stop."""
    global _shared, _users, _lock
    _shared, _users, _lock = None, 0, threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)
