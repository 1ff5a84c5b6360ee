"""A one-node Slurm cluster on this machine, for the tests that submit real jobs.

``start_cluster(base)`` starts munged, slurmctld and slurmd on localhost with a minimal
``slurm.conf`` written under ``base`` (the real hostname as the node, no cgroups:
``proctrack/linuxproc``, ``task/none``, no accounting), every piece of state, log, pid file and
socket under ``base``; nothing in /etc is touched. ``Cluster.stop()`` cancels what is left,
waits for the job steps to end and stops the three daemons by their pids.

Slurm comes from Debian (``slurm-wlm``, ``munge``): installed with apt when missing, which
needs root. ``SlurmUnavailable`` says why a cluster cannot be had; the tests skip with it.
"""

from __future__ import annotations

import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Cluster", "SlurmUnavailable", "ensure_installed", "start_cluster"]

PARTITION = "test"
BINARIES = ("slurmctld", "slurmd", "slurmstepd", "sbatch", "srun", "squeue", "scancel", "munged", "mungekey")


class SlurmUnavailable(Exception):
    """Why no cluster can be started here (the tests skip with this text)."""


def _which(name: str) -> str | None:
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/bin"]))


def ensure_installed() -> None:
    """Slurm and munge on this machine: Debian's packages, installed with apt when missing."""
    if all(_which(b) for b in BINARIES):
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable("Slurm is not installed and installing it (apt) needs root")
    if _which("apt-get") is None:
        raise SlurmUnavailable("Slurm is not installed and there is no apt-get to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "slurm-wlm", "munge"],
    ):
        r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600, check=False)
        if r.returncode != 0:
            raise SlurmUnavailable(f"{' '.join(argv)} failed: {(r.stdout + r.stderr)[-1500:]}")
    missing = [b for b in BINARIES if not _which(b)]
    if missing:
        raise SlurmUnavailable(f"installed slurm-wlm and munge, still missing {missing}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Cluster:
    base: Path
    node: str
    conf: Path
    env: dict[str, str]  # what Slurm's client commands need (SLURM_CONF)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    started_in: float = 0.0

    def log(self, name: str) -> str:
        path = self.base / "log" / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def cmd(
        self,
        argv: list[str],
        *,
        user: str | None = None,
        env: dict[str, str] | None = None,
        timeout: float = 30,
        cwd: str | Path | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """A Slurm command (sbatch, squeue, ...), as ``user`` when given (through runuser)."""
        full = {**(env if env is not None else os.environ), **self.env}
        if user is not None:  # exactly this environment, as sbatch passes it on to the job
            argv = [
                _which("runuser") or "runuser",
                "-u",
                user,
                "--",
                "/usr/bin/env",
                "-i",
                *[f"{k}={v}" for k, v in full.items()],
                *argv,
            ]
        return subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, env=full, cwd=cwd, check=False
        )

    def job_info(self, job_id: str) -> dict[str, str]:
        """``scontrol show job``'s fields (JobState, ExitCode, ...); empty once it is forgotten."""
        r = self.cmd(["scontrol", "show", "job", "-o", job_id])
        return dict(w.split("=", 1) for w in r.stdout.split() if "=" in w) if r.returncode == 0 else {}

    def job_state(self, job_id: str) -> str | None:
        """The job's state as slurmctld knows it (PENDING, RUNNING, COMPLETED, FAILED, ...)."""
        return self.job_info(job_id).get("JobState")

    def wait_job(self, job_id: str, timeout: float = 90) -> str:
        """Wait until the job has ended and every one of its steps is gone; its final state."""
        deadline = time.monotonic() + timeout
        state = None
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            ended = state not in (None, "PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED")
            if ended and not self.stepds(job_id):
                return state
            time.sleep(0.2)
        raise TimeoutError(f"job {job_id} still {state} after {timeout} s\n{self.log('slurmctld')[-3000:]}")

    def stepds(self, job_id: str | None = None) -> list[int]:
        """pids of the slurmstepd processes (of ``job_id``) still running on the node."""
        pids = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit():
                continue
            try:
                cmdline = (d / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if not cmdline or not cmdline[0].endswith(b"slurmstepd"):
                continue
            if job_id is None or any(f"[{job_id}.".encode() in a for a in cmdline):
                pids.append(int(d.name))
        return pids

    def stop(self) -> None:
        """Cancel every job, wait for the steps to end, stop the daemons; nothing keeps running."""
        if self.procs.get("slurmctld") is not None and self.procs["slurmctld"].poll() is None:
            self.cmd(["scancel", "--full", f"--partition={PARTITION}"], timeout=30)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                r = self.cmd(["squeue", "--noheader", "--format=%i"])
                if r.returncode == 0 and not r.stdout.strip() and not self.stepds():
                    break
                time.sleep(0.3)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _conf_text(base: Path, node: str, cpus: int, mem_mb: int, extra: str) -> str:
    ctld, slurmd = _free_port(), _free_port()
    return f"""\
ClusterName=matspooltest
FirstJobId={random.randrange(10_000, 1_000_000)}
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld}
SlurmdPort={slurmd}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={base}/munge/munge.socket
StateSaveLocation={base}/state
SlurmdSpoolDir={base}/spool
SlurmctldPidFile={base}/run/slurmctld.pid
SlurmdPidFile={base}/run/slurmd.pid
SlurmctldLogFile={base}/log/slurmctld.log
SlurmdLogFile={base}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=1
ReturnToService=2
KillWait=30
MinJobAge=300
InactiveLimit=0
{extra}
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN
PartitionName={PARTITION} Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


def start_cluster(base: Path, *, extra_conf: str = "", timeout: float = 60) -> Cluster:
    """munged, slurmctld and slurmd under ``base``; returns once the node takes jobs."""
    ensure_installed()
    if os.geteuid() != 0:
        raise SlurmUnavailable("starting slurmd needs root")
    t0 = time.monotonic()
    node = socket.gethostname().split(".")[0]
    for sub in ("state", "spool", "run", "log", "munge"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    base.chmod(0o755)
    munge = pwd.getpwnam("munge")
    mdir = base / "munge"
    key = mdir / "munge.key"
    r = subprocess.run(
        [_which("mungekey") or "mungekey", "--create", "--force", f"--keyfile={key}"],
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode != 0:
        raise SlurmUnavailable(f"mungekey failed: {r.stderr}")
    for p in (mdir, key):
        os.chown(p, munge.pw_uid, munge.pw_gid)
    mdir.chmod(0o755)
    key.chmod(0o600)
    cpus = os.cpu_count() or 1
    mem_mb = max(1, (os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") >> 20) // 2)
    conf = base / "slurm.conf"
    conf.write_text(_conf_text(base, node, cpus, mem_mb, extra_conf))
    conf.chmod(0o644)
    cluster = Cluster(base, node, conf, {"SLURM_CONF": str(conf)})
    logs = base / "log"
    try:
        cluster.procs["munged"] = subprocess.Popen(
            [
                "runuser",
                "-u",
                "munge",
                "--",
                _which("munged") or "munged",
                "--foreground",
                f"--socket={mdir}/munge.socket",
                f"--key-file={key}",
                f"--pid-file={mdir}/munged.pid",
                f"--log-file={mdir}/munged.log",
                f"--seed-file={mdir}/munged.seed",
            ],
            stdout=subprocess.DEVNULL,
            stderr=(logs / "munged.out").open("wb"),
        )
        _wait_for(lambda: (mdir / "munge.socket").exists(), 10, cluster, "munged")
        for name in ("slurmctld", "slurmd"):
            cluster.procs[name] = subprocess.Popen(
                [_which(name) or name, "-D", "-f", str(conf)],
                env={**os.environ, **cluster.env},
                stdout=subprocess.DEVNULL,
                stderr=(logs / f"{name}.out").open("wb"),
            )
        _wait_for(lambda: _node_idle(cluster), timeout, cluster, "the node")
    except BaseException:
        cluster.stop()
        raise
    cluster.started_in = time.monotonic() - t0
    return cluster


def _node_idle(cluster: Cluster) -> bool:
    r = cluster.cmd(["sinfo", "--noheader", "--format=%T", f"--nodes={cluster.node}"], timeout=10)
    return r.returncode == 0 and r.stdout.strip() == "idle"


def _wait_for(cond: Callable[[], bool], timeout: float, cluster: Cluster, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for name, proc in cluster.procs.items():
            if proc.poll() is not None:
                raise SlurmUnavailable(
                    f"{name} exited with {proc.returncode} at start-up: "
                    f"{(cluster.base / 'log' / f'{name}.out').read_text(errors='replace')[-1500:]}"
                    f"{cluster.log(name)[-1500:]}"
                )
        if cond():
            return
        time.sleep(0.2)
    raise SlurmUnavailable(
        f"{what} did not come up within {timeout} s: "
        f"{cluster.log('slurmctld')[-1500:]}{cluster.log('slurmd')[-1500:]}"
    )
