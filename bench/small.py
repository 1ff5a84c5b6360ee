"""(4) Small files: files per second for 4 KiB variables (32x32 float32), one per file.

Through an embedded daemon: all saves issued back to back, then ``flush()``; the rate is
files / (first save() -> flush() done). Compared with ``scipy.io.savemat`` (v5) and
``hdf5storage.savemat`` (v7.3; no compression below its 16 KiB threshold) called directly
in a loop on the same data, same directory; and with the filesystem's own floor: files
of the same size made with open/write/close and renamed into place (what every
matspool file costs the filesystem at least), one after another in one thread.
"""

from __future__ import annotations

import os
import statistics
from typing import Any

import numpy as np

from ._util import Config, Progress, Row, now, rm, settle, subdir

NAME = "small"


def run(cfg: Config, workdir: str, progress: Progress) -> dict[str, Any]:
    import hdf5storage
    import scipy.io

    import matspool

    s = cfg.small_side
    a = np.random.default_rng(4).random((s, s), dtype=np.float32)
    nfiles = cfg.small_n
    res: dict[str, Any] = {
        "files": nfiles,
        "shape": [s, s],
        "dtype": "float32",
        "nbytes": a.nbytes,
        "daemon": "embedded",
        "matspool": {},
        "direct": {},
    }

    def names(d: str) -> list[str]:
        return [os.path.join(d, f"s{i:06d}.mat") for i in range(nfiles)]

    with matspool.Spool() as spool:
        for fmt in ("v5", "v7.3"):
            d = subdir(workdir, f"small_{fmt}")
            for i in range(20):  # warm-up: imports and first-file costs in the daemon
                spool.save(os.path.join(d, f"warm{i}.mat"), {"x": a}, format=fmt)
            spool.flush()
            paths = names(d)
            progress.step(f"matspool {fmt}: {nfiles} saves")
            settle()
            calls = []
            t0 = now()
            for i, p in enumerate(paths):
                c0 = now()
                spool.save(p, {"x": a}, format=fmt)
                calls.append(now() - c0)
                if i % 250 == 0:
                    progress.step(f"matspool {fmt}: {i}/{nfiles} saves issued")
            t_issued = now()
            progress.step(f"matspool {fmt}: flush")
            spool.flush()
            t1 = now()
            written = sum(1 for p in paths if os.path.exists(p))
            res["matspool"][fmt] = {
                "seconds": t1 - t0,
                "files_per_s": nfiles / (t1 - t0),
                "issue_seconds": t_issued - t0,
                "save_call_us": (t_issued - t0) / nfiles * 1e6,
                "save_call_median_us": statistics.median(calls) * 1e6,
                "files_found": written,
            }
            rm(d)
            # one save waited for, one at a time: the latency a caller that needs the file sees
            d = subdir(workdir, f"small_wait_{fmt}")
            waited = []
            for i in range(cfg.small_n // 5):
                c0 = now()
                spool.save(os.path.join(d, f"w{i:05d}.mat"), {"x": a}, format=fmt).result(60)
                waited.append(now() - c0)
            res["matspool"][fmt]["waited_median_us"] = statistics.median(waited) * 1e6
            rm(d)

    direct = {
        "v5": ("scipy.io.savemat", lambda p: scipy.io.savemat(p, {"x": a})),
        "v7.3": ("hdf5storage.savemat", lambda p: hdf5storage.savemat(p, {"x": a}, truncate_existing=True)),
    }
    for fmt, (label, fn) in direct.items():
        d = subdir(workdir, f"small_direct_{fmt}")
        for i in range(5):
            fn(os.path.join(d, f"warm{i}.mat"))
        paths = names(d)
        settle()
        per = []
        t0 = now()
        for i, p in enumerate(paths):
            c0 = now()
            fn(p)
            per.append(now() - c0)
            if i % 250 == 0:
                progress.step(f"{label}: {i}/{nfiles}")
        t1 = now()
        res["direct"][fmt] = {
            "library": label,
            "seconds": t1 - t0,
            "files_per_s": nfiles / (t1 - t0),
            "per_file_median_us": statistics.median(per) * 1e6,
        }
        rm(d)
    d = subdir(workdir, "small_fs")
    image = bytes(a.nbytes + 200)  # about a small MAT file's size
    paths = names(d)

    def create(p: str) -> None:
        tmp = p + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, image)
        os.close(fd)
        os.rename(tmp, p)

    settle()
    t0 = now()
    for p in paths:
        create(p)
    t1 = now()
    res["filesystem"] = {"what": "open+write+close+rename, one thread", "files_per_s": nfiles / (t1 - t0)}
    rm(d)
    for fmt in ("v5", "v7.3"):
        res["matspool"][fmt]["ratio_vs_filesystem"] = (
            res["matspool"][fmt]["files_per_s"] / res["filesystem"]["files_per_s"]
        )
        res["matspool"][fmt]["ratio_vs_direct"] = (
            res["matspool"][fmt]["files_per_s"] / res["direct"][fmt]["files_per_s"]
        )
    scipy_us = res["direct"]["v5"]["per_file_median_us"]
    for fmt in ("v5", "v7.3"):
        m = res["matspool"][fmt]
        # the same file written by scipy in the same run is the yardstick for both formats
        m["ratio_call_vs_scipy"] = m["save_call_median_us"] / scipy_us
        m["ratio_waited_vs_scipy"] = m["waited_median_us"] / scipy_us
        m["ratio_vs_scipy"] = m["files_per_s"] / res["direct"]["v5"]["files_per_s"]
    progress.end("done; " + ", ".join(f"{k} {v['files_per_s']:.0f}/s" for k, v in res["matspool"].items()))
    return res


