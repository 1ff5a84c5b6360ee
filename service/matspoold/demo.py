"""A demo simulation job: a 2-D heat equation that exports every step through matspool."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["run_demo"]


_Step = tuple[Any, Callable[[Any], Any], str, Callable[[], object]]


def _step_fn(n: int) -> _Step:
    """The initial grid, one step of the equation, where it runs, and a device sync."""
    try:
        import torch
    except ImportError:
        return _numpy_step_fn(n)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    u = torch.zeros(n, n, device=dev)
    u[n // 4 : 3 * n // 4, n // 4 : 3 * n // 4] = 1.0

    def step(u: Any) -> Any:
        lap = torch.roll(u, 1, 0) + torch.roll(u, -1, 0) + torch.roll(u, 1, 1) + torch.roll(u, -1, 1) - 4 * u
        return u + 0.2 * lap

    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    return u, step, f"torch on {dev}" + (f" ({torch.cuda.get_device_name()})" if dev == "cuda" else ""), sync


def _numpy_step_fn(n: int) -> _Step:
    u = np.zeros((n, n), dtype=np.float32)
    u[n // 4 : 3 * n // 4, n // 4 : 3 * n // 4] = 1.0

    def np_step(u: Any) -> Any:
        lap = np.roll(u, 1, 0) + np.roll(u, -1, 0) + np.roll(u, 1, 1) + np.roll(u, -1, 1) - 4 * u
        return u + np.float32(0.2) * lap

    return u, np_step, "numpy on the CPU (torch not installed)", lambda: None


def run_demo(out: str, steps: int, n: int, fmt: str) -> int:
    import matspool

    os.makedirs(out, exist_ok=True)
    u, step, where, sync = _step_fn(n)
    print(f"matspool demo: {steps} steps of a {n}x{n} float32 heat equation, {where}")
    with matspool.Spool() as spool:
        t0 = time.perf_counter()
        futures = []
        for k in range(steps):
            u = step(u)
            futures.append(
                spool.save(os.path.join(out, f"u_{k:05d}.mat"), {"u": u, "t": float(k)}, format=fmt)
            )
            print(f"\r  step {k + 1}/{steps}, {spool.pending} saves in flight ", end="", flush=True)
        sync()
        t_compute = time.perf_counter() - t0
        spool.flush()
        t_all = time.perf_counter() - t0
    total = sum(f.result().nbytes for f in futures)
    print(
        f"\r  {steps} files ({fmt}) in {os.path.abspath(out)}: {total / 2**20:.0f} MiB"
        f"{' ' * 20}\n  compute loop finished in {t_compute:.2f} s, all files on disk after "
        f"{t_all:.2f} s: {total / t_all / 1e9:.2f} GB/s, {steps / t_all:.0f} files/s"
    )
    last = futures[-1].result().path
    print(
        f"  read it back: python -c \"import h5py; print(h5py.File('{last}')['u'].shape)\""
        if fmt == "v7.3"
        else f"  read it back: scipy.io.loadmat('{last}')['u']"
    )
    return 0
