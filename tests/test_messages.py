"""The typed protocol: every message survives its own wire form, hostile fields are
refused with ProtocolError, and the message table in docs/daemon.md matches the types."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from matspool import _messages as m
from matspool._errors import ProtocolError, UnknownClient
from matspool._protocol import Part, VarSpec, WriteRequest, decode_head

README = Path(__file__).resolve().parents[1] / "docs" / "daemon.md"  # the protocol table moved there

SAMPLES: list[m.Message] = [
    m.Hello("matspool-1-abc", 4096, 1),
    m.Hello(None, 4096, 7, remote=True),
    m.End(3, abort=True),
    m.End(4),
    m.Ping(),
    m.StatusQuery(),
    m.Bye(),
    m.Welcome(12, "0123456789abcdef", "matspool/1"),
    m.Pong("0123456789abcdef", 42),
    m.Pong(),
    m.Done(((5, 1024),)),
    m.Done(((5, 1024), (6, 2048))),
    m.Err(9, "write_failed", "cannot write 'x.mat': No such file or directory", 2),
    m.Err(-1, "ring", "cannot open ring"),
    m.PartDone(3, 128),
    m.PartDone(3, None),
    m.StatusReply(
        1,
        "ab",
        "ipc:///x",
        ("/a", "/b"),
        1.5,
        2,
        3,
        0,
        (m.ClientStatus(7, "matspool-7-ab", 4096, 1, 64, 2, 100, 0, 10.0, 3.0, 0.5, 0.1, False),),
    ),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda x: type(x).__name__)
def test_round_trip(msg: m.Message) -> None:
    frames = m.encode(msg)
    if type(msg) in m.DAEMON_OPS.values():
        assert m.decode_reply(frames) == msg
    else:
        assert m.parse_request(decode_head(*frames), 4096) == msg


def test_write_and_part_are_checked_against_the_ring() -> None:
    write = WriteRequest(1, "/tmp/x.mat", "v5", False, (VarSpec("x", "<f8", (1, 1), 0, 8),))
    raw = decode_head(*m.encode(write))
    assert m.parse_request(raw, 4096) == write
    with pytest.raises(ProtocolError, match="offset"):
        m.parse_request({**raw, "vars": [{**raw["vars"][0], "offset": 5000}]}, 4096)
    with pytest.raises(UnknownClient):
        m.parse_request(raw, None)
    part = Part(1, 0, 0, 64, 8)
    assert m.parse_request(decode_head(*m.encode(part)), 4096) == part


def test_batch_joins_encoded_writes() -> None:
    write = WriteRequest(1, "/tmp/x.mat", "v5", False, (VarSpec("x", "<f8", (1, 1), 0, 8),))
    body = m.encode(write)[1]
    batch = m.parse_request(decode_head(b"matspool/1", m.Batch.join([body, body])), 4096)
    assert isinstance(batch, m.Batch) and len(batch.msgs) == 2


@pytest.mark.parametrize(
    "raw",
    [
        {"op": "HELLO", "ring": 5, "ring_bytes": 4096, "pid": 1},
        {"op": "HELLO", "ring": "r", "ring_bytes": 1 << 50, "pid": 1},
        {"op": "HELLO", "ring": "r", "ring_bytes": 4096, "pid": "1"},
        {"op": "HELLO", "ring": "r", "ring_bytes": True, "pid": 1},
        {"op": "HELLO", "ring_bytes": 4096, "pid": 1},
        {"op": "END", "seq": -1},
        {"op": "END", "seq": 1, "abort": "yes"},
        {"op": "BATCH", "msgs": []},
        {"op": "BATCH", "msgs": [{"op": "HELLO"}]},
        {"op": "SHUTDOWN"},
    ],
)
def test_hostile_requests_are_refused(raw: dict) -> None:
    with pytest.raises(ProtocolError):
        m.parse_request(raw, 4096)


@pytest.mark.parametrize(
    "body",
    [
        b'{"op":"DONE","seq":[1],"nbytes":3}',
        b'{"op":"DONE","done":[[1]]}',
        b'{"op":"DONE","done":[[1,-2]]}',
        b'{"op":"DONE","done":[[1,2],[3,true]]}',
        b'{"op":"DONE","done":[[1,2],[3,4,5]]}',
        b'{"op":"DONE","done":{"1":2}}',
        b'{"op":"DONE","seq":-1,"nbytes":3}',
        b'{"op":"DONE","seq":01,"nbytes":3}',
        b'{"op":"DONE","seq":9223372036854775808,"nbytes":3}',
        b'{"op":"DONE","seq":1,"nbytes":3}x',
        b'{"op":"ERR","seq":1,"code":5,"message":"x"}',
        b'{"op":"WELCOME","pid":1}',
        b'{"op":"PART_DONE","seq":1,"offset":"x"}',
        b'{"op":"STATUS","pid":1}',
        b'{"op":"NOPE"}',
    ],
)
def test_hostile_replies_are_refused(body: bytes) -> None:
    with pytest.raises(ProtocolError):
        m.decode_reply([b"matspool/1", body])


@pytest.mark.parametrize(
    ("body", "answers"),
    [
        (b'{"op":"DONE","seq":0,"nbytes":0}', ((0, 0),)),
        (b'{"op":"DONE","seq":999999999999999999,"nbytes":4288}', ((999999999999999999, 4288),)),
        # beyond the regex's 18 digits, or spelled otherwise: JSON and its checks decide
        (b'{"op":"DONE","seq":9223372036854775807,"nbytes":1}', ((2**63 - 1, 1),)),
        (b'{"op": "DONE", "nbytes": 2, "seq": 1}', ((1, 2),)),
        (b'{"op":"DONE","done":[[1,2],[3,4]]}', ((1, 2), (3, 4))),
    ],
)
def test_done_spellings_read_alike(body: bytes, answers: tuple[tuple[int, int], ...]) -> None:
    """The one-save DONE read without JSON (decode_reply's regex) and every other
    spelling give the same Done; ``matspoold.replies.done_frames`` writes the first."""
    assert m.decode_reply([b"matspool/1", body]) == m.Done(answers)


def _readme_table() -> dict[tuple[str, str], tuple[str, ...]]:
    """docs/daemon.md's message table: (direction, op) -> fields."""
    text = README.read_text()
    start = text.index("| direction | message | fields |")
    rows: dict[tuple[str, str], tuple[str, ...]] = {}
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        direction, op, fields_ = (c.strip() for c in line.strip("|").split("|")[:3])
        names = tuple(re.findall(r"`(\w+)`", fields_))
        rows[(direction, op.strip("`"))] = names
    return rows


def test_readme_message_table_matches_the_types() -> None:
    table = _readme_table()
    expected = {("client → daemon", op): m.wire_fields(op, from_client=True) for op in m.CLIENT_OPS}
    expected |= {("daemon → client", op): m.wire_fields(op, from_client=False) for op in m.DAEMON_OPS}
    assert {k: set(v) for k, v in table.items()} == {k: set(v) for k, v in expected.items()}
