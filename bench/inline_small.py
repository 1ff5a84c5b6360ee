"""The daemon's own CPU per small file, in one process: no ZeroMQ, no client, no load of
another process in the figure (issue 14).

    PYTHONPATH=client:service:. python -m bench.inline_small [FORMAT [N [ROUNDS]]]

runs the control thread's path of a burst of N new 4 KiB saves (v5 or v7.3) on a
``Daemon`` that is never served: each round, binary WRITEs in BATCHes of 32 (as the
client sends them) go through ``binparse.scan``, ``Daemon._handle_one`` (each written
inline, as ``serve`` writes them) and ``Outcomes.send_done`` (answers dropped), into a new
directory two levels below the root on /dev/shm; the figure is the process CPU time of
that, per file (min and median over ROUNDS). To compare two daemons, run it with each
one's ``service`` (and ``client``) first on PYTHONPATH, alternating: on a shared machine
the minimum moves least. ``bench.ab_small`` measures the same through real daemons.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time

from matspool import _messages as msgs
from matspool import _protocol as proto
from matspool import _wirebin
from matspool._ring import Ring
from matspoold import binparse
from matspoold.server import Daemon


class _Drop:
    """The ROUTER's guard, answering nobody."""

    def send_multipart(self, frames: list[object]) -> None:
        pass

    def seen(self, *args: object) -> None:
        pass


def main(fmt: str = "v5", n: int = 3000, rounds: int = 9) -> None:
    base = tempfile.mkdtemp(prefix="inline_small-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    root = os.path.join(base, "root")
    os.makedirs(os.path.join(root, "a", "b"))
    ring = Ring(64 << 20)
    daemon = Daemon(f"ipc://{base}/d.sock", [root])
    guard = daemon._guard = _Drop()  # type: ignore[assignment]
    ident = b"\x00inline"
    hello = {"op": "HELLO", "ring": ring.name, "ring_bytes": ring.size, "pid": os.getpid()}
    if ring.kind == "memfd":
        hello["fd"] = ring.fd
    daemon._handle_one(None, ident, hello, [])  # type: ignore[arg-type]
    seq = 0

    def burst(r: int, k: int) -> float:
        nonlocal seq
        d = os.path.join(root, "a", "b", f"r{r}")
        os.mkdir(d)
        bodies = []
        for i in range(k):
            var = proto.VarSpec("x", "<f4", (32, 32), (i % 1000) * 4096, 4096)
            req = proto.WriteRequest(seq + i, f"{d}/s{i}.mat", fmt, False, (var,), 0, "write", False)
            bodies.append(msgs.encode(req, binary=True)[1])
        seq += k
        batches = [_wirebin.join_batch(bodies[i : i + 32]) for i in range(0, k, 32)]
        t0 = time.process_time()
        for body in batches:
            for item in binparse.scan(body) or ():
                daemon._handle_one(None, ident, item, [])  # type: ignore[arg-type]
            daemon._outcomes.send_done(guard)
        spent = time.process_time() - t0
        written = len(os.listdir(d))
        shutil.rmtree(d)
        if written != k:
            raise SystemExit(f"{written} of {k} files written")
        return spent / k * 1e6

    try:
        burst(0, 200)  # warm: shapes, frames, templates
        us = sorted(burst(r + 1, n) for r in range(rounds))
    finally:
        ring.close()
        shutil.rmtree(base, ignore_errors=True)
    mid = statistics.median(us)
    print(f"{fmt}: daemon CPU per file {us[0]:.1f} us min, {mid:.1f} us median ({rounds} x {n})")


if __name__ == "__main__":
    a = sys.argv[1:]
    main(a[0] if a else "v5", int(a[1]) if len(a) > 1 else 3000, int(a[2]) if len(a) > 2 else 9)
