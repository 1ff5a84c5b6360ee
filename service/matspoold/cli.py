"""The ``matspool`` command: ``serve`` runs the daemon, ``demo`` a simulation job against it."""

from __future__ import annotations

import argparse
import logging
import os
import sys

__all__ = ["default_endpoint", "main"]


def default_endpoint() -> str:
    base = os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/matspool-{os.getuid()}"
    return f"ipc://{base}/matspool/matspool.sock"


def _mode(text: str) -> int:
    try:
        value = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an octal mode: {text!r}") from None
    if not 0 <= value <= 0o777:
        raise argparse.ArgumentTypeError(f"mode out of range: {text!r}")
    return value


def _serve(args: argparse.Namespace) -> int:
    from .server import Daemon, install_signal_handlers

    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    roots = args.root or [os.getcwd()]
    try:
        daemon = Daemon(args.endpoint, roots, writers=args.writers, socket_mode=args.socket_mode,
                        socket_group=args.group, parent_pid=args.parent_pid,
                        clean_stale=args.clean_stale, client_timeout=args.client_timeout,
                        curve_secret=args.curve_secret, curve_clients=args.curve_clients,
                        write_delay=args.debug_write_delay)
    except (ValueError, KeyError) as e:
        print(f"matspool serve: {e}", file=sys.stderr)
        return 2
    from .writers import _deflate

    _deflate.set_threads(args.compress_threads)
    # The control loop is I/O-bound and shares the GIL with writer threads; Python's
    # default 5 ms switch interval would make every reply wait behind a writer.
    sys.setswitchinterval(float(os.environ.get("MATSPOOL_SWITCH_INTERVAL", "0.001")))
    install_signal_handlers(daemon)
    try:
        daemon.serve()
    except (ValueError, OSError) as e:  # bind failures, unreadable keys: say so, no traceback
        print(f"matspool serve: {e}", file=sys.stderr)
        return 2
    return 0


def _keygen(args: argparse.Namespace) -> int:
    from matspool._curve import make_keys

    public, secret = make_keys(args.dir, args.name)
    print(f"public key: {public}\nsecret key: {secret} (owner-only; keep it on this host)")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(out=args.out, steps=args.steps, n=args.size, fmt=args.format)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="matspool", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="run the writer daemon")
    s.add_argument("--endpoint", default=default_endpoint(),
                   help="ZeroMQ endpoint to bind (default: %(default)s)")
    s.add_argument("--root", action="append", metavar="DIR",
                   help="directory the daemon may write under (repeatable; default: the current one)")
    s.add_argument("--writers", type=int, default=min(8, os.cpu_count() or 1),
                   help="writer threads (default: %(default)s)")
    s.add_argument("--compress-threads", type=int, default=os.cpu_count() or 1,
                   help="cores that deflate compressed saves (default: all, %(default)s)")
    s.add_argument("--socket-mode", type=_mode, default=0o600,
                   help="permissions of an ipc socket, octal (default: 600, owner only)")
    s.add_argument("--group", help="group to give the ipc socket (use with --socket-mode 660)")
    s.add_argument("--no-clean-stale", dest="clean_stale", action="store_false",
                   help="do not remove rings of dead clients from /dev/shm at start (use when "
                        "clients run in another pid namespace)")
    s.add_argument("--client-timeout", type=float, default=30.0,
                   help="seconds of silence after which a client counts as dead (default: %(default)s)")
    s.add_argument("--curve-secret", metavar="FILE",
                   help="the server's .key_secret file (required for tcp:// endpoints)")
    s.add_argument("--curve-clients", metavar="DIR",
                   help="directory of authorized client public .key files (required for tcp://)")
    s.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)
    s.add_argument("--debug-write-delay", type=float, default=0.0, help=argparse.SUPPRESS)
    s.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    s.set_defaults(func=_serve)
    k = sub.add_parser("keygen", help="make a CURVE key pair for a tcp:// endpoint")
    k.add_argument("dir", help="directory to write NAME.key and NAME.key_secret into")
    k.add_argument("--name", default="matspool", help="file name stem (default: %(default)s)")
    k.set_defaults(func=_keygen)
    d = sub.add_parser("demo", help="run a demo simulation that exports every step")
    d.add_argument("--out", default="out/demo", help="output directory (default: %(default)s)")
    d.add_argument("--steps", type=int, default=40)
    d.add_argument("--size", type=int, default=2048, help="grid is SIZE x SIZE float32")
    d.add_argument("--format", default="v7.3", choices=["v5", "v7.3"])
    d.set_defaults(func=_demo)
    args = p.parse_args(argv)
    return args.func(args)
