"""The README's GPU claims, each asserted so that it fails when the claim is false (issue 16).

- the caller's stream is not synchronized by ``save()``, and back-to-back saves delay it by
  about a ``clone()`` each (the D2H runs on matspool's own copy stream);
- a tensor overwritten at once after ``save()`` is saved with its old values, for whole,
  chunked (over the staging budget, or after an OOM) and slab saves;
- no raw OOM out of ``save()``; ``save()`` during graph capture raises ``CudaCaptureError``;
  inside ``torch.compile`` it runs eagerly;
- a failed start leaves no copy running into freed ring space;
- the ring is page-locked lazily, once, from the saving device, with a pageable fallback;
- the copy thread does not spin; ``stream=``; ``close()`` is bounded behind a stuck stream;
  complex32 and uint16/32/64 tensors.

Skipped cleanly where CUDA is not available. Nothing here has run on a GPU yet.
"""

from __future__ import annotations

import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import matspool  # noqa: E402
from matspool import _cuda  # noqa: E402

from readback import assert_exact, read  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

MiB = 1 << 20


_cycles_per_ms: dict[int, float] = {}


def _sleep_ms(ms: float) -> None:
    """Queue a kernel that keeps the current stream busy for about ``ms`` milliseconds
    (``torch.cuda._sleep`` counts clock cycles: calibrated once per device)."""
    dev = torch.cuda.current_device()
    if dev not in _cycles_per_ms:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(1_000_000)  # warm-up
        a.record()
        torch.cuda._sleep(50_000_000)
        b.record()
        b.synchronize()
        _cycles_per_ms[dev] = 50_000_000 / max(a.elapsed_time(b), 1e-3)
    torch.cuda._sleep(int(ms * _cycles_per_ms[dev]))


