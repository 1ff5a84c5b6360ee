"""Attacks on the daemon's cuts for small files (issue 14, branch h-dsmall): no ``stat`` of the
final name before the unnamed temporary is linked in (``resolve(check=False)``, the name
checked only where found taken), the link made by ``linkat(AT_EMPTY_PATH)`` or through
``/proc/self/fd`` (``_files.link_fd``), the DONE's size taken from the in-memory image, a
variable's bytes as a cast of its transpose (``_values.column_bytes``), and binparse's
one-variable request builder.

Real daemons (some started with the cut's fallbacks forced: no ``O_TMPFILE``,
``AT_EMPTY_PATH`` refused as before Linux 6.10), files read back by scipy and h5py, the
outside of the root checked untouched, no temporary left, the daemon's descriptors counted.
"""

from __future__ import annotations

import os
import random
import socket
import stat
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from numpy.lib.stride_tricks import as_strided
from test_binparse import RING, _same, _write

import matspool
from matspool import _protocol as proto
from matspool import _wirebin
from matspool._errors import PathNotAllowedError, WriteFailed
from matspoold import binparse, fsconfine
from matspoold.writers import _files, write_atomic
from matspoold.writers._values import column_bytes

from conftest import DaemonProc, grant_traverse, system_user, wait_ready
from readback import assert_variables, read

#: a daemon with the small-file cuts' fallbacks forced (argv[1]: comma-separated modes):
#: ``notmp`` no O_TMPFILE (named temporaries), ``enoent`` linkat(AT_EMPTY_PATH) refused
#: as by a kernel before 6.10 (each refusal appends a line to $MARK)
_LAUNCH = """
import ctypes, errno, os, sys
from matspoold.writers import _files
modes = sys.argv[1].split(",")
if "notmp" in modes:
    _files._unnamed_works = False
if "enoent" in modes:
    def refused(*args):
        with open(os.environ["MARK"], "a") as f:
            f.write("refused\\n")
        ctypes.set_errno(errno.ENOENT)
        return -1
    _files._linkat = refused
from matspoold.cli import main
sys.exit(main(sys.argv[2:]))
"""

#: what is planted at a save's final name
PLANTS = (
    "dir",
    "fulldir",
    "link_dir_in",
    "link_dir_out",
    "link_file_out",
    "dangling",
    "fifo",
    "socket",
    "hardlink_out",
)


def _start(work: Path, root: Path, mode: str) -> DaemonProc:
    endpoint = f"ipc://{work}/d.sock"
    env = {**os.environ, "MARK": str(work / "mark")}
    cmd = [sys.executable, "-c", _LAUNCH, mode, "serve", "--endpoint", endpoint, "--root", str(root)]
    proc = subprocess.Popen([*cmd, "--log-level", "error"], env=env)
    if not wait_ready(endpoint, proc):
        proc.kill()
        raise RuntimeError("daemon did not come up")
    return DaemonProc(endpoint, root, proc)


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(root, outside): a root with ``sub/``, and beside it a victim file and an empty directory."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    (outside / "odir").mkdir(parents=True)
    (outside / "victim").write_bytes(b"precious")
    yield root, outside
    assert (outside / "victim").read_bytes() == b"precious"
    assert sorted(os.listdir(outside)) == ["odir", "victim"] and not os.listdir(outside / "odir")
    assert _temporaries(root.parent) == []


def _temporaries(top: Path) -> list[str]:
    return [os.path.join(d, n) for d, dns, fns in os.walk(top) for n in dns + fns if _files.TMP_SUFFIX in n]


def _plant(p: Path, kind: str, root: Path, outside: Path) -> None:
    if kind == "dir":
        p.mkdir()
    elif kind == "fulldir":
        p.mkdir()
        (p / "f").write_bytes(b"mine")
    elif kind == "link_dir_in":
        p.symlink_to(root / "sub")
    elif kind == "link_dir_out":
        p.symlink_to(outside / "odir")
    elif kind == "link_file_out":
        p.symlink_to(outside / "victim")
    elif kind == "dangling":
        p.symlink_to(outside / "nothing")
    elif kind == "fifo":
        os.mkfifo(p)
    elif kind == "socket":
        with socket.socket(socket.AF_UNIX) as s:
            s.bind(str(p))
    elif kind == "hardlink_out":
        os.link(outside / "victim", p)


