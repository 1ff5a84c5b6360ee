"""Device-to-host bandwidth into the matspool ring vs a torch pinned buffer, and save() overlap.

Not a test: a measurement to run on a GPU machine.

    python tests/gpu/measure_d2h.py out.json [--mib 256] [--repeats 10]

Prints and writes to ``out.json``:
- GB/s of a 256 MiB ``copy_(non_blocking=True)`` from a CUDA tensor into the matspool ring
  (``Ring.register_cuda()``, a ``torch.from_numpy(ring.array)`` view), into a
  ``torch.empty(..., pin_memory=True)`` buffer, and into pageable memory; best of 10 each,
  timed with CUDA events;
- for a 64 MiB CUDA tensor saved through a real ``matspool.Spool`` (embedded daemon):
  the ``save()`` call time, the time until the file is on disk, and the plain copy time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any


def _best_copy(torch: Any, dst: Any, src: Any, repeats: int) -> tuple[float, list[float]]:
    """Best and all copy times in seconds for ``dst.copy_(src, non_blocking=True)``."""
    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    dst.copy_(src, non_blocking=True)  # warm-up
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start.record()
        dst.copy_(src, non_blocking=True)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return min(times), times


def measure_bandwidth(torch: Any, nbytes: int, repeats: int) -> dict[str, Any]:
    from matspool._ring import Ring

    src = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device="cuda")
    out: dict[str, Any] = {"bytes": nbytes, "repeats": repeats}

    ring = Ring(nbytes)
    try:
        t0 = time.perf_counter()
        ring.register_cuda()
        out["ring_register_s"] = time.perf_counter() - t0
        dst = torch.from_numpy(ring.array)[:nbytes]
        best, times = _best_copy(torch, dst, src, repeats)
        out["ring_gbps"] = nbytes / best / 1e9
        out["ring_times_s"] = times
        assert torch.equal(dst[:4096], src[:4096].cpu()), "ring copy is wrong"
        del dst
    finally:
        ring.close()

    pinned = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    best, times = _best_copy(torch, pinned, src, repeats)
    out["pinned_gbps"] = nbytes / best / 1e9
    out["pinned_times_s"] = times
    del pinned

    pageable = torch.empty(nbytes, dtype=torch.uint8)
    best, times = _best_copy(torch, pageable, src, repeats)
    out["pageable_gbps"] = nbytes / best / 1e9
    out["pageable_times_s"] = times
    out["ring_vs_pinned"] = out["ring_gbps"] / out["pinned_gbps"]
    return out


def measure_save(torch: Any, repeats: int, fmt: str = "v7.3") -> dict[str, Any]:
    import matspool

    n = 4096  # 4096 x 4096 float32 = 64 MiB
    u = torch.randn(n, n, device="cuda")
    pinned = torch.empty((n, n), dtype=torch.float32, pin_memory=True)
    copy_best, _ = _best_copy(torch, pinned, u, repeats)
    out: dict[str, Any] = {"bytes": u.numel() * 4, "format": fmt, "copy_64mib_s": copy_best}
    env = os.environ.pop("MATSPOOL_ENDPOINT", None)  # always the embedded daemon
    try:
        with (
            tempfile.TemporaryDirectory(prefix="matspool-measure-") as d,
            matspool.Spool(ring_bytes=160 << 20, timeout=120) as spool,
        ):
            for i in range(2):  # warm-up
                spool.save(os.path.join(d, f"warm{i}.mat"), {"u": u}, format=fmt).result(120)
            calls, totals = [], []
            for i in range(repeats):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                fut = spool.save(os.path.join(d, f"u{i}.mat"), {"u": u}, format=fmt)
                t1 = time.perf_counter()
                fut.result(120)
                t2 = time.perf_counter()
                calls.append(t1 - t0)
                totals.append(t2 - t0)
                os.unlink(os.path.join(d, f"u{i}.mat"))
    finally:
        if env is not None:
            os.environ["MATSPOOL_ENDPOINT"] = env
    out.update(
        save_call_s=calls,
        save_total_s=totals,
        save_call_median_s=statistics.median(calls),
        save_total_median_s=statistics.median(totals),
        save_call_vs_copy=statistics.median(calls) / copy_best,
    )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="JSON file to write")
    p.add_argument("--mib", type=int, default=256, help="bandwidth buffer size (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=10, help="best of N (default: %(default)s)")
    args = p.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("measure_d2h: no CUDA device", file=sys.stderr)
        return 2
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "bandwidth": measure_bandwidth(torch, args.mib << 20, args.repeats),
        "save": measure_save(torch, args.repeats),
    }
    bw, sv = result["bandwidth"], result["save"]
    print(f"{result['device']}: D2H {args.mib} MiB, best of {args.repeats}")
    print(
        f"  into the matspool ring : {bw['ring_gbps']:6.2f} GB/s "
        f"(cudaHostRegister {bw['ring_register_s'] * 1e3:.1f} ms)"
    )
    print(f"  into torch pinned      : {bw['pinned_gbps']:6.2f} GB/s")
    print(f"  into pageable memory   : {bw['pageable_gbps']:6.2f} GB/s")
    print(
        f"64 MiB CUDA tensor through Spool ({sv['format']}): save() call "
        f"{sv['save_call_median_s'] * 1e3:.2f} ms (median), D2H copy alone "
        f"{sv['copy_64mib_s'] * 1e3:.2f} ms, until on disk {sv['save_total_median_s'] * 1e3:.1f} ms"
    )
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
