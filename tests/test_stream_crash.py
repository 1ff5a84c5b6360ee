"""A stream append killed at any instant, or stopped by a full disk, keeps every earlier step.

The writer-level loop forks a child that runs ``append_step`` and SIGKILLs it at a random
instant (hundreds of kills in seconds); the end-to-end test SIGKILLs a real daemon while
a client streams. After each kill the stream is continued the way the system continues
it (the next append, by a new writer), and the file must hold every acknowledged step
exactly (a step that landed but was not yet acknowledged may appear once more: the
client re-sends what was not answered).
"""

from __future__ import annotations

import functools
import itertools
import os
import random
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import h5py
import mat73
import numpy as np
import pytest

import matspool
from matspool._protocol import VarSpec
from matspool._spool import Spool
from matspoold.writers import write_atomic
from matspoold.writers._journal import (
    HEADER_BYTES,
    JOURNAL_SUFFIX,
    UndoFile,
    journal_path,
    journaled,
    recover,
)
from matspoold.writers.stream import append_step

from conftest import start_daemon, tmpfs

# (name, MATLAB dims of u, gzip level): 4 KiB, 64 KiB and 1 MiB steps, one of them deflated
STREAMS = [("tiny", (32, 32), 0), ("mid", (128, 128), 0), ("big", (512, 512), 0), ("zip", (256, 256), 3)]


def _spec(name: str, arr: np.ndarray) -> tuple[VarSpec, np.ndarray]:
    key = {
        np.dtype(np.float32): "<f4",
        np.dtype(np.float64): "<f8",
        np.dtype(np.bool_): "|b1",
        np.dtype(np.complex64): "<c8",
    }[arr.dtype]
    arr = np.asfortranarray(arr)
    return VarSpec(name, key, arr.shape, 0, arr.nbytes), arr


@functools.cache
def _base(dims: tuple[int, ...]) -> np.ndarray:
    return np.random.default_rng(7).standard_normal(dims).astype(np.float32)


def _values(dims: tuple[int, ...], k: int) -> dict[str, np.ndarray]:
    return {
        "u": _base(dims) + np.float32(k),
        "t": np.array([[k * 0.5]]),
        "flags": np.array([[k % 2 == 0, True]]),
        "z": np.array([[1 + 1j * k]], np.complex64),
    }


def _step(dims: tuple[int, ...], k: int) -> list[tuple[VarSpec, np.ndarray]]:
    return [_spec(n, v) for n, v in _values(dims, k).items()]


#: how far back a re-send may go: the appends one round of the daemon-kill test leaves unanswered
_UNACKED = 32


def _check(path: Path, dims: tuple[int, ...], at_least: int) -> int:
    """The file's steps are 0, 1, ... in order, each exact, every step below ``at_least``
    present. Appends are at-least-once: steps written but not yet acknowledged when the
    daemon was killed are re-sent, in order, so the file may go back to one of them and
    repeat from there (``5 6 5 6 7``: the answers to 5 and 6 were lost), never skip one.
    Returns the highest step + 1."""
    with h5py.File(path, "r") as f:
        t = f["t"][:, 0, 0]
        ks = np.rint(t / 0.5).astype(int)
        steps = np.diff(ks)
        assert ks[0] == 0 and (steps <= 1).all() and (steps >= -_UNACKED).all(), ks
        assert ks[-1] + 1 >= at_least, (ks, at_least)
        u = f["u"][:]  # one read; (steps, *reversed dims)
        assert np.array_equal(u, _base(dims).T[None] + ks.astype(np.float32)[:, None, None])
        flags = f["flags"][:, :, 0].astype(bool)
        np.testing.assert_array_equal(flags, np.stack([ks % 2 == 0, np.ones_like(ks, bool)], 1))
        z = f["z"][:, 0, 0]
        assert (z["real"] == 1).all() and (z["imag"] == ks).all()
        assert f["u"].attrs["MATLAB_class"] == b"single"
    return int(ks[-1]) + 1


def _phase(path: Path, size_before: int) -> str:
    """Where a kill landed, judged from what it left."""
    j = Path(journal_path(str(path)))
    if j.exists():
        return "commit" if j.stat().st_size > HEADER_BYTES else "append"
    return "between" if path.stat().st_size == size_before else "done-unacknowledged"


