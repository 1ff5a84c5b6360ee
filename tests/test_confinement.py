"""Writes stay under the roots while another process rearranges the filesystem under them.

Each test runs one attack of issue 11 item 1 for real, in a tight loop in a separate
process, while a client makes at least 2,000 saves to a live daemon (``mdaemon``):

- a directory under the root exchanged (``renameat2(RENAME_EXCHANGE)``) with a symlink
  leading outside, over and over: the daemon checked a path with ``realpath`` and then
  reopened it by name, so temporaries with the data landed outside;
- every v7.3 temporary replaced by a symlink to a file outside as soon as it appears:
  the daemon reopened the temporary by name, wrote into the file outside, and renamed
  the symlink into place;
- a stream's file exchanged with a symlink to an HDF5 file outside: the next append
  extended the file outside.

Afterwards: nothing outside the root changed, no final name is a symlink, and every
save that was acknowledged is whole under its name. Failed saves are allowed (the
attack is real), as long as they fail with a reason and the daemon serves on.
"""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, wait
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import scipy.io

import matspool
from matspool import _protocol as proto
from matspoold import fsconfine, paths
from matspoold.writers import write_atomic
from matspoold.writers._files import Temporary
from matspoold.writers.stream import append_step

from conftest import DaemonProc

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="renameat2 and /proc are Linux's")

SAVES = 2000

_EXCHANGE = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
a, b = os.fsencode(sys.argv[1]), os.fsencode(sys.argv[2])
print("ready", flush=True)
while True:
    libc.renameat2(-100, a, -100, b, 2)  # AT_FDCWD, RENAME_EXCHANGE
"""

_REPLACE_TEMPS = r"""
import os, sys
d, outside, victim = sys.argv[1], sys.argv[2], sys.argv[3]
n = 0
print("ready", flush=True)
while True:
    for name in os.listdir(d):
        if name.endswith(".matspool-tmp"):
            n += 1
            # half the time a file outside that exists, half the time one that does not
            link = victim if n % 2 else os.path.join(outside, "new-" + name)
            tmp = os.path.join(d, f".attack-{n}")
            try:
                os.symlink(link, tmp)
                os.rename(tmp, os.path.join(d, name))
            except OSError:
                pass
