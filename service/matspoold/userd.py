"""The node daemon that writes as each job's user: a small root broker, one writer per user.

A node daemon serving many users must not write their files as itself (ownership,
permissions, per-uid quotas) and must not trust a client's word about who it is. So the
node daemon (``python -m matspoold.userd``, run by systemd as root) never parses a save:

1. A client connects to ``<socket>.hello``, a plain AF_UNIX stream socket beside the
   endpoint, and sends one line (``{"op": "USER_HELLO"}``). The kernel tells the broker
   who connected (``SO_PEERCRED``/``SO_PEERGROUPS``, ``peercred``); nothing the client
   says about itself is read.
2. The broker starts (once per uid, gid and groups) that user's writer: a plain
   ``matspool serve`` run with exactly those ids (``userserve``), on a private endpoint
   ``<socket>.users/<uid>-<gid>-<hash>/sock`` in a 0700 directory owned by the user, and
   answers the client with that endpoint.
3. The client speaks the unchanged ZeroMQ protocol to its own writer, which maps its
   ring as a same-user per-job daemon does. Files are created by a process with the
   user's uid, gid and groups: owned by the user, allowed exactly where the user is.

A user's writer leaves after ``idle`` seconds without clients (``userserve`` says when;
the broker never connects to a path in a user's directory). The broker also binds the
endpoint itself (ZeroMQ) and answers PING there (Slurm's prolog, ``matspool ping``);
any other request there is refused, naming the handshake socket. ``matspool status``
asks the handshake socket (``USERS_STATUS``): the writers, only the caller's own unless
the caller is root.

``usertable`` keeps the table of users' writers (one per uid, gid and groups, the per-uid
cap, their control bytes) and ``userwriters`` starts, stops and cleans up after them; this
module is the loop, the endpoint and the handshake (accept, read, who may release).

Not root, the broker can only start writers as itself: it serves clients of its own uid
and refuses any other with a clear message.

Threads: one. The loop (``serve``) owns every socket, child and table; the signal
handler only sets a flag.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import secrets
import signal
import socket
import sys
import time
from collections.abc import Sequence

import zmq

from matspool import _messages as msgs
from matspool import _protocol as proto
from matspool._errors import DaemonUnavailable, ProtocolError

from .endpoint import IpcClaim, claim_ipc
from .peercred import peer_cred
from .usertable import USERS_SUFFIX, WriterTable, answer, refuse
from .userwriters import Conn, collect, remove_user_dir, terminate

__all__ = ["HELLO_SUFFIX", "Broker", "main"]

log = logging.getLogger("matspoold")

HELLO_SUFFIX = ".hello"  # the handshake socket: <socket>.hello
_REQUEST_MAX = 4096  # bytes of a handshake request
_REQUEST_S = 5.0  # s a client has to send it
_MAX_PENDING = 256  # handshakes waiting, all users together
_MAX_PENDING_PER_UID = 16
# flags the broker sets for each user's writer itself: an administrator's would conflict
_RESERVED = ("--endpoint", "--socket-mode", "--group", "--state-dir", "--metrics", "--parent-pid", "--config")


class Broker:
    """See the module docstring."""

    def __init__(
        self, endpoint: str, serve_args: Sequence[str], *, state_dir: str, idle: float = 60.0
    ) -> None:
        if not endpoint.startswith("ipc://") or len(endpoint) <= len("ipc://"):
            raise ValueError(f"the node daemon serves an ipc:// endpoint, not {endpoint!r}")
        for arg in serve_args:
            if arg.split("=", 1)[0] in _RESERVED:
                raise ValueError(f"{arg.split('=', 1)[0]} is set by the node daemon for each user's writer")
        self.endpoint = endpoint
        self.path = os.path.abspath(endpoint[len("ipc://") :])
        self.serve_args = list(serve_args)
        self.state_dir = state_dir
        self.idle = idle
        self.instance = secrets.token_hex(8)
        self.root = os.geteuid() == 0
        self.table = WriterTable(self.path, self.serve_args, state_dir=state_dir, idle=idle, root=self.root)
        self.conns: dict[int, Conn] = {}
        self._stopping = False
        self._claim: IpcClaim | None = None

    def stop(self) -> None:
        """Stop every user's writer (each finishes its accepted saves), then leave. Takes no
        lock: safe from a signal handler."""
        self._stopping = True
        self.table.stopping = True

    # -- setting up --------------------------------------------------------------------
    def _bind(self, router: zmq.Socket[bytes]) -> socket.socket:
        directory = os.path.dirname(self.path)
        os.makedirs(directory, mode=0o755, exist_ok=True)
        self._claim = claim_ipc(self.endpoint)  # one node daemon per endpoint
        old = os.umask(0o177)
        try:
            router.bind(self.endpoint)
            self._claim.bound()
            hello = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                os.unlink(self.path + HELLO_SUFFIX)  # ours to replace: we hold the claim
            except FileNotFoundError:
                pass
            hello.bind(self.path + HELLO_SUFFIX)
        finally:
            os.umask(old)
        # anyone may ask; what they get depends only on who the kernel says they are
        os.chmod(self.path, 0o666)
        os.chmod(self.path + HELLO_SUFFIX, 0o666)
        hello.listen(128)
        hello.setblocking(False)
        users = self.path + USERS_SUFFIX
        if os.path.isdir(users) and not os.path.islink(users):  # a killed broker's: its writers
            for name in os.listdir(users):  # are gone too (they stop when it does)
                remove_user_dir(os.path.join(users, name))
        remove_user_dir(users)
        os.mkdir(users, 0o711)  # users reach their own directory, but cannot list the others
        os.chmod(users, 0o711)
        return hello

    # -- the loop ----------------------------------------------------------------------
    def serve(self) -> None:
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        router = ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.MAXMSGSIZE, proto.MAX_MESSAGE_BYTES + 4096)
        router.setsockopt(zmq.LINGER, 0)
        hello: socket.socket | None = None
        try:
            hello = self._bind(router)
            log.info(
                "node daemon serving %s (handshake %s%s), writing as each client's user%s",
                self.endpoint,
                self.path,
                HELLO_SUFFIX,
                "" if self.root else f" (not root: only uid {os.geteuid()})",
            )
            while True:
                if self._stopping and hello is not None:
                    hello.close()
                    os.unlink(self.path + HELLO_SUFFIX)
                    hello = None
                    for conn in list(self.conns.values()):
                        self._drop_conn(conn, "the node daemon is stopping")
                    for w in self.table.writers.values():
                        for conn in w.waiting:
                            refuse(conn, "the node daemon is stopping")
                        w.waiting.clear()
                        terminate(w)
                if self._stopping and not self.table.writers:
                    break
                poller = zmq.Poller()
                poller.register(router, zmq.POLLIN)
                if hello is not None:
                    poller.register(hello.fileno(), zmq.POLLIN)
                for fd in self.conns:
                    poller.register(fd, zmq.POLLIN)
                for w in self.table.writers.values():
                    poller.register(w.ctl.fileno(), zmq.POLLIN)
                ready = {fd for fd, _ in poller.poll(200) if isinstance(fd, int)}
                self._answer_router(router)
                if hello is not None and hello.fileno() in ready:
                    self._accept(hello)
                for fd in ready & set(self.conns):
                    self._read(self.conns[fd])
                for w in list(self.table.writers.values()):
                    if w.ctl.fileno() in ready:
                        self.table.control(w)
                self._timeouts()
        finally:
            if hello is not None:
                hello.close()
                try:
                    os.unlink(self.path + HELLO_SUFFIX)
                except FileNotFoundError:
                    pass
            for w in list(self.table.writers.values()):
                terminate(w)
                collect(w, 300)
                self.table.gone(w)
            remove_user_dir(self.path + USERS_SUFFIX)
            router.close(0)
            ctx.term()
            if self._claim is not None:
                self._claim.release()
            log.info("node daemon stopped")

    def _answer_router(self, router: zmq.Socket[bytes]) -> None:
        """PING on the endpoint itself; anything else is for a user's writer."""
        for _ in range(64):
            try:
                frames = router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) < 2:
                continue
            ident = frames[0]
            reply: msgs.Reply
            try:
                raw = proto.decode_head(frames[1], frames[2] if len(frames) > 2 else b"{}")
                op = raw["op"]
            except Exception:  # noqa: BLE001 - refused like any other
                op = "?"
            if op == "PING":
                reply = msgs.Pong(self.instance, os.getpid())
            else:
                reply = msgs.Err(
                    -1,
                    DaemonUnavailable.code,
                    f"{self.endpoint} is a node daemon that writes as each client's user: "
                    f"a client first connects to {self.path}{HELLO_SUFFIX} (matspool does so "
                    "by itself since this version; upgrade the client)",
                )
            try:
                router.send_multipart([ident, *msgs.encode(reply)], zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # the asker left

    # -- handshakes --------------------------------------------------------------------
    def _accept(self, hello: socket.socket) -> None:
        for _ in range(64):
            try:
                sock, _ = hello.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and the like: the others' handshakes go on
                log.warning("node daemon: cannot accept a handshake: %s", e)
                return
            try:
                cred = peer_cred(sock)
            except OSError:
                sock.close()
                continue
            conn = Conn(sock, cred, time.monotonic() + _REQUEST_S)
            mine = sum(1 for c in self._all_pending() if c.cred.uid == cred.uid)
            if len(self.conns) + sum(len(w.waiting) for w in self.table.writers.values()) >= _MAX_PENDING:
                refuse(conn, "the node daemon has too many handshakes in progress; try again")
                continue
            if mine >= _MAX_PENDING_PER_UID:
                refuse(conn, f"uid {cred.uid} has {mine} handshakes in progress already; try again")
                continue
            sock.setblocking(False)
            self.conns[sock.fileno()] = conn

    def _all_pending(self) -> list[Conn]:
        return [*self.conns.values(), *(c for w in self.table.writers.values() for c in w.waiting)]

    def _drop_conn(self, conn: Conn, why: str) -> None:
        self.conns.pop(conn.sock.fileno(), None)
        refuse(conn, why)

    def _read(self, conn: Conn) -> None:
        try:
            got = conn.sock.recv(_REQUEST_MAX)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            got = b""
        if not got:
            self.conns.pop(conn.sock.fileno(), None)
            conn.sock.close()
            return
        conn.buf += got
        if b"\n" not in conn.buf:
            if len(conn.buf) >= _REQUEST_MAX:
                self._drop_conn(conn, f"handshake request over {_REQUEST_MAX} bytes")
            return
        self.conns.pop(conn.sock.fileno(), None)
        conn.sock.setblocking(True)
        try:
            raw = json.loads(conn.buf.split(b"\n", 1)[0])
            if not isinstance(raw, dict) or raw.get("op") not in (
                "USER_HELLO",
                "RELEASE_USER",
                "USERS_STATUS",
            ):
                raise ProtocolError('expected {"op": "USER_HELLO"}')
        except (ValueError, ProtocolError) as e:
            refuse(conn, f"bad handshake: {e}")
            return
        if raw["op"] == "RELEASE_USER":
            self._release(conn, raw.get("uid"))
            return
        if raw["op"] == "USERS_STATUS":
            self._status(conn)
            return
        # everything else in the request (a claimed uid, pid, ...) is ignored: the kernel said
        self.table.route(conn)

    def _release(self, conn: Conn, uid: object) -> None:
        """Root's epilog, after a job: the job's user's writers leave now if they have no
        client (instead of after ``idle`` s), so nothing of the job stays on the node."""
        if conn.cred.uid not in (0, os.geteuid()):
            refuse(conn, "only root (Slurm's epilog) may release a user's writers")
            return
        if type(uid) is not int:
            refuse(conn, "RELEASE_USER needs a uid")
            return
        n = 0
        for w in self.table.writers.values():
            if w.cred.uid == uid and w.state == "ready":
                with contextlib.suppress(OSError):
                    w.ctl.sendall(b"I")  # idle now: it leaves unless a client is connected
                    n += 1
        answer(conn, {"ok": True, "writers": n})

    def _status(self, conn: Conn) -> None:
        """``matspool status`` on the node endpoint: this daemon and its users' writers.
        Root (and the broker's own uid) sees every writer; a user only their own, so no one
        learns another user's ids, endpoints or even presence."""
        everyone = conn.cred.uid in (0, os.geteuid())
        writers = self.table.describe(None if everyone else conn.cred.uid)
        node = {"pid": os.getpid(), "instance": self.instance, "endpoint": self.endpoint, "root": self.root}
        answer(conn, {"ok": True, "node": {**node, "idle_exit_s": self.idle}, "writers": writers})

    def _timeouts(self) -> None:
        now = time.monotonic()
        for conn in [c for c in self.conns.values() if c.deadline < now]:
            self._drop_conn(conn, f"no handshake request within {_REQUEST_S} s")
        self.table.start_timeouts(now)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="matspool node",
        description="node daemon: one matspool writer per user, each running as that user",
        epilog="arguments after -- go to each user's `matspool serve` (e.g. --root DIR)",
    )
    p.add_argument("--endpoint", default="ipc:///run/matspool/matspool.sock")
    p.add_argument(
        "--state-dir",
        default=os.environ.get("STATE_DIRECTORY", "/var/lib/matspool").split(":")[0],
        help="users' journals go under DIR/users/UID (default: $STATE_DIRECTORY, else /var/lib/matspool)",
    )
    p.add_argument(
        "--idle-exit", type=float, default=60.0, help="seconds a user's writer stays without clients"
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args, rest = p.parse_known_args(argv)
    if rest and rest[0] == "--":
        rest = rest[1:]
    from .cli import main as cli_main
    from .logs import setup_logging

    # the writers' flags, checked now by `matspool serve` itself: a typo fails the service's
    # start, not every user's first save
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            status = cli_main(["serve", "--print-config", "--endpoint", args.endpoint, *rest])
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else 2
    if status != 0:
        print(f"matspool node: the arguments after -- are not `matspool serve`'s: {rest}", file=sys.stderr)
        return 2
    setup_logging(args.log_level, "text")
    try:
        broker = Broker(args.endpoint, rest, state_dir=args.state_dir, idle=args.idle_exit)
    except ValueError as e:
        print(f"matspoold.userd: {e}", file=sys.stderr)
        return 2
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: broker.stop())
    try:
        broker.serve()
    except OSError as e:
        print(f"matspoold.userd: {e}", file=sys.stderr)
        return 2
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)
    return 0


if __name__ == "__main__":
    sys.exit(main())
