"""Attacks on the client's cuts of fixed costs per save (h-csmall): futures read without
their condition, flush()/close() waiting on the newest save first, the ring's allocator
notified only while an alloc waits, the one-save DONE read by a regex, and 2-frame
messages sent copied.

Real daemons (or a fake one answering raw bytes, to play a hostile daemon), files read
back by scipy; every wait is bounded by a watchdog, none is a timing assertion on speed.
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import random
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.io
import zmq
from fakedaemon import FakeDaemon, ZmqFake

import matspool
from matspool import _messages as msgs
from matspool._curve import make_keys

from conftest import DaemonProc, serve_cmd, start_daemon, wait_tcp

WATCHDOG_S = 120.0  # a hang fails the test; no assertion is on speed


def _run_all(targets: list[Callable[[], None]], timeout: float = WATCHDOG_S) -> None:
    """Run ``targets`` on threads; fail if one raises or they do not all end in ``timeout``."""
    errors: list[BaseException] = []

    def guard(target: Callable[[], None]) -> None:
        try:
            target()
        except BaseException as e:  # noqa: BLE001 - reported below, on the test's thread
            errors.append(e)

    threads = [threading.Thread(target=guard, args=(t,), daemon=True) for t in targets]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "watchdog: a thread hung"
    if errors:
        raise errors[0]


def _wait_for(cond: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def _check_file(path: str, expect: dict[str, np.ndarray]) -> None:
    got = scipy.io.loadmat(path)
    for name, value in expect.items():
        np.testing.assert_array_equal(got[name], np.atleast_2d(value))


# -- 1. many readers of the same futures while bursts resolve and fail ----------------------------
@pytest.mark.parametrize("seed", [1, 2])
def test_many_readers_agree_while_bursts_resolve_and_fail(
    daemon: DaemonProc, out_dir: Path, tmp_path: Path, seed: int
) -> None:
    rng = random.Random(seed)
    outside = tmp_path / "outside"
    outside.mkdir()
    saves: list[tuple[cf.Future[Any], str, bool, dict[str, np.ndarray]]] = []
    callbacks: dict[int, int] = {}
    cb_lock = threading.Lock()
    stop = threading.Event()
    seen: dict[int, list[tuple[str, Any]]] = {}

    def on_done(f: cf.Future[Any]) -> None:
        assert f.done()
        with cb_lock:
            callbacks[id(f)] = callbacks.get(id(f), 0) + 1

    def reader(k: int) -> None:
        r = random.Random(seed * 100 + k)
        while True:
            snap = list(saves)
            for fut, _, _, _ in r.sample(snap, len(snap)):
                timeout = r.choice([None, 0, 0.001, 0.05])
                op = r.choice(["result", "exception", "done", "cancel"])
                try:
                    if op == "result":
                        out: tuple[str, Any] = ("result", fut.result(timeout))
                    elif op == "exception":
                        out = ("exception", fut.exception(timeout))
                    elif op == "cancel":
                        assert fut.cancel() is False  # born running: nothing to cancel
                        continue
                    else:
                        d = fut.done()
                        if d:  # once done, the outcome is there without waiting
                            assert fut.exception(0) is not None or fut.result(0) is not None
                        continue
                except cf.TimeoutError:
                    assert timeout is not None
                    continue
                except matspool.MatspoolError as e:
                    assert op == "result"
                    out = ("raised", e)
                seen.setdefault(id(fut), []).append(out)
            if stop.is_set():
                return

    def waiter() -> None:
        while not stop.is_set():
            snap = [f for f, _, _, _ in saves]
            cf.wait(snap, 0.01)
            got = list(cf.as_completed(snap, timeout=WATCHDOG_S))
            assert len(got) == len(set(map(id, got))) == len(snap)

    with matspool.Spool(daemon.endpoint, ring_bytes=1 << 20, timeout=30) as s:

        def saver() -> None:
            try:
                for i in range(240):
                    kind = rng.random()
                    x = np.arange(rng.randint(1, 3000), dtype=np.float64) + i
                    if kind < 0.15:
                        path, ok = str(out_dir / "missing" / f"m{i}.mat"), False
                    elif kind < 0.25:
                        path, ok = str(outside / f"o{i}.mat"), False
                    else:
                        path, ok = str(out_dir / f"g{i}.mat"), True
                    fut = s.save(path, {"x": x}, format="v5")
                    fut.add_done_callback(on_done)
                    saves.append((fut, path, ok, {"x": x}))
                    if i % 40 == 39:
                        time.sleep(0.05)  # bursts
            finally:
                stop.set()

        _run_all([saver, *(lambda k=k: reader(k) for k in range(5)), waiter])
        with pytest.raises(matspool.FlushError):  # the failed ones, since no flush before
            s.flush()
    assert len(saves) == 240
    for fut, path, ok, expect in saves:
        assert fut.done()
        assert callbacks.get(id(fut)) == 1, path  # once, however many read it
        err = fut.exception(0)
        if ok:
            assert err is None, (path, err)
            res = fut.result(0)
            assert res.path == path and res.nbytes == os.path.getsize(path)
            _check_file(path, expect)
        else:
            assert isinstance(err, matspool.MatspoolError), path
            assert not os.path.exists(path)
        for what, value in seen.get(id(fut), []):
            if what == "result":
                assert ok and value is fut.result(0), path
            elif what == "raised":
                assert not ok and value is err, path
            else:
                assert value is err, path


# -- 1b. a stopped daemon, then a killed one: futures fail, never hang, never lie ------------------
def test_stopped_then_killed_daemon_futures_fail_and_stay_failed(tmp_path: Path, out_dir: Path) -> None:
    d = start_daemon(out_dir, tmp_path / "sock")
    try:
        with matspool.Spool(d.endpoint, ring_bytes=4 << 20, timeout=2, heartbeat=0.5) as s:
            warm = [s.save(out_dir / f"w{i}.mat", {"x": np.full(10, float(i))}) for i in range(20)]
            for f in warm:
                f.result(30)
            d.proc.send_signal(signal.SIGSTOP)
            futs = [s.save(out_dir / f"s{i}.mat", {"x": np.full(100, float(i))}) for i in range(100)]
            outcomes: list[BaseException | None] = [None] * len(futs)

            def read(lo: int) -> None:
                for i in range(lo, len(futs), 4):
                    with pytest.raises(matspool.MatspoolError) as ei:
                        futs[i].result()  # no timeout: the link's silence limit fails it
                    outcomes[i] = ei.value

            _run_all([lambda lo=lo: read(lo) for lo in range(4)])
            d.proc.send_signal(signal.SIGCONT)  # late DONEs for saves already failed
            _wait_for(lambda: s.save(out_dir / "probe.mat", {"x": 1.0}).exception(5) is None, 60)
            for i, f in enumerate(futs):
                assert f.exception(0) is outcomes[i]  # a late DONE changes nothing
                with pytest.raises(matspool.MatspoolError):
                    f.result(0)
            # now kill it mid-burst: every future ends, results only for files on disk
            burst = [s.save(out_dir / f"k{i}.mat", {"x": np.full(5000, float(i))}) for i in range(200)]
            d.proc.send_signal(signal.SIGKILL)
            d.proc.wait(10)
            _run_all([lambda: [f.exception() for f in burst]])
            for i, f in enumerate(burst):
                if f.exception(0) is None:
                    assert f.result(0).nbytes == os.path.getsize(out_dir / f"k{i}.mat")
                    _check_file(str(out_dir / f"k{i}.mat"), {"x": np.full(5000, float(i))})
            with pytest.raises(matspool.FlushError):
                s.flush(timeout=WATCHDOG_S)
    finally:
        if d.proc.poll() is None:
            d.proc.send_signal(signal.SIGCONT)
        d.stop()


# -- 2. flush() with saves answered out of order ---------------------------------------------------
@pytest.fixture
def fake(tmp_path: Path) -> Iterator[ZmqFake]:
    """A daemon that accepts every WRITE and answers only when the test says."""
    f = ZmqFake(FakeDaemon(hold=True), f"ipc://{tmp_path}/fake.sock")
    yield f
    f.close()


def test_flush_waits_for_older_saves_answered_after_the_newest(fake: ZmqFake, tmp_path: Path) -> None:
    with matspool.Spool(fake.endpoint, ring_bytes=1 << 20, timeout=60) as s:
        futs = [s.save(tmp_path / f"f{i}.mat", {"x": float(i)}) for i in range(5)]
        _wait_for(lambda: fake.daemon.n_writes() == 5)
        seqs = [w.seq for w in fake.daemon.writes]
        fake.reply(msgs.Done(((seqs[4], 10),)))  # the newest first
        futs[4].result(10)
        with pytest.raises(TimeoutError, match=r"flush: 4 of 4 saves still pending after 0\.3 s"):
            s.flush(timeout=0.3)
        fake.reply(msgs.Done(((seqs[0], 10),)))
        futs[0].result(10)
        with pytest.raises(TimeoutError, match=r"flush: 3 of 3 saves still pending after 0 s"):
            s.flush(timeout=0)
        returned = threading.Event()

        def flusher() -> None:
            with pytest.raises(matspool.FlushError, match="disk on fire"):
                s.flush(timeout=WATCHDOG_S)
            returned.set()

        t = threading.Thread(target=flusher, daemon=True)
        t.start()
        fake.reply(msgs.Done(((seqs[3], 10),)))  # the newest left, then the older ones
        futs[3].result(10)
        time.sleep(0.5)
        assert not returned.is_set()  # saves 1 and 2 are not answered: flush must wait on
        fake.reply(msgs.Done(((seqs[1], 10),)))
        futs[1].result(10)
        time.sleep(0.5)
        assert not returned.is_set()
        fake.reply(msgs.Err(seqs[2], "io", "disk on fire"))
        t.join(WATCHDOG_S)
        assert not t.is_alive()
        assert returned.is_set()  # flush raised the failure; the next one has none left
        assert isinstance(futs[2].exception(0), matspool.MatspoolError)
        s.flush(timeout=5)


def test_close_fails_the_older_saves_left_when_the_newest_was_answered(fake: ZmqFake, tmp_path: Path) -> None:
    s = matspool.Spool(fake.endpoint, ring_bytes=1 << 20, timeout=60)
    futs = [s.save(tmp_path / f"c{i}.mat", {"x": float(i)}) for i in range(5)]
    _wait_for(lambda: fake.daemon.n_writes() == 5)
    seqs = [w.seq for w in fake.daemon.writes]
    fake.reply(msgs.Done(((seqs[4], 10), (seqs[1], 11))))
    futs[4].result(10)
    with pytest.raises(matspool.FlushError, match=r"^3 saves failed and nobody looked") as ei:
        s.close(timeout=0.5)
    assert all(isinstance(e, matspool.SpoolClosed) for e in ei.value.errors)
    assert futs[1].result(0).nbytes == 11 and futs[4].result(0).nbytes == 10
    for i in (0, 2, 3):
        with pytest.raises(matspool.SpoolClosed, match=r"waited 0\.5 s"):
            futs[i].result(0)


def test_a_json_write_of_half_a_mebibyte_reaches_the_daemon_whole(tmp_path: Path) -> None:
    """An older daemon (no binary WRITEs): a WRITE of 4096 variables is about 530 KB of
    JSON, sent as one copied 2-frame message; the fake reads each variable's bytes."""
    fake = ZmqFake(FakeDaemon(), f"ipc://{tmp_path}/json.sock")
    names = [f"v{i:04d}_" + "n" * 57 for i in range(4096)]
    try:
        with matspool.Spool(fake.endpoint, ring_bytes=8 << 20, timeout=60) as s:
            futs = []
            for j in range(3):
                values = {name: np.array([float(j), float(i)]) for i, name in enumerate(names)}
                futs.append(s.save(tmp_path / f"m{j}.mat", values, format="v5"))
                futs += [s.save(tmp_path / f"s{j}_{k}.mat", {"x": np.arange(3.0) + k}) for k in range(10)]
            for f in futs:
                f.result(WATCHDOG_S)
        for j in range(3):
            got = fake.daemon.files[str(tmp_path / f"m{j}.mat")]
            assert len(got) == 4096
            for i in (0, 1234, 4095):
                assert np.frombuffer(got[names[i]], np.float64).tolist() == [float(j), float(i)]
    finally:
        fake.close()


