"""Ranks of one distributed job on one node share one daemon (issue 13, "one daemon per node").

Real launchers and real processes: ``torch.distributed.run`` with 4 gloo ranks on CPU, and
plain processes given the variables Slurm, Open MPI and MPICH/PALS set. Each rank reports
the pid of the daemon that WELCOMEd it and the daemon's own client table; every file is
read back (scipy, h5py) and compared exactly; afterwards no daemon, socket, lock file or
ring of the job is left. Every wait is bounded.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

import matspool
from matspool import _launcher

from conftest import launcher_free
from readback import assert_variables, read

# one rank: connect (the job's daemon), report, save; once HOLD.1 exists report the daemon's
# client table; once HOLD.2 exists save again and close
_RANK = r"""
import json, os, sys, time
import numpy as np
import matspool
from matspool import _messages as msgs
from matspoold.probe import ask

def wait_for(path):
    deadline = time.monotonic() + 60
    while not os.path.exists(path):
        assert time.monotonic() < deadline, "never released"
        time.sleep(0.05)

out, k, hold = sys.argv[1], int(sys.argv[2]), sys.argv[3]
if os.environ.get("PIN_TO_CPU"):  # srun --cpu-bind: this rank on one core
    os.sched_setaffinity(0, {int(os.environ["PIN_TO_CPU"])})
s = matspool.Spool(ring_bytes=1 << 20, timeout=60)
emb = s._embedded
print(json.dumps({"k": k, "pid": os.getpid(), "daemon": s._link.daemon_pid, "endpoint": s.endpoint,
                  "shared": getattr(emb, "shared", None)}), flush=True)
s.save(f"{out}/k{k}_0.mat", {"x": np.arange(6.0).reshape(2, 3) + 10 * k}).result(60)
wait_for(hold + ".1")
st = ask(s.endpoint, msgs.StatusQuery(), 10)
print(json.dumps({"k": k, "clients": sorted(c.pid for c in st.clients), "status_pid": st.pid}), flush=True)
wait_for(hold + ".2")
s.save(f"{out}/k{k}_1.mat", {"y": np.arange(4, dtype=np.int32) * k}, format="v7.3").result(60)
s.close()
"""

# a torchrun worker: every rank connected (barrier), the daemon's client table, saves
_TORCH_RANK = r"""
import json, os, sys
import torch
import torch.distributed as dist
import matspool
from matspool import _messages as msgs
from matspoold.probe import ask

dist.init_process_group("gloo")
r = dist.get_rank()
out = sys.argv[1]
s = matspool.Spool(ring_bytes=1 << 20, timeout=60)
dist.barrier()  # every rank has its spool: the daemon's table has them all
st = ask(s.endpoint, msgs.StatusQuery(), 10)
dist.barrier()  # no rank closes before every rank has read the table
futures = [
    s.save(f"{out}/r{r}_{i}.mat", {"u": torch.arange(12, dtype=torch.float64).reshape(3, 4) + 100 * r + i,
                                   "step": torch.tensor([i], dtype=torch.int32)},
           format="v7.3" if i == 2 else "v5")
    for i in range(3)
]
for f in futures:
    f.result(60)
daemon = s._link.daemon_pid
s.close()
dist.barrier()
# a file per rank: the ranks share torchrun's stdout, where their lines can interleave
with open(os.path.join(os.path.dirname(out), f"result-{r}.json"), "w") as f:
    json.dump({"rank": r, "pid": os.getpid(), "daemon": daemon, "endpoint": s.endpoint,
               "shared": getattr(s._embedded, "shared", None), "status_pid": st.pid,
               "clients": sorted(c.pid for c in st.clients)}, f)
dist.destroy_process_group()
"""


def _clean_env(xdg: Path, **extra: str) -> dict[str, str]:
    """This environment without any launcher's variables, with a private runtime dir."""
    env = launcher_free(dict(os.environ))  # (conftest removed them already: a second guard)
    env["XDG_RUNTIME_DIR"] = str(xdg)
    env.update(extra)
    return env


