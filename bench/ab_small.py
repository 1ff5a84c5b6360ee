"""Small-file rate of two daemon versions side by side: files/s and daemon CPU per file.

    git archive <old-rev> service | tar -x -C /tmp/old
    python -m bench.ab_small /tmp/old/service [N]

starts one daemon from ``/tmp/old/service`` ("old") and one from this checkout ("new"),
each on its own root, and alternates bursts of N 4 KiB saves (v5 and v7.3, in the root
and three directories below it) between them, 7 rounds, so load on a shared machine
falls on both alike. Used for issue 11 (confinement by file descriptor).
"""

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

import matspool

here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(here, "tests"))
from conftest import serve_cmd, wait_ready  # noqa: E402

base = tempfile.mkdtemp(prefix="ab_small-")
wt = here
daemons = {}
old_service = sys.argv[1]
for name, service in (("old", old_service), ("new", f"{wt}/service")):
    root = f"{base}/{name}/root"
    os.makedirs(f"{root}/a/b/c")
    os.makedirs(f"{base}/{name}/sock")
    ep = f"ipc://{base}/{name}/sock/d.sock"
    env = dict(os.environ, PYTHONPATH=f"{wt}/client:{service}")
    p = subprocess.Popen(serve_cmd(ep, root), env=env)
    assert wait_ready(ep, p)
    daemons[name] = (ep, root, p)
a = np.random.default_rng(4).random((32, 32), dtype=np.float32)
N = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
rates = {}
cpus = {}


def cpu(pid: int) -> float:
    """The process's user + system CPU seconds."""
    with open(f"/proc/{pid}/stat") as stat:
        f = stat.read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


try:
    spools = {n: matspool.Spool(ep, ring_bytes=64 << 20) for n, (ep, _, _) in daemons.items()}
    for rnd in range(7):
        for fmt in ("v5", "v7.3"):
            for depth, sub in (("root", ""), ("a/b/c", "a/b/c")):
                for name in ("old", "new") if rnd % 2 else ("new", "old"):
                    spool, root = spools[name], daemons[name][1]
                    d = os.path.join(root, sub, f"r{rnd}{fmt}")
                    os.mkdir(d)
                    for i in range(20):
                        spool.save(f"{d}/w{i}.mat", {"x": a}, format=fmt)
                    spool.flush()
                    c0 = cpu(daemons[name][2].pid)
                    t0 = time.perf_counter()
                    for i in range(N):
                        spool.save(f"{d}/s{i}.mat", {"x": a}, format=fmt)
                    spool.flush()
                    rates.setdefault((fmt, depth, name), []).append(N / (time.perf_counter() - t0))
                    cpus.setdefault((fmt, depth, name), []).append((cpu(daemons[name][2].pid) - c0) / N * 1e6)
                    shutil.rmtree(d)
    for s in spools.values():
        s.close()
finally:
    for _, _, p in daemons.values():
        p.terminate()
        p.wait()
    shutil.rmtree(base, ignore_errors=True)
print(
    f"{'format':6} {'dir':7} {'old files/s':>12} {'new files/s':>12} {'new/old':>8} "
    f"{'old daemon CPU us/file':>23} {'new':>6}   (median of 7 alternated runs of {N})"
)
for fmt in ("v5", "v7.3"):
    for depth in ("root", "a/b/c"):
        o, n = (statistics.median(rates[(fmt, depth, v)]) for v in ("old", "new"))
        co, cn = (statistics.median(cpus[(fmt, depth, v)]) for v in ("old", "new"))
        print(f"{fmt:6} {depth:7} {o:12.0f} {n:12.0f} {n / o:8.2f} {co:23.0f} {cn:6.0f}")
