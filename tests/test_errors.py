"""Every bad input gets a clear error of the right class, and the daemon keeps serving.

Client-side checks (names, types, format, sizes) must raise at ``save()``; path and disk
problems fail the future with the error the daemon reported. Hostile raw messages sent
straight to the daemon's socket are answered with ``ERR`` (or dropped), never crash it.
After every case a good save is made and read back.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import stat
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.io
import torch
import zmq
from fakedaemon import FakeDaemon, ZmqFake

import matspool
from matspool import _messages as msgs
from matspool import _protocol as proto
from matspool._errors import MatspoolError
from matspool._ring import Ring

from conftest import DaemonProc, tmpfs

TAG = b"matspool/1"


# -- shared fixtures -------------------------------------------------------------------
# mdaemon, mspool and root come from conftest.py


_good_counter = iter(range(1 << 30))


def assert_serves(spool: matspool.Spool, directory: Path, daemon: DaemonProc | None = None) -> None:
    """A good save right after a bad one lands, exact, under its name."""
    if daemon is not None:
        assert daemon.alive()
    k = next(_good_counter)
    x = np.arange(12, dtype=np.float64).reshape(3, 4) + k
    path = directory / f"good_{k}.mat"
    res = spool.save(path, {"x": x, "k": k}, format="v5").result(timeout=15)
    assert res.path == str(path)
    assert res.nbytes == path.stat().st_size
    m = scipy.io.loadmat(path)
    np.testing.assert_array_equal(m["x"], x)
    assert m["k"][0, 0] == k


def no_tmp_files(directory: Path) -> None:
    assert not [p for p in directory.rglob("*") if p.name.endswith(".matspool-tmp")]


# -- invalid variable names ---------------------------------------------------------------
BAD_NAMES: list[tuple[Any, str]] = [
    ("1x", "'1x'"),
    ("_x", "'_x'"),
    ("a-b", "'a-b'"),
    ("a b", "'a b'"),
    ("", "''"),
    ("é", "'é'"),
    ("a" * 64, "64 characters"),
    ("end", "keyword"),
    ("function", "keyword"),
    ("classdef", "keyword"),
    (1, "str"),
    (("a",), "str"),
    (None, "str"),
]


@pytest.mark.parametrize(("name", "said"), BAD_NAMES, ids=[repr(n)[:20] for n, _ in BAD_NAMES])
def test_invalid_variable_name(mspool: matspool.Spool, root: Path, name: Any, said: str) -> None:
    with pytest.raises(matspool.InvalidVariableError) as ei:
        mspool.save(root / "x.mat", {"ok": 1.0, name: np.zeros(3)})
    assert isinstance(ei.value, ValueError) and isinstance(ei.value, MatspoolError)
    assert said in str(ei.value)
    assert not (root / "x.mat").exists()
    assert mspool.pending == 0
    assert_serves(mspool, root)


def test_name_of_63_characters_is_fine(mspool: matspool.Spool, root: Path) -> None:
    name = "a" * 63
    mspool.save(root / "n.mat", {name: 1.0}, format="v5").result(10)
    assert scipy.io.loadmat(root / "n.mat")[name][0, 0] == 1.0


# -- unsupported values ----------------------------------------------------------------------
# str, dict, lists, str arrays (char matrices), object arrays (cells), structured arrays
# (struct arrays) and sparse matrices are supported: see test_metadata.py, test_fidelity.py
BAD_VALUES: list[tuple[str, Callable[[], Any], str]] = [
    ("object_array", lambda: np.array([object(), 1], dtype=object), "'bad{1}'"),  # a cell
    ("bytes", lambda: b"hello", "bytes"),
    ("none", lambda: None, "NoneType"),
    ("datetime64", lambda: np.array(["2024-01-01"], dtype="datetime64[ns]"), "datetime64"),
    ("timedelta64", lambda: np.array([1], dtype="timedelta64[s]"), "timedelta64"),
    ("structured_bad_field", lambda: np.zeros(2, dtype=[("a", "<i4"), ("b", "<M8[s]")]), "datetime64"),
    ("float128", lambda: np.zeros(2, dtype=np.longdouble), "float128"),
    ("torch_sparse_3d", lambda: torch.ones(2, 2, 2).to_sparse(), "2-d"),
    ("torch_meta", lambda: torch.empty(3, device="meta"), "meta"),
]


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize(
    ("make", "said"), [(m, s) for _, m, s in BAD_VALUES], ids=[i for i, _, _ in BAD_VALUES]
)
def test_unsupported_type(mspool: matspool.Spool, root: Path, make: Callable[[], Any], said: str) -> None:
    with pytest.raises(matspool.UnsupportedTypeError) as ei:
        mspool.save(root / "x.mat", {"fine": np.ones(2), "bad": make()})
    assert isinstance(ei.value, TypeError)
    msg = str(ei.value)
    assert "'bad'" in msg or "'bad{" in msg or "'bad(" in msg, msg  # names the variable (or element)
    assert said in msg, msg  # and what was wrong with it
    assert not (root / "x.mat").exists()
    assert mspool.pending == 0
    assert_serves(mspool, root)


# -- bad options ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("format", "v4"),
        ("format", "V5"),
        ("format", "7.4"),
        ("format", None),
        ("format", ["v5"]),
        ("layout", "chw"),
        ("layout", "column"),
        ("layout", None),
        ("oned_as", "col"),
        ("oned_as", "rows"),
        ("oned_as", 1),
    ],
)
def test_bad_option_value_error(mspool: matspool.Spool, root: Path, option: str, value: Any) -> None:
    with pytest.raises(ValueError) as ei:
        mspool.save(root / "x.mat", {"x": np.ones(3)}, **{option: value})
    msg = str(ei.value)
    assert option in msg and repr(value) in msg, msg
    assert mspool.pending == 0
    assert_serves(mspool, root)


@pytest.mark.parametrize("variables", [{}, None, [("x", 1.0)], "x", 1.0], ids=repr)
def test_variables_must_be_a_nonempty_mapping(mspool: matspool.Spool, root: Path, variables: Any) -> None:
    with pytest.raises(TypeError, match="non-empty mapping"):
        mspool.save(root / "x.mat", variables)
    assert_serves(mspool, root)


def test_fsync_must_be_bool(mspool: matspool.Spool, root: Path) -> None:
    with pytest.raises(TypeError, match="fsync"):
        mspool.save(root / "x.mat", {"x": 1.0}, fsync="yes")
    assert_serves(mspool, root)


@pytest.mark.parametrize(
    ("kwargs", "said"),
    [
        ({"on_full": "drop"}, "on_full"),
        ({"timeout": -1}, "timeout"),
    ],
)
def test_bad_spool_arguments(mdaemon: DaemonProc, kwargs: dict[str, Any], said: str) -> None:
    before = set(glob.glob(f"/dev/shm/matspool-{os.getpid()}-*"))
    with pytest.raises(ValueError, match=said):
        matspool.Spool(mdaemon.endpoint, ring_bytes=1 << 16, **kwargs)
    assert set(glob.glob(f"/dev/shm/matspool-{os.getpid()}-*")) == before  # no ring left behind


# -- paths ----------------------------------------------------------------------------------
def _expect_future_error(fut: Future, cls: type[BaseException]) -> BaseException:
    err = fut.exception(timeout=15)
    assert isinstance(err, cls), repr(err)
    return err


def test_path_outside_root_absolute(mspool: matspool.Spool, root: Path, outside: Path) -> None:
    target = outside / "x.mat"
    err = _expect_future_error(mspool.save(target, {"x": 1.0}), matspool.PathNotAllowedError)
    assert isinstance(err, PermissionError)
    assert str(target) in str(err) and "root" in str(err)
    assert list(outside.iterdir()) == []
    assert_serves(mspool, root)


def test_path_outside_root_dotdot(
    mspool: matspool.Spool, mdaemon: DaemonProc, root: Path, outside: Path
) -> None:
    rel = os.path.relpath(outside, root)
    assert rel.startswith("..")
    target = f"{root}/{rel}/x.mat"
    err = _expect_future_error(mspool.save(target, {"x": 1.0}), matspool.PathNotAllowedError)
    assert "outside the daemon's roots" in str(err)
    assert list(outside.iterdir()) == []
    assert_serves(mspool, root)


def test_path_through_symlinked_directory(mspool: matspool.Spool, root: Path, outside: Path) -> None:
    (root / "link").symlink_to(outside, target_is_directory=True)
    target = root / "link" / "x.mat"
    err = _expect_future_error(mspool.save(target, {"x": 1.0}), matspool.PathNotAllowedError)
    assert str(target) in str(err)
    assert list(outside.iterdir()) == []
    # deeper, and via a symlink to a parent of the root
    (root / "up").symlink_to(root.parent.parent, target_is_directory=True)
    err = _expect_future_error(mspool.save(root / "up" / "y.mat", {"x": 1.0}), matspool.PathNotAllowedError)
    assert list(outside.iterdir()) == []
    assert not (root.parent.parent / "y.mat").exists()
    assert_serves(mspool, root)


def test_directory_swapped_for_a_symlink_after_a_save(
    mspool: matspool.Spool, root: Path, outside: Path
) -> None:
    """The daemon remembers directories it has checked; one replaced by a symlink leading
    out of the root (the directory itself, or the link a client wrote through) is checked
    again, not trusted."""
    d = root / "swapped"
    d.mkdir()
    mspool.save(d / "a.mat", {"x": 1.0}, format="v5").result(10)
    os.rename(d, root / "swapped-away")
    d.symlink_to(outside, target_is_directory=True)
    err = _expect_future_error(mspool.save(d / "b.mat", {"x": 2.0}), matspool.PathNotAllowedError)
    assert str(d / "b.mat") in str(err)
    assert list(outside.iterdir()) == []

    # a client path through a link inside the root, then the link's target made a symlink out
    (root / "real").mkdir()
    (root / "via").symlink_to(root / "real", target_is_directory=True)
    mspool.save(root / "via" / "a.mat", {"x": 1.0}, format="v7.3").result(10)
    os.rename(root / "real", root / "real-moved")
    (root / "real").symlink_to(outside, target_is_directory=True)
    (root / "via").unlink()
    (root / "via").symlink_to(root / "real-moved", target_is_directory=True)
    mspool.save(root / "via" / "b.mat", {"x": 3.0}, format="v5").result(10)
    assert list(outside.iterdir()) == []
    assert scipy.io.loadmat(root / "real-moved" / "b.mat")["x"][0, 0] == 3.0
    assert_serves(mspool, root)


def test_symlink_at_the_final_name_is_replaced_not_followed(
    mspool: matspool.Spool, root: Path, outside: Path
) -> None:
    victim = outside / "victim.txt"
    victim.write_bytes(b"precious")
    (root / "evil.mat").symlink_to(victim)
    mspool.save(root / "evil.mat", {"x": 2.0}, format="v5").result(10)
    assert victim.read_bytes() == b"precious"
    assert not (root / "evil.mat").is_symlink()
    assert scipy.io.loadmat(root / "evil.mat")["x"][0, 0] == 2.0
    assert sorted(p.name for p in outside.iterdir()) == ["victim.txt"]


def test_nonexistent_directory(mspool: matspool.Spool, root: Path) -> None:
    target = root / "no" / "such" / "dir" / "x.mat"
    err = _expect_future_error(mspool.save(target, {"x": 1.0}), matspool.WriteFailed)
    assert isinstance(err, OSError)
    assert str(target) in str(err) and "does not exist" in str(err)
    assert not (root / "no").exists()
    no_tmp_files(root)
    assert_serves(mspool, root)


def test_path_is_a_directory(mspool: matspool.Spool, root: Path) -> None:
    (root / "d.mat").mkdir()
    err = _expect_future_error(mspool.save(root / "d.mat", {"x": 1.0}), matspool.WriteFailed)
    assert "directory" in str(err) and str(root / "d.mat") in str(err)
    assert (root / "d.mat").is_dir()
    no_tmp_files(root)
    assert_serves(mspool, root)


def test_unwritable_directory(mspool: matspool.Spool, root: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions")
    ro = root / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        err = _expect_future_error(mspool.save(ro / "x.mat", {"x": 1.0}), matspool.WriteFailed)
        assert str(ro / "x.mat") in str(err)
    finally:
        ro.chmod(0o700)
    assert list(ro.iterdir()) == []
    assert_serves(mspool, root)


def test_path_with_nul_is_refused(mspool: matspool.Spool, root: Path) -> None:
    with pytest.raises(ValueError, match="NUL"):
        mspool.save(f"{root}/a\x00b.mat", {"x": 1.0}).result(10)
    assert list(root.iterdir()) == []
    assert_serves(mspool, root)


# -- sizes --------------------------------------------------------------------------------
def test_payload_that_cannot_be_split_small_enough(mdaemon: DaemonProc, root: Path) -> None:
    """Saves larger than the ring travel in slabs (test_pieces.py); what cannot be cut into
    slabs of at most half the ring is refused at once, with the size it would need."""
    with matspool.Spool(mdaemon.endpoint, ring_bytes=1 << 16, timeout=30) as s:
        t0 = time.monotonic()
        with pytest.raises(matspool.PayloadTooLarge) as ei:
            s.save(root / "big.mat", {"x": np.zeros((1 << 14, 2))})  # 2 columns of 128 KiB
        assert time.monotonic() - t0 < 1.0  # at once, even with on_full="block"
        assert isinstance(ei.value, ValueError)
        assert "ring_bytes" in str(ei.value) and str(1 << 17) in str(ei.value)
        with pytest.raises(matspool.PayloadTooLarge, match="compressed"):
            s.save(root / "big.mat", {"x": np.zeros(1 << 15)}, compress=True)
        assert s.pending == 0
        assert not (root / "big.mat").exists()
        assert_serves(s, root)


def _huge_float64() -> np.ndarray:
    x = np.broadcast_to(np.zeros((1, 1)), (1 << 14, 1 << 14))  # 2 GiB as float64, 8 bytes real
    assert x.strides == (0, 0)
    return x


def test_v5_variable_over_2gib_raises_before_any_bytes_move(mspool: matspool.Spool, root: Path) -> None:
    huge = _huge_float64()
    tracemalloc.start()
    try:
        with pytest.raises(matspool.FormatLimitError) as ei:
            mspool.save(root / "x.mat", {"small": np.ones(3), "huge": huge}, format="v5")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"save() allocated {peak} bytes checking a broadcast array"
    assert isinstance(ei.value, ValueError)
    msg = str(ei.value)
    assert "'huge'" in msg and str(2**31) in msg and "v7.3" in msg
    assert mspool.pending == 0 and mspool._ring.used == 0  # nothing reserved, nothing copied
    assert not (root / "x.mat").exists()
    assert_serves(mspool, root)


def test_v5_limit_with_an_expanded_torch_tensor(mspool: matspool.Spool, root: Path) -> None:
    huge = torch.zeros(1, 1, dtype=torch.float32).expand(1 << 15, 1 << 14)  # 2 GiB, no storage
    assert huge.stride() == (0, 0)
    with pytest.raises(matspool.FormatLimitError, match="'t'"):
        mspool.save(root / "x.mat", {"t": huge}, format="v5")
    assert mspool._ring.used == 0
    assert_serves(mspool, root)


def test_v5_dimension_over_int32(mspool: matspool.Spool, root: Path) -> None:
    empty = np.zeros((2**31, 0), dtype=np.uint8)  # 0 bytes, but a dimension v5 cannot store
    with pytest.raises(matspool.FormatLimitError, match="dimension"):
        mspool.save(root / "x.mat", {"e": empty}, format="v5")
    assert_serves(mspool, root)


# format='auto' with a variable over 2 GiB: tests/test_pieces.py writes one for real


# -- a daemon that accepts but never writes -----------------------------------------------------
@pytest.fixture
def fake(tmp_path: Path) -> Iterator[ZmqFake]:
    """A daemon that accepts every WRITE but never writes: tests answer for it."""
    f = ZmqFake(FakeDaemon(hold=True), f"ipc://{tmp_path}/fake.sock")
    yield f
    f.close()


def _wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def test_ring_full_raise(fake: ZmqFake, tmp_path: Path) -> None:
    with matspool.Spool(fake.endpoint, ring_bytes=1 << 20, on_full="raise", timeout=30) as s:
        first = s.save(tmp_path / "a.mat", {"x": np.zeros(600_000, np.uint8)})
        _wait_for(lambda: fake.daemon.n_writes() == 1)
        t0 = time.monotonic()
        with pytest.raises(matspool.SpoolFull) as ei:
            s.save(tmp_path / "b.mat", {"x": np.zeros(600_000, np.uint8)})
        assert time.monotonic() - t0 < 0.5
        assert isinstance(ei.value, BufferError)
        assert "ring full" in str(ei.value) and "600000" in str(ei.value)
        assert s.pending == 1 and not first.done()
        # a small save still fits beside the one in flight
        small = s.save(tmp_path / "c.mat", {"x": np.zeros(1000, np.uint8)})
        _wait_for(lambda: fake.daemon.n_writes() == 2)
        # once the daemon acknowledges, the space comes back
        fake.reply(msgs.Done(((fake.daemon.writes[0].seq, 1),)))
        assert first.result(5).path == str(tmp_path / "a.mat")
        again = s.save(tmp_path / "b.mat", {"x": np.zeros(600_000, np.uint8)})
        _wait_for(lambda: fake.daemon.n_writes() == 3)
        fake.reply(msgs.Done(((fake.daemon.writes[1].seq, 1),)))
        fake.reply(msgs.Done(((fake.daemon.writes[2].seq, 1),)))
        small.result(5)
        again.result(5)
        assert s.pending == 0


def test_ring_full_block_times_out(fake: ZmqFake, tmp_path: Path) -> None:
    with matspool.Spool(fake.endpoint, ring_bytes=1 << 20, on_full="block", timeout=0.5) as s:
        s.save(tmp_path / "a.mat", {"x": np.zeros(600_000, np.uint8)})
        t0 = time.monotonic()
        with pytest.raises(matspool.SpoolFull, match=r"after waiting 0\.5 s"):
            s.save(tmp_path / "b.mat", {"x": np.zeros(600_000, np.uint8)})
        waited = time.monotonic() - t0
        assert 0.45 <= waited < 2.5, waited
        _wait_for(lambda: fake.daemon.n_writes() == 1)
        fake.reply(msgs.Done(((fake.daemon.writes[0].seq, 1),)))
        _wait_for(lambda: s.pending == 0)
        s.save(tmp_path / "b.mat", {"x": np.zeros(600_000, np.uint8)})  # fits again
        _wait_for(lambda: fake.daemon.n_writes() == 2)
        fake.reply(msgs.Done(((fake.daemon.writes[1].seq, 1),)))
        s.flush(5)


def test_ring_full_block_waits_for_space(fake: ZmqFake, tmp_path: Path) -> None:
    with matspool.Spool(fake.endpoint, ring_bytes=1 << 20, on_full="block", timeout=10) as s:
        s.save(tmp_path / "a.mat", {"x": np.zeros(600_000, np.uint8)})
        _wait_for(lambda: fake.daemon.n_writes() == 1)
        threading.Timer(0.3, fake.reply, [msgs.Done(((fake.daemon.writes[0].seq, 1),))]).start()
        t0 = time.monotonic()
        s.save(tmp_path / "b.mat", {"x": np.zeros(600_000, np.uint8)})
        assert 0.2 <= time.monotonic() - t0 < 5
        _wait_for(lambda: fake.daemon.n_writes() == 2)
        fake.reply(msgs.Done(((fake.daemon.writes[1].seq, 1),)))
        s.flush(5)


def test_ring_full_raise_with_a_stopped_real_daemon(daemon: DaemonProc) -> None:
    with matspool.Spool(daemon.endpoint, ring_bytes=1 << 20, on_full="raise", timeout=30) as s:
        s.save(daemon.root / "warm.mat", {"x": 1.0}).result(10)
        os.kill(daemon.proc.pid, signal.SIGSTOP)
        try:
            a = np.arange(70_000, dtype=np.float64)  # 560 KB
            first = s.save(daemon.root / "a.mat", {"a": a})
            with pytest.raises(matspool.SpoolFull):
                s.save(daemon.root / "b.mat", {"b": a})
        finally:
            os.kill(daemon.proc.pid, signal.SIGCONT)
        assert first.result(10).format == "v5"
        s.save(daemon.root / "b.mat", {"b": a + 1}).result(10)
        np.testing.assert_array_equal(scipy.io.loadmat(daemon.root / "a.mat")["a"], a[None, :])
        np.testing.assert_array_equal(scipy.io.loadmat(daemon.root / "b.mat")["b"], a[None, :] + 1)
        no_tmp_files(daemon.root)


# -- flush -----------------------------------------------------------------------------------
def drain(spool: matspool.Spool) -> None:
    """Consume failures earlier tests left for flush() to report."""
    try:
        spool.flush(10)
    except matspool.FlushError:
        pass
    spool.flush(10)


def test_flush_raises_flush_error_for_a_failed_save(mspool: matspool.Spool, root: Path) -> None:
    drain(mspool)
    good = mspool.save(root / "good.mat", {"x": 1.0})
    bad = mspool.save(root / "missing" / "bad.mat", {"x": 1.0})
    bad.exception(10)  # the failure has arrived before flush() is called: still reported
    with pytest.raises(matspool.FlushError) as ei:
        mspool.flush(10)
    assert isinstance(ei.value, MatspoolError)
    assert len(ei.value.errors) == 1
    assert isinstance(ei.value.errors[0], matspool.WriteFailed)
    assert ei.value.errors[0] is bad.exception()
    assert "missing" in str(ei.value)
    assert good.result().path == str(root / "good.mat")
    mspool.flush(10)  # reported once
    assert_serves(mspool, root)


def test_flush_collects_every_failure(mspool: matspool.Spool, root: Path, outside: Path) -> None:
    drain(mspool)
    futs = [
        mspool.save(root / "missing" / "a.mat", {"x": 1.0}),
        mspool.save(root / "ok.mat", {"x": 1.0}),
        mspool.save(outside / "b.mat", {"x": 1.0}),
    ]
    with pytest.raises(matspool.FlushError) as ei:
        mspool.flush(10)
    kinds = sorted(type(e).__name__ for e in ei.value.errors)
    assert kinds == ["PathNotAllowedError", "WriteFailed"]
    assert futs[1].exception() is None
    assert_serves(mspool, root)


def test_flush_timeout_when_a_save_is_stuck(fake: ZmqFake, tmp_path: Path) -> None:
    s = matspool.Spool(fake.endpoint, ring_bytes=1 << 20, timeout=30)
    try:
        fut = s.save(tmp_path / "a.mat", {"x": 1.0})
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="1 of 1 saves still pending"):
            s.flush(timeout=0.3)
        assert 0.25 <= time.monotonic() - t0 < 3
        assert not fut.done()
    finally:
        with pytest.raises(matspool.FlushError, match=r"a\.mat: SpoolClosed"):
            s.close(timeout=0.2)  # the save it failed was never looked at
    assert isinstance(fut.exception(0), matspool.SpoolClosed)


def test_err_from_the_daemon_maps_to_the_error_class(fake: ZmqFake, tmp_path: Path) -> None:
    with matspool.Spool(fake.endpoint, ring_bytes=1 << 20, timeout=30) as s:
        futs = [s.save(tmp_path / f"{i}.mat", {"x": 1.0}) for i in range(3)]
        _wait_for(lambda: fake.daemon.n_writes() == 3)
        seqs = [w.seq for w in fake.daemon.writes]
        fake.reply(msgs.Err(seqs[0], "write_failed", "disk full"))
        fake.reply(msgs.Err(seqs[1], "no_such_code", "odd"))
        fake.reply(msgs.Done(((seqs[2], 7),)))
        assert isinstance(futs[0].exception(5), matspool.WriteFailed)
        assert str(futs[0].exception()) == "disk full"
        assert type(futs[1].exception(5)) is MatspoolError
        assert futs[2].result(5).nbytes == 7
        assert s._ring.used == 0


def test_one_done_answers_several_saves(fake: ZmqFake, tmp_path: Path) -> None:
    with matspool.Spool(fake.endpoint, ring_bytes=1 << 20, timeout=30) as s:
        futs = [s.save(tmp_path / f"{i}.mat", {"x": float(i)}) for i in range(4)]
        _wait_for(lambda: fake.daemon.n_writes() == 4)
        seqs = [w.seq for w in fake.daemon.writes]
        fake.reply(msgs.Done(((seqs[2], 30), (seqs[0], 10), (seqs[3], 40))))
        assert [futs[i].result(5).nbytes for i in (0, 2, 3)] == [10, 30, 40]
        assert not futs[1].done()
        fake.reply(msgs.Done(((seqs[1], 20),)))
        assert futs[1].result(5).nbytes == 20
        assert s._ring.used == 0


@pytest.mark.parametrize(
    "bad_reply",
    [
        {"op": "DONE", "seq": [0], "nbytes": 1},  # unhashable seq
        {"op": "DONE", "seq": 0, "nbytes": "many"},
        {"op": "DONE", "seq": 0, "nbytes": None},
        {"op": "WELCOME!"},
        {"op": "DONE"},
        {"op": "DONE", "done": "all"},
        {"op": "DONE", "done": [[0]]},
        {"op": "DONE", "done": [[[0], 1]]},
        {"op": "DONE", "done": [None]},
    ],
    ids=[
        "seq_list",
        "nbytes_str",
        "nbytes_null",
        "unknown_op",
        "no_seq",
        "done_str",
        "done_short",
        "done_seq_list",
        "done_null",
    ],
)
def test_client_survives_malformed_replies(fake: ZmqFake, tmp_path: Path, bad_reply: dict[str, Any]) -> None:
    with matspool.Spool(fake.endpoint, ring_bytes=1 << 20, timeout=30) as s:
        fut = s.save(tmp_path / "a.mat", {"x": 1.0})
        _wait_for(lambda: fake.daemon.n_writes() == 1)
        fake.reply(bad_reply)
        time.sleep(0.2)
        assert s._link._io is not None and s._link._io.is_alive(), "a bad reply ended the client's I/O thread"
        fake.reply(msgs.Done(((fake.daemon.writes[0].seq, 3),)))  # the real answer still counts
        assert fut.result(5).nbytes == 3
        s.flush(5)


# -- the daemon goes away ----------------------------------------------------------------------
def test_no_daemon_listening(tmp_path: Path) -> None:
    before = set(glob.glob(f"/dev/shm/matspool-{os.getpid()}-*"))
    endpoint = f"ipc://{tmp_path}/nobody.sock"
    t0 = time.monotonic()
    with pytest.raises(matspool.DaemonUnavailable) as ei:
        matspool.Spool(endpoint, ring_bytes=1 << 16, connect_timeout=1)
    assert time.monotonic() - t0 < 8
    assert isinstance(ei.value, ConnectionError)
    assert endpoint in str(ei.value)
    assert set(glob.glob(f"/dev/shm/matspool-{os.getpid()}-*")) == before  # ring unlinked


def test_daemon_killed_while_a_save_is_pending(daemon: DaemonProc) -> None:
    timeout = 3.0
    with matspool.Spool(daemon.endpoint, ring_bytes=1 << 20, timeout=timeout) as s:
        s.save(daemon.root / "warm.mat", {"x": 1.0}).result(10)
        os.kill(daemon.proc.pid, signal.SIGSTOP)  # the WRITE cannot be answered...
        t0 = time.monotonic()
        fut = s.save(daemon.root / "x.mat", {"x": np.ones(100)})
        os.kill(daemon.proc.pid, signal.SIGKILL)  # ...and then never will be
        daemon.proc.wait(10)
        err = fut.exception(timeout=timeout + 5)
        elapsed = time.monotonic() - t0
        assert isinstance(err, matspool.DaemonUnavailable), repr(err)
        assert daemon.endpoint in str(err)
        assert elapsed < timeout + 2 * s._heartbeat + 0.5, elapsed
        assert s.pending == 0 and s._ring.used == 0
        with pytest.raises(matspool.FlushError):
            s.flush(1)
    assert not (daemon.root / "x.mat").exists()


def test_save_after_close(mdaemon: DaemonProc, root: Path) -> None:
    s = matspool.Spool(mdaemon.endpoint, ring_bytes=1 << 16)
    s.save(root / "a.mat", {"x": 1.0}).result(10)
    s.close()
    s.close()  # idempotent
    with pytest.raises(matspool.SpoolClosed) as ei:
        s.save(root / "b.mat", {"x": 1.0})
    assert isinstance(ei.value, RuntimeError)
    assert "closed" in str(ei.value)
    assert not (root / "b.mat").exists()
    with matspool.Spool(mdaemon.endpoint, ring_bytes=1 << 16) as s2:
        assert_serves(s2, root, mdaemon)


# -- hostile raw messages -------------------------------------------------------------------------
class Raw:
    """A bare DEALER on the daemon's socket."""

    def __init__(self, endpoint: str) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)

    def ask(self, frames: list[bytes], wait: float = 5.0) -> dict[str, Any] | None:
        self.sock.send_multipart(frames)
        if not self.sock.poll(int(wait * 1000)):
            return None
        reply = self.sock.recv_multipart()
        assert reply[0] == TAG and len(reply) == 2
        return json.loads(reply[1])

    def send(self, msg: dict[str, Any], wait: float = 5.0) -> dict[str, Any] | None:
        return self.ask([TAG, json.dumps(msg).encode()], wait)

    def close(self) -> None:
        self.sock.close(linger=0)


