"""MAT-file writers. Each takes a final path and ``(variable, value)`` pairs: a numeric
``VarSpec`` comes with a read-only column-major view over the client's ring; a struct,
cell, char or sparse ``TreeSpec`` with the values of ``_values.py`` whose numeric leaves
are such views.

``write_atomic`` is the one way a file reaches its final name: written under a temporary
name in the same directory, optionally fsynced, then renamed, so readers never see a
partial file under the name they asked for.
"""

from __future__ import annotations

import itertools
import os
import secrets
from collections.abc import Callable, Sequence

from dataclasses import dataclass
from typing import Any

import numpy as np
from matspool._errors import ProtocolError
from matspool._protocol import Variable, VarSpec

from ._append import append_into
from .stream import create_stream
from .v5 import write_v5
from ._files import pwrite_all
from .v73 import write_v73

__all__ = ["TMP_SUFFIX", "WRITERS", "Session", "Variables", "write_atomic"]

Variables = Sequence[tuple[Variable, Any]]
WRITERS: dict[str, Callable[[str, Variables, int], None]] = {
    "v5": write_v5, "v7.3": write_v73, "stream": create_stream}  # type: ignore[dict-item]
TMP_SUFFIX = ".matspool-tmp"


def _fsync_path(path: str, flags: int = os.O_RDONLY) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_tmp_ids = itertools.count()
_tmp_salt = secrets.token_hex(3)


def _tmp_name(final: str) -> str:
    """Unique within this daemon (a counter) and across daemons (pid and a random salt);
    no ``urandom`` call per file."""
    directory, base = os.path.split(final)
    return os.path.join(directory, f".{base[:180]}.{os.getpid()}-{_tmp_salt}-{next(_tmp_ids)}{TMP_SUFFIX}")


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _publish(tmp: str, final: str, fsync: bool) -> int:
    """Rename the complete temporary file into place (durably with ``fsync``)."""
    if fsync:
        _fsync_path(tmp)
    os.rename(tmp, final)
    if fsync:
        _fsync_path(os.path.dirname(final), os.O_RDONLY | os.O_DIRECTORY)
    return os.stat(final).st_size


def write_atomic(final: str, fmt: str, variables: Variables, *, fsync: bool, compress: int = 0,
                 append: bool = False) -> int:
    """Write ``variables`` to ``final`` in ``fmt`` (deflated at level ``compress`` when not 0);
    with ``append``, into a copy of an existing ``final`` (MATLAB's ``save -append``).
    Returns the file's size in bytes."""
    tmp = _tmp_name(final)
    try:
        if append and os.path.exists(final):
            append_into(final, tmp, variables, compress)
        else:
            WRITERS[fmt](tmp, variables, compress)
        return _publish(tmp, final, fsync)
    except BaseException:
        _unlink(tmp)
        raise


@dataclass(eq=False)
class Session:
    """A save whose largest variables arrive in pieces (each larger than the ring).

    ``begin`` lays the whole file out under a temporary name, leaving holes where the
    deferred bytes go; each piece is ``pwrite``-n into its hole as it arrives; ``end``
    renames the file into place. Until then nothing exists under the final name.
    """

    final: str
    fmt: str
    fsync: bool
    tmp: str
    holes: dict[int, tuple[VarSpec, list[int]]]
    fd: int = -1
    error: BaseException | None = None

    @classmethod
    def begin(cls, final: str, fmt: str, variables: Variables, fsync: bool) -> Session:
        tmp = _tmp_name(final)
        try:
            by_name = WRITERS[fmt](tmp, variables, 0)
            holes = {i: (spec, by_name[spec.name]) for i, (spec, _) in enumerate(variables)
                     if isinstance(spec, VarSpec) and spec.deferred}
            return cls(final, fmt, fsync, tmp, holes, os.open(tmp, os.O_WRONLY))
        except BaseException:
            _unlink(tmp)
            raise

    def write(self, var: int, start: int, data: np.ndarray) -> None:
        """Bytes ``[start, start + len(data))`` of deferred variable number ``var``."""
        if var not in self.holes:
            raise ProtocolError(f"piece for variable #{var}, which is not a deferred variable of this save")
        spec, offsets = self.holes[var]
        itemsize = np.dtype(spec.dtype).itemsize
        if start % itemsize or data.nbytes % itemsize or start + data.nbytes > spec.nbytes:
            raise ProtocolError(f"piece [{start}, {start + data.nbytes}) does not fit variable "
                                f"{spec.name!r} of {spec.nbytes} bytes in whole elements")
        if len(offsets) == 2:  # v5 complex: real and imaginary parts are stored apart
            values = data.view(spec.dtype)
            pwrite_all(self.fd, np.ascontiguousarray(values.real).view(np.uint8), offsets[0] + start // 2)
            pwrite_all(self.fd, np.ascontiguousarray(values.imag).view(np.uint8), offsets[1] + start // 2)
        else:
            pwrite_all(self.fd, data, offsets[0] + start)

    def end(self) -> int:
        self._close()
        try:
            return _publish(self.tmp, self.final, self.fsync)
        except BaseException:
            _unlink(self.tmp)
            raise

    def abort(self) -> None:
        self._close()
        _unlink(self.tmp)

    def _close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
