"""The daemon's fast path for binary WRITEs (matspoold.binparse): every body it reads
gives exactly what the reference decode and parse give (the same request, or the same
error), with its shape table cold or warm, for valid, hostile and altered messages; and
files saved through it read back exactly."""

from __future__ import annotations

import json
import os
import random
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
from test_wirebin import WRITES, _hostile

import matspool
from matspool import _messages as m
from matspool import _wirebin
from matspool._protocol import TAG, VarSpec, WriteRequest, decode_head
from matspool._ring import Ring
from matspoold import binparse

from conftest import DaemonProc
from readback import assert_variables, read

RING = 1 << 30
Outcome = list[tuple[Any, ...]]


def _result(parse: Any) -> tuple[Any, ...]:
    try:
        return ("ok", parse())
    except Exception as e:  # noqa: BLE001 - compared, type and text
        return ("err", type(e), str(e))


def _reference(body: bytes, ring: int | None) -> Outcome:
    """What the daemon did before binparse: decode_head, Batch.from_wire, parse_request."""
    try:
        raw = decode_head(TAG, body)
        raws = m.Batch.from_wire(raw).msgs if raw["op"] == "BATCH" else (raw,)
    except Exception as e:  # noqa: BLE001 - compared, type and text
        return [("refused", type(e), str(e))]
    return [(r.get("seq", -1), *_result(lambda r=r: m.parse_request(r, ring))) for r in raws]


def _daemon(body: bytes, ring: int | None) -> Outcome:
    """What the daemon does now (server._handle and _handle_one)."""
    items = binparse.scan(body)
    if items is None:
        return _reference(body, ring)
    return [(item.seq, *_result(lambda item=item: item.request(ring))) for item in items]


def _same(body: bytes, ring: int | None = RING) -> Outcome:
    want = _reference(body, ring)
    for _ in range(2):  # cold, then with whatever shape the first pass learnt
        assert _daemon(body, ring) == want, body
    return want


@pytest.fixture(autouse=True)
def _cold() -> Any:
    binparse.SHAPES.clear()
    yield
    binparse.SHAPES.clear()


def _bodies() -> list[bytes]:
    return [m.encode(w, binary=True)[1] for w in WRITES]


def test_valid_writes_and_batches_give_the_reference_requests() -> None:
    bodies = _bodies()
    for body in [*bodies, _wirebin.join_batch(bodies), _wirebin.join_batch(bodies[::-1] * 3)]:
        out = _same(body)
        assert all(o[1] == "ok" for o in out), out
    assert binparse.SHAPES  # learnt from the reference's own parses


def test_hostile_bodies_are_refused_as_the_reference_refuses_them() -> None:
    for body in _bodies():
        _same(body)  # warm: the hostile ones below are mostly corrupted known shapes
    for body in _hostile():
        _same(body)


def _write(**kw: Any) -> bytes:
    fields: dict[str, Any] = {
        "seq": 7,
        "path": "/tmp/a/b.mat",
        "format": "v5",
        "fsync": False,
        "vars": (VarSpec("x", "<f4", (32, 32), 4096, 4096),),
    }
    fields.update(kw)
    body = _wirebin.encode_write(WriteRequest(**fields))
    assert body is not None
    return body


def test_changed_fields_of_a_known_shape_are_checked_as_the_reference_checks_them() -> None:
    """The fields that change between saves (seq, path, offsets) and the ring they are
    checked against, each made bad after the shape is known: same refusal, same text."""
    assert _same(_write())[0][1] == "ok"
    assert binparse.SHAPES
    cases = [
        _write(seq=2**63),  # past wire_int's bound
        _write(seq=2**64 - 1),
        _write(seq=0),
        _write(path=""),
        _write(path="/tmp/a\x00b.mat"),
        _write(path="/" + "a" * 4096),
        _write(path="/" + "a" * 4095),
        _write(path="relative.mat"),
        _write(path="/tmp/\u00e9\u00e9.mat"),
        _write(vars=(VarSpec("x", "<f4", (32, 32), 4098, 4096),)),  # misaligned
        _write(vars=(VarSpec("x", "<f4", (32, 32), RING, 4096),)),  # past the ring
        _write(vars=(VarSpec("x", "<f4", (32, 32), RING - 4096, 4096),)),  # its very end
        _write(vars=(VarSpec("x", "<f4", (32, 32), RING - 4092, 4096),)),
        _write(vars=(VarSpec("x", "<f4", (32, 32), 2**64 - 4, 4096),)),
    ]
    for body in cases:
        _same(body)
        for ring in (None, 0, 4096, 8192, 8191):  # no ring yet (before HELLO), small rings
            _same(body, ring)


