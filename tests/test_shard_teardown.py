"""The ends of a sharded save's group, with real processes (tests/shard_teardown.py):
no key left in the store, a closed spool and a process group destroyed (or rank 0 gone)
mid-save never hang a rank, and a rank whose store is gone hears it at once.

Two groups of 2 gloo ranks on CPU run at once on one daemon, each rank with a spool
``timeout`` of 30 s: a hang would show as 30 s or more. Files are read back and compared
exactly.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")

from ranks import free_port, kill_ranks, read_outcomes, spawn_rank, wait_ranks, work_dirs
from shard_teardown import WORLD, expected

from conftest import start_daemon
from readback import assert_exact, read

RUNS = ("keys", "kill0")


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[dict[str, Any]]]]:
    base = tmp_path_factory.mktemp("teardown")
    out, results = work_dirs(base)
    daemon = start_daemon(out, base / "sock")
    procs = []
    try:
        for run in RUNS:
            port = free_port()
            for rank in range(WORLD):
                args = [str(out), str(results), daemon.endpoint, run]
                procs.append(
                    spawn_rank("shard_teardown.py", args, rank, WORLD, port, stderr=subprocess.DEVNULL)
                )
        wait_ranks(procs, 90)
    finally:
        kill_ranks(procs)
        daemon.stop()
    outcomes = {run: read_outcomes(results, (f"{run}_rank{r}" for r in range(WORLD))) for run in RUNS}
    return out, outcomes


def _exact(out: Path, run: str, name: str) -> None:
    got = read(out / f"{run}_{name}.mat", "v5")
    assert sorted(got) == ["u"]
    assert_exact(got["u"], expected(name), f"{run}_{name}")


def test_no_key_is_left_in_the_store(ran: tuple[Path, dict[str, list[dict[str, Any]]]]) -> None:
    """Saves that succeed, fail on their blocks, fail in one rank's save() (rank 1's, then
    rank 0's) and a sharded stream's steps: the store has the keys it had before."""
    out, outcomes = ran
    o0, o1 = outcomes["keys"]
    for o in (o0, o1):
        assert o.get("plain") == "ok" and o.get("stream0") == "ok" and o.get("stream1") == "ok", o
        assert o.get("overlap", "").startswith("ShardError: ") and "overlap" in o["overlap"], o
    assert o1["raise1"] == "raised UnsupportedTypeError" and o0["raise0"] == "raised UnsupportedTypeError"
    assert "rank 1: UnsupportedTypeError" in o0["raise1"] and "rank 0: UnsupportedTypeError" in o1["raise0"]
    assert o0["keys_left"] == 0, o0
    _exact(out, "keys", "plain")
    assert not (out / "keys_overlap.mat").exists()


def test_a_closed_spool_fails_the_others_at_once(ran: tuple[Path, dict[str, list[dict[str, Any]]]]) -> None:
    """Rank 1 closes its spool while rank 0 saves: rank 0's save fails at once naming
    rank 1; with a new spool rank 1 saves with rank 0 again. The same with rank 0 closing."""
    out, outcomes = ran
    o0, o1 = outcomes["keys"]
    for closer, other in ((1, o0), (0, o1)):
        error = other.get(f"closed{closer}", "")
        assert error.startswith("ShardError: ") and f"rank {closer}'s Spool was closed" in error, error
        assert other[f"closed{closer}_s"] < 10, "waited for the timeout"
        assert not (out / f"keys_closed{closer}.mat").exists()
        assert [o.get(f"after{closer}") for o in (o0, o1)] == ["ok", "ok"]
        _exact(out, "keys", f"after{closer}")
    assert o0["keys_left_closed"] == 0, o0


def test_destroying_the_group_mid_save_keeps_the_store_up(
    ran: tuple[Path, dict[str, list[dict[str, Any]]]],
) -> None:
    """Every rank saves, then destroy_process_group() before its future resolved, and
    rank 0 (holding the store) returns from main without waiting: its exit waits for the
    save and keeps the store up until rank 1 has its outcome; the file is whole."""
    out, outcomes = ran
    assert [o.get("destroy") for o in outcomes["keys"]] == ["left", "ok"], outcomes["keys"]
    _exact(out, "keys", "destroy")


def test_a_rank_whose_store_is_gone_fails_at_once(ran: tuple[Path, dict[str, list[dict[str, Any]]]]) -> None:
    """Rank 0, holding the store, dies while rank 1 waits on it: ShardError at once (the
    timeout is 30 s), not after the timeout."""
    out, outcomes = ran
    o1 = outcomes["kill0"][1]
    error = o1.get("kill0", "")
    assert error.startswith("ShardError: ") and "store is gone" in error, error
    assert o1["kill0_s"] < 10, o1
    assert not (out / "kill0_kill0.mat").exists()
