"""Which distributed job this process is a rank of, from its launcher's environment.

Ranks of one job on one node share one daemon (``_jobdaemon``); what they share it by is
a *job key*: a string every rank of the job on this node computes alike from the
variables its launcher sets, and that no other job (of this user, on this node) has:

- ``torchrun`` / ``torch.distributed.run``: ``TORCHELASTIC_RUN_ID`` (a fresh uuid with
  ``--standalone``), the rendezvous ``MASTER_ADDR:MASTER_PORT`` and the agent's
  ``GROUP_RANK`` (one agent per node; two agents on one host are two "nodes");
- Slurm (``srun``): ``SLURM_JOB_ID.SLURM_STEP_ID`` and ``SLURM_NODEID``; a batch script
  outside any ``srun`` step is a single process, not a rank;
- Open MPI: ``PMIX_NAMESPACE`` (Open MPI 5), ``OMPI_MCA_orte_hnp_uri`` or
  ``OMPI_MCA_ess_base_jobid`` (Open MPI 4);
- MPICH / Hydra, Intel MPI, Cray PALS, MVAPICH (``PMI_RANK``, ``MPI_LOCALRANKID``,
  ``PMI_LOCAL_RANK``, ``MV2_COMM_WORLD_LOCAL_RANK``): ``PALS_APID`` or
  ``PMIX_NAMESPACE`` when set, else the parent process (Hydra's ``hydra_pmi_proxy`` is
  the parent of every local rank) by pid and start time, so a reused pid is another job.

- any other launcher of ``torch.distributed`` (DeepSpeed's, a hand-written script) that
  sets ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``: the rendezvous
  address (one job holds that port at a time).

The first launcher found in that order wins (``torchrun`` inside ``srun``: the torchrun
job). ``MATSPOOL_SHARED=0`` turns sharing off (one embedded daemon per process, as
without a launcher); ``MATSPOOL_ENDPOINT`` is checked before any of this and wins.

Threads: none; pure functions of the environment (and ``/proc`` for the fallback).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from ._endpoint import default_base

__all__ = ["BUSY_EXIT", "JobKey", "detect", "job_endpoint", "process_start", "sharing_enabled"]

_OFF = ("0", "false", "no", "off")

#: ``matspool serve --idle-exit`` exits with this, silently, when another rank's daemon
#: has the job's endpoint (the starter then connects to that one)
BUSY_EXIT = 3


@dataclass(frozen=True, slots=True)
class JobKey:
    """One job's identity on this node: ``launcher`` names what was found, ``ident`` is
    what the ranks share."""

    launcher: str
    ident: str
    local_rank: int | None = field(default=None, compare=False)  # a hint: who starts it

    def digest(self) -> str:
        """A short name for file paths (a socket path must stay under 108 bytes)."""
        return hashlib.sha256(f"{self.launcher}\0{self.ident}".encode()).hexdigest()[:24]


def sharing_enabled(env: Mapping[str, str] | None = None) -> bool:
    """False when ``MATSPOOL_SHARED`` says off (``0``, ``false``, ``no``, ``off``)."""
    env = os.environ if env is None else env
    return env.get("MATSPOOL_SHARED", "1").strip().lower() not in _OFF


def _first(env: Mapping[str, str], *names: str) -> str | None:
    for name in names:
        value = env.get(name)
        if value:
            return value
    return None


def _int(value: str | None) -> int | None:
    return int(value) if value is not None and value.strip().isdigit() else None


def _parent_ident() -> str | None:
    """``pid:starttime`` of the parent process (Linux), None elsewhere or when gone."""
    ppid = os.getppid()
    if ppid <= 1:
        return None
    start = process_start(ppid)
    return None if start is None else f"ppid-{ppid}-{start}"


def process_start(pid: int) -> str | None:
    """The start time of ``pid`` in clock ticks since boot (``/proc/PID/stat`` field 22),
    which with the pid names one process for good; None when unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read().decode("ascii", "replace")
    except OSError:
        return None
    fields = text[text.rfind(")") + 2 :].split()  # after "pid (comm) "
    return fields[19] if len(fields) > 19 else None


def detect(env: Mapping[str, str] | None = None) -> JobKey | None:
    """The job this process is a rank of, or None (not launched as a rank)."""
    env = os.environ if env is None else env
    if "TORCHELASTIC_RUN_ID" in env and "LOCAL_RANK" in env:
        names = ("TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")
        return JobKey("torchrun", "|".join(env.get(n, "") for n in names), _int(env.get("LOCAL_RANK")))
    job = _first(env, "SLURM_JOB_ID", "SLURM_JOBID")
    step = _first(env, "SLURM_STEP_ID", "SLURM_STEPID")
    if job and step and "SLURM_LOCALID" in env:
        node = env.get("SLURM_NODEID", "")
        return JobKey("slurm", f"{job}.{step}|{node}", _int(env.get("SLURM_LOCALID")))
    if "OMPI_COMM_WORLD_LOCAL_RANK" in env or "OMPI_COMM_WORLD_RANK" in env:
        ident = _first(env, "PMIX_NAMESPACE", "OMPI_MCA_orte_hnp_uri", "OMPI_MCA_ess_base_jobid")
        ident = ident or _parent_ident()
        local = _int(env.get("OMPI_COMM_WORLD_LOCAL_RANK"))
        return None if ident is None else JobKey("openmpi", ident, local)
    local_names = ("MPI_LOCALRANKID", "PMI_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK")
    if "PMI_RANK" in env or any(n in env for n in local_names):
        ident = _first(env, "PALS_APID", "PMIX_NAMESPACE") or _parent_ident()
        local = _int(_first(env, *local_names))
        return None if ident is None else JobKey("pmi", ident, local)
    if all(n in env for n in ("LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")):
        # torch.distributed's env:// variables from another launcher (DeepSpeed, a script)
        ident = f"{env['MASTER_ADDR']}:{env['MASTER_PORT']}|{env.get('GROUP_RANK', '')}"
        return JobKey("torch", ident, _int(env.get("LOCAL_RANK")))
    return None


def job_endpoint(key: JobKey) -> str:
    """The job's socket, in this user's private directory (the default endpoint's, 0700)."""
    return f"ipc://{default_base()}/matspool/job-{key.digest()}.sock"