@pytest.fixture
def fresh(mdaemon: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A spool of its own per test (a copier, budget and registration of its own)."""
    spools: list[matspool.Spool] = []

    def make(ring: int = 160 * MiB, staging: int | None = None) -> matspool.Spool:
        if staging is not None:
            monkeypatch.setenv(_cuda.STAGING_ENV, str(staging))
        s = matspool.Spool(mdaemon.endpoint, ring_bytes=ring, timeout=60)
        spools.append(s)
        return s

    yield make
    for s in spools:
        try:
            s.close()
        except matspool.MatspoolError:
            pass


def _spy_chunked(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the device groups that went through the chunked path."""
    calls: list[int] = []
    chunked = _cuda.CudaCopier._chunked

    def spy(self: Any, *a: Any) -> None:
        calls.append(1)
        chunked(self, *a)

    monkeypatch.setattr(_cuda.CudaCopier, "_chunked", spy)
    return calls


def _copier(spool: matspool.Spool) -> Any:
    return spool._copies._copier  # type: ignore[union-attr]


# -- item 2: the caller's stream waits on the GPU only -------------------------------------
def test_save_does_not_synchronize_the_caller(fresh: Any, mdaemon: Any) -> None:
    spool = fresh()
    u = torch.randn(1024, 1024, device="cuda")
    torch.cuda.synchronize()
    _sleep_ms(200)
    fut = spool.save(mdaemon.root / "nosync.mat", {"u": u})
    assert not torch.cuda.current_stream().query(), "save() synchronized the caller's stream"
    want = u.cpu().numpy()
    fut.result(60)
    assert_exact(read(mdaemon.root / "nosync.mat", "v5")["u"], want)


def test_copy_stream_is_matspools_own(fresh: Any, mdaemon: Any) -> None:
    spool = fresh()
    user = torch.cuda.Stream()
    with torch.cuda.stream(user):
        spool.save(mdaemon.root / "own.mat", {"u": torch.ones(10, device="cuda")}).result(60)
        copy = _copier(spool)._streams[torch.cuda.current_device()][0]
        assert copy != torch.cuda.current_stream() and copy != torch.cuda.default_stream()
        assert copy != user


def _segment_ms(work: Any) -> float:
    """GPU time of ``work``'s queue on the current stream, launch gaps hidden behind a sleep."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    _sleep_ms(300)  # the host queues all of ``work`` while the stream still sleeps
    start.record()
    work()
    end.record()
    end.synchronize()
    return float(start.elapsed_time(end))


@pytest.mark.parametrize("n", [1, 3, 10])
def test_back_to_back_saves_delay_the_caller_like_clones(fresh: Any, mdaemon: Any, n: int) -> None:
    """n saves of 12 MiB in one step: the caller's stream is delayed by the snapshots only,
    not by the D2H of the saves before (12 MiB over PCIe is ~50x its on-GPU copy)."""
    spool = fresh()
    xs = [torch.randn(3 * MiB, device="cuda") for _ in range(n)]
    spool.save(mdaemon.root / "warm.mat", {"x": xs[0]}).result(60)  # streams, pinning, kernels
    spool.flush(60)
    keep: list[Any] = []
    clones_ms = _segment_ms(lambda: keep.extend(x.clone() for x in xs))
    futs: list[Any] = []
    saves_ms = _segment_ms(
        lambda: futs.extend(
            spool.save(mdaemon.root / f"b2b{n}_{i}.mat", {"x": x}, format="v7.3") for i, x in enumerate(xs)
        )
    )
    for f in futs:
        f.result(60)
    print(f"\n{n} saves: caller stream {saves_ms:.3f} ms; {n} clones {clones_ms:.3f} ms")
    assert saves_ms <= 3 * clones_ms + 0.03 * n, (saves_ms, clones_ms)


# -- item 3: the snapshot promise for whole, chunked and slab saves; no raw OOM --------------
def _overwritten_after_save(spool: matspool.Spool, path: Path, x: Any, **kw: Any) -> None:
    """Save ``x`` while the stream is busy, overwrite it at once, compare the file exactly."""
    want = x.detach().cpu()
    want = (want.float() if want.dtype in (torch.float16, torch.bfloat16) else want).numpy()
    if want.ndim == 1:
        want = want.reshape(1, -1)  # oned_as="row"
    torch.cuda.synchronize()
    _sleep_ms(100)
    fut = spool.save(path, {"x": x}, format="v7.3", **kw)
    x.fill_(-7)  # queued right after save() returned: must not reach the file
    fut.result(120)
    assert_exact(read(path, "v7.3")["x"], want)


def test_overwrite_after_whole_save(fresh: Any, mdaemon: Any) -> None:
    spool = fresh()
    x = torch.randn(512, 768, device="cuda")
    _overwritten_after_save(spool, mdaemon.root / "whole.mat", x)
    assert _copier(spool).inflight(torch.cuda.current_device()) == 0


@pytest.mark.parametrize("case", ["contiguous", "permuted_half", "row_longer_than_chunk"])
def test_overwrite_after_chunked_save(
    fresh: Any, mdaemon: Any, case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 4 MiB budget (2 x 2 MiB staging): 24-48 MiB saves stream through it in chunks."""
    spool = fresh(staging=4 * MiB)
    calls = _spy_chunked(monkeypatch)
    if case == "contiguous":
        x = torch.randn(3000, 4000, device="cuda")
    elif case == "permuted_half":
        x = torch.randn(6, 2000, 1000, device="cuda").half().permute(1, 2, 0)
    else:
        x = torch.randn(4 * MiB, 2, device="cuda")  # one MATLAB column is 16 MiB: split inside it
    _overwritten_after_save(spool, mdaemon.root / f"chunked_{case}.mat", x)
    assert calls, "the save was not chunked"


def test_overwrite_after_slab_save(fresh: Any, mdaemon: Any) -> None:
    spool = fresh(ring=16 * MiB)
    x = torch.randn(64, 1024, 256, device="cuda")  # 64 MiB through a 16 MiB ring
    _overwritten_after_save(spool, mdaemon.root / "slabs.mat", x)


def test_oom_falls_back_to_chunks(fresh: Any, mdaemon: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """With room for less than the snapshot, the save still succeeds (chunked), exactly."""
    spool = fresh(staging=1 << 40)  # the budget never sends it to chunks: only the OOM does
    calls = _spy_chunked(monkeypatch)
    x = torch.randn(64 * MiB // 4, device="cuda")
    spool.save(mdaemon.root / "warm_oom.mat", {"s": torch.ones(3, device="cuda")}).result(60)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    total = torch.cuda.mem_get_info()[1]
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved() + 40 * MiB) / total)
    try:
        _overwritten_after_save(spool, mdaemon.root / "oom.mat", x)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert calls, "no OOM fallback happened"


def test_no_raw_oom_out_of_save(fresh: Any, mdaemon: Any) -> None:
    spool = fresh(staging=1 << 40)
    x = torch.randn(8 * MiB // 4, device="cuda")
    spool.save(mdaemon.root / "warm_oom2.mat", {"s": torch.ones(3, device="cuda")}).result(60)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    total = torch.cuda.mem_get_info()[1]
    torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved() + 256 * 1024) / total)
    try:
        with pytest.raises(matspool.CudaError, match="staging memory"):
            spool.save(mdaemon.root / "oom_raw.mat", {"x": x})
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert spool._ring.used == 0
    spool.save(mdaemon.root / "after_oom.mat", {"x": x}).result(60)  # nothing wedged


