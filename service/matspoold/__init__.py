"""matspoold: the matspool writer daemon (``matspool serve`` or ``python -m matspoold``)."""

from .server import Daemon

__all__ = ["Daemon"]
