"""A spool's connection settings, checked before anything is opened.

Where the daemon is (the ``endpoint`` argument, ``$MATSPOOL_ENDPOINT``, a given
transport, or none: the embedded or job daemon, resolved later by ``Spool._open``) and
with which keys; a malformed endpoint or a tcp:// one without keys fails here, naming
what was wrong. Stateless: runs in the thread that makes the spool.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from . import _reach
from ._curve import ClientKeys, is_tcp
from ._transport import Transport

__all__ = ["Settings", "connection"]


@dataclass(frozen=True, slots=True)
class Settings:
    """What a spool was opened with; a forked child opens its own spool with the same."""

    endpoint: str | None
    ring_bytes: int
    ring_mode: int
    heartbeat: float
    connect_timeout: float
    curve: ClientKeys | None


def connection(
    endpoint: str | None,
    transport: Transport | None,
    curve: ClientKeys | None,
    ring_bytes: int,
    ring_mode: int,
    heartbeat: float,
    connect_timeout: float,
) -> tuple[Settings, bool, bool]:
    """The spool's settings, whether its endpoint came from ``$MATSPOOL_ENDPOINT`` (errors
    say so) and whether it is remote (tcp://: payloads travel in frames, keys required)."""
    from_env = transport is None and not endpoint and bool(os.environ.get("MATSPOOL_ENDPOINT"))
    endpoint = (
        transport.endpoint
        if transport is not None
        else (endpoint or os.environ.get("MATSPOOL_ENDPOINT") or None)
    )
    if transport is None and endpoint is not None:
        _reach.check_endpoint(endpoint, from_env=from_env)
    curve = curve or ClientKeys.from_env()
    remote = endpoint is not None and is_tcp(endpoint)
    if remote and curve is None:
        raise ValueError(
            f"{endpoint} is a TCP endpoint: pass curve=ClientKeys(...) or set "
            "MATSPOOL_CURVE_CLIENT_SECRET and MATSPOOL_CURVE_SERVER_PUBLIC"
        )
    return Settings(endpoint, ring_bytes, ring_mode, heartbeat, connect_timeout, curve), from_env, remote
