"""A sharded stream's step (STEP): a laid-out temporary becomes the stream's next step.

Every step of a stream sharded over ranks (``matspool._shard_stream``) is first written
as a sharded save is (``sharded``): group rank 0's daemon LAYs OUT a temporary of the
step's global sizes, every rank's daemon PLACEs its blocks in it. Then rank 0's daemon
runs STEP, which makes the temporary's datasets

- the stream's first step (``create``): a new chunked file, one chunk per step, as
  ``writers.stream.create_stream`` makes it, written under a temporary name of its own
  and renamed into place (an earlier file at the name stays whole until then);
- or one more step of the existing stream: the same journaled append as a plain stream
  step (``writers._journal``), so a daemon killed at any instant of it, or a full disk,
  leaves every earlier step as it was once the journal is recovered, and the new step
  is in the file, whole, or not at all;

and removes the temporary. Only this daemon ever writes the stream's file: the other
daemons write into the temporary alone (no byte of the live file is exposed to a PLACE).
The price is one more copy of each step (the temporary, read back from the page cache
in slabs, into the stream), made by one daemon.

Threads: the control thread makes :class:`StepJob` values; ``execute`` runs on a writer
thread (the scheduler orders jobs by final path, so a stream's steps and plain appends
to it never interleave). No state of its own.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np

from matspool import _messages as msgs
from matspool import _protocol as proto
from matspool._errors import MatspoolError, WriteFailed
from matspool._msgshard import StreamStep

from .fsconfine import Target, failed
from .paths import resolve_target
from .sharded import LAID, ShardJob, _discard, _open_tmp
from .writers._files import Temporary, pwrite_all
from .writers._journal import journaled
from .writers._v73values import _str_attr
from .writers.stream import STREAMS, open_to_append
from .writers.v73 import USERBLOCK, header

__all__ = ["StepJob", "add_step"]

_SLAB_BYTES = 64 << 20  # a step is copied in slabs of at most this (bounded daemon memory)
_STRING_ATTRS = ("MATLAB_class",)


@dataclass(eq=False, slots=True)
class StepJob(ShardJob):
    """A STEP on a writer thread (answered DONE with the stream's size, or ERR)."""

    step: StreamStep | None = None

    @classmethod
    def of_step(cls, client: Any, op: StreamStep) -> StepJob:
        return cls(client, proto.WriteRequest(op.seq, op.path, "v7.3", op.fsync, ()), "shard", step=op)

    @property
    def op_name(self) -> str:
        return StreamStep.OP

    @property
    def op_path(self) -> str:
        return self.step.path if self.step is not None else "?"

    def reply(self, nbytes: int | None) -> msgs.Reply:
        assert self.step is not None
        return msgs.Done(((self.step.seq, nbytes or 0),))

    def execute(self, roots: Sequence[str]) -> int | None:
        op = self.step
        assert op is not None
        try:
            with resolve_target(op.path, roots) as final:
                try:
                    return add_step(final, op.tmp, create=op.create, fsync=op.fsync, level=op.level)
                finally:
                    LAID.settled(op.tmp)
        except OSError as e:
            if isinstance(e, MatspoolError):
                raise
            raise failed(f"cannot write {op.path!r}: {e.strerror or e}", e.errno or errno.EIO) from e


def add_step(final: Target, tmp: str, *, create: bool, fsync: bool, level: int = 0) -> int:
    """The laid-out temporary ``tmp`` beside ``final`` as the stream's first (``create``)
    or next step; the temporary is removed whatever happens. Returns the stream's size."""
    try:
        fd = _open_tmp(final, tmp, os.O_RDONLY)
        try:
            with h5py.File(f"/proc/self/fd/{fd}", "r") as src:
                names = [n for n in src if not n.startswith("#")]
                if not names or not all(isinstance(src[n], h5py.Dataset) for n in names):
                    raise WriteFailed(f"cannot add a step to {final.path!r}: {tmp!r} holds no step")
                steps = [src[n] for n in names]
                if create:
                    return _create(final, fd, steps, fsync, level)
                return _append(final, fd, steps, fsync)
        finally:
            os.close(fd)
    finally:
        _discard(final, tmp)


def _matlab_class(ds: h5py.Dataset) -> str:
    value = ds.attrs.get("MATLAB_class", b"")
    return value.decode() if isinstance(value, bytes) else str(value)


def _new_dataset(f: h5py.File, s: h5py.Dataset, level: int) -> h5py.Dataset:
    """A stream variable as ``writers.stream`` makes it (one chunk per step, unlimited
    steps), its chunks allocated as the dataset grows and never filled: a step's chunk
    exists, at an address, before its bytes are copied in."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_chunk((1, *s.shape))
    if level:
        dcpl.set_deflate(level)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    space = h5py.h5s.create_simple((1, *s.shape), (h5py.h5s.UNLIMITED, *s.shape))
    dsid = h5py.h5d.create(f.id, s.name[1:].encode(), s.id.get_type(), space, dcpl=dcpl)
    return h5py.Dataset(dsid)


def _create(final: Target, src_fd: int, steps: list[h5py.Dataset], fsync: bool, level: int) -> int:
    temp = Temporary(final)
    try:
        copies: list[tuple[int, int, int]] = []
        with h5py.File(temp.path, "w", userblock_size=USERBLOCK, libver=("earliest", "v108")) as f:
            for s in steps:
                if s.size == 0:  # HDF5 cannot chunk a step of nothing
                    raise WriteFailed(
                        f"cannot create the stream {final.path!r}: {s.name[1:]!r} is empty; a stream "
                        "variable needs at least one element per step"
                    )
                ds = _new_dataset(f, s, level)
                _copy(s, ds, 0, 0, copies)
                for key, value in s.attrs.items():
                    if key in _STRING_ATTRS:
                        _str_attr(ds, key, value.decode() if isinstance(value, bytes) else str(value))
                    else:
                        ds.attrs.create(key, value)
        for at in copies:
            _copy_bytes(src_fd, temp.fd, *at)
        with open(temp.path, "r+b") as raw:
            raw.write(header())
        STREAMS.created(final, os.fstat(temp.fd))
        return temp.publish(fsync)
    except BaseException:
        temp.discard()
        raise


def _append(final: Target, src_fd: int, steps: list[h5py.Dataset], fsync: bool) -> int:
    """One journaled step, as ``writers.stream`` appends a plain one (same checks)."""
    path = final.path
    fd = open_to_append(final)
    copies: list[tuple[int, int, int]] = []
    with journaled(final, fd, fsync=fsync, check=STREAMS.check) as undo:
        with h5py.File(undo, "r+") as f:
            names = {s.name[1:] for s in steps}
            if names != set(f.keys()):
                raise WriteFailed(
                    f"cannot append to {path!r}: this step has variables {sorted(names)}, "
                    f"the stream has {sorted(f.keys())}"
                )
            for s in steps:  # check every variable before changing any
                ds = f[s.name]
                if ds.shape[1:] != s.shape or ds.dtype != s.dtype or _matlab_class(ds) != _matlab_class(s):
                    raise WriteFailed(
                        f"cannot append to {path!r}: {s.name[1:]!r} is {'x'.join(map(str, s.shape[::-1]))} "
                        f"{_matlab_class(s)} in this step but {'x'.join(map(str, ds.shape[:0:-1]))} "
                        f"{_matlab_class(ds)} in the stream"
                    )
            n = f[steps[0].name].shape[0]
            for s in steps:
                ds = f[s.name]
                ds.resize(n + 1, axis=0)
                _copy(s, ds, n, undo.base, copies)
        # the new chunks lie past the file's old end: written straight, cut off by a rollback
        for at in copies:
            _copy_bytes(src_fd, undo.fd, *at)
    return undo.size


def _copy(
    src: h5py.Dataset, ds: h5py.Dataset, n: int, floor: int, copies: list[tuple[int, int, int]]
) -> None:
    """``src`` as step ``n`` of ``ds``. An uncompressed step whose chunk is allocated at or
    past ``floor`` (the file's old end: bytes nothing refers to yet) is copied byte for
    byte, file to file in the kernel, once HDF5 closed the file (added to ``copies`` as
    ``(from, to, nbytes)``); else through HDF5, whole, or in slabs along the slowest axis
    when large, so the daemon never holds a whole large step."""
    at = src.id.get_offset()  # the temporary's contiguous data
    if ds.compression is None and at is not None:
        info = ds.id.get_chunk_info_by_coord((n,) + (0,) * src.ndim)
        if info.byte_offset is not None and info.byte_offset >= floor and info.size == src.nbytes:
            copies.append((at, info.byte_offset, src.nbytes))
            return
    row = src.nbytes // max(src.shape[0], 1)
    if src.nbytes <= _SLAB_BYTES or ds.compression is not None:
        ds[n] = src[()]
        return
    rows = max(1, _SLAB_BYTES // max(row, 1))
    for a in range(0, src.shape[0], rows):
        b = min(a + rows, src.shape[0])
        ds[n, a:b] = np.asarray(src[a:b])


def _copy_bytes(src_fd: int, dst_fd: int, src_at: int, dst_at: int, nbytes: int) -> None:
    """``nbytes`` from ``src_fd`` at ``src_at`` to ``dst_fd`` at ``dst_at``: in the kernel
    (``copy_file_range``: no copy through this process; a server-side copy on NFS 4.2),
    or by ``pread``/``pwrite`` in slabs where the filesystem cannot."""
    done = 0
    try:
        while done < nbytes:
            n = os.copy_file_range(src_fd, dst_fd, nbytes - done, src_at + done, dst_at + done)
            if n <= 0:
                break
            done += n
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.ETXTBSY):
            raise
    while done < nbytes:
        chunk = os.pread(src_fd, min(_SLAB_BYTES, nbytes - done), src_at + done)
        if not chunk:
            raise WriteFailed(f"the step's temporary ended {nbytes - done} bytes short")
        pwrite_all(dst_fd, chunk, dst_at + done)
        done += len(chunk)
