"""``matspool ping`` and ``matspool status``: ask a running daemon, print what it says."""

from __future__ import annotations

import json
import sys
import time

import zmq

from matspool import _messages as msgs
from matspool._curve import ClientKeys, is_tcp
from matspool._endpoint import check_ipc_endpoint
from matspool._errors import DaemonUnavailable
from matspool._msgstatus import StatusReply

__all__ = ["ask", "format_status", "ping", "status", "watch"]


def ask(endpoint: str, request: msgs.Request, timeout: float) -> msgs.Reply | None:
    """One request/answer on a fresh DEALER; None when nothing answers in time."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        if is_tcp(endpoint):
            keys = ClientKeys.from_env()
            if keys is None:
                raise ValueError(
                    "a tcp:// endpoint needs MATSPOOL_CURVE_CLIENT_SECRET and MATSPOOL_CURVE_SERVER_PUBLIC"
                )
            keys.apply(sock)
        sock.connect(endpoint)
        sock.send_multipart(msgs.encode(request))
        if not sock.poll(int(timeout * 1000)):
            return None
        return msgs.decode_reply(sock.recv_multipart())
    finally:
        sock.close()


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def format_status(st: StatusReply) -> str:
    lines = [
        (
            f"daemon pid {st.pid} at {st.endpoint}, up {st.uptime_s:.0f} s, "
            f"{st.files_written} files, {_size(st.bytes_written)} written, {st.errors} errors"
        ),
        f"roots: {', '.join(st.roots)}",
    ]
    clients = st.clients
    if not clients:
        lines.append("no clients connected")
        return "\n".join(lines)
    head = (
        f"{'pid':>8} {'queue':>5} {'ring use':>20} {'files':>7} "
        f"{'written':>10} {'rate':>12} {'errors':>6} {'oldest':>8}"
    )
    lines.append(head)
    for c in clients:
        use = f"{_size(c.ring_bytes_in_flight)}/{_size(c.ring_bytes)}"
        lines.append(
            f"{c.pid:>8} {c.queue_depth:>5} {use:>20} {c.files_written:>7} "
            f"{_size(c.bytes_written):>10} {_size(c.throughput_bytes_per_s) + '/s':>12} "
            f"{c.errors:>6} {c.oldest_pending_s:>7.1f}s" + ("  (dead)" if c.dead else "")
        )
    return "\n".join(lines)


def _unsafe(command: str, endpoint: str) -> int | None:
    """2 (after one line on stderr) when ``endpoint``'s directory could be another user's:
    their fake daemon would answer for ours."""
    try:
        check_ipc_endpoint(endpoint)
    except DaemonUnavailable as e:
        print(f"matspool {command}: {e}", file=sys.stderr)
        return 2
    return None


def ping(endpoint: str, timeout: float) -> int:
    if (refused := _unsafe("ping", endpoint)) is not None:
        return refused
    reply = ask(endpoint, msgs.Ping(), timeout)
    if not isinstance(reply, msgs.Pong):
        print(f"matspool ping: no answer from {endpoint} within {timeout} s", file=sys.stderr)
        return 1
    print(f"matspool daemon at {endpoint} is up (instance {reply.instance})")
    return 0


def status(endpoint: str, timeout: float, as_json: bool) -> int:
    if (refused := _unsafe("status", endpoint)) is not None:
        return refused
    reply = ask(endpoint, msgs.StatusQuery(), timeout)
    if not isinstance(reply, StatusReply):
        print(f"matspool status: no answer from {endpoint} within {timeout} s", file=sys.stderr)
        return 1
    print(json.dumps(reply.to_wire(), indent=2) if as_json else format_status(reply))
    return 0


def watch(endpoint: str, timeout: float, interval: float) -> int:
    """``status --watch``: the table again every ``interval`` s, redrawn in place at a
    terminal (appended otherwise, e.g. into a log), until Ctrl-C, which is a normal exit.
    A daemon that stops answering is said so, and watched for until it answers again."""
    redraw = sys.stdout.isatty()
    try:
        while True:
            reply = ask(endpoint, msgs.StatusQuery(), timeout)
            text = (
                format_status(reply)
                if isinstance(reply, StatusReply)
                else f"no answer from {endpoint} within {timeout} s"
            )
            stamp = time.strftime("%H:%M:%S")
            head = f"matspool status --watch {interval:g} s, {stamp} (Ctrl-C to stop)"
            sys.stdout.write(("\x1b[H\x1b[2J" if redraw else "") + f"{head}\n{text}\n")
            sys.stdout.flush()
            time.sleep(interval)
    except KeyboardInterrupt:
        return 0
