"""The daemon's side of sharded streams: STEP (a laid-out temporary becomes the stream's
next step) from a raw client, hostile STEPs refused with the stream left whole, and a
large step copied in slabs (in-process)."""

from __future__ import annotations

import contextlib
import errno
import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from test_sharded_daemon import Raw, _layout, _place, raw_daemon

from conftest import DaemonProc
from readback import read_v73


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaemonProc, Raw, Path, Path]]:
    with raw_daemon(tmp_path_factory.mktemp("sstreamd")) as s:
        yield s


def _laid_step(raw: Raw, path: Path, g: np.ndarray) -> str:
    """A step of ``g`` (MATLAB size g.shape) laid out and placed in two blocks: its tmp."""
    laid = _layout(raw, path, list(g.shape))
    assert laid["op"] == "LAID_OUT", laid
    tmp, offset = laid["tmp"], laid["offsets"][0][1]
    half = g.shape[0] // 2
    for at, shape in (((0, 0), (half, g.shape[1])), ((half, 0), (g.shape[0] - half, g.shape[1]))):
        block = g[at[0] : at[0] + shape[0], at[1] : at[1] + shape[1]]
        raw.ring.array[: block.nbytes] = np.asfortranarray(block).reshape(-1, order="F").view(np.uint8)
        done = raw.ask(_place(path, tmp, offset, list(g.shape), list(at), list(shape)))
        assert done["op"] == "DONE", done
    return str(tmp)


def _step(path: Path, tmp: str, create: bool, seq: int = 7, **extra: Any) -> dict[str, Any]:
    return {"op": "STEP", "seq": seq, "path": str(path), "tmp": tmp, "create": create, **extra}


def test_steps_by_hand_and_hostile_ones(setup: tuple[DaemonProc, Raw, Path, Path]) -> None:
    d, raw, root, outside = setup
    path = root / "s.mat"
    steps = [np.arange(12, dtype=np.float64).reshape(4, 3) + 100 * k for k in range(3)]
    for k, g in enumerate(steps[:2]):
        tmp = _laid_step(raw, path, g)
        done = raw.ask(_step(path, tmp, k == 0, fsync=True))
        assert done == {"op": "DONE", "seq": 7, "nbytes": path.stat().st_size}, done
        assert not (root / tmp).exists()
    want = np.stack(steps[:2], axis=-1)
    np.testing.assert_array_equal(read_v73(path)["u"], want)
    before = path.read_bytes()

    victim = outside / "victim.mat"
    victim.write_bytes(b"x" * 4096)
    (root / ".s.mat.evil.matspool-tmp").symlink_to(victim)  # a temporary's name, a symlink out
    other = _laid_step(raw, root / "other.mat", steps[2])
    spare = _laid_step(raw, path, steps[2])  # every refusal below must leave it be
    bad: list[tuple[dict[str, Any], str]] = [
        (_step(path, ".s.mat.evil.matspool-tmp", False), "symlink"),  # never followed
        (_step(path, ".s.mat.gone.matspool-tmp", False), "is gone"),  # no such temporary
        (_step(path, "../outside/victim.mat", False), "tmp must be a matspool temporary"),
        (_step(path, other, False), "is not a temporary of"),
        (_step(path, _laid_step(raw, path, np.ones((5, 3))), False), "is 5x3 double in this step but 4x3"),
        (_step(path, spare, True, level=10), "level must be an integer in [0, 9]"),
        (_step(path, spare, "yes"), "create must be true or false"),
        (_step(outside / "s.mat", spare, True), "outside"),
        ({k: v for k, v in _step(path, spare, False).items() if k != "tmp"}, "tmp must be"),
        (_step(root / "no.mat", _laid_step(raw, root / "no.mat", steps[2]), False), "stream's file is gone"),
    ]
    for msg, words in bad:
        reply = raw.ask(msg)
        assert reply["op"] == "ERR" and words in reply["message"], (msg, reply)
    assert d.alive()
    assert path.read_bytes() == before  # every refused step left the stream as it was
    assert victim.read_bytes() == b"x" * 4096 and sorted(os.listdir(outside)) == ["victim.mat"]
    assert not (root / "no.mat").exists()
    # and the stream goes on, with the temporary no refusal touched
    assert raw.ask(_step(path, spare, False))["op"] == "DONE"
    np.testing.assert_array_equal(read_v73(path)["u"], np.stack(steps, axis=-1))
    leftovers = [n for n in os.listdir(root) if n.startswith(".s.mat.") and n != ".s.mat.evil.matspool-tmp"]
    assert not leftovers, leftovers


