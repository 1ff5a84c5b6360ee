"""CUDA tensors through matspool: exact round trips, the snapshot promise, and overlap.

Skipped cleanly where CUDA is not available. Every file is compared bit for bit with
what the same tensor's CPU copy should give in MATLAB's order.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import matspool  # noqa: E402

from readback import assert_exact, read  # noqa: E402

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

FORMATS = ("v5", "v7.3")
DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bool": torch.bool,
    "complex64": torch.complex64,
    "int64": torch.int64,
    "float64": torch.float64,
    "uint8": torch.uint8,
    "int16": torch.int16,
}


# -- helpers ----------------------------------------------------------------------------------
def make(shape: tuple[int, ...], dtype: Any, device: str = "cuda", seed: int = 0) -> Any:
    g = torch.Generator(device=device).manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=g, device=device) > 0.5
    if dtype.is_complex:
        part = torch.float32 if dtype == torch.complex64 else torch.float64
        re = torch.randn(shape, generator=g, device=device, dtype=part)
        im = torch.randn(shape, generator=g, device=device, dtype=part)
        return torch.complex(re, im).to(dtype)
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=g, device=device) * 100).to(dtype)
    info = torch.iinfo(dtype)
    lo, hi = max(info.min, -(2**40)), min(info.max, 2**40)
    return torch.randint(lo, hi, shape, generator=g, device=device, dtype=torch.int64).to(dtype)


def expected(x: Any, layout: str = "matlab", oned_as: str = "row") -> np.ndarray:
    """What MATLAB must see for tensor ``x``, from its CPU copy."""
    t = x.detach().cpu().resolve_conj().resolve_neg()
    if t.dtype in (torch.float16, torch.bfloat16):
        t = t.to(torch.float32)  # MATLAB has no half: widened exactly
    a = t.numpy()
    if a.ndim == 0:
        return a.reshape(1, 1)
    if a.ndim == 1:
        return a.reshape(1, -1) if oned_as == "row" else a.reshape(-1, 1)
    if layout == "raw":
        return a.transpose()
    if layout == "hwc" and a.ndim in (3, 4):
        return a.transpose((1, 2, 0) if a.ndim == 3 else (2, 3, 1, 0))
    return a


@pytest.fixture(scope="module")
def gspool(mdaemon: Any) -> Any:
    with matspool.Spool(mdaemon.endpoint, ring_bytes=160 << 20, timeout=60) as s:
        yield s


# -- round trips --------------------------------------------------------------------------------
SHAPES = {
    "matlab": [(33, 47), (5, 6, 7), (129,), ()],
    "raw": [(33, 47), (5, 6, 7), (2, 3, 4, 5)],
    "hwc": [(3, 17, 29), (2, 3, 9, 11), (13, 14)],
}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("layout", sorted(SHAPES))
@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
def test_roundtrip_dtypes_layouts(gspool: Any, mdaemon: Any, fmt: str, layout: str, dtype_name: str) -> None:
    dtype = DTYPES[dtype_name]
    tensors = {f"v{i}": make(shape, dtype, seed=i) for i, shape in enumerate(SHAPES[layout])}
    path = mdaemon.root / f"{dtype_name}_{layout}_{fmt}.mat"
    res = gspool.save(path, tensors, format=fmt, layout=layout).result(60)
    assert res.format == fmt and res.nbytes == path.stat().st_size
    got = read(path, fmt)
    for name, t in tensors.items():
        assert_exact(got[name], expected(t, layout), f"{name} {tuple(t.shape)}")
    # the same values saved from the CPU give the same file contents
    cpu_path = mdaemon.root / f"{dtype_name}_{layout}_{fmt}_cpu.mat"
    gspool.save(cpu_path, {k: v.cpu() for k, v in tensors.items()}, format=fmt, layout=layout).result(60)
    got_cpu = read(cpu_path, fmt)
    for name in tensors:
        assert_exact(got[name], got_cpu[name], name)


def _noncontiguous() -> dict[str, Any]:
    base = make((64, 48, 6), torch.float32, seed=1)
    c = make((40, 30), torch.complex64, seed=2)
    return {
        "transposed": base[:, :, 0].t(),
        "sliced": base[1::3, ::2, 2:5],
        "permuted": base.permute(2, 0, 1),
        "flipped_slice": base.flip(0)[:, 5, :],
        "expanded": make((1, 7), torch.float32, seed=3).expand(9, 7),
        "diag_view": base[:, :, 1].diagonal(),
        "conj_view": c.conj(),
        "neg_view": c.t()._neg_view() if hasattr(c, "_neg_view") else -c.t(),
        "half_t": make((20, 31), torch.float16, seed=4).t(),
        "bf16_sliced": make((20, 31), torch.bfloat16, seed=5)[::2, 1::3],
        "bool_t": make((20, 31), torch.bool, seed=6).t(),
        "int64_perm": make((4, 5, 6), torch.int64, seed=7).permute(1, 2, 0),
        "empty": make((0, 5), torch.float32, seed=8),
    }


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("layout", ["matlab", "raw", "hwc"])
def test_noncontiguous(gspool: Any, mdaemon: Any, fmt: str, layout: str) -> None:
    tensors = _noncontiguous()
    assert not tensors["transposed"].is_contiguous()
    assert tensors["expanded"].stride()[0] == 0
    assert tensors["conj_view"].is_conj()
    path = mdaemon.root / f"noncontig_{layout}_{fmt}.mat"
    gspool.save(path, tensors, format=fmt, layout=layout).result(60)
    got = read(path, fmt)
    for name, t in tensors.items():
        assert_exact(got[name], expected(t, layout), name)


@pytest.mark.parametrize("oned_as", ["row", "column"])
def test_oned_as(gspool: Any, mdaemon: Any, oned_as: str) -> None:
    v = make((77,), torch.float64)
    for fmt in FORMATS:
        path = mdaemon.root / f"oned_{oned_as}_{fmt}.mat"
        gspool.save(path, {"v": v}, format=fmt, oned_as=oned_as).result(60)
        assert_exact(read(path, fmt)["v"], expected(v, oned_as=oned_as))


def test_mixed_cpu_numpy_cuda_in_one_save(gspool: Any, mdaemon: Any) -> None:
    g = make((31, 17), torch.float32)
    c = make((8, 9), torch.int16, device="cpu")
    n = np.arange(24, dtype=np.uint16).reshape(4, 6)
    for fmt in FORMATS:
        path = mdaemon.root / f"mixed_{fmt}.mat"
        gspool.save(path, {"g": g, "c": c, "n": n, "s": 3.5}, format=fmt).result(60)
        got = read(path, fmt)
        assert_exact(got["g"], expected(g))
        assert_exact(got["c"], expected(c))
        assert_exact(got["n"], n)
        assert got["s"].shape == (1, 1) and got["s"][0, 0] == 3.5


def test_second_device(gspool: Any, mdaemon: Any) -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    torch.cuda.set_device(0)
    a1 = make((300, 200), torch.float32, device="cuda:1", seed=1)
    b1 = make((3, 40, 50), torch.bfloat16, device="cuda:1", seed=2).permute(1, 2, 0)
    a0 = make((100, 7), torch.complex64, device="cuda:0", seed=3)
    for fmt in FORMATS:
        path = mdaemon.root / f"dev1_{fmt}.mat"
        gspool.save(path, {"a1": a1, "b1": b1, "a0": a0}, format=fmt).result(60)
        got = read(path, fmt)
        assert_exact(got["a1"], expected(a1))
        assert_exact(got["b1"], expected(b1))
        assert_exact(got["a0"], expected(a0))
    assert torch.cuda.current_device() == 0


# -- the snapshot promise -----------------------------------------------------------------------
def _busy() -> None:
    """Queue a long kernel so later work on the stream runs well after save() returns."""
    if hasattr(torch.cuda, "_sleep"):
        torch.cuda._sleep(200_000_000)  # a few tens of ms on current GPUs


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("side_stream", [False, True], ids=["default_stream", "user_stream"])
def test_snapshot_after_save_returns(gspool: Any, mdaemon: Any, fmt: str, side_stream: bool) -> None:
    n = 2048
    base = torch.arange(n * n, device="cuda", dtype=torch.float32).reshape(n, n)
    want = (base * 2).cpu().numpy()  # what the file must hold
    u = base.clone()
    torch.cuda.synchronize()
    stream = torch.cuda.Stream() if side_stream else torch.cuda.current_stream()
    with torch.cuda.stream(stream):
        _busy()
        u.mul_(2)  # queued, not yet run: save() must see it
        fut = gspool.save(mdaemon.root / f"snap_{fmt}_{side_stream}.mat", {"u": u}, format=fmt)
        u.add_(1)  # right after save() returns, on the same stream: must not be seen
        junk = torch.full((n, n), -7.0, device="cuda")
        u.copy_(junk)  # nor this
    fut.result(60)
    got = read(mdaemon.root / f"snap_{fmt}_{side_stream}.mat", fmt)["u"]
    assert_exact(got, want)
    torch.cuda.synchronize()
    assert torch.equal(u, junk)


def test_snapshot_of_a_freed_tensor(gspool: Any, mdaemon: Any) -> None:
    n = 1024
    want = make((n, n), torch.float64, seed=11)
    want_cpu = expected(want)
    x = want.clone()
    _busy()
    fut = gspool.save(mdaemon.root / "freed.mat", {"x": x}, format="v7.3")
    del x  # the caller lets go of it at once; new tensors may take its memory
    scribble = [torch.full((n, n), float(i), device="cuda", dtype=torch.float64) for i in range(8)]
    fut.result(60)
    assert_exact(read(mdaemon.root / "freed.mat", "v7.3")["x"], want_cpu)
    del scribble


# -- overlap ---------------------------------------------------------------------------------------
def test_save_returns_before_the_copy_finishes(gspool: Any, mdaemon: Any) -> None:
    n = 4096  # 64 MiB of float32
    u = make((n, n), torch.float32, seed=21)
    for i in range(2):  # warm-up: streams, kernels, allocator
        gspool.save(mdaemon.root / f"warm{i}.mat", {"u": u}, format="v7.3").result(60)
    torch.cuda.synchronize()

    # a plain device-to-host copy of the same bytes, for scale
    pinned = torch.empty((n, n), dtype=torch.float32, pin_memory=True)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    pinned.copy_(u, non_blocking=True)
    end.record()
    end.synchronize()
    copy_s = start.elapsed_time(end) / 1e3

    t0 = time.perf_counter()
    fut = gspool.save(mdaemon.root / "timed.mat", {"u": u}, format="v7.3")
    t_call = time.perf_counter() - t0
    res = fut.result(60)
    t_total = time.perf_counter() - t0
    print(
        f"\nsave() call {t_call * 1e3:.2f} ms; 64 MiB D2H copy alone {copy_s * 1e3:.2f} ms; "
        f"save until the file was on disk {t_total * 1e3:.1f} ms ({res.nbytes >> 20} MiB file)"
    )
    assert t_call < t_total
    assert_exact(read(mdaemon.root / "timed.mat", "v7.3")["u"], expected(u))