def _reads_in_full(path: Path, dims: tuple[int, ...], acked: int) -> bool:
    """Every variable reads whole (as mat73 and MATLAB's load do) and holds steps 0, 1,
    ... exactly, each acknowledged one included (a repeat allowed, as in ``_check``);
    before recovery the interrupted step may show in some variables and not yet in others,
    but exactly where it shows."""
    try:
        with h5py.File(path, "r") as f:
            u, t = f["u"][:], f["t"][:, 0, 0]
    except (OSError, KeyError, ValueError, RuntimeError):  # what h5py raises on a broken file
        return False
    ks = np.rint(t / 0.5).astype(int)
    if not (
        np.array_equal(t, ks * 0.5)
        and ks[0] == 0
        and set(np.diff(ks)) <= {0, 1}
        and acked <= ks[-1] + 1 <= acked + 1
        and abs(len(u) - len(t)) <= 1
    ):
        return False
    ku = np.append(ks, ks[-1] + 1)[: len(u)]  # u may hold the interrupted step, t not yet
    return np.array_equal(u, _base(dims).T[None] + ku.astype(np.float32)[:, None, None])


def test_append_killed_at_random_instants_keeps_every_acknowledged_step(tmp_path: Path) -> None:
    """200 SIGKILLs of a writer process at random instants of ``append_step``."""
    rng = random.Random(1234)
    streams = {}
    for name, dims, level in STREAMS:
        path = tmp_path / f"{name}.mat"
        write_atomic(str(path), "stream", _step(dims, 0), fsync=False, compress=level)
        streams[name] = [path, dims, 1, []]  # path, dims, next step, kill window (s)
    phases: Counter[str] = Counter()
    readable_at_once = 0
    kills = 0
    start = time.monotonic()
    while kills < 200:
        name = rng.choice(list(streams))
        path, dims, k, window = streams[name]
        if k >= 12:  # a fresh file now and then keeps each check's read short
            path = path.with_name(f"{name}-{kills}.mat")
            level = {n: lv for n, _, lv in STREAMS}[name]
            write_atomic(str(path), "stream", _step(dims, 0), fsync=False, compress=level)
            streams[name][:3] = [path, dims, 1]
            k = 1
        variables = _step(dims, k)
        size_before = path.stat().st_size
        t0 = time.perf_counter()
        pid = os.fork()
        if pid == 0:  # the writer: one append, then out (no atexit, no pytest)
            code = 1
            try:
                append_step(str(path), variables, fsync=False)
                code = 0
            finally:
                os._exit(code)
        if not window:  # learn how long this stream's append takes, fork included
            _, status = os.waitpid(pid, 0)
            window.append(time.perf_counter() - t0)
            assert os.waitstatus_to_exitcode(status) == 0
            streams[name][2] = _check(path, dims, k + 1)
            continue
        time.sleep(rng.uniform(0, window[0]))
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        if os.WIFEXITED(status):
            assert os.waitstatus_to_exitcode(status) == 0, "the append failed by itself"
            phases["finished"] += 1
            window[0] *= 0.8  # the kills came late: aim earlier (a busy machine oversleeps)
            acked = k + 1
        else:
            kills += 1
            window[0] *= 1.05
            phases[_phase(path, size_before)] += 1
            readable_at_once += _reads_in_full(path, dims, k)
            acked = k
        # the next append (a restarted daemon) re-sends the unanswered step; it recovers first
        if acked == k:
            append_step(str(path), variables, fsync=False)
        assert not Path(journal_path(str(path))).exists()
        streams[name][2] = _check(path, dims, k + 1)
        if kills % 25 == 0:
            m = mat73.loadmat(path)
            with h5py.File(path) as f:  # (an h5py file left open across a fork reads stale)
                assert m["u"].shape[-1] == f["u"].shape[0]
    elapsed = time.monotonic() - start
    print(
        f"\n{kills} kills in {elapsed:.1f} s: {dict(phases)}; the file read in full before "
        f"recovery after {readable_at_once} kills"
    )
    # the kills landed inside real appends, not only between them
    assert phases["append"] + phases["commit"] >= kills // 3, phases
    for path, _dims, n, _ in streams.values():
        assert mat73.loadmat(path)["u"].shape[-1] >= n
    assert not list(tmp_path.glob(".*" + JOURNAL_SUFFIX)) and not list(tmp_path.glob(".*matspool-tmp"))
    _octave_agrees(streams["mid"][0], streams["mid"][1])


