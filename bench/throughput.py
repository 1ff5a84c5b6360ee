"""(3) Writer throughput and (6) daemon memory, in one pass.

Several float32 variables (quick: 3 x 64 MiB, full: 4 x 256 MiB), one file per variable,
through an embedded daemon (``matspool.Spool(ring_bytes=...)`` with a ring that holds all
of them, so ``save()`` never waits for ring space). Timed from the first ``save()`` to
``flush()`` done, uncompressed v5 and v7.3:

- order ``F``: the arrays are Fortran-ordered (``a.T`` of a C array: same bytes), so the
  client's copy into the ring is a plain memcpy;
- order ``C``: C-ordered arrays, reordered to column-major on the way (snapshot, then the
  tiled reorder on the client's copy thread); ``C3``: the same bytes as 3-d C-ordered
  arrays (``fsync=False`` only);
- ``fsync=True`` as well, compared with a raw write that fsyncs.

The reorder alone, side by side in one run (``reorder``): 64 MiB float32 and float64, 2-d
(square) and 3-d (cube), C-ordered into a C buffer of the reversed shape: a memcpy of the
same bytes, matspool's ``copy_host`` (what a save does), numpy's ``np.copyto`` of the
reversed view and torch's ``copy_`` of it (the copy saves used before the tiled kernel);
interleaved rounds, best of each, as multiples of the memcpy.

Baselines in the same run, same directory, same bytes: a raw sequential write (open,
write, close; with and without fsync), ``scipy.io.savemat`` and
``hdf5storage.writes(..., options=Options(compress=False))`` on every variable, and
``hdf5storage.savemat`` (which forces gzip-7) on the first variable only (it is slow).
``os.sync()`` runs before every timed run so dirty pages of the previous one do not
slow it down. Each matspool run is paired with a raw write of the same bytes timed just
before it, and the ratio is the median over the pairs of raw time / matspool time: the
page cache and the disk's writeback state drift over a run (the VM here swung 0.5-2.7
GB/s), and a raw figure taken minutes earlier would measure that drift, not matspool.

Memory: a sampler reads the embedded daemon's /proc/<pid>/status every 10 ms
(``spool._embedded.proc.pid``). ``idle`` is sampled after the daemon has started and the
client said HELLO, before any save. ``RssAnon`` is memory the daemon allocated itself;
``RssShmem`` counts the client's ring pages the daemon has read (shared memory owned by
the client: it appears in ``VmRSS`` but is not a daemon allocation).
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import numpy as np

from ._util import (
    Config,
    MiB,
    Progress,
    Row,
    RssSampler,
    clear_dir,
    gbps,
    now,
    ratio,
    raw_write,
    read_rss,
    rss_mib,
    settle,
    side_for,
    subdir,
)

NAME = "throughput"
FORMATS = ("v5", "v7.3")


def _timed(fn: Any) -> float:
    settle()
    t0 = now()
    fn()
    return now() - t0


def _best(times: list[float]) -> float:
    return float(min(times))


def run(cfg: Config, workdir: str, progress: Progress) -> dict[str, Any]:
    import hdf5storage
    import scipy.io

    import matspool

    n = side_for(cfg.tp_var_mib)
    rng = np.random.default_rng(3)
    progress.step(f"generating {cfg.tp_vars} x {cfg.tp_var_mib} MiB")
    base = [rng.random((n, n), dtype=np.float32) for _ in range(cfg.tp_vars)]  # C order
    cube = _cube(base[0].size)
    # same bytes; b.T is Fortran-ordered
    arrays = {"F": [b.T for b in base], "C": base, "C3": [b.reshape(cube) for b in base]}
    var_bytes = base[0].nbytes
    total = var_bytes * len(base)
    d = subdir(workdir, "throughput")
    paths = [os.path.join(d, f"v{i}.mat") for i in range(len(base))]
    reps = cfg.tp_reps

    def reps_for(order: str) -> int:
        return reps if order in ("F", "C") else 1

    res: dict[str, Any] = {
        "vars": len(base),
        "var_bytes": var_bytes,
        "total_bytes": total,
        "shape": [n, n],
        "dtype": "float32",
        "reps": reps,
        "timing": "best of reps (C3 once), first save() to flush() done",
        "daemon": "embedded (Spool() with no endpoint)",
        "raw": {},
        "matspool": {},
        "direct": {},
        "memory": {},
    }

    def rec(seconds: list[float], nbytes: int = total) -> dict[str, Any]:
        s = _best(seconds)
        return {"seconds": s, "all_seconds": seconds, "gb_s": gbps(nbytes, s)}

    def raw_all(fsync: bool) -> None:
        for p, a in zip(paths, base, strict=True):
            raw_write(p, a, fsync)

    def save_all(spool: matspool.Spool, order: str, fmt: str, fsync: bool) -> None:
        for p, a in zip(paths, arrays[order], strict=True):
            spool.save(p, {"x": a}, format=fmt, fsync=fsync)
        spool.flush()

    def scipy_all(order: str) -> None:
        for p, a in zip(paths, arrays[order], strict=True):
            scipy.io.savemat(p, {"x": a})

    def hdf5storage_all(order: str, opts: Any) -> None:
        for p, a in zip(paths, arrays[order], strict=True):
            hdf5storage.writes({"/x": a}, filename=p, truncate_existing=True, options=opts)

    # untimed warm-up: the first write into fresh page-cache pages can be several times slower
    # (seen on VMs), which would otherwise land on whichever run comes first
    progress.step("warm-up write")
    raw_all(False)
    clear_dir(d)
    settle()

    # raw sequential write: the physical reference
    for fsync in (False, True):
        key = "fsync" if fsync else "nofsync"
        times = []
        for r in range(reps):
            progress.step(f"raw write {key} rep {r + 1}/{reps}")
            times.append(_timed(functools.partial(raw_all, fsync)))
            clear_dir(d)
        res["raw"][key] = rec(times)

    # through the daemon
    ring_bytes = total + MiB
    for fmt in FORMATS:
        try:
            spool = matspool.Spool(ring_bytes=ring_bytes)
        except matspool.RingError:  # /dev/shm too small for all: two variables' worth
            ring_bytes = 2 * var_bytes + MiB
            spool = matspool.Spool(ring_bytes=ring_bytes)
        res["ring_bytes"] = ring_bytes
        with spool:
            pid = spool._embedded.proc.pid if spool._embedded is not None else None
            sampler = RssSampler(pid).start() if pid else None
            time.sleep(0.3)
            idle = read_rss(pid) if pid else None
            mem: dict[str, Any] = {"pid": pid, "idle": idle, "runs": {}}
            for order in ("F", "C", "C3"):
                for fsync in (False, True) if order != "C3" else (False,):
                    key = f"{fmt}/{order}/{'fsync' if fsync else 'nofsync'}"
                    times, raws = [], []
                    nrep = reps_for(order)
                    for r in range(nrep):
                        progress.step(f"raw write paired with matspool {key} rep {r + 1}/{nrep}")
                        raws.append(_timed(functools.partial(raw_all, fsync)))
                        clear_dir(d)
                        progress.step(f"matspool {key} rep {r + 1}/{nrep}")
                        t_start = now()
                        times.append(_timed(functools.partial(save_all, spool, order, fmt, fsync)))
                        if sampler is not None:
                            mem["runs"][f"{key}/{r}"] = sampler.peak(t_start, now())
                        clear_dir(d)
                    ratios = [w / t for w, t in zip(raws, times, strict=True)]
                    res["matspool"][key] = {
                        **rec(times),
                        "raw_paired": rec(raws),
                        "ratio_vs_raw": float(np.median(ratios)),
                    }
            if sampler is not None:
                sampler.stop()
                peak = sampler.peak()
                mem["peak"] = peak
                mem["over_idle"] = {k: peak[k] - idle.get(k, 0) for k in peak} if idle else None
                mem["samples"] = len(sampler.samples)
                mem["mib"] = {
                    "idle": rss_mib(idle or {}),
                    "peak": rss_mib(peak),
                    "over_idle": rss_mib(mem["over_idle"] or {}),
                }
            res["memory"][fmt] = mem

    # direct library calls on the same data
    direct = res["direct"]
    for order in ("F", "C"):
        times = []
        for r in range(reps_for(order)):
            progress.step(f"scipy.io.savemat {order} rep {r + 1}/{reps_for(order)}")
            times.append(_timed(functools.partial(scipy_all, order)))
            clear_dir(d)
        direct[f"scipy.savemat/{order}"] = rec(times)
    opts = hdf5storage.Options(compress=False)
    for order in ("F", "C"):
        times = []
        try:
            for r in range(reps_for(order)):
                progress.step(f"hdf5storage.writes(compress=False) {order} rep {r + 1}/{reps_for(order)}")
                times.append(_timed(functools.partial(hdf5storage_all, order, opts)))
                clear_dir(d)
            direct[f"hdf5storage.writes/{order}"] = rec(times)
        except Exception as e:  # noqa: BLE001 - a baseline that fails is reported, not fatal
            direct[f"hdf5storage.writes/{order}"] = {"error": f"{type(e).__name__}: {e}"}
            clear_dir(d)
    # hdf5storage.savemat forces gzip-7 (~0.02 GB/s): at most 64 MiB of the first variable
    part = arrays["F"][0][:, : max(1, (64 * MiB) // (n * 4))]  # leading columns: still F-contiguous
    progress.step(f"hdf5storage.savemat (gzip-7 forced), {part.nbytes >> 20} MiB")
    t = _timed(lambda: hdf5storage.savemat(paths[0], {"x": part}, truncate_existing=True))
    direct["hdf5storage.savemat/F/part"] = {
        "seconds": t,
        "gb_s": gbps(part.nbytes, t),
        "bytes": part.nbytes,
        "note": "first <= 64 MiB of variable 0; gzip-7 + shuffle + "
        "fletcher32, which hdf5storage.savemat always applies",
    }
    clear_dir(d)

    raw = res["raw"]
    for key, r in res["matspool"].items():
        fmt, order, _ = key.split("/")
        lib = "scipy.savemat" if fmt == "v5" else "hdf5storage.writes"
        r["ratio_vs_" + lib] = ratio(r["gb_s"], direct.get(f"{lib}/{order}", {}).get("gb_s"))
    res["reorder"] = reorder_ratios(progress)
    progress.end(
        "done; raw "
        + f"{raw['nofsync']['gb_s']:.2f} GB/s, "
        + ", ".join(f"{k} {v['gb_s']:.2f}" for k, v in res["matspool"].items() if "nofsync" in k)
    )
    return res


def rows(res: dict[str, Any], cfg: Config) -> list[Row]:
    out = []
    raw = res["raw"]
    direct = res["direct"]
    size = f"{res['vars']} x {res['var_bytes'] >> 20} MiB"
    for key, r in res["matspool"].items():
        fmt, order, fs = key.split("/")
        lib = "scipy.savemat" if fmt == "v5" else "hdf5storage.writes"
        d = direct.get(f"{lib}/{order}", {})
        lib_txt = f"; {lib} {d['gb_s']:.2f}" if d.get("gb_s") else ""
        rv = r["ratio_vs_raw"]
        what = {"F": "F-order (memcpy)", "C": "C-order (reorder)", "C3": "C-order 3-d (reorder)"}[order]
        out.append(
            Row(
                figure=f"writer throughput {fmt}, {size}, {what}, {'fsync' if fs == 'fsync' else 'no fsync'}",
                measured=f"{r['gb_s']:.2f} GB/s",
                compared=f"raw write{' + fsync' if fs == 'fsync' else ''} {r['raw_paired']['gb_s']:.2f} GB/s "
                f"(paired; at start {raw[fs]['gb_s']:.2f}){lib_txt}",
                ratio=f"{rv:.2f}x raw"
                + (f"; {r['ratio_vs_' + lib]:.1f}x {lib.split('.')[0]}" if r.get("ratio_vs_" + lib) else ""),
                target=">= 0.9 x raw sequential write" if order == "F" else ">= 0.7 x raw (issue 14)",
                value=rv,
                met=rv >= (0.9 if order == "F" else 0.7),
            )
        )
    for key, r in res.get("reorder", {}).items():
        others = "; ".join(
            f"{k} {v:.1f}x" for k, v in r["x_memcpy"].items() if k not in ("matspool", "memcpy")
        )
        out.append(
            Row(
                figure=f"reorder {key}, C -> column-major (copy_host)",
                measured=f"{r['ms']['matspool']:.1f} ms",
                compared=f"memcpy {r['ms']['memcpy']:.1f} ms; {others}",
                ratio=f"{r['x_memcpy']['matspool']:.1f}x memcpy",
            )
        )
    hs = direct.get("hdf5storage.savemat/F/part", {})
    if hs.get("gb_s"):
        figure = f"  (reference) hdf5storage.savemat, gzip-7 forced, {hs['bytes'] >> 20} MiB"
        out.append(Row(figure=figure, measured=f"{hs['gb_s']:.3f} GB/s"))
    return out


def _cube(size: int) -> tuple[int, int, int]:
    """A 3-d shape of ``size`` elements (a square's: a power of 4 here), near a cube."""
    side = round(size ** (1 / 3))
    while size % side:
        side -= 1
    rest = size // side
    mid = round(rest**0.5)
    while rest % mid:
        mid -= 1
    return (side, mid, rest // mid)


def reorder_ratios(progress: Progress, mib: int = 64, rounds: int = 5) -> dict[str, Any]:
    """The reorder alone (see the module docstring): ms and multiples of a memcpy."""
    from matspool._convert import copy_host, prepare

    try:
        import torch
    except ImportError:  # pragma: no cover - the bench extra installs it
        torch = None
    out: dict[str, Any] = {}
    rng = np.random.default_rng(5)
    for dtype in ("float32", "float64"):
        size = mib * MiB // np.dtype(dtype).itemsize
        side = round(size**0.5)
        for shape in ((side, size // side), _cube(size)):
            key = f"{len(shape)}-d {dtype} {'x'.join(map(str, shape))}"
            progress.step(f"reorder {key}")
            a = rng.random(shape).astype(dtype)
            ring = np.empty(a.nbytes, np.uint8)
            plain, dst = np.empty_like(a), np.empty(shape[::-1], dtype)
            p = prepare("x", a, "matlab", "row")
            runs: dict[str, Any] = {
                "memcpy": functools.partial(np.copyto, plain, a),
                "matspool": functools.partial(copy_host, p, ring, 0),
                "numpy": functools.partial(np.copyto, dst, a.transpose()),
            }
            if torch is not None:
                t_dst, t_src = torch.from_numpy(dst), torch.from_numpy(a).permute(*range(a.ndim - 1, -1, -1))
                runs["torch"] = functools.partial(t_dst.copy_, t_src)
            best = dict.fromkeys(runs, float("inf"))
            for _ in range(rounds):
                for name, fn in runs.items():
                    t0 = now()
                    fn()
                    best[name] = min(best[name], now() - t0)
            assert np.array_equal(ring.view(dtype).reshape(shape[::-1]), a.transpose()), key
            out[key] = {
                "ms": {k: v * 1e3 for k, v in best.items()},
                "x_memcpy": {k: v / best["memcpy"] for k, v in best.items()},
            }
    return out


def memory_rows(res: dict[str, Any], cfg: Config) -> list[Row]:
    out = []
    mib = res["var_bytes"] >> 20
    for fmt, mem in res.get("memory", {}).items():
        oi = mem.get("over_idle")
        if not oi:
            continue
        anon = oi["RssAnon"] / MiB
        note = "" if mib >= 256 else f" (quick: {mib} MiB vars)"
        out.append(
            Row(
                figure=f"daemon RSS while writing {mib} MiB variables, {fmt}{note}",
                measured=f"+{anon:.0f} MiB private (RssAnon) over idle",
                compared=(
                    f"VmRSS +{oi['VmRSS'] / MiB:.0f} MiB incl. ring pages "
                    f"(RssShmem +{oi['RssShmem'] / MiB:.0f})"
                ),
                ratio=f"{anon / mib:.2f} x one variable",
                target="<= 200 MiB over idle",
                value=anon,
                met=anon <= 200,
            )
        )
    return out
