"""Shared helpers: sizes per mode, timing and statistics, RSS sampling, progress, files.

Kept free of heavy imports (no torch, no matspool at module level): the producer
processes of ``bench.producers`` are started with ``spawn`` and import this module.
"""

from __future__ import annotations

import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

MiB = 1 << 20
now = time.perf_counter


# -- sizes per mode ------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    quick: bool
    stall_mib: int = 64  # (1) one save of this many MiB (float32, square)
    stall_iters: int = 10
    stall_warmup: int = 2
    seed_iters: int = 5  # the seed recipe is slow; fewer samples
    job_steps: int = 8  # (2)
    job_mib: int = 64
    job_step_ms: float = 75.0  # compute per step the calibration aims at
    tp_vars: int = 3  # (3) variables per run
    tp_var_mib: int = 64
    tp_reps: int = 2  # best of (F and C order; the 3-d C-order run once)
    small_n: int = 1000  # (4) files per format
    small_side: int = 32  # 32x32 float32 = 4 KiB
    prod_counts: tuple[int, ...] = (1, 2, 4, 8)  # (5)
    prod_saves: int = 4
    prod_mib: int = 8
    prod_rounds: int = 3  # the first is the rings' first pass, reported apart
    d2h_mib: int = 256  # (7)
    d2h_reps: int = 10

    @staticmethod
    def for_mode(quick: bool) -> Config:
        if quick:
            return Config(quick=True)
        return Config(
            quick=False,
            stall_iters=20,
            stall_warmup=3,
            seed_iters=5,
            job_steps=15,
            tp_vars=4,
            tp_var_mib=256,
            tp_reps=2,
            small_n=4000,
            prod_saves=8,
            prod_mib=16,
            d2h_reps=20,
        )