@pytest.fixture
def xdg() -> Iterator[Path]:
    """A runtime directory short enough for a socket path (108 bytes), 0700."""
    d = Path(tempfile.mkdtemp(prefix="ms-run-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _daemons(xdg: Path) -> list[int]:
    """Live (not zombie) ``matspool serve`` processes with an endpoint under ``xdg``."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if state not in "ZX" and b"matspoold\0serve" in cmd and str(xdg).encode() in cmd:
            found.append(int(name))
    return found


def _leftovers(xdg: Path, pids: list[int], timeout: float = 30.0) -> list[str]:
    """What of the job stays once its ranks are gone: waits (bounded) for the daemons to
    leave, then lists live daemons, files in the job directory, and the ranks' rings."""
    deadline = time.monotonic() + timeout
    jobdir = xdg / "matspool"
    while True:
        daemons = _daemons(xdg)
        files = sorted(p.name for p in jobdir.iterdir()) if jobdir.exists() else []
        rings = [n for n in os.listdir("/dev/shm") if any(n.startswith(f"matspool-{p}-") for p in pids)]
        left = [f"daemon {p}" for p in daemons] + files + rings
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def _start_rank(
    tmp_path: Path, xdg: Path, k: int, hold: str, env: dict[str, str], *, session: bool = False
) -> subprocess.Popen[str]:
    script = tmp_path / "rank.py"
    if not script.exists():
        script.write_text(_RANK)
    return subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "out"), str(k), hold],
        env=_clean_env(xdg, **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=session,
    )


def _line(p: subprocess.Popen[str]) -> dict[str, object]:
    """The rank's next report (it prints one when connected, one with the status)."""
    assert p.stdout is not None
    line = p.stdout.readline()  # bounded: the rank's own waits time out
    if not line:
        p.wait(30)
        raise AssertionError(f"rank exited with {p.returncode}: {p.stderr.read() if p.stderr else ''}")
    info: dict[str, object] = json.loads(line)
    return info


def _release(ps: list[subprocess.Popen[str]], hold: Path) -> list[dict[str, object]]:
    """All connected: each reports its daemon's client table, then saves again and closes."""
    Path(f"{hold}.1").touch()
    status = [_line(p) for p in ps]
    Path(f"{hold}.2").touch()
    for p in ps:
        _, err = p.communicate(timeout=90)
        assert p.returncode == 0, err
    return status


def _check_files(out: Path, ks: list[int]) -> None:
    for k in ks:
        assert_variables(read(out / f"k{k}_0.mat", "v5"), {"x": np.arange(6.0).reshape(2, 3) + 10 * k})
        assert_variables(read(out / f"k{k}_1.mat", "v7.3"), {"y": np.arange(4, dtype=np.int32)[None, :] * k})


# -- launcher detection (pure functions of the environment) -------------------------------------


