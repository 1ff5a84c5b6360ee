"""The daemon's write stage alone, against a raw write of the same bytes, side by side.

``python -m bench.writestage [--mib 64] [--reps 5] [--dir DIR]``

What it times, in one process, contenders interleaved round by round (medians):

- ``raw``: open, ``write`` the bytes from an ordinary (already faulted) array, close,
  rename over the previous round's file: what any program writing those bytes pays
  (the rename frees the old file's pages); ``raw-new``: the same to a fresh name every
  round (the previous file removed untimed), the floor of the write alone;
- ``v5`` / ``v7.3``: a writer thread's job (``jobs.JobRunner.run``: confinement, temporary,
  writer, publish by rename) reading a sealed ``memfd`` mapped the way the daemon maps a
  client's ring (lazy, ``PROT_READ``); the mapping stays for all rounds, as a client's
  does (round 0, not in the medians, faults it in);
- ``-cold``: a fresh mapping every round (a client's first pass over its ring), with
  ``ringio.prefault``; ``-cold-nopf``: the same with the prefault switched off;
- ``-shm``: through a ``/dev/shm`` ring (``ringio.ShmRing``, never mapped), its array
  spliced into the file by the kernel (``shmspan``); ``-shm-copy``: the same ring read
  by copy into the daemon's memory, then written (the path before ``shmspan``);
- ``-direct`` (with ``--fsync``): the same job with ``MATSPOOL_DIRECT_IO=1``, so the
  payload goes ``O_DIRECT`` from the ring where it lines up (``writers/_direct.py``: v7.3
  always, v5 only when the ring offset is congruent with the file offset, which
  ``v5-phased`` arranges: its bytes sit 192 bytes into the ring, as far as a 2-d variable
  named ``x`` is into a v5 file; plain ``v5-direct`` is written buffered); ``dd-direct`` is
  ``dd if=/dev/zero bs=4M oflag=direct`` of the same size, the file system's floor for
  direct writes. With ``--fsync``, ``raw`` fsyncs too.

The writer jobs run as on a daemon's writer thread (``_retire.RETIRE.deferring``): the
file each one replaces is freed after the timed step, as the daemon frees it after the
answer. No fsync unless ``--fsync``. ``os.sync()`` before every timed step, so writeback of the
previous one does not land on the next. Ratios are raw time / writer time per round.
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ._util import Config, Progress, Row

__all__ = ["EVERY", "main", "measure", "rows", "run", "table"]

EVERY = [
    "raw",
    "raw-new",
    "v5",
    "v7.3",
    "v5-cold",
    "v7.3-cold",
    "v5-cold-nopf",
    "v7.3-cold-nopf",
    "v5-shm",
    "v7.3-shm",
    "v5-shm-copy",
    "v7.3-shm-copy",
    "dd-direct",
    "v5-direct",
    "v5-phased",
    "v7.3-direct",
]


def _memfd_ring(data: np.ndarray) -> tuple[int, mmap.mmap]:
    fd = os.memfd_create("bench-ring", os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
    os.ftruncate(fd, data.nbytes)
    view = memoryview(data).cast("B")
    off = 0
    while off < len(view):
        off += os.pwrite(fd, view[off:], off)
    return fd, mmap.mmap(fd, data.nbytes, mmap.MAP_SHARED, mmap.PROT_READ)


def _write_all(path: str, flag: int, data: np.ndarray, fsync: bool) -> None:
    """The raw modes' write: open (``flag``: O_TRUNC or O_EXCL), write every byte of
    ``data`` (no copy), fsync if asked, close."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | flag | os.O_CLOEXEC, 0o644)
    try:
        mv = memoryview(data).cast("B")
        while mv:
            mv = mv[os.write(fd, mv) :]
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def measure(mib: int, reps: int, d: str, fsync: bool = False, only: Sequence[str] = EVERY) -> dict[str, Any]:
    """Seconds per contender (round 0 first), writing into the directory ``d``."""
    d = os.path.abspath(d)  # the daemon takes absolute paths only
    from matspool import _protocol as proto
    from matspoold import ringio, shmspan
    from matspoold.jobs import Job, JobRunner
    from matspoold.ringio import ShmRing
    from matspoold.sessions import Client
    from matspoold.writers._retire import RETIRE

    n = int((mib << 20) // 4)
    side = int(np.sqrt(n))
    data = np.random.default_rng(1).random((side, n // side), dtype=np.float32)
    fd, mm = _memfd_ring(data)
    phase = 192  # the payload offset mod 512 of a 2-d v5 variable named "x"
    pfd, pmm = _memfd_ring(np.concatenate([np.zeros(phase, np.uint8), data.reshape(-1).view(np.uint8)]))
    shm_path = f"/dev/shm/bench-writestage-{os.getpid()}"
    with open(shm_path, "wb") as f:
        f.write(memoryview(data).cast("B"))
    shm_fd = os.open(shm_path, os.O_RDONLY)
    shm = ShmRing(shm_fd, data.nbytes)
    dims = (data.shape[1], data.shape[0])  # the ring is column-major: the C array's transpose
    spec = proto.VarSpec(name="x", dtype="<f4", dims=dims, offset=0, nbytes=data.nbytes)

    def raw() -> None:
        tmp = os.path.join(d, ".raw.tmp")
        _write_all(tmp, os.O_TRUNC, data, fsync)
        os.rename(tmp, os.path.join(d, "raw.mat"))

    def raw_new() -> None:
        _write_all(os.path.join(d, "raw-new.mat"), os.O_EXCL, data, fsync)

    runner = JobRunner([d])

    def dd_direct() -> None:
        out = os.path.join(d, "dd.bin")
        cmd = ["dd", "if=/dev/zero", f"of={out}", "bs=4M", f"count={data.nbytes >> 22}", "oflag=direct"]
        subprocess.run([*cmd, "status=none"], check=True)

    def job(fmt: str, ring: object, at: int = 0) -> None:
        path = os.path.join(d, f"{fmt}.mat")
        var = spec if not at else proto.VarSpec("x", "<f4", dims, offset=at, nbytes=data.nbytes)
        req = proto.WriteRequest(seq=0, path=path, format=fmt, fsync=fsync, vars=(var,))
        client = Client(ident=b"bench", ring="bench", mm=ring, fd=-1, pid=os.getpid())  # type: ignore[arg-type]
        _, err = runner.run(Job(client, req))
        if err is not None:
            raise err

    def daemon(fmt: str, kind: str) -> Callable[[], None]:
        def go() -> None:
            if kind == "cold" or kind == "cold-nopf":  # a client's first saves: a fresh mapping
                ringio._supported = kind == "cold"  # the bench's A/B switch
                fresh = mmap.mmap(fd, data.nbytes, mmap.MAP_SHARED, mmap.PROT_READ)
                try:
                    job(fmt, fresh)
                finally:
                    fresh.close()
                    ringio._supported = True
            elif kind in ("direct", "phased"):
                os.environ["MATSPOOL_DIRECT_IO"] = "1"
                try:
                    job(fmt, pmm, phase) if kind == "phased" else job(fmt, mm)
                finally:
                    del os.environ["MATSPOOL_DIRECT_IO"]
            elif kind == "shm-copy":  # the old /dev/shm path: copied out, then written
                shmspan._enabled = False
                try:
                    job(fmt, shm)
                finally:
                    shmspan._enabled = True
            else:
                job(fmt, shm if kind == "shm" else mm)

        return go

    contenders: dict[str, Callable[[], None]] = {"raw": raw, "raw-new": raw_new, "dd-direct": dd_direct}
    for fmt in ("v5", "v7.3"):
        for kind in ("warm", "cold", "cold-nopf", "shm", "shm-copy", "direct", "phased"):
            contenders[fmt if kind == "warm" else f"{fmt}-{kind}"] = daemon(fmt, kind)
    chosen = [c for c in only if c in contenders]
    times: dict[str, list[float]] = {c: [] for c in chosen}
    with RETIRE.deferring():
        for _ in range(reps + 1):
            for name in chosen:
                if name == "raw-new" and os.path.exists(os.path.join(d, "raw-new.mat")):
                    os.unlink(os.path.join(d, "raw-new.mat"))
                os.sync()
                t0 = time.perf_counter()
                contenders[name]()
                times[name].append(time.perf_counter() - t0)
                RETIRE.close_later(RETIRE.taken())  # after the step, as after the daemon's answer
                RETIRE.drain()
    for name in os.listdir(d):
        os.unlink(os.path.join(d, name))
    mm.close()
    os.close(fd)
    pmm.close()
    os.close(pfd)
    os.close(shm_fd)
    os.unlink(shm_path)
    return {"nbytes": data.nbytes, "reps": reps, "fsync": fsync, "times": times}


def table(res: dict[str, Any]) -> str:
    times = res["times"]
    out = [
        f"{res['nbytes'] / (1 << 20):.0f} MiB float32, {res['reps']} rounds (+1 cold), fsync={res['fsync']}",
        f"{'contender':14} {'round 0 ms':>10} {'median ms':>10} {'GB/s':>6} {'raw/this':>8} "
        f"{'raw-new/this':>12}  (medians of the per-round ratios)",
    ]
    for name, all_ts in times.items():
        med = statistics.median(all_ts[1:])
        cells = [_ratio(times, base, name) for base in ("raw", "raw-new")]
        out.append(
            f"{name:14} {all_ts[0] * 1e3:10.1f} {med * 1e3:10.1f} {res['nbytes'] / med / 1e9:6.2f} "
            + " ".join(
                f"{'-' if c is None else f'{c:.2f}':>{w}}" for c, w in zip(cells, (8, 12), strict=True)
            )
        )
    return "\n".join(out)


def _ratio(times: dict[str, list[float]], base: str, name: str) -> float | None:
    if base not in times:
        return None
    return statistics.median(b / x for b, x in zip(times[base][1:], times[name][1:], strict=True))


QUICK = ("raw", "raw-new", "v5", "v7.3", "v5-shm", "v7.3-shm", "v5-shm-copy", "v7.3-shm-copy")


def run(cfg: Config, workdir: str, progress: Progress) -> dict[str, Any]:
    """For ``python -m bench``: 64 MiB x 5 rounds (quick) or 256 MiB x 5, no fsync."""
    mib = 64 if cfg.quick else 256
    progress.step(f"{mib} MiB, no fsync")
    d = tempfile.mkdtemp(prefix="writestage-", dir=workdir)
    res = measure(mib, 5, d, only=QUICK)
    os.rmdir(d)
    res["ratios"] = {n: {b: _ratio(res["times"], b, n) for b in ("raw", "raw-new")} for n in QUICK[2:]}
    progress.end(", ".join(f"{n}: {r['raw-new']:.2f}x" for n, r in res["ratios"].items()))
    return res


def rows(res: dict[str, Any], cfg: Config) -> list[Row]:
    med = {n: statistics.median(ts[1:]) * 1e3 for n, ts in res["times"].items()}
    mib = res["nbytes"] >> 20
    return [
        Row(
            figure=f"write stage, {mib} MiB, {name} (no fsync)",
            measured=f"{med[name]:.1f} ms",
            compared=f"raw write to a new name {med['raw-new']:.1f} ms, over the old file {med['raw']:.1f}",
            ratio=f"{r['raw-new']:.2f}x (over the old file {r['raw']:.2f}x)",
            target=">= 0.9x raw" if "shm" not in name else "-",
            value=r["raw-new"],
            met=r["raw-new"] >= 0.9 if "shm" not in name else None,
        )
        for name, r in res["ratios"].items()
    ]


def main(argv: list[str] | None = None) -> None:

    p = argparse.ArgumentParser(prog="python -m bench.writestage")
    p.add_argument("--mib", type=int, default=64)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--dir", default=os.path.join(os.path.dirname(__file__), "out"))
    p.add_argument("--fsync", action="store_true")
    p.add_argument("--only", default=",".join(EVERY))
    a = p.parse_args(argv)
    os.makedirs(a.dir, exist_ok=True)
    d = tempfile.mkdtemp(prefix="writestage-", dir=a.dir)
    try:
        res = measure(a.mib, a.reps, d, a.fsync, a.only.split(","))
    finally:
        os.rmdir(d)
    print(table(res) + f"\ndir {a.dir}")


if __name__ == "__main__":
    main()
