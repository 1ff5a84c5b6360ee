"""A file saved over keeps the old one open across the rename (``writers/_retire.py``):
the new file is in place while the old inode is still held, and the old one is freed
(its descriptor closed) once the save is answered; nothing stays held, nothing leaks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.io

import matspool
from matspool import _protocol as proto
from matspoold.cleanup import sweep_dead
from matspoold.writers import _retire, write_atomic
from matspoold.writers._retire import MIN_BYTES, RETIRE, Retirer

from conftest import DaemonProc


def _big(seed: int) -> tuple[proto.VarSpec, np.ndarray]:
    arr = np.asfortranarray(np.random.default_rng(seed).random((MIN_BYTES // 8 // 64 + 1, 64)))
    return proto.VarSpec(name="x", dtype="<f8", dims=arr.shape, offset=0, nbytes=arr.nbytes), arr


def test_old_file_is_held_past_the_rename_and_freed_when_closed(tmp_path: Path) -> None:
    path = tmp_path / "x.mat"
    spec, first = _big(1)
    write_atomic(str(path), "v5", [(spec, first)], fsync=False)  # outside deferring: nothing kept
    assert RETIRE.held == 0
    old = os.stat(path)
    _, second = _big(2)
    with RETIRE.deferring():
        write_atomic(str(path), "v5", [(spec, second)], fsync=False)
        kept = RETIRE.taken()
        assert len(kept) == 1 and RETIRE.held == 1
        held = os.fstat(kept[0])
        assert (held.st_ino, held.st_nlink) == (old.st_ino, 0)  # the old inode, unlinked, alive
        assert os.stat(path).st_ino != old.st_ino  # while the new file is in place
        assert [p.name for p in tmp_path.iterdir()] == ["x.mat"]  # and no temporary is left
        assert np.array_equal(scipy.io.loadmat(path)["x"], second)
        RETIRE.close_later(kept)
        assert RETIRE.drain(10)
    assert RETIRE.held == 0
    assert not [
        fd for fd in os.listdir("/proc/self/fd") if _link(f"/proc/self/fd/{fd}").endswith("x.mat (deleted)")
    ]


def test_small_and_new_files_keep_nothing(tmp_path: Path) -> None:
    small = np.asfortranarray(np.arange(12.0).reshape(3, 4))
    spec = proto.VarSpec(name="s", dtype="<f8", dims=small.shape, offset=0, nbytes=small.nbytes)
    bspec, big = _big(3)
    with RETIRE.deferring():
        write_atomic(str(tmp_path / "s.mat"), "v5", [(spec, small)], fsync=False)
        write_atomic(str(tmp_path / "s.mat"), "v5", [(spec, small)], fsync=False)  # under MIN_BYTES
        write_atomic(str(tmp_path / "b.mat"), "v5", [(bspec, big)], fsync=False)  # a new name
        assert RETIRE.taken() == [] and RETIRE.held == 0


def test_at_most_limit_descriptors_are_held(tmp_path: Path) -> None:
    retirer = Retirer(limit=2)
    for i in range(3):
        (tmp_path / f"f{i}").write_bytes(b"x")
    kept: list[int] = []

    def keep_all() -> None:
        dfd = os.open(tmp_path, os.O_PATH)
        with retirer.deferring():
            for i in range(3):
                retirer.keep(dfd, f"f{i}", MIN_BYTES)
            kept.extend(retirer.taken())
        os.close(dfd)

    t = threading.Thread(target=keep_all)
    t.start()
    t.join()
    assert len(kept) == 2 and retirer.held == 2
    retirer.close_later(kept)
    assert retirer.drain(10) and retirer.held == 0


def test_a_symlink_at_the_name_is_replaced_and_its_target_untouched(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    (tmp_path / "out").mkdir()
    link = tmp_path / "out" / "x.mat"
    link.symlink_to(victim)
    spec, arr = _big(4)
    with RETIRE.deferring():
        write_atomic(str(link), "v5", [(spec, arr)], fsync=False)
        RETIRE.close_later(RETIRE.taken())
    assert RETIRE.drain(10) and RETIRE.held == 0
    assert victim.read_bytes() == b"keep me" and not link.is_symlink()
    assert np.array_equal(scipy.io.loadmat(link)["x"], arr)


def _link(path: str) -> str:
    try:
        return os.readlink(path)
    except OSError:
        return ""


def test_daemon_frees_replaced_files_after_answering(daemon: DaemonProc) -> None:
    """Time-step saves over the same names: each reads back as its own step, and after the
    answers the daemon holds no replaced (deleted) file open."""
    path = str(daemon.root / "step.mat")
    rng = np.random.default_rng(5)
    with matspool.Spool(daemon.endpoint, ring_bytes=16 << 20, timeout=30) as spool:
        for fmt in ("v5", "v7.3"):
            for _ in range(3):
                arr = rng.random((512, 300))  # 1.2 MiB: above MIN_BYTES
                spool.save(path, {"x": arr}, format=fmt).result(30)
                if fmt == "v5":
                    assert np.array_equal(scipy.io.loadmat(path)["x"], arr)
        fds = f"/proc/{daemon.proc.pid}/fd"
        deadline = time.monotonic() + 10
        while True:
            held = [_link(f"{fds}/{fd}") for fd in os.listdir(fds)]
            held = [h for h in held if h.endswith("step.mat (deleted)")]
            if not held or time.monotonic() > deadline:
                break
            time.sleep(0.02)
        assert held == []


def test_a_directory_at_the_name_is_not_replaced(tmp_path: Path) -> None:
    (tmp_path / "x.mat").mkdir()
    spec, arr = _big(7)
    with RETIRE.deferring(), pytest.raises(OSError):
        write_atomic(str(tmp_path / "x.mat"), "v5", [(spec, arr)], fsync=False)
    assert (tmp_path / "x.mat").is_dir() and [p.name for p in tmp_path.iterdir()] == ["x.mat"]
    assert RETIRE.held == 0


def test_an_old_file_replaced_before_the_exchange_is_swapped_back(tmp_path: Path) -> None:
    """The file opened as the old one is gone from the name when the exchange runs: the
    exchange is undone and nothing is unlinked (the caller then renames, as always)."""
    for name in ("final", "temp", "other"):
        (tmp_path / name).write_text(name)
    dfd = os.open(tmp_path, os.O_PATH)
    held = os.open("final", os.O_PATH | os.O_NOFOLLOW, dir_fd=dfd)
    try:
        os.rename(tmp_path / "other", tmp_path / "final")  # someone replaced it meanwhile
        assert not _retire._exchange_over(dfd, "temp", "final", held)
        assert (tmp_path / "final").read_text() == "other" and (tmp_path / "temp").read_text() == "temp"
        os.rename(tmp_path / "final", tmp_path / "other")
        os.rename(tmp_path / "temp", tmp_path / "final")
        held2 = os.open("other", os.O_PATH | os.O_NOFOLLOW, dir_fd=dfd)
        try:  # the file held is the one at the name: exchanged in, the old one unlinked
            (tmp_path / "temp").write_text("new")
            assert _retire._exchange_over(dfd, "temp", "other", held2)
            assert sorted(p.name for p in tmp_path.iterdir()) == ["final", "other"]
            assert (tmp_path / "other").read_text() == "new" and os.fstat(held2).st_nlink == 0
        finally:
            os.close(held2)
    finally:
        os.close(held)
        os.close(dfd)


_KILLED_MID_EXCHANGE = """
import os, signal, sys
import numpy as np
from matspool import _protocol as proto
from matspoold import cleanup
from matspoold.writers import _files, write_atomic
from matspoold.writers._retire import MIN_BYTES, RETIRE

