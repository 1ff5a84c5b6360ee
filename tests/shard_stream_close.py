"""One rank of tests/test_sharded_stream_close.py: 3 gloo ranks on CPU, a sharded stream
whose rank closes its spool, or its stream, while the others append the next steps.

Run as ``python shard_stream_close.py OUT RESULTS ENDPOINT`` with the torch.distributed
env:// variables set (RANK, WORLD_SIZE=3, MASTER_ADDR, MASTER_PORT). Every spool has a
``timeout`` of 120 s and every future is waited for 60 s at most: a step that waited for
the timeout shows as ``TimeoutError``, not as the ShardError the test asks for. Cases, in
turn, each on a stream of its own (``OUT/<case>.mat``), after steps 0 and 1 on every rank:

- ``spool``: ranks 0 and 2 append steps 2 and 3 (both in flight), then rank 1 closes the
  spool of this stream (a spool of its own, ``first``); ranks 0 and 2 then append step 4
  (the stream has ended), and close the stream and their ``first``. Rank 1 appends to its
  stream of the closed spool.
- ``stream``: ranks 1 and 2 append step 2, then rank 0 (which checks the blocks and holds
  the store) closes its stream; ranks 1 and 2 close theirs.
- ``end``: every rank closes its stream after step 1, as a run ends.

Then rank 0 lists every store key of these streams' steps still there; and, once every
rank closed both its spools (each closed spool's word for the group's next sharded save
that never comes), every key of those saves still there. Each outcome ("ok",
or the error's type and text) goes to ``RESULTS/rank<r>.json`` as it comes.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from ranks import Outcomes, RowSteps

WORLD = 3
CASES = ("spool", "stream", "end")

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

    def new_spool() -> Any:
        return matspool.Spool(endpoint, ring_bytes=1 << 20, timeout=120)  # a wait for it shows

    first, spool = new_spool(), new_spool()  # first: the "spool" case's, which rank 1 closes
    streams = {
        case: (first if case == "spool" else spool).stream(os.path.join(out, f"{case}.mat")) for case in CASES
    }
    for case, s in streams.items():
        for k in (0, 1):
            outcome_of(f"{case}/{k}", lambda: s.append(u=u(case, k)))  # noqa: B023 - called at once

    s = streams["spool"]
    if rank == 1:
        dist.barrier()  # the others' steps 2 and 3 are in flight
        outcome_of("first/close", first.close)
        outcome_of("spool/after", lambda: s.append(u=u("spool", 2)))
        outcome_of("spool/close", s.close)
    else:
        futs = {k: s.append(u=u("spool", k)) for k in (2, 3)}
        dist.barrier()
        for k, fut in futs.items():
            outcome_of(f"spool/{k}", lambda: fut)  # noqa: B023 - called at once
        outcome_of("spool/4", lambda: s.append(u=u("spool", 4)))
        outcome_of("spool/close", s.close)
        outcome_of("first/close", first.close)
    dist.barrier()

    s = streams["stream"]
    if rank == 0:
        dist.barrier()  # the others' step 2 is in flight
        outcome_of("stream/close", s.close)
    else:
        fut = s.append(u=u("stream", 2))
        dist.barrier()
        outcome_of("stream/2", lambda: fut)
        outcome_of("stream/close", s.close)
    dist.barrier()

    outcome_of("end/close", streams["end"].close)
    dist.barrier()  # every rank's stream is closed: the last one deleted the word of step 2
    store = dist.distributed_c10d._get_default_store()

    def there(prefixes: list[str]) -> list[str]:
        return [p + key for p in prefixes for key in keys.every_key(WORLD) if store.check([p + key])]

    if rank == 0:
        outcome["keys_there"] = there([keys.step_prefix("default", n, k) for n in range(3) for k in range(6)])
        record()
    outcome_of("last/close", spool.close)  # every rank closed both: the word for saves 0 and 1 goes
    dist.barrier()
    if rank == 0:
        outcome["save_keys_there"] = there([keys.save_prefix("default", n) for n in range(3)])
        record()
    dist.barrier()  # rank 0 holds the store: the others are done with it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
