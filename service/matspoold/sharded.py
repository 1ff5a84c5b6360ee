"""A save sharded over ranks: lay the file out, write blocks in place, publish, discard.

One file holds a global array whose blocks come from several client processes, each
through its own daemon (possibly on other nodes, sharing the filesystem). The clients
coordinate among themselves (``matspool._shard``, over torch.distributed's store); each
daemon only does what one message asks:

- LAYOUT: a v7.3 (or v5) file under a temporary name beside the final one (journaled
  like every temporary, so a killed daemon's is swept), with holes of the global sizes
  (v7.3: contiguous, early-allocated, unfilled datasets); answers the temporary's name
  and each variable's data offset;
- PLACE: one column-major block from the sender's ring, ``pwrite``-n into its runs of
  contiguous elements (MATLAB's first index is the fastest in the file);
- PUBLISH: fsync (when asked) and rename the temporary to the final name, checking that
  the inode renamed is the one opened (as every publish does);
- DISCARD: remove the temporary.

Confinement as for every write: the final path is resolved below a root to an open
directory (``fsconfine``); the temporary is a matspool temporary's name (checked in the
message) in that directory, opened ``O_NOFOLLOW``, a regular file, never created by
PLACE; every write lies inside the laid-out dataset (checked against its size and the
file's). Blocks never overlap a dataset's header: offsets come from the LAYOUT.

Threads: the control thread makes :class:`ShardJob` values; ``execute`` runs on a writer
thread (the scheduler orders jobs by final path). No state of its own.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from matspool import _messages as msgs
from matspool import _protocol as proto
from matspool._errors import MatspoolError, ProtocolError
from matspool._msgshard import Discard, LaidOut, Layout, Place, Publish, ShardVar

from .fsconfine import Target, failed, open_in
from .jobs import Job
from .paths import resolve_target
from .ringio import ShmRing
from .writers import writer_for
from .writers._files import Temporary, temp_prefix

__all__ = ["LAID", "ShardJob", "ShardOp", "Unpublished", "lay_out", "runs"]

ShardOp = Layout | Place | Publish | Discard

_MAX_RUNS_PER_BATCH = 1 << 16  # run starts computed at a time (bounded memory per block)


log = logging.getLogger("matspoold")


class Unpublished:
    """Temporaries laid out for a client and not yet published or discarded, so that the
    client's death (every rank of a job killed at once: nobody left to DISCARD) leaves
    none behind: the save can never be published without its rank 0.

    Threads: writer threads record and settle; the control thread forgets a dropped
    client's; one lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_client: dict[bytes, dict[str, str]] = {}  # ident -> {tmp: final path}

    def laid(self, ident: bytes, path: str, tmp: str) -> None:
        with self._lock:
            self._by_client.setdefault(ident, {})[tmp] = path

    def settled(self, tmp: str) -> None:
        with self._lock:
            for temps in self._by_client.values():
                temps.pop(tmp, None)

    def forget(self, ident: bytes, roots: Sequence[str]) -> None:
        """``ident`` is dropped (dead or gone): remove the temporaries it laid out."""
        with self._lock:
            temps = self._by_client.pop(ident, {})
        for tmp, path in temps.items():
            with contextlib.suppress(Exception), resolve_target(path, roots) as final:
                _discard(final, tmp)
                log.info("removed %s beside %s: the client that laid it out is gone", tmp, path)


#: the daemon's record (one daemon per process)
LAID = Unpublished()


def _request(op: ShardOp, ident: bytes) -> proto.WriteRequest:
    """The job's stand-in WRITE: the scheduler orders jobs by its path, replies use its seq.
    A client's PLACEs are ordered among themselves only (a key of their own): the ranks
    sharing this daemon write their blocks of one file in parallel, while each client's
    answers still come in the order it sent them (the last one frees its snapshot)."""
    fsync = isinstance(op, Publish) and op.fsync
    key = f"{op.path}\x00place-{ident.hex()}" if isinstance(op, Place) else op.path
    return proto.WriteRequest(op.seq, key, "v7.3", fsync, ())