def test_altered_shapes_are_parsed_afresh() -> None:
    """A byte changed anywhere outside seq, path and offsets is another shape: parsed by
    the reference, so a bad name, dtype, size or format is refused as before."""
    good = _write(vars=(VarSpec("x", "<f4", (32, 32), 4096, 4096), VarSpec("yy", "<f8", (2, 3), 0, 48)))
    assert all(o[1] == "ok" for o in _same(good))
    swaps = [
        (b"yy", b"if"),  # a MATLAB keyword, same length
        (b"yy", b"y\xff"),  # not UTF-8
        (b"yy", b"1y"),  # not a MATLAB name
        (b"yy", b"xx"),  # a name repeated
        (b"<f8", b"<f9"),  # unknown dtype
        (b"<f8", b"<i8"),
    ]
    for old, new in swaps:
        assert old in good
        _same(good.replace(old, new, 1))
    rng = random.Random(1414)
    for _ in range(3000):  # random bytes changed, shapes warm
        b = bytearray(good)
        for _ in range(rng.randint(1, 3)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        _same(bytes(b))
        _same(_wirebin.join_batch([good, bytes(b), good]))
    v5big = _write(vars=(VarSpec("x", "<f8", (2**31, 1), 0, 2**34),))
    _same(v5big)  # over v5's per-variable limit: FormatLimitError, each time


def test_shape_table_stays_bounded() -> None:
    for i in range(binparse.MAX_SHAPES * 2 + 3):
        _same(_write(vars=(VarSpec(f"v{i}", "<f4", (1, 1), 0, 4),)))
        assert len(binparse.SHAPES) <= binparse.MAX_SHAPES
    many = tuple(VarSpec(f"v{i}", "<f4", (1, 1), 0, 4) for i in range(400))
    _same(_write(vars=many))  # its key is longer than MAX_KEY_BYTES: never kept
    assert all(len(k) <= binparse.MAX_KEY_BYTES for k in binparse.SHAPES)


def test_a_known_shape_altered_on_the_wire_gets_the_reference_error(mdaemon: DaemonProc, root: Path) -> None:
    """Through a real daemon, a client that said HELLO with a ring: the shape learnt from
    good saves, then the same shape with a bad name, a NUL in its path, a misaligned
    offset, an offset past the ring: each an ERR with the reference's text for its seq,
    nothing written; and the next good save of that shape is written."""
    ring = Ring(1 << 20)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(mdaemon.endpoint)

    def ask(body: bytes) -> m.Reply:
        sock.send_multipart([TAG, body])
        assert sock.poll(10_000), f"no answer to {body!r}"
        return m.decode_reply(sock.recv_multipart())

    try:
        hello = {"op": "HELLO", "ring": ring.name, "ring_bytes": ring.size, "pid": os.getpid()}
        if ring.kind == "memfd":
            hello["fd"] = ring.fd
        assert isinstance(ask(json.dumps(hello).encode()), m.Welcome)
        for i in range(3):
            reply = ask(_write(seq=i + 1, path=str(root / f"good{i}.mat")))
            assert isinstance(reply, m.Done), reply
        end = ring.size - 2048  # the array would run past the ring's end
        bad = [
            _write(seq=11, path=str(root / "bad.mat")).replace(b"x<f4", b"\xff<f4", 1),
            _write(seq=12, path=str(root / "bad.mat")).replace(b"x<f4", b"_<f4", 1),
            _write(seq=13, path=str(root / "a\x00.mat")),
            _write(seq=14, path=str(root / "bad.mat"), vars=(VarSpec("x", "<f4", (32, 32), 4098, 4096),)),
            _write(seq=15, path=str(root / "bad.mat"), vars=(VarSpec("x", "<f4", (32, 32), end, 4096),)),
        ]
        for body in bad:
            reply = ask(body)
            assert isinstance(reply, m.Err), reply
            (want,) = _reference(body, ring.size)
            assert want[0] in ("refused", reply.seq) and want[-1] == reply.message, (reply, want)
        assert isinstance(ask(_write(seq=16, path=str(root / "after.mat"))), m.Done)
    finally:
        sock.close(linger=0)
        ring.close()
    assert not (root / "bad.mat").exists()
    assert_variables(read(root / "after.mat", "v5"), {"x": np.zeros((32, 32), np.float32)})


@pytest.mark.parametrize("fmt", ["v5", "v7.3"])
def test_many_saves_of_one_shape_read_back_exactly(mspool: matspool.Spool, root: Path, fmt: str) -> None:
    """A burst of one shape (the fast path after the first), every file's own values, at
    ever-changing ring offsets, read back by scipy / h5py."""
    rng = np.random.default_rng(14)
    want = {}
    futures = []
    for i in range(300):
        x = rng.random((32, 32), dtype=np.float32)
        y = rng.integers(0, 100, (3, 5)).astype(np.int16)
        p = root / f"s{i}_{fmt}.mat"
        want[p] = {"x": x, "y": y}
        futures.append(mspool.save(p, {"x": x, "y": y}, format=fmt))
    for f in futures:
        f.result(60)
    for p, v in want.items():
        assert_variables(read(p, fmt), v)


def test_scan_reads_what_the_reference_decodes() -> None:
    for body in _bodies():
        (item,) = binparse.scan(body) or [None]
        assert item is not None
        assert item.raw() == decode_head(TAG, body)
        assert item.seq == item.raw()["seq"] and item.path == item.raw()["path"]
    assert binparse.scan(b'{"op":"PING"}') is None
    assert binparse.scan(struct.pack("<2sH", b"\x01B", 0)) is None  # the reference refuses it


def test_the_fast_constructors_make_what_the_classes_make() -> None:
    v = binparse._var("x", "<f4", (32, 32), 4096, 4096)
    want = VarSpec("x", "<f4", (32, 32), 4096, 4096)
    assert type(v) is VarSpec and v == want and hash(v) == hash(want) and repr(v) == repr(want)
    w = binparse._request(7, "/a/b.mat", "v5", False, (v,), 0, "write")
    want_w = WriteRequest(7, "/a/b.mat", "v5", False, (want,), 0, "write", False)
    assert type(w) is WriteRequest and w == want_w and repr(w) == repr(want_w)
    with pytest.raises(AttributeError):
        w.seq = 8  # type: ignore[misc]  # still frozen


@pytest.mark.parametrize("n", [1, 2, 3, 4095, 4096, 4097, 9000])
def test_done_frames_are_the_bytes_msgs_encode_makes(n: int) -> None:
    from matspoold.replies import _DONE_BATCH, done_frames

    answers = [(2**63 - 1 - i, i * 4288) for i in range(n)]
    chunks = [tuple(answers[i : i + _DONE_BATCH]) for i in range(0, n, _DONE_BATCH)]
    assert list(done_frames(answers)) == [m.encode(m.Done(c)) for c in chunks]
