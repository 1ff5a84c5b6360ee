"""Settings of ``matspool serve``: one frozen :class:`ServeSettings`, filled from four sources.

Later sources win, one setting at a time:

1. built-in defaults;
2. a TOML file (``--config FILE``, else ``$MATSPOOL_CONFIG``), keys under ``[serve]``, named
   like the fields (``socket_mode = "660"``, ``roots = ["/scratch"]``); relative paths in
   the file are relative to the file's directory;
3. environment variables ``MATSPOOL_<FIELD>`` (``MATSPOOL_WRITERS=4``,
   ``MATSPOOL_ROOTS=/a:/b``, ``MATSPOOL_SOCKET_MODE=660``, ``MATSPOOL_CLEAN_STALE=false``);
   an empty variable counts as unset. ``MATSPOOL_ENDPOINT`` is the one the clients read too,
   so a node's daemon and its jobs agree on one variable;
4. the flags the user actually gave on the command line.

Unknown keys in the file and unknown ``MATSPOOL_*`` variables are errors (a typo must not
silently leave a default in place), except the variables other parts of matspool and its
deployment scripts read (:data:`OTHER_ENV_VARS`). Every error names where the bad value
came from.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Final

if sys.version_info >= (3, 11):
    import tomllib
else:  # requires-python is 3.10: the same parser, from PyPI
    import tomli as tomllib

from matspool import _endpoint

from .config_values import PARSE, BadValue, absolute, check, parse_roots, suggest

__all__ = [
    "ENV_PREFIX",
    "OTHER_ENV_VARS",
    "ConfigError",
    "Resolved",
    "ServeSettings",
    "builtin_defaults",
    "default_endpoint",
    "resolve_settings",
    "take_flags",
]

ENV_PREFIX: Final = "MATSPOOL_"

#: ``MATSPOOL_*`` variables that are not serve settings but are read elsewhere (the client
#: library, the test suite, ``./run``, deploy/ scripts). Those may be set where a daemon
#: starts (a Slurm job exports its settings to the daemon's environment), so they are not
#: errors.
OTHER_ENV_VARS: Final = frozenset(
    {
        "MATSPOOL_CONFIG",  # the config file itself
        # client library
        "MATSPOOL_RING_BYTES",
        "MATSPOOL_CURVE_CLIENT_SECRET",
        "MATSPOOL_CURVE_SERVER_PUBLIC",
        "MATSPOOL_PROGRESS",
        "MATSPOOL_CONNECT_GRACE",
        "MATSPOOL_SHARED",  # 0: no daemon shared by a job's ranks (matspool._launcher)
        "MATSPOOL_OVERLAP",  # 1/0: large saves' slabs overlapped or not (matspool._overlap)
        # the matspool command: tracebacks instead of one-line errors
        "MATSPOOL_DEBUG",
        # daemon tuning read outside the settings
        "MATSPOOL_SWITCH_INTERVAL",
        "MATSPOOL_DIRECT_IO",  # 1: fsync'd large payloads O_DIRECT (matspoold.writers._direct)
        # tests and ./run
        "MATSPOOL_FUZZ_EXAMPLES",
        "MATSPOOL_MAT",
        "MATSPOOL_VARS",
        "MATSPOOL_VENV",
        # deploy/: slurm scripts and the container build
        "MATSPOOL_ROOT",
        "MATSPOOL_SOCK_DIR",
        "MATSPOOL_PYTHON",
        "MATSPOOL_READY_TIMEOUT",
        "MATSPOOL_PING_TIMEOUT",
        "MATSPOOL_NODE_SOCKET",
        "MATSPOOL_UID",
        "MATSPOOL_GID",
    }
)


class ConfigError(ValueError):
    """A setting that cannot be used; the message names its source and key."""


@dataclass(frozen=True)
class ServeSettings:
    """Everything ``matspool serve`` is configured with (the hidden test flags excepted)."""

    endpoint: str
    roots: tuple[str, ...]
    writers: int
    compress_threads: int
    socket_mode: int
    group: str | None
    clean_stale: bool
    client_timeout: float
    max_ring_bytes: int | None  # None: sessions.DEFAULT_MAX_RING_BYTES
    max_total_ring_bytes: int | None  # None: sessions.DEFAULT_MAX_TOTAL_RING_BYTES
    state_dir: str | None
    curve_secret: str | None
    curve_clients: str | None
    log_level: str
    log_format: str
    metrics: str | None


FIELDS: Final = tuple(f.name for f in fields(ServeSettings))
#: field -> the command-line flag that sets it
FLAGS: Final = {name: "--" + name.replace("_", "-") for name in FIELDS} | {"roots": "--root"}
#: field -> its attribute in the argparse namespace
_DESTS: Final = {name: name for name in FIELDS} | {"roots": "root"}


def default_endpoint() -> str:
    """``ipc://$XDG_RUNTIME_DIR/matspool/matspool.sock`` (``/tmp/matspool-<uid>`` without
    a runtime directory): where ``serve``, ``ping`` and ``status`` meet by default. The
    daemon creates its directories mode 0700 and, like clients, refuses them when another
    user owns them (``matspool._endpoint``)."""
    return _endpoint.default_endpoint()


def builtin_defaults() -> dict[str, Any]:
    cores = os.cpu_count() or 1
    return {
        "endpoint": default_endpoint(),
        "roots": (os.getcwd(),),
        "writers": min(8, cores),
        "compress_threads": cores,
        "socket_mode": 0o600,
        "group": None,
        "clean_stale": True,
        "client_timeout": 30.0,
        "max_ring_bytes": None,
        "max_total_ring_bytes": None,
        "state_dir": None,  # tempjournal.default_state_dir(), chosen when the daemon starts
        "curve_secret": None,
        "curve_clients": None,
        "log_level": "info",
        "log_format": "text",
        "metrics": None,
    }


# -- the sources ---------------------------------------------------------------------------


def _env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def _read_file(path: str, given_by: str, errors: list[str]) -> dict[str, Any]:
    """The ``[serve]`` table of the TOML file ``path`` (unparsed values)."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        errors.append(f"{given_by}: config file {path!r} does not exist")
        return {}
    except IsADirectoryError:
        errors.append(f"{given_by}: config file {path!r} is a directory")
        return {}
    except OSError as e:
        errors.append(f"{given_by}: cannot read config file {path!r}: {e.strerror or e}")
        return {}
    except tomllib.TOMLDecodeError as e:
        errors.append(f"config file {path}: not valid TOML: {e}")
        return {}
    valid = ", ".join(FIELDS)
    for key, value in data.items():
        if key == "serve":
            continue
        if isinstance(value, dict):
            errors.append(
                f"config file {path}: unknown table [{key}]{suggest(key, ['serve'])}; "
                "the settings go in a [serve] table"
            )
        else:
            hint = " (settings go under the [serve] table)" if key in FIELDS else suggest(key, list(FIELDS))
            errors.append(
                f"config file {path}: unknown key {key!r} outside [serve]{hint}; "
                f"valid keys in [serve]: {valid}"
            )
    serve = data.get("serve", {})
    if not isinstance(serve, dict):
        errors.append(f"config file {path}: 'serve' must be a table ([serve])")
        return {}
    out = {}
    for key, value in serve.items():
        if key not in FIELDS:
            errors.append(
                f"config file {path}: unknown key {key!r} in [serve]"
                f"{suggest(key.replace('-', '_'), list(FIELDS))}; valid keys: {valid}"
            )
        else:
            out[key] = value
    return out


