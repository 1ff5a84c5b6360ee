"""Soak: 8 producers with mixed sizes and formats into one daemon, for a bounded time.

Every file is read back (scipy for v5, h5py for v7.3) and compared with data regenerated
from its seed, then deleted so disk use stays bounded. The daemon's RSS and open file
descriptors are sampled throughout; a leak shows as growth from the first third of the
run to the last.

    python -m bench.soak --seconds 180 [--producers 8] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from matspool._jobdaemon import serve_command

SHAPES = [(32, 32), (256, 256), (1024, 512)]  # 8 KiB, 512 KiB, 4 MiB as float64
FORMATS = ["v5", "v7.3"]


def _data(producer: int, i: int) -> tuple[np.ndarray, str]:
    rng = np.random.default_rng(producer * 1_000_003 + i)
    shape = SHAPES[rng.integers(len(SHAPES))]
    fmt = FORMATS[rng.integers(len(FORMATS))]
    return rng.standard_normal(shape).astype(np.float64), fmt


def _read(path: str, fmt: str) -> np.ndarray:
    if fmt == "v5":
        import scipy.io

        return scipy.io.loadmat(path)["x"]
    import h5py

    with h5py.File(path, "r") as f:
        return f["x"][()].T


def _producer(endpoint: str, out: str, producer: int, seconds: float, q) -> None:
    import matspool

    verified = failed = 0
    deadline = time.monotonic() + seconds
    with matspool.Spool(endpoint, ring_bytes=64 << 20, timeout=60) as spool:
        i = 0
        while time.monotonic() < deadline:
            batch = []
            for _ in range(16):
                x, fmt = _data(producer, i)
                path = os.path.join(out, f"p{producer}_{i}.mat")
                batch.append((spool.save(path, {"x": x}, format=fmt), path, fmt, x))
                i += 1
            for fut, path, fmt, x in batch:
                try:
                    fut.result(120)
                    if np.array_equal(_read(path, fmt), x):
                        verified += 1
                    else:
                        failed += 1
                    os.unlink(path)
                except Exception as e:  # noqa: BLE001 - counted and reported
                    failed += 1
                    print(f"producer {producer}: {path}: {e}", file=sys.stderr)
    q.put((producer, verified, failed))


def _proc_stats(pid: int) -> tuple[int, int, int]:
    """(private RSS, shared-memory RSS, open fds). Ring pages the daemon reads count as
    RssShmem: that is the clients' memory seen through a mapping, not the daemon's own."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssShmem"):
            fields[key] = int(value.split()[0]) * 1024
    return fields["RssAnon"], fields["RssShmem"], len(os.listdir(f"/proc/{pid}/fd"))


def run(seconds: float, producers: int, workdir: str) -> dict:
    out = os.path.join(workdir, "out")
    os.makedirs(out)
    endpoint = f"ipc://{workdir}/soak.sock"
    daemon = subprocess.Popen(serve_command(endpoint, None, root=out))
    samples: list[tuple[float, int, int, int]] = []
    stop = threading.Event()

    def sample() -> None:
        t0 = time.monotonic()
        while not stop.wait(0.5):
            try:
                samples.append((time.monotonic() - t0, *_proc_stats(daemon.pid)))
            except OSError:
                return

    try:
        while not os.path.exists(endpoint[6:]):
            time.sleep(0.05)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        procs = [ctx.Process(target=_producer, args=(endpoint, out, p, seconds, q)) for p in range(producers)]
        for p in procs:
            p.start()
        results = [q.get(timeout=seconds + 600) for _ in procs]
        for p in procs:
            p.join()
        stop.set()
        sampler.join()
    finally:
        daemon.terminate()
        daemon.wait(60)
    third = max(1, len(samples) // 3)
    first, last = samples[third : 2 * third] or samples, samples[-third:]  # after warm-up vs the end
    verified = sum(r[1] for r in results)
    failed = sum(r[2] for r in results)
    return {
        "seconds": seconds,
        "producers": producers,
        "files_verified": verified,
        "files_failed": failed,
        "anon_rss_middle_third_mib": statistics.median(s[1] for s in first) / 2**20,
        "anon_rss_last_third_mib": statistics.median(s[1] for s in last) / 2**20,
        "anon_rss_peak_mib": max(s[1] for s in samples) / 2**20,
        "shmem_rss_peak_mib": max(s[2] for s in samples) / 2**20,
        "fds_middle_third": statistics.median(s[3] for s in first),
        "fds_last_third": statistics.median(s[3] for s in last),
        "fds_max": max(s[3] for s in samples),
        "leftover_files": sorted(os.listdir(out)),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n")[0])
    p.add_argument("--seconds", type=float, default=180)
    p.add_argument("--producers", type=int, default=8)
    p.add_argument("--json", help="write the result here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="matspool-soak-", dir=os.getcwd()) as work:
        result = run(args.seconds, args.producers, work)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    ok = result["files_failed"] == 0 and not result["leftover_files"]
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
