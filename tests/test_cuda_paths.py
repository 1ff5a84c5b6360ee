"""The parts of the CUDA path that run without a GPU: saves inside ``torch.compile`` (eager,
behind a graph break), the chunk splitter of over-budget saves, the wait that every event
of a failed copy gets, and the capture check's no-op without CUDA.

Threads: the test's; the spool's own threads as in any save.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import matspool  # noqa: E402
from matspool import _cuda  # noqa: E402
from matspool._errors import CudaError  # noqa: E402

from readback import assert_exact, read  # noqa: E402


def test_save_inside_torch_compile_runs_eagerly(spool: matspool.Spool, out_dir: Path) -> None:
    """A compiled function that saves a CPU tensor: the file holds its values, the function's
    result is right, and saving a second time (a cached graph) saves again."""
    import torch._dynamo  # what a torch.compile user has loaded before the first call

    futures: list[Any] = []

    def step(x: Any, k: int) -> Any:
        y = x * 2 + 1
        futures.append(spool.save(out_dir / f"compiled{k}.mat", {"y": y}))
        return y.sum()

    compiled = torch.compile(step, backend="eager")
    for k in range(2):
        x = torch.arange(12, dtype=torch.float32).reshape(3, 4) + k
        got = compiled(x, k)
        assert float(got) == float((x * 2 + 1).sum())
    assert len(futures) == 2
    for k, fut in enumerate(futures):
        fut.result(30)
        want = ((torch.arange(12, dtype=torch.float32).reshape(3, 4) + k) * 2 + 1).numpy()
        assert_exact(read(out_dir / f"compiled{k}.mat", fut.result().format)["y"], want)
    torch._dynamo.reset()


def test_eager_wraps_only_once_dynamo_is_loaded() -> None:
    def f() -> int:
        return 1

    wrapped = _cuda.eager(f)
    assert wrapped() == 1
    assert _cuda.eager(f) is wrapped  # cached: no wrapping per save


@pytest.mark.parametrize("shape", [(7,), (5, 9), (3, 4, 70), (2, 1, 3, 11), (1,), (0, 4)])
@pytest.mark.parametrize("limit", [1, 3, 8, 64, 10_000])
def test_split_covers_every_element_in_order(shape: tuple[int, ...], limit: int) -> None:
    """Chunks of an over-budget save: each at most ``limit`` elements, each starting where
    the one before ended, together the tensor in row-major order."""
    x = torch.arange(math.prod(shape)).reshape(shape)
    src = x.permute(*range(x.ndim - 1, -1, -1))  # what the copier splits: MATLAB order
    flat = src.contiguous().reshape(-1)
    at = 0
    for piece, first in _cuda._split(src, limit):
        assert first == at and 0 < piece.numel() <= limit
        assert torch.equal(piece.contiguous().reshape(-1), flat[first : first + piece.numel()])
        at += piece.numel()
    assert at == x.numel()


class _Event:
    def __init__(self, ok: bool) -> None:
        self.ok, self.waited = ok, False

    def synchronize(self) -> None:
        self.waited = True
        if not self.ok:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")

    def query(self) -> bool:
        return False


def test_pending_copy_waits_for_every_event_after_the_first_failed() -> None:
    """Item 5 of issue 16: the regions are released when ``wait`` returns, so the events
    after a failed one must still be waited for."""
    events = [_Event(False), _Event(True), _Event(True)]
    released: list[int] = []
    pending = _cuda.PendingCopy(
        events=list(events), keepalive=[object()], release=[lambda: released.append(1)]
    )
    with pytest.raises(RuntimeError, match="illegal memory access"):
        pending.wait()
    assert all(e.waited for e in events)
    assert released == [1] and pending.keepalive == []


def test_bounded_wait_raises_cuda_error() -> None:
    with pytest.raises(CudaError, match="did not end within"):
        _cuda.wait_events([_Event(True)], 0.05)


def test_refuse_capture_is_silent_without_cuda() -> None:
    _cuda.refuse_capture()  # CUDA never initialized here: nothing to check, nothing raised


def test_pageable_fallback_is_reported_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where page-locking is refused, the pipeline warns once and builds a pageable copier."""
    from matspool import _copies
    from matspool._errors import RingError

    class FakeRing:
        cuda_registered = False
        array = np.zeros(4096, dtype=np.uint8)

        def register_cuda(self, device: int) -> None:
            raise RingError("cudaHostRegister of the 0 MiB ring failed: operation not permitted")

    monkeypatch.setattr(_copies, "_warned_pageable", False)
    with pytest.warns(RuntimeWarning, match="pageable memory"):
        assert _copies._pin(FakeRing(), 0) is False  # type: ignore[arg-type]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _copies._pin(FakeRing(), 0) is False  # type: ignore[arg-type]