state, path = sys.argv[1:]
journal = cleanup.open_journal([state], _files.TEMPS.tag)
_files.TEMPS.record = journal.record
arr = np.asfortranarray(np.full((MIN_BYTES // 8 // 64 + 1, 64), 7.0))
spec = proto.VarSpec(name="x", dtype="<f8", dims=arr.shape, offset=0, nbytes=arr.nbytes)
os.unlink = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)  # dies right after an exchange
with RETIRE.deferring():
    write_atomic(path, "v5", [(spec, arr)], fsync=False)
"""


@pytest.mark.parametrize("old", ["own file", "symlink", "another user's file"])
def test_a_daemon_killed_after_the_exchange_leaves_nothing_the_next_one_keeps(
    tmp_path: Path, old: str
) -> None:
    """Killed between the exchange and the unlink, a daemon leaves the OLD file under its
    temporary's name: the final name already holds the new file, and the next daemon's
    sweep must remove that temporary. The sweep removes only regular files of its own
    user, so old files it would not remove (a symlink, another user's file) are never
    exchanged: a plain rename replaces them, as before."""
    state, out = tmp_path / "state", tmp_path / "out"
    out.mkdir()
    final = out / "x.mat"
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep me")
    if old == "symlink":
        final.symlink_to(victim)
    else:
        final.write_bytes(b"old" * MIN_BYTES)
        if old == "another user's file":
            if os.geteuid() != 0:
                pytest.skip("needs root to own a file as another user")
            os.chown(final, 54321, 54321)
    child = subprocess.run(
        [sys.executable, "-c", _KILLED_MID_EXCHANGE, str(state), str(final)], capture_output=True, timeout=60
    )
    sweep_dead(str(state))
    assert [p.name for p in out.iterdir()] == ["x.mat"]  # no temporary, old or new, is left
    assert not final.is_symlink() and scipy.io.loadmat(final)["x"].min() == 7.0
    assert victim.read_bytes() == b"keep me"
    # own file: the window itself (killed with the old file under the temporary's name)
    assert child.returncode == (-signal.SIGKILL if old == "own file" else 0), child.stderr.decode()
