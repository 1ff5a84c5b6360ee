"""The whole Spool without a daemon: a MemoryTransport whose handler plays the daemon.

The handler maps the client's ring as the daemon does and reads the bytes each WRITE
names, so these tests check what a daemon would receive, quickly and in one process.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from fakedaemon import FakeDaemon

import matspool
from matspool._transport import MemoryTransport, ZmqTransport


@pytest.fixture
def fake() -> FakeDaemon:
    return FakeDaemon()


def test_a_save_reaches_the_daemon_in_matlab_order(fake: FakeDaemon) -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    with matspool.Spool(ring_bytes=1 << 20, transport=MemoryTransport(fake)) as s:
        res = s.save("/data/x.mat", {"x": x}).result(10)
    assert res.path == "/data/x.mat" and res.format == "v5"
    assert fake.files["/data/x.mat"]["x"] == x.tobytes(order="F")


def test_a_daemon_that_cannot_reach_a_memfd_ring_gets_a_shm_one(fake: FakeDaemon) -> None:
    """A daemon of another user (or pid namespace) cannot open /proc/<pid>/fd: refused
    with EACCES, the client moves its ring to /dev/shm and says HELLO again."""
    fake.refuse_memfd = True
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    with matspool.Spool(ring_bytes=1 << 20, transport=MemoryTransport(fake)) as s:
        assert s._ring is not None
        res = s.save("/data/x.mat", {"x": x}).result(10)
        assert s._ring.kind == "shm" and os.path.exists(s._ring.path)
        path = s._ring.path
    assert [h.fd is not None for h in fake.hellos] == [True, False]
    assert res.path == "/data/x.mat" and fake.files["/data/x.mat"]["x"] == x.tobytes(order="F")
    assert not os.path.exists(path)


def test_an_err_carries_path_seq_and_errno(fake: FakeDaemon) -> None:
    fake.fail_with = {"code": "write_failed", "message": "disk full", "errno": 28}
    with matspool.Spool(ring_bytes=1 << 20, transport=MemoryTransport(fake)) as s:
        s.save("/data/a.mat", {"a": 1.0}).exception(10)
        fut = s.save("/data/b.mat", {"a": 1.0})
        err = fut.exception(10)
        assert isinstance(err, matspool.WriteFailed) and isinstance(err, OSError)
        assert (err.path, err.seq, err.errno) == ("/data/b.mat", 1, 28)
        with pytest.raises(matspool.FlushError):
            s.flush(10)
        assert s._ring.used == 0


def test_a_silent_daemon_keeps_its_regions_until_it_answers(fake: FakeDaemon) -> None:
    s = matspool.Spool(ring_bytes=1 << 16, timeout=2, heartbeat=0.1, transport=MemoryTransport(fake))
    try:
        fake.silent.set()
        fut = s.save("/data/held.mat", {"v": np.ones((64, 80))})  # 40 KiB of a 64 KiB ring
        err = fut.exception(10)
        assert isinstance(err, matspool.DaemonUnavailable) and "outcome" in str(err), err
        assert s._ring.used > 0, "a region the daemon may still read was given back"
        with pytest.raises(matspool.SpoolFull):
            s.save("/data/more.mat", {"v": np.ones((64, 80))})
        fake.silent.clear()  # the daemon resumes: its answer frees the region
        s.save("/data/after.mat", {"v": np.zeros((64, 80))}).result(10)  # needs that region
        assert fake.files["/data/held.mat"]["v"] == np.ones((64, 80)).tobytes()
    finally:
        s.close(5)  # the one failure was looked at: nothing to report


def test_close_names_unobserved_failures_only(fake: FakeDaemon) -> None:
    fake.fail_with = {"code": "write_failed", "message": "no such directory"}
    s = matspool.Spool(ring_bytes=1 << 20, transport=MemoryTransport(fake))
    seen = s.save("/data/seen.mat", {"a": 1.0})
    s.save("/data/unseen.mat", {"a": 1.0})
    assert seen.exception(10) is not None
    with pytest.raises(matspool.FlushError) as info:
        s.close(10)
    assert "/data/unseen.mat" in str(info.value) and "/data/seen.mat" not in str(info.value)
    assert [e.path for e in info.value.errors] == ["/data/unseen.mat"]


def test_a_new_daemon_instance_frees_what_the_silent_one_held(fake: FakeDaemon) -> None:
    """The silent instance never answers; another instance answering on the endpoint
    means it is gone: the failed save's region goes back, nothing is re-sent for it."""
    s = matspool.Spool(ring_bytes=1 << 16, timeout=1, heartbeat=0.1, transport=MemoryTransport(fake))
    try:
        fake.silent.set()
        fut = s.save("/data/held.mat", {"v": np.ones((64, 80))})
        assert isinstance(fut.exception(10), matspool.DaemonUnavailable)
        assert s._ring.used > 0
        fake.held.clear()  # that instance dies with its answers
        fake.instance = "restarted"
        fake.silent.clear()
        s.save("/data/after.mat", {"v": np.zeros((64, 80))}).result(10)  # needs that region
        assert fake.paths().count("/data/held.mat") == 1  # a failed save is not re-sent
        assert s.pending == 0
    finally:
        s.close(5)


