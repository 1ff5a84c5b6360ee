"""Several producer processes against one daemon; the embedded daemon; the module-level API.

Producers are spawned (never forked) processes, each with its own ring, saving a mix of
v5 and v7.3 files of different shapes and dtypes at the same time. The data is derived
from a seed, so the parent can rebuild it and check every file bit for bit.
"""

from __future__ import annotations

import glob
import inspect
import multiprocessing as mp
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import matspool
from matspool._ring import RING_PREFIX, SHM_DIR

from conftest import DaemonProc
from readback import assert_variables, read

N_PRODUCERS = 4
FILES_EACH = 10
SAME_PATH_REPEATS = 3


# -- deterministic content ------------------------------------------------------------------
def file_spec(producer: int, k: int) -> tuple[str, str, dict[str, np.ndarray]]:
    """Name, format and variables of producer ``producer``'s ``k``-th file."""
    rng = np.random.default_rng([producer, k])
    fmt = ("v5", "v7.3")[(producer + k) % 2]
    m, n = (int(v) for v in rng.integers(1, 300, size=2))
    c = int(rng.integers(1, 5))
    variables = {
        "a": rng.standard_normal((m, n)).astype(np.float32),
        "b": rng.integers(-30000, 30000, size=(n, c, 3), dtype=np.int16),
        "z": (rng.standard_normal((c, m)) + 1j * rng.standard_normal((c, m))).astype(np.complex128),
        "mask": rng.random((3, n)) > 0.5,
        "step": np.array([[producer * 1000 + k]], dtype=np.int64),
    }
    if k % 3 == 0:
        variables["e"] = np.zeros((0, n), dtype=np.float64)
    return f"p{producer}_f{k:02d}.mat", fmt, variables


def same_path_value(producer: int, i: int) -> np.ndarray:
    return np.full((40, 50), producer * 10 + i, dtype=np.float64)


def produce(endpoint: str, out: str, producer: int, barrier: Any, results: Any) -> None:
    """One producer process: FILES_EACH files, plus repeated saves to one path."""
    try:
        with matspool.Spool(endpoint, ring_bytes=4 << 20, timeout=60) as spool:
            ring_name = spool._ring.name
            barrier.wait(60)
            futures = []
            for k in range(FILES_EACH):
                name, fmt, variables = file_spec(producer, k)
                futures.append(spool.save(os.path.join(out, name), variables, format=fmt))
                if k == FILES_EACH // 2:  # in the middle: the same file, several times, in order
                    for i in range(SAME_PATH_REPEATS):
                        futures.append(
                            spool.save(
                                os.path.join(out, f"p{producer}_same.mat"),
                                {"v": same_path_value(producer, i)},
                                format=("v5", "v7.3")[i % 2],
                            )
                        )
            spool.flush(60)
            done = [(f.result().path, f.result().nbytes, f.result().format) for f in futures]
        results.put((producer, os.getpid(), ring_name, done, None))
    except BaseException as e:  # report, never hang the parent
        results.put((producer, os.getpid(), None, None, repr(e)))
        raise


def rings_of(pid: int) -> list[str]:
    return glob.glob(os.path.join(SHM_DIR, f"{RING_PREFIX}{pid}-*"))


# -- tests -----------------------------------------------------------------------------------
def test_producers_save_concurrently(daemon: DaemonProc) -> None:
    ctx = mp.get_context("spawn")
    out = daemon.root
    barrier = ctx.Barrier(N_PRODUCERS)
    results = ctx.Queue()
    procs = [
        ctx.Process(
            target=produce, args=(daemon.endpoint, str(out), i, barrier, results), name=f"producer-{i}"
        )
        for i in range(N_PRODUCERS)
    ]
    for p in procs:
        p.start()
    try:
        reports = [results.get(timeout=90) for _ in procs]
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    errors = [r[4] for r in reports if r[4]]
    assert not errors, errors
    assert [p.exitcode for p in procs] == [0] * N_PRODUCERS
    assert daemon.alive()

    pids = {producer: pid for producer, pid, *_ in reports}
    assert sorted(pids) == list(range(N_PRODUCERS))
    assert sorted(pids.values()) == sorted(p.pid for p in procs)  # separate processes
    for _producer, pid, ring_name, done, _ in reports:
        assert ring_name.startswith(f"{RING_PREFIX}{pid}-")
        assert len(done) == FILES_EACH + SAME_PATH_REPEATS
        for path, nbytes, fmt in done:
            assert os.path.dirname(path) == str(out)
            assert fmt in ("v5", "v7.3")
            if "_same" not in path:
                assert nbytes == os.path.getsize(path)

    # every file present and exact
    expected = {f"p{i}_same.mat" for i in range(N_PRODUCERS)}
    for producer in range(N_PRODUCERS):
        for k in range(FILES_EACH):
            name, fmt, variables = file_spec(producer, k)
            expected.add(name)
            assert_variables(read(out / name, fmt), variables)
        # saves to one path land in the order they were made: the last one wins
        last = SAME_PATH_REPEATS - 1
        assert_variables(
            read(out / f"p{producer}_same.mat", ("v5", "v7.3")[last % 2]),
            {"v": same_path_value(producer, last)},
        )
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(expected), "unexpected or missing files (temporary names left behind?)"
    assert not [n for n in names if n.endswith(".matspool-tmp")]

    # clean exits leave no shared memory behind
    for pid in pids.values():
        assert rings_of(pid) == [], f"ring of producer pid {pid} left in {SHM_DIR}"


