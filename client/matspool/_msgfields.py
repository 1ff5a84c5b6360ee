"""The field checks every typed message's ``from_wire`` is built from.

Split out of :mod:`matspool._messages` so that the message families kept in their own
modules (:mod:`matspool._msgshard`, :mod:`matspool._msgstatus`) check fields the same way
without importing the dispatch that imports them. Each check raises :class:`ProtocolError`
naming the op and the field. Stateless: any thread may use it.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, ClassVar, Final

from ._errors import ProtocolError

__all__ = ["_Plain", "_flag", "_float", "_int", "_opt_int", "_text"]

_MAX_TEXT: Final = 4096
_I64: Final = 2**63 - 1


def _int(raw: dict[str, Any], key: str, lo: int = 0, hi: int = _I64) -> int:
    value = raw.get(key)
    if type(value) is not int or not lo <= value <= hi:
        raise ProtocolError(f"{raw.get('op')}: {key} must be an integer in [{lo}, {hi}], got {value!r}"[:300])
    return value


def _opt_int(raw: dict[str, Any], key: str, lo: int = 0, hi: int = _I64) -> int | None:
    return None if raw.get(key) is None else _int(raw, key, lo, hi)


def _text(raw: dict[str, Any], key: str, limit: int = _MAX_TEXT) -> str:
    value = raw.get(key)
    if not isinstance(value, str) or len(value) > limit:
        raise ProtocolError(f"{raw.get('op')}: {key} must be a string of at most {limit} characters")
    return value


def _float(raw: dict[str, Any], key: str) -> float:
    value = raw.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProtocolError(f"{raw.get('op')}: {key} must be a number, got {value!r}"[:300])
    return float(value)


def _flag(raw: dict[str, Any], key: str) -> bool:
    value = raw.get(key, False)
    if not isinstance(value, bool):
        raise ProtocolError(f"{raw.get('op')}: {key} must be true or false")
    return value


class _Plain:
    """A message whose wire form is its fields, as they are."""

    __slots__ = ()
    OP: ClassVar[str]

    def to_wire(self) -> dict[str, Any]:
        return {"op": self.OP, **{f.name: getattr(self, f.name) for f in fields(self)}}  # type: ignore[arg-type]
