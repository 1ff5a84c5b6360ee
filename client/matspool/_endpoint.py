"""Whose directory an ipc endpoint lives in: refuse one another local user could control.

An ipc socket is a file; whoever controls the directory it lives in controls which
process answers there. With no ``XDG_RUNTIME_DIR`` the default endpoint is under
``/tmp/matspool-<uid>``, a name any local user can create first in the world-writable
``/tmp`` and then run a fake daemon in: that process would receive every path the
victim saves to and could answer DONE for files never written. So both sides check the
directory before use, the daemon before it binds and the client before it connects to
an endpoint it did not create itself:

- the socket's directory is a real directory (not a symlink), not writable by other
  users (no ``o+w``; ``g+w`` only for the daemon's configured ``--group``);
- it is owned by this user or root, or (a node daemon's directory such as
  ``/run/matspool`` owned by a ``matspool`` account) it sits in a parent only root or
  this user can write to, so nobody else can have put it there;
- every directory above it is likewise owned by root or this user, and writable by
  others only if sticky (``/tmp``), where an entry of another user is refused;
- the default endpoint's own directories must be this user's, mode 0700 (no group or
  other bits): nobody else has any business there.

A failed check raises :class:`~matspool.DaemonUnavailable` whose message names the
directory, what is wrong and what to do; ``matspool serve`` prints it and exits with 2.

Threads: none; pure functions of the file system and the process's ids.
"""

from __future__ import annotations

import os
import stat

from ._errors import DaemonUnavailable

__all__ = ["check_ipc_endpoint", "default_base", "default_endpoint", "make_private_dirs"]


def default_base() -> str:
    """The directory the default endpoint's ``matspool/`` lives in."""
    return os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/matspool-{os.getuid()}"


def default_endpoint() -> str:
    """``ipc://$XDG_RUNTIME_DIR/matspool/matspool.sock`` (``/tmp/matspool-<uid>`` without
    a runtime directory): where ``serve``, ``ping`` and ``status`` meet by default."""
    return f"ipc://{default_base()}/matspool/matspool.sock"


def _private_dirs(directory: str) -> list[str]:
    """The directories of ``directory`` that must be this user's alone (mode 0700): those
    of the default endpoint below ``/tmp`` or the runtime directory."""
    base = default_base()
    if os.path.normpath(directory) != os.path.join(base, "matspool"):
        return []
    # XDG_RUNTIME_DIR is made 0700 by the login manager; /tmp/matspool-<uid> by us
    return [os.path.join(base, "matspool")] + ([] if os.environ.get("XDG_RUNTIME_DIR") else [base])


def make_private_dirs(endpoint: str) -> None:
    """Create the missing directories of the default endpoint, each mode 0700 (a plain
    ``makedirs`` gives the parents the umask's mode). Other endpoints: nothing."""
    path = endpoint[len("ipc://") :]
    for d in reversed(_private_dirs(os.path.dirname(path))):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            pass


def _fail(directory: str, what: str, remedy: str) -> DaemonUnavailable:
    return DaemonUnavailable(f"unsafe endpoint directory {directory}: {what}; {remedy}")


def _name(uid: int) -> str:
    try:
        import pwd

        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except (KeyError, ImportError):
        return f"uid {uid}"


def check_ipc_endpoint(endpoint: str, *, group_gid: int | None = None, missing_ok: bool = True) -> None:
    """Raise :class:`DaemonUnavailable` unless ``endpoint``'s directory is one only this
    user (or root, or the configured group's daemon) controls; see the module docstring.

    ``group_gid``: the daemon's ``--group`` (the directory's group must be it, and it may
    be group-writable). ``missing_ok``: a directory that does not exist yet passes (the
    daemon creates it; a client then simply finds no daemon). Not an ipc endpoint: nothing.
    """
    if not endpoint.startswith("ipc://"):
        return
    me = os.geteuid()
    directory = os.path.dirname(os.path.abspath(endpoint[len("ipc://") :]))
    try:
        st = os.lstat(directory)
    except FileNotFoundError:
        if missing_ok:
            return
        raise _fail(directory, "it does not exist", "create it, mode 0700") from None
    if stat.S_ISLNK(st.st_mode):
        raise _fail(
            directory,
            f"it is a symbolic link to {os.path.realpath(directory)}",
            "use the real directory, or remove the link",
        )
    if not stat.S_ISDIR(st.st_mode):
        raise _fail(directory, "it is not a directory", "remove it, or use another endpoint")
    private = _private_dirs(directory)
    for d in private:
        s = os.lstat(d)
        if stat.S_ISLNK(s.st_mode) or s.st_uid != me:
            raise _fail(
                d,
                f"it belongs to {_name(s.st_uid)}, not to this user "
                f"{_name(me)} (another user may be running a fake daemon there)",
                "remove it (as root) or set XDG_RUNTIME_DIR or MATSPOOL_ENDPOINT to a directory of yours",
            )
        if s.st_mode & 0o077:
            raise _fail(d, f"mode {stat.S_IMODE(s.st_mode):04o} lets others in", f"chmod 700 {d}")
    if st.st_mode & stat.S_IWOTH:
        raise _fail(
            directory,
            f"mode {stat.S_IMODE(st.st_mode):04o}: any user can replace the socket",
            "give the socket a directory of its own, not writable by others",
        )
    if st.st_mode & stat.S_IWGRP and (group_gid is None or st.st_gid != group_gid):
        raise _fail(
            directory,
            f"mode {stat.S_IMODE(st.st_mode):04o}: its group can replace the socket",
            f"chmod g-w {directory}",
        )
    if group_gid is not None and st.st_gid != group_gid:
        raise _fail(
            directory,
            f"its group is gid {st.st_gid}, not the configured --group (gid {group_gid})",
            "chgrp the directory, or serve another endpoint",
        )
    _check_ancestors(directory, st, me)


def _check_ancestors(directory: str, st: os.stat_result, me: int) -> None:
    """Every directory from ``/`` down to ``directory``: owned by root or this user, or
    placed by them (a parent only they can write to); writable by others only if sticky,
    and then its entries must be root's or this user's."""
    parts = os.path.realpath(directory).split(os.sep)[1:]
    parent = os.lstat("/")
    path = "/"
    for part in parts:
        if not part:
            continue
        path = os.path.join(path, part)
        here = os.lstat(path) if path != os.path.realpath(directory) else st
        parent_open = parent.st_uid not in (0, me) or parent.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        if here.st_uid not in (0, me) and parent_open:
            raise _fail(
                path,
                f"it belongs to {_name(here.st_uid)} and sits in a directory others "
                "can write to (another user may have made it to catch this endpoint)",
                "use a directory of your own (XDG_RUNTIME_DIR, or MATSPOOL_ENDPOINT)",
            )
        if (
            path != os.path.realpath(directory)
            and here.st_mode & stat.S_IWOTH
            and not here.st_mode & stat.S_ISVTX
        ):
            raise _fail(
                path,
                f"mode {stat.S_IMODE(here.st_mode):04o}: any user can replace what is inside",
                "put the endpoint under a directory not writable by others",
            )
        parent = here
