"""One rank of tests/test_sharded_stream_close_race.py: 3 gloo ranks on CPU, two ranks of a
sharded stream end it at different steps: one closes its stream after step 0, another
leaves its ``with`` on an error while its step 1 is still in flight (so its word is for
step 2, a step that nobody makes once step 1 failed).

Run as ``python shard_stream_close_race.py OUT RESULTS ENDPOINT`` with the torch.distributed
env:// variables set (RANK, WORLD_SIZE=3, MASTER_ADDR, MASTER_PORT). Spool timeout 120 s,
futures waited 60 s at most. Cases, each on a stream of its own (``OUT/<case>.mat``), after
step 0 on every rank:

- ``late``: rank 1 closes its stream; rank 2 appends step 1 (in flight: rank 0 has not
  appended it) and leaves its ``with`` on an error; then rank 0 appends step 1.
- ``zero``: rank 1 appends step 1 (in flight) and leaves its ``with`` on an error; then
  rank 0 closes its stream and rank 2 appends step 1.

Every rank closes its streams. Last (``gaveup``), rank 1 appends step 1 of a new stream and makes a sharded
save (both in flight: the others have not made them), then closes its spool with
``close(timeout=1)``, which gives up on them; then ranks 0 and 2 append step 1 and make the
save: rank 1's abandoned step and save must fail them at once, not hold them for the timeout.
Then (``unstarted``) rank 1 leaves the ``with`` of a stream opened with ``group=`` on an error
before its first step, and the others append step 0: it must fail at once.
Once every rank closed its spool, rank 0 lists every store key of these steps and saves
still there. Outcomes ("ok", or the error's type and text) go to ``RESULTS/rank<r>.json``.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from ranks import Outcomes, RowSteps

WORLD = 3
CASES = ("late", "zero", "gaveup", "unstarted")
# who closes its stream after step 0, and who leaves its with on an error with step 1 in flight
ROLES = {"late": (1, 2), "zero": (0, 1)}

STEPS = RowSteps(CASES)
expected = STEPS.expected  # the global array of a step (the test reads the file against it)


def main() -> None:
    out, results, endpoint = sys.argv[1:]
    import torch.distributed as dist

    import matspool
    from matspool import _shard_keys as keys

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    outcome = Outcomes(results, f"rank{rank}")
    record = outcome.record
    outcome_of = outcome.of

    def u(case: str, step: int) -> Any:
        return STEPS.block(case, step, rank)

    spool = matspool.Spool(endpoint, ring_bytes=1 << 20, timeout=120)
    streams = {case: spool.stream(os.path.join(out, f"{case}.mat")) for case in ROLES}
    for case, s in streams.items():
        outcome_of(f"{case}/0", lambda: s.append(u=u(case, 0)))  # noqa: B023 - called at once

    for case, s in streams.items():
        closer, leaver = ROLES[case]
        fut = None
        if rank == closer and case == "late":
            outcome_of(f"{case}/close", s.close)
        dist.barrier()
        if rank == leaver:
            try:
                with s:
                    fut = s.append(u=u(case, 1))
                    raise RuntimeError("the caller's error")
            except RuntimeError:
                pass
        dist.barrier()  # the leaver's word (for step 2) is in the store
        if rank == closer and case == "zero":
            outcome_of(f"{case}/close", s.close)
        elif rank != closer and rank != leaver:
            fut = s.append(u=u(case, 1))
        if fut is not None:
            outcome_of(f"{case}/1", lambda: fut)  # noqa: B023 - called at once
        dist.barrier()
        outcome_of(f"{case}/end", s.close)
        dist.barrier()

    s = spool.stream(os.path.join(out, "gaveup.mat"))
    outcome_of("gaveup/0", lambda: s.append(u=u("gaveup", 0)))
    save_path = os.path.join(out, "gaveup_save.mat")
    if rank == 1:
        futs = [s.append(u=u("gaveup", 1)), spool.save(save_path, {"v": u("gaveup", 2)}, format="v7.3")]
        outcome_of("gaveup/close", lambda: spool.close(timeout=1))
        dist.barrier()
    else:
        dist.barrier()  # rank 1's close gave up on its step 1 and its save
        futs = [s.append(u=u("gaveup", 1)), spool.save(save_path, {"v": u("gaveup", 2)}, format="v7.3")]
    for name, fut in zip(("gaveup/1", "gaveup/save"), futs, strict=True):
        outcome_of(name, lambda: fut)  # noqa: B023 - called at once
    if rank != 1:
        outcome_of("gaveup/end", s.close)
    dist.barrier()

    # unstarted: rank 1 leaves the with of a stream opened with group= before its first step
    spool = spool if rank != 1 else matspool.Spool(endpoint, ring_bytes=1 << 20, timeout=120)
    path = os.path.join(out, "unstarted.mat")
    if rank == 1:
        try:
            with spool.stream(path, group=dist.group.WORLD):
                raise RuntimeError("the caller's error")
        except RuntimeError:
            pass
        dist.barrier()
    else:
        s = spool.stream(path, group=dist.group.WORLD)
        dist.barrier()  # rank 1's with is left
        outcome_of("unstarted/0", lambda: s.append(u=u("unstarted", 0)))
        outcome_of("unstarted/end", s.close)
    dist.barrier()

    outcome_of("spool/close", spool.close)
    dist.barrier()  # every rank closed its spool: their words for the next save go too
    store = dist.distributed_c10d._get_default_store()
    if rank == 0:
        prefixes = [keys.step_prefix("default", n, k) for n in range(len(CASES)) for k in range(4)]
        prefixes += [keys.save_prefix("default", n) for n in range(2)]
        outcome["keys_there"] = [
            p + k for p in prefixes for k in keys.every_key(WORLD) if store.check([p + k])
        ]
        record()
    dist.barrier()  # rank 0 holds the store: the others are done with it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
