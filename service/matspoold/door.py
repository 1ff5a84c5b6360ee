"""Pausing libzmq's accept on the daemon's ipc socket, so a flood cannot make it abort.

libzmq's ipc listener aborts the whole process when ``accept`` fails with ``EMFILE``
(``src/ipc_listener.cpp``: ``EMFILE`` is not among the errors it tolerates, unlike its
tcp listener), and libzmq has no call to stop a listener accepting for a while. Cutting
each connection beyond the cap after libzmq accepted it (``guard``) leaves a race: a
flood on a loaded machine accepts faster than the cuts land, and at a 1,024-descriptor
limit three connecting threads killed the daemon in every try.

A :class:`Door` closes that race at the kernel: it finds the listening socket among this
process's descriptors (``/proc/net/unix`` names it by path, ``/proc/self/fd`` says which
descriptor holds it) and the epoll set of libzmq's I/O thread that watches it
(``/proc/self/fdinfo`` lists each watched descriptor with its events and the pointer
libzmq stored with it). :meth:`Door.close` re-arms that watch with no events
(``EPOLL_CTL_MOD``, the pointer kept), so libzmq never hears that connections wait and
never calls ``accept``; new connections wait in the kernel's backlog, then are refused
with ``EAGAIN`` and retried by their clients. Below the cap :meth:`Door.arm` lets one
connection in at a time (``EPOLLONESHOT``), so each accept is counted before the next:
a door shut only once the count reached the cap came too late at small descriptor limits
(the guard's thread lagged libzmq's I/O thread by over 100 accepts, and EMFILE aborted
the daemon at 128 and 256 descriptors). :meth:`Door.open` restores libzmq's own events.

Nothing is assumed blindly: before each change the watch is read back from ``fdinfo`` and
must still be the listener's (same descriptor, socket inode and pointer); otherwise the
door is dropped and the cap falls back to cutting. Linux only; tcp listeners tolerate
``EMFILE`` and need none. Everything is found while descriptors are free (right after
the bind): opening ``/proc`` needs one, exactly what a flood takes.

Threads: found by the control thread after bind, then used only by the guard's watcher;
released by the control thread once the watcher ended.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform
import re
import time
from dataclasses import dataclass

__all__ = ["Door", "find_door"]

log = logging.getLogger("matspoold")

_EPOLL_CTL_MOD = 3
_EPOLLONESHOT = 1 << 30
_ACCEPTCON = 0x10000  # /proc/net/unix Flags: a listening socket


class _EpollEvent(ctypes.Structure):
    # the kernel's struct epoll_event is packed on x86-64 only
    _pack_ = 1 if platform.machine() in ("x86_64", "AMD64") else 0
    _fields_ = [("events", ctypes.c_uint32), ("data", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.epoll_ctl.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.POINTER(_EpollEvent)]


@dataclass
class Door:
    """libzmq's epoll watch of one listening socket."""

    epfd: int  # libzmq's epoll descriptor
    fd: int  # the listening socket's descriptor
    inode: int  # the listening socket's inode (sockfs), as fdinfo shows it
    events: int  # the events libzmq asked for
    data: int  # the pointer libzmq keeps with the watch
    info: int  # our descriptor of /proc/self/fdinfo/<epfd>: read again without opening
    shut: bool = False

    def close(self) -> bool:
        """Stop libzmq hearing of new connections. False when the watch is no longer the
        listener's (the door is then useless and must be dropped)."""
        return self._set(0, shut=True)

    def arm(self) -> bool:
        """Let libzmq hear of one waiting connection (``EPOLLONESHOT``: the kernel disarms
        the watch once it reported it, and libzmq accepts one per report): the caller
        counts each accept before it allows the next, so a thread that lags behind libzmq's
        I/O thread cannot let a flood past the cap. Re-arms also an armed watch."""
        return self._set(self.events | _EPOLLONESHOT, shut=False, always=True)

    def open(self) -> bool:
        """Let libzmq accept again as it does by itself."""
        return self._set(self.events, shut=False, always=True)

    def release(self) -> None:
        """Close our ``fdinfo`` descriptor. The watch stays as it is: its socket is closed
        next (libzmq removes a watch whatever its events), and opening it would let in a
        backlog nobody counts any more."""
        try:
            os.close(self.info)
        except OSError:
            pass

    def _set(self, events: int, *, shut: bool, always: bool = False) -> bool:
        if self.shut == shut and not always:
            return True
        if not self._still_ours():
            return False
        ev = _EpollEvent(events, self.data)
        if _libc.epoll_ctl(self.epfd, _EPOLL_CTL_MOD, self.fd, ctypes.byref(ev)) != 0:
            return False
        self.shut = shut
        return True

    def _still_ours(self) -> bool:
        """Whether the watch of ``fd`` in ``epfd`` is still the listener's (same socket
        inode, same libzmq pointer). One regular-expression search of the fdinfo text, not
        a parse of every line: the I/O thread watches every connection, and a parse cost
        3.7 ms per arm with 800 connected clients."""
        try:
            text = _read_all(self.info)
        except OSError:
            return False
        m = re.search(
            rb"^tfd:\s+%d\s+events:\s+[0-9a-f]+\s+data:\s+([0-9a-f]+)\s.*?ino:([0-9a-f]+)" % self.fd,
            text,
            re.M,
        )
        return m is not None and (int(m[1], 16), int(m[2], 16)) == (self.data, self.inode)


