"""One rank of tests/test_sharded_stream.py: a gloo process group on CPU, sharded streams.

Run as ``python shard_stream_ranks.py OUT RESULTS ENDPOINT RING_BYTES CASE...`` with the
torch.distributed env:// variables set. Each case is a stream every rank appends to,
``OUT/<case>.mat``; this rank's outcome of each step ("ok" or the error's type and text)
goes to ``RESULTS/rank<r>.json`` under ``<case>/<step>`` as it comes. Rank 0 also reads
the file back (h5py) as soon as each step's future resolved, under ``<case>/<step>/read``:
the number of steps the file holds and whether the newest one is exact. The expected
global arrays are :func:`expected` (the test reads the files back against it).
"""

from __future__ import annotations

import os
import signal
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from ranks import Outcomes

WORLD = 4
STEPS = {"rows": 3, "dtensor": 3, "mismatch": 7, "killed": 3, "daemon_killed": 3, "killed0": 2}
_MESH: list[Any] = []
_ROWS = {r: ((2 * r, 0), (2, 5)) for r in range(WORLD)}  # 8 x 5 in four 2-row blocks


def expected(case: str, step: int) -> dict[str, np.ndarray]:
    """The global arrays of one step (C-order numpy; MATLAB A(i,j) = x[i,j])."""
    rng = np.random.default_rng([zlib.crc32(case.encode()), step])
    if case == "dtensor":
        return {"u": rng.standard_normal((6, 8)).astype(np.float32)}
    if case == "killed":  # 8 MiB per rank: a step takes many ring-fulls
        return {"u": rng.standard_normal((4096, 1024))}
    if case == "daemon_killed":
        return {"u": rng.standard_normal((1024, 1024))}
    if case == "killed0":  # ranks 0-2 only, 8 MiB each
        return {"u": rng.standard_normal((3072, 1024))}
    return {"u": rng.standard_normal((8, 5)), "t": np.array(0.5 * step)}


def variables(case: str, step: int, rank: int) -> dict[str, Any]:
    import torch

    import matspool

    want = expected(case, step)
    if case == "dtensor":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        if not _MESH:  # once: a mesh is a collective to make
            _MESH.append(init_device_mesh("cpu", (WORLD,)))
        return {"u": distribute_tensor(torch.from_numpy(want["u"]), _MESH[0], [Shard(1)])}
    g = want["u"]
    if case in ("killed", "daemon_killed", "killed0"):
        rows = g.shape[0] // (3 if case == "killed0" else WORLD)
        (o, n) = ((rows * rank, 0), (rows, 1024))
    else:
        (o, n) = _ROWS[rank]
        if case == "mismatch" and step == 0 and rank == 2:
            o = (3, 0)  # rows 3-4: overlaps rank 1's rows 2-3, and leaves row 5 to nobody
        if case == "mismatch" and step == 2:
            g = np.vstack([g, g])  # a global shape the stream's earlier steps do not have
            (o, n) = ((4 * rank, 0), (4, 5))
    local = torch.from_numpy(np.ascontiguousarray(g[o[0] : o[0] + n[0], o[1] : o[1] + n[1]]))
    if case == "mismatch" and step == 3 and rank == 1:
        local = local.float()  # single here, double elsewhere
    if case == "mismatch" and step == 5 and rank in (0, 2):
        local = local.numpy().astype(object)  # no MATLAB class: this rank's append() raises
    out: dict[str, Any] = {"u": matspool.Shard(local, o, g.shape)}
    if "t" in want:
        out["t"] = want["t"]  # a plain value: group rank 0 writes it
    return out


def _read(path: str, step: int, want: dict[str, np.ndarray]) -> str:
    """What rank 0 finds in the file once a step's future resolved."""
    import h5py

    with h5py.File(path, "r") as f:
        n = f["u"].shape[0]
        exact = all(
            np.array_equal(f[name][n - 1].T, value.reshape(1, 1) if value.ndim == 0 else value)
            for name, value in want.items()
        )
    return f"{n} steps, newest {'exact' if exact else 'WRONG'}"