def test_each_launcher_is_a_job_and_two_jobs_are_two_endpoints() -> None:
    torch = {"TORCHELASTIC_RUN_ID": "u1", "LOCAL_RANK": "2", "MASTER_ADDR": "h", "MASTER_PORT": "29500"}
    slurm = {"SLURM_JOB_ID": "77", "SLURM_STEP_ID": "0", "SLURM_LOCALID": "1", "SLURM_NODEID": "0"}
    ompi = {"OMPI_COMM_WORLD_LOCAL_RANK": "3", "OMPI_COMM_WORLD_RANK": "3", "PMIX_NAMESPACE": "prte-h-1@1"}
    hydra = {"PMI_RANK": "1", "MPI_LOCALRANKID": "1", "PMI_FD": "9"}
    keys = [_launcher.detect(e) for e in (torch, slurm, ompi, hydra)]
    assert [k.launcher if k else None for k in keys] == ["torchrun", "slurm", "openmpi", "pmi"]
    assert [k.local_rank if k else None for k in keys] == [2, 1, 3, 1]
    # hydra gives no job id in the environment: the rank's parent (hydra_pmi_proxy) is the job
    assert keys[3] is not None and keys[3].ident.startswith(f"ppid-{os.getppid()}-")
    # ranks of one job agree whatever their rank; another job (or step) differs
    assert _launcher.detect({**slurm, "SLURM_LOCALID": "0"}) == keys[1]
    other = _launcher.detect({**slurm, "SLURM_STEP_ID": "1"})
    assert other is not None and keys[1] is not None
    assert _launcher.job_endpoint(other) != _launcher.job_endpoint(keys[1])
    # torchrun inside srun: the torchrun job
    assert _launcher.detect({**slurm, **torch}) == keys[0]
    # not a rank: a batch script outside any srun step, or nothing at all
    assert _launcher.detect({"SLURM_JOB_ID": "77"}) is None
    assert _launcher.detect({}) is None
    deepspeed = {"LOCAL_RANK": "1", "WORLD_SIZE": "8", "MASTER_ADDR": "n1", "MASTER_PORT": "29500"}
    ds = _launcher.detect(deepspeed)
    assert ds is not None and ds.launcher == "torch" and ds.local_rank == 1
    assert _launcher.detect({**deepspeed, "MASTER_PORT": "29501"}) != ds
    assert not _launcher.sharing_enabled({"MATSPOOL_SHARED": "0"})
    assert _launcher.sharing_enabled({})


# -- torchrun ----------------------------------------------------------------------------------


def test_torchrun_ranks_share_one_daemon(tmp_path: Path, xdg: Path) -> None:
    pytest.importorskip("torch")
    out = tmp_path / "out"
    out.mkdir()
    script = tmp_path / "worker.py"
    script.write_text(_TORCH_RANK)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "4",
            str(script),
            str(out),
        ],
        env=_clean_env(xdg, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    results = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("result-*.json"))]
    assert sorted(x["rank"] for x in results) == [0, 1, 2, 3]
    daemons = {x["daemon"] for x in results}
    assert len(daemons) == 1, results  # one daemon WELCOMEd every rank
    assert {x["status_pid"] for x in results} == daemons
    assert len({x["endpoint"] for x in results}) == 1 and all(x["shared"] for x in results)
    ranks = sorted(x["pid"] for x in results)
    for x in results:  # after the barrier its client table held every rank
        assert set(ranks) <= set(x["clients"]), (ranks, x["clients"])
    for x in results:
        for i in range(3):
            got = read(out / f"r{x['rank']}_{i}.mat", "v7.3" if i == 2 else "v5")
            want = np.arange(12, dtype=np.float64).reshape(3, 4) + 100 * x["rank"] + i
            assert_variables(got, {"u": want, "step": np.array([[i]], dtype=np.int32)})
    assert _leftovers(xdg, ranks) == []


# -- simulated launchers: plain processes with the launcher's variables --------------------------


def _dead_socket(sock_path: str, *, age: float = 0.0) -> None:
    """What a daemon killed by SIGKILL leaves: a socket nobody listens on, its lock file."""
    s = socket.socket(socket.AF_UNIX)
    s.bind(sock_path)
    s.close()
    Path(sock_path + ".lock").write_text("999999\n")
    then = time.time() - age
    os.utime(sock_path + ".lock", (then, then))


