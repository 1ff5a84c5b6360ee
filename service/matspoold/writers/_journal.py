"""Crash-safe in-place changes to an existing file: an undo journal of the bytes they overwrite.

Why: a stream append opens an existing HDF5 file and rewrites its metadata in place
(object headers, chunk B-tree nodes, the superblock's end-of-file address). A daemon
killed half way through those writes left hours of results unreadable, and a full disk
made HDF5's close fail and the daemon crash later (SIGSEGV in the library).

How (one append, ``journaled``):

1. ``L`` = the file's length. The journal ``.NAME.matspool-journal`` (hidden, beside the
   file) is created holding a header: magic, ``L``, the file's device, inode and a
   checksum of its first 128 bytes (the MAT header, which HDF5 never writes; a file that
   reuses the inode number differs there), and a CRC. The file is not touched before.
2. HDF5 works on an ``UndoFile`` (``_undofile``; h5py's ``driver='fileobj'``), so every
   byte it reads or writes passes through Python. Writes at or beyond ``L`` (the new
   chunks, new B-tree nodes) go straight to the file. Writes below ``L`` are *held in
   memory*; reads see them. So until the commit the bytes below ``L`` are still the old,
   consistent file, and a kill leaves only a tail beyond ``L``, which recovery cuts off.
3. Commit, after HDF5 closed the file: the original bytes of every held range are appended
   to the journal with a CRC over the whole journal (one write; with ``fsync``, the journal
   and its directory are fsynced), then the held writes go into the file (fsynced when
   asked), then the journal is unlinked (the directory fsynced when asked: a journal that
   survived a power loss would roll an acknowledged step back). The held writes go in
   the order that keeps the file readable at every write boundary
   (``_undofile._apply_rank``).
4. ``recover(path)`` runs before every append (and may run any time; it is idempotent):
   no journal: nothing to do. Header unreadable: the file was never touched, drop it.
   Device, inode or first bytes differ: the journal belongs to a file since replaced,
   drop it. Body complete and valid: put the original bytes back, truncate to ``L``,
   fsync, drop it. Body torn or absent: nothing below ``L`` was written yet; truncate to
   ``L``, drop it. A kill during recovery repeats the same writes next time.

A write that fails (ENOSPC, EIO) is never reported to HDF5: the error is kept, that and
every later write are held in memory (writes over 1 MiB, raw chunk data HDF5 never
reads back, are dropped), so HDF5 finishes and closes cleanly; the append then rolls
back (truncate to ``L``, drop the journal) and raises ``WriteFailed``. HDF5's own close
failing on a real descriptor is what crashed the daemon.

Why not the alternatives: pre-allocating chunk space still rewrites one object header
per variable and the superblock, so a multi-variable step is never one in-place write;
writing the journal entry before each overwrite (no holding) costs a journal write (and
with ``fsync`` an fsync) per metadata block instead of one per append.

Confinement: the file and its journal are reached only through the directory
descriptor of a ``fsconfine.Target`` (names relative to it, ``O_NOFOLLOW``), so a
symlink put at either name is never followed; recovery checks the file's device and
inode against the journal's before writing a byte.

Cost per append (``python -m bench.stream_append``): the journal file's create, two
writes and unlink, the held metadata (a few KiB) copied once more, and h5py's Python
file-object driver instead of its C one; with ``fsync``, four fsyncs instead of one.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import struct
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from matspool._errors import WriteFailed

from ..fsconfine import Target, as_target, open_in
from ._files import fsync_dir, pwrite_all, temp_prefix
from ._undofile import IDENT_BYTES, UndoFile

__all__ = ["HEADER_BYTES", "JOURNAL_SUFFIX", "UndoFile", "journal_path", "journaled", "recover"]

log = logging.getLogger("matspoold")

JOURNAL_SUFFIX = ".matspool-journal"
_MAGIC = b"MSPUNDO1"
_END = b"MSPUNDO."
_HEAD = struct.Struct("<8sQQQII")  # magic, L, st_dev, st_ino, identity, crc32 of the fields before
HEADER_BYTES = _HEAD.size  # a journal no longer than this: the commit had not begun
_RECORD = struct.Struct("<QI")  # offset, length; the original bytes follow
_TAIL = struct.Struct("<II8s")  # records, crc32 of everything before, end magic


def journal_path(path: str) -> str:
    """The hidden journal beside ``path``; over-long names keep a hash so two streams
    never share one."""
    directory, base = os.path.split(path)
    return os.path.join(directory, _journal_name(base))


def _journal_name(base: str) -> str:
    raw = base.encode("utf-8", "surrogatepass")
    if len(raw) > 200:
        digest = hashlib.sha256(raw).hexdigest()[:16]
        short = base[:160]  # as before wherever that fit NAME_MAX: an older daemon's journal is found
        if len(short.encode("utf-8", "surrogatepass")) > 220:  # 160 multibyte characters: ENAMETOOLONG
            short = temp_prefix(base)
        base = f"{short}-{digest}"
    return f".{base}{JOURNAL_SUFFIX}"


def _unlink(target: Target, name: str) -> None:
    try:
        os.unlink(name, dir_fd=target.dir_fd)
    except FileNotFoundError:
        pass


def _failed(path: str, e: OSError) -> WriteFailed:
    err = WriteFailed(f"cannot append to {path!r}: {e.strerror or e}; the file keeps its earlier steps")
    err.errno = e.errno
    return err


@contextmanager
def journaled(
    path: str | Target,
    fd: int = -1,
    *,
    fsync: bool,
    check: Callable[[Target, os.stat_result], None] | None = None,
) -> Iterator[UndoFile]:
    """One crash-safe change of the existing file ``path``: open it as ``h5py.File(undo,
    "r+")`` inside the block; leaving the block commits, an exception rolls back. A
    journal left by a killed change is recovered first. ``fd``, when given, is the file
    already opened (read-write) through ``path``'s directory; the block owns it.
    ``check`` may refuse the file (its stat) before anything is written."""
    target, owned = as_target(path)
    try:
        done = recover(target)
        if done:
            log.warning("%s: an earlier change was interrupted (daemon killed?): %s", target.path, done)
        if fd < 0:
            fd = open_in(target, os.O_RDWR)
        mine, fd = fd, -1  # _journaled closes it, whatever happens
        with _journaled(target, mine, fsync, check) as undo:
            yield undo
    finally:
        if fd >= 0:
            os.close(fd)
        if owned:
            target.close()


@contextmanager
def _journaled(
    target: Target, fd: int, fsync: bool, check: Callable[[Target, os.stat_result], None] | None
) -> Iterator[UndoFile]:
    path = target.path
    jname = _journal_name(target.name)
    jfd = -1
    try:
        st = os.fstat(fd)
        if check is not None:
            check(target, st)
        base = st.st_size
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        jfd = os.open(jname, flags, 0o600, dir_fd=target.dir_fd)
        if not stat.S_ISREG(os.fstat(jfd).st_mode):  # a FIFO put at the journal's name
            raise WriteFailed(f"cannot append to {path!r}: its journal's name holds something else")
        fields = (_MAGIC, base, st.st_dev, st.st_ino, _identity(fd))
        head = _HEAD.pack(*fields, zlib.crc32(_HEAD.pack(*fields, 0)[:-4]))
        try:
            pwrite_all(jfd, head, 0)
        except OSError as e:
            _unlink(target, jname)
            raise _failed(path, e) from e
        undo = UndoFile(fd, base)
        try:
            yield undo
            if undo.error is not None:
                raise _failed(path, undo.error) from undo.error
            _journal_originals(undo, jfd, head, path, target, fsync)
        except BaseException:
            _roll_back(fd, base, target, jname)
            raise
        try:  # from here only the journal can undo the writes
            undo.apply()
            if fsync:
                os.fsync(fd)
            undo.size = os.fstat(fd).st_size
        except OSError as e:
            recover(target)
            raise _failed(path, e) from e
        os.unlink(jname, dir_fd=target.dir_fd)
        if fsync:
            fsync_dir(target.dir_fd)
    finally:
        if jfd >= 0:
            os.close(jfd)
        os.close(fd)


def _journal_originals(undo: UndoFile, jfd: int, head: bytes, path: str, target: Target, fsync: bool) -> None:
    """Append the bytes the held writes will replace to the journal, with its checksum."""
    parts = [head]
    ranges = undo.undo_ranges()
    for lo, hi in ranges:
        original = os.pread(undo.fd, hi - lo, lo)
        if len(original) != hi - lo:
            raise WriteFailed(f"cannot append to {path!r}: it is shorter than when the append began")
        parts += [_RECORD.pack(lo, hi - lo), original]
    body = b"".join(parts)
    try:
        pwrite_all(jfd, body[len(head) :] + _TAIL.pack(len(ranges), zlib.crc32(body), _END), len(head))
        if fsync:
            os.fsync(jfd)
            fsync_dir(target.dir_fd)
    except OSError as e:
        raise _failed(path, e) from e


def _roll_back(fd: int, base: int, target: Target, jname: str) -> None:
    """Nothing below ``base`` was written: cut the new tail and drop the journal."""
    try:
        os.ftruncate(fd, base)
    except OSError:
        return  # the journal stays; the next append recovers
    _unlink(target, jname)


def _identity(fd: int) -> int:
    """A checksum of the file's first bytes: with the device and inode, it tells the file
    a journal was written for from a later one that reuses its inode number."""
    return zlib.crc32(os.pread(fd, IDENT_BYTES, 0))


def _parse(blob: bytes) -> tuple[tuple[int, int, int, int], list[tuple[int, bytes]] | None] | None:
    """``((L, dev, ino, identity), records or None if the body is torn)``, or None if
    the header is."""
    if len(blob) < _HEAD.size:
        return None
    magic, base, dev, ino, ident, crc = _HEAD.unpack_from(blob)
    if magic != _MAGIC or crc != zlib.crc32(blob[: _HEAD.size - 4]):
        return None
    head = (base, dev, ino, ident)
    if len(blob) < _HEAD.size + _TAIL.size:
        return head, None
    count, crc, end = _TAIL.unpack_from(blob, len(blob) - _TAIL.size)
    body = blob[: len(blob) - _TAIL.size]
    if end != _END or crc != zlib.crc32(body):
        return head, None
    records, pos = [], _HEAD.size
    for _ in range(count):
        if pos + _RECORD.size > len(body):
            return head, None
        off, n = _RECORD.unpack_from(body, pos)
        pos += _RECORD.size
        records.append((off, body[pos : pos + n]))
        pos += n
    return (head, records) if pos == len(body) else (head, None)


def recover(path: str | Target) -> str | None:
    """Undo an append to ``path`` that a killed daemon left half done (see the module
    docstring); returns what was done, or None when there was no journal. Idempotent."""
    target, owned = as_target(path)
    try:
        return _recover(target)
    finally:
        if owned:
            target.close()


def _recover(target: Target) -> str | None:
    path = target.path
    jname = _journal_name(target.name)
    try:
        jfd = os.open(jname, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=target.dir_fd)
    except FileNotFoundError:
        return None
    except OSError as e:  # a symlink (ELOOP) or worse at the journal's name: not ours
        raise WriteFailed(
            f"cannot append to {path!r}: its journal's name "
            f"{_journal_name(target.name)!r} holds something else ({e.strerror})"
        ) from None
    with open(jfd, "rb") as j:
        if not stat.S_ISREG(os.fstat(jfd).st_mode):
            raise WriteFailed(f"cannot append to {path!r}: its journal's name holds something else")
        blob = j.read()
    parsed = _parse(blob)
    if parsed is None:
        _unlink(target, jname)
        return "dropped an unwritten journal"
    (base, dev, ino, ident), records = parsed
    try:
        fd = open_in(target, os.O_RDWR)
    except FileNotFoundError:
        _unlink(target, jname)
        return "dropped the journal of a removed file"
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino, _identity(fd)) != (dev, ino, ident):
            _unlink(target, jname)
            return "dropped the journal of a replaced file"
        for off, data in records or ():
            pwrite_all(fd, data, off)
        os.ftruncate(fd, base)
        os.fsync(fd)
    except OSError as e:
        err = WriteFailed(f"cannot restore {path!r} from its journal {jname!r}: {e.strerror or e}")
        err.errno = e.errno
        raise err from e
    finally:
        os.close(fd)
    os.unlink(jname, dir_fd=target.dir_fd)
    fsync_dir(target.dir_fd)
    return (
        f"restored {len(records)} ranges and cut to {base} bytes"
        if records is not None
        else f"cut to {base} bytes (the append had not changed earlier bytes)"
    )