def _laid_out(out: str, case: str) -> None:
    """Wait (20 s at most) until the step's temporary exists (rank 0 had it laid out)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and not any(
        n.startswith(f".{case}.mat.") and n.endswith(".matspool-tmp") for n in os.listdir(out)
    ):
        time.sleep(0.001)


def main() -> None:
    out, results, endpoint, ring_bytes, *cases = sys.argv[1:]
    import torch.distributed as dist

    import matspool

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    outcome = Outcomes(results, f"rank{rank}")
    spool = matspool.Spool(endpoint, ring_bytes=int(ring_bytes), timeout=8)
    third = os.environ.get("SHARD_THIRD_ENDPOINT")
    spare = matspool.Spool(third, ring_bytes=int(ring_bytes), timeout=3) if third and rank >= 2 else None

    record = outcome.record

    trio = dist.new_group([0, 1, 2])  # collective: every rank makes it, ranks 0-2 use it
    dist.barrier()
    if "pipelined" in cases:  # two streams, every step appended before any resolved
        start = time.monotonic()
        pair = [spool.stream(os.path.join(out, f"pipe{i}.mat")) for i in (0, 1)]
        futs = [pair[i].append(variables(f"pipe{i}", k, rank)) for k in range(3) for i in (0, 1)]
        try:
            for s in pair:
                s.close(timeout=60)
            outcome["pipelined"] = "ok" if all(f.result().nbytes > 0 for f in futs) else "no size"
        except Exception as e:  # noqa: BLE001 - reported to the test
            outcome["pipelined"] = f"{type(e).__name__}: {e}"
        outcome["pipelined_s"] = f"{time.monotonic() - start:.2f}"
        record()
        cases.remove("pipelined")
    for case in cases:
        path = os.path.join(out, f"{case}.mat")
        using = spare if case == "daemon_killed" and spare is not None else spool
        if case == "killed0" and rank == 3:
            continue  # dead by now, and not in the trio
        s = using.stream(path, fsync=case == "rows", group=trio if case == "killed0" else None)
        start = time.monotonic()
        for step in range(STEPS[case]):
            key = f"{case}/{step}"
            try:
                t0 = time.monotonic()
                values = variables(case, step, rank)
                t1 = time.monotonic()
                fut = s.append(values)
                if step == 2 and case == "killed" and rank == 3:  # dies mid-step, in its writes
                    _laid_out(out, case)
                    os.kill(os.getpid(), signal.SIGKILL)
                if step == 1 and case == "killed0" and rank == 0:  # rank 0, the store's host, dies
                    _laid_out(out, case)
                    os.kill(os.getpid(), signal.SIGKILL)
                if step == 2 and case == "daemon_killed" and rank == 2:  # kills its daemon mid-step
                    assert spare is not None and spare._link is not None and spare._link.daemon_pid
                    os.kill(spare._link.daemon_pid, signal.SIGKILL)
                fut.result(timeout=60)
                outcome[key] = "ok"
                outcome[f"{key}_s"] = f"{t1 - t0:.2f} + {time.monotonic() - t1:.2f}"
                if rank == 0:
                    outcome[f"{key}/read"] = _read(path, step, expected(case, step))
            except Exception as e:  # noqa: BLE001 - reported to the test
                outcome[key] = f"{type(e).__name__}: {e}"
            record()
        outcome[f"{case}_s"] = f"{time.monotonic() - start:.2f}"
        record()
    if "killed" in cases and "killed0" not in cases and rank == 0:
        # rank 0 holds the store: keep it up until ranks 1-2 have read it
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not all(
            "killed/2" in (f.read_text() if (f := Path(results) / f"rank{r}.json").exists() else "")
            for r in (1, 2)
        ):
            time.sleep(0.05)
    if "killed" in cases:
        os._exit(0)  # a member is dead: the group cannot be torn down
    spool.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