def side_for(mib: int, itemsize: int = 4) -> int:
    """Side of a square array of ``mib`` MiB (64 MiB float32 -> 4096)."""
    return round((mib * MiB // itemsize) ** 0.5)


# -- statistics -----------------------------------------------------------------------------
def stats(samples: list[float]) -> dict[str, Any]:
    """Median, p99 (numpy's linear interpolation), min, max, mean of seconds; also raw samples."""
    if not samples:
        return {"n": 0}
    a = np.asarray(samples, dtype=float)
    return {
        "n": int(a.size),
        "median_s": float(np.median(a)),
        "p99_s": float(np.percentile(a, 99)),
        "min_s": float(a.min()),
        "max_s": float(a.max()),
        "mean_s": float(a.mean()),
        "samples_s": [float(x) for x in a],
    }


def gbps(nbytes: float, seconds: float) -> float | None:
    return nbytes / seconds / 1e9 if seconds > 0 else None


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def fmt_time(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.0f} us"
    if s < 1:
        return f"{s * 1e3:.1f} ms"
    return f"{s:.2f} s"


# -- RSS sampling ---------------------------------------------------------------------------
_RSS_FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem")


def proc_kib_fields(path: str, fields: tuple[str, ...]) -> dict[str, int]:
    """The ``Name:  N kB`` lines of a /proc file that ``fields`` names, in bytes (absent: 0)."""
    out = dict.fromkeys(fields, 0)
    with open(path, "rb") as f:
        for line in f:
            key, _, rest = line.partition(b":")
            k = key.decode()
            if k in out:
                out[k] = int(rest.split()[0]) * 1024
    return out


def read_rss(pid: int) -> dict[str, int] | None:
    """VmRSS and its parts (bytes) from /proc/<pid>/status; None if the process is gone."""
    try:
        return proc_kib_fields(f"/proc/{pid}/status", _RSS_FIELDS)
    except (FileNotFoundError, ProcessLookupError):
        return None


class RssSampler:
    """Samples a process's RSS every ``interval`` seconds in a background thread.

    ``VmRSS`` counts the client ring pages the daemon has read (shared memory the client
    allocated) as ``RssShmem``; ``RssAnon`` is what the daemon itself allocated.
    """

    def __init__(self, pid: int, interval: float = 0.01) -> None:
        self.pid = pid
        self.interval = interval
        self.samples: list[tuple[float, dict[str, int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            r = read_rss(self.pid)
            if r is None:
                return
            self.samples.append((now(), r))
            self._stop.wait(self.interval)

    def start(self) -> RssSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def peak(self, since: float = 0.0, until: float = float("inf")) -> dict[str, int]:
        window = [r for t, r in self.samples if since <= t <= until]
        return {k: max((r.get(k, 0) for r in window), default=0) for k in _RSS_FIELDS}


def rss_mib(d: dict[str, int]) -> dict[str, float]:
    return {k: round(v / MiB, 1) for k, v in d.items()}


# -- progress -------------------------------------------------------------------------------
class Progress:
    """One status line on stderr, rewritten with \\r; a newline when a measurement ends."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.index = 0
        self.name = ""
        self.t0 = now()
        self.tty = sys.stderr.isatty()
        self._width = 0

    def begin(self, name: str) -> None:
        self.index += 1
        self.name = name
        self.step("starting")

    def step(self, msg: str) -> None:
        line = f"[{self.index}/{self.total} {self.name} {now() - self.t0:6.1f}s] {msg}"
        if self.tty:
            pad = max(0, self._width - len(line))
            sys.stderr.write("\r" + line + " " * pad)
            self._width = len(line)
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def end(self, msg: str) -> None:
        self.step(msg)
        if self.tty:
            sys.stderr.write("\n")
            sys.stderr.flush()
        self._width = 0


# -- ranks ----------------------------------------------------------------------------------
def free_port() -> int:
    """A loopback port free now (a torch.distributed store listens on it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_ranks(world: int, argv: Callable[[int], list[str]], timeout: float = 900) -> None:
    """Run ``python argv(rank)...`` for each of ``world`` ranks (env:// on loopback, from the
    repository root) and wait for them all; a rank still running ``timeout`` s into its wait
    is killed, and any rank that did not exit 0 raises RuntimeError."""
    port = free_port()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    procs = []
    try:
        for rank in range(world):
            env = {
                **os.environ,
                "RANK": str(rank),
                "WORLD_SIZE": str(world),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
            }
            procs.append(subprocess.Popen([sys.executable, *argv(rank)], env=env, cwd=root))
        for p in procs:
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if any(p.returncode for p in procs):
        raise RuntimeError(f"a rank failed: exit statuses {[p.returncode for p in procs]}")


# -- files ----------------------------------------------------------------------------------
def subdir(parent: str, name: str) -> str:
    d = os.path.join(parent, name)
    os.makedirs(d, exist_ok=True)
    return d


def rm(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def clear_dir(path: str) -> None:
    for entry in os.listdir(path):
        rm(os.path.join(path, entry))


def settle() -> None:
    """Write back dirty pages left by earlier steps so they do not slow the next timed one."""
    os.sync()


def raw_write(path: str, arr: np.ndarray, fsync: bool) -> int:
    """open, write the array's bytes (no copy), close; optionally fsync. Returns bytes."""
    mv = memoryview(
        np.ascontiguousarray(arr) if not (arr.flags.c_contiguous or arr.flags.f_contiguous) else arr
    ).cast("B")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        off = 0
        while off < len(mv):
            off += os.write(fd, mv[off : off + (1 << 30)])
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    return len(mv)


# -- environment ----------------------------------------------------------------------------
def _version(mod: str) -> str | None:
    try:
        m = __import__(mod)
    except Exception:  # noqa: BLE001 - a version we cannot read is reported as None
        return None
    return getattr(m, "__version__", "?")


def env_info(quick: bool) -> dict[str, Any]:
    info: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "mode": "quick" if quick else "full",
        "versions": {
            m: _version(m) for m in ("numpy", "scipy", "h5py", "hdf5storage", "zmq", "torch", "matspool")
        },
        "gpu": None,
        "cuda": None,
    }
    try:
        import h5py

        info["versions"]["hdf5"] = h5py.version.hdf5_version
    except Exception:  # noqa: BLE001 - environment details are best effort
        pass
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["cuda"] = torch.version.cuda
            info["gpu_count"] = torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - environment details are best effort
        pass
    try:
        info["git_commit"] = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
            ).stdout.strip()
            or None
        )
        info["git_dirty"] = bool(
            subprocess.run(
                ["git", "status", "--porcelain"], capture_output=True, text=True, timeout=5
            ).stdout.strip()
        )
    except Exception:  # noqa: BLE001 - environment details are best effort
        pass
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_gib"] = round(int(f.readline().split()[1]) / (1 << 20), 1)
    except Exception:  # noqa: BLE001 - environment details are best effort
        pass
    return info


def torch_or_none() -> Any:
    try:
        import torch
    except ImportError:
        return None
    return torch


def cuda_available() -> bool:
    torch = torch_or_none()
    return bool(torch is not None and torch.cuda.is_available())


@dataclass
class Row:
    """One line of the final table (and of the JSON's ``table``)."""

    figure: str
    measured: str
    compared: str = "-"
    ratio: str = "-"
    target: str = "-"
    met: bool | None = None  # None: informational, or no target
    value: float | None = None  # the number the target is checked on
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def mkdtemp_in(base: str) -> str:
    os.makedirs(base, exist_ok=True)
    return tempfile.mkdtemp(prefix="run-", dir=base)