def test_flush_while_other_threads_keep_saving(daemon: DaemonProc, out_dir: Path) -> None:
    """A big compressed save is slow; small saves before and after it finish first."""
    big = np.random.default_rng(0).integers(0, 4, (1000, 1000)).astype(np.float64)
    written: list[tuple[cf.Future[Any], str, dict[str, np.ndarray]]] = []
    lock = threading.Lock()
    stop = threading.Event()
    with matspool.Spool(daemon.endpoint, ring_bytes=32 << 20, timeout=60) as s:

        def keep_saving(k: int) -> None:
            i = 0
            while not stop.is_set() and i < 300:
                x = np.full(16, float(i + 1000 * k))
                p = str(out_dir / f"t{k}_{i}.mat")
                with lock:
                    written.append((s.save(p, {"x": x}), p, {"x": x}))
                i += 1

        def flusher() -> None:
            try:
                for j in range(4):
                    p = str(out_dir / f"big{j}.mat")
                    f = s.save(p, {"big": big + j}, compress=9, fsync=True, format="v7.3")
                    with lock:
                        written.append((f, p, {}))
                    s.save(out_dir / f"after{j}.mat", {"x": float(j)})
                    with lock:
                        mine = [f for f, _, _ in written]
                    s.flush(timeout=WATCHDOG_S)
                    assert all(g.done() for g in mine)  # every save made before the flush
                    assert f.result(0).nbytes == os.path.getsize(p)
            finally:
                stop.set()

        _run_all([flusher, *(lambda k=k: keep_saving(k) for k in range(3))])
        s.flush(timeout=WATCHDOG_S)
    for f, p, expect in written:
        assert f.result(0).nbytes == os.path.getsize(p)
        if expect:
            _check_file(p, expect)


