"""(1) How long one ``spool.save()`` call blocks the caller, for a 64 MiB float32 array.

Sources: an ndarray, a CPU torch tensor, a CUDA tensor (when there is one), all C-ordered.
``layout="matlab"`` reorders to column-major during the copy into the ring (the real use
case); ``layout="raw"`` is the pure memcpy path. Each timed call's future is waited for
before the next call, so the ring never fills and the daemon is idle during the timing.
Compared with the seed recipe ``scipy.io.savemat(p, {"x": t.cpu().numpy()})`` on the
same data and with a plain memcpy (``np.copyto`` into a preallocated array).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np

from ._util import (
    Config,
    MiB,
    Progress,
    Row,
    cuda_available,
    fmt_time,
    now,
    ratio,
    rm,
    side_for,
    stats,
    torch_or_none,
)

NAME = "stall"
FORMAT = "v7.3"  # the daemon's work happens after the timed call; v7.3 is the quicker writer


def _time_saves(
    spool: Any,
    path: str,
    value: Any,
    layout: str,
    iters: int,
    warmup: int,
    sync: Any = None,
    progress: Progress | None = None,
    label: str = "",
) -> dict[str, Any]:
    """The ``save()`` call alone: its future is waited for after the clock stops, so the
    ring never fills, and the GPU is synchronised only before (the call is what a job waits for)."""
    return _time_fn(
        lambda: spool.save(path, {"x": value}, format=FORMAT, layout=layout),
        iters,
        warmup,
        progress,
        label,
        sync,
        sync_after=False,
        after=lambda fut: fut.result(timeout=300),
    )


def _time_fn(
    fn: Any,
    iters: int,
    warmup: int,
    progress: Progress | None = None,
    label: str = "",
    sync: Any = None,
    sync_after: bool = True,
    after: Any = None,
) -> dict[str, Any]:
    times = []
    for i in range(warmup + iters):
        if progress is not None:
            progress.step(f"{label} {i + 1}/{warmup + iters}")
        if sync is not None:
            sync()
        t0 = now()
        out = fn()
        if sync is not None and sync_after:
            sync()
        t1 = now()
        if after is not None:
            after(out)
        if i >= warmup:
            times.append(t1 - t0)
    return stats(times)


def run(cfg: Config, workdir: str, progress: Progress) -> dict[str, Any]:
    import scipy.io

    torch = torch_or_none()
    cuda = cuda_available()
    import matspool  # after torch: a Spool made with CUDA present pins its ring at once

    n = side_for(cfg.stall_mib)
    nbytes = n * n * 4
    a = np.random.default_rng(1).random((n, n), dtype=np.float32)  # C order
    path = os.path.join(workdir, "stall.mat")
    seed_path = os.path.join(workdir, "stall_seed.mat")
    res: dict[str, Any] = {
        "nbytes": nbytes,
        "shape": [n, n],
        "dtype": "float32",
        "order": "C",
        "format": FORMAT,
        "iters": cfg.stall_iters,
        "warmup": cfg.stall_warmup,
        "cuda": cuda,
        "cases": {},
    }
    it, wu = cfg.stall_iters, cfg.stall_warmup

    # baselines: memcpy (C->C) and, for reference, the C->F reorder copy
    dst = np.empty_like(a)
    dst_f = np.empty(a.shape, dtype=a.dtype, order="F")
    np.copyto(dst, a)
    np.copyto(dst_f, a)
    res["memcpy"] = _time_fn(functools.partial(np.copyto, dst, a), it, wu, progress, "memcpy")
    res["reorder_copy"] = _time_fn(functools.partial(np.copyto, dst_f, a), it, wu, progress, "C->F copy")
    del dst, dst_f
    res["seed_ndarray"] = _time_fn(
        lambda: scipy.io.savemat(seed_path, {"x": a}), cfg.seed_iters, 1, progress, "seed savemat(ndarray)"
    )
    rm(seed_path)

    with matspool.Spool(ring_bytes=max(256 * MiB, 2 * nbytes + MiB)) as spool:
        sources: list[tuple[str, Any, Any]] = [("ndarray", a, None)]
        if torch is not None:
            sources.append(("cpu_tensor", torch.from_numpy(a), None))
        if cuda:
            t_cuda = torch.from_numpy(a).cuda()
            torch.cuda.synchronize()
            sources.append(("cuda_tensor", t_cuda, torch.cuda.synchronize))
        for src, value, sync in sources:
            for layout in ("matlab", "raw"):
                key = f"{src}/{layout}"
                res["cases"][key] = _time_saves(
                    spool, path, value, layout, it, wu, sync, progress, f"save {key}"
                )
        if cuda:

            def seed_cuda() -> None:
                scipy.io.savemat(seed_path, {"x": t_cuda.cpu().numpy()})

            res["seed_cuda_tensor"] = _time_fn(
                seed_cuda,
                cfg.seed_iters,
                1,
                progress,
                "seed savemat(cuda.cpu())",
                sync=torch.cuda.synchronize,
            )
            rm(seed_path)
    rm(path)

    mc = res["memcpy"]["median_s"]
    for key, st in res["cases"].items():
        st["ratio_save_over_memcpy"] = ratio(st["median_s"], mc)
        seed = res["seed_cuda_tensor" if key.startswith("cuda") else "seed_ndarray"]["median_s"]
        st["ratio_seed_over_save"] = ratio(seed, st["median_s"])
    res["summary"] = {
        k: {"median": fmt_time(v["median_s"]), "p99": fmt_time(v["p99_s"])} for k, v in res["cases"].items()
    }
    progress.end(
        f"done; memcpy {fmt_time(mc)}, "
        + ", ".join(f"{k} {fmt_time(v['median_s'])}" for k, v in res["cases"].items())
    )
    return res


def rows(res: dict[str, Any], cfg: Config) -> list[Row]:
    out = []
    mib = res["nbytes"] // MiB
    mc = res["memcpy"]["median_s"]
    for key, st in res["cases"].items():
        src, layout = key.split("/")
        measured = f"median {fmt_time(st['median_s'])}, p99 {fmt_time(st['p99_s'])}"
        if src == "cuda_tensor":
            seed = res.get("seed_cuda_tensor", {}).get("median_s")
            out.append(
                Row(
                    figure=f"save() stall, {mib} MiB CUDA tensor, layout={layout} (GPU)",
                    measured=measured,
                    compared=f"seed {fmt_time(seed)}",
                    ratio=f"seed/save {ratio(seed, st['median_s']) or 0:.0f}x",
                    target="median <= 100 us",
                    value=st["median_s"],
                    met=st["median_s"] <= 100e-6,
                )
            )
        else:
            r = st["ratio_save_over_memcpy"]
            seed = res["seed_ndarray"]["median_s"]
            reorder = f"; C->F copy {fmt_time(res['reorder_copy']['median_s'])}" if layout == "matlab" else ""
            out.append(
                Row(
                    figure=f"save() stall, {mib} MiB {src.replace('_', ' ')}, layout={layout} (CPU)",
                    measured=measured,
                    compared=f"memcpy {fmt_time(mc)}{reorder}; seed {fmt_time(seed)}",
                    ratio=f"save/memcpy {r:.2f}x; seed/save {ratio(seed, st['median_s']):.1f}x",
                    target="<= 1.5 x memcpy",
                    value=r,
                    met=r <= 1.5,
                )
            )
    return out
