"""``matspool serve`` settings: defaults < config file < MATSPOOL_* environment < flags.

Resolution is tested in-process (``resolve_settings`` and ``cli.main`` with ``--print-config``,
which resolves and exits without serving); one daemon is started for real from a config
file, and saved through.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import matspool
from matspoold import cli
from matspoold.config import (
    FIELDS,
    OTHER_ENV_VARS,
    ConfigError,
    ServeSettings,
    builtin_defaults,
    resolve_settings,
)

from conftest import DaemonProc, wait_ready

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib


@pytest.fixture(autouse=True)
def _no_matspool_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever the developer's shell exports must not leak into these tests."""
    for var in list(os.environ):
        if var.startswith("MATSPOOL_"):
            monkeypatch.delenv(var)


def _toml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _print_config(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = cli.main(["serve", "--print-config", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _dirs(tmp_path: Path, *names: str) -> list[Path]:
    out = []
    for n in names:
        (tmp_path / n).mkdir(exist_ok=True)
        out.append(tmp_path / n)
    return out


# -- precedence ----------------------------------------------------------------------------


def test_builtin_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    r = resolve_settings({}, environ={})
    d = builtin_defaults()
    assert r.settings == ServeSettings(**d)
    assert r.settings.roots == (str(tmp_path),) and r.settings.socket_mode == 0o600
    assert r.settings.writers == min(8, os.cpu_count() or 1) and r.settings.clean_stale is True
    assert r.settings.endpoint == cli.default_endpoint()
    assert set(r.sources.values()) == {"built-in default"} and r.config_file is None


def test_file_then_env_then_flags(tmp_path: Path) -> None:
    a, b, c, d = _dirs(tmp_path, "a", "b", "c", "d")
    conf = _toml(
        tmp_path / "m.toml",
        f"""
[serve]
writers = 2
compress_threads = 3
socket_mode = "640"
roots = ["{a}"]
client_timeout = 5
log_level = "debug"
clean_stale = false
""",
    )
    env = {
        "MATSPOOL_CONFIG": str(conf),
        "MATSPOOL_WRITERS": "3",
        "MATSPOOL_ROOTS": f"{b}:{c}",
        "MATSPOOL_LOG_LEVEL": "WARNING",
    }
    r = resolve_settings({"writers": 4, "client_timeout": 7.5}, environ=env)
    s = r.settings
    assert s.writers == 4 and r.sources["writers"] == "flag --writers"  # flag > env > file
    assert s.client_timeout == 7.5 and r.sources["client_timeout"] == "flag --client-timeout"
    assert s.roots == (str(b), str(c)) and r.sources["roots"] == "environment variable MATSPOOL_ROOTS"
    assert s.log_level == "warning"  # env > file
    assert s.compress_threads == 3 and s.socket_mode == 0o640 and s.clean_stale is False
    assert r.sources["socket_mode"] == f"config file {conf}"
    assert r.sources["endpoint"] == "built-in default"
    # the flag --root replaces (does not extend) the roots of the other sources
    assert resolve_settings({"roots": [str(d)]}, environ=env).settings.roots == (str(d),)


def test_cli_only_flags_given_override(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Through the real parser: flags not given leave the file's and the environment's values."""
    a, b = _dirs(tmp_path, "a", "b")
    conf = _toml(
        tmp_path / "m.toml",
        f'[serve]\nwriters = 2\nroots = ["{a}"]\nsocket_mode = "640"\nclean_stale = false\n',
    )
    monkeypatch.setenv("MATSPOOL_COMPRESS_THREADS", "5")
    rc, out, _ = _print_config(["--config", str(conf)], capsys)
    assert rc == 0
    got = tomllib.loads(out)["serve"]
    assert (
        got["writers"],
        got["roots"],
        got["socket_mode"],
        got["compress_threads"],
        got["clean_stale"],
    ) == (2, [str(a)], "640", 5, False)
    rc, out, _ = _print_config(
        ["--config", str(conf), "--writers", "6", "--root", str(b), "--socket-mode", "600", "--clean-stale"],
        capsys,
    )
    got = tomllib.loads(out)["serve"]
    assert rc == 0
    got_values = (got["writers"], got["roots"], got["socket_mode"], got["clean_stale"])
    assert got_values == (6, [str(b)], "600", True)
    # a flag equal to the built-in default still beats the file
    rc, out, _ = _print_config(["--config", str(conf), "--writers", "6", "--no-clean-stale"], capsys)
    assert tomllib.loads(out)["serve"]["clean_stale"] is False


def test_config_flag_beats_matspool_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env_file = _toml(tmp_path / "env.toml", "[serve]\nwriters = 2\n")
    flag_file = _toml(tmp_path / "flag.toml", "[serve]\nwriters = 3\n")
    env = {"MATSPOOL_CONFIG": str(env_file)}
    assert resolve_settings({}, environ=env).settings.writers == 2
    r = resolve_settings({}, config=str(flag_file), environ=env)
    assert r.settings.writers == 3 and r.config_file == str(flag_file)


def test_matspool_endpoint_is_the_daemons_endpoint_too(tmp_path: Path) -> None:
    """The variable the jobs read is the daemon's default as well: they agree by construction."""
    conf = _toml(tmp_path / "m.toml", '[serve]\nendpoint = "ipc:///run/x/file.sock"\n')
    env = {"MATSPOOL_ENDPOINT": "ipc:///run/x/env.sock"}
    assert resolve_settings({}, environ=env).settings.endpoint == "ipc:///run/x/env.sock"
    assert resolve_settings({}, config=str(conf), environ=env).settings.endpoint == "ipc:///run/x/env.sock"
    assert resolve_settings({}, config=str(conf), environ={}).settings.endpoint == "ipc:///run/x/file.sock"
    flag = resolve_settings({"endpoint": "ipc:///run/x/flag.sock"}, environ=env)
    assert flag.settings.endpoint == "ipc:///run/x/flag.sock"


def test_relative_paths_in_the_file_are_relative_to_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "etc" / "data").mkdir(parents=True)
    conf = _toml(tmp_path / "etc" / "m.toml", '[serve]\nroots = ["data"]\n')
    monkeypatch.chdir("/")
    roots = resolve_settings({}, config=str(conf), environ={}).settings.roots
    assert roots == (str(tmp_path / "etc" / "data"),)


def test_env_value_forms(tmp_path: Path) -> None:
    a, b = _dirs(tmp_path, "a", "b")
    for text, want in [
        ("0", False),
        ("false", False),
        ("No", False),
        ("1", True),
        ("TRUE", True),
        ("on", True),
    ]:
        assert resolve_settings({}, environ={"MATSPOOL_CLEAN_STALE": text}).settings.clean_stale is want
    s = resolve_settings(
        {},
        environ={
            "MATSPOOL_SOCKET_MODE": "0o660",
            "MATSPOOL_ROOTS": f"{a}:{b}:",
            "MATSPOOL_CLIENT_TIMEOUT": "2.5",
            "MATSPOOL_GROUP": "root",
            "MATSPOOL_WRITERS": "",
        },
    ).settings  # empty: unset
    assert (s.socket_mode, s.roots, s.client_timeout, s.group) == (0o660, (str(a), str(b)), 2.5, "root")
    assert s.writers == builtin_defaults()["writers"]


def test_known_non_serve_variables_are_accepted(tmp_path: Path) -> None:
    env = dict.fromkeys(OTHER_ENV_VARS - {"MATSPOOL_CONFIG"}, "x")
    # the client's and the deploy scripts' variables, e.g. what job-local-daemon.sbatch exports
    assert {
        "MATSPOOL_RING_BYTES",
        "MATSPOOL_CURVE_CLIENT_SECRET",
        "MATSPOOL_CURVE_SERVER_PUBLIC",
        "MATSPOOL_SWITCH_INTERVAL",
        "MATSPOOL_FUZZ_EXAMPLES",
        "MATSPOOL_ROOT",
    } <= set(env)
    resolve_settings({}, environ=env)


# -- errors name their source and key ------------------------------------------------------


@pytest.mark.parametrize(
    "text, expect",
    [
        (
            "[serve]\nwriter = 4\n",
            ["unknown key 'writer' in [serve]", "did you mean 'writers'", "valid keys: endpoint, roots"],
        ),
        ('[serve]\nsocket-mode = "660"\n', ["unknown key 'socket-mode'", "did you mean 'socket_mode'"]),
        ("[server]\nwriters = 4\n", ["unknown table [server]", "did you mean 'serve'"]),
        ("writers = 4\n", ["unknown key 'writers' outside [serve]", "under the [serve] table"]),
        ('[serve]\nwriters = "four"\n', ["key 'writers' in [serve]", "must be an integer"]),
        ("[serve]\nwriters = 0\n", ["key 'writers' in [serve]", "at least 1"]),
        ("[serve]\nsocket_mode = 660\n", ["key 'socket_mode'", "octal string"]),
        ('[serve]\nsocket_mode = "1777"\n', ["key 'socket_mode'", "out of range"]),
        ('[serve]\nroots = ["does-not-exist"]\n', ["key 'roots'", "does-not-exist", "does not exist"]),
        ('[serve]\nclean_stale = "no"\n', ["key 'clean_stale'", "true or false"]),
        ('[serve]\nlog_level = "loud"\n', ["key 'log_level'", "debug, info, warning, error"]),
        ("[serve]\nwriters = \n", ["not valid TOML"]),
    ],
)
def test_file_errors(tmp_path: Path, text: str, expect: list[str]) -> None:
    conf = _toml(tmp_path / "bad.toml", text)
    with pytest.raises(ConfigError) as e:
        resolve_settings({}, config=str(conf), environ={})
    msg = str(e.value)
    assert f"config file {conf}" in msg
    for part in expect:
        assert part in msg, msg


def test_missing_config_file_names_who_asked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--config: config file .*nope.toml' does not exist"):
        resolve_settings({}, config=str(tmp_path / "nope.toml"), environ={})
    with pytest.raises(
        ConfigError, match=r"environment variable MATSPOOL_CONFIG: config file .* does not exist"
    ):
        resolve_settings({}, environ={"MATSPOOL_CONFIG": str(tmp_path / "nope.toml")})


@pytest.mark.parametrize(
    "var, value, expect",
    [
        ("MATSPOOL_WRITERS", "four", "environment variable MATSPOOL_WRITERS: not an integer: 'four'"),
        ("MATSPOOL_SOCKET_MODE", "1000", "environment variable MATSPOOL_SOCKET_MODE: mode out of range"),
        ("MATSPOOL_SOCKET_MODE", "rw", "environment variable MATSPOOL_SOCKET_MODE: not an octal mode"),
        ("MATSPOOL_CLEAN_STALE", "maybe", "environment variable MATSPOOL_CLEAN_STALE: not a boolean"),
        ("MATSPOOL_CLIENT_TIMEOUT", "-1", "environment variable MATSPOOL_CLIENT_TIMEOUT: must be a positive"),
        (
            "MATSPOOL_ROOTS",
            "/does/not/exist",
            "environment variable MATSPOOL_ROOTS: root directory '/does/not/exist' does not exist",
        ),
        ("MATSPOOL_GROUP", "no-such-group-xyz", "environment variable MATSPOOL_GROUP: no such group"),
        ("MATSPOOL_ENDPOINT", "nonsense", "environment variable MATSPOOL_ENDPOINT: not a ZeroMQ endpoint"),
        (
            "MATSPOOL_WRITER",
            "4",
            "environment variable MATSPOOL_WRITER is not a matspool serve setting "
            "(did you mean 'MATSPOOL_WRITERS'?); "
            "settings are MATSPOOL_ENDPOINT, MATSPOOL_ROOTS",
        ),
        ("MATSPOOL_PARENT_PID", "1", "MATSPOOL_PARENT_PID is not a matspool serve setting"),
    ],
)
def test_env_errors(var: str, value: str, expect: str) -> None:
    with pytest.raises(ConfigError) as e:
        resolve_settings({}, environ={var: value})
    assert expect in str(e.value)


def test_all_errors_are_reported_at_once() -> None:
    with pytest.raises(ConfigError) as e:
        resolve_settings({}, environ={"MATSPOOL_WRITERS": "x", "MATSPOOL_TYPO": "1"})
    assert "MATSPOOL_WRITERS" in str(e.value) and "MATSPOOL_TYPO" in str(e.value)


def test_flag_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = _print_config(["--root", str(tmp_path / "nope")], capsys)
    assert rc == 2 and f"flag --root: root directory '{tmp_path / 'nope'}' does not exist" in err
    rc, _, err = _print_config(["--writers", "0"], capsys)
    assert rc == 2 and "flag --writers: must be at least 1" in err
    with pytest.raises(SystemExit) as e:  # argparse's own check of the octal mode
        _print_config(["--socket-mode", "1000"], capsys)
    assert e.value.code == 2 and "mode out of range" in capsys.readouterr().err


def test_serve_refuses_to_start_on_a_bad_setting(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MATSPOOL_")}
    env["MATSPOOL_WRITERS"] = "many"
    r = subprocess.run(
        [sys.executable, "-m", "matspoold", "serve", "--root", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2
    assert "matspool serve: environment variable MATSPOOL_WRITERS: not an integer: 'many'" in r.stderr


# -- --print-config --------------------------------------------------------------------------


def test_print_config_parses_back_and_names_sources(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    a, _ = _dirs(tmp_path, "a", "b")
    conf = _toml(tmp_path / "m.toml", f'[serve]\nroots = ["{a}"]\nsocket_mode = "660"\nclient_timeout = 12\n')
    monkeypatch.setenv("MATSPOOL_WRITERS", "3")
    monkeypatch.setenv("MATSPOOL_RING_BYTES", "1048576")  # a client's variable: fine here
    rc, out, err = _print_config(
        ["--config", str(conf), "--log-level", "error", "--endpoint", f"ipc://{tmp_path}/d.sock"], capsys
    )
    assert rc == 0 and err == ""
    got = tomllib.loads(out)
    assert list(got) == ["serve"]
    serve = got["serve"]
    assert serve == {
        "endpoint": f"ipc://{tmp_path}/d.sock",
        "roots": [str(a)],
        "writers": 3,
        "compress_threads": os.cpu_count() or 1,
        "socket_mode": "660",
        "clean_stale": True,
        "client_timeout": 12.0,
        "log_level": "error",
        "log_format": "text",
    }
    lines = out.splitlines()
    assert f"# config file: {conf}" in lines
    for name, source in [
        ("roots", f"config file {conf}"),
        ("socket_mode", f"config file {conf}"),
        ("writers", "environment variable MATSPOOL_WRITERS"),
        ("log_level", "flag --log-level"),
        ("endpoint", "flag --endpoint"),
        ("compress_threads", "built-in default"),
    ]:
        i = lines.index(f"# {name}: from {source}")
        assert lines[i + 1].startswith(f"{name} = ")
    assert "# group: not set (built-in default)" in lines
    assert "# metrics: not set (built-in default)" in lines  # off unless asked for
    assert sum(ln.startswith(("# ",)) and ":" in ln for ln in lines) >= len(FIELDS)

    # what it prints is a config file that gives the same settings
    (tmp_path / "again.toml").write_text(out)
    monkeypatch.delenv("MATSPOOL_WRITERS")
    rc, out2, _ = _print_config(["--config", str(tmp_path / "again.toml")], capsys)
    assert rc == 0 and tomllib.loads(out2) == got


def test_print_config_of_strange_strings_is_valid_toml(tmp_path: Path) -> None:
    odd = tmp_path / 'a "quoted"\\dir\tx\x7fé'
    odd.mkdir()
    r = resolve_settings({"roots": [str(odd)]}, environ={})
    assert tomllib.loads(r.to_toml())["serve"]["roots"] == [str(odd)]


# -- a daemon really started from a config file ------------------------------------------


def _wait_for(endpoint: str, proc: subprocess.Popen) -> None:
    assert wait_ready(endpoint, proc), "daemon did not answer within 30 s"


def test_daemon_started_with_config_file_uses_its_root(tmp_path: Path) -> None:
    root, elsewhere = _dirs(tmp_path, "root", "elsewhere")
    endpoint = f"ipc://{tmp_path}/sock/d.sock"
    conf = _toml(
        tmp_path / "matspool.toml",
        f"""
[serve]
endpoint = "{endpoint}"
roots = ["root"]          # relative to this file
writers = 2
socket_mode = "600"
log_level = "warning"
""",
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MATSPOOL_")}
    # started from another directory: the default root (the cwd) would be `elsewhere`
    proc = subprocess.Popen(
        [sys.executable, "-m", "matspoold", "serve", "--config", str(conf)],
        cwd=elsewhere,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for(endpoint, proc)
        assert (Path(endpoint[len("ipc://") :]).stat().st_mode & 0o777) == 0o600
        with matspool.Spool(endpoint, ring_bytes=1 << 20, timeout=30) as spool:
            res = spool.save(str(root / "x.mat"), {"x": np.arange(6.0).reshape(2, 3)}).result(30)
            assert res.path == str(root / "x.mat")
            with pytest.raises(matspool.PathNotAllowedError):
                spool.save(str(elsewhere / "y.mat"), {"x": np.zeros(2)}).result(30)
        import scipy.io

        assert scipy.io.loadmat(root / "x.mat")["x"].tolist() == [[0, 1, 2], [3, 4, 5]]
        assert not (elsewhere / "y.mat").exists()
    finally:
        rc = DaemonProc(endpoint, root, proc).stop()
    assert rc == 0, proc.stderr.read()
