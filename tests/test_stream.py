"""Streams: one v7.3 file that grows by a step per append, readable after every flush."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import h5py
import hdf5storage
import mat73
import numpy as np
import pytest
import torch

import matspool
from matspool._spool import Spool

from conftest import start_daemon


def _step(k: int) -> dict[str, object]:
    return {
        "u": np.arange(12, dtype=np.float32).reshape(3, 4) + k,
        "t": k * 0.5,
        "flags": np.array([k % 2 == 0, True]),
        "z": torch.tensor([1 + 1j * k], dtype=torch.complex64),
    }


def _check(path: Path, steps: int) -> None:
    m = mat73.loadmat(path)
    assert m["u"].shape == (3, 4, steps)
    for k in range(steps):
        np.testing.assert_array_equal(m["u"][:, :, k], np.arange(12, dtype=np.float32).reshape(3, 4) + k)
    h = hdf5storage.loadmat(str(path))
    assert h["u"].shape == (3, 4, steps) and h["u"].dtype == np.float32
    assert h["t"].shape == (1, 1, steps)
    np.testing.assert_array_equal(h["t"].ravel(), np.arange(steps) * 0.5)
    assert h["flags"].dtype == bool and h["flags"].shape == (1, 2, steps)
    np.testing.assert_array_equal(h["z"].ravel(), np.array([1 + 1j * k for k in range(steps)], np.complex64))
    with h5py.File(path) as f:
        assert f["u"].attrs["MATLAB_class"] == b"single"
        assert f["flags"].attrs["MATLAB_class"] == b"logical"
        assert f["flags"].attrs["MATLAB_int_decode"] == 1
        assert f["u"].maxshape[0] is None and f["u"].chunks == (1, 4, 3)
    with open(path, "rb") as f:
        assert f.read(19) == b"MATLAB 7.3 MAT-file"


def test_stream_grows_and_reads_after_every_flush(spool: Spool, out_dir: Path) -> None:
    path = out_dir / "run.mat"
    path.write_bytes(b"an older file is replaced by the first step")
    with spool.stream(path) as s:
        for k in range(6):
            s.append(**_step(k))
            if k in (0, 2):
                s.flush()
                _check(path, k + 1)
    _check(path, 6)
    assert not [p for p in out_dir.iterdir() if p.name.endswith(".matspool-tmp")]


def test_appends_keep_their_order_under_load(spool: Spool, out_dir: Path) -> None:
    path = out_dir / "order.mat"
    with spool.stream(path) as s:
        futures = [s.append(k=np.int64(k), v=np.full((64, 64), k, np.int32)) for k in range(60)]
    assert [f.result().path for f in futures] == [str(path)] * 60
    m = hdf5storage.loadmat(str(path))
    np.testing.assert_array_equal(m["k"].ravel(), np.arange(60))
    assert (m["v"][5, 7, :] == np.arange(60)).all()


def test_v5_stream_is_refused_clearly(spool: Spool, out_dir: Path) -> None:
    with pytest.raises(matspool.FormatLimitError, match="v5 cannot grow a variable"):
        spool.stream(out_dir / "x.mat", format="v5")


def test_a_step_that_does_not_match_fails_and_the_file_keeps_its_steps(spool: Spool, out_dir: Path) -> None:
    path = out_dir / "mismatch.mat"
    s = spool.stream(path)
    s.append(u=np.zeros((3, 4), np.float32))
    s.append(u=np.ones((3, 4), np.float32))
    bad_shape = s.append(u=np.ones((4, 4), np.float32))
    bad_class = s.append(u=np.ones((3, 4), np.float64))
    bad_names = s.append(w=np.ones((3, 4), np.float32))
    with pytest.raises(matspool.WriteFailed, match="'u' is 4x4 single in this step but 3x4 single"):
        bad_shape.result(10)
    with pytest.raises(matspool.WriteFailed, match="double"):
        bad_class.result(10)
    with pytest.raises(matspool.WriteFailed, match=r"\['w'\]"):
        bad_names.result(10)
    with pytest.raises(matspool.FlushError):
        s.close()
    assert mat73.loadmat(path)["u"].shape == (3, 4, 2)
    with pytest.raises(matspool.ProtocolError, match="only numeric arrays"):
        spool.stream(out_dir / "meta.mat").append(p={"a": 1.0})
    with pytest.raises(matspool.ProtocolError, match="empty"):
        spool.stream(out_dir / "empty.mat").append(e=np.zeros((0, 3)))


def test_daemon_killed_between_steps_keeps_every_acknowledged_step(tmp_path: Path, out_dir: Path) -> None:
    d = start_daemon(out_dir, tmp_path / "sock")
    path = out_dir / "crash.mat"
    try:
        with Spool(d.endpoint, ring_bytes=8 << 20, timeout=5) as spool:
            s = spool.stream(path)
            for k in range(4):
                s.append(**_step(k))
            s.flush()
            os.kill(d.proc.pid, signal.SIGKILL)
            d.proc.wait()
            _check(path, 4)  # the file opens and holds every acknowledged step
            d2 = start_daemon(out_dir, tmp_path / "sock")  # a new daemon continues the stream
            try:
                for k in range(4, 6):
                    s.append(**_step(k))
                s.flush(30)
            finally:
                d2.stop()
        _check(path, 6)
    finally:
        d.stop()


def test_steps_keep_their_order_across_daemon_restarts(tmp_path: Path, out_dir: Path) -> None:
    """After a restart the client registers again and re-sends what was unanswered; steps
    appended meanwhile must wait for that, or a later step lands before an earlier one.
    (Found by a CI run of the test above: step 5 written at index 4.)"""
    path = out_dir / "order.mat"
    d = start_daemon(out_dir, tmp_path / "sock")
    k = 0
    try:
        with Spool(d.endpoint, ring_bytes=8 << 20, timeout=10) as spool:
            s = spool.stream(path)
            for _restart in range(3):
                for _ in range(3):
                    s.append(**_step(k))
                    k += 1
                s.flush(30)
                os.kill(d.proc.pid, signal.SIGKILL)
                d.proc.wait()
                d = start_daemon(out_dir, tmp_path / "sock")
                for _ in range(12):  # some go out before the client has noticed the restart
                    s.append(**_step(k))
                    k += 1
                    time.sleep(0.005)
                s.flush(30)
    finally:
        d.stop()
    _check(path, k)
