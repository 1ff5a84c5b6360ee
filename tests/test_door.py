"""door.py: libzmq's accept on an ipc socket paused and resumed from outside libzmq.

A real ROUTER, real unix connections, and libzmq's own monitor as the witness: while the
door is shut no connection is accepted (they wait in the kernel's backlog), and opening
it lets every waiting one in.
"""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

import pytest
import zmq
from zmq.utils.monitor import parse_monitor_message

from matspoold.door import find_door

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the door reads Linux /proc")


def _accepted(mon: zmq.Socket[bytes], wait: float) -> int:
    n = 0
    until = time.monotonic() + wait
    while time.monotonic() < until:
        if mon.poll(50) and parse_monitor_message(mon.recv_multipart())["event"] == zmq.EVENT_ACCEPTED:
            n += 1
    return n


def test_a_shut_door_keeps_connections_in_the_backlog_and_opening_lets_them_in(tmp_path: Path) -> None:
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    mon = router.get_monitor_socket(zmq.EVENT_ACCEPTED)
    path = str(tmp_path / "d.sock")
    router.bind(f"ipc://{path}")
    door = find_door(f"ipc://{path}")
    assert door is not None
    clients: list[socket.socket] = []
    try:
        one = socket.socket(socket.AF_UNIX)
        one.connect(path)
        clients.append(one)
        assert _accepted(mon, 0.5) == 1  # open: accepted as usual
        assert door.close() and door.shut
        for _ in range(5):
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(1)
            s.connect(path)  # into the kernel's backlog
            clients.append(s)
        assert _accepted(mon, 1.0) == 0
        assert door.open() and not door.shut
        assert _accepted(mon, 1.0) == 5
    finally:
        for s in clients:
            s.close()
        door.release()
        router.disable_monitor()
        mon.close(0)
        router.close(0)
        ctx.term()


def test_an_armed_door_lets_in_one_connection_per_arm(tmp_path: Path) -> None:
    """``arm`` is what keeps a lagging guard within the cap: libzmq hears of one waiting
    connection, and the others stay in the backlog until the guard counted it."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    mon = router.get_monitor_socket(zmq.EVENT_ACCEPTED)
    path = str(tmp_path / "d.sock")
    router.bind(f"ipc://{path}")
    door = find_door(f"ipc://{path}")
    assert door is not None
    clients: list[socket.socket] = []
    try:
        assert door.close()
        for _ in range(5):
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(1)
            s.connect(path)
            clients.append(s)
        assert door.arm()
        assert _accepted(mon, 1.0) == 1
        assert door.arm()
        assert _accepted(mon, 1.0) == 1
        assert door.open()
        assert _accepted(mon, 1.0) == 3
    finally:
        for s in clients:
            s.close()
        door.release()
        router.disable_monitor()
        mon.close(0)
        router.close(0)
        ctx.term()


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
