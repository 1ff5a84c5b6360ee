"""One rank of tests/test_shard_teardown.py: 2 gloo ranks on CPU, the ends of a group.

Run as ``python shard_teardown.py OUT RESULTS ENDPOINT RUN`` with the torch.distributed
env:// variables set (RANK, WORLD_SIZE=2, MASTER_ADDR, MASTER_PORT). ``RUN`` is one of:

- ``keys``: sharded saves that succeed, fail on bad blocks, fail in one rank's ``save()``
  (rank 1's, then rank 0's), and a sharded stream; then the store's key count. Then a
  spool closed on rank 1 (rank 0's save fails at once; a new spool on rank 1 saves with
  rank 0 again), the same with rank 0; the key count again. Then both ranks save and
  ``destroy_process_group()`` at once, before their futures resolved (rank 1 half a
  second after rank 0, so rank 0's save is in flight), and rank 0 returns from ``main``
  without waiting (the interpreter's exit closes its spool, which waits).
- ``kill0``: rank 0 dies (``os._exit``, holding the store) while rank 1 waits on it in a save.

Each outcome ("ok", the error's type and text, or a number) goes to ``RESULTS/rank<r>.json``
as it comes; files are ``OUT/<RUN>_<name>.mat``, global arrays from :func:`expected`.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import numpy as np
from ranks import Outcomes

WORLD = 2


def expected(name: str) -> np.ndarray:
    """The global array of each save (8 x 5; rank r holds rows 4r..4r+3)."""
    seed = sum(map(ord, name))
    return np.random.default_rng(seed).standard_normal((8, 5))


def shard(name: str, rank: int, dtype: Any = None) -> Any:
    import matspool

    block = expected(name)[4 * rank : 4 * rank + 4]
    return matspool.Shard(block if dtype is None else block.astype(dtype), (4 * rank, 0), (8, 5))


def main() -> None:
    out, results, endpoint, run = sys.argv[1:]
    import torch.distributed as dist

    import matspool

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    outcome = Outcomes(results, f"{run}_rank{rank}")
    record = outcome.record

    def wait(key: str, fut: Any) -> None:
        start = time.monotonic()
        try:
            fut.result(timeout=60)
            outcome[key] = "ok"
        except Exception as e:  # noqa: BLE001 - reported to the test
            outcome[key] = f"{type(e).__name__}: {e}"
        outcome[f"{key}_s"] = time.monotonic() - start
        record()

    def path(name: str) -> str:
        return os.path.join(out, f"{run}_{name}.mat")

    def save(spool: Any, name: str, variables: Any = None) -> Any:
        return spool.save(path(name), variables or {"u": shard(name, rank)})

    def raising(key: str, name: str, bad_rank: int, spool: Any) -> None:
        """``bad_rank``'s save() raises (object dtype); the other's future fails."""
        try:
            fut = save(spool, name, {"u": shard(name, rank, object if rank == bad_rank else None)})
        except matspool.MatspoolError as e:
            outcome[key] = f"raised {type(e).__name__}"
            return
        wait(key, fut)

    store = dist.distributed_c10d._get_default_store()
    spool = matspool.Spool(endpoint, ring_bytes=1 << 20, timeout=30)  # a hang would show as 30 s
    dist.barrier()
    if run == "keys":
        before = store.num_keys()
        wait("plain", save(spool, "plain"))
        wait(
            "overlap", save(spool, "overlap", {"u": matspool.Shard(expected("overlap")[:5], (0, 0), (8, 5))})
        )
        raising("raise1", "raise1", 1, spool)
        raising("raise0", "raise0", 0, spool)
        s = spool.stream(path("stream"))
        for k in range(2):
            wait(f"stream{k}", s.append(u=shard("stream", rank)))
        s.close()
        dist.barrier()
        deadline = time.monotonic() + 5  # rank 0's collector of "raise0" may still be at it
        while rank == 0 and store.num_keys() != before and time.monotonic() < deadline:
            time.sleep(0.01)
        outcome["keys_left"] = store.num_keys() - before
        if outcome["keys_left"]:  # which: the test's message names them
            from matspool import _shard_keys as k

            prefixes = [k.save_prefix("default", n) for n in range(4)] + [
                k.step_prefix("default", 0, n) for n in range(2)
            ]
            outcome["keys_there"] = [
                p + n for p in prefixes for n in k.every_key(WORLD) if store.check([p + n])
            ]
        record()
        dist.barrier()  # rank 0 has counted before rank 1 goes on (its closing writes keys)
        for closer in (1, 0):  # each rank's spool closed in turn while the other saves
            if rank == closer:
                spool.close()
            else:
                wait(f"closed{closer}", save(spool, f"closed{closer}"))
            dist.barrier()
            if rank == closer:
                spool = matspool.Spool(endpoint, ring_bytes=1 << 20, timeout=30)
            wait(f"after{closer}", save(spool, f"after{closer}"))
        dist.barrier()
        outcome["keys_left_closed"] = store.num_keys() - before
        record()
        if rank == 1:
            time.sleep(0.5)  # rank 0's save is in flight, waiting on this rank, when it destroys
        fut = save(spool, "destroy")
        dist.destroy_process_group()  # before the save resolved: the store must stay up for it
        if rank == 0:
            outcome["destroy"] = "left"
            record()
            return  # the interpreter's exit closes the spool, which waits for the save
        wait("destroy", fut)
        spool.close()
        return
    if run == "kill0":
        if rank == 0:  # never saves: rank 1 waits on it when it dies
            time.sleep(0.5)
            os._exit(0)
        wait("kill0", save(spool, "kill0"))
        os._exit(0)  # the group is gone: nothing to tear down


if __name__ == "__main__":
    main()