def test_slurm_and_openmpi_ranks_share_a_daemon_per_job(
    tmp_path: Path, xdg: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two Slurm jobs and an Open MPI job at once: one daemon per job, never one for two.
    The Open MPI ranks give no local rank, so all three race to start theirs; the first
    Slurm job finds the socket of a crashed earlier run of the same step, and the leftovers
    of another job killed an hour ago are swept."""
    (tmp_path / "out").mkdir()
    go = str(tmp_path / "go")
    slurm_a = {"SLURM_JOB_ID": "501", "SLURM_STEP_ID": "0"}
    jobs = {
        "slurm-a": [{**slurm_a, "SLURM_LOCALID": str(i)} for i in range(2)],
        "slurm-b": [{"SLURM_JOB_ID": "502", "SLURM_STEP_ID": "0", "SLURM_LOCALID": "0"}],
        "ompi": [{"OMPI_COMM_WORLD_RANK": str(i), "PMIX_NAMESPACE": "prterun-h-42@1"} for i in range(3)],
    }
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    key = _launcher.detect({**slurm_a, "SLURM_LOCALID": "0"})
    assert key is not None
    crashed = _launcher.job_endpoint(key)[len("ipc://") :]
    Path(crashed).parent.mkdir(mode=0o700)
    _dead_socket(crashed)
    _dead_socket(str(xdg / "matspool" / "job-0123456789abcdef01234567.sock"), age=3600)
    procs = {}
    k = 0
    for job, envs in jobs.items():
        for env in envs:
            procs[k] = (job, _start_rank(tmp_path, xdg, k, go, env))
            k += 1
    try:
        first = {k: _line(p) for k, (_, p) in procs.items()}  # every rank connected
        last = dict(enumerate(_release([p for _, p in procs.values()], tmp_path / "go")))
    finally:
        for _, p in procs.values():
            if p.poll() is None:
                p.kill()
    by_job: dict[str, set[object]] = {}
    for k, (job, _) in procs.items():
        by_job.setdefault(job, set()).add(first[k]["daemon"])
        assert first[k]["shared"] is True
        assert last[k]["status_pid"] == first[k]["daemon"]
    assert all(len(d) == 1 for d in by_job.values()), by_job  # one daemon per job...
    assert len(set().union(*by_job.values())) == 3, by_job  # ...and never one for two jobs
    assert len({str(first[k]["endpoint"]) for k in procs}) == 3
    assert {first[k]["endpoint"] for k, (job, _) in procs.items() if job == "slurm-a"} == {f"ipc://{crashed}"}
    for k, (job, _) in procs.items():  # while they held, each daemon had its job's ranks only
        mates = {first[j]["pid"] for j, (other, _) in procs.items() if other == job}
        assert set(last[k]["clients"]) == mates, (job, last[k]["clients"], mates)  # type: ignore[arg-type]
    _check_files(tmp_path / "out", list(procs))
    assert _leftovers(xdg, [int(first[k]["pid"]) for k in procs]) == []  # type: ignore[call-overload]


def test_the_rank_that_started_the_daemon_is_killed_and_another_still_saves(
    tmp_path: Path, xdg: Path
) -> None:
    """torchrun kills a worker's process group; Slurm ranks end in any order."""
    (tmp_path / "out").mkdir()
    slurm = {"SLURM_JOB_ID": "601", "SLURM_STEP_ID": "3"}
    cpu = min(os.sched_getaffinity(0))
    starter = _start_rank(
        tmp_path,
        xdg,
        0,
        str(tmp_path / "never"),
        {**slurm, "SLURM_LOCALID": "0", "PIN_TO_CPU": str(cpu)},
        session=True,
    )
    other = None
    try:
        a = _line(starter)  # it started the daemon (no other rank yet)
        assert a["shared"] is True and _daemons(xdg) == [a["daemon"]]
        # it serves every rank: not bound to the starter's core
        assert os.sched_getaffinity(0) <= os.sched_getaffinity(int(a["daemon"]))  # type: ignore[call-overload]
        other = _start_rank(tmp_path, xdg, 1, str(tmp_path / "go"), {**slurm, "SLURM_LOCALID": "1"})
        b = _line(other)
        assert b["daemon"] == a["daemon"]
        deadline = time.monotonic() + 60
        while not (tmp_path / "out" / "k0_0.mat").exists():  # its first save is written
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.killpg(starter.pid, signal.SIGKILL)  # the starter and its whole process group
        starter.wait(30)
        # past the daemon's reaping of the dead rank and its idle grace: still there
        time.sleep(2.0 + 3.0 + 0.5)
        assert _daemons(xdg) == [a["daemon"]]
        last = _release([other], tmp_path / "go")[0]
    finally:
        for p in (starter, other):
            if p is not None and p.poll() is None:
                p.kill()
    assert last["status_pid"] == a["daemon"]
    assert last["clients"] == [b["pid"]]  # the dead starter was reaped; the other stayed
    assert_variables(read(tmp_path / "out" / "k0_0.mat", "v5"), {"x": np.arange(6.0).reshape(2, 3)})
    _check_files(tmp_path / "out", [1])
    assert _leftovers(xdg, [int(a["pid"]), int(b["pid"])]) == []  # type: ignore[call-overload]


# -- opting out; an explicit endpoint wins --------------------------------------------------------


def test_opt_out_and_explicit_endpoint(tmp_path: Path, xdg: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import start_daemon

    for k, v in {"SLURM_JOB_ID": "701", "SLURM_STEP_ID": "0", "SLURM_LOCALID": "0"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    monkeypatch.setenv("MATSPOOL_SHARED", "0")
    with matspool.Spool(ring_bytes=1 << 20) as s:  # one daemon of its own, as without a launcher
        assert s._embedded is not None and not s._embedded.shared
        proc = s._embedded.proc
        assert proc is not None and f"--parent-pid\0{os.getpid()}" in "\0".join(proc.args)  # type: ignore[arg-type]
        s.save(tmp_path / "own.mat", {"a": np.eye(2)}).result(30)
    monkeypatch.delenv("MATSPOOL_SHARED")
    # a runtime directory that does not exist on this node (exported from a login session):
    # said once, and the rank still saves, through a daemon of its own
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "gone" / "1000"))
    with pytest.warns(RuntimeWarning, match="cannot share its job's daemon"):
        s = matspool.Spool(ring_bytes=1 << 20)
    with s:
        assert s._embedded is not None and not s._embedded.shared
        s.save(tmp_path / "alone.mat", {"c": np.arange(2.0)}).result(30)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    d = start_daemon(tmp_path, tmp_path / "sock")
    try:
        monkeypatch.setenv("MATSPOOL_ENDPOINT", d.endpoint)
        with matspool.Spool(ring_bytes=1 << 20) as s:
            assert s._embedded is None and s.endpoint == d.endpoint
            s.save(tmp_path / "node.mat", {"b": np.arange(3.0)}).result(30)
    finally:
        d.stop()
    assert_variables(read(tmp_path / "own.mat", "v5"), {"a": np.eye(2)})
    assert_variables(read(tmp_path / "node.mat", "v5"), {"b": np.arange(3.0)[None, :]})
    assert_variables(read(tmp_path / "alone.mat", "v5"), {"c": np.arange(2.0)[None, :]})
    assert _leftovers(xdg, [os.getpid()], timeout=5) == []


# -- the daemon's side: --idle-exit ----------------------------------------------------------------


def test_a_job_daemon_nobody_uses_leaves_by_itself_and_a_second_one_yields(tmp_path: Path, xdg: Path) -> None:
    from conftest import serve_cmd, wait_ready

    sock = xdg / "j.sock"
    endpoint = f"ipc://{sock}"
    first = subprocess.Popen(serve_cmd(endpoint, tmp_path, "--idle-exit", "1"), stderr=subprocess.PIPE)
    try:
        assert wait_ready(endpoint, first)  # (each PING restarts its idle time)
        second = subprocess.run(
            serve_cmd(endpoint, tmp_path, "--idle-exit", "1"), capture_output=True, text=True, timeout=60
        )
        assert second.returncode == _launcher.BUSY_EXIT and second.stderr == ""  # lost, silently
        assert first.wait(60) == 0  # nobody ever said HELLO: it went by itself
    finally:
        if first.poll() is None:
            first.kill()
    assert sorted(p.name for p in xdg.iterdir()) == []  # its socket and its lock file went with it


# -- the job's daemon goes away: before a rank's HELLO, between saves, killed -----------------------

# a rank that stalls (a GC pause, a starved core) between the PING that found the job's daemon and
# its HELLO, longer than the daemon's idle grace: the daemon it found leaves meanwhile
_STALLING_RANK = r"""
import os, sys, time
import numpy as np
import matspool
from matspool import _jobdaemon

real, found = _jobdaemon.connect_or_start, []
def stalls_once(*args, **kwargs):
    daemon = real(*args, **kwargs)
    if not found:
        found.append(daemon.pid)
        time.sleep(_jobdaemon.IDLE_EXIT_S + 1.5)
    return daemon
_jobdaemon.connect_or_start = stalls_once
s = matspool.Spool(ring_bytes=1 << 20, timeout=60)
s.save(sys.argv[1], {"z": np.arange(5.0) * 3}).result(60)
print(found[0], s._link.daemon_pid, flush=True)
s.close()
"""

# a rank whose job's daemon is killed and cannot be started again: prints the error its save gets
_STRANDED_RANK = r"""
import os, sys, time
import numpy as np
import matspool
from matspool import DaemonUnavailable

s = matspool.Spool(ring_bytes=1 << 20, timeout=60)
s.save(sys.argv[1] + "/a.mat", {"a": np.eye(2)}).result(60)
print(s._link.daemon_pid, flush=True)
deadline = time.monotonic() + 60
while not os.path.exists(sys.argv[2]):
    assert time.monotonic() < deadline, "never released"
    time.sleep(0.05)
try:
    s.save(sys.argv[1] + "/b.mat", {"b": np.eye(3)}).result(60)
except DaemonUnavailable as e:
    print("ERROR", e, flush=True)
s.close()
"""


def _wait_gone(pid: int) -> None:
    deadline = time.monotonic() + 30
    while pid in _daemons_any():
        assert time.monotonic() < deadline, f"daemon {pid} still there"
        time.sleep(0.05)


def _daemons_any() -> list[int]:
    """Live (not zombie) processes."""
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] not in "ZX":
                        found.append(int(name))
            except OSError:
                continue
    return found


