"""CUDA tensors -> ring, without making the caller wait.

Per device, one side stream does the work. It first waits on the caller's current
stream (so it sees the tensor as the caller's queued kernels leave it), then builds a
private snapshot in MATLAB order and in the stored dtype (one gather kernel on the GPU),
then one asynchronous device-to-host copy into the page-locked ring. The caller's
stream waits only for the snapshot, a device-local copy, so the caller may overwrite
its tensor right after ``save()`` returns while PCIe traffic overlaps its next kernels.
Sources and snapshots stay referenced until the copy's event has fired.

Threads: ``start`` runs in the caller's thread; ``PendingCopy.wait`` on the copy thread.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ._convert import Prepared, torch_dtype

__all__ = ["CudaCopier", "PendingCopy"]


@dataclass(slots=True)
class PendingCopy:
    """Events to wait for before the daemon may read the bytes; keeps tensors alive."""

    events: list[Any] = field(default_factory=list)
    keepalive: list[Any] = field(default_factory=list)

    def wait(self) -> None:
        for ev in self.events:
            ev.synchronize()
        self.keepalive.clear()


class CudaCopier:
    def __init__(self, ring_array: Any) -> None:
        import torch

        self._torch = torch
        self._ring = torch.from_numpy(ring_array)  # shares the ring's memory, page-locked
        self._streams: dict[int, Any] = {}

    def _stream(self, index: int) -> Any:
        s = self._streams.get(index)
        if s is None:
            s = self._streams[index] = self._torch.cuda.Stream(device=index)  # type: ignore[no-untyped-call]
        return s

    def start(self, items: list[tuple[Prepared, int]]) -> PendingCopy:
        """Queue the copies of ``items`` (variable, ring offset); returns at once."""
        torch = self._torch
        pending = PendingCopy()
        by_device: dict[int, list[tuple[Prepared, int]]] = {}
        for p, off in items:
            by_device.setdefault(p.array.device.index or 0, []).append((p, off))
        for index, group in by_device.items():
            with torch.cuda.device(index):
                caller = torch.cuda.current_stream()
                side = self._stream(index)
                side.wait_stream(caller)
                snapped = torch.cuda.Event()
                done = torch.cuda.Event()
                snaps = []
                with torch.cuda.stream(side):
                    for p, _ in group:
                        rev = p.dims[::-1]
                        snap = torch.empty(rev, dtype=torch_dtype(p.dtype), device=p.array.device)
                        # column-major of m == row-major of m with its axes reversed
                        snap.copy_(p.array.permute(*range(len(p.dims) - 1, -1, -1)))
                        snaps.append(snap)
                    snapped.record(side)
                    for (p, off), snap in zip(group, snaps, strict=True):
                        if p.nbytes:
                            dst = self._ring[off:off + p.nbytes].view(snap.dtype).view(snap.shape)
                            dst.copy_(snap, non_blocking=True)
                    done.record(side)
                caller.wait_event(snapped)
                pending.events.append(done)
                pending.keepalive.extend(p.array for p, _ in group)
                pending.keepalive.extend(snaps)
        return pending

    def synchronize(self) -> None:
        for s in self._streams.values():
            s.synchronize()
