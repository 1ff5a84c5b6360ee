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
from typing import Final

from ._errors import DaemonUnavailable

__all__ = ["HELLO_SUFFIX", "resolve"]

HELLO_SUFFIX: Final = ".hello"
_USERS_SUFFIX: Final = ".users"
#: s for the answer: the daemon may be starting this user's writer (a Python process)
_ANSWER_S: Final = 90.0


def resolve(endpoint: str) -> str:
    """The endpoint to speak the protocol on: ``endpoint`` itself, or, for a node daemon
    with a handshake socket, this user's writer's (:class:`DaemonUnavailable` if refused)."""
    if not endpoint.startswith("ipc://"):
        return endpoint
    path = os.path.abspath(endpoint[len("ipc://") :])
    try:
        if not stat.S_ISSOCK(os.lstat(path + HELLO_SUFFIX).st_mode):
            return endpoint
    except OSError:
        return endpoint
    deadline = time.monotonic() + _ANSWER_S
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.settimeout(5.0)
            s.connect(path + HELLO_SUFFIX)
            s.sendall(b'{"op": "USER_HELLO"}\n')
            buf = b""
            while b"\n" not in buf and len(buf) < 65536:
                s.settimeout(max(0.1, deadline - time.monotonic()))
                got = s.recv(65536)
                if not got:
                    break
                buf += got
        except OSError as e:
            raise DaemonUnavailable(
                f"the node daemon's handshake at {path}{HELLO_SUFFIX} failed: {e.strerror or e}"
            ) from None
    try:
        raw = json.loads(buf.split(b"\n", 1)[0])
        ok = raw["ok"] is True
    except (ValueError, KeyError, TypeError):
        raise DaemonUnavailable(
            f"the node daemon at {path}{HELLO_SUFFIX} gave no answer to the handshake ({buf[:200]!r})"
        ) from None
    if not ok:
        raise DaemonUnavailable(f"the node daemon at {endpoint} refused this client: {raw.get('message')}")
    target = raw.get("endpoint")
    mine = f"ipc://{path}{_USERS_SUFFIX}/"
    if not isinstance(target, str) or not target.startswith(mine) or "/../" in target:
        raise DaemonUnavailable(f"the node daemon at {endpoint} answered an unexpected endpoint {target!r}")
    return target
