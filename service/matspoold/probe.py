"""``matspool ping`` and ``matspool status``: ask a running daemon, print what it says.

A node daemon (``userd``: a handshake socket beside its endpoint) runs one writer per
user: ``status`` there asks the handshake socket for its writers (the caller's own only,
unless the caller is root) and each of the caller's own ready writers, as the caller,
for its STATUS. Threads: the caller's; nothing kept."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import zmq

from matspool import _handshake
from matspool import _messages as msgs
from matspool._curve import ClientKeys, is_tcp
from matspool._endpoint import check_ipc_endpoint
from matspool._errors import DaemonUnavailable
from matspool._msgstatus import StatusReply

__all__ = ["ask", "format_node", "format_status", "node_status", "ping", "status", "watch"]


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


def node_status(hello: str, timeout: float) -> dict[str, Any]:
    """The node daemon's answer to ``USERS_STATUS`` on its handshake socket ``hello``; each
    of this user's own ready writers gains its ``status`` (None: it did not answer), asked
    here, as this user: the node daemon never connects into a user's directory."""
    raw = _handshake.ask(hello, {"op": "USERS_STATUS"}, timeout)
    if not raw["ok"]:
        raise DaemonUnavailable(f"the node daemon at {hello} refused: {raw.get('message')}")
    writers = raw.get("writers")
    if (
        not isinstance(raw.get("node"), dict)
        or not isinstance(writers, list)
        or not all(isinstance(w, dict) for w in writers)
    ):
        raise DaemonUnavailable(f"the node daemon at {hello} gave a malformed status: {str(raw)[:200]}")
    for w in writers:
        target = w.get("endpoint")
        if w.get("uid") != os.geteuid() or w.get("state") != "ready" or not isinstance(target, str):
            continue
        try:
            check_ipc_endpoint(target)
            reply = ask(target, msgs.StatusQuery(), timeout)
        except DaemonUnavailable:
            reply = None
        w["status"] = reply.to_wire() if isinstance(reply, StatusReply) else None
    return raw


def format_node(raw: dict[str, Any]) -> str:
    node = raw["node"]
    who = "each client's user" if node.get("root") else "its own user only (not root)"
    lines = [
        f"node daemon pid {node.get('pid')} at {node.get('endpoint')}, writing as {who}; "
        f"a writer leaves after {node.get('idle_exit_s')} s without clients"
    ]
    if not raw["writers"]:
        lines.append(f"no writer running for uid {os.geteuid()} (one starts at its first save)")
    for w in raw["writers"]:
        lines.append(
            f"writer of uid {w.get('uid')} gid {w.get('gid')}: {w.get('state')}, pid {w.get('pid')}, "
            f"up {w.get('up_s')} s, {w.get('waiting')} clients waiting for it"
        )
        if "status" in w:
            text = (
                format_status(StatusReply.from_wire(w["status"]))
                if w["status"] is not None
                else "no answer from this writer"
            )
            lines += ["  " + ln for ln in text.splitlines()]
    return "\n".join(lines)


def _report(endpoint: str, timeout: float, as_json: bool) -> str | None:
    """What ``status`` prints for ``endpoint`` (a node daemon's or any other); None: no
    answer (:class:`DaemonUnavailable`: a node daemon's handshake failed, or refused)."""
    hello = _handshake.hello_socket(endpoint)
    if hello is not None:
        raw = node_status(hello, timeout)
        return json.dumps(raw, indent=2) if as_json else format_node(raw)
    reply = ask(endpoint, msgs.StatusQuery(), timeout)
    if not isinstance(reply, StatusReply):
        return None
    return json.dumps(reply.to_wire(), indent=2) if as_json else format_status(reply)


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
    try:
        text = _report(endpoint, timeout, as_json)
    except DaemonUnavailable as e:
        print(f"matspool status: {e}", file=sys.stderr)
        return 1
    if text is None:
        print(f"matspool status: no answer from {endpoint} within {timeout} s", file=sys.stderr)
        return 1
    print(text)
    return 0


def watch(endpoint: str, timeout: float, interval: float) -> int:
    """``status --watch``: the table again every ``interval`` s, redrawn in place at a
    terminal (appended otherwise, e.g. into a log), until Ctrl-C, which is a normal exit.
    A daemon that stops answering is said so, and watched for until it answers again."""
    redraw = sys.stdout.isatty()
    try:
        while True:
            try:
                text = _report(endpoint, timeout, False) or f"no answer from {endpoint} within {timeout} s"
            except DaemonUnavailable as e:
                text = str(e)
            stamp = time.strftime("%H:%M:%S")
            head = f"matspool status --watch {interval:g} s, {stamp} (Ctrl-C to stop)"
            sys.stdout.write(("\x1b[H\x1b[2J" if redraw else "") + f"{head}\n{text}\n")
            sys.stdout.flush()
            time.sleep(interval)
    except KeyboardInterrupt:
        return 0
