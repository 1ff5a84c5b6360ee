"""The atomic publish, whole writes to file descriptors, and temporary names.

Every file reaches its final name the same way (:class:`Temporary`): written under a
temporary name in the same directory, optionally fsynced, renamed into place, then the
directory fsynced, so readers never see a partial file under the name they asked for,
and with ``fsync`` the file survives a power cut once its save is answered. A small v5
file may instead be written with no name at all (``O_TMPFILE``) and linked at its final
name once complete (``Temporary(unnamed=True)``): the same guarantee, fewer calls.

Every step goes through descriptors (``fsconfine``): the temporary is created
``O_CREAT | O_EXCL | O_NOFOLLOW`` relative to the target's directory descriptor and kept
open; writers reopen it only as ``/proc/self/fd/N`` (the same inode, whatever its name
has become); the rename is relative to the same directory descriptor, and afterwards the
final name is checked to hold that inode: a temporary someone replaced (by a symlink, or
any file) while it was written is never left published. A large file renamed over an
existing one keeps the old file open across the rename, so it is freed after the save is
answered rather than inside the rename (``_retire``).

With ``fsync``, :func:`early_writeback` has large writes start their writeback as they
go (``sync_file_range(SYNC_FILE_RANGE_WRITE)`` per 8 MiB written: a hint that starts I/O
and waits for nothing), so the disk works while the rest of the file is still being
copied and the final ``fsync`` waits for less: on this VM a 64 MiB write+fsync took 83
instead of 108 ms. The ``fsync`` itself is unchanged: durability does not rest on the hint.

Threads: any writer thread; ``TempNames.for_final`` is safe to call from all of them,
and each :class:`Temporary` belongs to the one job that made it. ``early_writeback`` is
per thread (a thread-local flag around one job's writer call).
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import os
import secrets
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from ..fsconfine import Target, failed
from ._retire import RETIRE

__all__ = [
    "SELF_FD",
    "TEMPS",
    "TMP_PREFIX_BYTES",
    "TMP_SUFFIX",
    "UNNAMED_MAX_BYTES",
    "TempNames",
    "Temporary",
    "early_writeback",
    "fsync_dir",
    "fsync_path",
    "fsync_wanted",
    "link_fd",
    "pwrite_all",
    "start_writeback",
    "temp_prefix",
    "write_new_file",
]

TMP_SUFFIX = ".matspool-tmp"
#: bytes of the final name a temporary's name keeps: with the dots, the tag (pid and salt,
#: at most 24), the counter and the suffix it stays within NAME_MAX (255 bytes)
TMP_PREFIX_BYTES = 180


def temp_prefix(base: str) -> str:
    """The start of ``base`` that a temporary's name keeps: whole characters, at most
    ``TMP_PREFIX_BYTES`` bytes. Cut by characters (180 of them) a name of multibyte
    characters made a temporary's name past NAME_MAX: ENAMETOOLONG for a legal name."""
    prefix = base[:TMP_PREFIX_BYTES]
    if len(prefix) > TMP_PREFIX_BYTES // 4:  # only then can it pass the bytes (4 a character)
        while len(prefix.encode("utf-8", "surrogatepass")) > TMP_PREFIX_BYTES:
            prefix = prefix[:-1]
    return prefix


#: how :class:`Temporary` hands its open file to writers (and HDF5): by descriptor
SELF_FD = "/proc/self/fd/"


class TempNames:
    """``.NAME.<tag>-<n>.matspool-tmp`` beside a final name (NAME: its first 180 bytes, whole
    characters: ``temp_prefix``): unique within the daemon (a
    counter, no ``urandom`` per file) and across daemons (``tag`` is the pid and a random
    salt). ``record``, when set (the daemon's temporary-file journal), is told each
    directory before a temporary is named in it, so a killed daemon's leftovers can be
    found and removed by the next one (``tempjournal``)."""

    def __init__(self) -> None:
        self.tag = f"{os.getpid()}-{secrets.token_hex(8)}"
        self.record: Callable[[str], None] | None = None
        self._ids = itertools.count()

    def for_final(self, final: str) -> str:
        directory, base = os.path.split(final)
        return os.path.join(directory, self.name_for(directory, base))

    def name_for(self, directory: str, base: str) -> str:
        """The temporary name (no directory) for ``base`` in ``directory``, journaled first."""
        if self.record is not None:
            self.record(directory)
        return f".{temp_prefix(base)}.{self.tag}-{next(self._ids)}{TMP_SUFFIX}"


