"""One large CPU tensor until its file is complete, matspool against h5py, side by side.

``python -m bench.complete [--mib 64] [--reps 7] [--names same|new] [--dir DIR] [--only ...]``
(also ``python -m bench --only complete``: quick 64 MiB x 5 rounds, full 7 rounds.)

Issue 14's row "one 64 MiB CPU tensor until the file is complete (no fsync)": in one
process, contenders interleaved round by round, medians; ``os.sync()`` before each.

- ``h5py``: ``h5py.File(p, "w").create_dataset("x", data=t.numpy())`` (the C-order bytes
  as they are: MATLAB would see the transpose); ``h5py-reorder``: the same of
  ``np.ascontiguousarray(t.numpy().T)``, the column-major reorder included (what
  ``layout="matlab"`` does on the way);
- ``v5`` / ``v7.3``: ``spool.save(p, {"x": t}, format=...).result()`` with the default
  ``layout="matlab"`` (MATLAB sees the tensor's indices: a column-major reorder on the
  way), and ``-raw`` with ``layout="raw"`` (the bytes as they are, like h5py);
- floors: ``memcpy`` (``np.copyto`` of the bytes into a preallocated array) and ``write``
  (open, ``write`` the bytes, close: no format, no rename).

``--names same`` (the default) writes every contender to the same file every round, as a
job saving each time step under the same names does: each save replaces the previous
round's file (h5py and ``write`` truncate it, matspool renames over it). ``--names new``
gives every round fresh names (the previous round's files are removed untimed, before
the ``os.sync()``).

The ring holds two variables, so saves go round it and each round's ring pages were
written before (by the client) but may be new to the daemon's mapping in early rounds:
round 0 is left out of the medians. The caller's own blocked time is printed too.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ._util import Config, Progress, Row

__all__ = ["CONTENDERS", "main", "measure", "rows", "run"]

CONTENDERS = ("memcpy", "write", "h5py", "h5py-reorder", "v5", "v7.3", "v5-raw", "v7.3-raw")
MATSPOOL = ("v5", "v7.3", "v5-raw", "v7.3-raw")


def measure(
    mib: int, reps: int, d: str, names: str = "same", only: tuple[str, ...] = CONTENDERS
) -> dict[str, Any]:
    """Times per contender (seconds, round 0 first) and the caller's blocked times."""
    import h5py
    import torch

    import matspool

    n = (mib << 20) // 4
    arr = np.random.default_rng(8).random((n // 1024, 1024), dtype=np.float32)
    t = torch.from_numpy(arr)
    dest = np.empty_like(arr)
    blocked: dict[str, list[float]] = {}
    rnd = [0]

    def path(name: str) -> str:
        return os.path.join(d, f"{name}.mat" if names == "same" else f"{name}-{rnd[0]}.mat")

    def memcpy() -> None:
        np.copyto(dest, arr)

    def write() -> None:
        fd = os.open(path("write"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            mv = memoryview(arr).cast("B")
            while mv:
                mv = mv[os.write(fd, mv) :]
        finally:
            os.close(fd)

    def h5(reorder: bool) -> Callable[[], None]:
        def go() -> None:
            with h5py.File(path("h5py-reorder" if reorder else "h5py"), "w") as f:
                f.create_dataset("x", data=np.ascontiguousarray(t.numpy().T) if reorder else t.numpy())

        return go

    with matspool.Spool(ring_bytes=2 * arr.nbytes + (16 << 20)) as spool:

        def ms(fmt: str, layout: str) -> Callable[[], None]:
            name = f"{fmt}-raw" if layout == "raw" else fmt

            def go() -> None:
                t0 = time.perf_counter()
                fut = spool.save(path(name), {"x": t}, format=fmt, layout=layout)
                blocked.setdefault(name, []).append(time.perf_counter() - t0)
                fut.result(600)

            return go

        contenders: dict[str, Callable[[], None]] = {
            "memcpy": memcpy,
            "write": write,
            "h5py": h5(False),
            "h5py-reorder": h5(True),
            "v5": ms("v5", "matlab"),
            "v7.3": ms("v7.3", "matlab"),
            "v5-raw": ms("v5", "raw"),
            "v7.3-raw": ms("v7.3", "raw"),
        }
        chosen = [c for c in only if c in contenders]
        times: dict[str, list[float]] = {c: [] for c in chosen}
        for r in range(reps + 1):
            for name in chosen:
                if names == "new" and r:  # the previous round's file goes, untimed
                    rnd[0] = r - 1
                    if os.path.exists(path(name)):
                        os.unlink(path(name))
                rnd[0] = r
                os.sync()
                t0 = time.perf_counter()
                contenders[name]()
                times[name].append(time.perf_counter() - t0)
    for f in os.listdir(d):
        os.unlink(os.path.join(d, f))
    return {"mib": arr.nbytes >> 20, "reps": reps, "names": names, "times": times, "blocked": blocked}


def _ratio(times: dict[str, list[float]], base: str, name: str) -> float | None:
    """Median over rounds (round 0 left out) of base time / this time."""
    if base not in times or name not in times:
        return None
    return statistics.median(b / x for b, x in zip(times[base][1:], times[name][1:], strict=True))


def table(res: dict[str, Any]) -> str:
    times, blocked = res["times"], res["blocked"]
    out = [
        f"{res['mib']} MiB float32 CPU tensor, {res['reps']} rounds (+ round 0), names: {res['names']}",
        f"{'contender':13} {'round 0 ms':>10} {'complete ms':>11} {'blocked ms':>10} "
        f"{'h5py/this':>9} {'h5py-re/this':>12} {'write/this':>10}",
    ]
    for name, ts in times.items():
        b = statistics.median(blocked[name][1:]) * 1e3 if name in blocked else 0.0
        cells = [_ratio(times, base, name) for base in ("h5py", "h5py-reorder", "write")]
        out.append(
            f"{name:13} {ts[0] * 1e3:10.1f} {statistics.median(ts[1:]) * 1e3:11.1f} {b:10.1f} "
            + " ".join(
                f"{'-' if c is None else f'{c:.2f}':>{w}}" for c, w in zip(cells, (9, 12, 10), strict=True)
            )
        )
    return "\n".join(out)


def run(cfg: Config, workdir: str, progress: Progress) -> dict[str, Any]:
    """For ``python -m bench``: 64 MiB, same names, 5 (quick) or 7 rounds."""
    d = tempfile.mkdtemp(prefix="complete-", dir=workdir)
    progress.step("64 MiB, same names")
    res = measure(64, 5 if cfg.quick else 7, d)
    os.rmdir(d)
    res["ratios"] = {
        name: {base: _ratio(res["times"], base, name) for base in ("h5py", "h5py-reorder", "write")}
        for name in MATSPOOL
    }
    progress.end(", ".join(f"{n}: {r['h5py']:.2f}x h5py" for n, r in res["ratios"].items()))
    return res


def rows(res: dict[str, Any], cfg: Config) -> list[Row]:
    med = {n: statistics.median(ts[1:]) * 1e3 for n, ts in res["times"].items()}
    out = []
    for name in MATSPOOL:
        r = res["ratios"][name]
        layout = "raw" if name.endswith("-raw") else "matlab"
        out.append(
            Row(
                figure=f"{res['mib']} MiB CPU tensor until complete, {name} (layout={layout}, same names)",
                measured=f"{med[name]:.1f} ms",
                compared=f"h5py {med['h5py']:.1f} ms, with reorder {med['h5py-reorder']:.1f}, "
                f"write {med['write']:.1f}",
                ratio=f"{r['h5py']:.2f}x (reorder {r['h5py-reorder']:.2f}x, write {r['write']:.2f}x)",
                target=">= 0.9x h5py",
                value=r["h5py"],
                met=r["h5py"] >= 0.9,
            )
        )
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.complete")
    p.add_argument("--mib", type=int, default=64)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--names", choices=("same", "new"), default="same")
    p.add_argument("--dir", default=os.path.join(os.path.dirname(__file__), "out"))
    p.add_argument("--only", default=",".join(CONTENDERS))
    a = p.parse_args(argv)
    os.makedirs(a.dir, exist_ok=True)
    d = tempfile.mkdtemp(prefix="complete-", dir=a.dir)
    try:
        res = measure(a.mib, a.reps, d, a.names, tuple(a.only.split(",")))
    finally:
        for f in os.listdir(d):
            os.unlink(os.path.join(d, f))
        os.rmdir(d)
    print(table(res) + f"\ndir {a.dir}")


if __name__ == "__main__":
    main()
