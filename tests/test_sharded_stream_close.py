"""A rank that closes its spool or its sharded stream while the other ranks append: their
pending and next steps fail at once with a ShardError naming the rank and the step, the
file keeps its earlier steps, and no key of the streams is left in the store.

3 gloo ranks on CPU (tests/shard_stream_close.py is each rank) on one daemon. Every spool's
timeout is 120 s and each rank waits at most 60 s for a future, so a step that waited for
the timeout would be a ``TimeoutError`` here, never the ShardError asserted. Files are
read back (tests/readback.py) and compared exactly, step by step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")

from ranks import group_on_one_daemon
from shard_stream_close import CASES, WORLD, expected

from readback import read

Ran = tuple[Path, list[dict[str, Any]]]
KEEP = "so it appends no later step; the stream keeps its earlier steps"


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> Ran:
    return group_on_one_daemon(tmp_path_factory.mktemp("sstream_close"), "shard_stream_close.py", WORLD)


def _steps(out: Path, case: str, steps: int) -> None:
    """The file holds exactly the first ``steps`` steps of ``case``, each exact."""
    got = read(out / f"{case}.mat", "v7.3")
    want = np.stack([expected(case, k) for k in range(steps)], axis=-1)  # MATLAB: [6 4 n]
    assert sorted(got) == ["u"]
    assert got["u"].shape == want.shape and np.array_equal(got["u"], want), case


def test_steps_before_the_close_are_in_the_file(ran: Ran) -> None:
    out, outcomes = ran
    for case in CASES:
        assert [o.get(f"{case}/{k}") for o in outcomes for k in (0, 1)] == ["ok"] * 2 * WORLD, case
        _steps(out, case, 2)


def test_a_closed_spool_fails_the_others_pending_and_next_steps_at_once(ran: Ran) -> None:
    """Rank 1 closes its spool while ranks 0 and 2 have steps 2 and 3 in flight: both fail
    naming rank 1's Spool and step 2 (not after the 120 s timeout: the futures were waited
    for 60 s), step 4 is refused by append() itself; rank 1's own append is SpoolClosed."""
    _, outcomes = ran
    path = f"{ran[0] / 'spool.mat'}"
    why = "rank 1's Spool was closed before it appended step 2"
    for rank in (0, 2):
        o = outcomes[rank]
        for k in (2, 3, 4):
            assert o[f"spool/{k}"] == f"ShardError: sharded stream {path!r}: step {k}: {why}, {KEEP}", (
                rank,
                k,
            )
        assert o["spool/close"].startswith("FlushError: "), o["spool/close"]  # steps 2 and 3 failed
    o1 = outcomes[1]
    assert o1["spool/after"].startswith("SpoolClosed: append() on the sharded stream "), o1
    assert o1["spool/close"] == "ok"


def test_a_closed_stream_on_rank_0_fails_the_others_step_at_once(ran: Ran) -> None:
    """Rank 0 (which checks every step's blocks, and holds the store) closes its stream
    while ranks 1 and 2 have step 2 in flight: it fails on both, naming rank 0's stream."""
    _, outcomes = ran
    path = f"{ran[0] / 'stream.mat'}"
    why = "rank 0's stream was closed before it appended step 2"
    assert outcomes[0]["stream/close"] == "ok"
    for rank in (1, 2):
        o = outcomes[rank]
        assert o["stream/2"] == f"ShardError: sharded stream {path!r}: step 2: {why}, {KEEP}", rank
        assert o["stream/close"].startswith("FlushError: "), o["stream/close"]


def test_no_key_is_left(ran: Ran) -> None:
    """Every rank's word for a step it never made is gone once the others made it (spool:
    rank 0 collected it), read it (stream: the last reader of closed rank 0's word) or
    closed their own stream before it too (end: the last to close); and each closed
    spool's word for the group's next sharded save once every rank closed its spool."""
    _, outcomes = ran
    for what in ("end/close", "first/close", "last/close"):
        assert [o.get(what) for o in outcomes] == ["ok"] * WORLD, what
    assert outcomes[0]["keys_there"] == [], outcomes[0]["keys_there"]
    assert outcomes[0]["save_keys_there"] == [], outcomes[0]["save_keys_there"]
