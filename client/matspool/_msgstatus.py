"""The daemon's answer to STATUS: itself and each client, for ``matspool status`` and metrics.

Kept apart from :mod:`matspool._messages` (which registers :class:`StatusReply` in its
``DAEMON_OPS``, so ``decode_reply`` reads it like every other reply). Stateless: any
thread may use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from ._errors import ProtocolError
from ._msgfields import _flag, _float, _int, _text

__all__ = ["ClientStatus", "StatusReply"]


@dataclass(frozen=True, slots=True)
class ClientStatus:
    """One client as ``matspool status`` shows it."""

    pid: int
    ring: str
    ring_bytes: int
    queue_depth: int
    ring_bytes_in_flight: int
    files_written: int
    bytes_written: int
    errors: int
    throughput_bytes_per_s: float
    connected_s: float
    oldest_pending_s: float
    silent_s: float
    dead: bool

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> ClientStatus:
        if not isinstance(raw, dict):
            raise ProtocolError("STATUS: each client must be an object")
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.type == "int":
                values[f.name] = _int(raw, f.name, -1)
            elif f.type == "float":
                values[f.name] = _float(raw, f.name)
            elif f.type == "bool":
                values[f.name] = _flag(raw, f.name)
            else:
                values[f.name] = _text(raw, f.name)
        return cls(**values)


@dataclass(frozen=True, slots=True)
class StatusReply:
    """What the daemon is doing, for ``matspool status`` and the metrics endpoint."""

    OP: ClassVar[str] = "STATUS"
    pid: int
    instance: str
    endpoint: str
    roots: tuple[str, ...]
    uptime_s: float
    files_written: int
    bytes_written: int
    errors: int
    clients: tuple[ClientStatus, ...] = field(default=())

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"op": self.OP}
        for f in fields(self):
            wire[f.name] = getattr(self, f.name)
        wire["roots"] = list(self.roots)
        wire["clients"] = [{g.name: getattr(c, g.name) for g in fields(c)} for c in self.clients]
        return wire

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> StatusReply:
        roots, clients = raw.get("roots"), raw.get("clients")
        if not isinstance(roots, list) or not all(isinstance(r, str) for r in roots):
            raise ProtocolError("STATUS: roots must be a list of strings")
        if not isinstance(clients, list):
            raise ProtocolError("STATUS: clients must be a list")
        return cls(
            _int(raw, "pid", 0, 2**31),
            _text(raw, "instance", 64),
            _text(raw, "endpoint"),
            tuple(roots),
            _float(raw, "uptime_s"),
            _int(raw, "files_written"),
            _int(raw, "bytes_written"),
            _int(raw, "errors"),
            tuple(ClientStatus.from_wire(c) for c in clients),
        )
