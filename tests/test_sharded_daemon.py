"""The daemon's side of sharded saves: LAYOUT, PLACE, PUBLISH, DISCARD from a raw client.

Every field is checked, every write stays in a laid-out matspool temporary below a root,
and no message, however hostile, ends the daemon (each gets its ERR). ``runs`` (how a
block becomes runs of contiguous bytes) is checked against numpy slicing.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import zmq

from matspool._protocol import TAG
from matspool._ring import Ring
from matspool._shard_blocks import boxes
from matspoold.sharded import runs

from conftest import DaemonProc, start_daemon
from readback import read_v73

RING = 1 << 20


class Raw:
    """A client that speaks the protocol by hand, with a ring of its own."""

    def __init__(self, endpoint: str) -> None:
        self.ring = Ring(RING)
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        hello = {"op": "HELLO", "ring": self.ring.name, "ring_bytes": RING, "pid": os.getpid()}
        if self.ring.kind == "memfd":
            hello["fd"] = self.ring.fd
        assert self.ask(hello)["op"] == "WELCOME"

    def ask(self, msg: dict[str, Any]) -> dict[str, Any]:
        self.sock.send_multipart([TAG, json.dumps(msg).encode()])
        assert self.sock.poll(10_000), f"no answer to {msg}"
        return dict(json.loads(self.sock.recv_multipart()[1]))

    def close(self) -> None:
        self.sock.close()
        self.ring.close()


@contextlib.contextmanager
def raw_daemon(tmp_path: Path) -> Iterator[tuple[DaemonProc, Raw, Path, Path]]:
    """A daemon on ``tmp_path/root`` and a Raw client of it (with ``tmp_path/outside`` for
    paths it must refuse); the daemon must still be alive at the end."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    d = start_daemon(root, tmp_path / "sock")
    raw = Raw(d.endpoint)
    yield d, raw, root, outside
    raw.close()
    assert d.alive(), "a message ended the daemon"
    d.stop()


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DaemonProc, Raw, Path, Path]]:
    with raw_daemon(tmp_path_factory.mktemp("shardd")) as s:
        yield s


def _layout(raw: Raw, path: Path, dims: list[int], seq: int = 1) -> dict[str, Any]:
    var = {"name": "u", "dtype": "<f8", "dims": dims}
    return raw.ask({"op": "LAYOUT", "seq": seq, "path": str(path), "format": "v7.3", "vars": [var]})


def _place(
    path: Path, tmp: str, offset: int, dims: list[int], at: list[int], shape: list[int]
) -> dict[str, Any]:
    return {
        "op": "PLACE",
        "seq": 2,
        "path": str(path),
        "tmp": tmp,
        "data_offset": offset,
        "dtype": "<f8",
        "dims": dims,
        "box_offset": at,
        "box_shape": shape,
        "ring_offset": 0,
    }


def test_layout_place_publish_by_hand(setup: tuple[DaemonProc, Raw, Path, Path]) -> None:
    _, raw, root, _ = setup
    path = root / "a.mat"
    g = np.arange(30, dtype=np.float64).reshape(5, 6)  # MATLAB size 5x6
    laid = _layout(raw, path, [5, 6])
    assert laid["op"] == "LAID_OUT" and (root / laid["tmp"]).exists(), laid
    ((name, offset),) = laid["offsets"]
    assert name == "u"
    for at, shape in (((0, 0), (5, 2)), ((0, 2), (3, 4)), ((3, 2), (2, 4))):  # three blocks, F-order
        block = g[at[0] : at[0] + shape[0], at[1] : at[1] + shape[1]]
        raw.ring.array[: block.nbytes] = np.asfortranarray(block).reshape(-1, order="F").view(np.uint8)
        done = raw.ask(_place(path, laid["tmp"], offset, [5, 6], list(at), list(shape)))
        assert done == {"op": "DONE", "seq": 2, "nbytes": block.nbytes}, done
    assert not path.exists()
    done = raw.ask({"op": "PUBLISH", "seq": 3, "path": str(path), "tmp": laid["tmp"]})
    assert done["op"] == "DONE" and done["nbytes"] == path.stat().st_size
    np.testing.assert_array_equal(read_v73(path)["u"], g)
    with h5py.File(path, "r") as f:
        assert f["u"].shape == (6, 5) and f["u"].attrs["MATLAB_class"] == b"double"
    assert not (root / laid["tmp"]).exists()


