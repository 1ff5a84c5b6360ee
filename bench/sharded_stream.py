"""Sharded streams: one step of a global array appended by 4 ranks, against a sharded save.

4 ranks (gloo on CPU, two daemons as two simulated nodes, one output directory) each
hold a float32 block of ``mib`` MiB of a global array split by rows. Side by side, in
alternation (``reps`` rounds): ``stream``, one step appended to a sharded stream (every
rank's blocks into a temporary in place, then rank 0's daemon copies the step into the
stream under its journal), and ``save``, one sharded save of the same array to a file of
its own. Timed from a barrier until every rank's future resolved (the slowest rank).
The first round's stream step creates the file and is not counted. What the ratio shows
is the price of the second copy a stream step makes (docs/distributed.md, "Streams of
shards").

    PYTHONPATH=client:service python -m bench.sharded_stream [MIB_PER_RANK [REPS]]
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from typing import Any

from ._util import MiB, run_ranks

__all__ = ["main"]

WORLD = 4


def measure(d: str, mib: int, reps: int) -> dict[str, Any]:
    from .producers import _start_daemon, _stop_daemon

    started = [_start_daemon(d, "--writers", "4") for _ in range(2)]
    out = os.path.join(d, "result.json")
    try:
        rest = [str(mib), str(reps), out]
        run_ranks(
            WORLD, lambda rank: ["-m", "bench.sharded_stream", "--rank", d, started[rank // 2][1], *rest]
        )
        with open(out) as f:
            res: dict[str, Any] = json.load(f)
    finally:
        for proc, _, sockdir in started:
            _stop_daemon(proc, sockdir)
    return res


def _rank(d: str, endpoint: str, mib: int, reps: int, out: str) -> None:
    import time

    import torch
    import torch.distributed as dist

    import matspool

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    n = mib * MiB // 4
    cols = 1024
    rows = n // cols
    local = torch.arange(rank * n, (rank + 1) * n, dtype=torch.float32).reshape(rows, cols)
    shard = matspool.Shard(local, (rank * rows, 0), (world * rows, cols))
    times: dict[str, list[float]] = {"stream": [], "save": []}
    with matspool.Spool(endpoint, ring_bytes=(mib + 16) * MiB, timeout=300) as spool:
        s = spool.stream(os.path.join(d, "stream.mat"))

        def once(mode: str) -> float:
            dist.barrier()
            t0 = time.perf_counter()
            if mode == "stream":
                s.append(u=shard).result()
            else:
                spool.save(
                    os.path.join(d, f"save{len(times['save'])}.mat"), {"u": shard}, format="v7.3"
                ).result()
            dist.barrier()
            return time.perf_counter() - t0

        once("stream")  # creates the stream
        for _ in range(reps):
            for mode in ("stream", "save"):
                times[mode].append(once(mode))
        s.close()
    if rank == 0:
        res = {
            m: {"all": t, "seconds": min(t), "bytes_per_s": world * mib * MiB / min(t)}
            for m, t in times.items()
        }
        with open(out + ".tmp", "w") as f:
            json.dump({"mib": mib, "world": world, **res}, f)
        shutil.move(out + ".tmp", out)
    dist.destroy_process_group()


def main() -> None:
    if sys.argv[1:2] == ["--rank"]:
        d, endpoint, mib, reps, out = sys.argv[2:]
        _rank(d, endpoint, int(mib), int(reps), out)
        return
    mib, reps = (int(a) for a in (sys.argv[1:3] + ["16", "3"][len(sys.argv[1:3]) :]))
    base = os.path.join(os.path.dirname(__file__), "out")
    os.makedirs(base, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=base) as d:
        res = measure(d, mib, reps)
    st, sv = res["stream"]["bytes_per_s"] / 1e9, res["save"]["bytes_per_s"] / 1e9
    print(f"{WORLD} ranks x {mib} MiB float32, 2 daemons, best of {reps} (alternated):")
    print(f"  sharded stream step {st:.3f} GB/s  {[round(x, 3) for x in res['stream']['all']]} s")
    print(f"  sharded save        {sv:.3f} GB/s  {[round(x, 3) for x in res['save']['all']]} s")
    print(f"  stream / save       {st / sv:.2f}x")


if __name__ == "__main__":
    main()
