"""Growing v7.3 variables: one step per append along a new trailing MATLAB dimension.

MATLAB size ``[d1 ... dk]`` per step is stored as a chunked dataset of shape
``(n, dk, ..., d1)`` with unlimited ``maxshape`` on the first axis (the last, slowest one
in MATLAB's column-major order), one chunk per step, so MATLAB sees ``[d1 ... dk n]``.
MATLAB's own files hold such chunked datasets, and it reads them like any other.

The first step creates the file under a temporary name and renames it into place; each
later step opens the file, extends every variable by one and closes it again, so between
steps the file is complete and any reader can open it. An append rewrites HDF5 metadata
in place, so it runs under an undo journal (``_journal``): a daemon killed at any
instant of it, or a disk that fills up, leaves the file as it was before that step
once the journal is recovered, which the next append or create of the stream does first.

An append reopens the file through its directory's descriptor, ``O_NOFOLLOW`` (a
symlink put at the stream's name is refused, never followed), and only a regular file
with one link (a hard link could lead to a file outside every root); when this daemon
created the stream, the file must still be the inode it created (:data:`STREAMS`).
"""

from __future__ import annotations

import errno
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import h5py
import numpy as np

from matspool._errors import WriteFailed
from matspool._protocol import VarSpec

from ..fsconfine import Target, as_target, failed, open_in
from ._journal import journaled, recover
from ._v73values import _stored, _str_attr
from .v73 import USERBLOCK, header

__all__ = ["STREAMS", "StreamFiles", "append_step", "create_stream", "open_to_append"]


class StreamFiles:
    """The inode each stream this daemon created got, keyed by its directory's identity
    and name: an append to a file someone put in its place since is refused. Streams
    from before a restart are not known; they are still opened only without symlinks
    and with one link. Writer threads share it (one job per path at a time; the lock
    guards the dict)."""

    KEPT = 4096

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._files: OrderedDict[tuple[int, int, str], tuple[int, int]] = OrderedDict()

    @staticmethod
    def _key(target: Target) -> tuple[int, int, str]:
        st = os.fstat(target.dir_fd)
        return st.st_dev, st.st_ino, target.name

    def created(self, target: Target, st: os.stat_result) -> None:
        key = self._key(target)
        with self._lock:
            self._files[key] = (st.st_dev, st.st_ino)
            self._files.move_to_end(key)
            while len(self._files) > self.KEPT:
                self._files.popitem(last=False)

    def check(self, target: Target, st: os.stat_result) -> None:
        """Raise unless ``st`` may be appended to as ``target``'s stream."""
        if st.st_nlink != 1:
            raise failed(
                f"cannot append to {target.path!r}: it has {st.st_nlink} hard links (a link to "
                "a file elsewhere?); a stream's file has one",
                errno.EMLINK,
            )
        with self._lock:
            known = self._files.get(self._key(target))
        if known is not None and known != (st.st_dev, st.st_ino):
            raise failed(
                f"cannot append to {target.path!r}: the file was replaced since the daemon "
                "created the stream",
                errno.ESTALE,
            )


#: the streams created by this daemon
STREAMS = StreamFiles()


def _step_shape(spec: VarSpec) -> tuple[int, ...]:
    return tuple(spec.dims[::-1])


#: steps at least this large are written as raw chunks (``_put_step``)
DIRECT_CHUNK_BYTES = 1 << 20


def _put_step(ds: h5py.Dataset, n: int, data: np.ndarray, deflated: bool | int) -> None:
    """Step ``n`` (one chunk) from the ring. A large uncompressed one goes as the chunk's
    raw bytes (``H5Dwrite_chunk``) straight from the ring: HDF5's own write path copies a
    step into a chunk buffer of its size first (a 256 MiB step took the daemon from 28 to
    290 MiB of its own memory; ``bench.daemon_rss``). The file holds the same objects and
    bytes; where the dataset's header needs a continuation block (complex and logical
    steps: their attributes overflow it), HDF5's path wrote the first chunk only at close,
    after that block, and a raw chunk lands before it: byte for byte the same file
    otherwise. Small steps keep HDF5's path, whose small-data block packs tiny chunks
    beside the metadata (a raw chunk write would leave 2 KiB gaps); deflated steps go
    through HDF5's filter, which needs its buffers anyway."""
    if deflated or data.nbytes < DIRECT_CHUNK_BYTES:
        ds[n] = data
    else:
        ds.id.write_direct_chunk(
            (n,) + (0,) * data.ndim, np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        )


def create_stream(path: str, variables: Sequence[tuple[VarSpec, Any]], level: int = 0) -> None:
    """The file with its first step (written to a temporary name by the caller)."""
    with h5py.File(path, "w", userblock_size=USERBLOCK, libver=("earliest", "v108")) as f:
        for spec, arr in variables:
            data = _stored(spec, arr)
            shape = _step_shape(spec)
            ds = f.create_dataset(
                spec.name,
                shape=(1, *shape),
                maxshape=(None, *shape),
                chunks=(1, *shape),
                dtype=data.dtype,
                compression="gzip" if level else None,
                compression_opts=level or None,
            )
            _put_step(ds, 0, data, level)
            _str_attr(ds, "MATLAB_class", spec.matlab_class)
            if spec.matlab_class == "logical":
                ds.attrs.create("MATLAB_int_decode", np.int32(1))
    with open(path, "r+b") as raw:
        raw.write(header())


def append_step(path: str | Target, variables: Sequence[tuple[VarSpec, Any]], *, fsync: bool) -> int:
    """Extend every variable of the stream at ``path`` by one step; returns the file size."""
    target, owned = as_target(path)
    try:
        return _append(target, variables, fsync)
    finally:
        if owned:
            target.close()


def open_to_append(target: Target) -> int:
    """The stream's file opened read-write for a step (plain or sharded); a file gone
    (its first step failed, or it was removed) is a WriteFailed saying so."""
    try:
        return open_in(target, os.O_RDWR, "stream")
    except FileNotFoundError:
        recover(target)  # drops a journal the removed file left behind
        raise WriteFailed(
            f"cannot append to {target.path!r}: the stream's file is gone (its first step failed, or it was "
            "removed)"
        ) from None


def _append(target: Target, variables: Sequence[tuple[VarSpec, Any]], fsync: bool) -> int:
    path = target.path
    fd = open_to_append(target)
    with journaled(target, fd, fsync=fsync, check=STREAMS.check) as undo, h5py.File(undo, "r+") as f:
        names = {spec.name for spec, _ in variables}
        if names != set(f.keys()):
            raise WriteFailed(
                f"cannot append to {path!r}: this step has variables "
                f"{sorted(names)}, the stream has {sorted(f.keys())}"
            )
        for spec, arr in variables:  # check every variable before changing any
            ds = f[spec.name]
            data = _stored(spec, arr)
            if ds.shape[1:] != _step_shape(spec) or ds.dtype != data.dtype:
                step = "x".join(map(str, spec.dims))
                raise WriteFailed(
                    f"cannot append to {path!r}: {spec.name!r} is {step} {spec.matlab_class} in this "
                    f"step but {'x'.join(map(str, ds.shape[:0:-1]))} {ds.attrs['MATLAB_class'].decode()} "
                    "in the stream"
                )
        n = f[next(iter(names))].shape[0]
        for spec, arr in variables:
            ds = f[spec.name]
            ds.resize(n + 1, axis=0)
            _put_step(ds, n, _stored(spec, arr), ds.compression is not None)
    return undo.size