"""


@contextmanager
def attacker(script: str, *args: str) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield proc
    finally:
        proc.kill()
        proc.wait()


def _snapshot(d: Path) -> dict[str, str]:
    """Every name under ``d`` with a digest of its bytes (or the link it is)."""
    out = {}
    for p in sorted(d.rglob("*")):
        rel = str(p.relative_to(d))
        out[rel] = (
            ("link:" + os.readlink(p))
            if p.is_symlink()
            else ("dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest())
        )
    return out


def _results(futures: dict[int, Future[matspool.SaveResult]]) -> tuple[list[int], list[BaseException]]:
    wait(list(futures.values()), timeout=120)
    ok, errors = [], []
    for i, fut in futures.items():
        err = fut.exception(timeout=0)
        if err is None:
            ok.append(i)
        else:
            errors.append(err)
    return ok, errors


def _no_symlinks(d: Path) -> None:
    links = [str(p) for p in d.rglob("*.mat") if p.is_symlink()]
    assert links == [], f"symlinks under final names: {links[:5]}"


def _check_failures(errors: list[BaseException]) -> None:
    for e in errors:  # refusals with a reason, never anything else
        assert isinstance(e, (matspool.PathNotAllowedError, matspool.WriteFailed)), repr(e)


def test_directory_exchanged_with_a_symlink_out(
    mspool: matspool.Spool, mdaemon: DaemonProc, root: Path, outside: Path
) -> None:
    d, link = root / "d", root / "l"
    d.mkdir()
    link.symlink_to(outside, target_is_directory=True)
    pad = np.arange(128, dtype=np.float64)
    with attacker(_EXCHANGE, str(d), str(link)):
        futures = {
            i: mspool.save(
                d / f"f{i}.mat", {"x": float(i), "pad": pad}, format="v7.3" if i % 4 == 0 else "v5"
            )
            for i in range(SAVES)
        }
        ok, errors = _results(futures)
    assert mdaemon.alive()
    print(f"{len(ok)} saves acknowledged, {len(errors)} refused during the exchanges")
    escaped = _snapshot(outside)
    assert escaped == {}, f"the daemon wrote {len(escaped)} files outside its root: {sorted(escaped)[:3]}"
    real = d if not d.is_symlink() else link
    assert real.is_dir() and not real.is_symlink()
    _no_symlinks(root)
    _check_failures(errors)
    for i in ok:
        got = scipy.io.loadmat(real / f"f{i}.mat") if i % 4 else h5py.File(real / f"f{i}.mat", "r")
        assert float(np.asarray(got["x"]).ravel()[0]) == float(i)
        assert np.array_equal(np.asarray(got["pad"]).ravel(), pad)
    assert not [p for p in root.rglob("*.matspool-tmp")], "temporary files left"


def test_v73_temporaries_replaced_by_symlinks(
    mspool: matspool.Spool, mdaemon: DaemonProc, root: Path, outside: Path
) -> None:
    d = root / "t"
    d.mkdir()
    victim = outside / "victim.mat"
    victim.write_bytes(b"precious" * 100)
    before = _snapshot(outside)
    x = np.arange(2048, dtype=np.float64)  # deflated: HDF5 lays the file out, not a template
    with attacker(_REPLACE_TEMPS, str(d), str(outside), str(victim)) as proc:
        futures = {
            i: mspool.save(d / f"f{i}.mat", {"x": x + i}, format="v7.3", compress=1) for i in range(SAVES)
        }
        ok, errors = _results(futures)
        proc.kill()
    assert mdaemon.alive()
    print(f"{len(ok)} saves acknowledged, {len(errors)} refused")
    after = _snapshot(outside)
    links = [p.name for p in d.glob("*.mat") if p.is_symlink()]
    assert (after, links) == (before, []), (
        f"outside the root: victim {'changed' if after['victim.mat'] != before['victim.mat'] else 'intact'}, "
        f"{len(after) - 1} files created {sorted(after)[:2]}; {len(links)} final names are symlinks"
    )
    _check_failures(errors)
    for i in ok:
        with h5py.File(d / f"f{i}.mat", "r") as f:
            assert np.array_equal(f["x"][()].ravel(), x + i)
    assert len(ok) >= 50  # the daemon kept saving through the attack


def test_stream_file_exchanged_with_a_symlink_out(
    mspool: matspool.Spool, mdaemon: DaemonProc, root: Path, outside: Path
) -> None:
    s = root / "s.mat"
    stream = mspool.stream(s)
    stream.append(x=np.float64(0), t=np.arange(4.0)).result(30)
    victim = outside / "victim.mat"
    victim.write_bytes(s.read_bytes())  # a stream file outside: an append would extend it
    before = _snapshot(outside)
    link = root / "s-link"
    link.symlink_to(victim)
    with attacker(_EXCHANGE, str(s), str(link)):
        futures = {i: stream.append(x=np.float64(i), t=np.arange(4.0) + i) for i in range(1, SAVES + 1)}
        ok, errors = _results(futures)
    assert mdaemon.alive()
    if s.is_symlink():  # the attacker stopped between exchanges
        os.rename(s, root / "tmp-link")
        os.rename(link, s)
    print(f"{len(ok)} appends acknowledged, {len(errors)} refused")
    after = _snapshot(outside)
    if after != before:
        with h5py.File(victim, "r") as f:
            extended = f["x"].shape[0] - 1
        pytest.fail(f"{extended} appends extended the stream file outside the root")
    _check_failures(errors)
    with h5py.File(s, "r") as f:
        steps = f["x"][()].ravel().tolist()
    assert steps == [0.0, *map(float, ok)], "acknowledged steps missing or out of order"
    assert len(ok) >= 50  # the daemon kept saving through the attack


def test_serves_after_the_attacks(mspool: matspool.Spool, mdaemon: DaemonProc, root: Path) -> None:
    t0 = time.monotonic()
    mspool.save(root / "after.mat", {"x": 1.0}, format="v5").result(15)
    assert time.monotonic() - t0 < 15 and mdaemon.alive()
    assert scipy.io.loadmat(root / "after.mat")["x"][0, 0] == 1.0


# -- the resolver and the publish, deterministically, without a daemon ---------------------


@pytest.fixture(params=["openat2", "walk"])
def resolver(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways a directory is opened: one ``openat2`` call, and the component walk
    (kernels without it; and every path with a symlink)."""
    if request.param == "walk":
        monkeypatch.setattr(fsconfine, "_openat2_works", False)
    return str(request.param)


