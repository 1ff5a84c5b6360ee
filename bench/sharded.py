"""(9) Sharded saves: 4 ranks, one global array, three ways to get it onto disk.

4 ranks (gloo on CPU, two daemons as two simulated nodes: ranks 0-1 on one, 2-3 on the
other, one output directory) each hold a float32 block of ``mib`` MiB (full: 256, quick:
16) of a global array split by rows. Timed from a barrier until every rank's future has
resolved (the slowest rank), best of ``reps``:

- ``sharded``: ``spool.save(path, {"u": matspool.Shard(...)})`` on every rank: ONE file
  holding the global array, each rank's block written in place by its own daemon;
- ``separate``: every rank saves its own block to its own file (4 files: the upper
  bound, what a sharded save costs beyond it is the coordination and the layout);
- ``gather``: ``dist.gather`` of the blocks to rank 0, which saves the global array
  through its one ring and daemon (the way users do it today).

All v7.3. Reported: bytes/s of each and the ratios sharded/separate, sharded/gather.

    PYTHONPATH=client:service python -m bench --only sharded [--quick]
    PYTHONPATH=client:service python -m bench.sharded --scan [MIB_PER_RANK [REPS]]  # 1-8 ranks, 1-2 daemons
    PYTHONPATH=client:service python -m bench.sharded --many [N [RANKS]]  # N small sharded saves in turn

``--many``: ``N`` (default 60) small sharded saves one after another (each waited for),
``RANKS`` (default 2) ranks on one daemon: the coordination's cost per save, which the
store connections it takes decide (a clone per save was seen to take 5 s now and then).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Any

from ._util import Config, MiB, Progress, Row, run_ranks, subdir

__all__ = ["main", "rows", "run"]

WORLD = 4
MODES = ("sharded", "separate", "gather")


def measure(
    d: str, world: int, daemons: int, mib: int, reps: int, modes: tuple[str, ...] = MODES
) -> dict[str, Any]:
    """``world`` ranks on ``daemons`` daemons (ranks split evenly), ``mib`` MiB each."""
    from .producers import _start_daemon, _stop_daemon

    started = [_start_daemon(d, "--writers", "4") for _ in range(daemons)]
    out = os.path.join(d, "result.json")
    try:
        rest = [str(mib), str(reps), out, ",".join(modes)]
        endpoints = [started[rank * daemons // world][1] for rank in range(world)]
        run_ranks(world, lambda rank: ["-m", "bench.sharded", d, endpoints[rank], *rest])
        with open(out) as f:
            res: dict[str, Any] = json.load(f)
    finally:
        for proc, _, sockdir in started:
            _stop_daemon(proc, sockdir)
    for mode in modes:
        res[mode]["bytes_per_s"] = world * abs(mib) * MiB / res[mode]["seconds"]
    return res


def run(cfg: Config, workdir: str, progress: Progress) -> dict[str, Any]:
    d = subdir(workdir, "sharded")
    mib = 16 if cfg.quick else 256
    progress.step(f"{WORLD} ranks x {mib} MiB, two daemons")
    res = measure(d, WORLD, 2, mib, 2 if cfg.quick else 3)
    res["ratio_separate"] = res["sharded"]["bytes_per_s"] / res["separate"]["bytes_per_s"]
    res["ratio_gather"] = res["sharded"]["bytes_per_s"] / res["gather"]["bytes_per_s"]
    progress.end(
        ", ".join(f"{m} {res[m]['bytes_per_s'] / 1e9:.2f} GB/s" for m in MODES)
        + f"; sharded/separate {res['ratio_separate']:.2f}x, sharded/gather {res['ratio_gather']:.2f}x"
    )
    return res


def rows(res: dict[str, Any], cfg: Config) -> list[Row]:
    mib = res["mib"]
    return [
        Row(
            figure=f"sharded save, {WORLD} ranks x {mib} MiB into one v7.3 file (2 daemons)",
            measured=f"{res['sharded']['bytes_per_s'] / 1e9:.2f} GB/s",
            compared=f"4 separate files: {res['separate']['bytes_per_s'] / 1e9:.2f} GB/s",
            ratio=f"{res['ratio_separate']:.2f}x",
            value=res["ratio_separate"],
        ),
        Row(
            figure=f"sharded save vs gather to rank 0 and save there ({WORLD} x {mib} MiB)",
            measured=f"{res['sharded']['bytes_per_s'] / 1e9:.2f} GB/s",
            compared=f"gather + one save: {res['gather']['bytes_per_s'] / 1e9:.2f} GB/s",
            ratio=f"{res['ratio_gather']:.2f}x",
            target="> 1x",
            value=res["ratio_gather"],
            met=res["ratio_gather"] > 1.0,
        ),
    ]


def _rank(d: str, endpoint: str, mib: int, reps: int, out: str, modes: tuple[str, ...]) -> None:
    """One rank: time the three ways (the slowest rank's time, from a barrier)."""
    import time

    import torch
    import torch.distributed as dist

    import matspool

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    n = max(mib, 0) * MiB // 4
    cols = 1024
    rows_ = n // cols
    local = torch.arange(rank * n, (rank + 1) * n, dtype=torch.float32).reshape(rows_, cols)
    global_shape = (world * rows_, cols)
    timings: dict[str, Any] = {"mib": mib, "world": world}
    with matspool.Spool(endpoint, ring_bytes=(max(mib, 0) + 16) * MiB, timeout=300) as spool:
        if mib < 0:  # --many: -mib small saves in turn
            dist.barrier()
            timings["many"] = _many(d, spool, rank, world, -mib)
            modes = ()

        def once(mode: str) -> float:
            dist.barrier()
            t0 = time.perf_counter()
            if mode == "sharded":
                shard = matspool.Shard(local, (rank * rows_, 0), global_shape)
                spool.save(os.path.join(d, "global.mat"), {"u": shard}, format="v7.3").result()
            elif mode == "separate":
                spool.save(os.path.join(d, f"part{rank}.mat"), {"u": local}, format="v7.3").result()
            else:
                parts = [torch.empty_like(local) for _ in range(world)] if rank == 0 else None
                dist.gather(local, parts, dst=0)
                if rank == 0:
                    assert parts is not None
                    spool.save(
                        os.path.join(d, "gathered.mat"), {"u": torch.cat(parts)}, format="v7.3"
                    ).result()
            dist.barrier()  # the slowest rank's time
            return time.perf_counter() - t0

        for mode in modes:
            times = [once(mode) for _ in range(reps)]
            timings[mode] = {"seconds": min(times), "all": times}
            dist.barrier()
            if rank == 0:  # keep the disk's page cache from deciding the next mode
                for name in os.listdir(d):
                    if name.endswith(".mat"):
                        os.unlink(os.path.join(d, name))
    if rank == 0:
        with open(out + ".tmp", "w") as f:
            json.dump(timings, f)
        shutil.move(out + ".tmp", out)
    dist.destroy_process_group()


def scan(mib: int = 16, reps: int = 2) -> None:
    """``python -m bench.sharded --scan``: sharded saves of 1, 2, 4, 8 ranks on 1 and 2
    daemons (``mib`` MiB per rank), against each rank saving its own file."""
    import tempfile

    with tempfile.TemporaryDirectory(dir=os.path.join(os.path.dirname(__file__), "out")) as d:
        print(f"| ranks | daemons | sharded GB/s | separate files GB/s | ratio |  ({mib} MiB per rank)")
        print("|---|---|---|---|---|")
        for world in (1, 2, 4, 8):
            for daemons in (1, 2) if world > 1 else (1,):
                res = measure(d, world, daemons, mib, reps, ("sharded", "separate"))
                sh, sep = res["sharded"]["bytes_per_s"] / 1e9, res["separate"]["bytes_per_s"] / 1e9
                print(f"| {world} | {daemons} | {sh:.3f} | {sep:.3f} | {sh / sep:.2f}x |", flush=True)


def many(n: int = 60, world: int = 2) -> None:
    """``python -m bench.sharded --many``: ``n`` small sharded saves in turn, ``world`` ranks."""
    import tempfile

    os.makedirs(os.path.join(os.path.dirname(__file__), "out"), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.join(os.path.dirname(__file__), "out")) as d:
        res = measure(d, world, 1, -n, 1, ("many",))
        secs = res["many"]["seconds"]
        print(
            f"{n} sharded saves in turn, {world} ranks: {secs:.2f} s ({1000 * secs / n:.0f} ms per save; "
            f"slowest {1000 * res['many']['slowest']:.0f} ms)"
        )


def _many(d: str, spool: Any, rank: int, world: int, n: int) -> dict[str, float]:
    import time

    import numpy as np

    import matspool

    local = np.full((8, 4), rank, dtype=np.float64)
    slowest, t0 = 0.0, time.perf_counter()
    for i in range(n):
        t = time.perf_counter()
        shard = matspool.Shard(local, (8 * rank, 0), (8 * world, 4))
        spool.save(os.path.join(d, f"many{i % 4}.mat"), {"u": shard}).result()
        slowest = max(slowest, time.perf_counter() - t)
    return {"seconds": time.perf_counter() - t0, "slowest": slowest}


def main() -> None:
    if sys.argv[1:2] == ["--many"]:
        many(*(int(a) for a in sys.argv[2:4]))
        return
    if sys.argv[1:2] == ["--scan"]:
        os.makedirs(os.path.join(os.path.dirname(__file__), "out"), exist_ok=True)
        scan(*(int(a) for a in sys.argv[2:4]))
        return
    d, endpoint, mib, reps, out, modes = sys.argv[1:]
    _rank(d, endpoint, int(mib), int(reps), out, tuple(modes.split(",")))


if __name__ == "__main__":
    main()