def test_discard_removes_the_temporary(setup: tuple[DaemonProc, Raw, Path, Path]) -> None:
    _, raw, root, _ = setup
    laid = _layout(raw, root / "b.mat", [4, 4])
    for _ in range(2):  # gone already is fine
        assert (
            raw.ask({"op": "DISCARD", "seq": 9, "path": str(root / "b.mat"), "tmp": laid["tmp"]})["op"]
            == "DONE"
        )
    assert not [n for n in os.listdir(root) if n.startswith(".b.mat.")]


def test_hostile_shard_messages_are_refused_and_the_daemon_lives(
    setup: tuple[DaemonProc, Raw, Path, Path],
) -> None:
    d, raw, root, outside = setup
    path = root / "c.mat"
    laid = _layout(raw, path, [4, 4])
    tmp, offset = laid["tmp"], laid["offsets"][0][1]
    victim = outside / "victim"
    victim.write_bytes(b"x" * 4096)
    (root / ".c.mat.evil.matspool-tmp").symlink_to(victim)  # a temporary's name, a symlink out
    good = _place(path, tmp, offset, [4, 4], [0, 0], [4, 4])
    bad: list[dict[str, Any]] = [
        {
            "op": "LAYOUT",
            "seq": 1,
            "path": str(path),
            "format": "v4",
            "vars": [{"name": "u", "dtype": "<f8", "dims": [2, 2]}],
        },
        {
            "op": "LAYOUT",
            "seq": 1,
            "path": str(path),
            "format": "v7.3",
            "vars": [{"name": "1u", "dtype": "<f8", "dims": [2, 2]}],
        },
        {
            "op": "LAYOUT",
            "seq": 1,
            "path": str(path),
            "format": "v7.3",
            "vars": [{"name": "u", "dtype": "<f8", "dims": [-1, 2]}],
        },
        {
            "op": "LAYOUT",
            "seq": 1,
            "path": str(path),
            "format": "v7.3",
            "vars": [{"name": "u", "dtype": "O", "dims": [2, 2]}],
        },
        {"op": "LAYOUT", "seq": 1, "path": str(path), "format": "v7.3", "vars": "u"},
        {
            "op": "LAYOUT",
            "seq": 1,
            "path": str(path),
            "format": "v7.3",
            "vars": [{"name": "u", "dtype": "<f8", "dims": [1 << 40, 1 << 40]}],
        },
        {
            "op": "LAYOUT",
            "seq": 1,
            "path": str(outside / "x.mat"),
            "format": "v7.3",
            "vars": [{"name": "u", "dtype": "<f8", "dims": [2, 2]}],
        },
        {**good, "tmp": "../outside/victim"},
        {**good, "tmp": "victim.matspool-tmp"},
        {**good, "tmp": ".other.mat.1.matspool-tmp"},  # not a temporary of c.mat
        {**good, "tmp": ".c.mat.evil.matspool-tmp"},  # a symlink: never followed
        {**good, "tmp": ".c.mat.gone.matspool-tmp"},  # no such temporary: never created
        {**good, "box_offset": [1, 0]},  # 4 rows from row 1 leave a 4x4 array
        {**good, "box_shape": [0, 4]},
        {**good, "dims": [4, 4, 1], "box_offset": [0, 0]},
        {**good, "ring_offset": RING - 8},  # the block would leave the ring
        {**good, "ring_offset": -1},
        {**good, "data_offset": offset + 8},  # the variable would end past the file
        {**good, "data_offset": "0"},
        {**good, "dtype": "<f2"},
        {**good, "imag_offset": offset},  # imaginary parts of a real array
        {
            "op": "LAYOUT",
            "seq": 1,
            "path": str(path),
            "format": "v5",
            "vars": [{"name": "u", "dtype": "<f8", "dims": [1 << 16, 1 << 16]}],  # 32 GiB: not v5
        },
        {**good, "seq": None},
        {k: v for k, v in good.items() if k != "dims"},
        {"op": "PUBLISH", "seq": 5, "path": str(path), "tmp": ".c.mat.evil.matspool-tmp"},
        {"op": "PUBLISH", "seq": 5, "path": str(path), "tmp": tmp, "fsync": "yes"},
        {"op": "DISCARD", "seq": 6, "path": str(path), "tmp": "c.mat"},
        {"op": "LAID_OUT", "seq": 1, "tmp": tmp, "offsets": []},  # a daemon's message
    ]
    for msg in bad:
        reply = raw.ask(msg)
        assert reply["op"] == "ERR", (msg, reply)
        assert reply["message"], reply
    assert d.alive()
    assert victim.read_bytes() == b"x" * 4096
    assert sorted(os.listdir(outside)) == ["victim"]
    assert not path.exists()
    assert raw.ask(good)["op"] == "DONE"  # the honest PLACE still works after all that


