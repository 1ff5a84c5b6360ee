"""Cost of a crash-safe stream append: the journaled ``append_step`` vs the plain in-place
h5py append it replaced, side by side (alternating, same data, same directory).

    PYTHONPATH=client:service python -m bench.stream_append [--dir DIR] [--n 200]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import h5py
import numpy as np

from matspool._protocol import VarSpec
from matspoold.writers import write_atomic
from matspoold.writers._v73values import _stored
from matspoold.writers.stream import append_step

__all__ = ["main"]

Step = list[tuple[VarSpec, Any]]


def _plain_append(path: str, variables: Step, *, fsync: bool) -> int:
    """The append before the journal (as of 8621e93): HDF5 rewrites its metadata in place
    through its sec2 driver; the same checks as today."""
    with h5py.File(path, "r+") as f:
        names = {spec.name for spec, _ in variables}
        if names != set(f.keys()):
            raise ValueError(sorted(names))
        for spec, arr in variables:
            ds = f[spec.name]
            data = _stored(spec, arr)
            if ds.shape[1:] != tuple(spec.dims[::-1]) or ds.dtype != data.dtype:
                raise ValueError(spec.name)
        n = f[next(iter(names))].shape[0]
        for spec, arr in variables:
            ds = f[spec.name]
            ds.resize(n + 1, axis=0)
            ds[n] = _stored(spec, arr)
    if fsync:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return os.stat(path).st_size


def _step(side: int) -> Step:
    u = np.asfortranarray(np.random.default_rng(0).standard_normal((side, side)).astype(np.float32))
    t = np.ones((1, 1))
    return [(VarSpec("u", "<f4", u.shape, 0, u.nbytes), u), (VarSpec("t", "<f8", (1, 1), 0, 8), t)]


def _time(fn: Callable[..., int], path: str, step: Step, fsync: bool) -> float:
    t0 = time.perf_counter()
    fn(path, step, fsync=fsync)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=None, help="scratch directory (default: the system's temp)")
    ap.add_argument("--n", type=int, default=200, help="appends per variant (fsync: a quarter)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        print(f"{'step':>8} {'fsync':>5} {'plain ms':>9} {'journaled ms':>13} {'ratio':>6}  (medians)")
        for label, side in (("64 KiB", 128), ("1 MiB", 512)):
            step = _step(side)
            for fsync in (False, True):
                n = args.n if not fsync else max(10, args.n // 4)
                paths = {}
                for name in ("plain", "journaled"):
                    paths[name] = os.path.join(d, f"{name}-{side}-{fsync}.mat")
                    write_atomic(paths[name], "stream", step, fsync=False)
                times: dict[str, list[float]] = {"plain": [], "journaled": []}
                for _ in range(n):  # alternate, so both see the same disk and cache weather
                    times["plain"].append(_time(_plain_append, paths["plain"], step, fsync))
                    times["journaled"].append(_time(append_step, paths["journaled"], step, fsync))
                plain, journaled = (statistics.median(times[k]) * 1e3 for k in ("plain", "journaled"))
                print(f"{label:>8} {fsync!s:>5} {plain:9.3f} {journaled:13.3f} {journaled / plain:6.2f}")
                for p in paths.values():
                    os.unlink(p)


if __name__ == "__main__":
    main()
