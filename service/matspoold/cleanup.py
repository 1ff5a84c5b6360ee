"""What dead processes leave behind, and how the daemon clears it.

Threads: everything here runs on the thread that runs ``Daemon.serve`` (at start and at
exit), except ``TempJournal.record``, which writer threads call (it takes the journal's
lock).

**Rings of dead clients.** A ring is named ``matspool-<pid>-<token>``. It is stale when
that pid no longer exists and the daemon's user owns it. The pid test is only meaningful
in the daemon's own pid namespace, so deployments where jobs run in another one
(containers without a shared pid namespace) turn this off with ``--no-clean-stale`` and
rely on the per-client liveness check instead.

**Temporaries of killed daemons.** A file is written as ``.NAME.<tag>-<n>.matspool-tmp``
beside its final name, then renamed.
A daemon killed mid-write (SIGKILL, OOM) leaves that temporary. So each daemon keeps a
journal in its state directory, ``<state_dir>/tmp-<tag>.journal``:

- line 1: ``{"tag": TAG, "pid": PID}``; then one JSON string per directory, written
  (one ``write``, so it survives the process being killed) before the first temporary in
  that directory is created. No line per file: a daemon writing millions of small files
  adds one line per new directory.
- The journal file is ``flock``-ed for the daemon's whole life. The kernel drops the lock
  when the process dies however it dies, across pid namespaces and pid reuse, so "I can
  take its lock" is the test for "its writer is dead".

The state directory is ``--state-dir``, else the first usable of
:func:`default_state_dirs`. At start (:func:`sweep_dead`) a daemon takes each journal it
can lock and, in each directory the journal names, removes the regular files of its own user whose name is a
temporary carrying that journal's tag (random per daemon instance: no other program's
file has it), then deletes the journal. It touches nothing else. A clean exit deletes
the daemon's own journal.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import stat
import threading
from dataclasses import dataclass, field

from matspool._errors import MatspoolError
from matspool._reach import pid_alive  # the client's: one answer to whether a pid lives
from matspool._segment import RING_PREFIX, SHM_DIR

from .writers._files import TMP_SUFFIX

__all__ = [
    "StateDirError",
    "TempJournal",
    "default_state_dirs",
    "open_journal",
    "pid_alive",
    "remove_stale_rings",
    "sweep_dead",
    "temp_pattern",
]

log = logging.getLogger("matspoold")

_JOURNAL = re.compile(r"^tmp-[0-9]+-[0-9a-f]+\.journal$")


class StateDirError(MatspoolError, OSError):
    """The state directory cannot be created or written; ``matspool serve`` exits with 2."""

    code = "state_dir"


def default_state_dirs(endpoint: str) -> list[str]:
    """Where a daemon given no ``--state-dir`` keeps its journal, first usable wins:
    systemd's ``$STATE_DIRECTORY`` (``StateDirectory=`` in the unit), else
    ``$XDG_STATE_HOME/matspool``, else ``~/.local/state/matspool``; where that cannot be
    created (a read-only root in a container, no home), a ``matspool-state`` directory
    beside an ipc endpoint's socket, then ``/tmp/matspool-<uid>/state``."""
    if os.environ.get("STATE_DIRECTORY"):
        first = os.environ["STATE_DIRECTORY"].split(":")[0]
    else:
        base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
        first = os.path.join(base, "matspool")
    out = [first]
    if endpoint.startswith("ipc://"):
        out.append(os.path.join(os.path.dirname(endpoint[len("ipc://") :]) or ".", "matspool-state"))
    out.append(f"/tmp/matspool-{os.getuid()}/state")
    return out


def temp_pattern(tag: str) -> re.Pattern[str]:
    """Names of the temporaries the daemon with ``tag`` creates (``writers._files.TempNames``)."""
    return re.compile(r"^\..+\." + re.escape(tag) + r"-[0-9]+" + re.escape(TMP_SUFFIX) + "$", re.DOTALL)


@dataclass(eq=False)
class TempJournal:
    """This daemon's journal: the directories it has written temporaries in."""

    path: str
    fd: int
    tag: str
    _dirs: set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, directory: str) -> None:
        """Note ``directory`` before the first temporary goes into it."""
        if directory in self._dirs:
            return
        with self._lock:
            if directory in self._dirs:
                return
            line = (json.dumps(directory) + "\n").encode()
            if os.write(self.fd, line) != len(line):  # O_APPEND: a short write means a full disk
                raise OSError(28, "short write to the temporary-file journal", self.path)
            self._dirs.add(directory)

    def close(self) -> None:
        """A clean exit: every temporary was renamed or removed; the journal goes."""
        if self.fd < 0:
            return
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self.fd)  # drops the lock
        self.fd = -1


