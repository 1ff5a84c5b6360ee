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

from .fsconfine import Target, failed, open_in
from .paths import resolve_target
from .sharded import LAID, ShardJob, _discard, _open_tmp
from .writers._files import Temporary
from .writers._journal import journaled, recover
from .writers.stream import STREAMS
from .writers.v73 import USERBLOCK, _str_attr, header

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
                    return _create(final, steps, fsync, level)
                return _append(final, steps, fsync)
        finally:
            os.close(fd)
    finally:
        _discard(final, tmp)


def _matlab_class(ds: h5py.Dataset) -> str:
    value = ds.attrs.get("MATLAB_class", b"")
    return value.decode() if isinstance(value, bytes) else str(value)


def _create(final: Target, steps: list[h5py.Dataset], fsync: bool, level: int) -> int:
    temp = Temporary(final)
    try:
        with h5py.File(temp.path, "w", userblock_size=USERBLOCK, libver=("earliest", "v108")) as f:
            for s in steps:
                if s.size == 0:  # HDF5 cannot chunk a step of nothing
                    raise WriteFailed(
                        f"cannot create the stream {final.path!r}: {s.name[1:]!r} is empty; a stream "
                        "variable needs at least one element per step"
                    )
                ds = f.create_dataset(
                    s.name,
                    shape=(1, *s.shape),
                    maxshape=(None, *s.shape),
                    chunks=(1, *s.shape),
                    dtype=s.dtype,
                    compression="gzip" if level else None,
                    compression_opts=level or None,
                )
                _copy(s, ds, 0)
                for key, value in s.attrs.items():
                    if key in _STRING_ATTRS:
                        _str_attr(ds, key, value.decode() if isinstance(value, bytes) else str(value))
                    else:
                        ds.attrs.create(key, value)
        with open(temp.path, "r+b") as raw:
            raw.write(header())
        STREAMS.created(final, os.fstat(temp.fd))
        return temp.publish(fsync)
    except BaseException:
        temp.discard()
        raise


def _append(final: Target, steps: list[h5py.Dataset], fsync: bool) -> int:
    """One journaled step, as ``writers.stream`` appends a plain one (same checks)."""
    path = final.path
    try:
        fd = open_in(final, os.O_RDWR, "stream")
    except FileNotFoundError:
        recover(final)  # drops a journal the removed file left behind
        raise WriteFailed(
            f"cannot append to {path!r}: the stream's file is gone (its first step failed, or it was removed)"
        ) from None
    with journaled(final, fd, fsync=fsync, check=STREAMS.check) as undo, h5py.File(undo, "r+") as f:
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
            _copy(s, ds, n)
    return undo.size


def _copy(src: h5py.Dataset, ds: h5py.Dataset, n: int) -> None:
    """``src`` as step ``n`` of ``ds``: whole, or (a large uncompressed step) in slabs
    along its slowest axis, so the daemon never holds a whole large step."""
    row = src.nbytes // max(src.shape[0], 1)
    if src.nbytes <= _SLAB_BYTES or ds.compression is not None or src.ndim < 1:
        ds[n] = src[()]
        return
    rows = max(1, _SLAB_BYTES // max(row, 1))
    for a in range(0, src.shape[0], rows):
        b = min(a + rows, src.shape[0])
        ds[n, a:b] = np.asarray(src[a:b])