#: the process's temporary names (one daemon per process)
TEMPS = TempNames()


def fsync_path(path: str, flags: int = os.O_RDONLY) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(dir_fd: int) -> None:
    """fsync a directory reached by an ``O_PATH`` descriptor (which fsync refuses)."""
    fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dir_fd)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


#: a small file without fsync may be written unnamed (``Temporary(unnamed=True)``)
UNNAMED_MAX_BYTES = 64 << 10
_O_TMPFILE = getattr(os, "O_TMPFILE", 0)
_unnamed_works = bool(_O_TMPFILE) and sys.platform == "linux"
#: what open(O_TMPFILE) fails with where a file system (or kernel) has no unnamed files
_NO_TMPFILE = frozenset((errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOTDIR))


class Temporary:
    """A file written under a temporary name beside ``target``'s, until :meth:`publish`
    renames it into place or :meth:`discard` removes it. ``fd`` is the open file (owned);
    ``path`` (``/proc/self/fd/N``) is how writers and HDF5 reopen it, by descriptor.
    ``target`` stays its caller's (it must outlive this).

    With ``unnamed`` (small saves, issue 14) the file is made ``O_TMPFILE`` in the
    target's directory, with no name at all while it is written (nothing anyone could
    replace, nothing left behind by a crash), and :meth:`publish` links the complete
    file at the final name (``linkat`` of its descriptor: it publishes this very inode,
    and refuses to replace anything). Where a file is already there it is linked under
    a temporary name instead and published as a named temporary is (rename, check).
    Saves a named temporary's rename and the ``fstat``/``stat`` check of what the
    rename published. File systems without ``O_TMPFILE`` get a named temporary."""

    def __init__(self, target: Target, *, unnamed: bool = False) -> None:
        global _unnamed_works
        self.target = target
        self.name = ""
        self.fd = -1
        if unnamed and _unnamed_works:
            if TEMPS.record is not None:  # as a named one: the directory is journaled
                TEMPS.record(target.dir_path)
            try:
                self.fd = os.open(".", os.O_RDWR | _O_TMPFILE | os.O_CLOEXEC, 0o666, dir_fd=target.dir_fd)
            except OSError as e:
                if e.errno not in _NO_TMPFILE:
                    raise
                if e.errno in (errno.ENOTDIR, errno.EINVAL):  # no O_TMPFILE in this kernel
                    _unnamed_works = False
        if self.fd < 0:
            target.refuse_directory()  # renamed over the name later: never over a directory
            self.name = TEMPS.name_for(target.dir_path, target.name)
            self.fd = os.open(
                self.name,
                os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o666,
                dir_fd=target.dir_fd,
            )
        self.path = f"{SELF_FD}{self.fd}"

    def publish(self, fsync: bool, size: int | None = None) -> int:
        """Rename the complete file into place (durably with ``fsync``); its size in bytes.
        ``size``: what the caller wrote into the new, empty file, which an unnamed one
        linked in then returns without an ``fstat``."""
        dfd = self.target.dir_fd
        if fsync:
            os.fsync(self.fd)
        if not self.name:  # unnamed: linked at the final name, unless something is there
            try:
                link_fd(self.fd, dfd, self.target.name)
            except FileExistsError:
                self.target.refuse_directory()  # the rename below must not meet a directory
                name = TEMPS.name_for(self.target.dir_path, self.target.name)
                link_fd(self.fd, dfd, name)
                self.name = name  # from here on a named temporary (discard removes it)
            else:
                if size is None:
                    size = os.fstat(self.fd).st_size
                if fsync:
                    fsync_dir(dfd)
                self.close()
                return size
        st = os.fstat(self.fd)
        # a replaced file is freed after the answer, not inside the rename (_retire)
        RETIRE.rename_over(dfd, self.name, self.target.name, st.st_size)
        placed = os.stat(self.target.name, dir_fd=dfd, follow_symlinks=False)
        if (placed.st_dev, placed.st_ino) != (st.st_dev, st.st_ino):
            # someone replaced the temporary by another file (a symlink?) while it was
            # written: what the rename published is theirs, not the save
            try:
                os.unlink(self.target.name, dir_fd=dfd)
            except FileNotFoundError:
                pass
            self.name = ""  # our inode is wherever they moved it: nothing of ours to discard
            raise failed(
                f"cannot write {self.target.path!r}: its temporary file was replaced while it "
                "was written (by another process); nothing was published",
                errno.EEXIST,
            )
        if fsync:
            fsync_dir(dfd)
        self.close()
        return st.st_size

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def discard(self) -> None:
        self.close()
        if not self.name:
            return
        try:
            os.unlink(self.name, dir_fd=self.target.dir_fd)
        except FileNotFoundError:
            pass
        self.name = ""