@pytest.fixture
def raw(mdaemon: DaemonProc) -> Iterator[Raw]:
    r = Raw(mdaemon.endpoint)
    yield r
    r.close()


def assert_daemon_serves(daemon: DaemonProc, spool: matspool.Spool, directory: Path) -> None:
    assert daemon.alive()
    r = Raw(daemon.endpoint)
    try:
        assert (r.send({"op": "PING"}) or {}).get("op") == "PONG"
    finally:
        r.close()
    assert_serves(spool, directory, daemon)


def assert_err(reply: dict[str, Any] | None, code: str, seq: int = -1) -> None:
    assert reply is not None, "no answer"
    assert reply["op"] == "ERR", reply
    assert reply["code"] == code, reply
    assert reply["seq"] == seq, reply
    assert isinstance(reply["message"], str) and reply["message"]


DEEP = b"[" * 100_000 + b"]" * 100_000
GARBAGE: list[tuple[str, list[bytes]]] = [
    ("one_frame", [b"garbage"]),
    ("empty_frame", [b""]),
    ("three_frames", [TAG, b'{"op":"PING"}', b"extra"]),
    ("binary", [b"\x00\xff\x13", b"\x89PNG\r\n\x1a\n"]),
    ("wrong_tag", [b"matspool/2", b'{"op":"PING"}']),
    ("tag_case", [b"MATSPOOL/1", b'{"op":"PING"}']),
    ("not_json", [TAG, b"not json"]),
    ("bad_utf8", [TAG, b'{"op":"\xff\xfe"}']),
    ("truncated_json", [TAG, b'{"op":"PING"']),
    ("json_array", [TAG, b'["PING"]']),
    ("json_string", [TAG, b'"PING"']),
    ("json_null", [TAG, b"null"]),
    ("no_op", [TAG, b'{"seq":1}']),
    ("op_not_str", [TAG, b'{"op":5}']),
    ("unknown_op", [TAG, b'{"op":"FROB"}']),
    ("lowercase_op", [TAG, b'{"op":"ping"}']),
    ("long_unknown_op", [TAG, json.dumps({"op": "X" * 100_000}).encode()]),
    ("deeply_nested", [TAG, DEEP]),
    ("huge_int", [TAG, b'{"op":"WRITE","seq":' + b"9" * 5000 + b"}"]),
    ("batch_not_list", [TAG, b'{"op":"BATCH","msgs":{"op":"WRITE"}}']),
    ("batch_empty", [TAG, b'{"op":"BATCH","msgs":[]}']),
    ("batch_of_pings", [TAG, b'{"op":"BATCH","msgs":[{"op":"PING"}]}']),
    ("batch_in_batch", [TAG, b'{"op":"BATCH","msgs":[{"op":"BATCH","msgs":[]}]}']),
    ("batch_of_strings", [TAG, b'{"op":"BATCH","msgs":["WRITE"]}']),
    ("batch_too_long", [TAG, json.dumps({"op": "BATCH", "msgs": [{"op": "WRITE"}] * 4097}).encode()]),
    (
        "write_before_hello",
        [
            TAG,
            json.dumps(
                {
                    "op": "WRITE",
                    "seq": 1,
                    "path": "/tmp/x.mat",
                    "format": "v5",
                    "fsync": False,
                    "vars": [{"name": "x", "dtype": "<f8", "dims": [1, 1], "offset": 0, "nbytes": 8}],
                }
            ).encode(),
        ],
    ),
]


