"""The daemon's own memory while it writes 256 MiB variables, from ``/proc/<pid>/smaps_rollup``.

``python -m bench.daemon_rss [--mib 256] [--dir DIR] [--only NAME,...]``

One external daemon (``python -m matspoold serve``); this process is its client. Every
5 ms a thread reads the daemon's ``smaps_rollup``; for each kind of save the peak while it
ran is reported next to the idle daemon's figures:

- ``own``: ``Pss - Pss_Shmem``, the daemon's heap, buffers and (its share of) code pages:
  what it costs the node beyond the clients' rings (the target: at most 200 MiB with
  256 MiB variables);
- ``private`` (``Private_Clean + Private_Dirty``) and ``Private_Dirty``: the same, except
  that the kernel counts a shared-memory page as private while only one process maps it,
  so a ring the client has already unmapped (it closed its spool; the daemon lets go of
  the ring a moment later) shows up here: read ``own`` for the daemon's own memory;
- ``Rss``: includes the client's ring pages the daemon has read: not the daemon's own.

Saves (``--mib`` MiB float32 each, no fsync):

- ``v5``, ``v7.3``: one whole variable through a ring that holds it;
- ``v7.3-deflate``: the same, ``compress=1`` (chunks deflated on every core);
- ``v7.3-pieces``: a ring of a quarter of the variable: the save goes in pieces (PARTs);
- ``stream``: a stream's first step and two appends of the variable;
- ``sharded``: a ``Shard`` of the variable (one rank, a gloo group of one), ring a quarter
  of it, so the daemon PLACEs it in pieces;
- ``v7.3-shm``: a ``/dev/shm`` ring (``ring_mode=0o640``), which the daemon never maps;
  a large array goes from the ring into the file by ``splice`` (``matspoold.shmspan``;
  before it, copied out with ``preadv``, the save's bytes in daemon memory: 302 MiB own
  at 256 MiB, now 39).
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ._util import MiB, proc_kib_fields

__all__ = ["main", "smaps_rollup"]

_FIELDS = ("Rss", "Pss", "Pss_Shmem", "Private_Clean", "Private_Dirty", "Anonymous")
SAVES = ("v5", "v7.3", "v7.3-deflate", "v7.3-pieces", "stream", "sharded", "v7.3-shm")


def smaps_rollup(pid: int) -> dict[str, int]:
    """The fields above, in bytes (a kernel without one reports it as 0)."""
    return proc_kib_fields(f"/proc/{pid}/smaps_rollup", _FIELDS)


def _derived(r: dict[str, int]) -> dict[str, int]:
    return {
        "own": r["Pss"] - r["Pss_Shmem"],
        "private": r["Private_Clean"] + r["Private_Dirty"],
        "Private_Dirty": r["Private_Dirty"],
        "Rss": r["Rss"],
    }


class _Sampler:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            for k, v in _derived(smaps_rollup(self.pid)).items():
                self.peak[k] = max(self.peak.get(k, 0), v)
            self._stop.wait(0.005)

    def __enter__(self) -> _Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        for k, v in _derived(smaps_rollup(self.pid)).items():  # the last moment too
            self.peak[k] = max(self.peak.get(k, 0), v)


def _sharded(endpoint: str, path: str, arr: np.ndarray, ring: int) -> None:
    import torch
    import torch.distributed as dist

    import matspool

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        local = torch.from_numpy(arr)
        with matspool.Spool(endpoint, ring_bytes=ring, timeout=300) as spool:
            shard = matspool.Shard(local, (0, 0), tuple(local.shape))
            spool.save(path, {"u": shard}, format="v7.3").result()
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    import matspool

    from .producers import _start_daemon, _stop_daemon

    p = argparse.ArgumentParser(prog="python -m bench.daemon_rss")
    p.add_argument("--mib", type=int, default=256)
    p.add_argument("--dir", default=os.path.join(os.path.dirname(__file__), "out"))
    p.add_argument("--only", default=",".join(SAVES))
    a = p.parse_args(argv)
    os.makedirs(a.dir, exist_ok=True)
    d = tempfile.mkdtemp(prefix="daemon-rss-", dir=a.dir)
    nbytes = a.mib * MiB
    arr = np.random.default_rng(2).random((nbytes // 4 // 1024, 1024), dtype=np.float32)
    whole = nbytes + 16 * MiB
    quarter = nbytes // 4 + MiB

    def save(ring: int, fmt: str = "v7.3", **kw: Any) -> Callable[[str], None]:
        def go(endpoint: str) -> None:
            with matspool.Spool(endpoint, ring_bytes=ring, timeout=300, **kw) as s:
                s.save(os.path.join(d, "x.mat"), {"x": arr}, format=fmt).result()

        return go

    def deflate(endpoint: str) -> None:
        with matspool.Spool(endpoint, ring_bytes=whole, timeout=300) as s:
            s.save(os.path.join(d, "x.mat"), {"x": arr}, format="v7.3", compress=1).result()

    def stream(endpoint: str) -> None:
        with matspool.Spool(endpoint, ring_bytes=whole, timeout=300) as s:
            st = s.stream(os.path.join(d, "s.mat"))
            for _ in range(3):
                st.append(x=arr).result()
            st.close()

    cases: dict[str, Callable[[str], None]] = {
        "v5": save(whole, "v5"),
        "v7.3": save(whole),
        "v7.3-deflate": deflate,
        "v7.3-pieces": save(quarter),
        "stream": stream,
        "sharded": lambda ep: _sharded(ep, os.path.join(d, "g.mat"), arr, quarter),
        "v7.3-shm": save(whole, ring_mode=0o640),
    }
    proc, endpoint, sockdir = _start_daemon(d)
    try:
        time.sleep(0.5)
        idle = _derived(smaps_rollup(proc.pid))
        rows = []
        for name in a.only.split(","):
            t0 = time.perf_counter()
            with _Sampler(proc.pid) as sampler:
                cases[name](endpoint)
            rows.append((name, time.perf_counter() - t0, sampler.peak))
            for f in os.listdir(d):
                if f.endswith(".mat"):
                    os.unlink(os.path.join(d, f))
        after = _derived(smaps_rollup(proc.pid))
    finally:
        _stop_daemon(proc, sockdir)
        for f in os.listdir(d):
            os.unlink(os.path.join(d, f))
        os.rmdir(d)
    keys = ("own", "private", "Private_Dirty", "Rss")
    print(f"daemon memory, MiB, {a.mib} MiB float32 variables (peaks while each save ran; 5 ms samples)")
    print(f"{'save':14} {'s':>5} " + " ".join(f"{k:>14}" for k in keys))
    print(f"{'(idle)':14} {'':>5} " + " ".join(f"{idle[k] / MiB:14.1f}" for k in keys))
    for name, secs, peak in rows:
        print(f"{name:14} {secs:5.2f} " + " ".join(f"{peak.get(k, 0) / MiB:14.1f}" for k in keys))
    print(f"{'(after all)':14} {'':>5} " + " ".join(f"{after[k] / MiB:14.1f}" for k in keys))


if __name__ == "__main__":
    main()
