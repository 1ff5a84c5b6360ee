"""What each ``matspool`` command does once its arguments are parsed: ``serve`` (the
daemon), ``ping``, ``status``, ``keygen``, ``verify``, ``demo``.

``cli`` builds the parser and turns a command's failure into one line; the commands are
here so that the parser stays one screen of flags and each command's work is in one place.
Each imports what it needs when it runs (a ``ping`` never loads the daemon).

Threads: no state; the main thread of the ``matspool`` process.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

from matspool._launcher import BUSY_EXIT

from .config import ConfigError, resolve_settings

__all__ = ["BAD_INPUT", "_demo", "_keygen", "_ping", "_serve", "_status", "_verify"]

#: Exit status of every command given bad input (a flag, a path, an endpoint, a key).
BAD_INPUT = 2


def _every_cpu() -> None:
    """A job's daemon writes for every rank on the node: it must not stay bound to the
    cores of the rank that started it (``srun --cpu-bind``); the kernel keeps it within
    the job's cpuset."""
    try:
        os.sched_setaffinity(0, range(os.cpu_count() or 1))
    except (AttributeError, OSError):  # no such call here, or nothing allowed outside the mask
        pass


def _serve(args: argparse.Namespace) -> int:
    try:  # defaults < config file < MATSPOOL_* environment < the flags given (config.py)
        resolved = resolve_settings(getattr(args, "given_flags", {}), config=args.config)
    except ConfigError as e:
        print(f"matspool serve: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        sys.stdout.write(resolved.to_toml())
        return 0
    cfg = resolved.settings
    from .endpoint import EndpointBusy
    from .logs import setup_logging
    from .server import Daemon, install_signal_handlers

    setup_logging(cfg.log_level, cfg.log_format)
    if args.idle_exit is not None:
        _every_cpu()
    try:
        daemon = Daemon(
            cfg.endpoint,
            cfg.roots,
            writers=cfg.writers,
            socket_mode=cfg.socket_mode,
            socket_group=cfg.group,
            parent_pid=args.parent_pid,
            idle_exit=args.idle_exit,
            clean_stale=cfg.clean_stale,
            client_timeout=cfg.client_timeout,
            max_ring_bytes=cfg.max_ring_bytes,
            max_total_ring_bytes=cfg.max_total_ring_bytes,
            state_dir=cfg.state_dir,
            curve_secret=cfg.curve_secret,
            curve_clients=cfg.curve_clients,
            write_delay=args.debug_write_delay,
        )
    except (ValueError, KeyError) as e:
        print(f"matspool serve: {e}", file=sys.stderr)
        return 2
    from .writers import _deflate

    _deflate.set_threads(cfg.compress_threads)
    # The control loop is I/O-bound and shares the GIL with writer threads; Python's
    # default 5 ms switch interval would make every reply wait behind a writer.
    sys.setswitchinterval(float(os.environ.get("MATSPOOL_SWITCH_INTERVAL", "0.001")))
    install_signal_handlers(daemon)
    try:
        if cfg.metrics is not None:
            from .metrics import start_metrics

            try:
                start_metrics(daemon, cfg.metrics)
            except OSError as e:  # the port is taken, or not ours to bind
                print(
                    f"matspool serve: cannot serve --metrics on {cfg.metrics}: {e.strerror or e}",
                    file=sys.stderr,
                )
                return 2
        daemon.serve()
        # drained and stopped: a late SIGTERM (a step's tree and its wrapper both send one)
        # must not turn the clean exit into death by signal while the interpreter winds down
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)
    except (ValueError, OSError) as e:  # bind failures, unreadable keys: say so, no traceback
        if args.idle_exit is not None and isinstance(e, EndpointBusy):
            return BUSY_EXIT  # another rank's daemon has the job's endpoint: not an error
        print(f"matspool serve: {e}", file=sys.stderr)
        return 2
    return 0


def _ping(args: argparse.Namespace) -> int:
    from .probe import ping

    return ping(args.endpoint, args.timeout)


def _status(args: argparse.Namespace) -> int:
    from .probe import status, watch

    if args.watch is not None:
        return watch(args.endpoint, args.timeout, args.watch)
    return status(args.endpoint, args.timeout, args.json)


def _keygen(args: argparse.Namespace) -> int:
    from matspool._curve import make_keys

    existing = [
        f
        for f in (
            os.path.join(args.dir, f"{args.name}.key"),
            os.path.join(args.dir, f"{args.name}.key_secret"),
        )
        if os.path.exists(f)
    ]
    if existing and not args.force:
        print(
            f"matspool keygen: {existing[0]} exists; clients or the daemon may use it: "
            "pass --force to replace the key pair",
            file=sys.stderr,
        )
        return BAD_INPUT
    for f in existing:  # make_keys writes new files (owner-only); the old ones go first
        os.unlink(f)
    public, secret = make_keys(args.dir, args.name)
    print(f"public key: {public}\nsecret key: {secret} (owner-only; keep it on this host)")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from .verify import run_verify

    return run_verify(args.files, as_json=args.json)


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    out = os.path.abspath(args.out)
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        print(f"matspool demo: cannot create --out {out}: {e.strerror or e}", file=sys.stderr)
        return BAD_INPUT
    if not os.access(out, os.W_OK | os.X_OK):
        print(f"matspool demo: --out {out} is not writable by this user", file=sys.stderr)
        return BAD_INPUT

    return run_demo(out=args.out, steps=args.steps, n=args.size, fmt=args.format)
