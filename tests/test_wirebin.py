"""The binary WRITE and BATCH (matspool._wirebin): the same messages as their JSON form,
every malformed body refused with ProtocolError, and a daemon fed hostile ones stays up."""

from __future__ import annotations

import json
import random
import shutil
import struct
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import zmq
from fakedaemon import FakeDaemon, ZmqFake

import matspool
from matspool import _messages as m
from matspool import _wirebin
from matspool._errors import ProtocolError
from matspool._protocol import TAG, Char, Struct, TreeSpec, VarSpec, WriteRequest, decode_head

from conftest import DaemonProc
from readback import assert_variables, read

RING = 1 << 30


def _json_body(msg: WriteRequest) -> bytes:
    return json.dumps(msg.to_wire(), separators=(",", ":")).encode()


WRITES = [
    WriteRequest(1, "/tmp/x.mat", "v5", False, (VarSpec("x", "<f8", (1, 1), 0, 8),)),
    WriteRequest(
        2**40,
        '/tmp/d\u00e9j\u00e0 "vu"\\.mat',
        "v7.3",
        True,
        (VarSpec("a", "<f4", (32, 32), 4096, 4096), VarSpec("b_2", "|b1", (3, 4, 5), 8192, 60)),
        compress=7,
    ),
    WriteRequest(3, "/tmp/s.mat", "v7.3", False, (VarSpec("e", "<c16", (1, 3), 64, 48),), mode="create"),
    WriteRequest(5, "/tmp/z.mat", "v5", False, (VarSpec("z", "<f8", (0, 3), 64, 0),)),
    WriteRequest(4, "/tmp/s.mat", "v7.3", False, (VarSpec("e", "<i8", (2, 3), 64, 48),), mode="append"),
]


@pytest.mark.parametrize("write", WRITES, ids=range(len(WRITES)))
def test_binary_write_reads_as_its_json_form(write: WriteRequest) -> None:
    tag, body = m.encode(write, binary=True)
    assert tag == TAG and body[:2] == _wirebin.WRITE_MAGIC
    assert decode_head(tag, body) == json.loads(_json_body(write))
    assert m.parse_request(decode_head(tag, body), RING) == write


@pytest.mark.parametrize("write", WRITES)
def test_as_json_spells_a_binary_write_as_its_json_form(write: WriteRequest) -> None:
    frames = m.encode(write, binary=True)
    assert frames[1][:1] == _wirebin.BINARY
    again = _wirebin.as_json([*frames, b"payload"])
    assert again[0] == TAG and again[2] == b"payload"
    assert json.loads(again[1]) == json.loads(_json_body(write))
    assert _wirebin.as_json(m.encode(write)) == m.encode(write)  # JSON stays as it is


def test_other_writes_stay_json() -> None:
    tree = TreeSpec("s", Struct((("a", VarSpec("s.a", "<f8", (1, 1), 0, 8)), ("t", Char("hi")))))
    for write in [
        WriteRequest(1, "/tmp/x.mat", "v5", False, (tree,)),
        WriteRequest(1, "/tmp/x.mat", "v5", False, (VarSpec("c", "<u2", (1, 2), 0, 4, mclass="char"),)),
        WriteRequest(1, "/tmp/x.mat", "v7.3", False, (VarSpec("d", "<f8", (9, 9), 0, 648, deferred=True),)),
        WriteRequest(1, "/tmp/x.mat", "v5", False, (VarSpec("x", "<f8", (1, 1), 0, 8),), append=True),
        WriteRequest(1, "/tmp/\udcff.mat", "v5", False, (VarSpec("x", "<f8", (1, 1), 0, 8),)),
    ]:
        body = m.encode(write, binary=True)[1]
        assert body[:1] == b"{"
        assert json.loads(body) == write.to_wire()


