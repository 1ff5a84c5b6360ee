"""The small-save fast path (matspool._quick): a repeated plain save of small ndarrays is
copied and queued from the entry an earlier save left, and must write exactly what the
general path writes. Any save that differs from the entry (path aside) takes the general
path, and every check a save makes still happens on the fast one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fakedaemon import FakeDaemon, ZmqFake

import matspool
from matspool import _quick, _wirebin
from matspool._errors import InvalidOptionError, SpoolClosed, SpoolFull
from matspool._link import Encoded
from matspool._planner import plan
from matspool._protocol import WriteRequest

from conftest import DaemonProc
from readback import assert_variables, read


class Spy:
    """Counts the saves ``_quick.save`` took (a future) and handed back (None)."""

    def __init__(self) -> None:
        self.fast = self.general = 0

    def __call__(self, *args: Any) -> Any:
        out = _QUICK_SAVE(*args)
        if out is None:
            self.general += 1
        else:
            self.fast += 1
        return out


_QUICK_SAVE = _quick.save


@pytest.fixture
def spy(monkeypatch: pytest.MonkeyPatch) -> Iterator[Spy]:
    s = Spy()
    monkeypatch.setattr(_quick, "save", s)
    yield s


@pytest.fixture
def qspool(mdaemon: DaemonProc) -> Iterator[matspool.Spool]:
    """A spool of its own: its entries start empty."""
    with matspool.Spool(mdaemon.endpoint, ring_bytes=4 << 20, timeout=30) as s:
        yield s


def _matlab(values: dict[str, Any]) -> dict[str, np.ndarray]:
    """What a reader gets back: 0-d and 1-d as rows, in native byte order, copied now."""
    out = {}
    for k, v in values.items():
        a = np.asarray(v)
        a = a.reshape(1, -1) if a.ndim == 1 else a.reshape(1, 1) if a.ndim == 0 else a
        out[k] = np.array(a, dtype=a.dtype.newbyteorder("="), copy=True)
    return out


def _step(rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        "u": rng.standard_normal((32, 32)).astype(np.float32),  # C order: transposed into the ring
        "f": np.asfortranarray(rng.standard_normal((3, 5))),  # already column-major
        "v": rng.integers(-9, 9, 7).astype(np.int16),  # 1-d: a row
        "b": rng.random((2, 3)) > 0.5,
        "z": (rng.standard_normal((2, 2)) + 1j).astype(np.complex64),
        "s": np.array(2.5),  # 0-d
        "e": np.zeros((0, 3)),  # empty
        "w": rng.standard_normal((8, 12))[::2, ::3],  # strided view
        "be": rng.standard_normal((2, 3)).astype(">f8"),  # big-endian: a cast into the ring
    }


@pytest.mark.parametrize("fmt", ["v5", "v7.3"])
def test_repeated_saves_take_the_fast_path_and_write_exactly(
    qspool: matspool.Spool, root: Path, spy: Spy, fmt: str
) -> None:
    rng = np.random.default_rng(14)
    sent = []
    for i in range(12):
        values = _step(rng)
        sent.append(_matlab(values))
        qspool.save(root / f"s{i:02d}.mat", values, format=fmt)
    qspool.flush()
    # the first makes the template (unless an earlier test did), the second the entry
    assert spy.fast >= 10 and spy.fast + spy.general == 12
    for i, values in enumerate(sent):
        assert_variables(read(root / f"s{i:02d}.mat", fmt), values, f"save {i}")


def _differs(x: np.ndarray) -> dict[str, tuple[dict[str, Any], dict[str, Any]]]:
    """Saves that differ from ``{"x": x}`` in one respect: variables and save() options."""
    return {
        "dtype": ({"x": x.astype(np.float64)}, {}),
        "byte order": ({"x": x.astype(">f4")}, {}),
        "shape": ({"x": x.reshape(4, 6).copy()}, {}),
        "transposed shape": ({"x": x.T.copy()}, {}),
        "strides (F order)": ({"x": np.asfortranarray(x)}, {}),
        "strides (a view)": ({"x": np.repeat(x, 2, axis=1)[:, ::2]}, {}),
        "name": ({"y": x}, {}),
        "one more name": ({"x": x, "y": x}, {}),
        "a subclass": ({"x": x.view(np.ma.MaskedArray)}, {}),
        "a list": ({"x": x.tolist()}, {}),
        "layout": ({"x": x}, {"layout": "raw"}),
        "format": ({"x": x}, {"format": "v7.3"}),
        "compress": ({"x": x}, {"compress": True}),
        "int_as": ({"x": x}, {"int_as": "double"}),
        "append": ({"x": x}, {"append": True}),
    }


@pytest.mark.parametrize("case", sorted(_differs(np.zeros((6, 4), np.float32))))
def test_a_repeat_that_differs_takes_the_general_path(
    qspool: matspool.Spool, root: Path, spy: Spy, case: str
) -> None:
    rng = np.random.default_rng(15)
    x = rng.standard_normal((6, 4)).astype(np.float32)
    for i in range(3):  # template, entry, fast
        qspool.save(root / f"a{i}.mat", {"x": x + i}).result(30)
    assert spy.fast >= 1
    variables, options = _differs(x)[case]
    if options.get("append"):
        qspool.save(root / "b.mat", {"keep": np.ones(2)}).result(30)
    spy.fast = spy.general = 0
    fut = qspool.save(root / "b.mat", variables, **options)
    fut.result(30)
    assert spy.fast == 0, f"{case}: a save that differs took the fast path"
    fmt = options.get("format", "v5")
    got = read(root / "b.mat", fmt)
    want = _matlab(variables)
    if options.get("layout") == "raw":
        want = {"x": x.T}
    if options.get("append"):
        want["keep"] = np.ones((1, 2))
    assert_variables(got, want, case)
    # and the entry still serves the saves it was made for
    qspool.save(root / "c.mat", {"x": x - 1}).result(30)
    assert spy.fast == 1
    assert_variables(read(root / "c.mat", "v5"), {"x": x - 1})


def test_every_path_is_checked_on_the_fast_path(
    qspool: matspool.Spool, root: Path, spy: Spy, monkeypatch: pytest.MonkeyPatch
) -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    for i in range(2):
        qspool.save(root / f"w{i}.mat", {"x": x}).result(30)
    monkeypatch.chdir(root)
    sub = root / "sub"
    sub.mkdir()
    spellings = {
        "relative.mat": root / "relative.mat",
        str(sub) + "//double.mat": sub / "double.mat",
        str(sub) + "/./dot.mat": sub / "dot.mat",
        str(sub) + "/../up.mat": root / "up.mat",
        sub / "pathlike.mat": sub / "pathlike.mat",
        os.fsencode(str(sub / "bytes.mat")): sub / "bytes.mat",
    }
    spy.fast = spy.general = 0
    for n, (given, where) in enumerate(spellings.items()):
        r = qspool.save(given, {"x": x + n}).result(30)  # type: ignore[arg-type]
        assert r.path == str(where), given
        assert_variables(read(where, "v5"), {"x": x + n}, str(given))
    assert spy.fast == len(spellings)
    with pytest.raises(ValueError, match="NUL"):
        qspool.save(str(root / "a\x00.mat"), {"x": x})
    with pytest.raises(ValueError, match="non-empty"):
        qspool.save("", {"x": x})
    with pytest.raises(ValueError, match="UTF-8"):
        qspool.save(str(root) + "/\udcff.mat", {"x": x})
    with pytest.raises(TypeError, match="path must be a str"):
        qspool.save(5, {"x": x})  # type: ignore[arg-type]


def test_every_other_check_still_happens_on_the_fast_path(mdaemon: DaemonProc, root: Path, spy: Spy) -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    spool = matspool.Spool(mdaemon.endpoint, ring_bytes=1 << 20, timeout=30)
    for i in range(3):
        spool.save(root / f"w{i}.mat", {"x": x}).result(30)
    assert spy.fast >= 1
    with pytest.raises(TypeError, match="fsync must be a bool"):
        spool.save(root / "f.mat", {"x": x}, fsync=1)  # type: ignore[arg-type]
    with pytest.raises(InvalidOptionError, match="format"):
        spool.save(root / "f.mat", {"x": x}, format="v4")
    with pytest.raises(ValueError, match="compress"):
        spool.save(root / "f.mat", {"x": x}, compress=12)
    with pytest.raises(InvalidOptionError, match="layout"):
        spool.save(root / "f.mat", {"x": x}, layout="nope")
    with pytest.raises(TypeError, match="append must be a bool"):
        spool.save(root / "f.mat", {"x": x}, append=0)  # type: ignore[arg-type]
    assert not (root / "f.mat").exists()
    spool.save(root / "fsync.mat", {"x": x}, fsync=True).result(30)  # fsync is the WRITE's, per save
    spool.close()
    with pytest.raises(SpoolClosed):
        spool.save(root / "closed.mat", {"x": x})


def test_the_fast_path_sends_what_the_general_path_encodes(
    qspool: matspool.Spool, root: Path, spy: Spy
) -> None:
    """Byte for byte: the fast path's WRITE is ``_wirebin.encode_write`` of the request the
    general path builds for the same save at the same place in the ring."""
    rng = np.random.default_rng(16)
    values = _step(rng)
    for i in range(2):
        qspool.save(root / f"w{i}.mat", values).result(30)
    link = qspool._link
    assert link is not None
    caught: list[tuple[int, list[Any], Any]] = []
    real = link.queue

    def catch(op: str, seq: int, frames: list[Any], lease: Any) -> None:
        if op == "WRITE":
            caught.append((seq, frames, lease))
        real(op, seq, frames, lease)

    link.queue = catch  # type: ignore[method-assign]
    spy.fast = spy.general = 0
    try:
        for fsync in (False, True):
            path = root / f"enc{fsync}.mat"
            qspool.save(path, values, fsync=fsync).result(30)
            seq, frames, lease = caught[-1]
            p = plan(path, values, "v5", "matlab", "row", fsync, 0, "write", qspool._ring.size)  # type: ignore[union-attr]
            request = WriteRequest(seq, p.path, p.format, fsync, tuple(p.specs(lease.offset)), 0)
            assert frames[1] == _wirebin.encode_write(request)
    finally:
        del link.queue
    assert len(caught) == 2 and spy.fast == 2  # both WRITEs were the fast path's


def test_a_daemon_that_reads_json_only_gets_no_fast_saves(tmp_path: Path, spy: Spy) -> None:
    endpoint = f"ipc://{tmp_path}/d.sock"
    fake = ZmqFake(FakeDaemon(binwrite=False), endpoint)
    try:
        with matspool.Spool(endpoint, ring_bytes=1 << 20, timeout=30) as spool:
            x = np.arange(6.0).reshape(2, 3)
            for i in range(4):
                spool.save(f"/data/{i}.mat", {"x": x + i}).result(30)
            assert not spool._quick and spy.fast == 0
        assert fake.binary == 0
        for i in range(4):
            assert fake.daemon.files[f"/data/{i}.mat"]["x"] == (x + i).tobytes(order="F")
    finally:
        fake.close()


def test_a_full_ring_sends_the_save_the_general_way(mdaemon: DaemonProc, root: Path, spy: Spy) -> None:
    """No room now: the fast path never waits; the general path raises (on_full="raise")
    or waits (on_full="block") as it always did."""
    x = np.ones((64, 64))  # 32 KiB: a 64 KiB ring holds one at a time
    for on_full in ("raise", "block"):
        with matspool.Spool(mdaemon.endpoint, ring_bytes=64 << 10, on_full=on_full, timeout=30) as spool:
            for i in range(3):
                spool.save(root / f"{on_full}{i}.mat", {"x": x * i}).result(30)
            spy.fast = spy.general = 0
            futures = []
            try:
                for i in range(40):
                    futures.append(spool.save(root / f"{on_full}-b{i}.mat", {"x": x + i}))
            except SpoolFull:
                assert on_full == "raise"
            else:
                assert on_full == "block"
            assert spy.general >= 1 or len(futures) == 40
            for i, f in enumerate(futures):
                f.result(30)
                assert_variables(read(root / f"{on_full}-b{i}.mat", "v5"), {"x": x + i})


def test_fast_saves_are_encoded_for_the_copy_queue_behind_a_queued_copy(
    qspool: matspool.Spool, root: Path
) -> None:
    """A WRITE queued behind a copy still running (a CUDA copy, a host reorder) waits its
    turn: the fast path hands it to the copy pipeline, which sends it after."""
    x = np.arange(20.0).reshape(4, 5)
    for i in range(2):
        qspool.save(root / f"w{i}.mat", {"x": x}).result(30)
    copies = qspool._copies
    assert copies is not None
    sent: list[Any] = []
    real = copies._send

    def record(message: Any, lease: Any = None) -> None:
        sent.append(message)
        real(message, lease)

    copies._send = record
    copies._queued += 1  # as if a copy were queued
    try:
        fut = qspool.save(root / "q.mat", {"x": x * 2})
    finally:
        copies._queued -= 1
    fut.result(30)
    assert len(sent) == 1 and type(sent[0]) is Encoded
    assert_variables(read(root / "q.mat", "v5"), {"x": x * 2})


_TENSOR_CASES = ["float16", "float32", "float64", "complex64", "complex128", "int8", "int16", "int32"]
_TENSOR_CASES += ["int64", "uint8", "bool", "strided", "transposed", "grad", "scalar", "row"]


def _tensor(torch: Any, case: str, seed: int) -> Any:
    g = torch.Generator().manual_seed(seed)
    if case == "bool":
        return torch.rand((5, 3), generator=g) > 0.5
    if case in ("complex64", "complex128"):
        return torch.randn((4, 3), dtype=getattr(torch, case), generator=g)
    base = torch.randn((6, 8), generator=g) * 50
    return {
        "strided": lambda: base[::2, 1::3],
        "transposed": lambda: base.t(),
        "grad": lambda: base.clone().requires_grad_(True),
        "scalar": lambda: base[0, 0].clone(),
        "row": lambda: base[0].clone(),
    }.get(case, lambda: base.to(getattr(torch, case)))()


@pytest.mark.parametrize("fmt", ["v5", "v7.3"])
@pytest.mark.parametrize("case", _TENSOR_CASES)
def test_small_tensors_go_fast_as_their_arrays(
    qspool: matspool.Spool, root: Path, spy: Spy, case: str, fmt: str
) -> None:
    """A small plain CPU tensor is saved as its ndarray view (``_quick.host_view``): the
    repeat takes the fast path, and every file is byte for byte the file of the same
    values saved as an ndarray (v7.3: the same values read back by h5py; its file holds
    h5py's time stamps)."""
    torch = pytest.importorskip("torch")
    fast = 0
    for i in range(3):  # template, entry, fast
        t = _tensor(torch, case, i)
        before = spy.fast
        qspool.save(root / f"t{i}.mat", {"x": t}, format=fmt).result(30)
        fast += spy.fast - before  # the tensor's own saves (the arrays below take it too)
        qspool.save(root / f"a{i}.mat", {"x": t.detach().numpy().copy()}, format=fmt).result(30)
        t.detach().mul_(0) if t.dtype is not torch.bool else t.detach().logical_not_()  # after the save
        if fmt == "v5":
            assert (root / f"t{i}.mat").read_bytes()[128:] == (root / f"a{i}.mat").read_bytes()[128:], case
        assert_variables(read(root / f"t{i}.mat", fmt), read(root / f"a{i}.mat", fmt), case)
    assert fast >= 1, f"{case}: the repeated tensor saves never took the fast path"


def test_tensors_the_fast_path_does_not_take_still_save(qspool: matspool.Spool, root: Path, spy: Spy) -> None:
    """bfloat16, a conjugate view, an nn.Parameter and a tensor over 64 KiB go the long way
    (``host_view`` returns None), and read back as they were."""
    torch = pytest.importorskip("torch")
    z = torch.randn((3, 2), dtype=torch.complex64)
    big = torch.randn((129, 128))  # 66,048 bytes
    cases = {
        "bf16": (torch.ones((2, 3), dtype=torch.bfloat16), np.ones((2, 3), np.float32)),
        "conj": (z.conj(), z.conj().resolve_conj().numpy()),
        "param": (torch.nn.Parameter(torch.ones(2, 2)), np.ones((2, 2), np.float32)),
        "big": (big, big.numpy()),
    }
    for name, (t, want) in cases.items():
        assert _quick.host_view(t) is None, name
        for i in range(3):
            qspool.save(root / f"{name}{i}.mat", {"x": t}).result(30)
        got = read(root / f"{name}2.mat", "v5")["x"]
        assert got.shape == want.shape and np.array_equal(got.astype(want.dtype), want), name
    assert spy.fast == 0