# -- item 4: graphs and compile ------------------------------------------------------------
def test_save_during_graph_capture_raises(fresh: Any, mdaemon: Any) -> None:
    spool = fresh()
    x = torch.ones(16, device="cuda")
    spool.save(mdaemon.root / "warm_graph.mat", {"x": x}).result(60)
    g = torch.cuda.CUDAGraph()
    y = x * 2  # warm-up outside capture
    # torch.cuda.graph captures on a side stream of its own
    with pytest.raises(matspool.CudaCaptureError, match="graph capture"), torch.cuda.graph(g):
        y = x * 2
        spool.save(mdaemon.root / "captured.mat", {"y": y})
    x.fill_(3)
    g.replay()  # the capture itself was left intact
    torch.cuda.synchronize()
    assert torch.equal(y, x * 2)
    assert spool.pending == 0 and spool._ring.used == 0
    spool.save(mdaemon.root / "after_graph.mat", {"y": y}).result(60)


def test_save_inside_compiled_function(fresh: Any, mdaemon: Any) -> None:
    import torch._dynamo

    spool = fresh()
    futs: list[Any] = []

    @torch.compile(backend="eager")
    def step(x: Any) -> Any:
        y = torch.sin(x) * 3
        futs.append(spool.save(mdaemon.root / "compiled_gpu.mat", {"y": y}))
        return y + 1

    x = torch.randn(100, 37, device="cuda")
    out = step(x)
    assert torch.allclose(out, torch.sin(x) * 3 + 1)
    futs[0].result(60)
    assert_exact(read(mdaemon.root / "compiled_gpu.mat", "v5")["y"], (torch.sin(x) * 3).cpu().numpy())
    torch._dynamo.reset()


