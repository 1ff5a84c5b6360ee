"""Attacks on the two fast paths of issue 14 that held: the small-save fast path
(``matspool._quick``) and the overlapped large save (``matspool._overlap``). Each save is
read back by an independent reader and compared with a copy taken when ``save()``
returned: exotic dtypes, strides and aliasing on the fast path, a wrapping ring, a ring
that moved, threads saving to one path; overlapped saves whose source is overwritten at
once, to odd shapes on either ring kind, followed by small saves to the same file (also
through a symlinked directory), one that runs out of disk, one whose daemon is killed.
The last test is the one that did not hold: a save made after the daemon had been silent
while nothing waited on it failed at once (``Link._loop``'s silence clock).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import matspool
from matspool import _overlap, _quick, _spool

from conftest import DaemonProc, start_daemon, tmpfs
from readback import assert_variables, read

Values = dict[str, np.ndarray]


class Count:
    """How many saves each fast path took."""

    def __init__(self) -> None:
        self.quick = 0
        self.overlapped: list[bool] = []


@pytest.fixture
def count(monkeypatch: pytest.MonkeyPatch) -> Iterator[Count]:
    c = Count()
    quick, overlapped = _quick.save, _overlap.send_overlapped

    def quick_spy(*args: Any) -> Any:
        out = quick(*args)
        c.quick += out is not None
        return out

    def overlap_spy(*args: Any) -> Any:
        out = overlapped(*args)
        c.overlapped.append(out is not None)
        return out

    monkeypatch.setattr(_quick, "save", quick_spy)
    monkeypatch.setattr(_spool, "send_overlapped", overlap_spy)
    monkeypatch.setattr(_overlap, "ENABLED", True)
    yield c


def _seen(v: np.ndarray, layout: str = "matlab") -> np.ndarray:
    """What a reader gets back for ``v``: 0-d and 1-d as rows, ``raw`` transposed,
    native byte order, float16 widened; a copy taken now."""
    a = np.asarray(v)
    if a.ndim < 2:
        a = a.reshape(1, -1)
    elif layout == "raw":
        a = a.T
    dt = np.dtype(np.float32) if a.dtype == np.float16 else a.dtype.newbyteorder("=")
    return np.array(a, dtype=dt, copy=True)


_RNG = np.random.default_rng(41)

#: small saves whose dtype, strides or aliasing differ from the everyday case
_SMALL: dict[str, Callable[[], Values]] = {
    "float16": lambda: {"h": _RNG.standard_normal((3, 4)).astype(np.float16)},
    "float16 1-d": lambda: {"h": _RNG.standard_normal(5).astype(np.float16)},
    "negative strides": lambda: {"n": _RNG.standard_normal((6, 5))[::-1, ::-2]},
    "broadcast": lambda: {"b": np.broadcast_to(_RNG.standard_normal(4), (3, 4))},
    "big-endian complex": lambda: {"c": (_RNG.standard_normal((2, 3)) + 1j).astype(">c16")},
    "big-endian int16": lambda: {"c": _RNG.integers(-99, 99, (4, 2)).astype(">i2")},
    "uint64": lambda: {"u": _RNG.integers(0, 2**63, (4, 2), dtype=np.uint64)},
    "aliases": lambda: (lambda a: {"a": a, "b": a[::2], "c": a})(_RNG.standard_normal((4, 4))),
    "unaligned": lambda: {
        "u": np.frombuffer(b"\0" + _RNG.standard_normal(6).tobytes(), np.float64, offset=1).reshape(2, 3)
    },
    "3-d C order": lambda: {"t": _RNG.standard_normal((2, 3, 4))},
    "3-d F order": lambda: {"t": np.asfortranarray(_RNG.standard_normal((2, 3, 4)))},
}


@pytest.mark.parametrize("case", sorted(_SMALL))
def test_exotic_small_saves_are_exact_on_the_fast_path(
    mdaemon: DaemonProc, root: Path, count: Count, case: str
) -> None:
    with matspool.Spool(mdaemon.endpoint, ring_bytes=1 << 20, timeout=30) as s:
        for fmt in ("v5", "v7.3"):
            for layout in ("matlab", "raw"):
                sent = []
                for i in range(4):  # template, entry, then fast
                    values = _SMALL[case]()
                    sent.append({k: _seen(v, layout) for k, v in values.items()})
                    s.save(root / f"{fmt}-{layout}-{i}.mat", values, format=fmt, layout=layout)
                    for v in values.values():  # overwritten as soon as save() returned
                        if v.flags.writeable:
                            v[...] = 0
                s.flush(30)
                for i, want in enumerate(sent):
                    assert_variables(read(root / f"{fmt}-{layout}-{i}.mat", fmt), want, f"{fmt} {layout} {i}")
    assert count.quick >= 8


def test_a_wrapping_ring_and_threads_keep_the_last_save_per_file(
    mdaemon: DaemonProc, root: Path, count: Count
) -> None:
    x = _RNG.standard_normal((90, 90))  # 63 KiB: three fit in the ring
    with matspool.Spool(mdaemon.endpoint, ring_bytes=200 << 10, timeout=30) as s:
        for i in range(300):
            s.save(root / f"wrap{i % 7}.mat", {"x": x + i, "y": np.full(3, i, np.float32)})
        s.flush(30)
        for k in range(7):
            last = max(i for i in range(300) if i % 7 == k)
            assert_variables(
                read(root / f"wrap{k}.mat", "v5"), {"x": x + last, "y": np.full((1, 3), last, np.float32)}
            )
        assert s._ring.used == 0
    small = np.arange(12.0).reshape(3, 4)
    with matspool.Spool(mdaemon.endpoint, ring_bytes=1 << 20, timeout=30) as s:

        def worker(t: int) -> None:
            for i in range(100):
                s.save(root / f"t{t}.mat", {"x": small + 1000 * t + i})

        threads = [threading.Thread(target=worker, args=(t,)) for t in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        s.flush(30)
        for t in range(6):
            assert_variables(read(root / f"t{t}.mat", "v5"), {"x": small + 1000 * t + 99})
    assert count.quick >= 300  # a full ring sends a save the general way


def test_fast_saves_follow_a_ring_that_moved(daemon: DaemonProc, count: Count) -> None:
    """A daemon restarted after its predecessor unlinked our /dev/shm ring: the link moves
    the ring to a new segment; the fast path's views of the old mapping must not be
    written into."""
    x = np.arange(20.0).reshape(4, 5)
    with matspool.Spool(daemon.endpoint, ring_bytes=1 << 20, timeout=30, ring_mode=0o640) as s:
        assert s._ring is not None and s._ring.kind == "shm"
        for i in range(3):
            s.save(daemon.root / f"a{i}.mat", {"x": x + i}).result(30)
        old = s._ring.name
        os.unlink(s._ring.path)
        daemon.proc.kill()
        daemon.proc.wait()
        again = start_daemon(daemon.root, Path(daemon.endpoint[len("ipc://") :]).parent)
        try:
            deadline = time.monotonic() + 30
            while s._ring.name == old and time.monotonic() < deadline:
                time.sleep(0.05)
            assert s._ring.name != old, "the ring did not move"
            before = count.quick
            for i in range(3):
                s.save(daemon.root / f"b{i}.mat", {"x": x - i}).result(30)
            assert count.quick == before + 3
            for i in range(3):
                assert_variables(read(daemon.root / f"b{i}.mat", "v5"), {"x": x - i})
        finally:
            s.close()
            again.stop()


_BIG = 2100, 1100  # float64: 17.6 MiB, overlapped (>= 16 MiB)


@pytest.mark.parametrize("mode", [0o600, 0o640], ids=["memfd", "shm"])
def test_overlapped_saves_of_odd_arrays_are_snapshots(daemon: DaemonProc, count: Count, mode: int) -> None:
    """Overwritten as soon as save() returned: float16 (widened), bool, big-endian, odd
    widths (slab offsets that are no multiple of anything), a strided view, F order."""
    rng = np.random.default_rng(42)
    cases: dict[str, np.ndarray] = {
        "f16": rng.standard_normal((2049, 4099)).astype(np.float16),
        "bool": rng.random((4099, 4097)) > 0.5,
        "be": rng.standard_normal((1501, 1503)).astype(">f8"),
        "u8odd": rng.integers(0, 255, (4097, 4099), dtype=np.uint8),
        "strided": rng.standard_normal((2001, 2 * 1103))[:, ::2],
        "F": np.asfortranarray(rng.integers(-900, 900, (3001, 3003), dtype=np.int16)),
    }
    with matspool.Spool(daemon.endpoint, ring_bytes=160 << 20, timeout=60, ring_mode=mode) as s:
        for name, x in cases.items():
            for fmt in ("v5", "v7.3"):
                for layout in ("matlab", "raw"):
                    src = x.copy() if x.flags.writeable else x
                    want = _seen(src, layout)
                    path = daemon.root / f"{name}-{fmt}-{layout}.mat"
                    fut = s.save(path, {"x": src, "s": np.arange(5.0)}, format=fmt, layout=layout)
                    src[...] = 0
                    fut.result(60)
                    got = read(path, fmt)
                    assert_variables(got, {"x": want, "s": np.arange(5.0).reshape(1, -1)}, path.name)
                    path.unlink()
        assert s._ring.used == 0
    assert all(count.overlapped), count.overlapped


def test_small_saves_after_an_overlapped_one_to_the_same_file_win(
    daemon: DaemonProc, count: Count, tmp_path: Path
) -> None:
    """Per-file order across the paths: an overlapped save, then a fast small one to the
    same file, by the same spelling or through a symlinked directory; and two
    overlapped saves back to back."""
    real, link = daemon.root / "real", daemon.root / "link"
    real.mkdir()
    link.symlink_to(real)
    rng = np.random.default_rng(43)
    big = rng.standard_normal(_BIG)
    small = np.arange(12.0).reshape(3, 4)
    with matspool.Spool(daemon.endpoint, ring_bytes=128 << 20, timeout=60) as s:
        for _ in range(3):
            s.save(daemon.root / "w.mat", {"x": small}).result(30)
        for rep in range(3):
            for layout in ("matlab", "raw"):
                for a, b in ((real, real), (real, link), (link, real)):
                    f1 = s.save(a / "x.mat", {"x": big}, layout=layout)
                    f2 = s.save(b / "x.mat", {"x": small + rep})
                    f1.result(60)
                    f2.result(60)
                    got = read(real / "x.mat", "v5")
                    assert_variables(got, {"x": small + rep}, f"{rep} {layout} {a} {b}")
        f1 = s.save(real / "y.mat", {"x": big}, format="v7.3")
        f2 = s.save(real / "y.mat", {"x": big + 1}, format="v7.3")
        f1.result(60)
        f2.result(60)
        assert_variables(read(real / "y.mat", "v7.3"), {"x": big + 1})
    assert count.quick >= 18 and count.overlapped.count(True) >= 20


@pytest.mark.parametrize("fmt", ["v5", "v7.3"])
def test_an_overlapped_save_that_runs_out_of_disk_leaves_no_file(
    daemon: DaemonProc, count: Count, fmt: str
) -> None:
    rng = np.random.default_rng(44)
    x = rng.standard_normal(_BIG)
    with (
        tmpfs(daemon.root / "small", "12m") as small,
        matspool.Spool(daemon.endpoint, ring_bytes=128 << 20, timeout=60) as s,
    ):
        for layout in ("matlab", "raw"):
            s.save(small / "first.mat", {"x": x[:100]}, format=fmt).result(60)
            fut = s.save(small / "big.mat", {"x": x}, format=fmt, layout=layout)
            with pytest.raises(matspool.WriteFailed, match="No space left"):
                fut.result(60)
            deadline = time.monotonic() + 30
            while (s._ring.used or s.pending) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert s._ring.used == 0 and s.pending == 0
            assert sorted(os.listdir(small)) == ["first.mat"]
            (small / "first.mat").unlink()
            s.save(daemon.root / "after.mat", {"x": x}, format=fmt, layout=layout).result(60)
            want = x if layout == "matlab" else x.T
            assert_variables(read(daemon.root / "after.mat", fmt), {"x": np.ascontiguousarray(want)})
    assert count.overlapped == [True] * 4


@pytest.mark.parametrize("layout", ["matlab", "raw"])
def test_a_daemon_killed_during_an_overlapped_save(daemon: DaemonProc, count: Count, layout: str) -> None:
    """Killed as save() returns, its slabs still on their way: the future fails, no file
    appears, every region returns once the daemon is known dead, and the spool saves
    through the daemon started in its place."""
    x = np.random.default_rng(45).standard_normal((4100, 1100))  # 34 MiB: 5 slabs
    with matspool.Spool(daemon.endpoint, ring_bytes=128 << 20, timeout=3) as s:
        s.save(daemon.root / "warm.mat", {"x": x[:10]}).result(30)
        fut = s.save(daemon.root / "k.mat", {"x": x}, layout=layout)
        daemon.proc.kill()
        daemon.proc.wait()
        with pytest.raises(matspool.DaemonUnavailable):
            fut.result(60)
        deadline = time.monotonic() + 30
        while s._ring.used and time.monotonic() < deadline:
            time.sleep(0.05)
        assert s._ring.used == 0
        assert not (daemon.root / "k.mat").exists()  # (a killed daemon may leave its hidden temporary)
        again = start_daemon(daemon.root, Path(daemon.endpoint[len("ipc://") :]).parent)
        try:
            deadline = time.monotonic() + 30
            while True:  # until the new daemon has welcomed the spool
                try:
                    s.save(daemon.root / "after.mat", {"x": x}, layout=layout).result(60)
                    break
                except matspool.DaemonUnavailable:
                    assert time.monotonic() < deadline
            want = x if layout == "matlab" else x.T
            assert_variables(read(daemon.root / "after.mat", "v5"), {"x": np.ascontiguousarray(want)})
        finally:
            s.close()
            again.stop()
    assert count.overlapped[1] is True


def test_a_save_after_an_idle_silence_waits_its_own_timeout(daemon: DaemonProc, count: Count) -> None:
    """The daemon was stopped while nothing waited on it, longer than the spool's
    timeout: a save made then has its own timeout to wait, not none. (Before, the silence
    counted from the daemon's last word, and the loop turn the save woke failed it at once,
    "no word from the daemon for 4.5 s", though the daemon resumed and wrote the file;
    after a daemon restart, the first save failed the same way, "it is gone".)"""
    x = np.arange(12.0).reshape(3, 4)
    with matspool.Spool(daemon.endpoint, ring_bytes=1 << 20, timeout=1, heartbeat=1) as s:
        for i in range(3):
            s.save(daemon.root / f"w{i}.mat", {"x": x}).result(30)
        daemon.proc.send_signal(signal.SIGSTOP)
        try:
            time.sleep(4.5)  # past the silence limit (3 heartbeats), nothing pending
            before = count.quick
            fut = s.save(daemon.root / "late.mat", {"x": x + 1})
            assert count.quick == before + 1
            time.sleep(0.5)
        finally:
            daemon.proc.send_signal(signal.SIGCONT)
        assert fut.result(30).path == str(daemon.root / "late.mat")
        assert_variables(read(daemon.root / "late.mat", "v5"), {"x": x + 1})
