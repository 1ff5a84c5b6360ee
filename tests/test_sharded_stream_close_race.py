"""Two ranks of a sharded stream that end it at different steps (one closes its stream,
another leaves its ``with`` on an error while its next step is in flight, so its word is
for a later step that nobody makes): the step fails on every rank naming the first, the
file keeps its earlier step, and no key of the stream is left in the store.

3 gloo ranks on CPU (tests/shard_stream_close_race.py is each rank) on one daemon; spool
timeout 120 s, futures waited 60 s at most (a wait for the timeout shows as TimeoutError).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("torch")

from ranks import group_on_one_daemon
from shard_stream_close_race import ROLES, WORLD, expected

from readback import read

Ran = tuple[Path, list[dict[str, Any]]]


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> Ran:
    return group_on_one_daemon(tmp_path_factory.mktemp("sstream_race"), "shard_stream_close_race.py", WORLD)


def test_step_1_fails_on_every_rank_naming_the_first_to_end(ran: Ran) -> None:
    out, outcomes = ran
    for case in ROLES:
        closer, _ = ROLES[case]
        path = f"{out / f'{case}.mat'}"
        why = f"rank {closer}'s stream was closed before it appended step 1"
        assert [o.get(f"{case}/0") for o in outcomes] == ["ok"] * WORLD, case
        for rank in range(WORLD):
            if rank != closer:
                assert outcomes[rank][f"{case}/1"].startswith(
                    f"ShardError: sharded stream {path!r}: step 1: {why}, "
                ), (case, rank, outcomes[rank])
        got = read(out / f"{case}.mat", "v7.3")
        assert np.array_equal(got["u"], expected(case, 0)[..., None]), case


def test_a_step_and_a_save_abandoned_by_a_closed_spool_fail_the_others_at_once(ran: Ran) -> None:
    """Rank 1's ``close(timeout=1)`` gave up on its step 1 and its sharded save (the others
    had not made them): when they do, both fail at once naming rank 1's closed spool (they
    waited 60 s at most, the timeout is 120 s), and the file keeps step 0."""
    out, outcomes = ran
    assert [o.get("gaveup/0") for o in outcomes] == ["ok"] * WORLD
    assert outcomes[1]["gaveup/1"].startswith("SpoolClosed: "), outcomes[1]
    for rank in (0, 2):
        o = outcomes[rank]
        for what in ("gaveup/1", "gaveup/save"):
            assert o[what].startswith("ShardError: "), (rank, what, o[what])
            assert "rank 1: SpoolClosed: " in o[what], (rank, what, o[what])
    got = read(out / "gaveup.mat", "v7.3")
    assert np.array_equal(got["u"], expected("gaveup", 0)[..., None])
    assert not (out / "gaveup_save.mat").exists()


def test_a_stream_opened_with_group_and_closed_before_its_first_step_fails_the_others_at_once(
    ran: Ran,
) -> None:
    """Rank 1 leaves the ``with`` of a stream opened with ``group=`` on an error before its
    first step: the others' step 0 fails at once naming rank 1's stream (not a TimeoutError
    after the 60 s the future was waited for), and no file is made."""
    out, outcomes = ran
    path = f"{out / 'unstarted.mat'}"
    why = "rank 1's stream was closed before it appended step 0"
    for rank in (0, 2):
        got = outcomes[rank]["unstarted/0"]
        assert got.startswith(f"ShardError: sharded stream {path!r}: step 0: {why}, "), (rank, got)
    assert not (out / "unstarted.mat").exists()


def test_no_key_is_left(ran: Ran) -> None:
    """The leaver's word for step 2 goes too once it learns the stream ended at step 1; and
    every key of the abandoned step and save, and of each closed spool's word."""
    _, outcomes = ran
    assert [o.get("spool/close") for o in outcomes] == ["ok"] * WORLD
    assert outcomes[0]["keys_there"] == [], outcomes[0]["keys_there"]
