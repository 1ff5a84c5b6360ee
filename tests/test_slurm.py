"""deploy/slurm/job-local-daemon.sbatch on a real one-node Slurm (tests/slurmcluster.py).

Every job is submitted with ``sbatch`` by a second unix user, into that user's own 0700
directory, with the project's venv on PATH the way a user activates it. After each job:
the files are compared byte for byte with what the job saved, they belong to the user, and
nothing is left: no process of the user (daemon, client), no ring in /dev/shm, no socket or
socket directory, no ``*.matspool-tmp``.

Needs root (slurmd, a second user) and Slurm (installed with apt when missing); skips saying
why otherwise.
"""

from __future__ import annotations

import inspect
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from slurmcluster import Cluster, SlurmUnavailable, start_cluster

from conftest import grant_traverse, system_user
from readback import assert_variables, read

REPO = Path(__file__).resolve().parent.parent
SBATCH = REPO / "deploy" / "slurm" / "job-local-daemon.sbatch"
JOB_USER = "matspool-slurm"
RUNUSER = shutil.which("runuser", path="/usr/sbin:/sbin:/usr/bin:/bin") or "runuser"
RING_BYTES = 128 << 20


def data(seed: int, shape: tuple[int, ...], dtype: str = "float64") -> np.ndarray:
    """The arrays a job saves; the test makes the same ones to compare."""
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def wait_accepted(n: int, timeout: float = 60) -> None:
    """(In a job) until the daemon has accepted this process's first ``n`` saves: queued or
    written, what ``matspool status`` shows."""
    import os
    import time

    from matspool._messages import StatusQuery, StatusReply
    from matspoold.probe import ask

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = ask(os.environ["MATSPOOL_ENDPOINT"], StatusQuery(), 5)
        me = [c for c in st.clients if c.pid == os.getpid()] if isinstance(st, StatusReply) else []
        if me and me[0].queue_depth + me[0].files_written >= n:
            return
        time.sleep(0.02)
    raise TimeoutError(f"the daemon did not accept {n} saves")


# what every job's python file starts with
DATA = "import numpy as np\n\n" + inspect.getsource(data) + "\n" + inspect.getsource(wait_accepted)


# -- the cluster and the user ---------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    # under /tmp, 0755: munged runs as user munge, and the job user reads slurm.conf
    base = Path(tempfile.mkdtemp(prefix="matspool-slurm-cluster-", dir="/tmp"))
    try:
        try:
            c = start_cluster(base)
        except SlurmUnavailable as e:
            pytest.skip(f"no Slurm cluster here: {e}")
        print(f"one-node Slurm up in {c.started_in:.1f} s")
        try:
            yield c
        finally:
            c.stop()
            assert not c.stepds(), "slurmstepd processes left after the cluster stopped"
            assert all(p.poll() is not None for p in c.procs.values())
    finally:
        shutil.rmtree(base, ignore_errors=True)


@dataclass
class User:
    name: str
    uid: int
    gid: int
    home: Path  # 0755, root's: per-test directories below it are the user's, 0700
    bin: Path  # the venv's bin/ (matspool, python)


