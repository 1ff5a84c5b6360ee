"""The node daemon's table of users' writers: one per (uid, gid, groups), started on a
client's first handshake, with the per-uid cap, and the handshake's answers.

``userd`` (the broker) accepts and reads the handshakes; once the kernel said who a client
is, it hands the client here: this module picks (or starts) that user's writer, tells the
client its endpoint when the writer is ready, follows the writers' control bytes (ready,
stopping, alive again) and starts another when one exits with clients waiting.
``userwriters`` does what touches a writer's process or directory.

Threads: owned by ``userd``'s one thread (the loop); ``stopping`` is also set by its signal
handler (a plain flag, no lock).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time

from matspool._errors import DaemonUnavailable

from .peercred import Cred
from .userwriters import Conn, Writer, collect, kill, remove_user_dir, start_writer, terminate

__all__ = ["USERS_SUFFIX", "WriterTable", "answer", "refuse"]

log = logging.getLogger("matspoold")

USERS_SUFFIX = ".users"  # the users' writers' directories: <socket>.users/<key>/sock
_START_S = 60.0  # s a user's writer has to answer on its endpoint
_MAX_WRITERS_PER_UID = 4  # one per (gid, groups) a user's jobs run with


def answer(conn: Conn, reply: dict[str, object]) -> None:
    try:
        conn.sock.settimeout(1.0)
        conn.sock.sendall(json.dumps(reply).encode() + b"\n")
    except OSError:
        pass  # the client left: nothing to tell
    finally:
        conn.sock.close()


def refuse(conn: Conn, message: str) -> None:
    answer(conn, {"ok": False, "code": DaemonUnavailable.code, "message": message})


class WriterTable:
    """The users' writers by key (``<uid>-<gid>-<hash of groups>``), see the module docstring."""

    def __init__(self, path: str, serve_args: list[str], *, state_dir: str, idle: float, root: bool) -> None:
        self.path = path
        self.serve_args = serve_args
        self.state_dir = state_dir
        self.idle = idle
        self.root = root
        self.writers: dict[str, Writer] = {}
        self.stopping = False

    def route(self, conn: Conn) -> None:
        cred = conn.cred
        me = os.geteuid()
        if not self.root and cred.uid != me:
            refuse(
                conn,
                f"this node daemon runs as uid {me}, without the privileges to write as uid "
                f"{cred.uid}: it serves only uid {me}'s jobs (run it as root, deploy/systemd, "
                "or start a daemon of your own: matspool serve)",
            )
            return
        key = self._key(cred)
        w = self.writers.get(key)
        if w is None:
            if sum(1 for x in self.writers.values() if x.cred.uid == cred.uid) >= _MAX_WRITERS_PER_UID:
                refuse(conn, f"uid {cred.uid} has {_MAX_WRITERS_PER_UID} writers (one per group set) already")
                return
            try:
                w = self._start(key, cred)
            except OSError as e:
                log.warning("node daemon: cannot start a writer for uid %d: %s", cred.uid, e)
                refuse(conn, f"the node daemon cannot start a writer for uid {cred.uid}: {e}")
                return
        if w.state == "ready":
            self.send_to(w, conn)
        else:
            w.waiting.append(conn)

    def _key(self, cred: Cred) -> str:
        if not self.root:
            return f"{os.geteuid()}-{os.getegid()}-self"
        digest = hashlib.sha256(",".join(map(str, cred.groups)).encode()).hexdigest()[:12]
        return f"{cred.uid}-{cred.gid}-{digest}"

    def send_to(self, w: Writer, conn: Conn) -> None:
        try:
            w.ctl.sendall(b"T")  # before the answer: the writer must not leave now
        except OSError:
            w.waiting.append(conn)  # it is going: the next one gets the client
            return
        answer(conn, {"ok": True, "endpoint": w.endpoint})

    def _start(self, key: str, cred: Cred) -> Writer:
        w = start_writer(
            key,
            cred,
            directory=os.path.join(self.path + USERS_SUFFIX, key),
            state=os.path.join(self.state_dir, "users", str(cred.uid) if self.root else "self"),
            idle=self.idle,
            serve_args=self.serve_args,
            as_user=self.root,
        )
        self.writers[key] = w
        return w

    def control(self, w: Writer) -> None:
        try:
            got = w.ctl.recv(64)
        except OSError:
            got = b""
        if not got:  # it exited (or closed its end): collect it
            collect(w, 30)
            self.gone(w)
            return
        for b in got:
            if b == ord("R") and w.state == "starting":
                w.state = "ready"
                log.info("the writer of uid %d is ready", w.cred.uid)
                waiting, w.waiting = w.waiting, []
                for conn in waiting:
                    self.send_to(w, conn)
            elif b == ord("S"):
                w.state = "stopping"
                try:
                    w.ctl.sendall(b"K")
                except OSError:
                    pass
            elif b == ord("A") and w.state == "stopping":
                w.state = "ready"
                waiting, w.waiting = w.waiting, []
                for conn in waiting:
                    self.send_to(w, conn)

    def gone(self, w: Writer) -> None:
        """A writer exited: forget it, remove its directory; start another for clients that
        were waiting (they asked while it was leaving)."""
        if self.writers.get(w.key) is w:
            del self.writers[w.key]
        w.ctl.close()
        remove_user_dir(w.directory)
        status = w.proc.returncode
        (log.info if status == 0 else log.warning)("the writer of uid %d exited (%s)", w.cred.uid, status)
        if not w.waiting:
            return
        if self.stopping or w.state == "starting":  # never ready: starting again would loop
            why = (
                "the node daemon is stopping"
                if self.stopping
                else f"the writer of uid {w.cred.uid} exited at start (status {status}); "
                "the node daemon's log says why"
            )
            for conn in w.waiting:
                refuse(conn, why)
            return
        try:
            nw = self._start(w.key, w.cred)
        except OSError as e:
            for conn in w.waiting:
                refuse(conn, f"the node daemon cannot start a writer for uid {w.cred.uid}: {e}")
            return
        nw.waiting = w.waiting

    def describe(self, uid: int | None) -> list[dict[str, object]]:
        """The writers (every user's for None, else only ``uid``'s) for ``matspool status``."""
        now = time.monotonic()
        return [
            {
                "uid": w.cred.uid,
                "gid": w.cred.gid,
                "groups": list(w.cred.groups),
                "state": w.state,
                "pid": w.proc.pid,
                "up_s": round(now - w.started, 1),
                "waiting": len(w.waiting),
                "endpoint": w.endpoint,
            }
            for w in sorted(self.writers.values(), key=lambda w: w.key)
            if uid is None or w.cred.uid == uid
        ]

    def start_timeouts(self, now: float) -> None:
        """Kill a writer that did not get ready within ``_START_S``; refuse its waiting clients."""
        for w in list(self.writers.values()):
            if w.state == "starting" and now - w.started > _START_S:
                log.warning(
                    "the writer of uid %d did not start within %.0f s; killing it", w.cred.uid, _START_S
                )
                for conn in w.waiting:
                    refuse(conn, f"the writer of uid {w.cred.uid} did not start within {_START_S:.0f} s")
                w.waiting.clear()
                terminate(w)
                kill(w)
                w.state = "stopping"
