"""(4) Small files: files per second for 4 KiB variables (32x32 float32), one per file.

Through an embedded daemon: all saves issued back to back, then ``flush()``; the rate is
files / (first save() -> flush() done). Compared with ``scipy.io.savemat`` (v5) and
``hdf5storage.savemat`` (v7.3; no compression below its 16 KiB threshold) called directly
in a loop on the same data, same directory; and with the filesystem's own floor: files
of the same size made with open/write/close and renamed into place (what every
matspool file costs the filesystem at least), one after another in one thread.

The contenders run interleaved: ``ROUNDS`` rounds, each a burst of ``small_n / ROUNDS``
files per contender, then a few single saves waited for beside single scipy writes; a
rate is the median over rounds and a ratio the median of the per-round ratios, so load
that comes and goes on a shared machine falls on all of them alike. Also reported:
``save()``'s own time per call (median over all calls) and one save waited for
(``save(...).result()``, median), both against scipy writing the same file.

Beside them, in the same rounds, the machine's floors (``bench._floors``): one
cross-process round trip (ZeroMQ over ipc://, as matspool; a unix socketpair), so a save
waited for can be set beside "scipy's write + one round trip"; the rate of one process
writing scipy's bytes and sending one message per file ("floor" contender); and the
parts of ``save()`` no design removes (one ZeroMQ send, the 4 KiB memcpy).
"""

from __future__ import annotations

import io
import os
import statistics
from typing import Any

import numpy as np

from ._floors import Floors
from ._util import Config, Progress, Row, now, rm, settle, subdir

NAME = "small"


ROUNDS = 5  # bursts per contender, interleaved: load that comes and goes hits all alike


