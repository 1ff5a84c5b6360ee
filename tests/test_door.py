"""door.py: libzmq's accept on an ipc socket paused and resumed from outside libzmq.

A real ROUTER, real unix connections, and libzmq's own monitor as the witness: while the
door is shut no connection is accepted (they wait in the kernel's backlog), and opening
it lets every waiting one in.
"""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import zmq
from zmq.utils.monitor import parse_monitor_message

from matspoold.door import Door, find_door
from matspoold.guard import Guard

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the door reads Linux /proc")


def _accepted(mon: zmq.Socket[bytes], wait: float) -> int:
    n = 0
    until = time.monotonic() + wait
    while time.monotonic() < until:
        if mon.poll(50) and parse_monitor_message(mon.recv_multipart())["event"] == zmq.EVENT_ACCEPTED:
            n += 1
    return n


@dataclass
class Watched:
    """A bound ROUTER's door, libzmq's monitor of its accepts, and connections made."""

    door: Door
    mon: zmq.Socket[bytes]
    path: str
    clients: list[socket.socket]

    def connect(self, n: int) -> None:
        for _ in range(n):
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(1)
            s.connect(self.path)  # into the kernel's backlog while the door is shut
            self.clients.append(s)


@pytest.fixture
def watched(tmp_path: Path) -> Iterator[Watched]:
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    mon = router.get_monitor_socket(zmq.EVENT_ACCEPTED)
    path = str(tmp_path / "d.sock")
    router.bind(f"ipc://{path}")
    door = find_door(f"ipc://{path}")
    assert door is not None
    w = Watched(door, mon, path, [])
    try:
        yield w
    finally:
        for s in w.clients:
            s.close()
        door.release()
        router.disable_monitor()
        mon.close(0)
        router.close(0)
        ctx.term()


def test_a_shut_door_keeps_connections_in_the_backlog_and_opening_lets_them_in(watched: Watched) -> None:
    watched.connect(1)
    assert _accepted(watched.mon, 0.5) == 1  # open: accepted as usual
    assert watched.door.close() and watched.door.shut
    watched.connect(5)
    assert _accepted(watched.mon, 1.0) == 0
    assert watched.door.open() and not watched.door.shut
    assert _accepted(watched.mon, 1.0) == 5


def test_an_armed_door_lets_in_one_connection_per_arm(watched: Watched) -> None:
    """``arm`` is what keeps a lagging guard within the cap: libzmq hears of one waiting
    connection, and the others stay in the backlog until the guard counted it."""
    assert watched.door.close()
    watched.connect(5)
    assert watched.door.arm()
    assert _accepted(watched.mon, 1.0) == 1
    assert watched.door.arm()
    assert _accepted(watched.mon, 1.0) == 1
    assert watched.door.open()
    assert _accepted(watched.mon, 1.0) == 3


def test_a_door_whose_watch_is_gone_says_so(tmp_path: Path) -> None:
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    path = str(tmp_path / "d.sock")
    router.bind(f"ipc://{path}")
    door = find_door(f"ipc://{path}")
    assert door is not None
    router.unbind(f"ipc://{path}")
    time.sleep(0.3)  # libzmq's I/O thread removes the listener's watch
    assert not door.close()  # refused: never an epoll_ctl on a watch no longer the listener's
    door.release()
    router.close(0)
    ctx.term()


def test_no_door_for_tcp_nor_for_a_path_nobody_listens_on(tmp_path: Path) -> None:
    assert find_door("tcp://127.0.0.1:5555", wait=0) is None
    assert find_door(f"ipc://{tmp_path / 'nobody.sock'}", wait=0.05) is None


def _until(cond: Callable[[], bool], wait: float = 10.0) -> bool:
    until = time.monotonic() + wait
    while not cond():
        if time.monotonic() > until:
            return False
        time.sleep(0.02)
    return True


def test_the_guard_shuts_the_door_at_the_cap_and_outlives_a_bad_event(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    guard = Guard(router, cap=2)
    real = Guard._events
    broken = [True]

    def events_failing_once(self: Guard, mon: zmq.Socket[bytes]) -> None:
        if broken:
            broken.clear()
            raise RuntimeError("a bad event")
        real(self, mon)

    monkeypatch.setattr(Guard, "_events", events_failing_once)
    path = str(tmp_path / "d.sock")
    router.bind(f"ipc://{path}")
    guard.listening(f"ipc://{path}")
    clients: list[socket.socket] = []
    try:
        for _ in range(5):
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(1)
            s.connect(path)
            clients.append(s)
        # the first read failed; the watcher went on, kept 2 and shut the door
        assert _until(lambda: not broken and len(guard.open) == 2 and guard.paused >= 1)
        for s in clients:
            s.close()
        clients.clear()
        assert _until(lambda: not guard.open)  # all gone: the door is open again
        late = socket.socket(socket.AF_UNIX)
        late.settimeout(1)
        late.connect(path)
        clients.append(late)
        assert _until(lambda: len(guard.open) == 1)  # accepted: libzmq hears of it again
    finally:
        for s in clients:
            s.close()
        guard.close()
        router.close(0)
        ctx.destroy(linger=0)


class _Frame:
    """What ``Guard.seen`` reads of a received frame: the descriptor it came from."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def get(self, option: int) -> int:
        assert option == zmq.SRCFD
        return self.fd


def test_the_guard_remembers_one_routing_id_per_descriptor() -> None:
    """Clients come and go with new routing ids on reused descriptor numbers: what the
    guard keeps to cut a slow reader stays as small as the descriptors in use (before, ids
    of connections long gone piled up to 4x the cap, then were rebuilt on every message)."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    guard = Guard(router, cap=16)
    try:
        for i in range(10_000):
            guard.seen(f"client-{i}".encode(), _Frame(100 + i % 8))  # type: ignore[arg-type]
        assert len(guard._fd_of) == 8 and len(guard._id_of) == 8
        assert guard._fd_of[b"client-9999"] == 100 + 9999 % 8
        guard.seen(b"client-9999", _Frame(200))  # one id, a new connection
        assert guard._fd_of[b"client-9999"] == 200 and 100 + 9999 % 8 not in guard._id_of
    finally:
        guard.close()
        router.close(0)
        ctx.destroy(linger=0)