def _laid_by_hand(target: Any, g: np.ndarray) -> str:
    """A step of ``g`` laid out and filled in-process (what LAYOUT and PLACEs make)."""
    from matspool._msgshard import ShardVar
    from matspoold.sharded import lay_out, runs

    tmp, offsets = lay_out(target, "v7.3", [ShardVar("u", "<f8", g.shape)])
    fd = os.open(tmp, os.O_WRONLY, dir_fd=target.dir_fd)
    src = np.asfortranarray(g).reshape(-1, order="F").view(np.uint8)
    for start, s, n in runs(g.shape, (0,) * g.ndim, g.shape, 8):
        os.pwrite(fd, src[s : s + n].tobytes(), offsets["u"][0] + start)
    os.close(fd)
    return tmp


@pytest.mark.parametrize("how", ["kernel", "pread", "deflate"])
def test_steps_are_copied_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    """A step goes into the stream file to file (copy_file_range; pread/pwrite in slabs
    where the filesystem refuses it) or, deflated, through HDF5: exact either way, one
    chunk per step."""
    from matspoold import sharded_stream
    from matspoold.fsconfine import as_target

    monkeypatch.setattr(sharded_stream, "_SLAB_BYTES", 1000)
    if how == "pread":

        def refuse(*args: Any) -> int:
            raise OSError(errno.EXDEV, "cross-device")

        monkeypatch.setattr(os, "copy_file_range", refuse)
    path = tmp_path / "big.mat"
    steps = [np.random.default_rng(k).standard_normal((37, 11, 3)) for k in range(3)]
    target, _ = as_target(str(path))
    try:
        for k, g in enumerate(steps):
            tmp = _laid_by_hand(target, g)
            sharded_stream.add_step(
                target, tmp, create=k == 0, fsync=False, level=4 if how == "deflate" else 0
            )
            assert not (tmp_path / tmp).exists()
    finally:
        target.close()
    np.testing.assert_array_equal(read_v73(path)["u"], np.stack(steps, axis=-1))
    with h5py.File(path, "r") as f:
        assert f["u"].shape == (3, 3, 11, 37) and f["u"].chunks == (1, 3, 11, 37)
        assert f["u"].compression == ("gzip" if how == "deflate" else None)


