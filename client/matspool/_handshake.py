"""The node daemon's handshake: which of its writers is this process's (its user's).

A node daemon that writes as each job's user (``matspoold.userd``) has, beside its
endpoint ``ipc://PATH``, a plain unix socket ``PATH.hello``. The client connects there and
asks; the daemon learns who it is from the kernel (``SO_PEERCRED``), never from the
request, and answers with the endpoint of a writer running as that user, where the
unchanged protocol follows (HELLO, WRITE ...). No handshake socket: the endpoint is the
daemon itself (a per-job or embedded daemon), as before.

Threads: the caller's (the link's I/O thread opening the transport); nothing kept.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import time
from typing import Any, Final

from ._errors import DaemonUnavailable

__all__ = ["HELLO_SUFFIX", "ask", "hello_socket", "resolve"]

HELLO_SUFFIX: Final = ".hello"
_USERS_SUFFIX: Final = ".users"
#: s for the answer: the daemon may be starting this user's writer (a Python process)
_ANSWER_S: Final = 90.0
_ANSWER_MAX: Final = 1 << 20  # bytes of an answer (a node's status lists its users' writers)


def hello_socket(endpoint: str) -> str | None:
    """The handshake socket of a node daemon at ``endpoint``; None for any other daemon."""
    if not endpoint.startswith("ipc://"):
        return None
    path = os.path.abspath(endpoint[len("ipc://") :]) + HELLO_SUFFIX
    try:
        return path if stat.S_ISSOCK(os.lstat(path).st_mode) else None
    except OSError:
        return None


def ask(hello: str, request: dict[str, Any], timeout: float = _ANSWER_S) -> dict[str, Any]:
    """One request on the handshake socket ``hello``, its one-line JSON answer (which says
    ``ok``); :class:`DaemonUnavailable` when there is none."""
    deadline = time.monotonic() + timeout
    buf = b""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.settimeout(min(5.0, timeout))
            s.connect(hello)
            s.sendall(json.dumps(request).encode() + b"\n")
            while b"\n" not in buf and len(buf) < _ANSWER_MAX:
                s.settimeout(max(0.1, deadline - time.monotonic()))
                got = s.recv(_ANSWER_MAX)
                if not got:
                    break
                buf += got
        except OSError as e:
            raise DaemonUnavailable(
                f"the node daemon's handshake at {hello} failed: {e.strerror or e}"
            ) from None
    try:
        raw = json.loads(buf.split(b"\n", 1)[0])
        if not isinstance(raw, dict) or not isinstance(raw["ok"], bool):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise DaemonUnavailable(
            f"the node daemon at {hello} gave no answer to the handshake ({buf[:200]!r})"
        ) from None
    return raw


def resolve(endpoint: str) -> str:
    """The endpoint to speak the protocol on: ``endpoint`` itself, or, for a node daemon
    with a handshake socket, this user's writer's (:class:`DaemonUnavailable` if refused)."""
    hello = hello_socket(endpoint)
    if hello is None:
        return endpoint
    raw = ask(hello, {"op": "USER_HELLO"})
    if not raw["ok"]:
        raise DaemonUnavailable(f"the node daemon at {endpoint} refused this client: {raw.get('message')}")
    target = raw.get("endpoint")
    mine = f"ipc://{hello[: -len(HELLO_SUFFIX)]}{_USERS_SUFFIX}/"
    if not isinstance(target, str) or not target.startswith(mine) or "/../" in target:
        raise DaemonUnavailable(f"the node daemon at {endpoint} answered an unexpected endpoint {target!r}")
    return target