def _check_env_names(environ: Mapping[str, str], errors: list[str]) -> None:
    settings = [_env_name(n) for n in FIELDS]
    for var in sorted(environ):
        if var.startswith(ENV_PREFIX) and var not in settings and var not in OTHER_ENV_VARS:
            errors.append(
                f"environment variable {var} is not a matspool serve setting"
                f"{suggest(var, settings)}; settings are {', '.join(settings)} (and "
                f"MATSPOOL_CONFIG); other MATSPOOL_ variables known to matspool: "
                f"{', '.join(sorted(OTHER_ENV_VARS - {'MATSPOOL_CONFIG'}))}"
            )


# -- resolution ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Resolved:
    """The settings and, per field, where its value came from."""

    settings: ServeSettings
    sources: Mapping[str, str]
    config_file: str | None

    def to_toml(self) -> str:
        """The settings as a config file (``matspool serve --print-config``)."""
        lines = [
            "# matspool serve: resolved settings",
            "# precedence: built-in defaults < config file < MATSPOOL_* environment < flags",
            f"# config file: {self.config_file or 'none'}",
            "",
            "[serve]",
        ]
        for name in FIELDS:
            value = getattr(self.settings, name)
            if value is None:
                lines.append(f"# {name}: not set ({self.sources[name]})")
            else:
                lines.append(f"# {name}: from {self.sources[name]}")
                lines.append(f"{name} = {_toml_value(name, value)}")
        return "\n".join(lines) + "\n"