def _fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.parametrize("mode", ["plain", "notmp", "enoent"])
def test_what_is_at_the_name_of_a_small_file(tree: tuple[Path, Path], mode: str) -> None:
    """Whatever is at the final name of a small save (unnamed temporary, unchecked name),
    with or without O_TMPFILE and AT_EMPTY_PATH: a directory (empty or not) is refused as
    resolve refused it (EISDIR, "it is a directory") and left as it was; a symlink
    (to a directory or file inside or outside the root, or dangling), fifo, socket or hard
    link to an outside file is itself replaced by the file, which reads back, its DONE
    size its size; nothing outside is written, no temporary stays, no descriptor leaks."""
    root, outside = tree
    d = _start(root.parent, root, mode)
    x = np.arange(12.0).reshape(3, 4)
    try:
        with matspool.Spool(d.endpoint, ring_bytes=4 << 20, timeout=30) as sp:
            sp.save(root / "warm5.mat", {"x": x}).result(30)
            sp.save(root / "warm73.mat", {"x": x}, format="v7.3").result(30)  # its template
            before = _fds(d.proc.pid)
            for fmt in ("v5", "v7.3"):
                for kind in PLANTS:
                    p = root / f"{kind}-{fmt}.mat"
                    _plant(p, kind, root, outside)
                    fut = sp.save(p, {"x": x}, format=fmt)
                    if kind.endswith("dir"):
                        with pytest.raises(WriteFailed, match="it is a directory") as e:
                            fut.result(30)
                        assert e.value.errno == 21, (kind, fmt)
                        assert p.is_dir() and os.listdir(p) == (["f"] if kind == "fulldir" else [])
                        continue
                    done = fut.result(30)
                    st = os.lstat(p)
                    assert stat.S_ISREG(st.st_mode), (kind, fmt)
                    assert done.nbytes == st.st_size, (kind, fmt)
                    assert_variables(read(p, fmt), {"x": x}, f"{kind} {fmt}")
            assert _fds(d.proc.pid) == before
            assert d.alive()
    finally:
        assert d.stop() == 0
    assert os.listdir(root / "sub") == []
    if mode == "enoent":  # the fallback through /proc/self/fd was taken
        assert (root.parent / "mark").read_text().count("refused") >= 1


@pytest.mark.parametrize("flink", [True, False], ids=["at_empty_path", "proc_fd"])
def test_a_directory_or_symlink_planted_after_the_name_was_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flink: bool
) -> None:
    """The name found taken and checked (not a directory), then, before the rename, made a
    directory (the rename fails: EISDIR, the directory kept, no temporary left) or a
    symlink to a directory outside (the symlink itself replaced, the directory empty)."""
    monkeypatch.setattr(_files, "_flink_works", flink and _files._flink_works)
    d, out = tmp_path / "r", tmp_path / "out"
    d.mkdir()
    out.mkdir()
    x = np.arange(6.0).reshape(2, 3, order="F")
    spec = proto.VarSpec("x", "<f8", (2, 3), 0, 48)
    real = fsconfine.Target.refuse_directory
    for plant in ("dir", "symlink"):
        p = d / f"{plant}.mat"
        p.write_bytes(b"old")

        def refuse(self: fsconfine.Target, p: Path = p, plant: str = plant) -> None:
            real(self)
            p.unlink()
            if plant == "dir":
                p.mkdir()
            else:
                p.symlink_to(out)

        monkeypatch.setattr(fsconfine.Target, "refuse_directory", refuse)
        with fsconfine.resolve(str(p), (str(d),), check=False) as target:
            if plant == "dir":
                with pytest.raises(IsADirectoryError):
                    write_atomic(target, "v5", [(spec, x)], fsync=False, unnamed=True)
            else:
                write_atomic(target, "v5", [(spec, x)], fsync=False, unnamed=True)
        monkeypatch.setattr(fsconfine.Target, "refuse_directory", real)
        if plant == "dir":
            assert p.is_dir() and not any(p.iterdir())
        else:
            assert not p.is_symlink() and p.is_file()
            assert_variables(read(p, "v5"), {"x": x})
    assert os.listdir(out) == []
    assert sorted(os.listdir(d)) == ["dir.mat", "symlink.mat"]


_RACED_ERRNOS = {2, 17, 20, 21, 22}  # ENOENT, EEXIST, ENOTDIR, EISDIR, EINVAL (see below)