def test_a_future_waits_for_its_own_answer_not_another_saves() -> None:
    """The futures of one spool share a condition (the cost of one per save was a small
    save's largest after its copy): another save's answer wakes a waiter, which must go
    on waiting for its own, and wait()/as_completed() see each future once it is done."""
    import concurrent.futures as cf
    import threading
    import time

    from matspool import _messages as m

    fake = FakeDaemon(hold=True)
    with matspool.Spool(ring_bytes=1 << 20, heartbeat=0.05, transport=MemoryTransport(fake)) as s:
        a = s.save("/data/a.mat", {"a": 1.0})
        b = s.save("/data/b.mat", {"b": 2.0})
        got: list[object] = []
        waiter = threading.Thread(target=lambda: got.append(b.result(60)))
        waiter.start()
        deadline = time.monotonic() + 30
        while fake.n_writes() < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        fake.held.append(m.Done(((a.seq, 10),)))  # goes out with the next PONG
        assert a.result(30).path == "/data/a.mat"
        assert cf.wait([a, b], timeout=0.2).not_done == {b}
        with pytest.raises(TimeoutError):
            b.result(0.05)
        assert waiter.is_alive() and not got  # woken by a's answer, still waiting for b's
        fake.held.append(m.Done(((b.seq, 20),)))
        done = list(cf.as_completed([a, b], timeout=30))
        waiter.join(30)
        assert set(done) == {a, b}
        assert [r.path for r in got] == ["/data/b.mat"]  # type: ignore[attr-defined]
        assert b.result(0).nbytes == 20


def test_a_late_wake_after_close_writes_to_no_reused_descriptor(tmp_path):
    """wake() may come from a caller's thread after the transport closed (the spool is
    closing): the eventfd's number is reused by the next open file, which must stay
    untouched."""
    t = ZmqTransport(f"ipc://{tmp_path}/nobody.sock")
    t.wake()  # before open: the I/O thread's wake-up is kept, harmless
    t.close()
    fd = os.open(tmp_path / "next", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        t.wake()
        assert os.pread(fd, 16, 0) == b""
    finally:
        os.close(fd)


def test_one_done_answering_many_saves_resolves_each_and_frees_the_ring(fake: FakeDaemon) -> None:
    """A DONE names many saves in a burst (``PendingTable.answer_done``): every future gets
    its own result, its callbacks run once, ``concurrent.futures.wait``/``as_completed``
    waiting on them return, and the ring is empty once they have woken."""
    import concurrent.futures as cf
    import threading
    import time

    held: list[tuple[int, int]] = []
    go = threading.Event()

    def batching(msg: object) -> list[object]:
        out = []
        for reply in fake(msg):  # type: ignore[arg-type]
            if isinstance(reply, matspool._messages.Done):
                held.extend(reply.answers)
                if len(held) == 40:  # the 40th WRITE: one DONE for all, once the waiters wait
                    assert go.wait(10)
                    out.append(matspool._messages.Done(tuple(reversed(held))))
            else:
                out.append(reply)
        return out

    calls: list[str] = []
    with matspool.Spool(ring_bytes=1 << 20, transport=MemoryTransport(batching)) as s:
        futures = []
        for i in range(40):
            f = s.save(f"/data/f{i}.mat", {"x": np.full((4, 4), i, np.float64)})
            f.add_done_callback(lambda f: calls.append(f.result().path))
            futures.append(f)
        seen: list[object] = []
        waited: list[set[object]] = []
        threads = [
            threading.Thread(target=lambda: seen.extend(cf.as_completed(futures, timeout=10))),
            threading.Thread(target=lambda: waited.extend(cf.wait(futures, timeout=10))),
            # on the shared condition, no timeout: woken by the DONE, or it hangs (daemon thread)
            threading.Thread(target=lambda: seen.append(futures[7].result()), daemon=True),
        ]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 10
        while len(futures[-1]._waiters) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)  # both waiters installed on every future, none answered yet
        assert not any(f.done() for f in futures)
        go.set()
        for t in threads:
            t.join(10)
        assert not any(t.is_alive() for t in threads), "a waiter was never woken"
        done, not_done = waited
        assert not not_done and len(done) == 40 and len(seen) == 41
        assert [f.result(0).path for f in futures] == [f"/data/f{i}.mat" for i in range(40)]
        assert all(f.result(0).format == "v5" and f.result(0).nbytes == 128 for f in futures)
        assert sorted(calls) == sorted(f"/data/f{i}.mat" for i in range(40))
        assert s._ring is not None and s._ring.used == 0
    for i in range(40):
        assert fake.files[f"/data/f{i}.mat"]["x"] == np.full((4, 4), i, np.float64).tobytes(order="F")