def test_flush_after_a_save_in_pieces_larger_than_the_ring(daemon: DaemonProc, out_dir: Path) -> None:
    """A save bigger than the ring goes in pieces and ends after the small saves made
    after it: flush() must wait for it too."""
    rng = np.random.default_rng(9)
    with matspool.Spool(daemon.endpoint, ring_bytes=1 << 20, timeout=60) as s:
        for round_ in range(3):
            big = rng.standard_normal(400_000 + round_)  # 3.2 MB through a 1 MiB ring
            bf = s.save(out_dir / f"big{round_}.mat", {"big": big}, format="v5")
            small = [s.save(out_dir / f"s{round_}_{i}.mat", {"x": float(i)}) for i in range(30)]
            s.flush(timeout=WATCHDOG_S)
            assert bf.done() and all(f.done() for f in small)
            _check_file(bf.result(0).path, {"big": big})
            for i, f in enumerate(small):
                _check_file(f.result(0).path, {"x": np.array(float(i))})


def test_ctrl_c_during_flush_from_a_timer(tmp_path: Path, out_dir: Path) -> None:
    """SIGINT to this process while flush() waits: the first is said and the wait goes
    on to the end; every save is then on disk."""
    d = start_daemon(out_dir, tmp_path / "sock", "--writers", "1", "--debug-write-delay", "0.3")
    try:
        with matspool.Spool(d.endpoint, ring_bytes=1 << 20, timeout=60) as s:
            futs = [s.save(out_dir / f"c{i}.mat", {"x": float(i)}) for i in range(6)]
            timer = threading.Timer(0.4, os.kill, (os.getpid(), signal.SIGINT))
            timer.start()
            try:
                s.flush(timeout=WATCHDOG_S)
            finally:
                timer.cancel()
            for i, f in enumerate(futs):
                _check_file(f.result(0).path, {"x": np.array(float(i))})
    finally:
        d.stop()


