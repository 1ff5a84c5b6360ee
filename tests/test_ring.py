"""The ring allocator: live regions never overlap, stay inside the ring, and space returns."""

from __future__ import annotations

import itertools
import os
import random
import stat

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from matspool import PayloadTooLarge, SpoolFull
from matspool._errors import RingError
from matspool._ring import ALIGN, Ring


@pytest.fixture
def ring():
    r = Ring(64 * ALIGN * 64)  # 256 KiB: many small saves wrap around it often
    yield r
    r.close()


def _check(live: dict[int, int], size: int) -> None:
    spans = sorted(live.items())
    for (a, n), (b, _) in itertools.pairwise(spans):
        assert a + n <= b, f"overlap: [{a}, {a + n}) and {b}"
    for a, n in spans:
        assert a >= 0 and a + n <= size


@settings(max_examples=200, deadline=None)
@given(
    ops=st.lists(
        st.tuples(
            st.booleans(),
            st.one_of(st.integers(1, 40_000), st.sampled_from([1 << 15, 1 << 14, 1 << 13])),
            st.integers(0, 1000),
        ),
        max_size=200,
    )
)
def test_random_alloc_free_never_overlaps(ops) -> None:
    r = Ring(1 << 17)
    try:
        live: dict[int, int] = {}
        for do_alloc, nbytes, pick in ops:
            if do_alloc or not live:
                try:
                    off = r.alloc(nbytes, block=False, timeout=None)
                except SpoolFull:
                    assert live, "an empty ring refused a save that fits"
                    continue
                live[off] = -(-nbytes // ALIGN) * ALIGN
            else:
                off = sorted(live)[pick % len(live)]
                del live[off]
                r.free(off)
            _check(live, r.size)
        for off in list(live):
            r.free(off)
        assert r.used == 0
        assert r.alloc(r.size, block=False, timeout=None) == 0  # all space is back
    finally:
        r.close()


def test_full_ring_raises_or_times_out(ring: Ring) -> None:
    ring.alloc(ring.size - ALIGN, block=False, timeout=None)
    with pytest.raises(SpoolFull, match="ring full"):
        ring.alloc(2 * ALIGN, block=False, timeout=None)
    with pytest.raises(SpoolFull, match=r"after waiting 0\.2 s"):
        ring.alloc(2 * ALIGN, block=True, timeout=0.2)


def test_larger_than_ring_is_a_clear_error(ring: Ring) -> None:
    with pytest.raises(PayloadTooLarge, match="ring_bytes"):
        ring.alloc(ring.size + 1, block=True, timeout=None)  # never a hang


def test_ring_is_owner_only_and_removed_on_close() -> None:
    r = Ring(1 << 16, kind="shm")
    path = r.path
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    r.close()
    assert not os.path.exists(path)


def test_memfd_ring_is_sealed_and_leaves_no_name() -> None:
    """The default ring cannot change size, not even by its own process (issue 11 item 2)."""
    import fcntl

    r = Ring(1 << 16)
    assert r.kind == "memfd" and r.exists()
    assert os.readlink(r.path) == f"/memfd:{r.name} (deleted)"
    assert stat.S_IMODE(os.stat(r.path).st_mode) == 0o600
    seals = fcntl.fcntl(r.fd, fcntl.F_GET_SEALS)
    assert seals & (fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL) == (
        fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
    )
    for size in (0, 4096, r.size * 2):
        with pytest.raises(PermissionError):
            os.ftruncate(r.fd, size)
    assert not os.path.exists(os.path.join("/dev/shm", r.name))
    r.close()
    assert r.fd == -1 and not r.exists()


def test_a_group_readable_ring_is_a_shm_file() -> None:
    """A daemon of another user cannot open /proc/<pid>/fd: such rings live in /dev/shm."""
    r = Ring(1 << 16, mode=0o640)
    try:
        assert r.kind == "shm" and r.path == os.path.join("/dev/shm", r.name)
        assert stat.S_IMODE(os.stat(r.path).st_mode) == 0o640
    finally:
        r.close()
    assert not os.path.exists(r.path)


def test_move_from_memfd_to_shm_keeps_the_bytes() -> None:
    r = Ring(1 << 16)
    try:
        off = r.alloc(1000, block=False, timeout=None)
        r.array[off : off + 1000] = 7
        r.written()
        r.move(kind="shm")
        assert r.kind == "shm" and os.path.exists(r.path)
        assert (r.array[off : off + 1000] == 7).all()
    finally:
        r.close()


def test_random_order_frees_reuse_space() -> None:
    r = Ring(1 << 16)
    try:
        rng = random.Random(7)
        for _ in range(50):
            offs = [r.alloc(rng.randint(1, 4000), block=False, timeout=None) for _ in range(8)]
            rng.shuffle(offs)
            for o in offs:
                r.free(o)
            assert r.used == 0
    finally:
        r.close()


def test_exactly_full_ring_wraps_without_overlap(ring: Ring) -> None:
    quarter = ring.size // 4
    offs = [ring.alloc(quarter, block=False, timeout=None) for _ in range(4)]
    assert offs == [0, quarter, 2 * quarter, 3 * quarter]
    ring.free(0)
    assert ring.alloc(quarter, block=False, timeout=None) == 0  # the freed quarter, wrapped
    with pytest.raises(SpoolFull):  # head == tail now means full, not empty
        ring.alloc(quarter, block=False, timeout=None)


def test_a_closed_ring_refuses_to_move_with_a_ring_error() -> None:
    """A spool's close() can close the ring while its I/O thread re-registers with a
    daemon that dropped it: the move must fail as RingError (which the I/O thread turns
    into failed saves), not as a ValueError from the closed mapping that kills the thread."""
    r = Ring(1 << 16)
    r.close()
    with pytest.raises(RingError, match="closed"):
        r.move()