def run(cfg: Config, workdir: str, progress: Progress) -> dict[str, Any]:
    import hdf5storage
    import scipy.io

    import matspool

    s = cfg.small_side
    a = np.random.default_rng(4).random((s, s), dtype=np.float32)
    nfiles = cfg.small_n
    burst = max(1, nfiles // ROUNDS)
    res: dict[str, Any] = {
        "files": burst * ROUNDS,
        "rounds": ROUNDS,
        "shape": [s, s],
        "dtype": "float32",
        "nbytes": a.nbytes,
        "daemon": "embedded",
        "method": "contenders interleaved in rounds of bursts; rates and ratios are medians over rounds",
        "matspool": {},
        "direct": {},
    }
    buf = io.BytesIO()
    scipy.io.savemat(buf, {"x": a})
    image = buf.getvalue()  # the very bytes scipy writes

    def create(p: str) -> None:
        tmp = p + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, image)
        os.close(fd)
        os.rename(tmp, p)

    def direct_v5(p: str) -> None:
        scipy.io.savemat(p, {"x": a})

    def direct_v73(p: str) -> None:
        hdf5storage.savemat(p, {"x": a}, truncate_existing=True)

    rates: dict[str, list[float]] = {}
    calls: dict[str, list[float]] = {"v5": [], "v7.3": []}
    waited: dict[str, list[float]] = {"v5": [], "v7.3": []}
    scipy_each: list[float] = []
    found: dict[str, int] = {"v5": 0, "v7.3": 0}
    floor: dict[str, list[float]] = {"rtt_zmq": [], "rtt_sock": [], "send": [], "memcpy": []}
    with matspool.Spool() as spool, Floors() as floors:
        d = subdir(workdir, "small_warm")
        for fmt in ("v5", "v7.3"):
            for i in range(20):  # warm-up: imports and first-file costs in the daemon
                spool.save(os.path.join(d, f"warm{i}_{fmt}.mat"), {"x": a}, format=fmt)
        spool.flush()
        for i in range(5):
            direct_v5(os.path.join(d, f"w{i}.mat"))
            direct_v73(os.path.join(d, f"h{i}.mat"))
        rm(d)
        for r in range(ROUNDS):
            for who in ("v5", "v7.3", "scipy", "hdf5storage", "filesystem", "floor"):
                progress.step(f"round {r + 1}/{ROUNDS}: {who}, {burst} files")
                d = subdir(workdir, f"small_{who}")
                paths = [os.path.join(d, f"s{i:06d}.mat") for i in range(burst)]
                settle()
                t0 = now()
                if who in ("v5", "v7.3"):
                    for p in paths:
                        c0 = now()
                        spool.save(p, {"x": a}, format=who)
                        calls[who].append(now() - c0)
                    spool.flush()
                elif who == "floor":
                    floors.write_and_send(paths, create)
                else:
                    fn = {"scipy": direct_v5, "hdf5storage": direct_v73, "filesystem": create}[who]
                    for p in paths:
                        c0 = now()
                        fn(p)
                        if who == "scipy":
                            scipy_each.append(now() - c0)
                rates.setdefault(who, []).append(burst / (now() - t0))
                if who in found:
                    found[who] += sum(1 for p in paths if os.path.exists(p))
                rm(d)
            # one save waited for, one at a time (the latency a caller that needs the file
            # sees), beside scipy writing the same file, in the same round
            d = subdir(workdir, "small_wait")
            for i in range(max(1, burst // 5)):
                for fmt in ("v5", "v7.3"):
                    c0 = now()
                    spool.save(os.path.join(d, f"w{i}_{fmt}.mat"), {"x": a}, format=fmt).result(60)
                    waited[fmt].append(now() - c0)
                c0 = now()
                direct_v5(os.path.join(d, f"s{i}.mat"))
                scipy_each.append(now() - c0)
                floor["rtt_zmq"].append(floors.round_trip_zmq())
                floor["rtt_sock"].append(floors.round_trip_sock())
            rm(d)
            floor["send"] += floors.sends(burst // 4)
            floor["memcpy"] += floors.memcpys(a, burst // 4)

    def med(x: list[float]) -> float:
        return float(statistics.median(x))

    def round_ratio(num: str, den: str) -> float:
        return med([x / y for x, y in zip(rates[num], rates[den], strict=True)])

    scipy_us = med(scipy_each) * 1e6
    res["direct"]["v5"] = {
        "library": "scipy.io.savemat",
        "files_per_s": med(rates["scipy"]),
        "rounds_files_per_s": rates["scipy"],
        "per_file_median_us": scipy_us,
    }
    res["direct"]["v7.3"] = {
        "library": "hdf5storage.savemat",
        "files_per_s": med(rates["hdf5storage"]),
        "rounds_files_per_s": rates["hdf5storage"],
    }
    res["filesystem"] = {
        "what": "open+write+close+rename, one thread",
        "files_per_s": med(rates["filesystem"]),
        "rounds_files_per_s": rates["filesystem"],
    }
    fl = {k: med(v) * 1e6 for k, v in floor.items()}
    res["floors"] = {
        "what": "measured in the same rounds (bench._floors)",
        "round_trip_zmq_us": fl["rtt_zmq"],
        "round_trip_socketpair_us": fl["rtt_sock"],
        "waited_floor_us": scipy_us + fl["rtt_zmq"],
        "waited_floor_vs_scipy": (scipy_us + fl["rtt_zmq"]) / scipy_us,
        "waited_floor_socketpair_vs_scipy": (scipy_us + fl["rtt_sock"]) / scipy_us,
        "write_and_send_files_per_s": med(rates["floor"]),
        "write_and_send_vs_scipy": round_ratio("floor", "scipy"),
        "write_and_send_vs_filesystem": round_ratio("floor", "filesystem"),
        "zmq_send_us": fl["send"],
        "memcpy_4k_us": fl["memcpy"],
        "caller_floor_us": fl["send"] + fl["memcpy"],
    }
    for fmt, lib in (("v5", "scipy"), ("v7.3", "hdf5storage")):
        call_us = med(calls[fmt]) * 1e6
        wait_us = med(waited[fmt]) * 1e6
        res["matspool"][fmt] = {
            "files_per_s": med(rates[fmt]),
            "rounds_files_per_s": rates[fmt],
            "files_found": found[fmt],
            "save_call_us": float(np.mean(calls[fmt])) * 1e6,
            "save_call_median_us": call_us,
            "waited_median_us": wait_us,
            "ratio_vs_direct": round_ratio(fmt, lib),
            "ratio_vs_filesystem": round_ratio(fmt, "filesystem"),
            # the same file written by scipy in the same rounds: the yardstick for both formats
            "ratio_vs_scipy": round_ratio(fmt, "scipy"),
            "ratio_call_vs_scipy": call_us / scipy_us,
            "ratio_waited_vs_scipy": wait_us / scipy_us,
        }
    progress.end("done; " + ", ".join(f"{k} {v['files_per_s']:.0f}/s" for k, v in res["matspool"].items()))
    return res


TARGETS = {"v5": 5000, "v7.3": 2000}


def rows(res: dict[str, Any], cfg: Config) -> list[Row]:
    out = []
    fl = res.get("floors", {})
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
        bare = res["filesystem"]["files_per_s"]
        out.append(
            Row(
                figure=f"small files through the daemon vs bare create+write+rename, {fmt}",
                measured=f"{rate:.0f} files/s",
                compared=f"open+write+close+rename {bare:.0f}/s",
                ratio=f"{r['ratio_vs_filesystem']:.2f}x",
                target=">= 0.9x that floor",
                value=r["ratio_vs_filesystem"],
                met=r["ratio_vs_filesystem"] >= 0.9,
            )
        )
        scipy_d = res["direct"]["v5"]
        scipy_us = scipy_d["per_file_median_us"]
        out.append(
            Row(
                figure=f"small files through the daemon vs scipy direct, {fmt}",
                measured=f"{rate:.0f} files/s",
                compared=f"scipy.io.savemat {scipy_d['files_per_s']:.0f}/s"
                + (f"; floor {fl['write_and_send_vs_scipy']:.2f}x" if fl else ""),
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
                compared=f"scipy.io.savemat {scipy_us:.0f} us per file"
                + (f"; floor {fl['caller_floor_us']:.1f} us" if fl else ""),
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
                compared=f"scipy.io.savemat {scipy_us:.0f} us"
                + (
                    f"; floor {fl['waited_floor_us']:.0f} us = {fl['waited_floor_vs_scipy']:.2f}x"
                    if fl
                    else ""
                ),
                ratio=f"{r['ratio_waited_vs_scipy']:.2f}x",
                target="<= 1.5x scipy",
                value=r["ratio_waited_vs_scipy"],
                met=r["ratio_waited_vs_scipy"] <= 1.5,
            )
        )
    if fl:
        out += _floor_rows(fl, res["direct"]["v5"]["per_file_median_us"])
    return out


def _floor_rows(fl: dict[str, Any], scipy_us: float) -> list[Row]:
    """The machine's floors measured in the same rounds (informational: no target)."""
    rtt, sock = fl["round_trip_zmq_us"], fl["round_trip_socketpair_us"]
    return [
        Row(
            figure="floor: one save waited for = scipy's write + one round trip",
            measured=f"{fl['waited_floor_us']:.0f} us",
            compared=f"scipy {scipy_us:.0f} us + zmq ipc round trip {rtt:.0f} us "
            f"(socketpair {sock:.0f} us: {fl['waited_floor_socketpair_vs_scipy']:.2f}x)",
            ratio=f"{fl['waited_floor_vs_scipy']:.2f}x scipy",
            value=fl["waited_floor_vs_scipy"],
        ),
        Row(
            figure="floor: 1 process writes scipy's bytes + sends 1 zmq message per file",
            measured=f"{fl['write_and_send_files_per_s']:.0f} files/s",
            compared="scipy.io.savemat and bare create+write+rename, same rounds",
            ratio=f"{fl['write_and_send_vs_scipy']:.2f}x scipy; "
            f"{fl['write_and_send_vs_filesystem']:.2f}x bare",
            value=fl["write_and_send_vs_scipy"],
        ),
        Row(
            figure="floor: save() caller time = 1 zmq send + 4 KiB memcpy",
            measured=f"{fl['caller_floor_us']:.1f} us",
            compared=f"send {fl['zmq_send_us']:.1f} us + memcpy {fl['memcpy_4k_us']:.1f} us"
            f"; scipy {scipy_us:.0f} us",
            ratio=f"{fl['caller_floor_us'] / scipy_us:.2f}x scipy",
            value=fl["caller_floor_us"],
        ),
    ]