# -- 3. a tiny ring, filled from several threads: allocs block and are woken ------------------------
@pytest.mark.parametrize("seed", [3, 4])
def test_tiny_ring_many_threads_mixed_sizes_never_deadlock(
    daemon: DaemonProc, out_dir: Path, seed: int
) -> None:
    expect: dict[str, dict[str, np.ndarray]] = {}
    futs: list[cf.Future[Any]] = []
    lock = threading.Lock()
    with matspool.Spool(daemon.endpoint, ring_bytes=64 << 10, on_full="block", timeout=60) as s:

        def saver(k: int) -> None:
            r = np.random.default_rng(seed * 10 + k)
            for i in range(40):
                n = int(r.choice([1, 50, 700, 3000, 7000, 9000]))  # 8 B to 72 KiB: some > the ring
                x = r.standard_normal(n)
                p = str(out_dir / f"r{k}_{i}.mat")
                f = s.save(p, {"x": x, "i": np.array(float(i))}, format="v5")
                with lock:
                    expect[p] = {"x": x, "i": np.array(float(i))}
                    futs.append(f)

        _run_all([lambda k=k: saver(k) for k in range(6)])
        s.flush(timeout=WATCHDOG_S)
    assert len(futs) == 240
    for f in futs:
        res = f.result(0)
        _check_file(res.path, expect[res.path])


