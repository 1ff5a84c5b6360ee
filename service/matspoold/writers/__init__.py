"""MAT-file writers behind one interface.

A :class:`Writer` writes a new file at a path from ``(variable, value)`` pairs: a numeric
``VarSpec`` comes with a read-only column-major view over the client's ring (``None``
for a deferred variable, whose bytes arrive later in pieces); a struct, cell, char or
sparse ``TreeSpec`` with the values of ``_values.py`` whose numeric leaves are such views.
What a writer can do beyond that it says in capability flags, which callers
ask instead of checking the class (zarr's stores do the same):

- ``supports_parts``: it can lay a file out with holes for deferred variables and say
  where they are (a :class:`Session` then fills them piece by piece);
- ``supports_streaming``: it can :meth:`Writer.append` a step to a file it created;
- ``supports_compression``: a deflate ``level`` 1-9 means something to it.

``write_atomic`` and :class:`Session` are the only ways a file reaches its final name,
both through ``_files.Temporary`` (temporary name, write, fsync, rename, directory
fsync), relative to the open directory of a ``fsconfine.Target`` (the daemon resolves
one per save; a plain path, from tests and tools, is opened by name). Writers are handed
the temporary as ``/proc/self/fd/N``, never by its name. :data:`WRITERS` maps each
format name to its writer.

Threads: writers hold no state of their own (v7.3's template cache has its lock); any
writer thread may call them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from matspool._errors import FormatLimitError, ProtocolError
from matspool._protocol import Variable, VarSpec

from ..fsconfine import Target, as_target, open_in
from ..shmspan import ShmSpan
from ._append import append_into
from ._direct import write_payload
from ._files import SELF_FD, TMP_SUFFIX, Temporary, early_writeback, pwrite_all
from .stream import STREAMS, append_step, create_stream
from .v5 import small_image, write_v5
from .v73 import image_from_template, template_for, write_from_template, write_v73

__all__ = [
    "TMP_SUFFIX",
    "WRITERS",
    "Holes",
    "MatWriter",
    "Session",
    "StreamWriter",
    "Variables",
    "Writer",
    "write_atomic",
    "writer_for",
]

Variables = Sequence[tuple[Variable, Any]]
Holes = dict[str, list[int]]  # deferred variable -> file offsets where its bytes go


class Writer:
    """One MAT-file format."""

    name: str
    supports_parts: ClassVar[bool] = False
    supports_streaming: ClassVar[bool] = False
    supports_compression: ClassVar[bool] = False

    def write(self, path: str, variables: Variables, level: int = 0) -> Holes:
        """Fill ``path`` with ``variables``: in the daemon the new, empty temporary as
        ``/proc/self/fd/N`` (created exclusively by ``Temporary``; opening it truncates
        nothing of anyone's), else created or truncated; with ``supports_parts``, the
        offsets of the deferred variables' holes."""
        raise NotImplementedError

    def append(self, path: str | Target, variables: Variables, *, fsync: bool) -> int:
        """Add one step to the file at ``path`` in place; returns its size."""
        raise ProtocolError(f"the {self.name} format cannot append steps to a file")


class MatWriter(Writer):
    """A whole-file format: v5 (``v5.py``: ``save -v6``, with a level ``-v7``, streamed from
    the ring) or v7.3 (``v73.py``: HDF5 with MATLAB's userblock and attributes). The two
    differ only by name and function."""

    supports_parts = True
    supports_compression = True

    def __init__(self, name: str, write: Callable[[str, Variables, int], Holes]) -> None:
        self.name = name
        self._write = write

    def write(self, path: str, variables: Variables, level: int = 0) -> Holes:
        return self._write(path, variables, level)


class StreamWriter(Writer):
    """A v7.3 time series: each variable grows by one step per append (``stream.py``)."""

    name = "stream"
    supports_streaming = True
    supports_compression = True

    def write(self, path: str, variables: Variables, level: int = 0) -> Holes:
        create_stream(path, _arrays(self.name, variables), level)
        return {}

    def append(self, path: str | Target, variables: Variables, *, fsync: bool) -> int:
        return append_step(path, _arrays(self.name, variables), fsync=fsync)


def _arrays(fmt: str, variables: Variables) -> list[tuple[VarSpec, Any]]:
    out = []
    for spec, value in variables:
        if not isinstance(spec, VarSpec) or spec.deferred:
            raise ProtocolError(f"the {fmt} format takes whole numeric arrays only, not {spec.name!r}")
        if 0 in spec.dims:  # HDF5 cannot chunk a step of nothing
            raise FormatLimitError(
                f"{spec.name!r} is empty ({'x'.join(map(str, spec.dims))}); a "
                f"{fmt} variable needs at least one element per step"
            )
        out.append((spec, value))
    return out


WRITERS: dict[str, Writer] = {
    w.name: w for w in (MatWriter("v5", write_v5), MatWriter("v7.3", write_v73), StreamWriter())
}


def writer_for(fmt: str) -> Writer:
    try:
        return WRITERS[fmt]
    except KeyError:
        raise ProtocolError(f"unknown format {fmt!r}; known: {', '.join(WRITERS)}") from None


def write_atomic(
    final: str | Target,
    fmt: str,
    variables: Variables,
    *,
    fsync: bool,
    compress: int = 0,
    append: bool = False,
    unnamed: bool = False,
) -> int:
    """Write ``variables`` to ``final`` in ``fmt`` (deflated at level ``compress`` when not 0);
    with ``append``, into a copy of an existing ``final`` (MATLAB's ``save -append``);
    with ``unnamed``, a v5 file or a v7.3 file of a known layout through an unnamed
    temporary (``Temporary``: small saves).
    Returns the file's size in bytes."""
    writer = writer_for(fmt)
    target, owned = as_target(final)
    try:
        # unnamed: v5, and v7.3 from a known layout, which write through the descriptor;
        # HDF5 (a new v7.3 layout, streams) resolves /proc/self/fd/N to a name, which an
        # unnamed file does not have
        unnamed = unnamed and not append
        template = template_for(variables, compress) if unnamed and fmt == "v7.3" else None
        temp = Temporary(target, unnamed=unnamed and (fmt == "v5" or template is not None))
        try:
            # a small file's whole image, made in memory: written in one call, its size known
            image = (
                None
                if not unnamed or fsync
                else image_from_template(template, variables)
                if template is not None
                else small_image(variables)
                if fmt == "v5" and not compress
                else None
            )
            if image is not None:  # into the new, empty temporary
                done = os.pwrite(temp.fd, image, 0)
                if done < len(image):  # a short write: the rest, or why not (ENOSPC)
                    pwrite_all(temp.fd, memoryview(image)[done:], done)
                return temp.publish(fsync, len(image))
            existing = _open_existing(target) if append else -1
            try:
                if existing >= 0:
                    append_into(f"{SELF_FD}{existing}", temp.path, variables, compress)
                elif template is not None:
                    write_from_template(temp.path, template, variables)
                elif fsync:
                    with early_writeback(True):
                        writer.write(temp.path, variables, compress)
                else:
                    writer.write(temp.path, variables, compress)
            finally:
                if existing >= 0:
                    os.close(existing)
            if fmt == "stream":
                STREAMS.created(target, os.fstat(temp.fd))
            return temp.publish(fsync)
        except BaseException:
            temp.discard()
            raise
    finally:
        if owned:
            target.close()


def _open_existing(target: Target) -> int:
    """The file already at ``target`` (read-only, never through a symlink), or -1."""
    try:
        return open_in(target, os.O_RDONLY, "save -append")
    except FileNotFoundError:
        return -1


@dataclass(eq=False)
class Session:
    """A save whose largest variables arrive in pieces (each larger than the ring).

    ``begin`` lays the whole file out under a temporary name, leaving holes where the
    deferred bytes go; each piece is ``pwrite``-n into its hole as it arrives; ``end``
    renames the file into place. Until then nothing exists under the final name.
    """

    temp: Temporary  # owns its target (a duplicate of the job's), closed by end/abort
    fsync: bool
    holes: dict[int, tuple[VarSpec, list[int]]]
    fd: int = -1
    error: BaseException | None = None

    @classmethod
    def begin(cls, final: str | Target, fmt: str, variables: Variables, fsync: bool) -> Session:
        writer = writer_for(fmt)
        if not writer.supports_parts:
            raise ProtocolError(f"the {fmt} format cannot take a save in pieces")
        target = final.dup() if isinstance(final, Target) else Target.unconfined(final)
        try:
            temp = Temporary(target)
        except BaseException:
            target.close()
            raise
        try:
            by_name = writer.write(temp.path, variables, 0)
            holes = {
                i: (spec, by_name[spec.name])
                for i, (spec, _) in enumerate(variables)
                if isinstance(spec, VarSpec) and spec.deferred
            }
            return cls(temp, fsync, holes, temp.fd)
        except BaseException:
            temp.discard()
            target.close()
            raise

    def splits(self, var: int) -> bool:
        """Whether variable ``var``'s pieces are split on their way (v5 complex)."""
        return var in self.holes and len(self.holes[var][1]) == 2

    def write(self, var: int, start: int, data: np.ndarray | ShmSpan) -> None:
        """Bytes ``[start, start + len(data))`` of deferred variable number ``var``; a
        :class:`ShmSpan` (a ``/dev/shm`` ring's slab) only where it ``splits`` not."""
        if var not in self.holes:
            raise ProtocolError(f"piece for variable #{var}, which is not a deferred variable of this save")
        spec, offsets = self.holes[var]
        itemsize = np.dtype(spec.dtype).itemsize
        if start % itemsize or data.nbytes % itemsize or start + data.nbytes > spec.nbytes:
            raise ProtocolError(
                f"piece [{start}, {start + data.nbytes}) does not fit variable "
                f"{spec.name!r} of {spec.nbytes} bytes in whole elements"
            )
        if isinstance(data, ShmSpan):  # the kernel copies it from the ring into the file
            data.copy_to(self.fd, offsets[0] + start)
        elif len(offsets) == 2:  # v5 complex: real and imaginary parts are stored apart
            values = data.view(spec.dtype)
            pwrite_all(self.fd, np.ascontiguousarray(values.real).view(np.uint8), offsets[0] + start // 2)
            pwrite_all(self.fd, np.ascontiguousarray(values.imag).view(np.uint8), offsets[1] + start // 2)
        else:  # with fsync, O_DIRECT from the ring where it lines up (writers/_direct.py)
            write_payload(self.fd, data, offsets[0] + start, direct=self.fsync)

    def end(self) -> int:
        """Publish the complete file; its size in bytes."""
        self.fd = -1  # the temporary's own descriptor: publish closes it
        try:
            return self.temp.publish(self.fsync)
        except BaseException:
            self.temp.discard()
            raise
        finally:
            self.temp.target.close()

    def abort(self) -> None:
        self.fd = -1
        self.temp.discard()
        self.temp.target.close()