@pytest.mark.parametrize("seed", range(20))
def test_runs_put_a_block_where_numpy_slicing_does(seed: int) -> None:
    rng = np.random.default_rng(seed)
    nd = int(rng.integers(2, 5))
    dims = [int(rng.integers(1, 6)) for _ in range(nd)]
    at = [int(rng.integers(0, d)) for d in dims]
    shape = [int(rng.integers(1, d - a + 1)) for d, a in zip(dims, at, strict=True)]
    g = np.zeros(dims, dtype=np.int32, order="F")
    block = rng.integers(1, 100, size=shape).astype(np.int32)
    src = np.asfortranarray(block).reshape(-1, order="F").view(np.uint8)
    flat = g.reshape(-1, order="F").view(np.uint8)  # a view: F-order bytes of g
    for start, s, n in runs(dims, at, shape, 4):
        flat[start : start + n] = src[s : s + n]
    want = np.zeros(dims, dtype=np.int32, order="F")
    want[tuple(slice(a, a + n) for a, n in zip(at, shape, strict=True))] = block
    np.testing.assert_array_equal(g, want)


@pytest.mark.parametrize("seed", range(20))
def test_boxes_tile_a_block_within_the_limit(seed: int) -> None:
    """A block larger than the ring goes in column-major sub-blocks that tile it exactly,
    each within the limit (what one piece of the ring can hold)."""
    rng = np.random.default_rng(100 + seed)
    shape = tuple(int(rng.integers(1, 7)) for _ in range(int(rng.integers(2, 5))))
    limit = int(rng.integers(8, 8 * int(np.prod(shape)) + 9))
    seen = np.zeros(shape, dtype=np.int32)
    for at, size in boxes(shape, 8, limit):
        assert int(np.prod(size)) * 8 <= limit, (at, size, limit)
        seen[tuple(slice(a, a + n) for a, n in zip(at, size, strict=True))] += 1
    assert (seen == 1).all()


def test_a_dead_client_s_laid_out_temporary_is_removed(setup: tuple[DaemonProc, Raw, Path, Path]) -> None:
    """Every rank of a job killed at once: nobody is left to DISCARD. The daemon removes
    the temporaries a client laid out once it finds the client dead."""
    d, _, root, _ = setup
    script = f"""
import json, os, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_sharded_daemon import Raw, _layout
from pathlib import Path
raw = Raw({d.endpoint!r})
print(json.dumps(_layout(raw, Path({str(root / "dead.mat")!r}), [8, 8])), flush=True)
os._exit(0)  # no BYE: a killed process
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, env=env)
    laid = json.loads(out.stdout.strip().splitlines()[-1])
    assert laid["op"] == "LAID_OUT", (laid, out.stderr)
    tmp = root / laid["tmp"]
    deadline = time.monotonic() + 20
    while tmp.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not tmp.exists(), "the dead client's temporary stayed"
    assert not (root / "dead.mat").exists()