# -- 4. hostile DONE bodies from a fake daemon ----------------------------------------------------
REFUSED = [
    b'{"op":"DONE","seq":0%d,"nbytes":1}',  # leading zero: not JSON
    b'{"op":"DONE","seq":-%d,"nbytes":1}',
    b'{"op":"DONE","seq":%d,"nbytes":-1}',
    b'{"op":"DONE","seq":%d,"nbytes":9223372036854775808}',  # 2**63
    b'{"op":"DONE","seq":%d,"nbytes":1e3}',
    b'{"op":"DONE","seq":%d,"nbytes":"1"}',
    b'{"op":"DONE","seq":%d,"nbytes":true}',
    b'{"op":"DONE","seq":%d,"nbytes":1}x',
    b'{"op":"DONE","seq":%d,"nbytes":1}\x00',
    b'{"op":"DONE","seq":%d,"nbytes":1',
    b'{"op":"DONE","seq":%d}',
    b'{"op":"DONE","seq":%d,"nbytes":1,"done":[[1,-1]]}',
    b'{"op":"DONE","seq":%d,"nbytes":null}',
    b'{"op":"DONE","seq":%d.0,"nbytes":1}',
    b'{"op":"DONE","seq":%d,"nbytes":1,"nbytes":-5}',  # the last key wins, as JSON reads it
    b'{"op":"DONE","seq":%d,"nbytes":\xd9\xa1}',  # a non-ASCII digit
    b'{"op":"DONE","done":[[%d,1,2]]}',
]


def test_hostile_done_bodies_are_refused_and_the_io_thread_lives_on(fake: ZmqFake, tmp_path: Path) -> None:
    with matspool.Spool(fake.endpoint, ring_bytes=1 << 20, timeout=60) as s:
        first = s.save(tmp_path / "first.mat", {"x": 1.0})  # seq 0: "0%d" must be a leading zero
        _wait_for(lambda: fake.daemon.n_writes() == 1)
        fake.reply(msgs.Done(((fake.daemon.writes[0].seq, 1),)))
        first.result(10)
        futs = [s.save(tmp_path / f"h{i}.mat", {"x": float(i)}) for i in range(8)]
        _wait_for(lambda: fake.daemon.n_writes() == 9)
        seq = [w.seq for w in fake.daemon.writes[1:]]
        assert min(seq) > 0
        for body in REFUSED:
            fake.reply(body % seq[0])
        fake.reply(b'{"op":"DONE","seq":%d,"nbytes":1}' % (max(seq) + 1000))  # never sent: ignored
        fake.reply(b'{"op":"DONE","seq":%d,"nbytes":1}' % 10**18)  # 19 digits: JSON, unknown seq
        # a DONE spelled otherwise than the daemon does (spaces, key order): JSON reads it
        fake.reply(b'{ "nbytes" : 5 , "op" : "DONE" , "seq" : %d }' % seq[1])
        assert futs[1].result(10).nbytes == 5  # the I/O thread lived through the refused ones
        assert not futs[0].done()
        fake.reply(b'{"op":"DONE","seq":%d,"nbytes":1,"seq":%d}' % (seq[7], seq[2]))  # last wins
        assert futs[2].result(10).nbytes == 1
        fake.reply(b'{"op":"DONE","seq":%d,"nbytes":999999999999999999}' % seq[3])  # absurd size
        assert futs[3].result(10).nbytes == 999999999999999999
        fake.reply(b'{"op":"DONE","seq":%d,"nbytes":7,"extra":{"k":[1]}}' % seq[4])  # extra keys
        assert futs[4].result(10).nbytes == 7
        fake.reply(b'{"op":"DONE","done":[[%d,3],[%d,4]]}' % (seq[5], seq[5]))  # twice: first wins
        assert futs[5].result(10).nbytes == 3
        fake.reply(b'{"op":"DONE","seq":%d,"nbytes":8}' % seq[5])  # again, after: ignored
        fake.reply(b'{"op":"DONE","seq":%d,"nbytes":9}' % seq[6])
        assert futs[6].result(10).nbytes == 9
        assert futs[5].result(0).nbytes == 3
        assert not futs[0].done() and not futs[7].done()
        fake.reply(b'{"op":"DONE","seq":%d,"nbytes":0}' % seq[0])
        fake.reply(b'{"op":"DONE","seq":%d,"nbytes":00}' % seq[7])  # refused: 7 stays pending
        assert futs[0].result(10).nbytes == 0
        fake.reply(b'{"op":"DONE","seq":%d,"nbytes":12}' % seq[7])
        assert futs[7].result(10).nbytes == 12
        s.flush(timeout=10)


