"""Attacks on the daemon's small-save shortcuts of issue 14: unnamed temporaries
(``O_TMPFILE`` linked at the final name, ``writers._files.Temporary(unnamed=True)``) must
publish exactly what a named temporary publishes, and refuse exactly what it refuses.

Real daemons and independent readers (scipy, h5py) where a file is published; the
temporary's own name is checked directly where the kernel decides (``NAME_MAX``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

import matspool
from matspool import _protocol as proto
from matspoold import fsconfine
from matspoold.writers import _files, write_atomic

from readback import assert_variables, read

NAME_MAX = 255  # bytes in one file name (Linux, every local file system)


def test_a_long_multibyte_name_saves_again_and_in_every_way(mspool: matspool.Spool, root: Path) -> None:
    """A legal 244-byte name of 3-byte characters: the first small save was linked there
    unnamed, but every later save to it (and any fsync or new-layout v7.3 save) failed
    with ENAMETOOLONG, because the temporary's name kept 180 *characters* of it (540
    bytes) and so passed NAME_MAX. Each save now lands and reads back its own values."""
    p = root / ("\u65e5" * 80 + ".mat")
    assert len(p.name.encode()) == 244 <= NAME_MAX
    ways = [
        ("v5", {}),  # a new name: linked unnamed
        ("v5", {}),  # the name taken: linked under a temporary name, renamed over
        ("v5", {"fsync": True}),  # a named temporary
        ("v7.3", {}),  # a new layout: HDF5 into a named temporary
        ("v7.3", {}),  # its template: unnamed, the name taken
    ]
    for i, (fmt, kw) in enumerate(ways):
        x = np.full((3, 4), float(i))
        mspool.save(p, {"x": x}, format=fmt, **kw).result(30)
        assert_variables(read(p, fmt), {"x": x})
    assert sorted(os.listdir(root)) == [p.name]


@pytest.mark.parametrize(
    "name",
    ["\u65e5" * 83 + ".mat", "\U0001f600" * 62 + ".mat", "a" * 251 + ".mat"],
    ids=["cjk", "emoji", "ascii"],
)
def test_temporary_names_fit_name_max(tmp_path: Path, name: str) -> None:
    """Whatever the final name (up to NAME_MAX bytes, any UTF-8), its temporary's name fits
    too, keeps the daemon's tag, and starts with the prefix the sharded saves check."""
    assert len(name.encode()) <= NAME_MAX
    temp = _files.TEMPS.name_for(str(tmp_path), name)
    assert len(os.fsencode(temp)) <= NAME_MAX, len(os.fsencode(temp))
    assert temp.startswith(f".{_files.temp_prefix(name)}.") and temp.endswith(_files.TMP_SUFFIX)
    (tmp_path / temp).write_bytes(b"")  # the kernel takes it


@pytest.mark.parametrize("flink", [True, False], ids=["at_empty_path", "proc_fd"])
@pytest.mark.parametrize("checked", [True, False], ids=["checked", "unchecked"])
def test_what_appears_between_the_failed_link_and_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flink: bool, checked: bool
) -> None:
    """The final name taken (linkat: EEXIST), then, before the temporary is linked and
    renamed over it, replaced by a symlink leading out, a fifo, a directory, or removed:
    the symlink and the fifo are replaced themselves (the victim untouched), the directory
    is refused with nothing left behind, a removed name is simply written. Whether the
    link is made by ``AT_EMPTY_PATH`` or through ``/proc/self/fd``, and whether the
    name was checked at ``resolve`` or is checked once the link finds it taken (the
    daemon's small files: ``check=False``)."""
    monkeypatch.setattr(_files, "_flink_works", flink and _files._flink_works)
    d, out = tmp_path / "r", tmp_path / "out"
    d.mkdir()
    out.mkdir()
    victim = out / "victim"
    victim.write_bytes(b"precious")
    x = np.arange(6.0).reshape(2, 3, order="F")
    spec = proto.VarSpec("x", "<f8", (2, 3), 0, 48)
    real_link = _files.link_fd
    for plant in ("symlink", "fifo", "dir", "gone"):
        p = d / f"{plant}.mat"
        p.write_bytes(b"old")
        calls = [0]

        def link(
            fd: int, dir_fd: int, name: str, *, p: Path = p, plant: str = plant, calls: list[int] = calls
        ) -> None:
            calls[0] += 1
            if calls[0] == 2:  # the final name was taken: plant before the temporary's link
                p.unlink()
                if plant == "symlink":
                    p.symlink_to(victim)
                elif plant == "fifo":
                    os.mkfifo(p)
                elif plant == "dir":
                    p.mkdir()
            real_link(fd, dir_fd, name)

        monkeypatch.setattr(_files, "link_fd", link)
        with fsconfine.resolve(str(p), (str(d),), check=checked) as target:
            if plant == "dir":
                with pytest.raises(IsADirectoryError):
                    write_atomic(target, "v5", [(spec, x)], fsync=False, unnamed=True)
            else:
                write_atomic(target, "v5", [(spec, x)], fsync=False, unnamed=True)
        monkeypatch.setattr(_files, "link_fd", real_link)
        assert calls[0] == 2
        if plant == "dir":
            assert p.is_dir() and not any(p.iterdir())
        else:
            assert not p.is_symlink() and p.is_file()
            assert_variables(read(p, "v5"), {"x": x})
    assert victim.read_bytes() == b"precious"
    assert sorted(os.listdir(d)) == ["dir.mat", "fifo.mat", "gone.mat", "symlink.mat"]


def test_a_stream_and_an_append_to_a_long_multibyte_name(mspool: matspool.Spool, root: Path) -> None:
    """The same 244-byte name as a stream (each step journaled beside it) and as the target
    of ``save -append``: the journal's name kept 160 *characters* of a name over 200 bytes
    (ENAMETOOLONG at the first append); every step now lands and reads back."""
    p = root / ("\u6708" * 80 + ".mat")
    with mspool.stream(p) as s:
        for k in range(3):
            s.append(v=np.full((2, 2), float(k)))
    got = read(p, "v7.3")["v"]
    assert got.shape[-1] == 3 and [float(got[..., k].max()) for k in range(3)] == [0.0, 1.0, 2.0]
    q = root / ("\u706b" * 80 + ".mat")
    mspool.save(q, {"a": np.ones((2, 2))}, format="v7.3").result(30)
    mspool.save(q, {"b": np.zeros((3, 1))}, format="v7.3", append=True).result(30)
    assert_variables(read(q, "v7.3"), {"a": np.ones((2, 2)), "b": np.zeros((3, 1))})
    assert sorted(os.listdir(root)) == sorted([p.name, q.name])