def _read_all(fd: int) -> bytes:
    """A /proc file read again from its start through a descriptor kept open."""
    chunks: list[bytes] = []
    offset = 0
    while True:
        chunk = os.pread(fd, 65536, offset)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        offset += len(chunk)


def _listening_inodes(path: str) -> set[int]:
    found = set()
    with open("/proc/net/unix", encoding="utf-8", errors="surrogateescape") as f:
        next(f)
        for line in f:
            parts = line.rstrip("\n").split(None, 7)
            if len(parts) == 8 and parts[7] == path and int(parts[3], 16) & _ACCEPTCON:
                found.add(int(parts[6]))
    return found


def _parse_watches(text: bytes) -> dict[int, tuple[int, int, int]]:
    """The descriptors one epoll set watches, from its fdinfo: fd -> (events, data, inode)."""
    out = {}
    for line in text.decode("ascii", "replace").splitlines():
        if not line.startswith("tfd:"):
            continue
        words = line.split()
        try:
            fields = dict(zip(words[::2], words[1::2], strict=False))
            inode = int(line.split("ino:")[1].split()[0], 16)
            out[int(fields["tfd:"])] = (int(fields["events:"], 16), int(fields["data:"], 16), inode)
        except (KeyError, ValueError, IndexError):
            continue
    return out


def _find_once(path: str) -> Door | bool:
    """The door, or whether looking again may find it (False: this /proc cannot show it:
    no descriptor of ours holds a listening socket at ``path``, or no epoll set lists
    what it watches)."""
    inodes = _listening_inodes(path)
    fds: dict[int, int] = {}  # our listening socket's fd -> inode
    epolls = []
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if target.startswith("socket:[") and int(target[8:-1]) in inodes:
            fds[int(name)] = int(target[8:-1])
        elif target == "anon_inode:[eventpoll]":
            epolls.append(int(name))
    listed = False  # some epoll set lists its watches (libzmq's always has its mailbox)
    for epfd in epolls:
        try:
            info = os.open(f"/proc/self/fdinfo/{epfd}", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            watches = _parse_watches(_read_all(info))
        except OSError:
            watches = {}
        listed = listed or bool(watches)
        for fd, inode in fds.items():
            got = watches.get(fd)
            if got is not None and got[2] == inode:
                return Door(epfd, fd, inode, got[0], got[1], info)
        os.close(info)
    return bool(fds) and listed  # the listener is bound: libzmq watches it shortly


def find_door(endpoint: str, wait: float = 1.0) -> Door | None:
    """The door of the ipc socket this process just bound at ``endpoint``, or None
    (not ipc, not Linux, a /proc that cannot show it, or not found within ``wait`` s:
    libzmq's I/O thread registers the listener shortly after ``bind`` returns)."""
    if not endpoint.startswith("ipc://") or not os.path.exists("/proc/net/unix"):
        return None
    path = endpoint[len("ipc://") :]
    until = time.monotonic() + wait
    while True:
        try:
            found = _find_once(path)
        except OSError:
            found = False
        if isinstance(found, Door):
            return found
        if not found or time.monotonic() >= until:
            log.warning("no epoll watch found for %s: a connection flood is cut, not paused", endpoint)
            return None
        time.sleep(0.002)