def open_journal(state_dirs: list[str], tag: str) -> TempJournal:
    """Create and lock this daemon's journal in the first of ``state_dirs`` that can hold it
    (made 0700 if missing)."""
    failures = []
    for state_dir in state_dirs:
        try:
            os.makedirs(state_dir, mode=0o700, exist_ok=True)
            path = os.path.join(state_dir, f"tmp-{tag}.journal")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o600)
        except OSError as e:
            failures.append(f"{state_dir!r}: {e.strerror or e}")
            continue
        if failures:
            log.warning("state directory %s (not %s)", state_dir, "; ".join(failures))
        fcntl.flock(fd, fcntl.LOCK_EX)  # a new file: nobody else holds it
        os.write(fd, (json.dumps({"tag": tag, "pid": os.getpid()}) + "\n").encode())
        return TempJournal(path, fd, tag)
    raise StateDirError(
        "cannot keep the temporary-file journal in a state directory (give a "
        "writable one with --state-dir): " + "; ".join(failures)
    )


def _sweep_one(path: str, fd: int) -> list[str] | None:
    """The temporaries of the dead daemon whose journal is ``fd``, removed; None when the
    file is not a journal after all (it is left alone)."""
    with os.fdopen(os.dup(fd), "rb") as f:
        lines = f.read().split(b"\n")
    try:
        tag = json.loads(lines[0])["tag"]
        if not isinstance(tag, str) or not re.fullmatch(r"[0-9]+-[0-9a-f]+", tag):
            raise ValueError(tag)
    except (ValueError, KeyError, TypeError):
        log.warning("%s: not a matspool journal header; leaving it", path)
        return None
    pattern = temp_pattern(tag)
    uid = os.geteuid()
    removed: list[str] = []
    for raw in lines[1:]:
        try:
            directory = json.loads(raw)
        except ValueError:
            continue  # empty last line
        if not isinstance(directory, str):
            continue
        try:
            names = os.listdir(directory)
        except OSError as e:
            log.warning(
                "cannot look for temporaries of dead daemon %s in %s: %s", tag, directory, e.strerror or e
            )
            continue
        for name in names:
            if not pattern.match(name):
                continue
            victim = os.path.join(directory, name)
            try:
                st = os.lstat(victim)
                if stat.S_ISREG(st.st_mode) and st.st_uid == uid:
                    os.unlink(victim)
                    removed.append(victim)
            except OSError:
                continue
    return removed


def sweep_dead(state_dir: str) -> list[str]:
    """Remove the temporaries of every daemon whose journal in ``state_dir`` nobody holds
    (its daemon is dead), and those journals; returns the files removed."""
    try:
        names = os.listdir(state_dir)
    except FileNotFoundError:
        return []
    removed: list[str] = []
    for name in names:
        if not _JOURNAL.match(name):
            continue
        path = os.path.join(state_dir, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its daemon is alive
            swept = _sweep_one(path, fd)
            if swept is not None:
                removed += swept
                os.unlink(path)
        finally:
            os.close(fd)
    if removed:
        log.info(
            "removed %d temporary file(s) left by killed daemons: %s",
            len(removed),
            ", ".join(removed[:20]) + (" ..." if len(removed) > 20 else ""),
        )
    return removed


def remove_stale_rings(shm_dir: str = SHM_DIR) -> list[str]:
    """Unlink this user's rings whose creating process is gone; returns their names."""
    removed: list[str] = []
    uid = os.geteuid()
    try:
        names = os.listdir(shm_dir)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(RING_PREFIX):
            continue
        pid_text = name[len(RING_PREFIX) :].split("-", 1)[0]
        if not pid_text.isdigit() or pid_alive(int(pid_text)):
            continue
        path = os.path.join(shm_dir, name)
        try:
            if os.lstat(path).st_uid != uid:
                continue
            os.unlink(path)
        except OSError:
            continue
        removed.append(name)
    if removed:
        log.info("removed %d stale ring(s) of dead clients: %s", len(removed), ", ".join(removed))
    return removed
