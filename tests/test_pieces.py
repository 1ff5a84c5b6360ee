"""Variables larger than the ring, and beyond v5's 2 GiB: sent in slabs, written in place."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import mat73
import numpy as np
import pytest
import scipy.io
import torch
import zmq

import matspool
from matspool._protocol import TAG
from matspool._ring import Ring
from matspool._spool import Spool

from conftest import start_daemon


def _vars() -> dict[str, object]:
    rng = np.random.default_rng(5)
    return {
        "x": rng.standard_normal((700, 600)),  # 3.4 MB, slabs of columns
        "c": (rng.standard_normal((200, 300)) + 1j * rng.standard_normal((200, 300))).astype(np.complex64),
        "col": np.arange(300_000, dtype=np.int32),  # 1-d: slabs along its only long axis
        "cube": torch.arange(60 * 70 * 80, dtype=torch.float32).reshape(60, 70, 80),
        "mask": rng.standard_normal((900, 500)) > 0,
        "s": 2.5,
        "meta": {"run": "pieces", "n": 3},
    }


@pytest.mark.parametrize("fmt", ["v5", "v7.3"])
@pytest.mark.parametrize("layout", ["matlab", "raw"])
def test_save_larger_than_the_ring_is_exact(spool: Spool, out_dir: Path, fmt: str, layout: str) -> None:
    values = _vars()
    total = sum(np.asarray(v).nbytes for v in values.values() if not isinstance(v, dict | float))
    with Spool(spool.endpoint, ring_bytes=1 << 20, timeout=30) as small:
        assert total > 6 * small._ring.size
        fut = small.save(out_dir / "big.mat", values, format=fmt, layout=layout, oned_as="column")
        res = fut.result(60)
        assert small._ring.used == 0 and small.pending == 0
    assert res.nbytes == os.path.getsize(out_dir / "big.mat")

    def expect(v: object) -> np.ndarray:
        a = np.asarray(v)
        return a.T if layout == "raw" and a.ndim > 1 else a

    if fmt == "v5":
        m = scipy.io.loadmat(out_dir / "big.mat")
        assert m["col"].shape == (300_000, 1)
        for name in ("x", "c", "cube", "mask"):
            got, want = m[name], expect(values[name])
            assert got.shape == want.shape, name
            np.testing.assert_array_equal(got, want.astype(got.dtype), err_msg=name)
        assert m["meta"]["run"][0, 0][0] == "pieces"
    else:
        m = mat73.loadmat(out_dir / "big.mat")
        for name in ("x", "c", "cube", "mask", "col"):
            np.testing.assert_array_equal(m[name], expect(values[name]).squeeze(), err_msg=name)
        assert m["meta"]["run"] == "pieces"
        with h5py.File(out_dir / "big.mat") as f:
            assert f["mask"].attrs["MATLAB_class"] == b"logical"
            assert f["c"].dtype.names == ("real", "imag")
    assert [p.name for p in out_dir.iterdir()] == ["big.mat"]


def test_over_2gib_goes_to_v73_under_auto_through_a_smaller_ring(spool: Spool, out_dir: Path) -> None:
    n = (2**31 // 4) + 4096  # float32: just over 2 GiB, made without 2 GiB of memory
    column = np.arange(4096, dtype=np.float32)
    huge = np.broadcast_to(column, (n // 4096, 4096)).T  # MATLAB: 4096 x 131073
    with Spool(spool.endpoint, ring_bytes=256 << 20, timeout=120) as s:
        with pytest.raises(matspool.FormatLimitError):
            s.save(out_dir / "huge5.mat", {"huge": huge}, format="v5")
        res = s.save(out_dir / "huge.mat", {"huge": huge}).result(600)
    assert res.format == "v7.3"
    with h5py.File(out_dir / "huge.mat") as f:
        d = f["huge"]
        assert d.shape == (n // 4096, 4096) and d.attrs["MATLAB_class"] == b"single"
        for row in (0, 1, n // 8192, n // 4096 - 1):
            np.testing.assert_array_equal(d[row], column)
    os.unlink(out_dir / "huge.mat")


def test_a_slab_that_cannot_fit_is_refused_before_anything_moves(spool: Spool, out_dir: Path) -> None:
    with Spool(spool.endpoint, ring_bytes=1 << 16) as small:
        with pytest.raises(matspool.PayloadTooLarge, match="ring of at least"):
            small.save(out_dir / "wide.mat", {"w": np.zeros((1 << 14, 3))})
        assert small.pending == 0 and small._ring.used == 0
    assert list(out_dir.iterdir()) == []


_KILLED_CLIENT = textwrap.dedent("""
    import sys, numpy as np, matspool
    spool = matspool.Spool(sys.argv[1], ring_bytes=1 << 20, timeout=60)
    print("READY", flush=True)
    spool.save(sys.argv[2], {"x": np.ones((4096, 4096))})  # 128 MiB through 1 MiB: blocks a while