@pytest.fixture(scope="module")
def job_user(cluster: Cluster) -> Iterator[User]:
    entry = system_user(JOB_USER)
    venv_bin = Path(sys.executable).parent
    assert (venv_bin / "matspool").exists(), f"no matspool command beside {sys.executable}"
    restore: list[tuple[Path, int]] = []
    home = Path(tempfile.mkdtemp(prefix="matspool-slurm-tests-", dir="/tmp"))
    home.chmod(0o755)
    try:
        # the user runs the venv's interpreter and imports this checkout's client and service
        for p in (Path(os.path.realpath(sys.executable)), venv_bin, REPO / "client", REPO / "service"):
            grant_traverse(p, restore)
        r = subprocess.run(
            [
                RUNUSER,
                "-u",
                JOB_USER,
                "--",
                str(venv_bin / "python"),
                "-c",
                "import zmq, numpy, matspool, matspoold",
            ],
            env={"PYTHONPATH": _pythonpath(), "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            check=False,
        )
        assert r.returncode == 0, f"{JOB_USER} cannot run the project's python: {r.stderr}"
        yield User(JOB_USER, entry.pw_uid, entry.pw_gid, home, venv_bin)
    finally:
        shutil.rmtree(home, ignore_errors=True)
        for d, mode in reversed(restore):
            d.chmod(mode)


def _pythonpath() -> str:
    return f"{REPO / 'client'}:{REPO / 'service'}"


@dataclass
class Job:
    id: str
    dir: Path  # the user's 0700 directory: job files, output, MATSPOOL_ROOT (out/)
    out: Path


@pytest.fixture
def workdir(job_user: User, request: pytest.FixtureRequest) -> Path:
    d = job_user.home / request.node.name
    (d / "out").mkdir(parents=True)
    for p in (d, d / "out"):
        os.chown(p, job_user.uid, job_user.gid)
        p.chmod(0o700)
    return d


def _env(user: User, work: Path, **extra: str) -> dict[str, str]:
    """What the user's shell has at sbatch time (sbatch passes it on to the job)."""
    env = {
        "PATH": f"{user.bin}:/usr/bin:/bin",
        "PYTHONPATH": _pythonpath(),
        "HOME": str(work),
        "USER": user.name,
        "LOGNAME": user.name,
        "LANG": "C.UTF-8",
        "MATSPOOL_ROOT": str(work / "out"),
        "MATSPOOL_RING_BYTES": str(RING_BYTES),
        "MATSPOOL_READY_TIMEOUT": "30",
    }
    env.update(extra)
    return {k: v for k, v in env.items() if v}


def submit(
    cluster: Cluster,
    user: User,
    work: Path,
    code: str,
    *,
    env: dict[str, str] | None = None,
    script: Path = SBATCH,
) -> Job:
    """sbatch the per-job script as the user, running ``python job.py`` (``code``)."""
    job_py = work / "job.py"
    job_py.write_text(DATA + textwrap.dedent(code))
    os.chown(job_py, user.uid, user.gid)
    out = work / "job.out"
    r = cluster.cmd(
        ["sbatch", "--parsable", f"--chdir={work}", f"--output={out}", str(script), "python", str(job_py)],
        user=user.name,
        env=env if env is not None else _env(user, work),
        cwd=work,
    )
    assert r.returncode == 0, f"sbatch failed: {r.stderr}"
    return Job(r.stdout.strip().split(";")[0], work, out)


def output(job: Job) -> str:
    return job.out.read_text(errors="replace") if job.out.exists() else ""


def wait_output(job: Job, text: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while text not in output(job):
        assert time.monotonic() < deadline, f"job {job.id} never printed {text!r}:\n{output(job)}"
        time.sleep(0.1)


def finish(cluster: Cluster, job: Job, timeout: float = 120) -> dict[str, str]:
    try:
        cluster.wait_job(job.id, timeout)
    except TimeoutError as e:
        steps = cluster.cmd(["squeue", "--steps", f"--jobs={job.id}"]).stdout
        procs = subprocess.run(
            ["ps", "-eo", "pid,ppid,user,stat,wchan:20,args"], capture_output=True, text=True, check=False
        ).stdout
        signals = ""
        for line in _user_pids(pwd.getpwnam(JOB_USER).pw_uid):
            try:
                status = Path(f"/proc/{line.split()[0]}/status").read_text().splitlines()
            except OSError:
                continue
            wanted = [x for x in status if x.startswith(("Sig", "Shd", "State"))]
            signals += f"{line} {' '.join(wanted)}\n"
        raise AssertionError(
            f"{e}\n--- steps ---\n{steps}\n--- job output ---\n{output(job)}"
            f"\n--- processes ---\n{procs}\n--- signals ---\n{signals}"
        ) from None
    return cluster.job_info(job.id)


def assert_file(path: Path, fmt: str, want: dict[str, np.ndarray], user: User) -> None:
    assert path.exists(), f"{path.name} was not written"
    assert_variables(read(path, fmt), want, path.name)
    st = path.stat()
    assert (st.st_uid, st.st_gid) == (user.uid, user.gid), f"{path.name} is not the user's"


def _user_pids(uid: int) -> list[str]:
    """Processes running as ``uid``, by their status (a non-dumpable one, like a node
    daemon's writer, has a /proc/<pid> of root's)."""
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                uids = [ln for ln in (d / "status").read_text().splitlines() if ln.startswith("Uid:")]
                if uids and int(uids[0].split()[1]) == uid:
                    cmdline = (d / "cmdline").read_bytes().replace(b"\0", b" ")[:120]
                    pids.append(f"{d.name} {cmdline!r}")
            except OSError:
                continue
    return pids


def leftovers(job: Job, user: User) -> list[str]:
    """What the job left on the node: processes, rings, socket directory, temporaries."""
    found = [f"process {p}" for p in _user_pids(user.uid)]
    for ring in Path("/dev/shm").glob("matspool-*"):
        try:
            if ring.lstat().st_uid == user.uid:
                found.append(f"ring {ring} ({ring.stat().st_size >> 20} MiB)")
        except FileNotFoundError:
            continue
    sock_dir = Path(f"/tmp/matspool-{user.name}-{job.id}")
    if sock_dir.exists() or sock_dir.is_symlink():
        found.append(f"socket directory {sock_dir}: {sorted(p.name for p in sock_dir.iterdir())}")
    found += [f"temporary {p}" for p in job.dir.rglob("*.matspool-tmp")]
    found += [f"socket {p}" for p in job.dir.rglob("*.sock")]
    return found


def assert_nothing_left(job: Job, user: User) -> None:
    deadline = time.monotonic() + 10  # processes of the job exit around when the job ends
    while (left := leftovers(job, user)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"job {job.id} left: {left}\n--- job output ---\n{output(job)}"


@pytest.fixture(autouse=True)
def _clean_slate(request: pytest.FixtureRequest) -> Iterator[None]:
    """A test that failed must not leave the next one its rings or processes."""
    yield
    if "job_user" not in request.fixturenames:
        return
    uid = pwd.getpwnam(JOB_USER).pw_uid
    for line in _user_pids(uid):
        try:
            os.kill(int(line.split()[0]), 9)
        except ProcessLookupError:
            pass
    for ring in Path("/dev/shm").glob("matspool-*"):
        try:
            if ring.lstat().st_uid == uid:
                ring.unlink()
        except FileNotFoundError:
            pass
    for sock_dir in Path("/tmp").glob(f"matspool-{JOB_USER}-*"):
        if sock_dir.lstat().st_uid == uid:
            shutil.rmtree(sock_dir, ignore_errors=True)


# -- the per-job daemon ---------------------------------------------------------------------------


def test_job_saves_through_its_own_daemon(cluster: Cluster, job_user: User, workdir: Path) -> None:
    """A plain job on a partition without GPUs: every save written exactly, files the user's,
    the job's status its command's, nothing left (socket, socket directory, rings)."""
    out = workdir / "out"
    job = submit(
        cluster,
        job_user,
        workdir,
        f"""
        import os, matspool
        assert os.environ["MATSPOOL_ENDPOINT"].endswith("/matspool.sock"), os.environ["MATSPOOL_ENDPOINT"]
        with matspool.Spool() as s:
            futs = [s.save("{out}/a{{}}.mat".format(i), {{"x": data(i, (300, 200))}}, format="v5")
                    for i in range(4)]
            futs.append(s.save("{out}/big.mat", {{"big": data(9, (2048, 1024), "float32"),
                                                  "n": data(10, (3, 5), "int16")}}, format="v7.3"))
            print([f.result(60).nbytes for f in futs], flush=True)
    """,
    )
    info = finish(cluster, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, output(job))
    for i in range(4):
        assert_file(out / f"a{i}.mat", "v5", {"x": data(i, (300, 200))}, job_user)
    assert_file(
        out / "big.mat",
        "v7.3",
        {"big": data(9, (2048, 1024), "float32"), "n": data(10, (3, 5), "int16")},
        job_user,
    )
    assert "stopped after 5 files" in output(job)
    assert_nothing_left(job, job_user)


def test_job_failing_midway(cluster: Cluster, job_user: User, workdir: Path) -> None:
    """The command fails after some saves (one not waited for): the job fails with the
    command's status, every save made is written, nothing is left."""
    out = workdir / "out"
    job = submit(
        cluster,
        job_user,
        workdir,
        f"""
        import matspool
        with matspool.Spool() as s:
            for i in range(3):
                u = data(20 + i, (256, 256))
                s.save("{out}/step{{}}.mat".format(i), {{"u": u}}, format="v7.3").result(60)
                print("saved", i, flush=True)
            s.save("{out}/last.mat", {{"u": data(30, (512, 512))}}, format="v7.3")
            raise RuntimeError("simulated failure midway")
    """,
    )
    info = finish(cluster, job)
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "1:0", (info, output(job))
    assert "simulated failure midway" in output(job)
    for i in range(3):
        assert_file(out / f"step{i}.mat", "v7.3", {"u": data(20 + i, (256, 256))}, job_user)
    assert_file(out / "last.mat", "v7.3", {"u": data(30, (512, 512))}, job_user)
    assert_nothing_left(job, job_user)


def test_scancel_mid_run(cluster: Cluster, job_user: User, workdir: Path) -> None:
    """``scancel`` while a large save is being written: Slurm's SIGTERM reaches the daemon,
    which finishes it; the client killed by the cancel leaves no ring, the job no socket."""
    out = workdir / "out"
    job = submit(
        cluster,
        job_user,
        workdir,
        f"""
        import time, matspool
        s = matspool.Spool()
        for i in range(2):
            u = data(40 + i, (200, 300))
            s.save("{out}/acked{{}}.mat".format(i), {{"u": u}}, format="v7.3").result(60)
        s.save("{out}/big.mat", {{"big": data(49, (2048, 4096))}}, format="v7.3", compress=9)
        wait_accepted(3)
        print("big queued", flush=True)
        time.sleep(300)
    """,
        env=_env(job_user, workdir, MATSPOOL_COMPRESS_THREADS="1"),
    )
    wait_output(job, "big queued")
    r = cluster.cmd(["scancel", job.id], user=job_user.name, env=_env(job_user, workdir))
    assert r.returncode == 0, r.stderr
    info = finish(cluster, job)
    assert info["JobState"] == "CANCELLED", (info, output(job))
    for i in range(2):
        assert_file(out / f"acked{i}.mat", "v7.3", {"u": data(40 + i, (200, 300))}, job_user)
    assert_file(out / "big.mat", "v7.3", {"big": data(49, (2048, 4096))}, job_user)
    assert_nothing_left(job, job_user)


def test_client_killed_right_after_a_large_save(cluster: Cluster, job_user: User, workdir: Path) -> None:
    """The client dies (SIGKILL, what the OOM killer sends) just after the daemon accepted a
    large save: the script stops the daemon with a SIGTERM it can drain on, so the file is
    written whole; the dead client's ring is removed."""
    out = workdir / "out"
    job = submit(
        cluster,
        job_user,
        workdir,
        f"""
        import os, signal, time, matspool
        s = matspool.Spool()
        s.save("{out}/big.mat", {{"big": data(50, (2048, 4096))}}, format="v7.3", compress=9)
        s.save("{out}/small.mat", {{"s": data(51, (4, 4))}}, format="v5")
        wait_accepted(2)
        print("killing myself", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """,
        env=_env(job_user, workdir, MATSPOOL_COMPRESS_THREADS="1"),
    )
    info = finish(cluster, job)
    assert info["JobState"] == "FAILED", (info, output(job))
    assert "killing myself" in output(job)
    assert_file(out / "big.mat", "v7.3", {"big": data(50, (2048, 4096))}, job_user)
    assert_file(out / "small.mat", "v5", {"s": data(51, (4, 4))}, job_user)
    assert "stopped after 2 files" in output(job)
    assert_nothing_left(job, job_user)


def test_daemon_killed_mid_write(cluster: Cluster, job_user: User, workdir: Path) -> None:
    """The daemon itself is SIGKILLed (the OOM killer's choice) while writing a large save:
    its half-written temporary file, its socket and directory and the client's ring are
    removed; the files it had finished stay exact."""
    out = workdir / "out"
    job = submit(
        cluster,
        job_user,
        workdir,
        f"""
        import os, signal, time, matspool
        from matspool._messages import StatusQuery
        from matspoold.probe import ask
        s = matspool.Spool()
        s.save("{out}/done.mat", {{"d": data(80, (100, 100))}}, format="v7.3").result(60)
        s.save("{out}/big.mat", {{"big": data(81, (2048, 4096))}}, format="v7.3", compress=9)
        wait_accepted(2)
        deadline = time.monotonic() + 30  # until its temporary file exists: mid-write
        while not any(n.endswith(".matspool-tmp") for n in os.listdir("{out}")):
            assert time.monotonic() < deadline, os.listdir("{out}")
            time.sleep(0.01)
        os.kill(ask(os.environ["MATSPOOL_ENDPOINT"], StatusQuery(), 5).pid, signal.SIGKILL)
        print("daemon killed", flush=True)
        time.sleep(1)
        os._exit(0)  # no close(): the save cannot be answered any more
    """,
        env=_env(job_user, workdir, MATSPOOL_COMPRESS_THREADS="1"),
    )
    info = finish(cluster, job)
    assert info["ExitCode"] == "0:0", (info, output(job))
    assert "daemon killed" in output(job), output(job)
    assert_file(out / "done.mat", "v7.3", {"d": data(80, (100, 100))}, job_user)
    assert not (out / "big.mat").exists()
    assert_nothing_left(job, job_user)
    assert "exited with status 137" in output(job), output(job)  # and the job's log says so


# -- finding the interpreter ------------------------------------------------------------------------


def test_finds_the_python_beside_matspool(cluster: Cluster, job_user: User, workdir: Path) -> None:
    """Only a symlink to the venv's ``matspool`` on PATH (as ``/usr/local/bin/matspool`` would
    be), the system's python3 first: the script runs the venv's python, not ``python3``."""
    link_dir = workdir / "bin"
    link_dir.mkdir()
    (link_dir / "matspool").symlink_to(job_user.bin / "matspool")
    # the job command's python: the venv's, by full path (PATH must not lead the script to it)
    _shim(link_dir / "python", f'exec {job_user.bin / "python"} "$@"', job_user)
    env = _env(job_user, workdir, PATH=f"{link_dir}:/usr/bin:/bin")
    out = workdir / "out"
    job = submit(
        cluster,
        job_user,
        workdir,
        f"""
        import matspool
        with matspool.Spool() as s:
            s.save("{out}/p.mat", {{"p": data(60, (8, 8))}}, format="v7.3").result(60)
    """,
        env=env,
    )
    info = finish(cluster, job, timeout=90)
    assert info["ExitCode"] == "0:0", (info, output(job))
    assert_file(out / "p.mat", "v7.3", {"p": data(60, (8, 8))}, job_user)
    assert "Traceback" not in output(job)
    assert_nothing_left(job, job_user)


def _shim(path: Path, command: str, user: User) -> None:
    path.write_text(f"#!/bin/bash\n{command}\n")
    path.chmod(0o755)
    os.chown(path, user.uid, user.gid)


@pytest.mark.parametrize("case", ["no-matspool-on-path", "python-without-zmq"])
def test_says_what_is_missing(cluster: Cluster, job_user: User, workdir: Path, case: str) -> None:
    """No usable interpreter: the job fails at once saying what is missing, not after the
    ready timeout with a daemon that "did not answer"; nothing is left."""
    bin_dir = workdir / "bin"
    bin_dir.mkdir()
    # the job command's python, on PATH, but no matspool beside it
    _shim(bin_dir / "python", f'exec {job_user.bin / "python"} "$@"', job_user)
    if case == "no-matspool-on-path":
        env = _env(job_user, workdir, PATH=f"{bin_dir}:/usr/bin:/bin", MATSPOOL_READY_TIMEOUT="120")
        want = "no `matspool` command on PATH and MATSPOOL_PYTHON is not set"
    else:  # an interpreter that cannot import zmq (no site-packages)
        bare = bin_dir / "bare-python"
        _shim(bare, f'exec {os.path.realpath(sys.executable)} -I -S "$@"', job_user)
        env = _env(
            job_user,
            workdir,
            PATH=f"{bin_dir}:{job_user.bin}:/usr/bin:/bin",
            MATSPOOL_PYTHON=str(bare),
            MATSPOOL_READY_TIMEOUT="120",
        )
        want = "No module named 'zmq'"
    t0 = time.monotonic()
    job = submit(cluster, job_user, workdir, "print('the job ran')\n", env=env)
    info = finish(cluster, job, timeout=60)
    assert time.monotonic() - t0 < 30, "the job waited for a daemon that could not start"
    assert info["JobState"] == "FAILED", (info, output(job))
    text = output(job)
    assert want in text and "MATSPOOL_PYTHON" in text, text
    assert "the job ran" not in text and "Traceback" not in text, text
    assert_nothing_left(job, job_user)


def test_gpus_are_an_option_not_a_requirement() -> None:
    text = SBATCH.read_text()
    assert not [ln for ln in text.splitlines() if ln.startswith("#SBATCH") and "gpu" in ln.lower()]
    assert "sbatch --gpus-per-node=1 job-local-daemon.sbatch" in text  # documented in the header


# -- the node-daemon hooks (prolog, taskprolog, epilog) as deploy/README installs them ------------


def _installed_hooks(dest: Path, sock: Path) -> dict[str, Path]:
    """deploy/slurm's hooks copied as an administrator installs them (prolog.d/, epilog.d/),
    with the defaults at their tops edited for this machine, as their headers say: the node
    daemon's socket, and the venv matspool is installed in (the tests' venv, not /opt/matspool)."""
    venv = Path(sys.executable).parent.parent
    edits = {"/run/matspool/matspool.sock": str(sock), "install_dir=/opt/matspool": f"install_dir={venv}"}
    out = {}
    for name, where in [
        ("prolog.sh", "prolog.d/50-matspool.sh"),
        ("epilog.sh", "epilog.d/50-matspool.sh"),
        ("taskprolog.sh", "taskprolog.sh"),
    ]:
        text = (REPO / "deploy" / "slurm" / name).read_text()
        for old, new in edits.items():
            text = text.replace(old, new)
        path = dest / where
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(0o755)
        out[name] = path
    return out


@pytest.fixture
def hook_cluster(cluster: Cluster, job_user: User) -> Iterator[tuple[Cluster, Path]]:
    """A second one-node cluster (beside the first, other ports and state) whose slurm.conf
    has the matspool hooks; returns it and the node daemon's socket path."""
    base = Path(tempfile.mkdtemp(prefix="matspool-slurm-hooks-", dir="/tmp"))
    base.chmod(0o755)
    sock_dir = base / "node-run"  # root's, as /run/matspool is
    sock_dir.mkdir(mode=0o755)
    sock = sock_dir / "matspool.sock"
    hooks = _installed_hooks(base / "etc", sock)
    conf = (
        f"Prolog={hooks['prolog.sh'].parent}/*\nEpilog={hooks['epilog.sh'].parent}/*\n"
        f"TaskProlog={hooks['taskprolog.sh']}\n"
    )
    try:
        try:
            c = start_cluster(base / "cluster", extra_conf=conf)
        except SlurmUnavailable as e:
            pytest.skip(f"no second Slurm cluster here: {e}")
        try:
            yield c, sock
        finally:
            c.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_node_daemon_hooks_as_installed(
    hook_cluster: tuple[Cluster, Path], job_user: User, workdir: Path
) -> None:
    """The node daemon as deploy/systemd runs it (root, ``matspoold.userd``, writing as each
    job's user) and the three hooks from slurm.conf: the prolog finds its python without
    any environment from slurmd and passes, the task gets MATSPOOL_ENDPOINT, and the job's
    user, with the default API (``matspool.save``, ``Spool()``) and nothing else (no group,
    no ``sg``, no ring mode), writes into a 0700 directory of its own files it owns (uid
    and gid); the epilog removes the ring a killed client left and releases the user's
    writer, which leaves at once: nothing stays. With the daemon stopped, the prolog fails:
    the node is drained and the job does not run."""
    cluster, sock = hook_cluster
    out = workdir / "out"
    assert stat.S_IMODE(out.stat().st_mode) == 0o700 and out.stat().st_uid == job_user.uid
    serve = [
        sys.executable,
        "-m",
        "matspoold.userd",
        "--endpoint",
        f"ipc://{sock}",
        "--state-dir",
        str(sock.parent.parent / "node-state"),
        "--idle-exit",
        "600",  # the epilog releases the user's writer at the job's end, long before
        "--",
        "--root",
        str(out),
        "--log-level",
        "info",
    ]
    node_log = sock.parent.parent / "node-daemon.log"
    with node_log.open("wb") as log:
        daemon = subprocess.Popen(
            serve,
            env={"PATH": "/usr/bin:/bin", "PYTHONPATH": _pythonpath(), "LANG": "C.UTF-8"},
            stdout=subprocess.DEVNULL,
            stderr=log,
            cwd="/",
        )
    env = _env(job_user, workdir)
    try:
        deadline = time.monotonic() + 30
        while not Path(f"{sock}.hello").exists():
            assert daemon.poll() is None and time.monotonic() < deadline, node_log.read_text()
            time.sleep(0.1)
        script = workdir / "job.sh"
        script.write_text(f"#!/bin/bash\nsrun python {workdir / 'job.py'}\n")
        (workdir / "job.py").write_text(
            DATA
            + textwrap.dedent(f"""
            import os, subprocess, matspool
            print("endpoint", os.environ.get("MATSPOOL_ENDPOINT"), flush=True)
            matspool.save("{out}/plain.mat", {{"p": data(71, (32, 5))}}).result(60)
            with matspool.Spool() as s:
                s.save("{out}/node.mat", {{"n": data(70, (64, 48))}}, format="v7.3").result(60)
                print("ring", s._ring.kind, flush=True)
            # the ring a SIGKILLed client leaves: named after its (now dead) pid, the user's
            p = subprocess.Popen(["true"])
            p.wait()
            with open(f"/dev/shm/matspool-{{p.pid}}-0123456789ab", "wb") as f:
                f.write(bytes(4096))
            print("stale ring", p.pid, flush=True)
        """)
        )
        for p in (script, workdir / "job.py"):
            os.chown(p, job_user.uid, job_user.gid)
        script.chmod(0o755)
        r = cluster.cmd(
            ["sbatch", "--parsable", f"--chdir={workdir}", f"--output={workdir}/job.out", str(script)],
            user=job_user.name,
            env=env,
            cwd=workdir,
        )
        assert r.returncode == 0, r.stderr
        job = Job(r.stdout.strip(), workdir, workdir / "job.out")
        info = finish(cluster, job)
        assert info["JobState"] == "COMPLETED", (info, output(job), node_log.read_text()[-3000:])
        assert f"endpoint ipc://{sock}" in output(job)
        assert "ring memfd" in output(job), output(job)
        assert_file(out / "plain.mat", "v5", {"p": data(71, (32, 5))}, job_user)
        assert_file(out / "node.mat", "v7.3", {"n": data(70, (64, 48))}, job_user)
        assert f"started the writer of uid {job_user.uid} gid {job_user.gid}" in node_log.read_text()
        pid = output(job).split("stale ring ")[1].split()[0]
        assert not Path(f"/dev/shm/matspool-{pid}-0123456789ab").exists(), "the epilog left the ring"
        state = cluster.cmd(["sinfo", "--noheader", "--format=%T", f"--nodes={cluster.node}"]).stdout.strip()
        assert state == "idle", state
        # the epilog released the user's writer (not --idle-exit): no process, ring, socket stays
        deadline = time.monotonic() + 30
        while (left := leftovers(job, job_user)) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not left, f"left: {left}\n{node_log.read_text()[-3000:]}"
        assert not list(Path(f"{sock}.users").iterdir())
        assert "this writer stops: released after its user's job" in node_log.read_text()
    finally:
        daemon.terminate()
        assert daemon.wait(60) == 0, node_log.read_text()[-3000:]
    assert sorted(p.name for p in sock.parent.iterdir()) == ["matspool.sock.lock"]
    # no daemon: the prolog fails, Slurm drains the node and the job does not run
    assert not sock.exists()
    r = cluster.cmd(
        [
            "sbatch",
            "--parsable",
            f"--chdir={workdir}",
            f"--output={workdir}/job2.out",
            "--wrap",
            "echo the job ran",
        ],
        user=job_user.name,
        env=env,
        cwd=workdir,
    )
    assert r.returncode == 0, r.stderr
    job2 = r.stdout.strip()
    deadline = time.monotonic() + 60
    while True:
        r = cluster.cmd(["sinfo", "--noheader", "--format=%T %E", f"--nodes={cluster.node}"])
        if r.stdout.startswith("drain"):
            break
        assert time.monotonic() < deadline, (r.stdout, cluster.log("slurmd")[-3000:])
        time.sleep(0.3)
    assert "Prolog" in r.stdout or "prolog" in r.stdout, r.stdout
    assert "no daemon socket" in cluster.log("slurmd"), cluster.log("slurmd")[-3000:]
    deadline = time.monotonic() + 30  # requeued: COMPLETING, then back to PENDING
    while cluster.job_state(job2) in ("COMPLETING", "CONFIGURING") and time.monotonic() < deadline:
        time.sleep(0.3)
    assert cluster.job_state(job2) in ("PENDING", "REQUEUED", "REQUEUE_HOLD"), cluster.job_info(job2)
    assert not (workdir / "job2.out").exists() or "the job ran" not in (workdir / "job2.out").read_text()
    cluster.cmd(["scancel", job2])