@pytest.mark.parametrize("mode", ["plain", "notmp,enoent"])
def test_names_swapped_while_small_files_are_saved(tree: tuple[Path, Path], mode: str) -> None:
    """Threads swap each final name for a directory, a symlink out (to a directory, to a
    file), a fifo, a symlink to a directory inside, or move the saved file away, and swap
    the parent directory for a symlink leading out, while 1500 small files are saved there:
    nothing is written outside, every file found is complete, every failure is a named
    WriteFailed (EINVAL: the walk's readlink of a symlink swapped back to a directory) or
    the path refused, no temporary stays, the daemon lives and keeps no descriptor."""
    root, outside = tree
    sub, sub2 = root / "sub", root / "sub2"
    sub2.mkdir()
    names = [sub / f"n{i}.mat" for i in range(3)]
    stop = threading.Event()

    def racer(p: Path) -> None:
        k = 0
        while not stop.is_set():
            k += 1
            try:
                c = k % 7
                if c in (0, 5):
                    p.mkdir()
                    p.rmdir()
                elif c == 1:
                    p.symlink_to(outside / "odir")
                    p.unlink()
                elif c == 2:
                    p.symlink_to(outside / "victim")
                    p.unlink()
                elif c == 3:
                    os.mkfifo(p)
                    p.unlink()
                elif c == 4:
                    os.rename(p, f"{p}.moved")
                else:
                    p.symlink_to(sub)
                    p.unlink()
            except OSError:
                pass

    def parent_racer() -> None:
        while not stop.is_set():
            try:
                os.rename(sub2, f"{sub2}.away")
                sub2.symlink_to(outside)
                sub2.unlink()
                os.rename(f"{sub2}.away", sub2)
            except OSError:
                pass

    d = _start(root.parent, root, mode)
    x = np.arange(12.0).reshape(3, 4)
    threads = [threading.Thread(target=racer, args=(p,)) for p in names]
    threads.append(threading.Thread(target=parent_racer))
    outcomes: dict[str, int] = {}
    try:
        with matspool.Spool(d.endpoint, ring_bytes=8 << 20, timeout=60) as sp:
            sp.save(root / "warm.mat", {"x": x}).result(30)
            sp.save(root / "warm73.mat", {"x": x}, format="v7.3").result(30)
            before = _fds(d.proc.pid)
            for t in threads:
                t.start()
            try:
                futs = [
                    sp.save(
                        names[i % 3] if i % 4 else sub2 / f"p{i % 5}.mat",
                        {"x": x + i},
                        format="v7.3" if i % 3 == 0 else "v5",
                    )
                    for i in range(1500)
                ]
                for f in futs:
                    try:
                        f.result(60)
                        outcomes["ok"] = outcomes.get("ok", 0) + 1
                    except PathNotAllowedError:
                        outcomes["outside"] = outcomes.get("outside", 0) + 1
                    except WriteFailed as e:
                        assert e.errno in _RACED_ERRNOS, (e.errno, str(e))
                        outcomes[str(e.errno)] = outcomes.get(str(e.errno), 0) + 1
            finally:
                stop.set()
                for t in threads:
                    t.join()
            assert _fds(d.proc.pid) == before
            assert d.alive()
    finally:
        assert d.stop() == 0
    assert outcomes.get("ok", 0) > 0 and len(outcomes) > 1, outcomes
    for top, _, files in os.walk(root):
        for n in files:
            p = Path(top, n)
            if stat.S_ISREG(p.lstat().st_mode) and n.endswith((".mat", ".moved")):
                head = p.read_bytes()[:20]
                read(p, "v7.3" if head.startswith(b"MATLAB 7.3") else "v5")  # complete, readable


