"""Floors for the small-file figures (issue 14): what this machine cannot go below.

``bench.small`` runs these interleaved with its contenders, in the same rounds, so the
note can set each target beside the floor measured in the same run:

- one cross-process round trip of a small message, over the transport matspool uses (a
  ZeroMQ DEALER to a ROUTER over ``ipc://``, the options of ``matspool._transport`` and
  ``matspoold.guard``) and over a plain unix ``SOCK_SEQPACKET`` socketpair: a save
  waited for costs at least the file's write plus one of these;
- the rate of one process that writes scipy's bytes (create+write+rename) and sends one
  message per file to another process (answers collected per burst): what a daemon that
  writes each file and exchanges one message per file could reach at best;
- the parts of ``save()`` no design removes: one ZeroMQ send of the WRITE message, and
  the 4 KiB memcpy into a shared mapping.

The peers are child processes (``python -m bench._floors zmq ENDPOINT`` or ``sock FD``)
that echo each message back. Threads: the caller's; each peer is one thread.
"""

from __future__ import annotations

import mmap
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import numpy as np

from ._util import now

__all__ = ["Floors"]

#: the two frames of a binary WRITE of one 4 KiB variable (protocol tag, ~130-byte body)
MESSAGE = [b"matspool/1", bytes(130)]


class Floors:
    """Echo peers in child processes and the timed operations against them."""

    def __init__(self) -> None:
        import zmq

        self._dir = tempfile.mkdtemp(prefix="floors-")
        endpoint = f"ipc://{self._dir}/echo.sock"
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([here, os.environ.get("PYTHONPATH", "")]))
        cmd = [sys.executable, "-m", "bench._floors"]
        self._zmq_peer = subprocess.Popen([*cmd, "zmq", endpoint], env=env)
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._sock_peer = subprocess.Popen(
            [*cmd, "sock", str(theirs.fileno())], env=env, pass_fds=[theirs.fileno()]
        )
        theirs.close()
        self._sock = mine
        self._ctx = zmq.Context()
        d = self._dealer = self._ctx.socket(zmq.DEALER)
        # a peer that failed to start fails the run (zmq.Again, TimeoutError), never hangs it
        mine.settimeout(30)
        for opt, value in ((zmq.SNDHWM, 0), (zmq.RCVHWM, 0), (zmq.LINGER, 0), (zmq.RCVTIMEO, 30_000)):
            d.setsockopt(opt, value)
        d.connect(endpoint)
        self._zmq = zmq
        self._map = mmap.mmap(-1, 1 << 20)  # a shared mapping, as the ring is
        self.ring = np.frombuffer(self._map, dtype=np.uint8)
        for _ in range(200):  # connected, both peers up, first-use costs paid
            self.round_trip_zmq()
            self.round_trip_sock()

    def round_trip_zmq(self) -> float:
        t0 = now()
        self._dealer.send_multipart(MESSAGE)
        self._dealer.recv_multipart()
        return now() - t0

    def round_trip_sock(self) -> float:
        t0 = now()
        self._sock.send(MESSAGE[1])
        self._sock.recv(4096)
        return now() - t0

    def sends(self, n: int) -> list[float]:
        """``n`` ZeroMQ sends of the WRITE message, each timed (as ``save()`` is); the
        echoes are collected after, untimed."""
        out = []
        send = self._dealer.send_multipart
        for _ in range(n):
            t0 = now()
            send(MESSAGE, copy=False, flags=self._zmq.NOBLOCK)
            out.append(now() - t0)
        for _ in range(n):
            self._dealer.recv_multipart()
        return out

    def memcpys(self, a: np.ndarray, n: int) -> list[float]:
        """``n`` copies of ``a``'s bytes into the shared mapping, each timed."""
        src = a.reshape(-1).view(np.uint8)
        out = []
        for i in range(n):
            off = (i * 4096) % (len(self.ring) - src.nbytes)
            dst = self.ring[off : off + src.nbytes]
            t0 = now()
            np.copyto(dst, src)
            out.append(now() - t0)
        return out

    def write_and_send(self, paths: list[str], write: Callable[[str], None]) -> None:
        """Per file: ``write`` it, send one message; the answers are collected at the end
        (one process doing a daemon's least per file: the file, one message)."""
        for p in paths:
            write(p)
            self._dealer.send_multipart(MESSAGE, copy=False)
        for _ in paths:
            self._dealer.recv_multipart()

    def close(self) -> None:
        self._dealer.close(linger=0)
        self._ctx.term()
        self._sock.close()
        for p in (self._zmq_peer, self._sock_peer):
            p.terminate()
            p.wait()
        del self.ring  # the mapping closes once no array views it
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> Floors:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _echo_zmq(endpoint: str) -> None:
    import zmq

    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.ROUTER_MANDATORY, 1)
    router.setsockopt(zmq.LINGER, 0)
    router.bind(endpoint)
    while True:
        router.send_multipart(router.recv_multipart(copy=False), copy=False)


def _echo_sock(fd: int) -> None:
    s = socket.socket(fileno=fd)
    while data := s.recv(4096):
        s.send(data)


if __name__ == "__main__":
    if sys.argv[1] == "zmq":
        _echo_zmq(sys.argv[2])
    else:
        _echo_sock(int(sys.argv[2]))