@pytest.mark.parametrize("frames", [f for _, f in GARBAGE], ids=[i for i, _ in GARBAGE])
def test_garbage_is_answered_with_err(
    mdaemon: DaemonProc, mspool: matspool.Spool, raw: Raw, root: Path, frames: list[bytes]
) -> None:
    reply = raw.ask(frames)
    if frames[-1].startswith(b'{"op": "WRITE", "seq": 1'):  # well formed, but no HELLO yet
        assert_err(reply, "unknown_client", seq=1)
        assert "HELLO" in reply["message"]
    else:
        assert_err(reply, "protocol")
    assert len(reply["message"]) < 2000  # the echo of a bad message is bounded
    # the same socket still works
    assert (raw.send({"op": "PING"}) or {}).get("op") == "PONG"
    assert_daemon_serves(mdaemon, mspool, root)


def test_oversized_message_is_dropped(
    mdaemon: DaemonProc, mspool: matspool.Spool, raw: Raw, root: Path
) -> None:
    reply = raw.ask([TAG, b" " * (proto.MAX_MESSAGE_BYTES + 8192)], wait=1.0)
    if reply is not None:
        assert_err(reply, "protocol")
    assert_daemon_serves(mdaemon, mspool, root)


def test_a_flood_of_garbage(mdaemon: DaemonProc, mspool: matspool.Spool, raw: Raw, root: Path) -> None:
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(1, 4))
        raw.sock.send_multipart([rng.bytes(int(rng.integers(0, 64))) for _ in range(n)])
    answered = 0
    deadline = time.monotonic() + 20
    while answered < 300 and time.monotonic() < deadline:
        if raw.sock.poll(200):
            raw.sock.recv_multipart()
            answered += 1
    assert answered == 300
    assert not raw.sock.poll(200)  # one answer each, no more
    assert_daemon_serves(mdaemon, mspool, root)


