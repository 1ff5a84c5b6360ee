"""(8) Compression scaling: compressed saves through a daemon deflating on 1 core vs all.

Several compressible float32 fields (a smooth field quantised to 1e-3, which deflate
shrinks about 3x) saved with ``compress=3`` in v5 and v7.3, timed from the first save to
``flush()`` done, once by a daemon started with ``--compress-threads 1`` and once with
``--compress-threads N`` (N = this machine's cores). Target: >= 1.7x on 2 cores.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ._util import Config, MiB, Progress, Row, clear_dir, now, subdir
from .producers import _start_daemon, _stop_daemon

FORMATS = ("v5", "v7.3")


def _field(nbytes: int, seed: int) -> np.ndarray:
    n = nbytes // 4
    side = int(n**0.5)
    y, x = np.mgrid[0:side, 0 : n // side].astype(np.float32) / 97.0
    return np.round(np.sin(x + seed) * np.cos(y * 1.3), 3).astype(np.float32)


def run(cfg: Config, workdir: str, progress: Progress) -> dict[str, Any]:
    import matspool

    d = subdir(workdir, "compress")
    nvars, mib = (4, 16) if cfg.quick else (8, 64)
    fields = [_field(mib * MiB, i) for i in range(nvars)]
    cores = os.cpu_count() or 1
    res: dict[str, Any] = {"vars": nvars, "var_mib": mib, "level": 3, "cores": cores, "runs": {}}
    for threads in (1, cores):
        proc, endpoint, sockdir = _start_daemon(
            d, "--compress-threads", str(threads), "--writers", str(max(2, cores))
        )
        try:
            with matspool.Spool(endpoint, ring_bytes=(nvars * mib + 8) * MiB) as spool:
                for fmt in FORMATS:
                    progress.step(f"{fmt}, {threads} compression thread(s)")
                    best = None
                    for _ in range(2):
                        t0 = now()
                        futs = [
                            spool.save(os.path.join(d, f"c{i}.mat"), {"x": f}, format=fmt, compress=3)
                            for i, f in enumerate(fields)
                        ]
                        spool.flush()
                        dt = now() - t0
                        best = dt if best is None else min(best, dt)
                        written = sum(f.result().nbytes for f in futs)
                        clear_dir(d)
                    res["runs"][f"{fmt}/{threads}"] = {
                        "seconds": best,
                        "bytes_in": nvars * mib * MiB,
                        "bytes_out": written,
                        "gb_s": nvars * mib * MiB / best / 1e9,
                    }
        finally:
            _stop_daemon(proc, sockdir)
    for fmt in FORMATS:
        res[f"speedup_{fmt}"] = res["runs"][f"{fmt}/1"]["seconds"] / res["runs"][f"{fmt}/{cores}"]["seconds"]
    progress.end(", ".join(f"{fmt}: {res[f'speedup_{fmt}']:.2f}x" for fmt in FORMATS))
    return res


def rows(res: dict[str, Any], cfg: Config) -> list[Row]:
    out = []
    cores = res["cores"]
    target = 1.7 if cores >= 2 else None
    for fmt in FORMATS:
        one, many = res["runs"][f"{fmt}/1"], res["runs"][f"{fmt}/{cores}"]
        s = res[f"speedup_{fmt}"]
        out.append(
            Row(
                figure=(
                    f"compressed {fmt} (level 3, {res['vars']} x {res['var_mib']} MiB), {cores} cores vs 1"
                ),
                measured=f"{many['gb_s']:.2f} GB/s in, ratio {one['bytes_in'] / one['bytes_out']:.1f}:1",
                compared=f"1 core: {one['gb_s']:.2f} GB/s",
                ratio=f"{s:.2f}x",
                target=">= 1.7x on 2 cores" if target else "-",
                value=s,
                met=None if target is None else s >= target,
            )
        )
    return out