@dataclass(eq=False, slots=True)
class ShardJob(Job):
    """A LAYOUT, PLACE, PUBLISH or DISCARD on a writer thread."""

    op: ShardOp | None = None
    laid_out: LaidOut | None = None  # LAYOUT's answer, once done
    frame: memoryview | None = None  # a remote (tcp://) client's PLACE: its block (no ring here)

    @classmethod
    def of(cls, client: Any, op: ShardOp, frame: memoryview | None = None) -> ShardJob:
        return cls(client, _request(op, client.ident), "shard", op=op, frame=frame)

    @property
    def op_name(self) -> str:
        return self.op.OP if self.op is not None else "?"

    @property
    def op_path(self) -> str:
        return self.op.path if self.op is not None else "?"

    @property
    def ring_bytes(self) -> int:
        return self.op.nbytes if isinstance(self.op, Place) else 0

    def reply(self, nbytes: int | None) -> msgs.Reply:
        """The answer to a job that succeeded."""
        if self.laid_out is not None:
            return self.laid_out
        assert self.op is not None
        return msgs.Done(((self.op.seq, nbytes or 0),))

    def execute(self, roots: Sequence[str]) -> int | None:
        op = self.op
        assert op is not None
        try:
            return self._execute(op, roots)
        except OSError as e:
            if isinstance(e, MatspoolError):
                raise
            raise failed(f"cannot write {op.path!r}: {e.strerror or e}", e.errno or errno.EIO) from e

    def _execute(self, op: ShardOp, roots: Sequence[str]) -> int | None:
        with resolve_target(op.path, roots) as final:
            if isinstance(op, Layout):
                tmp, offsets = lay_out(final, op.format, op.vars)
                LAID.laid(self.client.ident, op.path, tmp)
                self.laid_out = LaidOut(op.seq, tmp, tuple(offsets.items()))
                return None
            if isinstance(op, Place):
                return self._place(final, op)
            if isinstance(op, Publish):
                try:
                    return _publish(final, op.tmp, op.fsync)
                finally:
                    LAID.settled(op.tmp)
            _discard(final, op.tmp)
            LAID.settled(op.tmp)
            return 0

    def _place(self, final: Target, op: Place) -> int:
        mm = self.client.mm
        if mm is None:  # a remote (tcp://) client: the block came as the message's frame
            if self.frame is None or len(self.frame) != op.nbytes:
                raise ProtocolError("PLACE from a remote (tcp://) client needs its block as one frame")
            data = np.frombuffer(self.frame, np.uint8)
        elif isinstance(mm, ShmRing):
            data = np.frombuffer(mm.read(op.ring_offset, op.nbytes), np.uint8)
        else:
            data = np.frombuffer(mm, np.uint8, op.nbytes, op.ring_offset)
        fd = _open_tmp(final, op.tmp, os.O_WRONLY)
        try:
            itemsize = np.dtype(op.dtype).itemsize
            end = op.data_offset + math.prod(op.dims) * itemsize
            size = os.fstat(fd).st_size
            if end > size:
                raise failed(
                    f"cannot write {op.path!r}: a variable of {math.prod(op.dims) * itemsize} bytes at "
                    f"{op.data_offset} does not fit in its laid-out file of {size} bytes",
                    errno.EINVAL,
                )
            parts = [(op.data_offset, data)]
            if op.imag_offset is not None:  # v5 complex: real and imaginary parts apart
                itemsize //= 2
                values = data.view(op.dtype)
                parts = [
                    (op.data_offset, np.ascontiguousarray(values.real).view(np.uint8)),
                    (op.imag_offset, np.ascontiguousarray(values.imag).view(np.uint8)),
                ]
            for base, part in parts:
                if base + math.prod(op.dims) * itemsize > size:
                    raise failed(
                        f"cannot write {op.path!r}: a block would leave its laid-out file", errno.EINVAL
                    )
                for start, src, n in runs(op.dims, op.box_offset, op.box_shape, itemsize):
                    _pwrite_all(fd, part[src : src + n], base + start)
            if op.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        return op.nbytes


