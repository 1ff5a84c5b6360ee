"""Claiming an ipc endpoint: one daemon per socket, and a daemon removes only its own.

libzmq's ipc bind silently unlinks whatever socket file is in the way, so a second
``matspool serve`` on a live endpoint would steal it and, when it stopped, delete it,
cutting the first daemon's clients off. Before binding, a daemon therefore

1. takes an exclusive ``flock`` on ``<socket>.lock`` (kept for its whole life, so two
   daemons starting at once cannot both pass step 2; the kernel drops it when the daemon
   dies, even by SIGKILL). The lock file is left in place (unlinking it would let a
   newcomer lock a stale inode), except by a job's daemon (``--idle-exit``), which leaves
   nothing behind: it unlinks the file while still holding it, and a newcomer that then
   locks the unlinked inode sees the path no longer names it and opens the path again;
2. asks the socket, if one exists, for a PING: an answer (a daemon of an older version
   that takes no lock, or one in another mount namespace) means the endpoint is taken.

Only a socket nobody answers is replaced (never a file of another kind). At exit the
socket is removed only when the file at the path is still the one this daemon bound (same device and inode).

Owned by the thread that runs ``Daemon.serve`` (it claims before binding and releases
after closing the socket).
"""

from __future__ import annotations

import fcntl
import logging
import os
import stat
from dataclasses import dataclass

from matspool._errors import MatspoolError

__all__ = ["EndpointBusy", "IpcClaim", "claim_ipc"]

log = logging.getLogger("matspoold")

_PROBE_TIMEOUT = 1.0  # s: a live daemon answers a PING within milliseconds


class EndpointBusy(MatspoolError, OSError):
    """Another daemon serves (or holds) this endpoint; ``matspool serve`` exits with 2."""

    code = "endpoint_busy"


@dataclass(eq=False, slots=True)
class IpcClaim:
    """This daemon's hold on one ipc socket path."""

    path: str
    lock_fd: int
    inode: tuple[int, int] | None = None  # (st_dev, st_ino) of the socket we bound

    def bound(self) -> None:
        """Record which file is ours: call right after bind."""
        st = os.stat(self.path)
        self.inode = (st.st_dev, st.st_ino)

    def release(self, *, remove_lock: bool = False) -> None:
        """Remove the socket if it is still ours, then drop the lock. ``remove_lock``
        (a job's daemon, which leaves nothing behind): the lock file goes too, unlinked
        while still held, so a newcomer that opened it retries (``claim_ipc``)."""
        try:
            st = os.stat(self.path)
            if self.inode is not None and (st.st_dev, st.st_ino) == self.inode:
                os.unlink(self.path)
            elif self.inode is not None:
                log.warning("%s is no longer the socket this daemon bound; leaving it", self.path)
        except FileNotFoundError:
            pass
        finally:
            if self.lock_fd >= 0:
                if remove_lock and _is_at(self.lock_fd, self.path + ".lock"):
                    os.unlink(self.path + ".lock")
                os.close(self.lock_fd)  # closing drops the flock
                self.lock_fd = -1


def _is_at(fd: int, path: str) -> bool:
    """Whether ``path`` still names the file open at ``fd``."""
    try:
        st, here = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (here.st_dev, here.st_ino)


def _holder_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _answering_pid(endpoint: str) -> int | None:
    """The pid of a daemon answering a PING on ``endpoint`` (-1 if it does not say); None
    when nothing answers."""
    from matspool._messages import Ping, Pong

    from .probe import ask

    try:
        reply = ask(endpoint, Ping(), _PROBE_TIMEOUT)
    except Exception:  # noqa: BLE001 - a garbled answer is still not a daemon we can share with
        return None
    if not isinstance(reply, Pong):
        return None
    return -1 if reply.pid is None else reply.pid


def claim_ipc(endpoint: str) -> IpcClaim:
    """Claim ``ipc://PATH`` for this daemon, or raise :class:`EndpointBusy` naming the one
    that has it."""
    path = endpoint[len("ipc://") :]
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    for _ in range(100):
        fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        claim = _claim_locked(endpoint, path, fd)
        if claim is not None:
            return claim
    raise EndpointBusy(f"the lock file of {endpoint} keeps being replaced; not taking it")


def _claim_locked(endpoint: str, path: str, fd: int) -> IpcClaim | None:
    """Lock ``fd`` (the lock file just opened) and check the socket; None when the lock
    file was removed meanwhile (by a job's daemon leaving): open it again."""
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder_pid(fd)
            answering = _answering_pid(endpoint)
            pid = answering if answering not in (None, -1) else holder
            if answering is None:
                raise EndpointBusy(
                    f"a daemon (pid {pid}) holds {endpoint} but does not answer "
                    "(stopped?); not taking it over"
                ) from None
            raise EndpointBusy(f"a daemon already serves {endpoint}, pid {pid}") from None
        if not _is_at(fd, path + ".lock"):
            os.close(fd)  # a leaving daemon unlinked it while holding it: a stale inode
            return None
        if os.path.lexists(path):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise EndpointBusy(
                    f"{path} exists and is not a socket; not replacing it "
                    f"(remove it, or serve another endpoint)"
                )
            answering = _answering_pid(endpoint)
            if answering is not None:
                raise EndpointBusy(
                    f"a daemon already serves {endpoint}, pid {answering if answering >= 0 else 'unknown'}"
                )
            log.info("replacing the stale socket %s (nothing answers on it)", path)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    return IpcClaim(path, fd)
