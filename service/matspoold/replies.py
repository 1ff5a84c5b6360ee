"""The daemon's answers: ERR built from any failure (with its code and OS errno), DONE in
batches.

Threads: the control thread sends every answer (a ZeroMQ socket has one owner).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import zmq
from matspool import _protocol as proto
from matspool._errors import MatspoolError

__all__ = ["done_messages", "error_msg", "os_errno", "refuse"]

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


def error_msg(seq: object, err: BaseException) -> dict[str, Any]:
    """``ERR {seq, code, message[, errno]}``: the code names the client's error class."""
    code = err.code if isinstance(err, MatspoolError) else "error"
    seq = seq if isinstance(seq, int) and not isinstance(seq, bool) and seq >= 0 else -1
    msg: dict[str, Any] = {"op": "ERR", "seq": seq, "code": code, "message": str(err)}
    number = os_errno(err)
    if number is not None:
        msg["errno"] = number  # e.g. ENOENT, ENOSPC, EACCES: for the client's WriteFailed.errno
    return msg


def refuse(router: zmq.Socket[bytes], ident: bytes, seq: object, err: Exception) -> None:
    """Answer a message with ERR. Called from an ``except`` block: a bug of ours (not a
    MatspoolError) is logged with its traceback, and must not take the daemon down either."""
    if isinstance(err, MatspoolError):
        log.warning("client %r: %s", ident[:64], err)
    else:
        log.exception("client %r: unexpected error", ident[:64])
    router.send_multipart([ident, *proto.encode(error_msg(seq, err))])


def done_messages(answers: list[list[int]]) -> Iterator[dict[str, Any]]:
    """A client's finished saves ``[seq, nbytes]`` as few DONE messages: one message, not
    one per file, when many small files finish at once."""
    if len(answers) == 1:
        yield {"op": "DONE", "seq": answers[0][0], "nbytes": answers[0][1]}
        return
    for i in range(0, len(answers), _DONE_BATCH):
        yield {"op": "DONE", "done": answers[i:i + _DONE_BATCH]}