def _hello(of: Ring | None = None, **over: Any) -> dict[str, Any]:
    msg: dict[str, Any] = {
        "op": "HELLO",
        "ring": of.name if of else "matspool-x",
        "ring_bytes": of.size if of else 4096,
        "pid": os.getpid(),
    }
    if of is not None and of.kind == "memfd":
        msg["fd"] = of.fd
    msg.update(over)
    return msg


@pytest.fixture
def ring() -> Iterator[Ring]:
    r = Ring(1 << 20)
    yield r
    r.close()


@pytest.fixture
def shm_junk() -> Iterator[list[str]]:
    made: list[str] = []
    yield made
    for p in made:
        if os.path.islink(p) or os.path.isfile(p) or stat.S_ISFIFO(os.lstat(p).st_mode):
            os.unlink(p)
        elif os.path.isdir(p):
            os.rmdir(p)


BAD_HELLOS: list[tuple[str, dict[str, Any], str]] = [
    ("traversal", {"ring": "../../etc/passwd"}, "ring"),
    ("traversal_prefixed", {"ring": "matspool-/../../etc/passwd"}, "ring"),
    ("absolute", {"ring": "/dev/shm/matspool-x"}, "ring"),
    ("no_prefix", {"ring": "psm_123"}, "ring"),
    ("nonexistent", {"ring": "matspool-does-not-exist-0"}, "ring"),
    ("empty_name", {"ring": ""}, "ring"),
    ("nul_in_name", {"ring": "matspool-a\x00b"}, "ring"),
    ("ring_not_str", {"ring": 5}, "protocol"),
    ("ring_missing", {"ring": None}, "protocol"),
    ("ring_bytes_negative", {"ring_bytes": -1}, "protocol"),
    ("ring_bytes_zero", {"ring_bytes": 0}, "protocol"),
    ("ring_bytes_bool", {"ring_bytes": True}, "protocol"),
    ("ring_bytes_float", {"ring_bytes": 4096.0}, "protocol"),
    ("ring_bytes_str", {"ring_bytes": "4096"}, "protocol"),
    ("ring_bytes_huge", {"ring_bytes": 2**80}, "protocol"),
    ("pid_str", {"pid": "1"}, "protocol"),
    ("pid_bool", {"pid": False}, "protocol"),
]