# -- item 5: a failed start frees nothing a copy still writes into -------------------------
def test_failed_start_drains_queued_chunks(fresh: Any, mdaemon: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C after some chunks' D2H were queued behind a busy stream: save() raises only
    once they ended, the ring is free again and the next save works."""
    spool = fresh(staging=4 * MiB)
    x = torch.randn(8 * MiB, device="cuda")  # 32 MiB: 16 chunks of 2 MiB
    spool.save(mdaemon.root / "warm_fail.mat", {"x": x[:10]}).result(60)
    split = _cuda._split

    def interrupted(src: Any, limit: int, start: int = 0) -> Any:
        for k, piece in enumerate(split(src, limit, start)):
            if k == 3:
                raise KeyboardInterrupt
            yield piece

    monkeypatch.setattr(_cuda, "_split", interrupted)
    torch.cuda.synchronize()
    _sleep_ms(300)
    with pytest.raises(KeyboardInterrupt):
        spool.save(mdaemon.root / "interrupted.mat", {"x": x})
    copy = _copier(spool)._streams[torch.cuda.current_device()][0]
    assert copy.query(), "save() raised while a copy into its region was still queued"
    assert spool._ring.used == 0
    monkeypatch.setattr(_cuda, "_split", split)
    want = x.cpu().numpy()
    spool.save(mdaemon.root / "after_fail.mat", {"x": x}).result(60)
    assert_exact(read(mdaemon.root / "after_fail.mat", "v5")["x"], want.reshape(1, -1))


def test_failed_second_device_drains_the_first(
    fresh: Any, mdaemon: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices (multi-device save failing on the second)")
    spool = fresh()
    a0 = torch.randn(4 * MiB, device="cuda:0")
    a1 = torch.randn(4 * MiB, device="cuda:1")
    spool.save(mdaemon.root / "warm2.mat", {"a0": a0[:4], "a1": a1[:4]}).result(60)
    whole = _cuda.CudaCopier._whole

    def fail_on_1(self: Any, index: int, *a: Any) -> None:
        if index == 1:
            raise KeyboardInterrupt
        whole(self, index, *a)

    monkeypatch.setattr(_cuda.CudaCopier, "_whole", fail_on_1)
    torch.cuda.synchronize(0)
    with torch.cuda.device(0):
        _sleep_ms(300)
    with pytest.raises(KeyboardInterrupt):
        spool.save(mdaemon.root / "fail2.mat", {"a0": a0, "a1": a1})
    assert _copier(spool)._streams[0][0].query()
    assert spool._ring.used == 0


# -- item 6: pinning -------------------------------------------------------------------------
def test_ring_pinned_lazily_on_the_saving_device(fresh: Any, mdaemon: Any) -> None:
    spool = fresh()
    assert not spool._ring.cuda_registered
    last = torch.cuda.device_count() - 1
    spool.save(mdaemon.root / "lazy.mat", {"x": torch.ones(5, device=f"cuda:{last}")}).result(60)
    ring = spool._ring
    assert ring.cuda_registered and ring._cuda_device == last
    assert _copier(spool)._pinned


def test_two_threads_first_saves_pin_once(fresh: Any, mdaemon: Any) -> None:
    spool = fresh()
    go = threading.Barrier(2)
    errors: list[BaseException] = []

    def first(i: int) -> None:
        try:
            go.wait()
            x = torch.full((7,), float(i), device="cuda")
            spool.save(mdaemon.root / f"race{i}.mat", {"x": x}).result(60)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        ts = [threading.Thread(target=first, args=(i,)) for i in range(2)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
    assert not errors
    assert not [w for w in seen if "pageable" in str(w.message)]
    assert _copier(spool)._pinned


def test_refused_pinning_falls_back_to_pageable(
    fresh: Any, mdaemon: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ring's range registered already (as a refusal stands in for): a warning naming
    CUDA's error once, saves still exact, and no pending error reaches this thread."""
    from matspool import _copies

    monkeypatch.setattr(_copies, "_warned_pageable", False)
    spool = fresh()
    ring = spool._ring
    cudart = torch.cuda.cudart()
    assert int(cudart.cudaHostRegister(ring.array.ctypes.data, ring.size, 1)) == 0
    try:
        x = torch.randn(300, 200, device="cuda")
        with pytest.warns(RuntimeWarning, match="already"):
            fut = spool.save(mdaemon.root / "pageable.mat", {"x": x})
        y = torch.randn(10, device="cuda") * 2  # a kernel launch here: no stale error raised
        torch.cuda.synchronize()
        assert y.shape == (10,)
        assert not _copier(spool)._pinned
        fut.result(60)
        assert_exact(read(mdaemon.root / "pageable.mat", "v5")["x"], x.cpu().numpy())
        big = torch.randn(64 * MiB // 4, device="cuda")  # chunked through pageable, too
        monkeypatch.setenv(_cuda.STAGING_ENV, str(4 * MiB))
        _copier(spool)._budgets.clear()
        _overwritten_after_save(spool, mdaemon.root / "pageable_chunked.mat", big)
    finally:
        spool.flush(60)
        torch.cuda.synchronize()
        cudart.cudaHostUnregister(ring.array.ctypes.data)


# -- item 7 ----------------------------------------------------------------------------------
def test_copy_thread_sleeps_while_waiting(fresh: Any, mdaemon: Any) -> None:
    """Blocking events: waiting ~1 s for a copy costs far less than a core for 1 s."""
    spool = fresh()
    x = torch.randn(1000, device="cuda")
    spool.save(mdaemon.root / "warm_cpu.mat", {"x": x}).result(60)
    torch.cuda.synchronize()
    _sleep_ms(1000)
    t0, c0 = time.perf_counter(), time.process_time()
    spool.save(mdaemon.root / "cpu.mat", {"x": x}).result(60)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert wall > 0.5, "the sleep kernel was too short to tell"
    assert cpu < 0.5 * wall, f"{cpu:.2f} s of CPU while waiting {wall:.2f} s: something spins"


def test_stream_argument(fresh: Any, mdaemon: Any) -> None:
    """Tensors produced on another stream: with ``stream=``, the snapshot follows its work."""
    spool = fresh()
    side = torch.cuda.Stream()
    u = torch.arange(1 << 20, device="cuda", dtype=torch.float32)
    want = (u * 2).cpu().numpy()
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        _sleep_ms(200)
        u.mul_(2)  # queued on ``side``, not yet run
    fut = spool.save(mdaemon.root / "stream_arg.mat", {"u": u}, stream=side)
    u.fill_(-1)  # on the caller's stream, right after: ordered after the snapshot too
    fut.result(60)
    assert_exact(read(mdaemon.root / "stream_arg.mat", "v5")["u"], want.reshape(1, -1))


def test_close_is_bounded_behind_a_stuck_stream(
    fresh: Any, mdaemon: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from matspool import _closing

    monkeypatch.setattr(_closing, "COPIES_CLOSE_TIMEOUT", 0.5)
    spool = fresh()
    x = torch.randn(1000, device="cuda")
    spool.save(mdaemon.root / "warm_close.mat", {"x": x}).result(60)
    ring = spool._ring
    torch.cuda.synchronize()
    _sleep_ms(4000)
    spool.save(mdaemon.root / "stuck.mat", {"x": x})
    t0 = time.perf_counter()
    with pytest.raises(matspool.CudaError, match="did not end"):
        spool.close(timeout=0.5)
    assert time.perf_counter() - t0 < 3.0
    torch.cuda.synchronize()
    deadline = time.monotonic() + 10
    while not ring.closed and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ring.closed and not Path(ring.path).exists()


def _expected(t: Any) -> np.ndarray:
    c = t.detach().cpu()
    if c.dtype == torch.complex32:
        c = c.to(torch.complex64)
    return np.asarray(c.numpy())


@pytest.mark.parametrize("dtype", ["complex32", "uint16", "uint32", "uint64"])
@pytest.mark.parametrize("fmt", ["v5", "v7.3"])
def test_more_dtypes(fresh: Any, mdaemon: Any, dtype: str, fmt: str) -> None:
    spool = fresh()
    dt = getattr(torch, dtype)
    if dt.is_complex:
        x = torch.complex(torch.randn(33, 17, device="cuda"), torch.randn(33, 17, device="cuda")).to(dt)
    else:
        top = {"uint16": 2**16 - 1, "uint32": 2**32 - 1, "uint64": 2**63 - 1}[dtype]
        wide = torch.randint(0, top, (33, 17), device="cuda", dtype=torch.int64)
        wide[0, 0] = top  # the largest value each can hold (uint64: as far as int64 reaches)
        x = wide.to(dt)
    path = mdaemon.root / f"dtype_{dtype}_{fmt}.mat"
    spool.save(path, {"x": x, "xt": x.t()}, format=fmt).result(60)
    got = read(path, fmt)
    assert_exact(got["x"], _expected(x))
    assert_exact(got["xt"], _expected(x.t()))


# -- the ring is as fast a D2H target as cudaMallocHost memory -----------------------------
def test_d2h_into_the_ring_reaches_pinned_bandwidth() -> None:
    """>= 90 % of the bandwidth into a ``pin_memory=True`` buffer (cudaMallocHost), best of 5."""
    from matspool._ring import Ring

    n = 256 * MiB
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device="cuda")
    ring = Ring(n)
    try:
        ring.register_cuda(torch.cuda.current_device())
        targets = {
            "ring": torch.from_numpy(ring.array)[:n],
            "pinned": torch.empty(n, dtype=torch.uint8, pin_memory=True),
        }
        copy = torch.cuda.Stream()
        best = {}
        for name, dst in targets.items():
            times = []
            for _ in range(6):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                with torch.cuda.stream(copy):
                    a.record()
                    dst.copy_(src, non_blocking=True)
                    b.record()
                b.synchronize()
                times.append(a.elapsed_time(b))
            best[name] = n / (min(times[1:]) / 1e3) / 1e9  # GB/s, the first is a warm-up
        print(f"\nD2H GB/s: ring {best['ring']:.1f}, pinned {best['pinned']:.1f}")
        assert best["ring"] >= 0.9 * best["pinned"], best
    finally:
        torch.cuda.synchronize()
        ring.close()