def test_batches_mix_binary_and_json_bodies() -> None:
    tree = TreeSpec("s", Struct((("a", VarSpec("s.a", "<f8", (1, 1), 0, 8)),)))
    writes = [*WRITES, WriteRequest(9, "/tmp/t.mat", "v5", False, (tree,))]
    body = m.Batch.join([m.encode(w, binary=True)[1] for w in writes])
    assert body[:2] == _wirebin.BATCH_MAGIC
    batch = m.parse_request(decode_head(TAG, body), RING)
    assert isinstance(batch, m.Batch)
    assert [m.parse_request(raw, RING) for raw in batch.msgs] == writes
    # JSON bodies alone still join as a JSON BATCH
    plain = m.Batch.join([_json_body(WRITES[0])] * 2)
    assert plain[:1] == b"{" and len(m.parse_request(decode_head(TAG, plain), RING).msgs) == 2  # type: ignore[union-attr]


def _hostile() -> list[bytes]:
    good = m.encode(WRITES[1], binary=True)[1]
    head = _wirebin._HEAD
    bad = [
        good[:1],
        good[:2],
        good[:10],
        good[:-1],
        good + b"\x00",
        good[:2] + b"\xff" * (len(good) - 2),
        head.pack(b"\x01W", 1, 9, 0, 0, 0, 0, 0),  # unknown format
        head.pack(b"\x01W", 1, 0, 0, 0, 9, 0, 0),  # unknown mode
        head.pack(b"\x01W", 1, 0, 2, 0, 0, 0, 0),  # fsync neither 0 nor 1
        head.pack(b"\x01W", 1, 0, 0, 0, 0, 4, 0) + b"\xff\xfe\xfd\xfc",  # path not UTF-8
        head.pack(b"\x01W", 1, 0, 0, 0, 0, 0xFFFF, 0) + b"/x",  # path past the end
        head.pack(b"\x01W", 1, 0, 0, 0, 0, 2, 0xFFFF) + b"/x",  # variables past the end
        head.pack(b"\x01W", 1, 0, 0, 0, 0, 2, 1) + b"/x" + _wirebin._VAR.pack(1, 3, 255, 0, 8) + b"x<f8",
        b"\x01Q" + good[2:],  # unknown binary message
        b"\x01B",
        struct.pack("<2sH", b"\x01B", 2) + struct.pack("<I", len(good)) + good,  # one message short
        struct.pack("<2sH", b"\x01B", 1) + struct.pack("<I", 1 << 30) + good,  # runs past the end
        struct.pack("<2sH", b"\x01B", 1) + struct.pack("<I", len(good)) + good + b"!",  # trailing
        _wirebin.join_batch([_wirebin.join_batch([good])]),  # a batch in a batch
        _wirebin.join_batch([b'{"op":"PING"']),  # a JSON element that is not JSON
        _wirebin.join_batch([good[:-3]]),  # a WRITE that does not fill its length
    ]
    rng = random.Random(14)
    for _ in range(300):  # random corruption of a valid body
        b = bytearray(good)
        for _ in range(rng.randint(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        bad.append(bytes(b[: rng.randint(1, len(b))]))
    return bad


def test_malformed_binary_bodies_are_refused_with_protocol_error() -> None:
    refused = 0
    for body in _hostile():
        try:
            raw = decode_head(TAG, body)
            m.parse_request(raw, RING)  # what survives decoding is checked as any WRITE
        except ProtocolError:
            refused += 1
        except Exception as e:  # noqa: BLE001 - the assertion names it
            pytest.fail(f"{body!r}: {type(e).__name__}: {e}")
    assert refused >= 21  # every hand-made one at least


def test_the_daemon_answers_hostile_binary_writes_and_stays_up(
    mspool: matspool.Spool, mdaemon: DaemonProc, root: Path
) -> None:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(mdaemon.endpoint)
    try:
        answered = 0
        for body in _hostile()[:40]:
            sock.send_multipart([TAG, body])
            assert sock.poll(10_000), f"no answer to {body!r}"
            reply = m.decode_reply(sock.recv_multipart())
            assert isinstance(reply, m.Err), reply
            answered += 1
        assert answered == 40
    finally:
        sock.close(linger=0)
    # and it still writes, through the binary form
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    mspool.save(root / "after.mat", {"x": x}).result(30)
    assert_variables(read(root / "after.mat", "v5"), {"x": x})


def test_more_queued_saves_than_a_batch_holds_all_arrive(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Binary WRITEs are small: the client's batches must stop at MAX_BATCH messages
    (4096), not only at their byte budget, or the daemon refuses the whole batch. Short
    paths (an embedded daemon, a directory in /tmp) keep 4,500 WRITEs under that budget;
    the I/O thread is not woken while they are queued, so they leave together."""
    d = Path(tempfile.mkdtemp(prefix="mw", dir="/tmp"))
    try:
        x = np.ones((1, 1))
        with matspool.Spool(ring_bytes=8 << 20, heartbeat=60, timeout=60) as spool:
            transport = spool._link.transport  # type: ignore[union-attr]
            wake = transport.wake
            transport.wake = lambda: None  # the saves queue up in the I/O thread's outbox
            try:
                futures = [spool.save(d / f"b{i}.mat", {"x": x}) for i in range(4500)]
            finally:
                transport.wake = wake
            wake()
            spool.flush(timeout=120)
        assert all(f.done() and f.exception() is None for f in futures)
        assert sum(1 for i in range(4500) if (d / f"b{i}.mat").exists()) == 4500
        assert_variables(read(d / "b4499.mat", "v5"), {"x": x})
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_binary_only_to_a_daemon_that_says_it_reads_it(mdaemon: DaemonProc, root: Path) -> None:
    """The daemon's WELCOME lists the feature; a client told nothing (an older daemon, whose
    version is the bare tag) keeps sending JSON."""
    write = WRITES[0]
    assert m.encode(write)[1][:1] == b"{"  # the default: JSON
    with matspool.Spool(mdaemon.endpoint, ring_bytes=1 << 20, timeout=30) as spool:
        assert spool._link.binary  # type: ignore[union-attr]
        x = np.arange(6.0).reshape(2, 3)
        spool.save(root / "b.mat", {"x": x}).result(30)
        assert_variables(read(root / "b.mat", "v5"), {"x": x})
    old = m.Welcome(1, "i", "matspool/1")
    assert _wirebin.FEATURE not in old.version.split()
    new = m.decode_reply(m.encode(m.Welcome(1, "i", f"matspool/1 {_wirebin.FEATURE}")))
    assert isinstance(new, m.Welcome) and _wirebin.FEATURE in new.version.split()


def test_resends_follow_the_daemon_that_replaced_the_one_they_were_encoded_for(tmp_path: Path) -> None:
    """A daemon that read binary WRITEs dies with saves unanswered; the one that replaces
    it on the endpoint offers no ``binwrite`` (an older one, which reads JSON only) and
    refuses the binary WRITEs still in flight (those queued while no daemon was there):
    the client switches to JSON, re-sends every unanswered save in it, and every file
    holds exactly its bytes."""
    endpoint = f"ipc://{tmp_path}/d.sock"
    first = ZmqFake(FakeDaemon(hold=True, binwrite=True, instance="first"), endpoint)
    arrays = {f"{i}.mat": np.arange(i, i + 6, dtype=np.float64).reshape(2, 3) for i in range(12)}
    names = list(arrays)
    second: ZmqFake | None = None
    try:
        with matspool.Spool(endpoint, ring_bytes=1 << 20, heartbeat=0.1, timeout=60) as spool:
            futures = [spool.save(f"/data/{n}", {"x": arrays[n]}) for n in names[:8]]
            deadline = time.monotonic() + 10
            while first.daemon.n_writes() < 8:
                assert time.monotonic() < deadline, "the first daemon never saw the saves"
                time.sleep(0.01)
            assert first.binary >= 1 and first.refused == 0  # they went binary
            first.close()  # killed with every save unanswered
            futures += [spool.save(f"/data/{n}", {"x": arrays[n]}) for n in names[8:]]
            second = ZmqFake(FakeDaemon(binwrite=False, instance="second"), endpoint)
            for f in futures:
                f.result(30)
            assert not spool._link.binary  # type: ignore[union-attr]
        assert second.refused > 0  # binary WRITEs in flight reached it, and were refused
        files = second.daemon.files
        assert sorted(files) == sorted(f"/data/{n}" for n in names)
        for n in names:
            assert files[f"/data/{n}"]["x"] == arrays[n].tobytes(order="F")
    finally:
        first.close()
        if second is not None:
            second.close()