def test_resolver_follows_links_only_inside(tmp_path: Path, resolver: str) -> None:
    root, out = tmp_path / "root", tmp_path / "out"
    (root / "a" / "b").mkdir(parents=True)
    out.mkdir()
    roots = paths.normalize_roots([str(root)])
    (root / "abs").symlink_to(root / "a", target_is_directory=True)
    (root / "a" / "rel").symlink_to("b", target_is_directory=True)
    (root / "a" / "up").symlink_to("../a/b", target_is_directory=True)
    b = root / "a" / "b"
    for rel, real in (("a/b", b), ("abs/b", b), ("abs/rel", b), ("a/up", b), ("", root)):
        with paths.resolve_target(os.path.join(root, rel, "x.mat"), roots) as t:
            assert os.path.samestat(os.fstat(t.dir_fd), os.stat(real)) and t.name == "x.mat"
    (root / "out").symlink_to(out, target_is_directory=True)
    (root / "a" / "climb").symlink_to("../../out", target_is_directory=True)
    (root / "a" / "loop").symlink_to("loop")
    for bad in ("out/x.mat", "a/climb/x.mat", "abs/climb/x.mat"):
        with pytest.raises(matspool.PathNotAllowedError, match="outside the daemon's roots") as e:
            paths.resolve_target(f"{root}/{bad}", roots)
        assert f"{root}/{bad}" in str(e.value)
    with pytest.raises(matspool.WriteFailed, match="more than 40 symlinks"):
        paths.resolve_target(f"{root}/a/loop/x.mat", roots)
    with pytest.raises(matspool.WriteFailed, match="does not exist"):
        paths.resolve_target(f"{root}/nope/x.mat", roots)
    with pytest.raises(matspool.WriteFailed, match="is a directory"):
        paths.resolve_target(f"{root}/a", roots)
    assert list(out.iterdir()) == []


def test_a_directory_known_by_its_text_is_still_opened_afresh(tmp_path: Path, resolver: str) -> None:
    """``fsconfine`` keeps what a directory's text resolves to (its root, its parts), never
    what the file system held: a directory swapped for a symlink out of the root after
    files were written there is refused at the next save, and one that came back (or
    vanished) is found as it is now; the same text with other roots is not confused."""
    root, out = tmp_path / "root", tmp_path / "out"
    (root / "a" / "b").mkdir(parents=True)
    out.mkdir()
    roots = paths.normalize_roots([str(root)])
    for i in range(3):  # known by its text now
        with paths.resolve_target(f"{root}/a/b/x{i}.mat", roots) as t:
            assert os.path.samestat(os.fstat(t.dir_fd), os.stat(root / "a" / "b"))
    (root / "a" / "b").rename(root / "a" / "old")
    (root / "a" / "b").symlink_to(out, target_is_directory=True)
    with pytest.raises(matspool.PathNotAllowedError, match="outside the daemon's roots"):
        paths.resolve_target(f"{root}/a/b/x.mat", roots)
    (root / "a" / "b").unlink()
    with pytest.raises(matspool.WriteFailed, match="does not exist"):
        paths.resolve_target(f"{root}/a/b/x.mat", roots)
    (root / "a" / "old").rename(root / "a" / "b")
    with paths.resolve_target(f"{root}/a/b/x.mat", roots) as t:
        assert os.path.samestat(os.fstat(t.dir_fd), os.stat(root / "a" / "b"))
    with pytest.raises(matspool.PathNotAllowedError, match="outside the daemon's roots"):
        paths.resolve_target(f"{root}/a/b/x.mat", paths.normalize_roots([str(out)]))
    odd = [f"{root}/a/b/", f"{root}/a/b/.", f"{root}/a/b/..", "a/b/x.mat", f"{root}/a/./b/../b/x.mat"]
    odd += [f"{root}//a/b/x.mat", f"{root}/a/b//x.mat", f"{root}/../x.mat", "/x.mat", f"{root}/a/b/x\x00.mat"]
    for path in odd:  # the same answer with the directory's text unknown and known
        fsconfine._lexicals.clear()
        cold = _outcome(lambda path=path: _dir_of(path, roots))
        _dir_of(f"{root}/a/b/x.mat", roots)
        _outcome(lambda path=path: _dir_of(path, roots))
        assert _outcome(lambda path=path: _dir_of(path, roots)) == cold, path
    assert list(out.iterdir()) == []