def runs(dims: Sequence[int], offset: Sequence[int], shape: Sequence[int], itemsize: int) -> Any:
    """``(file start, block start, nbytes)`` of each run of contiguous bytes a column-major
    block ``shape`` at ``offset`` in a column-major array ``dims`` makes, in block order.

    The leading dimensions the block spans whole, and the first it does not, form one run;
    the dimensions after it enumerate the runs (computed in numpy, a batch at a time)."""
    nd = len(dims)
    strides = [1] * nd
    for i in range(1, nd):
        strides[i] = strides[i - 1] * dims[i - 1]
    j = 0
    while j < nd - 1 and shape[j] == dims[j]:
        j += 1
    run = math.prod(shape[: j + 1]) * itemsize
    base = sum(o * s for o, s in zip(offset, strides, strict=True)) * itemsize
    outer = list(shape[j + 1 :])
    count = math.prod(outer)
    outer_strides = np.array(strides[j + 1 :], dtype=np.int64) * itemsize
    for first in range(0, count, _MAX_RUNS_PER_BATCH):
        k = np.arange(first, min(count, first + _MAX_RUNS_PER_BATCH), dtype=np.int64)
        starts = np.full(k.shape, base, dtype=np.int64)
        rest = k
        for n, stride in zip(outer, outer_strides, strict=True):
            starts += (rest % n) * stride
            rest = rest // n
        # consecutive runs that touch in the file (a block spanning whole columns) merge
        yield from _merged(starts.tolist(), first * run, run)


def _merged(starts: list[int], src: int, run: int) -> Any:
    cur_start, cur_src, cur_n = starts[0], src, run
    for s in starts[1:]:
        src += run
        if s == cur_start + cur_n:
            cur_n += run
            continue
        yield cur_start, cur_src, cur_n
        cur_start, cur_src, cur_n = s, src, run
    yield cur_start, cur_src, cur_n


def _pwrite_all(fd: int, data: np.ndarray, offset: int) -> None:
    view = memoryview(data.data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _temporary_of(final: Target, tmp: str) -> bool:
    """Whether ``tmp`` is named as a temporary of ``final`` (``TempNames``); an older
    daemon's name kept 180 characters of a multibyte name, this one at most 180 bytes."""
    return tmp.startswith((f".{temp_prefix(final.name)}.", f".{final.name[:180]}."))


def _open_tmp(final: Target, tmp: str, flags: int) -> int:
    """The laid-out temporary beside ``final`` (never created here, never via a symlink)."""
    if not _temporary_of(final, tmp):
        raise ProtocolError(f"{tmp!r} is not a temporary of {final.path!r}")
    try:
        return open_in(
            Target(final.dir_fd, tmp, f"{os.path.dirname(final.path)}/{tmp}", final.dir_path), flags
        )
    except FileNotFoundError:
        raise failed(
            f"cannot write {final.path!r}: its temporary {tmp!r} is gone (the save was discarded)",
            errno.ENOENT,
        ) from None


def lay_out(final: Target, fmt: str, variables: Sequence[ShardVar]) -> tuple[str, dict[str, tuple[int, ...]]]:
    """A ``fmt`` file under a temporary name beside ``final``, its variables' bytes left
    as holes of their global sizes (v7.3: contiguous, early-allocated datasets, never
    filled), everything else as any save writes it. Returns the temporary's name and each
    variable's data offsets (v5 complex: the real parts', the imaginary parts')."""
    specs = [
        (proto.VarSpec(v.name, v.dtype, v.dims, 0, v.nbytes, deferred=v.nbytes > 0), None) for v in variables
    ]
    temp = Temporary(final)
    try:
        holes = writer_for(fmt).write(temp.path, specs, 0)
        temp.close()
        return temp.name, {name: tuple(offs) for name, offs in holes.items()}
    except BaseException:
        temp.discard()
        raise


def _publish(final: Target, tmp: str, fsync: bool) -> int:
    """Rename the complete temporary into place (``Temporary.publish``: inode checked)."""
    fd = _open_tmp(final, tmp, os.O_RDONLY)
    temp = Temporary.__new__(Temporary)
    temp.target, temp.name, temp.fd, temp.path = final, tmp, fd, f"/proc/self/fd/{fd}"
    try:
        return temp.publish(fsync)
    except BaseException:
        temp.discard()
        raise


def _discard(final: Target, tmp: str) -> None:
    if not _temporary_of(final, tmp):
        raise ProtocolError(f"{tmp!r} is not a temporary of {final.path!r}")
    try:
        os.unlink(tmp, dir_fd=final.dir_fd)
    except FileNotFoundError:
        pass