TARGETS = {"v5": 5000, "v7.3": 2000}


def rows(res: dict[str, Any], cfg: Config) -> list[Row]:
    out = []
    for fmt, r in res["matspool"].items():
        d = res["direct"][fmt]
        rate = r["files_per_s"]
        out.append(
            Row(
                figure=f"small files through the daemon, {res['nbytes'] >> 10} KiB, {fmt}",
                measured=f"{rate:.0f} files/s",
                compared=f"{d['library']} {d['files_per_s']:.0f}/s; bare create+rename "
                f"{res['filesystem']['files_per_s']:.0f}/s",
                ratio=f"{r['ratio_vs_direct']:.2f}x lib; {r['ratio_vs_filesystem']:.2f}x bare",
                target=f">= {TARGETS[fmt]}/s",
                value=rate,
                met=rate >= TARGETS[fmt],
            )
        )
        if "ratio_vs_scipy" not in r:
            continue
        scipy_d = res["direct"]["v5"]
        scipy_us = scipy_d["per_file_median_us"]
        out.append(
            Row(
                figure=f"small files through the daemon vs scipy direct, {fmt}",
                measured=f"{rate:.0f} files/s",
                compared=f"scipy.io.savemat {scipy_d['files_per_s']:.0f}/s",
                ratio=f"{r['ratio_vs_scipy']:.2f}x",
                target=">= 1.0x scipy",
                value=r["ratio_vs_scipy"],
                met=r["ratio_vs_scipy"] >= 1.0,
            )
        )
        call = r["save_call_median_us"]
        out.append(
            Row(
                figure=f"save() caller time, 4 KiB ndarray, {fmt} (median)",
                measured=f"{call:.1f} us",
                compared=f"scipy.io.savemat {scipy_us:.0f} us per file",
                ratio=f"{r['ratio_call_vs_scipy']:.2f}x",
                target="<= 20 us and <= 0.2x scipy",
                value=call,
                met=call <= 20 and r["ratio_call_vs_scipy"] <= 0.2,
            )
        )
        out.append(
            Row(
                figure=f"one 4 KiB save waited for, {fmt} (median latency)",
                measured=f"{r['waited_median_us']:.0f} us",
                compared=f"scipy.io.savemat {scipy_us:.0f} us",
                ratio=f"{r['ratio_waited_vs_scipy']:.2f}x",
                target="<= 1.5x scipy",
                value=r["ratio_waited_vs_scipy"],
                met=r["ratio_waited_vs_scipy"] <= 1.5,
            )
        )
    return out