def test_a_rank_that_stalls_past_the_idle_grace_before_its_hello_still_connects(
    tmp_path: Path, xdg: Path
) -> None:
    script = tmp_path / "stall.py"
    script.write_text(_STALLING_RANK)
    r = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "z.mat")],
        env=_clean_env(xdg, SLURM_JOB_ID="901", SLURM_STEP_ID="0", SLURM_LOCALID="0"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    found, served = (int(x) for x in r.stdout.split())
    assert served != found  # the daemon it found had left; it started the job's daemon again
    assert_variables(read(tmp_path / "z.mat", "v5"), {"z": np.arange(5.0)[None, :] * 3})
    assert _leftovers(xdg, [found]) == []


def test_the_job_daemon_killed_between_two_saves_of_two_ranks_is_started_again(
    tmp_path: Path, xdg: Path
) -> None:
    (tmp_path / "out").mkdir()
    hold = tmp_path / "go"
    slurm = {"SLURM_JOB_ID": "902", "SLURM_STEP_ID": "0"}
    ps = [_start_rank(tmp_path, xdg, k, str(hold), {**slurm, "SLURM_LOCALID": str(k)}) for k in range(2)]
    try:
        first = [_line(p) for p in ps]
        daemon = int(first[0]["daemon"])  # type: ignore[call-overload]
        assert first[1]["daemon"] == daemon
        Path(f"{hold}.1").touch()
        status = [_line(p) for p in ps]  # both first saves are answered
        assert {s["status_pid"] for s in status} == {daemon}
        os.kill(daemon, signal.SIGKILL)
        _wait_gone(daemon)
        Path(f"{hold}.2").touch()  # each saves again, then closes
        errs = []
        for p in ps:
            _, err = p.communicate(timeout=90)
            assert p.returncode == 0, err
            errs.append(err)
    finally:
        for p in ps:
            if p.poll() is None:
                p.kill()
    # the one that started it says it was killed; the other that it is gone; each is served again
    assert any(f"(pid {daemon}, started by this process) was killed by SIGKILL" in e for e in errs), errs
    assert all("now served by pid" in e for e in errs), errs
    _check_files(tmp_path / "out", [0, 1])
    assert _leftovers(xdg, [int(f["pid"]) for f in first]) == []  # type: ignore[call-overload]


def test_a_killed_job_daemon_that_cannot_start_again_says_so(tmp_path: Path, xdg: Path) -> None:
    script = tmp_path / "stranded.py"
    script.write_text(_STRANDED_RANK)
    hold = tmp_path / "go"
    p = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path), str(hold)],
        env=_clean_env(xdg, SLURM_JOB_ID="903", SLURM_STEP_ID="0", SLURM_LOCALID="0"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert p.stdout is not None
        daemon = int(p.stdout.readline())
        os.kill(daemon, signal.SIGKILL)
        _wait_gone(daemon)
        (xdg / "matspool").chmod(0o777)  # its directory is no longer safe to start one in
        hold.touch()
        out, err = p.communicate(timeout=90)
    finally:
        if p.poll() is None:
            p.kill()
        (xdg / "matspool").chmod(0o700)
    assert p.returncode == 0, err
    msg = out.split("ERROR ", 1)[1]
    assert msg.startswith("the shared daemon of this slurm job at ipc://"), msg
    assert f"(pid {daemon}, started by this process) was killed by SIGKILL; starting it again failed" in msg
    assert "mode 0777 lets others in" in msg and "saves not yet written fail" in msg, msg
    assert_variables(read(tmp_path / "a.mat", "v5"), {"a": np.eye(2)})
    assert not (tmp_path / "b.mat").exists()


def test_what_a_killed_job_daemon_left_is_swept_by_the_next_spool(
    tmp_path: Path, xdg: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Slurm step's end SIGKILLs its daemon: its socket and lock file stay, until this
    user's next Spool() on the node, a rank's or not; a live job's daemon and a lock file
    just made (a daemon starting) are left alone."""
    from matspool import _jobdaemon

    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    killed_key = _launcher.detect({"SLURM_JOB_ID": "904", "SLURM_STEP_ID": "0", "SLURM_LOCALID": "0"})
    live_key = _launcher.detect({"SLURM_JOB_ID": "905", "SLURM_STEP_ID": "0", "SLURM_LOCALID": "0"})
    assert killed_key is not None and live_key is not None
    assert _jobdaemon.place_problem(killed_key) is None
    killed = _jobdaemon.connect_or_start(killed_key)
    live = _jobdaemon.connect_or_start(live_key)
    try:
        assert killed.proc is not None
        killed.proc.kill()
        killed.proc.wait(30)
        sock = killed.endpoint[len("ipc://") :]
        assert os.path.exists(sock) and os.path.exists(sock + ".lock")  # what SIGKILL leaves
        then = time.time() - 30  # the step ended a while ago
        os.utime(sock + ".lock", (then, then))
        starting = xdg / "matspool" / "job-0123456789abcdef01234567.sock.lock"
        starting.write_text("")  # created this instant by a daemon about to lock it
        with matspool.Spool(ring_bytes=1 << 20) as s:  # a plain process: a daemon of its own
            assert s._embedded is not None and not s._embedded.shared
            s.save(tmp_path / "p.mat", {"p": np.arange(3.0)}).result(30)
        left = sorted(p.name for p in (xdg / "matspool").iterdir())
        live_sock = os.path.basename(live.endpoint)
        assert left == sorted([live_sock, live_sock + ".lock", starting.name]), left
        assert live.exit_status() is None and live.pid == live.proc.pid  # type: ignore[union-attr]
        starting.unlink()
    finally:
        for d in (killed, live):
            if d.proc is not None and d.proc.poll() is None:
                d.proc.kill()
            if d.proc is not None:
                d.proc.wait(30)
    assert_variables(read(tmp_path / "p.mat", "v5"), {"p": np.arange(3.0)[None, :]})


# -- the suite itself runs as if launched by hand ---------------------------------------------------


def test_a_plain_process_has_a_daemon_of_its_own(tmp_path: Path) -> None:
    """Whatever launched the suite (conftest removed its variables): no shared daemon."""
    assert _launcher.detect() is None and "MATSPOOL_ENDPOINT" not in os.environ
    child = subprocess.run(
        [sys.executable, "-c", "from matspool import _launcher; print(_launcher.detect())"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert child.stdout.strip() == "None", child.stderr
    with matspool.Spool(ring_bytes=1 << 20) as s:
        assert s._embedded is not None and not s._embedded.shared
        s.save(tmp_path / "own.mat", {"o": np.arange(2.0)}).result(30)
    assert_variables(read(tmp_path / "own.mat", "v5"), {"o": np.arange(2.0)[None, :]})


def test_the_suite_ignores_the_launcher_it_runs_under(xdg: Path) -> None:
    """CI inside an srun step, under torchrun, with MATSPOOL_ENDPOINT exported."""
    tests = Path(__file__).parent
    env = {
        **os.environ,
        "SLURM_JOB_ID": "906",
        "SLURM_STEP_ID": "0",
        "SLURM_LOCALID": "0",
        "TORCHELASTIC_RUN_ID": "ci",
        "LOCAL_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29555",
        "MATSPOOL_ENDPOINT": f"ipc://{xdg}/nobody-here.sock",
        "XDG_RUNTIME_DIR": str(xdg),
    }
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            f"{Path(__file__).name}::test_a_plain_process_has_a_daemon_of_its_own",
        ],
        cwd=tests,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0 and "1 passed" in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]
    assert not (xdg / "matspool").exists()  # no job daemon was started


# a job's daemon that answers PING, takes a rank's HELLO and dies before answering it (as one
# SIGKILLed, or leaving, at that moment would): it holds the endpoint's lock as a daemon does
_DIES_ON_HELLO = r"""
import fcntl, json, os, sys
import zmq
from matspool import _messages as msgs

path = sys.argv[1]
lock = os.open(path + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
router = zmq.Context.instance().socket(zmq.ROUTER)
router.bind("ipc://" + path)
print("ready", flush=True)
while router.poll(60000):
    ident, _tag, body = router.recv_multipart()
    op = json.loads(body)["op"]
    if op == "PING":
        router.send_multipart([ident, *msgs.encode(msgs.Pong("dies-on-hello", os.getpid()))])
    elif op == "HELLO":
        os.unlink(path)
        os.unlink(path + ".lock")
        os._exit(0)
"""


def test_a_hello_the_job_daemon_took_with_it_is_said_again_to_the_next(
    tmp_path: Path, xdg: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    slurm = {"SLURM_JOB_ID": "907", "SLURM_STEP_ID": "0", "SLURM_LOCALID": "0"}
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(xdg))
    key = _launcher.detect(slurm)
    assert key is not None
    path = _launcher.job_endpoint(key)[len("ipc://") :]
    Path(path).parent.mkdir(mode=0o700)
    (tmp_path / "dies.py").write_text(_DIES_ON_HELLO)
    fake = subprocess.Popen(
        [sys.executable, str(tmp_path / "dies.py"), path], stdout=subprocess.PIPE, text=True
    )
    try:
        assert fake.stdout is not None and fake.stdout.readline() == "ready\n"
        rank = subprocess.run(
            [
                sys.executable,
                "-c",
                "import sys, numpy as np, matspool\n"
                "s = matspool.Spool(ring_bytes=1 << 20, timeout=60, connect_timeout=25)\n"
                "s.save(sys.argv[1], {'h': np.arange(3.0)}).result(60)\n"
                "print(s._link.daemon_pid)\n"
                "s.close()\n",
                str(tmp_path / "h.mat"),
            ],
            env=_clean_env(xdg, **slurm),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert fake.wait(30) == 0  # it took the HELLO and went
    finally:
        if fake.poll() is None:
            fake.kill()
    assert rank.returncode == 0, rank.stderr[-3000:]
    assert int(rank.stdout) != fake.pid  # welcomed by the job's daemon it started again
    assert_variables(read(tmp_path / "h.mat", "v5"), {"h": np.arange(3.0)[None, :]})
    assert _leftovers(xdg, [fake.pid]) == []