def test_embedded_daemon(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MATSPOOL_ENDPOINT", raising=False)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    spool = matspool.Spool(ring_bytes=1 << 20, timeout=30)
    try:
        emb = spool._embedded
        assert emb is not None
        proc = emb.proc
        ring = spool._ring
        assert ring is not None and ring.exists()
        assert proc.poll() is None
        sock_dir = os.path.dirname(emb.endpoint[len("ipc://") :])
        assert os.path.isdir(sock_dir)
        assert os.stat(sock_dir).st_mode & 0o077 == 0  # a private directory
        x = np.arange(20, dtype=np.int32).reshape(4, 5)
        r1 = spool.save("rel.mat", {"x": x}, format="v5").result(30)
        r2 = spool.save(Path("sub") / "rel.mat", {"x": x + 1}, format="v7.3").result(30)
        # a chdir after save() changes nothing for a save already made
        fut = spool.save("later.mat", {"x": x + 2})
        monkeypatch.chdir(tmp_path / "sub")
        r3 = fut.result(30)
        spool.flush(10)
    finally:
        spool.close()
    assert r1.path == str(tmp_path / "rel.mat") and r1.format == "v5"
    assert r2.path == str(tmp_path / "sub" / "rel.mat") and r2.format == "v7.3"
    assert r3.path == str(tmp_path / "later.mat")
    assert_variables(read(tmp_path / "rel.mat", "v5"), {"x": x})
    assert_variables(read(tmp_path / "sub" / "rel.mat", "v7.3"), {"x": x + 1})
    assert_variables(read(tmp_path / "later.mat", "v5"), {"x": x + 2})
    # close() stopped the daemon and cleaned up after it
    assert proc.poll() is not None, "the embedded daemon is still running after close()"
    assert proc.returncode == 0
    assert not os.path.exists(sock_dir)
    assert not ring.exists()
    with pytest.raises(matspool.SpoolClosed):
        spool.save("again.mat", {"x": x})


def _embedded_then_exit(conn: Any) -> None:
    os.environ.pop("MATSPOOL_ENDPOINT", None)
    spool = matspool.Spool(ring_bytes=1 << 20)
    conn.send((spool._embedded.proc.pid, spool._ring.name))  # a pipe: sent before we go on
    conn.close()
    os._exit(0)  # no close(), no atexit: the daemon must notice on its own


def _process_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")  # zombie: exited
    except FileNotFoundError:
        return True


def test_embedded_daemon_exits_when_its_client_dies(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    rx, tx = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_embedded_then_exit, args=(tx,))
    p.start()
    tx.close()
    assert rx.poll(60), "the client did not start"
    daemon_pid, ring_name = rx.recv()
    p.join(30)
    assert p.exitcode == 0
    deadline = time.monotonic() + 10
    while not _process_gone(daemon_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        assert _process_gone(daemon_pid), "the embedded daemon outlived its client"
    finally:
        leftover = os.path.join(SHM_DIR, ring_name)
        if os.path.exists(leftover):  # the client died without close(): not its daemon's job
            os.unlink(leftover)


def _module_level_api(endpoint: str, out: str, q: Any) -> None:
    try:
        os.environ["MATSPOOL_ENDPOINT"] = endpoint
        assert matspool._default is None
        matspool.flush()  # a no-op before first use
        assert matspool._default is None
        x = np.arange(12.0).reshape(3, 4)
        f1 = matspool.save(os.path.join(out, "m1.mat"), {"x": x})
        f2 = matspool.save(os.path.join(out, "m2.mat"), {"x": -x}, format="v7.3", layout="raw")
        spool = matspool.default_spool()
        assert spool is matspool.default_spool()  # one per process
        assert spool._embedded is None and spool.endpoint == endpoint
        matspool.flush(30)
        assert f1.done() and f2.done()
        bad = matspool.save(os.path.join(out, "nodir", "m3.mat"), {"x": x})
        flush_error = None
        try:
            matspool.flush(30)
        except matspool.FlushError as e:
            flush_error = [type(err).__name__ for err in e.errors]
        assert isinstance(bad.exception(), matspool.WriteFailed)
        # after close(), the module-level API makes a new default spool
        spool.close()
        f4 = matspool.save(os.path.join(out, "m4.mat"), {"x": x + 4})
        assert matspool.default_spool() is not spool
        f4.result(30)
        q.put(
            (
                [f1.result().path, f2.result().path, f4.result().path],
                flush_error,
                matspool.default_spool()._ring.name,
                None,
            )
        )
        # no close: atexit closes the default spool and removes its ring
    except BaseException as e:
        q.put((None, None, None, repr(e)))
        raise


def test_module_level_save_and_flush(daemon: DaemonProc) -> None:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_module_level_api, args=(daemon.endpoint, str(daemon.root), q))
    p.start()
    paths, flush_error, ring_name, error = q.get(timeout=60)
    p.join(30)
    assert error is None, error
    assert p.exitcode == 0
    out = daemon.root
    assert paths == [str(out / "m1.mat"), str(out / "m2.mat"), str(out / "m4.mat")]
    assert flush_error == ["WriteFailed"]
    x = np.arange(12.0).reshape(3, 4)
    assert_variables(read(out / "m1.mat", "v5"), {"x": x})
    assert_variables(read(out / "m2.mat", "v7.3"), {"x": -x.T})  # raw: MATLAB sees dims reversed
    assert_variables(read(out / "m4.mat", "v5"), {"x": x + 4})
    assert not (out / "nodir").exists()
    assert rings_of(p.pid) == [], "the default spool's ring outlived the process"
    assert not os.path.exists(os.path.join(SHM_DIR, ring_name))


def test_exported_members() -> None:
    exported = set(matspool.__all__)
    assert len(exported) == len(matspool.__all__), "duplicates in __all__"
    for name in matspool.__all__:
        assert hasattr(matspool, name), f"matspool.__all__ names {name!r}, which does not exist"
    public = {
        name
        for name, member in vars(matspool).items()
        if not name.startswith("_")
        and (inspect.isclass(member) or inspect.isfunction(member))
        and getattr(member, "__module__", "").split(".")[0] == "matspool"
    }
    assert public, "found no public members at all"
    assert public - exported == set(), f"public but not in __all__: {sorted(public - exported)}"


def test_two_spellings_of_one_file_keep_the_order_of_their_saves(daemon: DaemonProc) -> None:
    """A symlinked directory is another spelling of the same file: an earlier, slow save
    through it must not land after a later, quick one through the real directory (before,
    writes were ordered by the path's text, so the quick one ran at once and the slow one
    then replaced it: the file held the older data)."""
    real = daemon.root / "real"
    real.mkdir()
    (daemon.root / "alias").symlink_to(real, target_is_directory=True)
    slow = np.random.default_rng(0).random((1024, 2048))  # 16 MiB, deflated: a slow write
    with matspool.Spool(daemon.endpoint, ring_bytes=64 << 20, timeout=60) as s:
        first = s.save(daemon.root / "alias" / "x.mat", {"x": slow}, format="v5", compress=6)
        second = s.save(real / "x.mat", {"x": np.float64(2.0)}, format="v5")
        first.result(60)
        second.result(60)
    assert_variables(read(real / "x.mat", "v5"), {"x": np.full((1, 1), 2.0)})


def test_a_directory_replaced_between_saves_keeps_their_order(tmp_path: Path, out_dir: Path) -> None:
    """The path's text names the file a queued save will write: a directory renamed away
    and made anew between two saves of ``d/x.mat`` gives them two directory inodes, and
    both still land in the new ``d``. Before, writes were ordered by that inode only: the
    later save ran beside the earlier ones and the earlier one landed last (the file held 1.0)."""
    from conftest import start_daemon

    daemon = start_daemon(out_dir, tmp_path / "sock", "--debug-write-delay", "1.5", "--writers", "2")
    try:
        d = out_dir / "d"
        d.mkdir()
        with matspool.Spool(daemon.endpoint, ring_bytes=1 << 20, timeout=60) as s:
            first = s.save(d / "x.mat", {"x": 0.0}, format="v5")  # runs: sleeps, then writes
            second = s.save(d / "x.mat", {"x": 1.0}, format="v5")  # queued behind it
            time.sleep(0.5)  # lets the daemon take both (taken later, they share a key anyway)
            d.rename(out_dir / "d.old")
            d.mkdir()
            third = s.save(d / "x.mat", {"x": 2.0}, format="v5")  # the last save must win
            for f in (first, second, third):
                f.result(60)
        assert_variables(read(d / "x.mat", "v5"), {"x": np.full((1, 1), 2.0)})
    finally:
        assert daemon.stop() == 0