def test_a_step_through_hdf5_goes_in_slabs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A step whose chunk cannot take a byte copy (allocated below the file's old end)
    goes through HDF5 in slabs of at most the limit along its slowest axis."""
    from matspoold import sharded_stream

    monkeypatch.setattr(sharded_stream, "_SLAB_BYTES", 1000)
    g = np.random.default_rng(5).standard_normal((3, 11, 37))  # as stored: MATLAB 37x11x3
    with h5py.File(tmp_path / "src.h5", "w") as fs, h5py.File(tmp_path / "dst.h5", "w") as fd:
        src = fs.create_dataset("u", data=g)
        ds = fd.create_dataset("u", shape=(2, *g.shape), chunks=(1, *g.shape), dtype=g.dtype)
        copies: list[tuple[int, int, int]] = []
        sharded_stream._copy(src, ds, 1, 1 << 62, copies)
        assert copies == []
        np.testing.assert_array_equal(ds[1], g)


def test_a_step_killed_at_random_instants_keeps_every_earlier_step(tmp_path: Path) -> None:
    """30 SIGKILLs of a writer process at random instants of a STEP's append: once the
    journal is recovered (by the next step, any daemon), the file holds every earlier
    step exact, and the killed one whole or not at all."""
    from matspoold.fsconfine import as_target
    from matspoold.sharded_stream import add_step
    from matspoold.writers._journal import journal_path, recover

    rng = random.Random(13)
    path = tmp_path / "k.mat"
    want = [np.random.default_rng(k).standard_normal((64, 48, 2)) for k in range(200)]
    target, _ = as_target(str(path))
    try:
        add_step(target, _laid_by_hand(target, want[0]), create=True, fsync=False)
        n, kills, window, journaled = 1, 0, 0.0, 0
        while kills < 30 and n < len(want):
            tmp = _laid_by_hand(target, want[n])
            t0 = time.perf_counter()
            pid = os.fork()
            if pid == 0:  # the writer: one step, then out (no atexit, no pytest)
                code = 1
                try:
                    add_step(target, tmp, create=False, fsync=False)
                    code = 0
                finally:
                    os._exit(code)
            if not window:  # learn how long a step takes, fork included
                os.waitpid(pid, 0)
                window, n = time.perf_counter() - t0, n + 1
                continue
            time.sleep(rng.uniform(0, window))
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            if os.WIFEXITED(status):  # the kill came late: aim earlier (a busy machine oversleeps)
                window *= 0.8
            else:
                kills, window = kills + 1, window * 1.05
            journaled += Path(journal_path(str(path))).exists()  # killed inside the append
            recover(target)  # what the next step does first
            assert not Path(journal_path(str(path))).exists()
            with h5py.File(path, "r") as f:
                got = f["u"].shape[0]
            assert got in (n, n + 1), (got, n)  # the killed step: whole, or not at all
            n = got
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=target.dir_fd)
    finally:
        target.close()
    np.testing.assert_array_equal(read_v73(path)["u"], np.stack(want[:n], axis=-1))
    assert kills == 30
    print(f"{kills} kills, {journaled} inside the journaled append, {n} steps")
    assert journaled > 0


def test_complex_logical_and_integer_steps(tmp_path: Path) -> None:
    """Every MATLAB class a sharded step can hold goes in byte for byte: complex (HDF5's
    real/imag compound), logical (uint8 with MATLAB_int_decode), integers, a scalar."""
    from matspool._msgshard import ShardVar
    from matspoold.fsconfine import as_target
    from matspoold.sharded import lay_out, runs
    from matspoold.sharded_stream import add_step

    rng = np.random.default_rng(3)
    steps = [
        {
            "c": rng.standard_normal((5, 4)) + 1j * rng.standard_normal((5, 4)),
            "b": rng.standard_normal((3, 7)) > 0,
            "i": rng.integers(-100, 100, (6, 2)).astype(np.int16),
            "t": np.array([[0.25 * k]]),
        }
        for k in range(3)
    ]
    dtypes = {"c": "<c16", "b": "|b1", "i": "<i2", "t": "<f8"}
    path = tmp_path / "mixed.mat"
    target, _ = as_target(str(path))
    try:
        for k, step in enumerate(steps):
            tmp, offsets = lay_out(target, "v7.3", [ShardVar(n, dtypes[n], v.shape) for n, v in step.items()])
            fd = os.open(tmp, os.O_WRONLY, dir_fd=target.dir_fd)
            for name, g in step.items():
                src = np.asfortranarray(g).reshape(-1, order="F").view(np.uint8)
                for start, s, n in runs(g.shape, (0, 0), g.shape, g.dtype.itemsize):
                    os.pwrite(fd, src[s : s + n].tobytes(), offsets[name][0] + start)
            os.close(fd)
            add_step(target, tmp, create=k == 0, fsync=False)
    finally:
        target.close()
    got = read_v73(path)
    for name in steps[0]:
        want = np.stack([s[name] for s in steps], axis=-1)
        assert got[name].dtype == want.dtype and np.array_equal(got[name], want), name
    with h5py.File(path, "r") as f:
        assert f["b"].attrs["MATLAB_class"] == b"logical" and f["c"].attrs["MATLAB_class"] == b"double"
        assert f["i"].attrs["MATLAB_class"] == b"int16"
