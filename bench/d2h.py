"""(7) GPU only: device-to-host bandwidth into the matspool ring vs a torch pinned buffer.

``matspool._ring.Ring(n).register_cuda()``, ``torch.from_numpy(ring.array)`` as the
destination, ``dst.copy_(src, non_blocking=True)`` timed with CUDA events; the same into
``torch.empty(n, dtype=torch.uint8, pin_memory=True)``, and (for reference, fewer reps)
into pageable memory. Best of ``d2h_reps`` each, interleaved, same run.
"""

from __future__ import annotations

from typing import Any

from ._util import Config, MiB, Progress, Row, cuda_available

NAME = "d2h"


def run(cfg: Config, workdir: str, progress: Progress) -> dict[str, Any]:
    if not cuda_available():
        progress.end("skipped: no CUDA")
        return {"skipped": "no CUDA device (torch.cuda.is_available() is False)"}
    import torch

    from matspool._ring import Ring

    n = cfg.d2h_mib * MiB
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda")
    ring = Ring(n)
    try:
        ring.register_cuda()
        dests = {
            "ring": torch.from_numpy(ring.array)[:n],
            "pinned": torch.empty(n, dtype=torch.uint8, pin_memory=True),
        }
        pageable = torch.empty(n, dtype=torch.uint8)
        pageable.fill_(0)  # pre-fault
        ms: dict[str, list[float]] = {k: [] for k in (*dests, "pageable")}

        def once(dst: Any) -> float:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            dst.copy_(src, non_blocking=True)
            end.record()
            end.synchronize()
            return start.elapsed_time(end)

        for dst in dests.values():  # warm-up
            once(dst)
        for r in range(cfg.d2h_reps):
            progress.step(f"rep {r + 1}/{cfg.d2h_reps}")
            for name, dst in dests.items():
                ms[name].append(once(dst))
        for _ in range(3):
            ms["pageable"].append(once(pageable))
        torch.cuda.synchronize()
        res: dict[str, Any] = {"bytes": n, "reps": cfg.d2h_reps, "gpu": torch.cuda.get_device_name(0)}
        for name, times in ms.items():
            best = min(times)
            res[name] = {"best_ms": best, "all_ms": times, "gb_s": n / (best / 1e3) / 1e9}
        res["ratio_ring_over_pinned"] = res["ring"]["gb_s"] / res["pinned"]["gb_s"]
        del dests
    finally:
        torch.cuda.synchronize()
        ring.close()
    progress.end(f"done; ring {res['ring']['gb_s']:.1f} GB/s, pinned {res['pinned']['gb_s']:.1f} GB/s")
    return res


def rows(res: dict[str, Any], cfg: Config) -> list[Row]:
    if "skipped" in res:
        return [
            Row(
                figure="D2H into the ring (GPU)",
                measured="skipped: no CUDA",
                target=">= 90% of pinned",
                met=None,
            )
        ]
    r = res["ratio_ring_over_pinned"]
    return [
        Row(
            figure=f"D2H into the ring (GPU), {res['bytes'] >> 20} MiB",
            measured=f"{res['ring']['gb_s']:.1f} GB/s",
            compared=f"pinned {res['pinned']['gb_s']:.1f} GB/s (pageable {res['pageable']['gb_s']:.1f})",
            ratio=f"{r * 100:.0f}%",
            target=">= 90% of pinned",
            value=r,
            met=r >= 0.9,
        )
    ]