def _toml_str(text: str) -> str:
    # JSON's escapes are TOML's, except that TOML also wants DEL escaped
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007F")


def _toml_value(name: str, value: Any) -> str:
    if name == "socket_mode":
        return _toml_str(f"{value:03o}")
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_str(v) for v in value) + "]"
    return _toml_str(value)


def resolve_settings(
    flags: Mapping[str, Any] | None = None,
    *,
    config: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> Resolved:
    """Merge defaults, the config file, the environment and ``flags`` ({field: value} of the
    flags actually given). ``config`` is the ``--config`` flag's value, if any. Raises
    :class:`ConfigError` listing every problem found."""
    environ = os.environ if environ is None else environ
    flags = dict(flags or {})
    errors: list[str] = []
    values: dict[str, Any] = builtin_defaults()
    sources = dict.fromkeys(FIELDS, "built-in default")
    labels = {name: f"built-in default for {name}" for name in FIELDS}  # names a value's source

    for name in flags:
        if name not in FIELDS:
            raise TypeError(f"not a serve setting: {name!r}")

    # 2. the file
    config_file = None
    if config:
        config_file, given_by = config, "--config"
    elif environ.get("MATSPOOL_CONFIG"):
        config_file, given_by = environ["MATSPOOL_CONFIG"], "environment variable MATSPOOL_CONFIG"
    if config_file is not None:
        config_file = os.path.abspath(os.path.expanduser(config_file))
        base = os.path.dirname(config_file)
        for key, raw in _read_file(config_file, given_by, errors).items():
            label = f"config file {config_file}, key {key!r} in [serve]"
            try:
                values[key] = absolute(key, PARSE[key](raw, False), base)
            except BadValue as e:
                errors.append(f"{label}: {e}")
                continue
            sources[key], labels[key] = f"config file {config_file}", label

    # 3. the environment
    _check_env_names(environ, errors)
    for name in FIELDS:
        var = _env_name(name)
        raw = environ.get(var)
        if not raw:
            continue
        label = f"environment variable {var}"
        try:
            values[name] = absolute(name, PARSE[name](raw, True), os.getcwd())
        except BadValue as e:
            errors.append(f"{label}: {e}")
            continue
        sources[name] = labels[name] = label

    # 4. flags the user gave (argparse has already converted them)
    for name, raw in flags.items():
        label = f"flag {FLAGS[name]}"
        try:
            if name == "roots":
                raw = parse_roots(list(raw), False)
            values[name] = absolute(name, raw, os.getcwd())
        except BadValue as e:
            errors.append(f"{label}: {e}")
            continue
        sources[name] = labels[name] = label

    for name in FIELDS:
        try:
            check(name, values[name])
        except BadValue as e:
            errors.append(f"{labels[name]}: {e}")
    if errors:
        raise ConfigError(
            "\n".join(errors) if len(errors) == 1 else "invalid settings:\n  " + "\n  ".join(errors)
        )
    return Resolved(ServeSettings(**values), sources, config_file)


def take_flags(args: argparse.Namespace) -> dict[str, Any]:
    """{field: value} of the serve flags given on the command line.

    The serve parser's setting flags default to ``argparse.SUPPRESS``, so a flag that was not
    given is absent from ``args``; it is then filled in with its built-in default, so that
    ``args`` looks as it always did to code that reads it (``--root`` not given: ``None``).
    """
    given = {}
    defaults = None
    for name in FIELDS:
        dest = _DESTS[name]
        if hasattr(args, dest):
            given[name] = getattr(args, dest)
            continue
        if defaults is None:
            defaults = builtin_defaults()
        setattr(args, dest, None if name == "roots" else defaults[name])
    return given