""")


def test_client_killed_midway_leaves_no_file(tmp_path: Path, out_dir: Path) -> None:
    d = start_daemon(out_dir, tmp_path / "sock", "--debug-write-delay", "0.05")
    try:
        p = subprocess.Popen(
            [sys.executable, "-c", _KILLED_CLIENT, d.endpoint, str(out_dir / "k.mat")],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert p.stdout.readline().strip() == "READY"
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not list(out_dir.glob(".k.mat*")):
            time.sleep(0.05)
        assert list(out_dir.glob(".k.mat*")), "the save never began"
        p.kill()
        p.wait()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and list(out_dir.iterdir()):
            time.sleep(0.2)
        assert list(out_dir.iterdir()) == [], "a partial or temporary file stayed behind"
        assert d.alive()
    finally:
        d.stop()


def test_daemon_killed_midway_fails_the_save(tmp_path: Path, out_dir: Path) -> None:
    d = start_daemon(out_dir, tmp_path / "sock", "--debug-write-delay", "0.05")
    try:
        with Spool(d.endpoint, ring_bytes=1 << 20, timeout=3, heartbeat=0.2) as s:
            kill = f"import time, os, signal; time.sleep(1.0); os.kill({d.proc.pid}, signal.SIGKILL)"
            killer = subprocess.Popen([sys.executable, "-c", kill])
            with pytest.raises((matspool.SpoolFull, matspool.DaemonUnavailable)):
                s.save(out_dir / "d.mat", {"x": np.ones((2048, 2048))}).result(30)
            killer.wait()
        assert not (out_dir / "d.mat").exists()
    finally:
        d.stop()


def test_hostile_pieces_are_refused(spool: Spool, daemon, out_dir: Path) -> None:
    ring = Ring(1 << 20)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(daemon.endpoint)

    def ask(msg: dict) -> dict | None:
        sock.send_multipart([TAG, json.dumps(msg).encode()])
        return json.loads(sock.recv_multipart()[1]) if sock.poll(5000) else None

    try:
        hello = {"op": "HELLO", "ring": ring.name, "ring_bytes": ring.size, "pid": os.getpid()}
        if ring.kind == "memfd":  # a sealed memfd ring is opened through /proc/<pid>/fd/<fd>
            hello["fd"] = ring.fd
        assert ask(hello)["op"] == "WELCOME"
        part = {"op": "PART", "seq": 7, "var": 0, "start": 0, "offset": 0, "nbytes": 8}
        assert ask(part)["code"] == "protocol"
        assert ask({"op": "END", "seq": 7})["code"] == "protocol"
        big = {
            "name": "x",
            "dtype": "<f8",
            "dims": [1000, 1000],
            "offset": 0,
            "nbytes": 8_000_000,
            "deferred": True,
        }
        assert (
            ask(
                {
                    "op": "WRITE",
                    "seq": 1,
                    "path": str(out_dir / "h.mat"),
                    "format": "v5",
                    "fsync": False,
                    "vars": [big],
                }
            )["code"]
            == "protocol"
        )  # deferred needs mode begin
        bad = dict(big, nbytes=8)
        assert (
            ask(
                {
                    "op": "WRITE",
                    "seq": 2,
                    "path": str(out_dir / "h.mat"),
                    "format": "v5",
                    "fsync": False,
                    "mode": "begin",
                    "vars": [bad],
                }
            )["code"]
            == "protocol"
        )
        sock.send_multipart(
            [
                TAG,
                json.dumps(
                    {
                        "op": "WRITE",
                        "seq": 3,
                        "path": str(out_dir / "h.mat"),
                        "format": "v7.3",
                        "fsync": False,
                        "mode": "begin",
                        "vars": [big],
                    }
                ).encode(),
            ]
        )
        assert json.loads(sock.recv_multipart()[1]) == {"op": "PART_DONE", "seq": 3, "offset": None}
        past_ring = {"op": "PART", "seq": 3, "var": 0, "start": 0, "offset": ring.size - 8, "nbytes": 64}
        assert ask(past_ring)["code"] == "protocol"
        # a piece past the variable's end fails the save, and END says so; nothing is published
        reply = ask({"op": "PART", "seq": 3, "var": 0, "start": 8_000_000 - 8, "offset": 0, "nbytes": 64})
        assert reply["op"] == "ERR" and reply["seq"] == 3 and "does not fit" in reply["message"]
        assert ask({"op": "END", "seq": 3})["op"] == "ERR"
        assert not (out_dir / "h.mat").exists() and list(out_dir.iterdir()) == []
        assert daemon.alive()
    finally:
        sock.close()
        ring.close()
