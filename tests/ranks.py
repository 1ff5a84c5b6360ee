"""Spawning a group of torch.distributed ranks (env://, gloo) as real processes, for the
sharded tests: one place for the port, the environment, the wait and the kill, so every
test's group dies the same way when a rank hangs.

Used from a test's (module) fixture, on the test's thread only; no state of its own.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["free_port", "kill_ranks", "read_outcomes", "spawn_rank", "wait_ranks", "work_dirs"]

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
