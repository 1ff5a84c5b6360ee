"""Confinement by file descriptor: every file the daemon touches is reached from an open root.

Why: checking a path with ``realpath`` and then opening it again by name leaves a window
in which anybody who can write under a root (a client, another local user in a shared
scratch directory) swaps a directory for a symlink leading out of the root, or a
temporary file for a symlink, and the daemon's next open by name follows it. So a client
path is resolved once, to an open directory descriptor (:class:`Target`), and every later
operation is relative to that descriptor: temporaries are created ``O_CREAT | O_EXCL |
O_NOFOLLOW`` in it, renamed within it, existing files opened ``O_NOFOLLOW`` in it, and
HDF5 is given the already-open file (``/proc/self/fd/N``), never a name.

How a directory is resolved (:func:`resolve`):

1. The client's path, made absolute and normalised (``..`` is taken lexically), must lie
   under a root; if it does not, its directory is resolved once with ``realpath`` (the
   parts outside every root belong to the operator, not to a client) and must then lie
   under one. Otherwise: ``PathNotAllowedError`` naming the path.
2. From the root's descriptor (opened once per daemon), the directory below it is opened
   with ``openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)``: one
   system call that fails if any component is a symlink or climbs out.
3. Where that fails because of a symlink (or the kernel has no ``openat2``), the
   components are walked one ``openat(O_PATH | O_DIRECTORY | O_NOFOLLOW)`` at a time;
   a symlink is read (``readlinkat``) and followed only if its target stays under a root:
   an absolute target must lie lexically under a root and is walked again from that
   root's descriptor, a relative one is walked on from the directory holding it, ``..``
   steps back to the descriptor of the parent already open (never above the root).
   At most 40 links per path (``ELOOP`` after).

No directory cache: ``openat2`` is one system call, cheaper than the old cache's
re-verification by ``stat`` (measured in the closing note of issue 11). What is kept
(``_lexicals``) is only step 1's text work for a directory's text (its root and the
parts below it), never anything the file system said.

Threads: any writer thread calls :func:`resolve`; the root descriptors are opened under
``_roots_lock`` and then only read; ``_lexicals`` is read, filled and emptied by single
dict operations (atomic under the GIL; a lost entry is only computed again). A
:class:`Target` belongs to the one job (or save in pieces) that resolved it, which
closes it.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import threading
from collections.abc import Sequence
from types import TracebackType

from matspool._errors import PathNotAllowedError, WriteFailed

__all__ = ["MAX_LINKS", "Target", "as_target", "failed", "open_in", "resolve"]

MAX_LINKS = 40  # Linux's own limit on symlinks followed in one path

_O_PATH = getattr(os, "O_PATH", 0o10000000)
_DIR_FLAGS = _O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08
_SYS_OPENAT2 = 437  # the same number on every architecture (new unified syscall table)


def failed(message: str, number: int) -> WriteFailed:
    """A WriteFailed with its OS errno (the daemon's ERR carries it)."""
    err = WriteFailed(message)
    err.errno = number
    return err


class Target:
    """A file name inside an open directory: where a save goes.

    ``dir_fd`` is an ``O_PATH`` descriptor of the directory (owned: :meth:`close`),
    ``name`` the file's name in it (no slash), ``path`` the path the client gave (for
    messages) and ``dir_path`` the directory as it was resolved (for the temporaries
    journal; never reopened by name for writing). ``unchecked``: :meth:`refuse_directory`
    has not looked at the name yet (``resolve(..., check=False)``); whoever puts a file
    there by name calls it first."""

    __slots__ = ("dir_fd", "dir_path", "name", "path", "unchecked")

    def __init__(self, dir_fd: int, name: str, path: str, dir_path: str, unchecked: bool = False) -> None:
        self.dir_fd = dir_fd
        self.name = name
        self.path = path
        self.dir_path = dir_path
        self.unchecked = unchecked

    def refuse_directory(self) -> None:
        """``WriteFailed`` (EISDIR) if a directory holds the name: a save never lands in
        or over one. A name that does not exist, or anything else there, passes. Looks
        once: a Target already checked (or never ``unchecked``) is not looked at again."""
        if not self.unchecked:
            return
        self.unchecked = False
        try:
            st = os.stat(self.name, dir_fd=self.dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):
            raise failed(f"cannot write {self.path!r}: it is a directory", errno.EISDIR)

    @classmethod
    def unconfined(cls, path: str) -> Target:
        """``path``'s directory opened by name, for callers that trust the path (tests,
        benchmarks, tools); the daemon always uses :func:`resolve`."""
        directory, name = os.path.split(os.path.abspath(path))
        return cls(os.open(directory, _DIR_FLAGS), name, path, directory)

    def dup(self) -> Target:
        """The same target with its own descriptor (for a save in pieces, which outlives its job)."""
        return Target(os.dup(self.dir_fd), self.name, self.path, self.dir_path, self.unchecked)

    def close(self) -> None:
        if self.dir_fd >= 0:
            os.close(self.dir_fd)
            self.dir_fd = -1

    def __enter__(self) -> Target:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Target({self.path!r}, fd={self.dir_fd})"


def as_target(dest: str | Target) -> tuple[Target, bool]:
    """``dest`` as a Target, and whether the caller made it (and so closes it)."""
    if isinstance(dest, Target):
        return dest, False
    return Target.unconfined(dest), True


def open_in(target: Target, flags: int, what: str = "file") -> int:
    """Open ``target``'s existing file ``O_NOFOLLOW`` relative to its directory; a
    symlink there is refused (``PathNotAllowedError``), anything but a regular file too."""
    try:
        fd = os.open(target.name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=target.dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise PathNotAllowedError(
                f"{target.path!r} is a symlink; the daemon does not follow a symlink at a {what}'s name"
            ) from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise failed(f"{target.path!r} is not a regular file", errno.EINVAL)
    return fd


# -- roots ---------------------------------------------------------------------------------

_roots_lock = threading.Lock()
_root_fds: dict[str, int] = {}


def _root_fd(root: str) -> int:
    """The daemon's descriptor of ``root`` (a real path from ``normalize_roots``), opened
    once: a root renamed or replaced afterwards does not move the daemon's writes."""
    fd = _root_fds.get(root)
    if fd is None:
        with _roots_lock:
            fd = _root_fds.get(root)
            if fd is None:
                fd = _root_fds[root] = os.open(root, _DIR_FLAGS)
    return fd


def _root_of(directory: str, roots: Sequence[str]) -> str | None:
    for root in roots:
        if root == "/" or directory == root or directory.startswith(root + "/"):
            return root
    return None


def _below(directory: str, root: str) -> list[str]:
    rest = directory[len(root) :] if root != "/" else directory
    return [p for p in rest.split("/") if p]


# -- openat2 -------------------------------------------------------------------------------


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def _load_openat2() -> tuple[object, object, object, object] | None:
    """``syscall`` and its fixed arguments, made once: the number and the size as C
    ``long`` and ``size_t`` objects and a reference to the ``open_how``, so each call
    converts only the descriptor and the path (no ``argtypes``: their checks were a
    fifth of a resolve, measured 3.0 against 2.5 us a call)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.syscall
    except (OSError, AttributeError):
        return None
    call.restype = ctypes.c_long
    how = _OpenHow(_DIR_FLAGS, 0, _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS)
    # the reference keeps ``how`` alive
    return call, ctypes.c_long(_SYS_OPENAT2), ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how))


_OPENAT2 = _load_openat2()
_openat2_works = _OPENAT2 is not None and os.uname().sysname == "Linux"


def _openat2_dir(root_fd: int, rel: str) -> int | None:
    """``rel`` below ``root_fd`` with no symlink and no escape, or None to walk instead
    (a symlink on the way, or no ``openat2``); other errors raise ``OSError``."""
    global _openat2_works
    if not _openat2_works or _OPENAT2 is None:
        return None
    call, number, how_ref, how_size = _OPENAT2
    fd = call(number, root_fd, rel.encode(), how_ref, how_size)  # type: ignore[operator]  # int: C int
    if fd >= 0:
        return int(fd)
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EPERM, errno.E2BIG):  # no openat2 (or a seccomp filter)
        _openat2_works = False
        return None
    if err in (errno.ELOOP, errno.EXDEV, errno.EAGAIN):  # a symlink, or a retry: the walk decides
        return None
    raise OSError(err, os.strerror(err), rel)


# -- the walk ------------------------------------------------------------------------------


def _outside(path: str, roots: Sequence[str], why: str = "") -> PathNotAllowedError:
    return PathNotAllowedError(
        f"{path!r} is outside the daemon's roots ({', '.join(roots)}){why}; start "
        "the daemon with --root for that directory"
    )


def _walk(path: str, root: str, parts: list[str], roots: Sequence[str]) -> tuple[int, str]:
    """Open ``root``/``parts`` one component at a time, following only symlinks whose
    targets stay under a root; returns the directory's descriptor and its path."""
    stack: list[tuple[int, str]] = [(os.dup(_root_fd(root)), root)]
    pending = parts[::-1]  # popped from the end
    links = 0
    try:
        while pending:
            name = pending.pop()
            if name in ("", "."):
                continue
            if name == "..":
                if len(stack) == 1:
                    raise _outside(path, roots, ": '..' climbs out of the root")
                os.close(stack.pop()[0])
                continue
            here, here_path = stack[-1]
            try:
                fd = os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=here)
            except OSError as e:
                if e.errno not in (errno.ENOTDIR, errno.ELOOP):
                    raise
                fd = -1
            if fd >= 0:
                if stat.S_ISDIR(os.fstat(fd).st_mode):
                    stack.append((fd, os.path.join(here_path, name)))
                    continue
                os.close(fd)  # O_PATH | O_NOFOLLOW opened the symlink itself
            st = os.stat(name, dir_fd=here, follow_symlinks=False)
            if not stat.S_ISLNK(st.st_mode):
                raise failed(
                    f"cannot write {path!r}: {os.path.join(here_path, name)!r} is not a directory",
                    errno.ENOTDIR,
                )
            links += 1
            if links > MAX_LINKS:
                raise failed(f"cannot write {path!r}: more than {MAX_LINKS} symlinks", errno.ELOOP)
            link = os.readlink(name, dir_fd=here)
            if link.startswith("/"):
                target = os.path.normpath(link)
                new_root = _root_of(target, roots)
                if new_root is None:
                    where = os.path.join(here_path, name)
                    raise _outside(path, roots, f": {where!r} is a symlink to {link!r}")
                left, stack = stack, []
                for fd_, _ in left:
                    os.close(fd_)
                stack.append((os.dup(_root_fd(new_root)), new_root))
                pending.extend(_below(target, new_root)[::-1])
            else:
                pending.extend(link.split("/")[::-1])
        fd, real = stack.pop()
        return fd, real
    finally:
        for fd_, _ in stack:
            os.close(fd_)


_LEXICAL_KEPT = 1024
#: (roots, the text before a path's last slash) -> that directory normalised, its root and
#: the parts below it: pure text, the same for every file of a directory (the file
#: system is asked afresh for each file, by ``openat2`` or the walk)
_lexicals: dict[tuple[tuple[str, ...], str], tuple[str, str, list[str]]] = {}


def _lexical(path: str, roots: Sequence[str]) -> tuple[str, str, str, list[str]]:
    """``path``'s directory (normalised), name, root and the directory's parts below the
    root, by text alone; refuses a relative path, a directory's name, a path outside
    every root. A directory outside every root is ``realpath``-ed (not kept: those
    symlinks are the operator's and may change)."""
    roots = roots if type(roots) is tuple else tuple(roots)
    head, slash, base = path.rpartition("/")
    if slash and base and base not in (".", "..") and head[:1] in ("", "/"):
        known = _lexicals.get((roots, head))
        if known is not None:
            return known[0], base, known[1], known[2]
    if not os.path.isabs(path):
        raise PathNotAllowedError(f"path must be absolute: {path!r}")
    directory, base = os.path.split(os.path.normpath(path))
    if not base or base in (".", ".."):
        raise failed(f"path names a directory, not a file: {path!r}", errno.EISDIR)
    root = _root_of(directory, roots)
    if root is None:  # through a symlink outside every root: resolved once, then walked
        directory = os.path.realpath(directory)
        root = _root_of(directory, roots)
        if root is None:
            raise _outside(path, roots)
    elif slash and base == path[len(head) + 1 :]:
        if len(_lexicals) >= _LEXICAL_KEPT:
            _lexicals.clear()
        _lexicals[(roots, head)] = (directory, root, _below(directory, root))
    return directory, base, root, _below(directory, root)


def resolve(path: str, roots: Sequence[str], *, check: bool = True) -> Target:
    """``path`` (absolute, as a client sent it) as a :class:`Target` below one of ``roots``
    (real paths, see ``paths.normalize_roots``); see the module docstring. With ``check``
    a directory at the name is refused here (``Target.refuse_directory``); without it
    (a small new file, linked in by ``linkat``, which cannot land on a directory), the
    Target is ``unchecked`` and its writer checks only where it puts a file there by name:
    one ``stat`` less per file."""
    directory, base, root, parts = _lexical(path, roots)
    try:
        fd = os.dup(_root_fd(root)) if not parts else _openat2_dir(_root_fd(root), "/".join(parts))
        real = directory
        if fd is None:
            fd, real = _walk(path, root, parts, roots)
    except OSError as e:
        if isinstance(e, (PathNotAllowedError, WriteFailed)):
            raise
        if e.errno == errno.ENOENT:
            raise failed(
                f"cannot write {path!r}: directory {os.path.dirname(path)!r} does not exist", errno.ENOENT
            ) from None
        if e.errno == errno.ENOTDIR:
            raise failed(
                f"cannot write {path!r}: {os.path.dirname(path)!r} is not a directory", errno.ENOTDIR
            ) from None
        raise failed(f"cannot write {path!r}: {e.strerror or e}", e.errno or errno.EIO) from None
    target = Target(fd, base, path, real, unchecked=True)
    if check:
        try:
            target.refuse_directory()
        except BaseException:
            target.close()
            raise
    return target