@pytest.mark.parametrize("mode", ["plain", "enoent"])
def test_a_daemon_of_another_user_saves_small_files_at_planted_names(tmp_path: Path, mode: str) -> None:
    """The daemon and its client run as an unprivileged user (no CAP_DAC_READ_SEARCH: its
    linkat of an unnamed file is the kernel's choice, or refused as before 6.10): the
    planted names give the same outcomes as for root."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run as another user")
    user = system_user("matspool-cuts")
    restore: list[tuple[Path, int]] = []
    script = tmp_path / "as_user.py"
    script.write_text(_AS_USER)
    work = tmp_path / "w"
    work.mkdir()
    os.chown(work, user.pw_uid, user.pw_gid)
    try:
        grant_traverse(Path(sys.executable).resolve(), restore)
        grant_traverse(work, restore)
        grant_traverse(Path(__file__).resolve(), restore)
        for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep):
            if entry:
                grant_traverse(Path(entry) / "x", restore)
        cmd = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups"]
        env = {**os.environ, "HOME": str(work), "TESTS": str(Path(__file__).parent)}
        r = subprocess.run(
            [*cmd, sys.executable, str(script), mode, str(work)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
    finally:
        for d, mode_ in reversed(restore):
            d.chmod(mode_)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.strip().endswith("all held"), r.stdout[-3000:]


_AS_USER = """
import os, sys
from pathlib import Path
sys.path.insert(0, os.environ["TESTS"])
import numpy as np, pytest, matspool
import test_daemon_cuts_attacks as t
from matspool._errors import WriteFailed
from readback import assert_variables, read
mode, work = sys.argv[1], Path(sys.argv[2])
root, outside = work / "root", work / "outside"
(root / "sub").mkdir(parents=True)
(outside / "odir").mkdir(parents=True)
(outside / "victim").write_bytes(b"precious")
d = t._start(work, root, mode)
x = np.arange(12.0).reshape(3, 4)
try:
    with matspool.Spool(d.endpoint, ring_bytes=4 << 20, timeout=30) as sp:
        sp.save(root / "warm73.mat", {"x": x}, format="v7.3").result(30)
        before = t._fds(d.proc.pid)
        for fmt in ("v5", "v7.3"):
            for kind in ("none", *t.PLANTS):
                p = root / f"{kind}-{fmt}.mat"
                t._plant(p, kind, root, outside)
                fut = sp.save(p, {"x": x}, format=fmt)
                if kind.endswith("dir"):
                    with pytest.raises(WriteFailed, match="it is a directory"):
                        fut.result(30)
                    assert p.is_dir()
                    continue
                done = fut.result(30)
                assert not p.is_symlink() and done.nbytes == p.stat().st_size, (kind, fmt)
                assert_variables(read(p, fmt), {"x": x}, kind)
        assert t._fds(d.proc.pid) == before
finally:
    assert d.stop() == 0
assert (outside / "victim").read_bytes() == b"precious" and not os.listdir(outside / "odir")
assert t._temporaries(work) == []
if mode == "enoent":
    assert (work / "mark").exists()
print("all held")
"""


# -- the DONE's size and the bytes of every layout ----------------------------------------


def _values(rng: np.random.Generator) -> Iterator[tuple[str, np.ndarray, str]]:
    dtypes = [np.float64, np.float32, np.float16, np.complex128, np.complex64, np.bool_]
    dtypes += [np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64]
    for dt in dtypes:
        kind = np.dtype(dt).kind
        for shape in [(), (5,), (3, 4), (2, 3, 4), (7, 1, 3), (0,), (0, 3), (2, 0, 4)]:
            n = int(np.prod(shape))
            if kind == "b":
                a = rng.integers(0, 2, n).astype(bool)
            elif kind == "c":
                a = (rng.standard_normal(n) + 1j * rng.standard_normal(n)).astype(dt)
            elif kind == "f":
                a = rng.standard_normal(n).astype(dt)
            else:
                a = rng.integers(np.iinfo(dt).min, np.iinfo(dt).max, n, dtype=dt, endpoint=True)
            a = a.reshape(shape)
            tag = f"{np.dtype(dt).name}_{'x'.join(map(str, shape)) or 's'}"
            yield tag, a, "matlab"
            if a.ndim >= 2:
                yield tag + "_F", np.asfortranarray(a), "matlab"
                yield tag + "_strided", a[..., ::2], "matlab"
                yield tag + "_raw", a, "raw"
            if a.ndim and a.size and kind in "fic" and a.itemsize > 1:
                yield tag + "_be", a.astype(a.dtype.newbyteorder(">")), "matlab"


def _expected(a: np.ndarray, layout: str, fmt: str) -> np.ndarray:
    want = a.ravel().reshape(a.shape[::-1], order="F") if layout == "raw" else a
    if want.ndim < 2:  # MATLAB has no fewer than 2 dimensions: a row
        want = want.reshape(1, -1)
    want = want.astype(want.dtype.newbyteorder("="))
    if want.dtype == np.float16:  # the client saves half precision as single
        want = want.astype(np.float32)
    if fmt == "v7.3" and want.dtype.kind == "c" and not want.size:  # an empty is its size only
        want = want.real.copy()
    return want


@pytest.mark.parametrize("fmt", ["v5", "v7.3"])
def test_small_files_of_every_dtype_and_layout_are_exact(
    mspool: matspool.Spool, root: Path, fmt: str
) -> None:
    """Each value saved twice under its own name: first as a new layout (v5: element by
    element; v7.3: by HDF5), then from the layout's frame or template (the payload cast
    by ``column_bytes``, the size from the image): both files byte for byte the same
    after the header's text, their DONE sizes their sizes, and each reads back exactly."""
    rng = np.random.default_rng(14)
    cases = list(_values(rng))
    for i, (tag, a, layout) in enumerate(cases):
        for k in range(2):  # one after the other: the second finds the first's layout
            p = root / f"{tag}-{k}.mat"
            done = mspool.save(p, {f"v{i}": a}, format=fmt, layout=layout).result(30)
            assert done.nbytes == p.stat().st_size, p.name
    for i, (tag, a, layout) in enumerate(cases):
        first, second = (root / f"{tag}-{k}.mat" for k in range(2))
        assert first.read_bytes()[116:] == second.read_bytes()[116:], tag
        assert_variables(read(second, fmt), {f"v{i}": _expected(a, layout, fmt)}, tag)


