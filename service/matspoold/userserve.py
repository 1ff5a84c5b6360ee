"""One user's writer daemon under the node daemon (``userd``): ``matspool serve``, as the user.

``userd`` (root) starts this with the client's uid, gid and groups already set (by the
kernel's account of the client, ``peercred``), its control socket as standard input, and
the arguments of a plain ``matspool serve`` on a private endpoint in a 0700 directory of
the user's. Everything the daemon does (opening rings, creating files, renaming) is thus
done with the user's own rights: the kernel, not matspool, decides what it may touch.

Beside the daemon, one thread talks to ``userd`` over the control socket (one byte each):

- ``R`` (to userd): the endpoint answers PING: clients may be sent here;
- ``T`` (from userd): a client was just sent here (it will HELLO within seconds);
- ``S`` (to userd), after ``idle`` seconds with no client and no ``T``: about to stop;
  userd answers ``K``. A ``T`` that arrives before the ``K`` cancels the stop (``A`` to
  userd: alive again), so no client is ever sent to a daemon that is leaving;
- ``I`` (from userd): the user's job ended (Slurm's epilog asked): leave as soon as no
  client is connected, without waiting ``idle`` seconds;
- end of file (userd gone, even by SIGKILL, or asking this writer to stop): stop.

Stopping is the daemon's own SIGTERM: it finishes every accepted write first.

The process makes itself non-dumpable first, so (with ``kernel.yama.ptrace_scope`` 0)
another process of the user cannot attach to it; see deploy/README.md's threat model.

Threads: the main thread runs the daemon (``cli.main``); the watcher thread owns the
control socket.
"""

from __future__ import annotations

import ctypes
import logging
import os
import select
import signal
import socket
import sys
import threading
import time

from matspool import _messages as msgs
from matspool._msgstatus import StatusReply

__all__ = ["main"]

log = logging.getLogger("matspoold")

_PR_SET_DUMPABLE = 4


def _nondumpable() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: nothing to harden


def _recv(ctl: socket.socket, timeout: float) -> bytes | None:
    """Bytes from userd within ``timeout`` (b"" at end of file); None when none came."""
    if not select.select([ctl], [], [], timeout)[0]:
        return None
    try:
        return ctl.recv(64)
    except OSError:
        return b""


def _answers(endpoint: str, request: msgs.Request) -> msgs.Reply | None:
    from .probe import ask

    try:
        return ask(endpoint, request, 2.0)
    except Exception:  # noqa: BLE001 - not up yet, or going: the same as no answer
        return None


def _stop(why: str) -> None:
    log.info("this writer stops: %s", why)
    os.kill(os.getpid(), signal.SIGTERM)  # the daemon's own handler: drain, then leave


def _watch(ctl: socket.socket, endpoint: str, idle: float) -> None:
    """See the module docstring."""
    path = endpoint[len("ipc://") :]
    while True:  # until the endpoint answers (the daemon binds it in serve())
        got = _recv(ctl, 0.05)
        if got == b"":
            return _stop("the node daemon is gone")
        if os.path.exists(path):
            pong = _answers(endpoint, msgs.Ping())
            if isinstance(pong, msgs.Pong) and pong.pid == os.getpid():
                break
    ctl.sendall(b"R")
    last = time.monotonic()
    next_status = last + 1.0
    released = False  # the job ended (Slurm's epilog): leave as soon as no client is left
    while True:
        got = _recv(ctl, 0.25)
        now = time.monotonic()
        if got == b"":
            return _stop("the node daemon is gone")
        if got and b"T" in got:
            last, released = now, False
        if got and b"I" in got:
            released, next_status = True, now
        if now < next_status:
            continue
        next_status = now + 1.0
        st = _answers(endpoint, msgs.StatusQuery())
        if not isinstance(st, StatusReply) or st.clients:
            last = now
            continue
        if now - last < idle and not released:
            continue
        ctl.sendall(b"S")
        cancelled = False
        while True:
            got = _recv(ctl, 30.0)
            if not got:  # userd gone (or silent for 30 s): leave
                return _stop("the node daemon is gone")
            cancelled = cancelled or b"T" in got.split(b"K")[0]
            if b"K" in got:
                break
        if not cancelled:
            return _stop("released after its user's job" if released else f"no client for {idle:g} s")
        ctl.sendall(b"A")
        last, released = time.monotonic(), False


def main(argv: list[str] | None = None) -> int:
    """``python -m matspoold.userserve IDLE_S -- serve --endpoint ipc://... [flags]``."""
    _nondumpable()
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 4 or args[1] != "--" or args[2] != "serve" or "--endpoint" not in args:
        print(
            "usage: python -m matspoold.userserve IDLE_S -- serve --endpoint ipc://PATH ...", file=sys.stderr
        )
        return 2
    idle = float(args[0])
    serve = args[2:]
    endpoint = serve[serve.index("--endpoint") + 1]
    ctl = socket.socket(fileno=os.dup(0))
    threading.Thread(
        target=_watch, args=(ctl, endpoint, idle), name="matspool-userd-ctl", daemon=True
    ).start()
    from .cli import main as cli_main

    return cli_main(serve)


if __name__ == "__main__":
    sys.exit(main())
