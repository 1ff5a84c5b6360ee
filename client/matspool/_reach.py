"""Is anybody there? Endpoint checks that make ``Spool()`` fail in seconds, not 30.

ZeroMQ connects lazily and retries for ever, so a typo in an endpoint, a daemon that was
never started, or a stale socket file left by one that died all look, through ZeroMQ,
like a daemon that is slow to start: ``Spool()`` used to sit silent for its whole
``connect_timeout``. Here the endpoint is checked up front (its form) and probed while
the spool waits for the daemon's WELCOME (a missing socket file, a refused connection),
so a wrong endpoint fails after a short grace period with a message that says what to do.

Threads: any (the probes run in ``Spool()``, ``pid_alive`` also on the I/O thread); nothing kept.
"""

from __future__ import annotations

import os
import signal
import socket
from typing import Final

from ._errors import DaemonUnavailable, InvalidOptionError

__all__ = ["GRACE_S", "check_endpoint", "exit_text", "pid_alive", "probe"]


# A daemon started together with its client (a job script) gets this long to create its
# socket and listen before a missing or refusing endpoint counts as nobody there.
def _grace() -> float:
    """MATSPOOL_CONNECT_GRACE seconds (default 3), read once at import."""
    try:
        return max(0.0, float(os.environ.get("MATSPOOL_CONNECT_GRACE", 3.0)))
    except ValueError:  # a bad value must not break importing matspool
        return 3.0


GRACE_S: Final = _grace()

_WHAT_TO_DO: Final = (
    "start one (`matspool serve --endpoint {e}`), point MATSPOOL_ENDPOINT or "
    "Spool(endpoint=...) at a running one, or give neither to start an "
    "embedded daemon"
)


def _where(endpoint: str, from_env: bool) -> str:
    return f"MATSPOOL_ENDPOINT={endpoint}" if from_env else f"endpoint {endpoint!r}"


def check_endpoint(endpoint: str, *, from_env: bool = False) -> None:
    """A ZeroMQ endpoint the client can reach: ``ipc://PATH`` or ``tcp://HOST:PORT``."""
    ok = False
    if endpoint.startswith("ipc://"):
        ok = len(endpoint) > len("ipc://")
    elif endpoint.startswith("tcp://"):
        host, _, port = endpoint[len("tcp://") :].rpartition(":")
        ok = bool(host) and port.isdigit()
    if not ok:
        hint = f" (a socket path? write ipc://{os.path.abspath(endpoint)})" if "://" not in endpoint else ""
        raise InvalidOptionError(
            f"{_where(endpoint, from_env)} is not an endpoint matspool can "
            f"connect to: use ipc://PATH or tcp://HOST:PORT{hint}"
        )


def probe(endpoint: str, *, from_env: bool = False) -> None:
    """Raise :class:`DaemonUnavailable` when nobody can be listening at ``endpoint``."""
    why = _nobody(endpoint)
    if why is not None:
        raise DaemonUnavailable(
            f"no matspool daemon at {_where(endpoint, from_env)}: {why}; " + _WHAT_TO_DO.format(e=endpoint)
        )


def _nobody(endpoint: str) -> str | None:
    """Why nobody listens there, or None when somebody might (or we cannot tell)."""
    if endpoint.startswith("ipc://"):
        path = endpoint[len("ipc://") :]
        if path.startswith("@"):
            return None  # an abstract socket: no file to look at
        if not os.path.exists(path):
            return f"the socket file {path} does not exist"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(1.0)
            try:
                s.connect(path)
            except ConnectionRefusedError:
                return f"{path} refuses connections (a stale socket left by a daemon that exited?)"
            except OSError:
                return None
        return None
    if endpoint.startswith("tcp://"):
        host, _, port = endpoint[len("tcp://") :].rpartition(":")
        host = host.strip("[]")
        if host == "*":
            return None
        try:
            with socket.create_connection((host, int(port)), timeout=1.0):
                return None
        except ConnectionRefusedError:
            return f"{host}:{port} refuses connections"
        except socket.gaierror as e:
            return f"host {host!r} is not known ({e.strerror})"
        except OSError:
            return None  # a timeout or a route problem: let ZeroMQ keep trying
    return None


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def exit_text(rc: int) -> str:
    """How a daemon child ended, for a message (a job's shared daemon is started again,
    or says itself what happened: ``_jobdaemon``)."""
    if rc >= 0:
        return f"exited with status {rc}"
    try:
        return f"was killed by {signal.Signals(-rc).name}"
    except ValueError:
        return f"was killed by signal {-rc}"
