"""Binding the daemon's socket: an ipc socket in a directory only this user controls,
claimed first (``endpoint``), or a tcp:// one behind CURVE keys.

Split out of ``server`` so the control loop reads as the loop. A :class:`Listener` keeps
what binding took (the ipc claim, the CURVE authenticator) for ``Daemon.serve`` to release,
also when binding failed half way.

Threads: owned by the thread that runs ``Daemon.serve``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import zmq

from matspool._curve import is_tcp, load_secret
from matspool._endpoint import check_ipc_endpoint, make_private_dirs

from .endpoint import IpcClaim, claim_ipc

__all__ = ["Listener"]


class Listener:
    """How the daemon listens (endpoint, keys, socket mode and group) and what it holds
    once bound."""

    def __init__(
        self,
        ctx: zmq.Context[Any],
        endpoint: str,
        *,
        curve_secret: str | None,
        curve_clients: str | None,
        socket_mode: int,
        socket_group: str | None,
    ) -> None:
        self.ctx = ctx
        self.endpoint = endpoint
        self.curve_secret = curve_secret
        self.curve_clients = curve_clients
        self.socket_mode = socket_mode
        self.socket_group = socket_group
        self.auth: Any = None  # zmq.auth's ThreadAuthenticator, for tcp://
        self.claim: IpcClaim | None = None

    def bind(self, sock: zmq.Socket[bytes], listening: Callable[[str], None]) -> None:
        """Bind ``sock``; ``listening`` gets the endpoint libzmq bound (``Guard.listening``)
        before any client can reach it. An ipc socket is bound at a name of its own in its
        private directory and renamed into place after that: libzmq accepts from the
        moment it listens, and a flood already knocking at the path when the daemon started
        had run it out of descriptors (EMFILE aborts libzmq) before the guard's door was
        found (3 of 3 starts at 64 descriptors)."""
        if is_tcp(self.endpoint):
            from zmq.auth.thread import ThreadAuthenticator

            if not os.path.isdir(self.curve_clients or ""):
                raise ValueError(f"--curve-clients {self.curve_clients!r} is not a directory")
            self.auth = ThreadAuthenticator(self.ctx)
            self.auth.start()
            self.auth.configure_curve(domain="*", location=self.curve_clients or "")
            assert self.curve_secret is not None  # __init__ refuses tcp:// without keys
            public, secret = load_secret(self.curve_secret)
            sock.curve_publickey, sock.curve_secretkey = public, secret
            sock.curve_server = True
            sock.bind(self.endpoint)
            listening(self.endpoint)
            return
        if not self.endpoint.startswith("ipc://"):
            sock.bind(self.endpoint)
            listening(self.endpoint)
            return
        path = self.endpoint[len("ipc://") :]
        self._own_directory(path)
        self.claim = claim_ipc(self.endpoint)  # EndpointBusy if a live daemon has it
        directory, base = os.path.split(path)
        # as long as the real name (ipc paths are short); libzmq unlinks what is in the way
        aside = os.path.join(directory, ("~" if base[0] != "~" else "-") + base[1:])
        old = os.umask(0o177)  # no window in which the socket is open to others
        try:
            sock.bind("ipc://" + aside)
        finally:
            os.umask(old)
        listening("ipc://" + aside)
        os.rename(aside, path)
        self.claim.bound()
        if self.socket_group is not None:
            import grp

            os.chown(path, -1, grp.getgrnam(self.socket_group).gr_gid)
        os.chmod(path, self.socket_mode)

    def _own_directory(self, path: str) -> None:
        """Make the socket's directory if missing (0700, or 0750 with ``--group``), then
        refuse it unless only this user, root or the configured group controls it: a
        directory another user made first could hold their fake daemon's socket."""
        gid = None
        if self.socket_group is not None:
            import grp

            gid = grp.getgrnam(self.socket_group).gr_gid
        make_private_dirs(self.endpoint)
        directory = os.path.dirname(os.path.abspath(path))
        if not os.path.lexists(directory):
            os.makedirs(os.path.dirname(directory), exist_ok=True)
            try:
                os.mkdir(directory, 0o700 if gid is None else 0o750)
                if gid is not None:
                    os.chown(directory, -1, gid)
            except FileExistsError:
                pass
        check_ipc_endpoint(self.endpoint, group_gid=gid, missing_ok=False)