_libc = ctypes.CDLL(None, use_errno=True)
_linkat = _libc.linkat  # (int, char *, int, char *, int): ctypes' own conversions, no argtypes
_linkat.restype = ctypes.c_int
_AT_EMPTY_PATH = 0x1000  # linux/fcntl.h
#: whether ``linkat(fd, "", AT_EMPTY_PATH)`` links here: Linux 6.10+ lets a process link a
#: file it opened itself; older kernels want CAP_DAC_READ_SEARCH (ENOENT without it)
_flink_works = sys.platform == "linux"


def link_fd(fd: int, dir_fd: int, name: str) -> None:
    """Give the open file ``fd`` the name ``name`` in ``dir_fd`` (``FileExistsError`` if
    the name is taken: a link replaces nothing, and follows no symlink at ``name``).
    By ``linkat(fd, "", AT_EMPTY_PATH)`` where the kernel allows it, which skips the walk
    through procfs that linking ``/proc/self/fd/N`` takes (measured on tmpfs: 4.1-5.2 us
    instead of 6.4-7.8 us a link); else by that path, the same inode either way."""
    global _flink_works
    if _flink_works:
        if _linkat(fd, b"", dir_fd, os.fsencode(name), _AT_EMPTY_PATH) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.ENOENT, errno.EPERM, errno.EINVAL):
            raise OSError(err, os.strerror(err), name)
        # no AT_EMPTY_PATH for us, or the directory is gone: the path tells which
        os.link(f"{SELF_FD}{fd}", name, dst_dir_fd=dir_fd, follow_symlinks=True)
        _flink_works = False
        return
    os.link(f"{SELF_FD}{fd}", name, dst_dir_fd=dir_fd, follow_symlinks=True)


WRITEBACK_STEP = 8 << 20  # bytes written between two writeback starts
_SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h
_sync_file_range = _libc.sync_file_range  # through ctypes: without the GIL
_sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_sync_file_range.restype = ctypes.c_int
_local = threading.local()


@contextmanager
def early_writeback(on: bool) -> Iterator[None]:
    """While inside, :func:`start_writeback` (and so :func:`pwrite_all`) on this thread
    starts writing large ranges to disk at once: for saves that end in ``fsync``."""
    before = getattr(_local, "on", False)
    _local.on = on
    try:
        yield
    finally:
        _local.on = before


def fsync_wanted() -> bool:
    """Whether the job on this thread asked for ``fsync`` (inside ``early_writeback(True)``)."""
    return bool(getattr(_local, "on", False))


def start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Start (not wait for) writeback of ``nbytes`` at ``offset`` when the job asked for
    ``fsync``; a failure is ignored (the ``fsync`` that follows reports real errors)."""
    if nbytes >= 1 << 20 and getattr(_local, "on", False):
        _sync_file_range(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)


def pwrite_all(fd: int, data: Any, offset: int) -> None:
    """Write all of ``data`` (any buffer) at ``offset``; a short write (disk full,
    signals) goes on until done, so a full disk surfaces as ENOSPC, not a cut file."""
    view = memoryview(data).cast("B")
    if not getattr(_local, "on", False):  # no fsync: no writeback to start, one call
        while view:
            n = os.pwrite(fd, view, offset)
            view, offset = view[n:], offset + n
        return
    step = WRITEBACK_STEP
    while view:
        n = os.pwrite(fd, view[:step], offset)
        start_writeback(fd, offset, n)
        view, offset = view[n:], offset + n


def write_new_file(path: str, image: Any) -> None:
    """``path`` holding exactly ``image``: a small file's header and payloads, assembled
    in memory, in one write. The daemon's ``path`` is its new, empty temporary as
    ``/proc/self/fd/N``: written through descriptor N itself (no reopen: a small file's
    rate counts its system calls); any other path is created or truncated."""
    if path.startswith(SELF_FD) and path[len(SELF_FD) :].isdigit():
        pwrite_all(int(path[len(SELF_FD) :]), image, 0)
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
    try:
        pwrite_all(fd, image, 0)
    finally:
        os.close(fd)
