"""(5) Several producer processes into one external daemon.

The bench starts ``python -m matspoold serve --endpoint ipc://<tmp>/d.sock --root <dir>``
once, then for 1, 2, 4, 8 producers (``multiprocessing`` spawn context) each producer
creates its own Spool (ring large enough for all its saves), waits at a barrier, saves
its share of the run's ``prod_saves`` x 8 files of ``prod_mib`` MiB float32 (layout="raw":
a plain memcpy into its ring), and flushes. Every run writes the same bytes (1 producer
writes all of them, 8 producers one eighth each), so the runs differ only in how many
processes share the daemon, not in how much the page cache has to absorb. Aggregate
GB/s = all bytes / (last flush done - first save start), clocks from ``time.monotonic()``
(system-wide). Format v7.3.

Each run repeats ``prod_rounds`` rounds with the same producers (their files removed and
the disk synced between rounds). The first round is the rings' first pass: on this VM it
cost the daemon about 3x the kernel time of later rounds whatever the producer count
(fresh pages on both sides of the copy), and it decided most of the earlier spread
(0.43-1.12x). ``gb_s`` is the median of the later rounds, a loop's steady state;
``first_round_gb_s`` the first one, reported beside it.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from typing import Any

from ._util import Config, MiB, Progress, Row, RssSampler, clear_dir, read_rss, rss_mib, settle, subdir

NAME = "producers"
FORMAT = "v7.3"


def _producer(
    idx: int,
    endpoint: str,
    outdir: str,
    nsaves: int,
    nbytes: int,
    fmt: str,
    rounds: int,
    barrier: Any,
    results: Any,
) -> None:
    try:
        import numpy as np

        import matspool

        cols = 1024
        a = np.random.default_rng(idx).random((nbytes // 4 // cols, cols), dtype=np.float32)
        with matspool.Spool(endpoint=endpoint, ring_bytes=nsaves * (a.nbytes + 4096) + MiB) as spool:
            spool.save(os.path.join(outdir, f"warm_{idx}.mat"), {"x": a[:4]}, format=fmt).result(60)
            for r in range(rounds):
                barrier.wait(timeout=300)
                t0 = time.monotonic()
                calls = []
                names = [os.path.join(outdir, f"p{idx:02d}_{k:03d}.mat") for k in range(nsaves)]
                for name in names:
                    c0 = time.monotonic()
                    spool.save(name, {"x": a}, format=fmt, layout="raw")
                    calls.append(time.monotonic() - c0)
                spool.flush()
                t1 = time.monotonic()
                results.put(
                    {
                        "idx": idx,
                        "round": r,
                        "t0": t0,
                        "t1": t1,
                        "bytes": nsaves * a.nbytes,
                        "save_call_s_mean": sum(calls) / len(calls),
                        "error": None,
                    }
                )
                for name in names:
                    os.unlink(name)
                barrier.wait(timeout=300)  # every producer's files gone
                if idx == 0:
                    os.sync()  # the next round starts after this (its barrier waits for us)
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        try:
            barrier.abort()
        except Exception:  # noqa: BLE001 - best effort: the error below is what matters
            pass
        results.put({"idx": idx, "error": f"{type(e).__name__}: {e}"})


def _start_daemon(root: str, *extra: str) -> tuple[subprocess.Popen, str, str]:
    sockdir = tempfile.mkdtemp(prefix="mspb-")  # short path: ipc paths are limited to ~107 bytes
    endpoint = f"ipc://{sockdir}/d.sock"
    from matspool._jobdaemon import serve_command

    proc = subprocess.Popen(serve_command(endpoint, None, *extra, root=root), stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not os.path.exists(f"{sockdir}/d.sock"):
        if proc.poll() is not None:
            raise RuntimeError(f"daemon exited with status {proc.returncode} during start-up")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("daemon did not create its socket within 60 s")
        time.sleep(0.05)
    return proc, endpoint, sockdir


def _stop_daemon(proc: subprocess.Popen, sockdir: str) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    shutil.rmtree(sockdir, ignore_errors=True)


def run(cfg: Config, workdir: str, progress: Progress) -> dict[str, Any]:
    d = subdir(workdir, "producers")
    nbytes = cfg.prod_mib * MiB
    total_saves = cfg.prod_saves * max(cfg.prod_counts)
    res: dict[str, Any] = {
        "format": FORMAT,
        "saves_per_run": total_saves,
        "bytes_per_save": nbytes,
        "daemon": "external (python -m matspoold serve)",
        "runs": {},
    }
    progress.step("starting daemon")
    proc, endpoint, sockdir = _start_daemon(d)
    res["daemon_pid"] = proc.pid
    ctx = mp.get_context("spawn")
    try:
        time.sleep(0.3)
        idle = read_rss(proc.pid)
        for count in cfg.prod_counts:
            progress.step(f"{count} producer(s): spawning")
            settle()
            barrier = ctx.Barrier(count)
            results = ctx.Queue()
            rounds = cfg.prod_rounds
            procs = [
                ctx.Process(
                    target=_producer,
                    args=(i, endpoint, d, total_saves // count, nbytes, FORMAT, rounds, barrier, results),
                    daemon=True,
                )
                for i in range(count)
            ]
            sampler = RssSampler(proc.pid).start()
            for p in procs:
                p.start()
            got = []
            deadline = time.monotonic() + 300 * rounds
            while len(got) < count * rounds and time.monotonic() < deadline:
                try:
                    got.append(results.get(timeout=1))
                    progress.step(f"{count} producer(s): {len(got)}/{count * rounds} done")
                except queue.Empty:
                    if not any(p.is_alive() for p in procs) and results.empty():
                        break
            for p in procs:
                p.join(30)
                if p.is_alive():
                    p.kill()
                    p.join()
            sampler.stop()
            errors = [g["error"] for g in got if g.get("error")]
            if errors or len(got) < count * rounds:
                missing = f"only {len(got)} of {count * rounds} producer rounds reported"
                res["runs"][str(count)] = {"error": errors or [missing]}
                clear_dir(d)
                continue
            by_round = [[g for g in got if g["round"] == r] for r in range(rounds)]
            total = sum(g["bytes"] for g in by_round[0])
            secs = [max(g["t1"] for g in rs) - min(g["t0"] for g in rs) for rs in by_round]
            steady = statistics.median(secs[1:] or secs)
            last = by_round[-1]
            res["runs"][str(count)] = {
                "producers": count,
                "bytes": total,
                "seconds": steady,
                "gb_s": total / steady / 1e9,
                "first_round_gb_s": total / secs[0] / 1e9,
                "rounds_gb_s": [total / t / 1e9 for t in secs],
                "per_producer_s": sorted(g["t1"] - g["t0"] for g in last),
                "save_call_s_mean": sum(g["save_call_s_mean"] for g in got) / len(got),
                "daemon_rss_peak_mib": rss_mib(sampler.peak()),
            }
            clear_dir(d)
        res["daemon_rss_idle_mib"] = rss_mib(idle or {})
    finally:
        _stop_daemon(proc, sockdir)
        clear_dir(d)
    runs = res["runs"]
    lo, hi = str(min(cfg.prod_counts)), str(max(cfg.prod_counts))
    if runs.get(lo, {}).get("gb_s") and runs.get(hi, {}).get("gb_s"):
        res[f"ratio_{hi}_vs_{lo}"] = runs[hi]["gb_s"] / runs[lo]["gb_s"]
        res[f"first_round_ratio_{hi}_vs_{lo}"] = runs[hi]["first_round_gb_s"] / runs[lo]["first_round_gb_s"]
    progress.end(
        "done; "
        + ", ".join(f"{k}: {v['gb_s']:.2f} GB/s" if "gb_s" in v else f"{k}: error" for k, v in runs.items())
    )
    return res


def rows(res: dict[str, Any], cfg: Config) -> list[Row]:
    runs = res["runs"]
    lo, hi = str(min(cfg.prod_counts)), str(max(cfg.prod_counts))
    r = res.get(f"ratio_{hi}_vs_{lo}")
    per = ", ".join(f"{k}: {v['gb_s']:.2f}" if "gb_s" in v else f"{k}: error" for k, v in runs.items())
    if r is None:
        return [Row(figure=f"{hi} producers vs {lo} aggregate", measured=per, target=">= 0.9 x", met=False)]
    first = res.get(f"first_round_ratio_{hi}_vs_{lo}")
    firsts = ", ".join(f"{k}: {v['first_round_gb_s']:.2f}" for k, v in runs.items() if "gb_s" in v)
    return [
        Row(
            figure=f"{hi} producers vs {lo} aggregate ({res['saves_per_run']} x "
            f"{res['bytes_per_save'] >> 20} MiB per run, {res['format']}; median of rounds 2+)",
            measured=f"{runs[hi]['gb_s']:.2f} GB/s",
            compared=f"{lo}: {runs[lo]['gb_s']:.2f} GB/s",
            ratio=f"{r:.2f}x",
            target=">= 0.9 x",
            value=r,
            met=r >= 0.9,
            extra={
                "GB/s by producers": per,
                "first round (fresh rings), GB/s": firsts,
                "first round ratio": f"{first:.2f}x" if first is not None else "-",
            },
        )
    ]