# -- 5. a WRITE and a BATCH near the message cap; remote saves' payload frames ----------------------
def test_writes_and_batches_near_the_message_cap(daemon: DaemonProc, out_dir: Path) -> None:
    """WRITEs of 4096 variables (about 420 KB in the binary form) and small saves from
    three threads: BATCHes of them fill up to the link's cap (half of the 1 MiB one)."""
    names = [f"v{i:04d}_" + "n" * 57 for i in range(4096)]  # 63 characters, MATLAB's limit
    futs: list[tuple[cf.Future[Any], str, dict[str, np.ndarray]]] = []
    lock = threading.Lock()
    with matspool.Spool(daemon.endpoint, ring_bytes=8 << 20, timeout=60) as s:

        def saver(t: int) -> None:
            for j in range(4):
                n = len(names) if j % 2 == 0 else 1000 + 97 * j
                values = {name: np.array([float(j), float(i + t)]) for i, name in enumerate(names[:n])}
                p = str(out_dir / f"many{t}_{j}.mat")
                f = s.save(p, values, format="v5")
                with lock:
                    futs.append((f, p, values))
                for k in range(20):
                    q = str(out_dir / f"small{t}_{j}_{k}.mat")
                    v = {"x": np.array([float(j), float(k), float(t)])}
                    f = s.save(q, v)
                    with lock:
                        futs.append((f, q, v))

        _run_all([lambda t=t: saver(t) for t in range(3)])
        s.flush(timeout=WATCHDOG_S)
    for f, p, values in futs:
        assert f.result(0).nbytes == os.path.getsize(p)
        got = scipy.io.loadmat(p)
        assert {k for k in got if not k.startswith("__")} == set(values)
        for name, v in values.items():
            np.testing.assert_array_equal(got[name], np.atleast_2d(v))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_remote_saves_payload_frames_exact_through_a_small_ring(
    tmp_path: Path, out_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Payload frames still go zero-copy (copy=False) from the ring, and arrive exact."""
    sent: list[tuple[int, bool]] = []
    send_multipart = zmq.Socket.send_multipart

    def spy(self: zmq.Socket, frames: Any, *args: Any, **kwargs: Any) -> Any:
        if self.type == zmq.DEALER:
            sent.append((len(frames), kwargs.get("copy", True)))
        return send_multipart(self, frames, *args, **kwargs)

    monkeypatch.setattr(zmq.Socket, "send_multipart", spy)
    server_pub, server_sec = make_keys(str(tmp_path / "server"), "server")
    _, client_sec = make_keys(str(tmp_path / "clients"), "client")
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    proc = subprocess.Popen(
        serve_cmd(
            endpoint, out_dir, "--curve-secret", server_sec, "--curve-clients", str(tmp_path / "clients")
        )
    )
    try:
        wait_tcp(endpoint, proc)
        keys = matspool.ClientKeys(client_sec, server_pub)
        rng = np.random.default_rng(5)
        futs = []
        with matspool.Spool(endpoint, ring_bytes=1 << 20, curve=keys, timeout=60) as s:
            for i in range(60):
                n = [3, 9000, 20000, 200_000][i % 4]  # 24 B to 1.6 MiB: frames over zero-copy's bound
                x = rng.standard_normal(n)
                y = x.copy()
                p = str(out_dir / f"rem{i}.mat")
                futs.append((s.save(p, {"x": x}, format="v5"), p, y))
                x[:] = -1.0  # the caller's array is its own again once save() returned
            s.flush(timeout=WATCHDOG_S)
        for f, p, y in futs:
            assert f.result(0).nbytes == os.path.getsize(p)
            _check_file(p, {"x": y})
        assert {copy for n, copy in sent if n > 2} == {False}  # WRITEs with payload frames
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