def _dir_of(path: str, roots: tuple[str, ...]) -> tuple[tuple[int, int], str]:
    with paths.resolve_target(path, roots) as t:
        st = os.fstat(t.dir_fd)
        return (st.st_dev, st.st_ino), t.name


def _outcome(call: Any) -> tuple[Any, ...]:
    try:
        return ("ok", call())
    except Exception as e:  # noqa: BLE001 - compared
        return ("err", type(e), str(e))


def test_publish_refuses_a_replaced_temporary(tmp_path: Path) -> None:
    """The v7.3 attack at its worst instant (between the last write and the rename), made
    deterministic: the save fails, nothing under the final name, the file outside intact."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (tmp_path / "d").mkdir()
    with fsconfine.Target.unconfined(str(tmp_path / "d" / "f.mat")) as target:
        temp = Temporary(target)
        os.write(temp.fd, b"data")
        os.symlink(victim, tmp_path / "d" / "evil")
        os.rename(tmp_path / "d" / "evil", tmp_path / "d" / temp.name)
        with pytest.raises(matspool.WriteFailed, match="replaced"):
            temp.publish(fsync=True)
        temp.discard()
    assert victim.read_bytes() == b"precious"
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == []


def test_stream_append_refuses_links_and_replacements(tmp_path: Path) -> None:
    spec = proto.VarSpec(name="x", dtype="<f8", dims=(1, 1), offset=0, nbytes=8)
    step = [(spec, np.ones((1, 1)))]
    s, other = tmp_path / "s.mat", tmp_path / "other.mat"
    write_atomic(str(s), "stream", step, fsync=False)
    append_step(str(s), step, fsync=False)
    os.link(s, tmp_path / "hard.mat")  # a hard link (could be to a file outside the roots)
    with pytest.raises(matspool.WriteFailed, match="hard links"):
        append_step(str(s), step, fsync=False)
    os.unlink(tmp_path / "hard.mat")
    write_atomic(str(other), "stream", step, fsync=False)
    os.rename(other, s)  # a different file put in the stream's place
    before = s.read_bytes()
    with pytest.raises(matspool.WriteFailed, match="replaced since"):
        append_step(str(s), step, fsync=False)
    assert s.read_bytes() == before
    os.unlink(s)
    s.symlink_to(tmp_path / "elsewhere.mat")
    with pytest.raises(matspool.PathNotAllowedError, match="symlink"):
        append_step(str(s), step, fsync=False)
    assert not (tmp_path / "elsewhere.mat").exists()


def test_an_unnamed_temporary_is_linked_whole_and_never_over_anything(tmp_path: Path) -> None:
    """``Temporary(unnamed=True)`` (small v5 saves): no name while written, linked at the
    final name only if nothing is there; a file, or a symlink leading out, planted at the
    final name meanwhile is replaced as a named temporary replaces it (the symlink's own
    name, never its target); a discarded one leaves nothing."""
    d = tmp_path / "d"
    d.mkdir()
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    for planted in (None, "file", "symlink"):
        final = d / f"f-{planted}.mat"
        with fsconfine.Target.unconfined(str(final)) as target:
            temp = Temporary(target, unnamed=True)
            os.write(temp.fd, b"data")
            assert sorted(os.listdir(d)) == sorted(p.name for p in d.glob("f-*.mat"))  # no new name
            if planted == "file":
                final.write_bytes(b"old")
            elif planted == "symlink":
                final.symlink_to(victim)
            assert temp.publish(fsync=planted == "file") == 4
        assert final.read_bytes() == b"data" and not final.is_symlink()
    assert victim.read_bytes() == b"precious"
    with fsconfine.Target.unconfined(str(d / "gone.mat")) as target:
        temp = Temporary(target, unnamed=True)
        os.write(temp.fd, b"data")
        temp.discard()
    assert sorted(os.listdir(d)) == ["f-None.mat", "f-file.mat", "f-symlink.mat"]


@pytest.mark.parametrize("fmt", ["v5", "v7.3"])
@pytest.mark.parametrize("unnamed_works", [True, False])
def test_small_saves_through_unnamed_temporaries(
    tmp_path: Path, unnamed_works: bool, fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """write_atomic(unnamed=True): new names, names already taken (a file, a symlink out of
    the directory) and a directory at the name, read back by scipy or h5py; v7.3 through
    HDF5 (a named temporary) for a new layout, then from its template unnamed; where the
    file system has no O_TMPFILE the named temporary does the same."""
    from matspoold.writers import _files, v73
    from matspoold.writers._layouts import _TemplateCache

    from readback import read

    old = _files._unnamed_works
    _files._unnamed_works = unnamed_works and old
    try:
        d = tmp_path / "d"
        d.mkdir()
        victim = tmp_path / "victim.mat"
        victim.write_bytes(b"precious")
        (d / "taken.mat").write_bytes(b"old")
        (d / "link.mat").symlink_to(victim)
        (d / "dir.mat").mkdir()
        monkeypatch.setattr(v73, "TEMPLATES", _TemplateCache())  # no layout known yet
        x = np.arange(12, dtype=np.float64).reshape(3, 4, order="F") + unnamed_works
        spec = proto.VarSpec("x", "<f8", (3, 4), 0, 96)
        for i, name in enumerate(("new.mat", "taken.mat", "link.mat", "new.mat", "other.mat")):
            # checked at resolve, or (the daemon's small files) only once the name is taken
            with fsconfine.resolve(str(d / name), (str(tmp_path),), check=i % 2 == 0) as target:
                size = write_atomic(target, fmt, [(spec, x)], fsync=False, unnamed=True)
            assert size == (d / name).stat().st_size and not (d / name).is_symlink()
            got = read(d / name, fmt)["x"]
            assert got.dtype == x.dtype and got.shape == x.shape and (got == x).all()
            x = x + 1
        assert (v73.template_for([(spec, x)]) is not None) == (fmt == "v7.3")  # the later ones used it
        with pytest.raises(matspool.WriteFailed, match="is a directory"):
            fsconfine.resolve(str(d / "dir.mat"), (str(tmp_path),))
        # not checked at resolve: refused with the same error once the name is found taken
        # (v7.3: from its template, then through HDF5 and a named temporary, no layout known)
        for _ in range(2):
            with (
                fsconfine.resolve(str(d / "dir.mat"), (str(tmp_path),), check=False) as target,
                pytest.raises(matspool.WriteFailed, match="it is a directory") as e,
            ):
                write_atomic(target, fmt, [(spec, x)], fsync=False, unnamed=True)
            assert e.value.errno == errno.EISDIR and not any((d / "dir.mat").iterdir())
            monkeypatch.setattr(v73, "TEMPLATES", _TemplateCache())
        assert victim.read_bytes() == b"precious"
        assert sorted(os.listdir(d)) == ["dir.mat", "link.mat", "new.mat", "other.mat", "taken.mat"]
    finally:
        _files._unnamed_works = old