@pytest.mark.parametrize(
    ("over", "code"), [(o, c) for _, o, c in BAD_HELLOS], ids=[i for i, _, _ in BAD_HELLOS]
)
def test_bad_hello(
    mdaemon: DaemonProc, mspool: matspool.Spool, raw: Raw, root: Path, over: dict[str, Any], code: str
) -> None:
    assert_err(raw.send(_hello(**over)), code)
    assert_daemon_serves(mdaemon, mspool, root)


def test_hello_with_the_wrong_size(
    mdaemon: DaemonProc, mspool: matspool.Spool, raw: Raw, root: Path, ring: Ring
) -> None:
    reply = raw.send(_hello(ring, ring_bytes=ring.size * 2))
    assert_err(reply, "ring")
    assert str(ring.size) in reply["message"]
    assert_daemon_serves(mdaemon, mspool, root)


@pytest.mark.parametrize("kind", ["fifo", "directory", "symlink"])
def test_hello_with_a_ring_that_is_not_a_segment(
    mdaemon: DaemonProc, mspool: matspool.Spool, raw: Raw, root: Path, shm_junk: list[str], kind: str
) -> None:
    name = f"matspool-{os.getpid()}-junk{kind}"
    path = f"/dev/shm/{name}"
    shm_junk.append(path)
    if kind == "fifo":
        os.mkfifo(path, 0o600)  # opening it for reading would block the daemon forever
    elif kind == "directory":
        os.mkdir(path, 0o700)
    else:
        os.symlink("/etc/passwd", path)  # never followed
    size = 4096 if kind != "symlink" else os.path.getsize("/etc/passwd")
    assert_err(raw.send(_hello(ring_bytes=size, ring=name), wait=5), "ring")
    assert_daemon_serves(mdaemon, mspool, root)


