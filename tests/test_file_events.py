"""How a saved file appears to a program watching its directory (docs/reliability.md, "How
a file appears under its name"): a small new file by a link of a complete unnamed file
(inotify ``IN_CREATE`` of the final name), anything else by a rename (``IN_MOVED_TO``);
either way the final name never shows a partial file. Watched with inotify itself
(ctypes), read back by scipy/h5py.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import select
import struct
from pathlib import Path

import numpy as np
import pytest

import matspool

from readback import read

IN_CLOSE_WRITE = 0x008
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then the name, NUL-padded

pytestmark = pytest.mark.skipif(not hasattr(os, "O_TMPFILE"), reason="inotify and O_TMPFILE are Linux's")


class Watch:
    """An inotify watch of one directory: the (mask, name) events since the last call."""

    def __init__(self, path: Path) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        assert self.fd >= 0, os.strerror(ctypes.get_errno())
        wd = libc.inotify_add_watch(self.fd, str(path).encode(), IN_CREATE | IN_MOVED_TO | IN_CLOSE_WRITE)
        assert wd >= 0, os.strerror(ctypes.get_errno())

    def events(self) -> list[tuple[int, str]]:
        out: list[tuple[int, str]] = []
        while select.select([self.fd], [], [], 0.2)[0]:
            buf = os.read(self.fd, 65536)
            at = 0
            while at < len(buf):
                _wd, mask, _cookie, n = _EVENT.unpack_from(buf, at)
                name = buf[at + _EVENT.size : at + _EVENT.size + n].rstrip(b"\0").decode()
                out.append((mask & (IN_CREATE | IN_MOVED_TO | IN_CLOSE_WRITE), name))
                at += _EVENT.size + n
        return out

    def close(self) -> None:
        os.close(self.fd)


@pytest.mark.parametrize("fmt", ["v5", "v7.3"])
def test_a_small_new_file_is_created_whole_and_a_replaced_one_moved_in(
    mspool: matspool.Spool, root: Path, fmt: str
) -> None:
    small = np.arange(64, dtype=np.float64).reshape(8, 8)
    mspool.save(root / "layout.mat", {"x": small}, format=fmt).result(30)  # v7.3: a known layout
    watch = Watch(root)
    try:
        watch.events()
        mspool.save(root / "new.mat", {"x": small}, format=fmt).result(30)
        new = watch.events()
        assert (IN_CREATE, "new.mat") in new, new
        # the unnamed file's own close is reported as '#<inode>', a name no directory holds
        assert all(name == "new.mat" or name[:1] == "#" for _, name in new), f"a temporary name showed: {new}"
        assert (IN_MOVED_TO, "new.mat") not in new

        mspool.save(root / "new.mat", {"x": small + 1}, format=fmt).result(30)  # the name is taken
        replaced = watch.events()
        assert (IN_MOVED_TO, "new.mat") in replaced, replaced
        assert (IN_CREATE, "new.mat") not in replaced

        big = np.ones((512, 256), np.float64)  # 1 MiB: written under a temporary name
        mspool.save(root / "big.mat", {"x": big}, format=fmt).result(30)
        moved = watch.events()
        assert (IN_MOVED_TO, "big.mat") in moved and (IN_CREATE, "big.mat") not in moved, moved
        assert any(name.endswith(".matspool-tmp") for _, name in moved), moved
    finally:
        watch.close()
    assert (read(root / "new.mat", fmt)["x"] == small + 1).all()
    assert (read(root / "big.mat", fmt)["x"] == 1).all()
    assert sorted(p.name for p in root.iterdir()) == ["big.mat", "layout.mat", "new.mat"]
