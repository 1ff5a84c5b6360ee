"""The ``matspool`` command: ``serve`` runs the daemon, ``demo`` a simulation job against it,
``verify`` checks .mat files."""

# This module parses the command line (and turns a command's failure into one line); what
# each command then does is in ``commands``. Threads: the main thread of the process.

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

from matspool._launcher import BUSY_EXIT

from .commands import BAD_INPUT, _demo, _keygen, _ping, _serve, _status, _verify
from .config import ConfigError, default_endpoint, take_flags

__all__ = ["BAD_INPUT", "default_endpoint", "main"]


class _Parser(argparse.ArgumentParser):
    """argparse's errors in one line (no usage block): a script's log shows what was wrong."""

    def error(self, message: str) -> NoReturn:
        self.exit(BAD_INPUT, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("matspool")
    except PackageNotFoundError:  # run from a source tree
        return "unknown (not installed)"


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def _endpoint(text: str) -> str:
    """A client-side endpoint (ping, status): ipc://PATH or tcp://HOST:PORT."""
    from matspool._errors import InvalidOptionError
    from matspool._reach import check_endpoint

    try:
        check_endpoint(text)
    except InvalidOptionError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _mode(text: str) -> int:
    try:
        value = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an octal mode: {text!r}") from None
    if not 0 <= value <= 0o777:
        raise argparse.ArgumentTypeError(f"mode out of range: {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    p = _Parser(prog="matspool", description=__doc__)
    p.add_argument("--version", action="version", version=f"matspool {_version()}")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the writer daemon")
    # Setting flags default to SUPPRESS: only flags actually given override the config file
    # and MATSPOOL_* variables (config.take_flags then fills in the built-in defaults).
    unset = argparse.SUPPRESS
    s.add_argument(
        "--config", metavar="FILE", help="TOML file with a [serve] table (default: $MATSPOOL_CONFIG)"
    )
    s.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved settings as TOML, with where each came from, and exit",
    )
    s.add_argument(
        "--endpoint",
        default=unset,
        help=f"ZeroMQ endpoint to bind (default: $MATSPOOL_ENDPOINT, else {default_endpoint()})",
    )
    s.add_argument(
        "--root",
        action="append",
        metavar="DIR",
        default=unset,
        help="directory the daemon may write under (repeatable; default: the current one)",
    )
    s.add_argument(
        "--writers", type=int, default=unset, help=f"writer threads (default: {min(8, os.cpu_count() or 1)})"
    )
    s.add_argument(
        "--compress-threads",
        type=int,
        default=unset,
        help=f"cores that deflate compressed saves (default: all, {os.cpu_count() or 1})",
    )
    s.add_argument(
        "--socket-mode",
        type=_mode,
        default=unset,
        help="permissions of an ipc socket, octal (default: 600, owner only)",
    )
    s.add_argument("--group", default=unset, help="group to give the ipc socket (use with --socket-mode 660)")
    s.add_argument(
        "--no-clean-stale",
        dest="clean_stale",
        action="store_false",
        default=unset,
        help="do not remove rings of dead clients from /dev/shm at start (use when "
        "clients run in another pid namespace)",
    )
    s.add_argument(
        "--clean-stale",
        dest="clean_stale",
        action="store_true",
        default=unset,
        help="remove them (the default; overrides clean_stale = false in a config file)",
    )
    s.add_argument(
        "--client-timeout",
        type=float,
        default=unset,
        help="seconds of silence after which a remote client, or any client with "
        "--no-clean-stale, counts as dead; a local client whose pid is alive "
        "is never dropped (default: 30.0)",
    )
    s.add_argument(
        "--max-ring-bytes",
        type=int,
        metavar="BYTES",
        default=unset,
        help="largest ring one client may register; a larger HELLO is refused (default: 4294967296, 4 GiB)",
    )
    s.add_argument(
        "--max-total-ring-bytes",
        type=int,
        metavar="BYTES",
        default=unset,
        help="largest sum of every connected client's ring (default: 68719476736, 64 GiB)",
    )
    s.add_argument(
        "--state-dir",
        metavar="DIR",
        default=unset,
        help="where the daemon journals the directories it writes temporary files "
        "in, so a restart removes a killed daemon's leftovers (default: "
        "$STATE_DIRECTORY, else $XDG_STATE_HOME/matspool, else "
        "~/.local/state/matspool)",
    )
    s.add_argument(
        "--curve-secret",
        metavar="FILE",
        default=unset,
        help="the server's .key_secret file (required for tcp:// endpoints)",
    )
    s.add_argument(
        "--curve-clients",
        metavar="DIR",
        default=unset,
        help="directory of authorized client public .key files (required for tcp://)",
    )
    s.add_argument(
        "--log-format",
        default=unset,
        choices=["text", "json"],
        help="json: one JSON object per log line, for log collectors (default: text)",
    )
    s.add_argument(
        "--metrics",
        metavar="[HOST:]PORT",
        default=unset,
        help="serve Prometheus metrics over HTTP there (default: off)",
    )
    s.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)
    s.add_argument(
        "--idle-exit",
        type=_seconds,
        default=None,
        metavar="SECONDS",
        help="exit once no client has been connected for SECONDS (a job's shared daemon, "
        f"started by its ranks); a busy endpoint then exits with {BUSY_EXIT}, silently",
    )
    s.add_argument("--debug-write-delay", type=float, default=0.0, help=argparse.SUPPRESS)
    s.add_argument(
        "--log-level", default=unset, choices=["debug", "info", "warning", "error"], help="(default: info)"
    )
    s.set_defaults(func=_serve)
    for name, func, what in (
        ("ping", _ping, "exit 0 if the daemon answers (health checks)"),
        ("status", _status, "per-client queue, ring use, files, throughput, errors"),
    ):
        q = sub.add_parser(name, help=what)
        q.add_argument(
            "--endpoint", type=_endpoint, default=os.environ.get("MATSPOOL_ENDPOINT") or default_endpoint()
        )
        q.add_argument("--timeout", type=_seconds, default=5.0)
        if name == "status":
            q.add_argument("--json", action="store_true", help="print the daemon's raw answer")
            q.add_argument(
                "--watch",
                type=_seconds,
                nargs="?",
                const=1.0,
                metavar="SECONDS",
                help="refresh the table every SECONDS (default 1) until Ctrl-C",
            )
        q.set_defaults(func=func)
    k = sub.add_parser("keygen", help="make a CURVE key pair for a tcp:// endpoint")
    k.add_argument("dir", help="directory to write NAME.key and NAME.key_secret into")
    k.add_argument("--name", default="matspool", help="file name stem (default: %(default)s)")
    k.add_argument(
        "--force",
        action="store_true",
        help="replace an existing key pair of that name (clients holding the old "
        "public key can no longer connect)",
    )
    k.set_defaults(func=_keygen)
    v = sub.add_parser("verify", help="check .mat files the way MATLAB would read them")
    v.add_argument("files", nargs="+", metavar="FILE")
    v.add_argument("--json", action="store_true", help="print a machine-readable report")
    v.set_defaults(func=_verify)
    d = sub.add_parser("demo", help="run a demo simulation that exports every step")
    d.add_argument("--out", default="out/demo", help="output directory (default: %(default)s)")
    d.add_argument("--steps", type=_positive, default=40)
    d.add_argument("--size", type=_positive, default=2048, help="grid is SIZE x SIZE float32")
    d.add_argument("--format", default="v7.3", choices=["v5", "v7.3"])
    d.set_defaults(func=_demo)
    # -- node daemon writing as each client's user (userd): its own parser --------------
    sub.add_parser(
        "node",
        add_help=False,
        help="node daemon that writes as each job's user (root; `matspool node --help`)",
    )
    args_in = sys.argv[1:] if argv is None else argv
    if args_in[:1] == ["node"]:
        from .userd import main as node_main

        return node_main(args_in[1:])
    args = p.parse_args(argv)
    if args.command == "serve":
        args.given_flags = take_flags(args)
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    """A command's failure as one line, never a traceback: what the user gave that was
    wrong (exit 2), or, for anything else, the error and how to see its traceback (exit 1)."""
    from matspool._errors import MatspoolError

    try:
        status: int = args.func(args)
    except KeyboardInterrupt:
        print(f"matspool {args.command}: interrupted", file=sys.stderr)
        return 130
    except (MatspoolError, ConfigError, OSError, ValueError) as e:
        if os.environ.get("MATSPOOL_DEBUG"):
            raise
        print(f"matspool {args.command}: {_one_line(e)}", file=sys.stderr)
        return BAD_INPUT
    except Exception as e:  # a bug: say so in one line, keep the traceback a variable away
        if os.environ.get("MATSPOOL_DEBUG"):
            raise
        print(
            f"matspool {args.command}: internal error {type(e).__name__}: {_one_line(e)} "
            "(MATSPOOL_DEBUG=1 shows the traceback)",
            file=sys.stderr,
        )
        return 1
    return status


def _one_line(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    if isinstance(e, OSError) and e.filename is not None and e.strerror:
        text = f"{e.filename}: {e.strerror}"
    return " ".join(text.split())
