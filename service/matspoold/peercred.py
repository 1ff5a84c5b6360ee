"""Who is on the other end of a unix socket, as the kernel says (never as the peer says).

``SO_PEERCRED`` gives the pid, uid and gid of the process that called ``connect()``, and
``SO_PEERGROUPS`` (Linux 4.13) its supplementary groups, both recorded by the kernel at
connect time. The node daemon (``userd``) starts each user's writer with exactly these
ids, so the writer can do what the client itself could and nothing more. pyzmq's ipc://
cannot give them (libzmq hides the socket), hence the plain unix handshake socket.

Threads: pure functions; the caller owns the socket.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from dataclasses import dataclass

__all__ = ["Cred", "peer_cred"]

_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux's value; Python 3.11 lacks the name
_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


@dataclass(frozen=True, slots=True)
class Cred:
    """A connecting process's ids, from the kernel."""

    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...]  # supplementary groups, sorted, without duplicates


def peer_cred(sock: socket.socket) -> Cred:
    """The kernel's record of who connected ``sock`` (an accepted AF_UNIX stream socket)."""
    pid, uid, gid = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
    size = 256 * 4
    while True:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, size)
            break
        except OSError as e:
            if e.errno == errno.ENOPROTOOPT:  # a kernel before 4.13: the user's groups instead
                return Cred(pid, uid, gid, _groups_of(uid, gid))
            if e.errno != errno.ERANGE or size >= 65536 * 4:
                raise
            size *= 4  # more groups than the buffer holds (NGROUPS_MAX is 65536)
    n = len(raw) // 4
    groups = struct.unpack(f"{n}I", raw[: n * 4])
    return Cred(pid, uid, gid, tuple(sorted(set(groups))))


def _groups_of(uid: int, gid: int) -> tuple[int, ...]:
    """The groups the account ``uid`` gets at login (no account: none)."""
    import pwd

    try:
        return tuple(sorted(set(os.getgrouplist(pwd.getpwuid(uid).pw_name, gid))))
    except (KeyError, OSError):
        return ()
