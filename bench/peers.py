"""(8) Peers: what users would pick instead of matspool, side by side, and scaling curves.

``python -m bench peers [--quick]``. For 4 KiB, 1 MiB, 64 MiB (and 1 GiB in full mode)
float32 variables (CUDA tensors when a GPU is present, CPU tensors otherwise), one file
per save, one save at a time: the time the caller is blocked (the call returns) and the
time until the file is complete, for matspool (v5, v7.3; ``save()`` then ``.result()``),
``scipy.io.savemat``, ``hdf5storage.savemat`` (its defaults: gzip above 16 KiB),
h5py (``create_dataset``), ``torch.save`` and ``torch.distributed.checkpoint.async_save``
(one-process gloo group; ``future.result()`` = complete). A peer that is not importable
is skipped with its reason in the results. Medians over the repeats.

Scaling: files/s and bytes/s against variable size (pipelined: all saves issued, then
``flush()``; the library baselines in a loop) and against producer count (1, 2, 4, 8
processes into one external daemon: ``bench.producers``). Plots are written by
``plot()`` as PNG next to the JSON (matplotlib, the ``bench`` extra).
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable
from typing import Any

import numpy as np

from ._util import Config, MiB, Progress, Row, cuda_available, fmt_time, free_port, now, rm, settle, subdir

NAME = "peers"
KiB = 1 << 10

# (bytes, repeats quick, repeats full); 1 GiB in full mode only
SIZES: list[tuple[int, int, int]] = [(4 * KiB, 40, 100), (MiB, 10, 20), (64 * MiB, 3, 5), (1 << 30, 0, 2)]
SCALE_QUICK = [4 * KiB, 64 * KiB, MiB, 16 * MiB, 64 * MiB]
SCALE_FULL = [*SCALE_QUICK, 256 * MiB, 1 << 30]
PEERS = [
    "matspool v5",
    "matspool v7.3",
    "scipy.io.savemat",
    "hdf5storage.savemat",
    "h5py",
    "torch.save",
    "dcp.async_save",
]
# hdf5storage.savemat gzips everything above 16 KiB at level 7: at 1 GiB that is minutes here
HDF5STORAGE_MAX = 64 * MiB


def label(n: int) -> str:
    if n >= 1 << 30:
        return f"{n >> 30} GiB"
    if n >= MiB:
        return f"{n >> 20} MiB"
    return f"{n >> 10} KiB"


def _array(nbytes: int) -> np.ndarray:
    cols = 32 if nbytes <= 4 * KiB else 1024
    return np.random.default_rng(8).random((nbytes // 4 // cols, cols), dtype=np.float32)


class _Peers:
    """One save function per peer: ``fn(path, tensor) -> wait`` (``wait()`` = file complete)."""

    def __init__(self, spool: Any, torch: Any, dev: str) -> None:
        self.spool, self.torch, self.dev = spool, torch, dev
        self.skipped: dict[str, str] = {}
        self.fns: dict[str, Callable[[str, Any], Callable[[], Any]]] = {}
        done: Callable[[], None] = lambda: None  # noqa: E731

        def host(t: Any) -> np.ndarray:
            return t.cpu().numpy() if dev == "cuda" else t.numpy()

        def ms(fmt: str) -> Callable[[str, Any], Callable[[], Any]]:
            def save(p: str, t: Any) -> Callable[[], Any]:
                fut = spool.save(p, {"x": t}, format=fmt)
                return lambda: fut.result(600)

            return save

        self.fns["matspool v5"] = ms("v5")
        self.fns["matspool v7.3"] = ms("v7.3")
        import scipy.io

        def sp(p: str, t: Any) -> Callable[[], None]:
            scipy.io.savemat(p, {"x": host(t)})
            return done

        self.fns["scipy.io.savemat"] = sp
        try:
            import hdf5storage

            def hs(p: str, t: Any) -> Callable[[], None]:
                hdf5storage.savemat(p, {"x": host(t)}, truncate_existing=True)
                return done

            self.fns["hdf5storage.savemat"] = hs
        except Exception as e:  # noqa: BLE001 - reported as the row's reason
            self.skipped["hdf5storage.savemat"] = f"not importable: {type(e).__name__}: {e}"
        import h5py

        def h5(p: str, t: Any) -> Callable[[], None]:
            with h5py.File(p, "w") as f:
                f.create_dataset("x", data=host(t))
            return done

        self.fns["h5py"] = h5
        if torch is None:
            self.skipped["torch.save"] = self.skipped["dcp.async_save"] = "torch not importable"
            return

        def ts(p: str, t: Any) -> Callable[[], None]:
            torch.save(t, p)
            return done

        self.fns["torch.save"] = ts
        try:
            import torch.distributed as dist
            import torch.distributed.checkpoint as dcp

            if not dist.is_initialized():
                dist.init_process_group(
                    "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
                )
                self._dist = dist

            def dc(p: str, t: Any) -> Callable[[], Any]:
                fut = dcp.async_save({"x": t}, checkpoint_id=p)
                return lambda: fut.result(600)

            self.fns["dcp.async_save"] = dc
        except Exception as e:  # noqa: BLE001 - reported as the row's reason
            self.skipped["dcp.async_save"] = f"{type(e).__name__}: {e}"

    def close(self) -> None:
        dist = getattr(self, "_dist", None)
        if dist is not None and dist.is_initialized():
            dist.destroy_process_group()


def _one(fn: Callable[[str, Any], Callable[[], Any]], path: str, t: Any) -> tuple[float, float]:
    t0 = now()
    wait = fn(path, t)
    t1 = now()
    wait()
    t2 = now()
    return t1 - t0, t2 - t0


def run(cfg: Config, workdir: str, progress: Progress) -> dict[str, Any]:
    import matspool

    from . import producers
    from ._util import torch_or_none

    torch = torch_or_none()
    dev = "cuda" if cuda_available() else "cpu"
    sizes = [(n, q if cfg.quick else f) for n, q, f in SIZES if (q if cfg.quick else f) > 0]
    biggest = max(n for n, _ in sizes)
    res: dict[str, Any] = {
        "device": dev,
        "tensor": "torch tensor" if torch is not None else "ndarray (torch not importable)",
        "dtype": "float32",
        "peers": PEERS,
        "sizes": [n for n, _ in sizes],
        "table": {},
        "skipped": {},
        "scaling": {"size": {}, "producers": {}},
    }
    d = subdir(workdir, "peers")
    with matspool.Spool(ring_bytes=max(256 * MiB, 2 * biggest + 16 * MiB)) as spool:
        peers = _Peers(spool, torch, dev)
        res["skipped"] = dict(peers.skipped)
        try:
            for nbytes, reps in sizes:
                a = _array(nbytes)
                t = torch.from_numpy(a).to(dev) if torch is not None else a
                cell: dict[str, Any] = {}
                for name in PEERS:
                    fn = peers.fns.get(name)
                    if fn is None:
                        cell[name] = {"skipped": peers.skipped[name]}
                        continue
                    if name == "hdf5storage.savemat" and nbytes > HDF5STORAGE_MAX:
                        cell[name] = {"skipped": "gzip-7 forced above 16 KiB: minutes at this size"}
                        continue
                    progress.step(f"{label(nbytes)} {name}")
                    for w in range(2):  # warm-up: imports, first-file costs
                        _one(fn, os.path.join(d, f"warm{w}.mat"), t)
                    blocked, complete = [], []
                    settle()
                    for i in range(reps):
                        b, c = _one(fn, os.path.join(d, f"f{i:04d}.mat"), t)
                        blocked.append(b)
                        complete.append(c)
                        if nbytes >= 64 * MiB:
                            rm(os.path.join(d, f"f{i:04d}.mat"))
                    cell[name] = {
                        "blocked_s": statistics.median(blocked),
                        "complete_s": statistics.median(complete),
                        "blocked_samples_s": blocked,
                        "complete_samples_s": complete,
                    }
                    for e in os.listdir(d):
                        rm(os.path.join(d, e))
                res["table"][label(nbytes)] = cell
            _scaling_sizes(cfg, spool, peers, torch, dev, d, res, progress)
        finally:
            peers.close()
    pcfg = Config(**{**cfg.__dict__, "prod_counts": (1, 2, 4, 8)})
    progress.step("producers 1, 2, 4, 8")
    pres = producers.run(pcfg, subdir(workdir, "producers"), progress)
    for k, v in pres["runs"].items():
        if "gb_s" in v:
            files = pres["saves_per_run"]
            res["scaling"]["producers"][k] = {
                "files_per_s": files / v["seconds"],
                "bytes_per_s": v["bytes"] / v["seconds"],
                "bytes_per_file": pres["bytes_per_save"],
            }
    progress.end("done")
    return res


def _scaling_sizes(
    cfg: Config,
    spool: Any,
    peers: _Peers,
    torch: Any,
    dev: str,
    d: str,
    res: dict[str, Any],
    progress: Progress,
) -> None:
    """Files/s and bytes/s against size: matspool pipelined (issue all, flush), peers in a loop."""
    budget = (256 if cfg.quick else 2048) * MiB
    for nbytes in SCALE_QUICK if cfg.quick else SCALE_FULL:
        a = _array(nbytes)
        t = torch.from_numpy(a).to(dev) if torch is not None else a
        n = max(2, min(300 if cfg.quick else 1000, budget // nbytes))
        if nbytes >= 1 << 30:
            n = 2
        row: dict[str, Any] = {}
        for name in ("matspool v5", "matspool v7.3", "scipy.io.savemat", "h5py"):
            fn = peers.fns[name]
            progress.step(f"scaling {label(nbytes)} x {n}: {name}")
            fn(os.path.join(d, "warm.mat"), t)()
            settle()
            t0 = now()
            waits = [fn(os.path.join(d, f"s{i:05d}.mat"), t) for i in range(n)]
            if name.startswith("matspool"):
                spool.flush()
            for w in waits:
                w()
            sec = now() - t0
            row[name] = {"files": n, "seconds": sec, "files_per_s": n / sec, "bytes_per_s": n * nbytes / sec}
            for e in os.listdir(d):
                rm(os.path.join(d, e))
        res["scaling"]["size"][label(nbytes)] = {"bytes": nbytes, **row}


def rows(res: dict[str, Any], cfg: Config) -> list[Row]:
    out = []
    for size, cell in res["table"].items():
        ref = cell.get("matspool v5", {})
        for name in PEERS:
            c = cell.get(name, {})
            if "skipped" in c:
                out.append(Row(figure=f"peers {size}: {name}", measured=f"skipped: {c['skipped']}"))
                continue
            rb = c["blocked_s"] / ref["blocked_s"] if ref.get("blocked_s") else None
            rc = c["complete_s"] / ref["complete_s"] if ref.get("complete_s") else None
            out.append(
                Row(
                    figure=f"peers {size} ({res['device']}): {name}",
                    measured=f"blocked {fmt_time(c['blocked_s'])}, complete {fmt_time(c['complete_s'])}",
                    compared="matspool v5: "
                    f"{fmt_time(ref.get('blocked_s'))}, {fmt_time(ref.get('complete_s'))}",
                    ratio="-" if rb is None or rc is None else f"{rb:.2f}x blocked, {rc:.2f}x complete",
                    value=c["complete_s"],
                )
            )
    return out


def markdown(res: dict[str, Any]) -> str:
    """The peer table as Markdown: caller blocked / file complete per size (medians)."""
    sizes = list(res["table"])
    head = "| peer | " + " | ".join(f"{s} blocked | {s} complete" for s in sizes) + " |"
    sep = "|---|" + "---:|---:|" * len(sizes)
    lines = [head, sep]
    for name in PEERS:
        cells = []
        for s in sizes:
            c = res["table"][s].get(name, {})
            if "blocked_s" in c:
                cells += [fmt_time(c["blocked_s"]), fmt_time(c["complete_s"])]
            else:
                cells += ["skipped", "skipped"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(res: dict[str, Any], stem: str) -> list[str]:
    """``stem``-peers.png (blocked and complete per size) and ``stem``-scaling.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    sizes = list(res["table"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    width = 0.8 / len(PEERS)
    for ax, key, title in zip(
        axes, ("blocked_s", "complete_s"), ("caller blocked", "until the file is complete"), strict=True
    ):
        for k, name in enumerate(PEERS):
            xs, ys = [], []
            for i, s in enumerate(sizes):
                c = res["table"][s].get(name, {})
                if key in c:
                    xs.append(i + (k - len(PEERS) / 2 + 0.5) * width)
                    ys.append(c[key])
            ax.bar(xs, ys, width=width, label=name)
        ax.set_yscale("log")
        ax.set_xticks(range(len(sizes)), sizes)
        ax.set_title(f"{title} ({res['device']} tensors, median)")
        ax.set_ylabel("seconds (log)")
        ax.grid(axis="y", alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    written.append(f"{stem}-peers.png")
    fig.savefig(written[-1], dpi=80)
    plt.close(fig)

    sc = res["scaling"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    sz = sc["size"]
    xs = [v["bytes"] for v in sz.values()]
    for name in ("matspool v5", "matspool v7.3", "scipy.io.savemat", "h5py"):
        axes[0].plot(xs, [v[name]["files_per_s"] for v in sz.values()], marker="o", label=name)
        axes[1].plot(xs, [v[name]["bytes_per_s"] / 1e9 for v in sz.values()], marker="o", label=name)
    for ax, yl in ((axes[0], "files/s"), (axes[1], "GB/s")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(xs, list(sz))
        ax.set_xlabel("variable size")
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_title("files/s vs size (matspool pipelined)")
    axes[1].set_title("bytes/s vs size")
    pr = sc["producers"]
    if pr:
        ks = sorted(pr, key=int)
        ax2 = axes[2]
        ax2.plot([int(k) for k in ks], [pr[k]["bytes_per_s"] / 1e9 for k in ks], marker="o", label="GB/s")
        ax2.set_xlabel("producer processes (same bytes in all)")
        ax2.set_ylabel("GB/s")
        ax3 = ax2.twinx()
        ax3.plot(
            [int(k) for k in ks], [pr[k]["files_per_s"] for k in ks], marker="s", color="C1", label="files/s"
        )
        ax3.set_ylabel("files/s")
        ax2.set_xticks([int(k) for k in ks])
        ax2.set_title(f"vs producers ({label(next(iter(pr.values()))['bytes_per_file'])} files, v7.3)")
        ax2.grid(alpha=0.3)
    fig.tight_layout()
    written.append(f"{stem}-scaling.png")
    fig.savefig(written[-1], dpi=80)
    plt.close(fig)
    return written
