"""The daemon's answers: ERR built from any failure (with its code and OS errno), DONE in
batches.

Threads: the control thread sends every answer (a ZeroMQ socket has one owner).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any, Protocol

from matspool import _messages as msgs
from matspool import _protocol as proto
from matspool._errors import MatspoolError

from .guard import RateLimitedLog

__all__ = ["Sender", "done_frames", "error_msg", "os_errno", "refuse"]

log = logging.getLogger("matspoold")

_DONE_BATCH = 4096  # answers per DONE message: far below the 1 MiB message limit


def os_errno(err: BaseException | None) -> int | None:
    """The OS errno behind ``err``: its own, else that of the OSError it was raised from."""
    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, OSError) and type(err.errno) is int:
            return err.errno
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None


def error_msg(seq: object, err: BaseException) -> msgs.Err:
    """``ERR``: the code names the client's error class; the errno (ENOENT, ENOSPC,
    EACCES ...) becomes the client's ``WriteFailed.errno``."""
    code = err.code if isinstance(err, MatspoolError) else "error"
    number = seq if isinstance(seq, int) and not isinstance(seq, bool) and seq >= 0 else -1
    return msgs.Err(number, code, str(err), os_errno(err))


class Sender(Protocol):
    """Where answers go: the ROUTER, or the guard that bounds its queues (guard.py)."""

    def send_multipart(self, frames: list[Any]) -> Any: ...


_REFUSALS = RateLimitedLog()  # a client sending garbage in a loop must not flood the log


def refuse(router: Sender, ident: bytes, seq: object, err: Exception) -> None:
    """Answer a message with ERR; the client always gets the reason. Called from an
    ``except`` block: a bug of ours (not a MatspoolError) is logged with its traceback, and
    must not take the daemon down either. Log lines are rate-limited per kind (one per
    10 s, with the count of those left out), since a hostile client can repeat a refusal
    as fast as it can send."""
    if isinstance(err, MatspoolError):
        _REFUSALS.warning("refused", "client %r: %s", ident[:64], err)
    elif _REFUSALS.allow("unexpected"):
        log.exception("client %r: unexpected error", ident[:64])
    router.send_multipart([ident, *msgs.encode(error_msg(seq, err))])


_COMPACT = json.JSONEncoder(separators=(",", ":"))  # json.dumps's, made once


def done_frames(answers: list[tuple[int, int]]) -> Iterator[list[bytes]]:
    """A client's finished saves ``(seq, nbytes)`` as the frames of few DONE messages (one
    per ``_DONE_BATCH`` answers, not one per file, when many small files finish at once),
    byte for byte what ``msgs.encode`` makes of ``msgs.Done`` of them, without a ``Done``
    and a list per answer: they are built on the control thread, a burst's bottleneck."""
    for i in range(0, len(answers), _DONE_BATCH):
        chunk = answers[i : i + _DONE_BATCH]
        if len(chunk) == 1:
            ((seq, nbytes),) = chunk
            body = b'{"op":"DONE","seq":%d,"nbytes":%d}' % (seq, nbytes)
        else:  # json.dumps writes tuples as lists
            body = b'{"op":"DONE","done":' + _COMPACT.encode(chunk).encode() + b"}"
        yield [proto.TAG, body]