def test_column_bytes_is_the_column_order_of_any_layout() -> None:
    """Any array, as the daemon's views of the ring are (column-major) and as they are not:
    the bytes of its elements in column order. An empty array of two or more dimensions
    raised TypeError (memoryview casts no shape with a zero) where it was column-major."""
    base = np.arange(24.0)
    arrays = [
        np.ndarray((3, 4), dtype="<f8", buffer=base, order="F"),
        np.ndarray((2, 3, 4), dtype=">i4", buffer=base.view(np.uint8)[:96], order="F"),
        np.array(5.0),
        base[:5],
        base.reshape(4, 6),  # row-major
        base.reshape(4, 6)[:, ::2],  # strided
        base.reshape(2, 3, 4).transpose(1, 0, 2),
        as_strided(base, (3, 1, 4), (8, 999 * 8, 24)),  # an odd stride on a length-1 axis
        np.zeros((0, 3), order="F"),
        np.zeros((2, 0, 4), dtype=np.int16, order="F"),
        np.zeros((3, 0), dtype=np.complex64),
        np.zeros(0, dtype=bool),
        (base[:12] > 5).reshape(3, 4, order="F"),
        (base[:12] + 1j).reshape(4, 3, order="F"),
    ]
    for a in arrays:
        assert bytes(column_bytes(a)) == a.reshape(-1, order="F").tobytes(), (a.shape, a.strides)


# -- binparse: one variable ---------------------------------------------------------------


def test_one_variable_writes_altered_on_the_wire_get_the_reference_answer() -> None:
    """One-variable WRITEs (built without zip since acc3770) of several shapes, warm, with
    random bytes changed, the variable count changed, the offset set to edge values, cut
    short or lengthened, alone and in batches with a two-variable WRITE, against rings
    of several sizes and none: the reference's request or its error, each time."""
    binparse.SHAPES.clear()
    rng = random.Random(6)
    ones = [
        _write(),
        _write(vars=(proto.VarSpec("b", "|b1", (3, 4, 5), 64, 60),), format="v7.3"),
        _write(vars=(proto.VarSpec("z", "<f8", (0, 3), 64, 0),)),
        _write(vars=(proto.VarSpec("s", "<c16", (1, 1), 16, 16),)),
        _write(vars=(proto.VarSpec("u", "<u8", (5, 1), 8, 40),), fsync=True),
    ]
    x, yy = proto.VarSpec("x", "<f4", (32, 32), 4096, 4096), proto.VarSpec("yy", "<f8", (2, 3), 0, 48)
    two = _write(vars=(x, yy))
    edges = [0, 1, 2, 4, 8, 16, RING - 8, RING, 2**63, 2**64 - 1]
    try:
        for good in ones:
            assert _same(good)[0][1] == "ok"
            _same(two)
            for _ in range(600):
                b = bytearray(good)
                r = rng.random()
                if r < 0.5:
                    for _ in range(rng.randint(1, 3)):
                        b[rng.randrange(len(b))] = rng.randrange(256)
                elif r < 0.65:  # the variable count
                    struct.pack_into("<H", b, 16, rng.choice([0, 2, 3, 65535]))
                elif r < 0.85:  # the offset
                    q = 18 + struct.unpack_from("<H", b, 14)[0]
                    struct.pack_into("<Q", b, q + 4, rng.choice([*edges, rng.randrange(2**64)]))
                elif r < 0.93:
                    b = b[: rng.randrange(len(b))]
                else:
                    b += bytes(rng.randrange(1, 9))
                body = bytes(b)
                for ring in (RING, None, 64, 4096):
                    _same(body, ring)
                _same(_wirebin.join_batch([good, body, two, body]))
    finally:
        binparse.SHAPES.clear()
