"""MAT-file writers. Each takes a final path and ``(variable, value)`` pairs: a numeric
``VarSpec`` comes with a read-only column-major view over the client's ring; a struct,
cell or char ``TreeSpec`` with Python objects (dict, object ndarray, str) whose numeric
leaves are such views.

``write_atomic`` is the one way a file reaches its final name: written under a temporary
name in the same directory, optionally fsynced, then renamed, so readers never see a
partial file under the name they asked for.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Sequence

from typing import Any

from matspool._protocol import Variable

from .stream import create_stream
from .v5 import write_v5
from .v73 import write_v73

__all__ = ["TMP_SUFFIX", "WRITERS", "Variables", "write_atomic"]

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


def write_atomic(final: str, fmt: str, variables: Variables, *, fsync: bool, compress: int = 0) -> int:
    """Write ``variables`` to ``final`` in ``fmt`` (deflated at level ``compress`` when not 0);
    returns the file's size in bytes."""
    directory, base = os.path.split(final)
    tmp = os.path.join(directory, f".{base[:180]}.{secrets.token_hex(4)}{TMP_SUFFIX}")
    try:
        WRITERS[fmt](tmp, variables, compress)
        if fsync:
            _fsync_path(tmp)
        os.rename(tmp, final)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if fsync:
        _fsync_path(directory, os.O_RDONLY | os.O_DIRECTORY)
    return os.stat(final).st_size
