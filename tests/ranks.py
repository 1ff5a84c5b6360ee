"""Spawning a group of torch.distributed ranks (env://, gloo) as real processes, for the
sharded tests: one place for the port, the environment, the wait and the kill, so every
test's group dies the same way when a rank hangs.

Used from a test's (module) fixture, on the test's thread only; no state of its own.
:class:`Outcomes` is the rank scripts' side: what each rank reports, as the JSON file
:func:`read_outcomes` reads; :class:`RowSteps`, the data both sides of a sharded stream
test know.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

__all__ = [
    "Outcomes",
    "RowSteps",
    "free_port",
    "group_on_one_daemon",
    "kill_ranks",
    "read_outcomes",
    "spawn_rank",
    "wait_ranks",
    "work_dirs",
]

HERE = Path(__file__).parent


def work_dirs(base: Path) -> tuple[Path, Path]:
    """``base/out`` (the files) and ``base/results`` (each rank's JSON), made."""
    out, results = base / "out", base / "results"
    out.mkdir()
    results.mkdir()
    return out, results


def free_port() -> int:
    """A loopback port free now (the group's store listens on it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def spawn_rank(
    script: str,
    args: Iterable[str],
    rank: int,
    world: int,
    port: int,
    env: dict[str, str] | None = None,
    **popen: Any,
) -> subprocess.Popen[bytes]:
    """Start ``tests/<script> args...`` as ``rank`` of ``world`` (store on ``port``), with
    tests/ first on PYTHONPATH (the rank scripts import readback and the like) and
    ``env`` added to the environment."""
    full = {
        **os.environ,
        "RANK": str(rank),
        "WORLD_SIZE": str(world),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
        **(env or {}),
    }
    return subprocess.Popen([sys.executable, str(HERE / script), *args], env=full, **popen)


def wait_ranks(procs: list[subprocess.Popen[bytes]], timeout: float) -> None:
    """Wait for each rank in turn, killing one still running ``timeout`` s into its wait."""
    for p in procs:
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def kill_ranks(procs: list[subprocess.Popen[bytes]]) -> None:
    """Kill any rank still running (a fixture's ``finally``: none outlives its test)."""
    for p in procs:
        if p.poll() is None:
            p.kill()


def read_outcomes(results: Path, names: Iterable[str]) -> list[dict[str, Any]]:
    """Each ``results/<name>.json`` a rank wrote, ``{}`` for a rank that wrote none."""
    return [json.loads(f.read_text()) if (f := results / f"{name}.json").exists() else {} for name in names]


class Outcomes(dict[str, Any]):
    """A rank script's outcomes by key, written whole to ``results/<name>.json`` at each
    :meth:`record` (through a temporary and a rename: a rank killed mid-write leaves the
    last whole record, which :func:`read_outcomes` reads)."""

    def __init__(self, results: str | Path, name: str) -> None:
        super().__init__()
        self.path = Path(results) / f"{name}.json"

    def record(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self))
        os.replace(tmp, self.path)

    def of(self, key: str, call: Callable[[], Any]) -> None:
        """``call()`` (an append, a save, a close) and, when it returns a future, that
        future's outcome (60 s at most): ``"ok"`` or the error's type and text."""
        try:
            fut = call()
            if fut is not None:
                fut.result(timeout=60)
            self[key] = "ok"
        except Exception as e:  # noqa: BLE001 - reported to the test
            self[key] = f"{type(e).__name__}: {e}"
        self.record()


class RowSteps:
    """The steps of a sharded stream over 3 ranks: step ``k`` of case ``c`` is a 6 x 4
    global array (seeded by both), whose rows 2r and 2r+1 rank r appends; the rank script
    appends :meth:`block`, its test reads the file back against :meth:`expected`."""

    def __init__(self, cases: tuple[str, ...]) -> None:
        self.cases = cases

    def expected(self, case: str, step: int) -> Any:
        import numpy as np

        return np.random.default_rng([self.cases.index(case), step]).standard_normal((6, 4))

    def block(self, case: str, step: int, rank: int) -> Any:
        import matspool

        return matspool.Shard(self.expected(case, step)[2 * rank : 2 * rank + 2], (2 * rank, 0), (6, 4))


def group_on_one_daemon(
    base: Path, script: str, world: int, timeout: float = 200
) -> tuple[Path, list[dict[str, Any]]]:
    """Run ``tests/<script> out results endpoint`` as ``world`` ranks sharing one daemon
    (started on ``base/out``); their output directory and each rank's outcomes
    (``results/rank<r>.json``). Ranks still running ``timeout`` s into their wait are killed."""
    from conftest import start_daemon

    out, results = work_dirs(base)
    daemon = start_daemon(out, base / "sock")
    port = free_port()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for rank in range(world):
            args = [str(out), str(results), daemon.endpoint]
            procs.append(spawn_rank(script, args, rank, world, port, stderr=subprocess.DEVNULL))
        wait_ranks(procs, timeout)
    finally:
        kill_ranks(procs)
        daemon.stop()
    return out, read_outcomes(results, (f"rank{r}" for r in range(world)))