class Writer:
    """A raw client with a real ring, saying HELLO itself."""

    def __init__(self, raw: Raw, ring: Ring) -> None:
        self.raw, self.ring = raw, ring
        assert raw.send(_hello(ring))["op"] == "WELCOME"

    def write(
        self,
        path: str,
        *,
        seq: int = 7,
        fmt: str = "v5",
        fsync: bool = False,
        vars: list[dict[str, Any]] | None = None,
        **over: Any,
    ) -> dict[str, Any] | None:
        msg = {
            "op": "WRITE",
            "seq": seq,
            "path": path,
            "format": fmt,
            "fsync": fsync,
            "vars": vars if vars is not None else [var()],
        }
        msg.update(over)
        return self.raw.send(msg)


def var(**over: Any) -> dict[str, Any]:
    v: dict[str, Any] = {"name": "x", "dtype": "<f8", "dims": [2, 3], "offset": 0, "nbytes": 48}
    v.update(over)
    return v


RING = 1 << 20
BAD_WRITES: list[tuple[str, dict[str, Any], str]] = [
    ("offset_past_end", {"vars": [var(offset=RING + 64, nbytes=0, dims=[0, 0])]}, "protocol"),
    ("offset_way_past_end", {"vars": [var(offset=2**62)]}, "protocol"),
    ("range_past_end", {"vars": [var(offset=RING - 16)]}, "protocol"),
    ("nbytes_past_end", {"vars": [var(dims=[RING // 8 + 8, 1], nbytes=RING + 64)]}, "protocol"),
    ("dims_nbytes_mismatch", {"vars": [var(nbytes=40)]}, "protocol"),
    ("dims_overflow", {"vars": [var(dims=[2**62, 2**62, 2**62], nbytes=48)]}, "protocol"),
    ("unknown_dtype", {"vars": [var(dtype="float64")]}, "protocol"),
    ("big_endian_dtype", {"vars": [var(dtype=">f8")]}, "protocol"),
    ("object_dtype", {"vars": [var(dtype="|O")]}, "protocol"),
    ("dtype_list", {"vars": [var(dtype=["<f8"])]}, "protocol"),
    ("dtype_object", {"vars": [var(dtype={"<f8": 1})]}, "protocol"),
    ("negative_offset", {"vars": [var(offset=-64)]}, "protocol"),
    ("negative_nbytes", {"vars": [var(nbytes=-48)]}, "protocol"),
    ("negative_dim", {"vars": [var(dims=[-2, -3])]}, "protocol"),
    ("bool_offset", {"vars": [var(offset=False)]}, "protocol"),
    ("bool_nbytes", {"vars": [var(dims=[1, 1], dtype="|b1", nbytes=True)]}, "protocol"),
    ("bool_dim", {"vars": [var(dims=[True, 1], nbytes=8)]}, "protocol"),
    ("float_offset", {"vars": [var(offset=0.0)]}, "protocol"),
    ("str_nbytes", {"vars": [var(nbytes="48")]}, "protocol"),
    ("misaligned", {"vars": [var(offset=3)]}, "protocol"),
    ("dims_one", {"vars": [var(dims=[6], nbytes=48)]}, "protocol"),
    ("dims_too_many", {"vars": [var(dims=[1] * 33, nbytes=8)]}, "protocol"),
    ("dims_not_list", {"vars": [var(dims="2x3")]}, "protocol"),
    ("bad_var_name", {"vars": [var(name="1x")]}, "invalid_variable"),
    ("keyword_var_name", {"vars": [var(name="end")]}, "invalid_variable"),
    ("var_name_not_str", {"vars": [var(name=3)]}, "invalid_variable"),
    ("duplicate_names", {"vars": [var(), var(offset=64)]}, "protocol"),
    ("var_not_object", {"vars": [["x", "<f8"]]}, "protocol"),
    ("vars_empty", {"vars": []}, "protocol"),
    ("vars_not_list", {"vars": {"x": 1}}, "protocol"),
    ("format_v6", {"fmt": "v6"}, "protocol"),
    ("format_list", {"fmt": ["v5"]}, "protocol"),
    ("fsync_str", {"fsync": "yes"}, "protocol"),
    ("fsync_int", {"fsync": 1}, "protocol"),
    ("path_nul", {"path": "{root}/a\x00b.mat"}, "protocol"),
    ("path_empty", {"path": ""}, "protocol"),
    ("path_not_str", {"path": ["{root}/a.mat"]}, "protocol"),
    ("path_too_long", {"path": "{root}/" + "a" * 5000}, "protocol"),
    ("path_relative", {"path": "a.mat"}, "path_not_allowed"),
    ("path_outside", {"path": "/tmp/matspool-hostile-x.mat"}, "path_not_allowed"),
    ("path_dotdot", {"path": "{root}/../../../../../../tmp/matspool-hostile-y.mat"}, "path_not_allowed"),
    ("path_root_dir", {"path": "/"}, "write_failed"),
    ("path_is_dir", {"path": "{root}/."}, "write_failed"),
    ("v5_dim_over_int32", {"vars": [var(dtype="|u1", dims=[2**31, 0], nbytes=0)]}, "format_limit"),
]


@pytest.mark.parametrize(
    ("over", "code"), [(o, c) for _, o, c in BAD_WRITES], ids=[i for i, _, _ in BAD_WRITES]
)
def test_bad_write(
    mdaemon: DaemonProc,
    mspool: matspool.Spool,
    raw: Raw,
    root: Path,
    ring: Ring,
    over: dict[str, Any],
    code: str,
) -> None:
    assert ring.size == RING
    w = Writer(raw, ring)
    over = dict(over)
    path = over.pop("path", "{root}/x.mat")
    if isinstance(path, str):
        path = path.replace("{root}", str(root))
    elif isinstance(path, list):
        path = [p.replace("{root}", str(root)) for p in path]
    assert_err(w.write(path, **over), code, seq=7)
    assert list(root.iterdir()) == []
    assert not os.path.exists("/tmp/matspool-hostile-x.mat")
    assert not os.path.exists("/tmp/matspool-hostile-y.mat")
    # the same client, same ring: a good WRITE goes through
    x = np.arange(6, dtype="<f8").reshape(2, 3)
    ring.array[:48] = np.asfortranarray(x).reshape(-1, order="F").view(np.uint8)
    assert w.write(f"{root}/ok.mat", seq=8) == {
        "op": "DONE",
        "seq": 8,
        "nbytes": os.path.getsize(root / "ok.mat"),
    }
    np.testing.assert_array_equal(scipy.io.loadmat(root / "ok.mat")["x"], x)
    assert_daemon_serves(mdaemon, mspool, root)


def test_batch_answers_each_write(
    mdaemon: DaemonProc, mspool: matspool.Spool, raw: Raw, root: Path, ring: Ring
) -> None:
    """A BATCH is its WRITEs one by one: a bad one gets its own ERR, the others are written."""
    Writer(raw, ring)
    x = np.arange(6, dtype="<f8").reshape(2, 3)
    ring.array[:48] = np.asfortranarray(x).reshape(-1, order="F").view(np.uint8)

    def write(seq: int, name: str, **over: Any) -> dict[str, Any]:
        return {
            "op": "WRITE",
            "seq": seq,
            "path": f"{root}/{name}",
            "format": "v5",
            "fsync": False,
            "vars": [var(**over)],
        }

    msgs = [
        write(1, "a.mat"),
        write(2, "b.mat", offset=RING + 8),
        write(3, "c.mat", dtype="float64"),
        write(4, "d.mat"),
        {"op": "WRITE", "seq": 5},
    ]
    raw.sock.send_multipart([TAG, json.dumps({"op": "BATCH", "msgs": msgs}).encode()])
    answers: dict[int, dict[str, Any]] = {}
    while len(answers) < 5:
        assert raw.sock.poll(5000), f"answers so far: {answers}"
        reply = json.loads(raw.sock.recv_multipart()[1])
        for seq, nbytes in reply["done"] if "done" in reply else [[reply["seq"], reply.get("nbytes")]]:
            answers[seq] = {**reply, "seq": seq, "nbytes": nbytes}
    assert {s: a["op"] for s, a in answers.items()} == {1: "DONE", 2: "ERR", 3: "ERR", 4: "DONE", 5: "ERR"}
    assert all(answers[s]["code"] == "protocol" for s in (2, 3, 5))
    assert sorted(p.name for p in root.iterdir()) == ["a.mat", "d.mat"]
    for name in ("a.mat", "d.mat"):
        np.testing.assert_array_equal(scipy.io.loadmat(root / name)["x"], x)
    assert_daemon_serves(mdaemon, mspool, root)


@pytest.mark.parametrize("seq", [-1, True, 1.5, "7", None, 2**64])
def test_bad_seq(
    mdaemon: DaemonProc, mspool: matspool.Spool, raw: Raw, root: Path, ring: Ring, seq: Any
) -> None:
    w = Writer(raw, ring)
    # the reply echoes a seq only if it is a non-negative integer
    echo = seq if type(seq) is int and seq >= 0 else -1
    assert_err(w.write(f"{root}/x.mat", seq=seq), "protocol", seq=echo)
    assert not (root / "x.mat").exists()
    assert_daemon_serves(mdaemon, mspool, root)


def test_write_after_bye_needs_a_new_hello(
    mdaemon: DaemonProc, mspool: matspool.Spool, raw: Raw, root: Path, ring: Ring
) -> None:
    w = Writer(raw, ring)
    raw.sock.send_multipart(proto.encode({"op": "BYE"}))
    reply = w.write(f"{root}/x.mat")
    assert_err(reply, "unknown_client", seq=7)
    assert "HELLO" in reply["message"]
    assert not (root / "x.mat").exists()
    assert_daemon_serves(mdaemon, mspool, root)


def test_ring_truncated_by_its_client(
    mdaemon: DaemonProc, mspool: matspool.Spool, raw: Raw, root: Path
) -> None:
    ring = Ring(1 << 20, kind="shm")  # a memfd ring cannot be truncated at all (test_ring_attacks)
    w = Writer(raw, ring)
    os.truncate(ring.path, 4096)  # reading a mapping past here would be SIGBUS
    reply = w.write(f"{root}/x.mat", vars=[var(offset=8192)])
    assert_err(reply, "ring", seq=7)
    assert "shrank" in reply["message"]
    assert not (root / "x.mat").exists()
    no_tmp_files(root)
    ring.close()
    assert_daemon_serves(mdaemon, mspool, root)


def test_hello_with_a_pid_that_did_not_create_the_ring(
    raw: Raw, ring: Ring, mdaemon: DaemonProc, mspool: matspool.Spool, root: Path
) -> None:
    """Dead-client reaping unlinks rings by pid: a client may not claim another pid's ring.
    (A memfd ring is reached through its pid: another pid's descriptor is not the ring.)"""
    shm = Ring(1 << 20, kind="shm")
    try:
        reply = raw.send(_hello(shm, pid=1))
        assert reply is not None and reply["op"] == "ERR" and reply["code"] == "protocol", reply
        assert "not created by pid 1" in reply["message"]
        assert os.path.exists(shm.path)
    finally:
        shm.close()
    reply = raw.send(_hello(ring, pid=1))
    assert reply is not None and reply["op"] == "ERR" and reply["code"] == "ring", reply
    assert_serves(mspool, root, mdaemon)


def test_bytes_and_bad_paths_fail_at_save(mspool: matspool.Spool, root: Path) -> None:
    fut = mspool.save(os.fsencode(root / "bytes.mat"), {"x": 1.0})  # bytes paths work
    assert fut.result(10).path == str(root / "bytes.mat")
    with pytest.raises(TypeError, match="path must be a str"):
        mspool.save(12, {"x": 1.0})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-empty"):
        mspool.save("", {"x": 1.0})


# -- ERR carries the OS errno of the failure ---------------------------------------------------


@pytest.mark.parametrize("case", ["ENOENT", "ENOSPC_v5", "ENOSPC_v7.3"])
def test_err_carries_the_os_errno(
    mdaemon: DaemonProc, mspool: matspool.Spool, raw: Raw, root: Path, ring: Ring, case: str
) -> None:
    import errno

    w = Writer(raw, ring)
    big = var(dims=[256, 256], nbytes=256 * 256 * 8)  # 512 KiB: more than a 64 KiB disk
    ring.array[: big["nbytes"]] = 1
    if case == "ENOENT":
        reply = w.write(str(root / "no-such-dir" / "x.mat"))
    else:
        with tmpfs(root / "small", "64k"):
            reply = w.write(str(root / "small" / "x.mat"), fmt=case.split("_")[1], vars=[big])
            assert os.listdir(root / "small") == [], "a temporary stayed on the full disk"
    assert_err(reply, "write_failed", seq=7)
    assert reply is not None
    assert reply.get("errno") == getattr(errno, case.split("_")[0]), reply
    assert_daemon_serves(mdaemon, mspool, root)
