"""One large CPU tensor until its file is complete, matspool against h5py, side by side.

``python -m bench.complete [--mib 64] [--reps 7] [--dir DIR]``

Issue 14's row "one 64 MiB CPU tensor until the file is complete (no fsync)": in one
process, contenders interleaved round by round, medians; ``os.sync()`` before each.

- ``h5py``: ``h5py.File(p, "w").create_dataset("x", data=t.numpy())`` (the C-order bytes
  as they are: MATLAB would see the transpose);
- ``v5`` / ``v7.3``: ``spool.save(p, {"x": t}, format=...).result()`` with the default
  ``layout="matlab"`` (MATLAB sees the tensor's indices: a column-major reorder on the
  way), and ``-raw`` with ``layout="raw"`` (the bytes as they are, like h5py).

The ring holds two variables, so saves go round it and each round's ring pages were
written before (by the client) but may be new to the daemon's mapping in early rounds:
round 0 is left out of the medians. The caller's own blocked time is printed too.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import numpy as np

__all__ = ["main"]


def main(argv: list[str] | None = None) -> None:
    import h5py
    import torch

    import matspool

    p = argparse.ArgumentParser(prog="python -m bench.complete")
    p.add_argument("--mib", type=int, default=64)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--dir", default=os.path.join(os.path.dirname(__file__), "out"))
    p.add_argument("--only", default="h5py,v5,v7.3,v5-raw,v7.3-raw")
    a = p.parse_args(argv)
    os.makedirs(a.dir, exist_ok=True)
    d = tempfile.mkdtemp(prefix="complete-", dir=a.dir)
    n = (a.mib << 20) // 4
    arr = np.random.default_rng(8).random((n // 1024, 1024), dtype=np.float32)
    t = torch.from_numpy(arr)
    blocked: dict[str, list[float]] = {}
    with matspool.Spool(ring_bytes=2 * arr.nbytes + (16 << 20)) as spool:

        def h5() -> None:
            with h5py.File(os.path.join(d, "h5py.h5"), "w") as f:
                f.create_dataset("x", data=t.numpy())

        def ms(fmt: str, layout: str) -> Callable[[], None]:
            name = f"{fmt}-raw" if layout == "raw" else fmt

            def go() -> None:
                t0 = time.perf_counter()
                fut = spool.save(os.path.join(d, f"{name}.mat"), {"x": t}, format=fmt, layout=layout)
                blocked.setdefault(name, []).append(time.perf_counter() - t0)
                fut.result(600)

            return go

        contenders = {
            "h5py": h5,
            "v5": ms("v5", "matlab"),
            "v7.3": ms("v7.3", "matlab"),
            "v5-raw": ms("v5", "raw"),
            "v7.3-raw": ms("v7.3", "raw"),
        }
        chosen = [c for c in a.only.split(",") if c in contenders]
        times: dict[str, list[float]] = {c: [] for c in chosen}
        for _ in range(a.reps + 1):
            for name in chosen:
                os.sync()
                t0 = time.perf_counter()
                contenders[name]()
                times[name].append(time.perf_counter() - t0)
    for f in os.listdir(d):
        os.unlink(os.path.join(d, f))
    os.rmdir(d)
    print(f"{arr.nbytes >> 20} MiB float32 CPU tensor, {a.reps} rounds (+ round 0), dir {a.dir}")
    print(f"{'contender':10} {'round 0 ms':>10} {'complete ms':>11} {'blocked ms':>10} {'h5py/this':>9}")
    for name in chosen:
        ts = times[name][1:]
        ratios = [h / x for h, x in zip(times["h5py"][1:], ts, strict=True)] if "h5py" in times else [0.0]
        b = statistics.median(blocked[name][1:]) * 1e3 if name in blocked else 0.0
        print(
            f"{name:10} {times[name][0] * 1e3:10.1f} {statistics.median(ts) * 1e3:11.1f} {b:10.1f} "
            f"{statistics.median(ratios):9.2f}"
        )


if __name__ == "__main__":
    main()