def _octave_agrees(path: Path, dims: tuple[int, ...]) -> None:
    """GNU Octave loads ``u`` with h5py's size and sum (when Octave is installed)."""
    if not shutil.which("octave"):
        return
    with h5py.File(path) as f:
        steps, total = f["u"].shape[0], float(np.sum(f["u"][:], dtype=np.float64))
    r = subprocess.run(
        [
            "octave",
            "--no-gui",
            "--no-window-system",
            "--quiet",
            "--eval",
            f"S = load('{path}'); printf('%d %d %d %.6f\\n', size(S.u), sum(double(S.u(:))))",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    got = r.stdout.split()
    assert [int(x) for x in got[:3]] == [*dims, steps]
    assert abs(float(got[3]) - total) <= 1e-6 * max(1.0, abs(total)) + 1e-3


def _traceable() -> bool:
    if shutil.which("strace") is None:
        return False
    return (
        subprocess.run(
            ["strace", "-qq", "-o", "/dev/null", "true"], capture_output=True, check=False
        ).returncode
        == 0
    )


def _killed_at_write(path: Path, variables: list[tuple[VarSpec, np.ndarray]], n: int) -> bool:
    """Run ``append_step`` in a child that strace SIGKILLs on entry to its ``n``-th
    ``pwrite`` (so that write never happens); False if it finished with fewer writes."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.read(r, 1)
            append_step(str(path), variables, fsync=False)
            code = 0
        finally:
            os._exit(code)
    os.close(r)
    tracer = subprocess.Popen(
        [
            "strace",
            "-qq",
            "-o",
            "/dev/null",
            "-p",
            str(pid),
            "-e",
            "trace=pwrite64",
            "-e",
            f"inject=pwrite64:signal=KILL:when={n}",
        ]
    )
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # go once the tracer holds the child
            with open(f"/proc/{pid}/status") as f:
                if any(line.startswith("TracerPid:") and line.split()[1] != "0" for line in f):
                    break
            time.sleep(0.001)
        os.write(w, b"x")
    finally:
        os.close(w)
        _, status = os.waitpid(pid, 0)
        tracer.wait(10)
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return True
    assert os.waitstatus_to_exitcode(status) == 0, "the append failed by itself"
    return False


def test_append_killed_before_each_of_its_writes_keeps_every_step(tmp_path: Path) -> None:
    """Deterministic: a kill before the 1st, 2nd, ... write of one append, for each stream
    layout and at lengths where HDF5's chunk B-tree splits, then the next append."""
    if not _traceable():
        pytest.skip("needs strace and ptrace to kill a writer at a chosen write")
    kills, octave_done = 0, False
    for name, dims, level in STREAMS:
        base = tmp_path / f"{name}.mat"
        write_atomic(str(base), "stream", _step(dims, 0), fsync=False, compress=level)
        k = 1
        for length in (3, 65) if dims[0] <= 128 else (3, 20):  # the 65th chunk splits a B-tree node
            while k < length:
                append_step(str(base), _step(dims, k), fsync=False)
                k += 1
            for n in itertools.count(1):
                path = tmp_path / f"{name}-{length}-{n}.mat"
                shutil.copyfile(base, path)
                if not _killed_at_write(path, _step(dims, k), n):
                    break
                kills += 1
                # even before recovery (no daemon ever continues the stream) it reads
                assert _reads_in_full(path, dims, k), (name, length, n)
                if kills % 20 == 0:
                    assert mat73.loadmat(path)["u"].shape[-1] >= k
                if not octave_done and Path(journal_path(str(path))).stat().st_size > HEADER_BYTES:
                    _octave_agrees(path, dims)  # once, on a file cut mid-commit, before recovery
                    octave_done = True
                append_step(str(path), _step(dims, k), fsync=False)  # the re-sent step
                assert _check(path, dims, k + 1) == k + 1
                with h5py.File(path) as f:
                    assert f["t"].shape[0] in (k + 1, k + 2)  # at most the killed step twice
                path.unlink()
            assert n > 5, "the append made fewer writes than expected"
    print(f"\n{kills} kills before a write")
    assert not list(tmp_path.glob(".*" + JOURNAL_SUFFIX))


def _child_dies_in(path: Path, dims: tuple[int, ...], k: int, where: str) -> None:
    """A writer killed at a chosen point of the commit: after ``n`` of the held writes."""
    variables = _step(dims, k)
    pid = os.fork()
    if pid == 0:
        try:
            apply = UndoFile.apply

            def dying_apply(self: UndoFile) -> None:
                if where == "after":
                    apply(self)
                else:
                    off, data = self.held[int(where)]
                    os.pwrite(self.fd, data, off)
                os.kill(os.getpid(), signal.SIGKILL)

            UndoFile.apply = dying_apply  # type: ignore[method-assign]
            append_step(str(path), variables, fsync=False)
        finally:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


@pytest.mark.parametrize("where", ["0", "2", "after"])
def test_kill_while_metadata_is_rewritten_is_undone_and_recovery_is_idempotent(
    tmp_path: Path, where: str
) -> None:
    dims = (64, 64)
    path = tmp_path / "s.mat"
    write_atomic(str(path), "stream", _step(dims, 0), fsync=False)
    for k in range(1, 4):
        append_step(str(path), _step(dims, k), fsync=False)
    before = path.read_bytes()
    _child_dies_in(path, dims, 4, where)
    journal = Path(journal_path(str(path)))
    assert journal.exists() and journal.name == f".s.mat{JOURNAL_SUFFIX}"
    saved = journal.read_bytes()
    assert recover(str(path)) is not None
    assert path.read_bytes() == before, "recovery did not restore the file byte for byte"
    journal.write_bytes(saved)  # as if recovery itself was killed before it dropped the journal
    assert recover(str(path)) is not None and recover(str(path)) is None
    assert path.read_bytes() == before
    append_step(str(path), _step(dims, 4), fsync=True)
    assert _check(path, dims, 5) == 5
    assert not journal.exists()


def test_a_journal_of_a_replaced_file_is_dropped_and_touches_nothing(tmp_path: Path) -> None:
    dims = (8, 8)
    path = tmp_path / "s.mat"
    write_atomic(str(path), "stream", _step(dims, 0), fsync=False)
    _child_dies_in(path, dims, 1, "0")
    write_atomic(str(path), "stream", _step(dims, 0), fsync=False)  # a new stream replaces it
    fresh = path.read_bytes()
    assert "replaced" in (recover(str(path)) or "")
    assert path.read_bytes() == fresh
    _child_dies_in(path, dims, 1, "0")
    with open(path, "r+b") as f:  # same inode, other bytes: a new file that reused the number
        f.write(b"MATLAB 7.3 MAT-file, created later")
    fresh = path.read_bytes()
    assert "replaced" in (recover(str(path)) or "")
    assert path.read_bytes() == fresh
    Path(journal_path(str(path))).write_bytes(b"MSPUNDO1 torn")  # a header cut by a kill
    assert "unwritten" in (recover(str(path)) or "")
    assert path.read_bytes() == fresh and not Path(journal_path(str(path))).exists()


def test_full_disk_at_every_phase_of_an_append_rolls_back(tmp_path: Path) -> None:
    """Fill a small tmpfs to within a few bytes of where each append ends, so ENOSPC hits
    the chunk, the metadata, the journal's header or its body."""
    fs = tmp_path / "fs"
    with tmpfs(fs, "4m"):
        dims = (64, 64)
        path, filler = fs / "s.mat", fs / "filler"
        write_atomic(str(path), "stream", _step(dims, 0), fsync=False)
        steps, failures = 1, 0
        for slack in range(0, 40 * 1024, 1024):
            filler.unlink(missing_ok=True)
            free = os.statvfs(fs).f_bavail * os.statvfs(fs).f_frsize
            with open(filler, "wb") as f:
                try:
                    f.write(b"\0" * max(0, free - slack))
                except OSError:
                    pass
            try:
                append_step(str(path), _step(dims, steps), fsync=bool(slack % 2048))
                steps += 1
            except matspool.WriteFailed as e:
                failures += 1
                assert "No space left" in str(e) and str(path) in str(e)
            assert _check(path, dims, steps) == steps
            assert sorted(p.name for p in fs.iterdir()) == ["filler", "s.mat"]
        assert failures >= 5 and steps >= 5, (failures, steps)


def test_daemon_on_a_full_disk_fails_the_append_and_serves_on(tmp_path: Path, out_dir: Path) -> None:
    full = out_dir / "full"
    with tmpfs(full, "4m"):
        d = start_daemon(out_dir, tmp_path / "sock")
        try:
            with Spool(d.endpoint, ring_bytes=16 << 20, timeout=30) as spool:
                s = spool.stream(full / "run.mat")
                dims, acked, error = (256, 256), 0, None
                for _ in range(40):  # 256 KiB a step: the disk is full after about 15
                    try:
                        s.append(**_values(dims, acked)).result(30)
                        acked += 1
                    except matspool.WriteFailed as e:
                        error = e
                        break
                assert error is not None and "No space left" in str(error), error
                assert d.alive(), "the daemon died on a full disk"
                assert _check(full / "run.mat", dims, acked) == acked
                with h5py.File(full / "run.mat") as f:
                    assert f["u"].shape[0] == acked
                assert sorted(p.name for p in full.iterdir()) == ["run.mat"], (
                    "a journal or temporary was left"
                )
                spool.save(out_dir / "elsewhere.mat", {"a": np.arange(5.0)}).result(30)
                assert (out_dir / "elsewhere.mat").stat().st_size > 0
        finally:
            d.stop()


def test_daemon_killed_during_appends_20_times(tmp_path: Path, out_dir: Path) -> None:
    """A real daemon SIGKILLed while a client streams 1 MiB steps; a new daemon continues."""
    rng = random.Random(99)
    dims = (512, 512)
    path = out_dir / "run.mat"
    d = start_daemon(out_dir, tmp_path / "sock")
    inside = 0
    try:
        with Spool(d.endpoint, ring_bytes=64 << 20, timeout=60) as spool:
            s = spool.stream(path)
            futures: list[Any] = [s.append(**_values(dims, 0))]
            futures[0].result(30)
            k = 1
            for _ in range(20):
                for _ in range(rng.randint(3, 8)):
                    futures.append(s.append(**_values(dims, k)))
                    k += 1
                time.sleep(rng.uniform(0.0, 0.08))
                os.kill(d.proc.pid, signal.SIGKILL)
                d.proc.wait()
                acked = next(
                    (i for i, f in enumerate(futures) if not (f.done() and f.exception() is None)),
                    len(futures),
                )
                inside += Path(journal_path(str(path))).exists()
                recover(str(path))  # what the restarted daemon's next append does first
                _check(path, dims, acked)
                d = start_daemon(out_dir, tmp_path / "sock")
            s.flush(120)
        assert _check(path, dims, k) == k
        print(f"\n20 daemon kills, {inside} inside an append (journal present)")
        assert inside >= 3, "the kills did not land inside appends"
        assert not list(out_dir.glob(".*" + JOURNAL_SUFFIX))
    finally:
        d.stop()


def test_a_file_without_a_userblock_is_refused_unchanged(tmp_path: Path) -> None:
    """Recovery tells files apart by their first bytes, which HDF5 rewrites when there
    is no userblock: such a file is refused rather than journaled unsafely."""
    path = tmp_path / "plain.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("x", shape=(1,), maxshape=(None,), chunks=(1,), dtype="f8")
    before = path.read_bytes()
    with (
        pytest.raises(matspool.WriteFailed, match="no userblock"),
        journaled(str(path), fsync=False) as undo,
        h5py.File(undo, "r+") as f,
    ):
        f["x"].resize((2,))
        f["x"][1] = 1.0
    assert path.read_bytes() == before and not Path(journal_path(str(path))).exists()
