"""One rank of tests/test_sharded.py: a gloo process group on CPU, several sharded saves.

Run as ``python shard_ranks.py OUT RESULTS ENDPOINT RING_BYTES CASE...`` with the
torch.distributed env:// variables set (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT). Each
case is saved by every rank into ``OUT/<case>.mat``; this rank's outcome of each case
("ok" or the error's type and text) goes to ``RESULTS/rank<r>.json`` as it comes. The
expected global arrays are :func:`expected` (the test reads the files back against it).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from ranks import Outcomes

WORLD = 4


def _global(shape: tuple[int, ...], dtype: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if dtype.startswith("int"):
        return rng.integers(-1000, 1000, size=shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def expected(case: str) -> dict[str, np.ndarray]:
    """The global arrays each case's file must hold (C-order numpy; MATLAB A(i,j)=x[i,j])."""
    if case == "dtensor_rows":
        return {"u": _global((10, 6), "float64", 1)}
    if case == "dtensor_cols":
        return {"u": _global((7, 9), "float32", 2)}
    if case == "dtensor_mesh":
        return {"u": _global((6, 8), "int64", 3), "r": _global((5, 8), "float32", 4)}
    if case == "shard_uneven":
        return {
            "u": _global((9, 7), "float64", 5),
            "w": _global((4, 5, 6), "float32", 6),
            "v": _global((10,), "float64", 7),
        }
    if case == "big":
        return {"u": _global((1024, 640), "float64", 8)}
    if case == "subgroup":
        return {"u": _global((4, 3), "float64", 14)}
    if case.startswith("burst"):  # burst0, burst1, burst2: saved back to back, then waited for
        return {"u": _global((8, 4), "float64", 20 + int(case[-1])), "step": np.array(int(case[-1]))}
    if case == "v5":
        c = _global((6, 5), "float64", 10) + 1j * _global((6, 5), "float64", 11)
        return {"u": _global((7, 6), "float32", 12), "c": c, "b": _global((3, 8), "float64", 13) > 0}
    if case in ("killed", "daemon_killed"):
        return {"u": _global((4096, 1024), "float64", 9)}
    if case in ("overlap", "missing", "bad_dtype", "mismatch"):
        return {"u": _global((8, 4), "float64", 9)}
    raise KeyError(case)


# hand-made decompositions: rank -> (offset, size) in the global array
_UNEVEN_U = {0: ((0, 0), (5, 3)), 1: ((0, 3), (5, 4)), 2: ((5, 0), (4, 6)), 3: ((5, 6), (4, 1))}
_UNEVEN_W = {
    0: ((0, 0, 0), (4, 5, 1)),
    1: ((0, 0, 1), (4, 5, 2)),
    2: ((0, 0, 3), (4, 2, 3)),
    3: ((0, 2, 3), (4, 3, 3)),
}
_UNEVEN_V = {0: ((0,), (3,)), 1: ((3,), (3,)), 2: ((6,), (2,)), 3: ((8,), (2,))}
_ROWS = {r: ((2 * r, 0), (2, 4)) for r in range(WORLD)}  # 8 x 4 in four 2-row blocks


def _block(g: np.ndarray, at: tuple[tuple[int, ...], tuple[int, ...]]) -> Any:
    import torch

    (offset, size) = at
    return torch.from_numpy(
        np.ascontiguousarray(g[tuple(slice(o, o + n) for o, n in zip(offset, size, strict=True))])
    )


def variables(case: str, rank: int) -> dict[str, Any]:
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    import matspool

    want = expected(case)
    if case.startswith("dtensor"):
        if case == "dtensor_mesh":
            mesh = init_device_mesh("cpu", (2, 2))
            return {
                "u": distribute_tensor(torch.from_numpy(want["u"]), mesh, [Shard(0), Shard(1)]),
                "r": distribute_tensor(torch.from_numpy(want["r"]), mesh, [Replicate(), Shard(1)]),
            }
        mesh = init_device_mesh("cpu", (WORLD,))
        dim = 0 if case == "dtensor_rows" else 1
        return {"u": distribute_tensor(torch.from_numpy(want["u"]), mesh, [Shard(dim)])}
    if case == "shard_uneven":
        return {
            name: matspool.Shard(_block(want[name], parts[rank]), parts[rank][0], want[name].shape)
            for name, parts in (("u", _UNEVEN_U), ("w", _UNEVEN_W), ("v", _UNEVEN_V))
        }
    if case == "v5":
        return {
            name: matspool.Shard(_block(want[name], part), part[0], want[name].shape)
            for name, part in (
                ("u", ((0, 0), (7, 6)) if rank == 0 else ((0, 0), (0, 6))),  # rank 0 holds all of u
                ("c", ((0, rank), (6, 2 if rank == 3 else 1))),
                ("b", ((0, 2 * rank), (3, 2))),
            )
        }
    if case.startswith("burst"):  # a plain value too: rank 0 writes it
        at = _ROWS[rank]
        return {"u": matspool.Shard(_block(want["u"], at), at[0], want["u"].shape), "step": want["step"]}
    if case == "subgroup":  # ranks 0 and 1 only, two rows each
        at = ((2 * rank, 0), (2, 3))
        return {"u": matspool.Shard(_block(want["u"], at), at[0], want["u"].shape)}
    if case == "big":
        g = want["u"]
        cols = {r: ((0, 160 * r), (1024, 160)) for r in range(WORLD)}
        return {"u": matspool.Shard(_block(g, cols[rank]), cols[rank][0], g.shape)}
    g = want["u"]
    at = _ROWS[rank]
    if case in ("killed", "daemon_killed"):  # 8 MiB per rank: writes take many ring-fulls
        at = ((1024 * rank, 0), (1024, 1024))
    if case == "overlap" and rank == 2:
        at = ((3, 0), (2, 4))  # rows 3-4: overlaps rank 1's rows 2-3
    if case == "missing" and rank == 3:
        at = ((6, 0), (1, 4))  # row 7 is nobody's
    local = _block(g, at)
    if case == "bad_dtype" and rank == 2:
        local = local.numpy().astype(object)  # no MATLAB class: this rank's save() raises
    if case == "mismatch" and rank == 1:
        local = local.float()  # single here, double elsewhere
    return {"u": matspool.Shard(local, at[0], g.shape)}


