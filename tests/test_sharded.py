"""Sharded saves: 4 ranks (gloo on CPU) on two simulated nodes, one file per save.

Two daemons (two endpoints, one output directory): ranks 0-1 use one, ranks 2-3 the
other, as two nodes sharing a filesystem would. One spawned group runs every case in
turn (torch's import costs seconds per process); each file is read back with h5py and
tests/readback.py and compared exactly with the global array.
"""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import pytest

pytest.importorskip("torch")

from ranks import free_port, kill_ranks, read_outcomes, spawn_rank, wait_ranks, work_dirs
from shard_ranks import FORMATS, WORLD, expected

from conftest import start_daemon
from readback import assert_exact, read

CASES = [
    "burst",
    "dtensor_rows",
    "dtensor_cols",
    "dtensor_mesh",
    "shard_uneven",
    "big",
    "v5",
    "subgroup",
    "overlap",
    "missing",
    "bad_dtype",
    "mismatch",
    "daemon_killed",
    "killed",
]
RING = 1 << 20  # 1 MiB per rank: "big" (5 MiB global, 1.25 MiB per rank) exceeds every ring


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, str]]]:
    base = tmp_path_factory.mktemp("sharded")
    out, results = work_dirs(base)
    daemons = [start_daemon(out, base / f"sock{n}") for n in range(3)]  # the third one is killed
    port = free_port()
    procs = []
    try:
        for rank in range(WORLD):
            endpoint = daemons[rank // 2].endpoint  # two ranks per simulated node
            args = [str(out), str(results), endpoint, str(RING), *CASES]
            third = {"SHARD_THIRD_ENDPOINT": daemons[2].endpoint}
            procs.append(spawn_rank("shard_ranks.py", args, rank, WORLD, port, third))
        wait_ranks(procs, 120)
        outcomes = read_outcomes(results, (f"rank{r}" for r in range(WORLD)))
    finally:
        kill_ranks(procs)
        for d in daemons:
            if d.alive():
                d.stop()
    return out, outcomes


def _assert_file(out: Path, case: str) -> None:
    path = out / f"{case}.mat"
    want = expected(case)
    fmt = "v5" if FORMATS.get(case, "v7.3") != "v7.3" else "v7.3"
    got = read(path, fmt)
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        matlab = value.reshape(1, -1) if value.ndim < 2 else value  # 1-d: a row; a scalar: 1x1
        assert_exact(got[name], matlab, f"{case}: {name}")
    if fmt == "v5":
        assert path.read_bytes()[:19] == b"MATLAB 5.0 MAT-file"
        return
    with h5py.File(path, "r") as f:  # MATLAB's size is the global shape: dims reversed
        for name, value in want.items():
            dims = (1, value.size) if value.ndim == 1 else value.shape
            assert f[name].shape == tuple(reversed(dims))
            assert f[name].attrs["MATLAB_class"].decode() in ("double", "single", "int64", "logical")
    assert path.read_bytes()[:19] == b"MATLAB 7.3 MAT-file"


@pytest.mark.parametrize(
    "case",
    [
        "dtensor_rows",
        "dtensor_cols",
        "dtensor_mesh",
        "shard_uneven",
        "big",
        "v5",
        "burst0",
        "burst1",
        "burst2",
    ],
)
def test_every_rank_sees_the_one_file_whole(ran: tuple[Path, list[dict[str, str]]], case: str) -> None:
    out, outcomes = ran
    assert [o.get(case) for o in outcomes] == ["ok"] * WORLD, [o.get(case) for o in outcomes]
    _assert_file(out, case)


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("overlap", ["overlap", "rank 1 at offset (2, 0)", "rank 2 at offset (3, 0)"]),
        ("missing", ["missing", "cover 28 of 32", "rank 3 at offset (6, 0) size (1, 4)"]),
    ],
)
def test_bad_blocks_fail_every_rank_and_leave_no_file(
    ran: tuple[Path, list[dict[str, str]]], case: str, words: list[str]
) -> None:
    out, outcomes = ran
    for rank, o in enumerate(outcomes):
        assert o.get(case, "").startswith("ShardError: "), (rank, o.get(case))
        for w in words:
            assert w in o[case], (rank, o[case])
    assert not (out / f"{case}.mat").exists()
    assert not [p for p in os.listdir(out) if p.startswith(f".{case}.mat.")]


def test_a_rank_whose_save_raises_fails_the_others_at_once(ran: tuple[Path, list[dict[str, str]]]) -> None:
    out, outcomes = ran
    assert outcomes[2]["bad_dtype"].startswith("UnsupportedTypeError: "), outcomes[2]["bad_dtype"]
    for rank in (0, 1, 3):
        error = outcomes[rank]["bad_dtype"]
        assert error.startswith("ShardError: ") and "rank 2: UnsupportedTypeError" in error, (rank, error)
    assert not (out / "bad_dtype.mat").exists()


def test_ranks_that_disagree_on_a_dtype_fail_all(ran: tuple[Path, list[dict[str, str]]]) -> None:
    out, outcomes = ran
    for rank, o in enumerate(outcomes):
        assert o["mismatch"].startswith("ShardError: "), (rank, o["mismatch"])
        assert "<f4 of size [8, 4] on rank 1, <f8 of size [8, 4] on rank 0" in o["mismatch"], o["mismatch"]
    assert not (out / "mismatch.mat").exists()


def test_group_saves_with_the_members_of_a_subgroup(ran: tuple[Path, list[dict[str, str]]]) -> None:
    out, outcomes = ran
    assert [o.get("subgroup") for o in outcomes] == ["ok", "ok", None, None]
    _assert_file(out, "subgroup")


def test_a_killed_daemon_fails_every_rank_and_leaves_nothing(ran: tuple[Path, list[dict[str, str]]]) -> None:
    """Ranks 2-3 write through a third daemon, which rank 2 kills once the file is laid out."""
    out, outcomes = ran
    for rank, o in enumerate(outcomes):
        error = o.get("daemon_killed", "")
        assert error.startswith(("ShardError: ", "DaemonUnavailable: ")), (rank, error)
    for rank in (0, 1):  # they hear of ranks 2-3 from rank 0
        error = outcomes[rank]["daemon_killed"]
        assert "rank 2: DaemonUnavailable" in error or "rank(s) 2" in error, error
    assert not (out / "daemon_killed.mat").exists()
    assert not [p for p in os.listdir(out) if p.startswith(".daemon_killed.mat.")]


def test_a_killed_rank_fails_the_others_and_leaves_nothing(ran: tuple[Path, list[dict[str, str]]]) -> None:
    out, outcomes = ran
    assert "killed" not in outcomes[3]  # it died in the middle of its save
    for rank in range(3):
        error = outcomes[rank].get("killed", "")
        # the file was laid out (a temporary existed) before rank 3 died in its writes
        assert error.startswith("ShardError: ") and "rank(s) 3 did not finish" in error, (rank, error)
    assert not (out / "killed.mat").exists()
    assert not [p for p in os.listdir(out) if "matspool-tmp" in p]


def test_report_times(ran: tuple[Path, list[dict[str, str]]]) -> None:
    print({k: v for k, v in ran[1][0].items() if k.endswith("_s")})
