"""Streams sharded over ranks: 4 ranks (gloo on CPU) on two simulated nodes, one file
that grows one global time series (tests/shard_stream_ranks.py is each rank).

Two daemons (two endpoints, one output directory) as two nodes sharing a filesystem; a
third one serves ranks 2-3 for "daemon_killed" only (rank 2 kills it mid-step). One
spawned group runs every case in turn: two streams with every step in flight at once,
Shard blocks with a plain scalar (fsync), a DTensor, bad steps, a killed daemon, a killed
rank 3, then (on a subgroup of ranks 0-2) a killed rank 0. Files are read back with h5py,
tests/readback.py, mat73 and GNU Octave and compared exactly, step by step.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import h5py
import mat73
import numpy as np
import pytest

pytest.importorskip("torch")

from ranks import free_port, kill_ranks, read_outcomes, spawn_rank, wait_ranks, work_dirs
from shard_stream_ranks import STEPS, WORLD, expected
from test_octave import OCTAVE, octave_load

from conftest import start_daemon
from readback import read

CASES = ["pipelined", "rows", "dtensor", "mismatch", "daemon_killed", "killed", "killed0"]
RING = 1 << 20


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, str]]]:
    base = tmp_path_factory.mktemp("sstream")
    out, results = work_dirs(base)
    daemons = [start_daemon(out, base / f"sock{n}") for n in range(3)]
    port = free_port()
    procs = []
    try:
        for rank in range(WORLD):
            args = [str(out), str(results), daemons[rank // 2].endpoint, str(RING), *CASES]
            third = {"SHARD_THIRD_ENDPOINT": daemons[2].endpoint}
            procs.append(spawn_rank("shard_stream_ranks.py", args, rank, WORLD, port, third))
        wait_ranks(procs, 120)
        outcomes = read_outcomes(results, (f"rank{r}" for r in range(WORLD)))
        # killed0: rank 0 died with the step's temporary laid out, before the others learnt
        # its name; its daemon removes it once it finds rank 0's process gone (2-3 s)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and [n for n in os.listdir(out) if n.startswith(".killed0.mat.")]:
            time.sleep(0.1)
    finally:
        kill_ranks(procs)
        for d in daemons:
            if d.alive():
                d.stop()
    return out, outcomes


def _assert_steps(out: Path, case: str, steps: list[int]) -> None:
    """The file holds exactly these steps of ``case``, in order, each exact; MATLAB's size
    is the global size with the steps as a trailing dimension (as for a plain stream)."""
    path = out / f"{case}.mat"
    assert path.read_bytes()[:19] == b"MATLAB 7.3 MAT-file"
    got = read(path, "v7.3")
    want = [expected(case, k) for k in steps]
    assert sorted(got) == sorted(want[0])
    for name in want[0]:
        series = np.stack([w[name] for w in want], axis=-1)  # MATLAB: [dims... n]
        if want[0][name].ndim == 0:
            series = series.reshape(1, 1, len(steps))
        assert got[name].shape == series.shape, (name, got[name].shape, series.shape)
        assert got[name].dtype == series.dtype and np.array_equal(got[name], series), name
    m = mat73.loadmat(str(path))  # an independent MATLAB-file reader
    series = np.stack([w["u"] for w in want], axis=-1)
    assert np.array_equal(np.asarray(m["u"]).reshape(series.shape), series)
    with h5py.File(path, "r") as f:
        for name, value in want[0].items():
            ds = f[name]
            dims = value.shape if value.ndim else (1, 1)
            assert ds.shape == (len(steps), *reversed(dims))
            assert ds.chunks == (1, *reversed(dims))  # one chunk per step, as a plain stream
            assert ds.attrs["MATLAB_class"].decode() in ("double", "single")
    assert not [n for n in os.listdir(out) if n.startswith(f".{case}.mat.")], "a temporary or journal stayed"


@pytest.mark.parametrize("case", ["rows", "dtensor"])
def test_every_rank_grows_one_global_series(ran: tuple[Path, list[dict[str, str]]], case: str) -> None:
    out, outcomes = ran
    for k in range(STEPS[case]):
        assert [o.get(f"{case}/{k}") for o in outcomes] == ["ok"] * WORLD, k
        # readable, whole, as soon as the step's future resolved
        assert outcomes[0][f"{case}/{k}/read"] == f"{k + 1} steps, newest exact"
    _assert_steps(out, case, list(range(STEPS[case])))


def test_two_streams_with_every_step_in_flight_at_once(ran: tuple[Path, list[dict[str, str]]]) -> None:
    """Two sharded streams, each rank appending all three steps of both before waiting
    for any: each file holds its own series, in order."""
    out, outcomes = ran
    assert [o.get("pipelined") for o in outcomes] == ["ok"] * WORLD, [o.get("pipelined") for o in outcomes]
    for i in (0, 1):
        _assert_steps(out, f"pipe{i}", [0, 1, 2])


def test_bad_steps_fail_every_rank_and_the_stream_goes_on(ran: tuple[Path, list[dict[str, str]]]) -> None:
    """Step 0: overlapping and missing blocks (so step 1 creates the file); step 2: a
    global size the stream does not have; step 3: ranks that disagree on a dtype; step 5:
    ranks 0 and 2 raise in append() itself. Each fails on every rank with the ranks and
    offsets named, at once; the file holds steps 1, 4 and 6."""
    out, outcomes = ran
    words = {
        0: ["step 0", "overlap", "rank 1 at offset (2, 0)", "rank 2 at offset (3, 0)"],
        2: [
            "step 2",
            "is <f8 of size [16, 5] in this step, <f8 of size [8, 5] in the stream's earlier steps",
        ],
        3: ["step 3", "<f4 of size [8, 5] on rank 1, <f8 of size [8, 5] on rank 0"],
    }
    for rank, o in enumerate(outcomes):
        assert [o["mismatch/1"], o["mismatch/4"]] == ["ok", "ok"], rank
        assert float(o["mismatch_s"]) < 30, "a bad step waited for a timeout"
        for k, want in words.items():
            error = o[f"mismatch/{k}"]
            assert error.startswith("ShardError: sharded stream "), (rank, k, error)
            assert error.endswith("; the stream keeps its earlier steps"), (rank, k, error)
            for w in want:
                assert w in error, (rank, k, error)
    for rank, o in enumerate(outcomes):  # step 5: ranks 0 and 2 raise in append() itself
        error = o["mismatch/5"]
        if rank in (0, 2):
            assert error.startswith("UnsupportedTypeError: "), (rank, error)
        else:  # told at once, by rank 0 (which has no step thread for it) or through it
            assert error.startswith("ShardError: sharded stream ") and "step 5: rank " in error, (rank, error)
            assert ": UnsupportedTypeError: " in error and error.endswith("earlier steps"), (rank, error)
        assert o["mismatch/6"] == "ok", rank
    assert outcomes[0]["mismatch/1/read"] == "1 steps, newest exact"
    assert outcomes[0]["mismatch/6/read"] == "3 steps, newest exact"
    _assert_steps(out, "mismatch", [1, 4, 6])


def test_a_killed_daemon_fails_the_step_on_every_rank(ran: tuple[Path, list[dict[str, str]]]) -> None:
    out, outcomes = ran
    for rank, o in enumerate(outcomes):
        assert [o.get(f"daemon_killed/{k}") for k in (0, 1)] == ["ok", "ok"], rank
        error = o.get("daemon_killed/2", "")
        assert error.startswith(("ShardError: ", "DaemonUnavailable: ")), (rank, error)
    assert (
        "rank 2: DaemonUnavailable" in outcomes[0]["daemon_killed/2"]
        or "rank(s) 2" in outcomes[0]["daemon_killed/2"]
    ), outcomes[0]["daemon_killed/2"]
    _assert_steps(out, "daemon_killed", [0, 1])


def test_a_killed_rank_fails_the_step_and_keeps_the_earlier_ones(
    ran: tuple[Path, list[dict[str, str]]],
) -> None:
    out, outcomes = ran
    assert "killed/2" not in outcomes[3]  # it died in the middle of its step
    for rank in range(3):
        assert [outcomes[rank].get(f"killed/{k}") for k in (0, 1)] == ["ok", "ok"], rank
        error = outcomes[rank].get("killed/2", "")
        assert error.startswith("ShardError: ") and "rank(s) 3 did not" in error, (rank, error)
        assert error.endswith("; the stream keeps its earlier steps"), error
    _assert_steps(out, "killed", [0, 1])


def test_a_killed_rank_0_fails_the_step_and_keeps_the_earlier_ones(
    ran: tuple[Path, list[dict[str, str]]],
) -> None:
    """Rank 0 of a group of ranks 0-2 (it holds the store) dies mid-step: ranks 1-2 fail
    at once, the stream keeps step 0, and rank 0's daemon removes the step's temporary."""
    out, outcomes = ran
    assert "killed0/1" not in outcomes[0]
    for rank in (1, 2):
        assert outcomes[rank]["killed0/0"] == "ok"
        error = outcomes[rank]["killed0/1"]
        assert error.startswith("ShardError: sharded stream ") and "step 1" in error, (rank, error)
        assert error.endswith("every earlier step is in the stream"), (rank, error)
    _assert_steps(out, "killed0", [0])  # the fixture gave the daemon time to find rank 0 gone


@pytest.mark.skipif(OCTAVE is None, reason="GNU Octave is not installed (no `octave` on PATH)")
def test_octave_reads_the_global_series(ran: tuple[Path, list[dict[str, str]]]) -> None:
    """Another reader of v7.3 (GNU Octave, plain HDF5): the global series, its size
    [8 5 3] and the scalar's [1 1 3], exact."""
    out, _ = ran
    seen = octave_load(out / "rows.mat")
    for name in ("u", "t"):
        want = np.stack([expected("rows", k)[name] for k in range(3)], axis=-1)
        cls, dims, values = seen[name]
        want = want.reshape(1, 1, 3) if name == "t" else want
        assert (cls, dims) == ("double", want.shape), (name, cls, dims)
        assert np.array_equal(values, want), name


def test_report_times(ran: tuple[Path, list[dict[str, str]]]) -> None:
    print({k: v for k, v in ran[1][0].items() if k.endswith("_s")})