#: the format each case is saved in ("auto" picks v5 for these small arrays)
FORMATS = {"dtensor_cols": "auto", "v5": "v5", "burst0": "auto", "burst1": "auto", "burst2": "auto"}


def main() -> None:
    out, results, endpoint, ring_bytes, *cases = sys.argv[1:]
    import torch.distributed as dist

    import matspool

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    outcome = Outcomes(results, f"rank{rank}")
    spool = matspool.Spool(
        endpoint, ring_bytes=int(ring_bytes), timeout=8
    )  # the sharded saves wait this long for late ranks: CI machines are loaded

    record = outcome.record

    def laid_out(case: str) -> None:
        """Wait (20 s at most) until the case's file is laid out (its temporary exists)."""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any(n.startswith(f".{case}.mat.") for n in os.listdir(out)):
            time.sleep(0.001)

    # a third daemon, used by ranks 2-3 for "daemon_killed" only (rank 2 kills it mid-save)
    third = os.environ.get("SHARD_THIRD_ENDPOINT")
    spare = matspool.Spool(third, ring_bytes=int(ring_bytes), timeout=3) if third and rank >= 2 else None
    pair = dist.new_group([0, 1])  # collective: every rank makes it, ranks 0-1 use it
    dist.barrier()  # ranks start seconds apart here (torch's import); the 8 s timeout is for the saves
    if "burst" in cases:  # three sharded saves in flight at once, then waited for
        start = time.monotonic()
        futs = [
            spool.save(
                os.path.join(out, f"burst{i}.mat"), variables(f"burst{i}", rank), format=FORMATS[f"burst{i}"]
            )
            for i in range(3)
        ]
        for i, fut in enumerate(futs):
            try:
                fut.result(timeout=60)
                outcome[f"burst{i}"] = "ok"
            except Exception as e:  # noqa: BLE001 - reported to the test
                outcome[f"burst{i}"] = f"{type(e).__name__}: {e}"
        outcome["burst_s"] = f"{time.monotonic() - start:.2f}"
        record()
        cases.remove("burst")
    for case in cases:
        path = os.path.join(out, f"{case}.mat")
        start = time.monotonic()
        if case == "subgroup" and rank >= 2:
            continue  # not a member: saves nothing
        try:
            using = spare if case == "daemon_killed" and spare is not None else spool
            group = pair if case == "subgroup" else None
            fut = using.save(
                path,
                variables(case, rank),
                format=FORMATS.get(case, "v7.3"),
                group=group,
                fsync=case == "shard_uneven",  # each block and the rename durable
            )
            if case == "killed" and rank == 3:  # dies once the file is laid out, mid-writes
                laid_out(case)
                os.kill(os.getpid(), signal.SIGKILL)
            if case == "daemon_killed" and rank == 2:  # kills its daemon mid-writes
                laid_out(case)
                assert spare is not None and spare._link is not None and spare._link.daemon_pid
                os.kill(spare._link.daemon_pid, signal.SIGKILL)
            fut.result(timeout=60)
            outcome[case] = "ok"
        except Exception as e:  # noqa: BLE001 - reported to the test
            outcome[case] = f"{type(e).__name__}: {e}"
        outcome[f"{case}_s"] = f"{time.monotonic() - start:.2f}"
        record()
    if "killed" in cases:
        if rank == 0:  # rank 0 holds the store: keep it up until ranks 1-2 have read it
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not all(
                "killed" in (f.read_text() if (f := Path(results) / f"rank{r}.json").exists() else "")
                for r in (1, 2)
            ):
                time.sleep(0.05)
        os._exit(0)  # a member is dead: the group cannot be torn down
    spool.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
