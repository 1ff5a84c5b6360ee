"""MATLAB's ``save -append``: variables added to, or replaced in, an existing .mat file.

The file keeps its own format (as in MATLAB, whatever the save asked for). The result is
built under the temporary name the caller renames into place, so the old file stays whole
until the new one is complete: v5 copies the kept elements byte for byte; v7.3 copies the
file and edits the copy in place.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from typing import Any

import h5py

from matspool._errors import UnsupportedTypeError
from matspool._protocol import Variable

from .v5 import append_v5
from .v73 import append_v73

__all__ = ["append_into", "file_format"]


def file_format(path: str) -> str:
    """``"v5"`` or ``"v7.3"`` for a MAT file; anything else cannot be appended to."""
    if h5py.is_hdf5(path):
        return "v7.3"
    with open(path, "rb") as f:
        head = f.read(128)
    if head.startswith(b"MATLAB 5.0 MAT-file") and len(head) == 128:
        return "v5"
    raise UnsupportedTypeError(f"{path} is not a MAT v5 or v7.3 file: append=True cannot add to it")


def append_into(existing: str, tmp: str, variables: Sequence[tuple[Variable, Any]], level: int) -> None:
    """``existing`` plus ``variables`` (replacing those of the same names), written to ``tmp``."""
    if file_format(existing) == "v7.3":
        shutil.copyfile(existing, tmp)
        append_v73(tmp, variables, level)
    else:
        append_v5(existing, tmp, variables, level)
