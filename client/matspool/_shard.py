"""Saves sharded over ranks: every rank's block of a global array, one file.

``spool.save(path, {"u": Shard(local, offset, global_shape)})`` (or a DTensor) is called
by every rank of a torch.distributed process group with the same path. Each rank copies
its own blocks into its own ring (at once, so the caller may reuse its tensors, unless
they exceed the ring), and a background thread then coordinates through the group's
c10d store (never a collective: those belong to the caller's thread):

1. every rank puts its blocks (offsets, sizes, dtype, global size) under ``blocks/<r>``;
2. group rank 0 checks them (same path and variables everywhere, no overlap, nothing
   missing), has its daemon LAY OUT the file under a temporary name and puts the
   temporary and the data offsets under ``layout`` (or the error);
3. every rank has its own daemon PLACE its blocks in the temporary (in pieces of at most
   a quarter of its ring when they exceed it), then puts ``done/<r>``;
4. rank 0 waits for every ``done`` (at most ``timeout``), has its daemon PUBLISH (fsync,
   rename) or DISCARD the temporary, and puts ``result``; every rank's future resolves
   from it. A rank whose wait for ``result`` times out discards the temporary itself.

Keys live under ``matspool/shard/<group>/<n>/``, ``n`` counting this process's sharded
saves on the group: every rank must make its sharded saves in the same order, as for
any collective.

Threads: ``save_sharded`` runs in the caller's thread (checks, copies into the ring);
each save then has one ``matspool-shard`` thread of its own, which alone touches its
store keys and its sub-requests' futures. ``_counters`` is shared under ``_lock``.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import sys
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Final

import numpy as np

from . import _messages as msgs
from ._convert import Prepared, copy_host, prepare, torch_dtype
from ._errors import InvalidOptionError, MatspoolError, UnsupportedTypeError
from ._leases import Lease
from ._matlab import check_name
from ._pending import Save
from ._saves import SaveResult, aligned

if TYPE_CHECKING:
    from ._spool import Spool

__all__ = ["Shard", "ShardError", "is_sharded", "save_sharded"]

_RESULT_GRACE: Final = 10.0  # others wait this much longer than rank 0 for its verdict
_lock = threading.Lock()
_counters: dict[str, itertools.count[int]] = {}


class ShardError(MatspoolError, ValueError):
    """A sharded save failed as a whole: blocks overlap or are missing, ranks disagree
    (path, variables, dtypes, sizes), or a rank did not finish within the timeout."""

    code = "shard_error"


class Shard:
    """This rank's block of a global array: ``local`` (a tensor or numpy array) holds
    ``global[offset[0]:offset[0]+local.shape[0], ...]`` of an array of ``global_shape``.

    Pass it to ``Spool.save`` on every rank of the process group; MATLAB sees one
    variable of size ``global_shape`` (``layout="matlab"``: ``A(i,j) == global[i,j]``).
    """

    __slots__ = ("global_shape", "local", "offset")

    def __init__(self, local: Any, offset: Sequence[int], global_shape: Sequence[int]) -> None:
        shape = getattr(local, "shape", None)
        if shape is None:
            raise UnsupportedTypeError(
                f"Shard: local must be a tensor or numpy array, not {type(local).__name__}"
            )
        self.local = local
        self.offset = _ints("offset", offset)
        self.global_shape = _ints("global_shape", global_shape)
        shape = tuple(int(d) for d in shape)
        if not 1 <= len(shape) == len(self.offset) == len(self.global_shape):
            raise InvalidOptionError(
                f"Shard: local has {len(shape)} dimensions, offset {len(self.offset)}, global_shape "
                f"{len(self.global_shape)}; they must agree (at least 1)"
            )
        if any(o + n > g for o, n, g in zip(self.offset, shape, self.global_shape, strict=True)):
            raise ShardError(
                f"Shard: a block of size {shape} at offset {self.offset} does not fit in {self.global_shape}"
            )

    def __repr__(self) -> str:
        return f"Shard(<{tuple(self.local.shape)}>, offset={self.offset}, global_shape={self.global_shape})"


def _ints(what: str, value: Sequence[int]) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise InvalidOptionError(f"Shard: {what} must be a sequence of integers, got {value!r}") from None
    if any(v < 0 for v in out) or any(isinstance(v, bool) for v in value):
        raise InvalidOptionError(f"Shard: {what} must hold integers >= 0, got {value!r}")
    return out


def _is_dtensor(value: object) -> bool:
    return "torch" in sys.modules and any(c.__name__ == "DTensor" for c in type(value).__mro__)


def is_sharded(variables: Mapping[str, Any]) -> bool:
    """Whether a save's variables call for a sharded save."""
    return any(isinstance(v, Shard) or _is_dtensor(v) for v in variables.values())


@dataclass(slots=True)
class _Var:
    """One global variable as this rank sees it: MATLAB size, dtype, and its own blocks."""

    name: str
    dtype: str
    dims: tuple[int, ...]
    blocks: list[tuple[tuple[int, ...], Prepared]] = field(default_factory=list)

    def wire(self) -> dict[str, Any]:
        return {
            "dtype": self.dtype,
            "dims": list(self.dims),
            "blocks": [[list(o), list(p.dims)] for o, p in self.blocks],
        }


def _matlab_index(nd: int, offset: tuple[int, ...], oned_as: str) -> tuple[int, ...]:
    """A block's offset in MATLAB's (at least 2-d) indices."""
    if nd == 1:
        return (0, offset[0]) if oned_as == "row" else (offset[0], 0)
    return offset


def _from_dtensor(name: str, dt: Any) -> tuple[Any, tuple[int, ...], tuple[int, ...], bool]:
    """A DTensor as (local tensor, offset, global shape, whether this rank writes it):
    of ranks holding the same block (a replicated mesh dimension) only coordinate 0 writes."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor import Shard as TorchShard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    placements = tuple(dt.placements)
    for p in placements:
        if not isinstance(p, (Replicate, TorchShard)):
            raise UnsupportedTypeError(
                f"variable {name!r}: a DTensor placement {p} has no global value to save "
                "(only Shard and Replicate); redistribute it first"
            )
    mesh = dt.device_mesh
    coord = mesh.get_coordinate()
    shape = tuple(int(d) for d in dt.shape)
    if coord is None:
        return None, (0,) * len(shape), shape, False
    _, offset = compute_local_shape_and_global_offset(dt.shape, mesh, placements)
    writes = all(c == 0 for c, p in zip(coord, placements, strict=True) if isinstance(p, Replicate))
    local = dt.to_local()
    if hasattr(local, "trigger_wait"):
        local = local.trigger_wait()
    import torch

    return local.as_subclass(torch.Tensor), tuple(int(o) for o in offset), shape, writes


def _variables(variables: Mapping[str, Any], rank: int, oned_as: str) -> list[_Var]:
    out = []
    for name, value in variables.items():
        check_name(name)
        if isinstance(value, Shard):
            local, offset, shape, writes = value.local, value.offset, value.global_shape, True
        elif _is_dtensor(value):
            local, offset, shape, writes = _from_dtensor(name, value)
        else:  # a plain value in a sharded save: group rank 0 writes it whole
            local = value
            shape = tuple(int(d) for d in getattr(value, "shape", ()))
            offset, writes = (0,) * len(shape), rank == 0
        if local is None:  # a rank outside the DTensor's mesh: knows neither dtype nor block
            raise ShardError(f"variable {name!r}: this rank is not in the DTensor's device mesh")
        p = prepare(name, local, "matlab", oned_as)
        nd = len(shape)
        if nd == 0:
            dims: tuple[int, ...] = (1, 1)
        elif nd == 1:
            dims = (1, shape[0]) if oned_as == "row" else (shape[0], 1)
        else:
            dims = shape
        var = _Var(name, p.dtype, dims)
        if writes and p.nbytes:
            var.blocks.append((_matlab_index(nd, offset, oned_as) if nd else (0, 0), p))
        out.append(var)
    return out


def _boxes(
    shape: tuple[int, ...], itemsize: int, limit: int
) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """A block cut into column-major sub-blocks of at most ``limit`` bytes each:
    ``(offset within the block, size)``. Leading dimensions stay whole as long as they fit."""
    nd = len(shape)
    k, inner = 0, itemsize
    while k < nd and inner * shape[k] <= limit:
        inner *= shape[k]
        k += 1
    if k == nd:
        return [((0,) * nd, shape)]
    step = max(1, limit // inner)
    out = []
    for rest in itertools.product(*(range(n) for n in shape[k + 1 :])):
        for start in range(0, shape[k], step):
            n = min(step, shape[k] - start)
            out.append(((0,) * k + (start, *rest), (*shape[:k], n) + (1,) * len(rest)))
    return out


@dataclass(slots=True)
class _Piece:
    """One PLACE to make: a sub-block of a variable, in the ring once copied."""

    var: _Var
    origin: tuple[int, ...]  # the sub-block's first element in the global array (MATLAB)
    shape: tuple[int, ...]
    source: Prepared
    within: tuple[int, ...]  # its first element within ``source``
    lease: Lease | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.var.dtype).itemsize


def _copy(spool: Spool, piece: _Piece, block: bool) -> None:
    """Copy ``piece`` into a new lease of ``spool``'s ring (column-major)."""
    ring = spool._ring
    assert ring is not None
    lease = spool._leases.take(piece.nbytes, block=block, timeout=spool.timeout)
    try:
        p = piece.source
        sub = p.array[tuple(slice(o, o + n) for o, n in zip(piece.within, piece.shape, strict=True))]
        if p.is_cuda:  # the one D2H copy, widened as prepare() does on the host
            sub = sub.to(torch_dtype(p.dtype)).cpu().resolve_conj().resolve_neg().numpy()
        copy_host(Prepared(p.name, p.dtype, piece.shape, sub, False), ring.array, lease.offset)
    except BaseException:
        spool._leases.copied(lease)
        spool._leases.answered(lease)
        raise
    spool._leases.copied(lease)
    piece.lease = lease


def save_sharded(
    spool: Spool,
    path: str | os.PathLike[str],
    variables: Mapping[str, Any],
    *,
    fmt: str,
    layout: str,
    oned_as: str,
    fsync: bool,
    compress: bool | int | None,
    append: bool,
    group: Any,
) -> Any:
    """See the module docstring; returns the save's future at once."""
    import torch.distributed as dist

    if fmt not in ("auto", "v7.3"):
        raise InvalidOptionError(f"a sharded save is written as v7.3 (format='auto' or 'v7.3'), not {fmt!r}")
    if layout != "matlab":
        raise InvalidOptionError(f"a sharded save takes layout='matlab' only, not {layout!r}")
    if compress or append:
        raise InvalidOptionError(
            "a sharded save cannot be compressed or appended (blocks are written in place)"
        )
    if spool._remote:
        raise InvalidOptionError("a sharded save needs a daemon on this host (not a tcp:// endpoint)")
    if not dist.is_available() or not dist.is_initialized():
        raise InvalidOptionError("a sharded save needs torch.distributed initialised (init_process_group)")
    spool._check_open()
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    if rank < 0:
        raise InvalidOptionError("this process is not a member of the group given")
    store = (
        dist.distributed_c10d._get_default_store()
        if group is None
        else (dist.distributed_c10d._get_process_group_store(group))
    )
    gname = "default" if group is None else str(getattr(group, "group_name", id(group)))
    with _lock:
        n = next(_counters.setdefault(gname, itertools.count()))
    full = os.path.abspath(os.fspath(path))
    vars_ = _variables(variables, rank, oned_as)
    ring = spool._ring
    assert ring is not None
    pieces: list[_Piece] = []
    total = sum(aligned(p.nbytes) for v in vars_ for _, p in v.blocks)
    limit = ring.size if total <= ring.size else max(ring.size // 4, 1)
    for v in vars_:
        item = np.dtype(v.dtype).itemsize
        for origin, p in v.blocks:
            for within, shape in _boxes(p.dims, item, limit):
                at = tuple(o + w for o, w in zip(origin, within, strict=True))
                pieces.append(_Piece(v, at, shape, p, within))
    seq = next(spool._seq)
    save = spool._table.add(seq, full, "v7.3", [])
    try:
        if total <= ring.size:  # a snapshot now: the caller may change its tensors at once
            for piece in pieces:
                _copy(spool, piece, spool.on_full == "block")
    except BaseException:
        _release(spool, pieces)
        spool._table.discard(seq)
        raise
    timeout = float(spool.timeout) if spool.timeout else 60.0
    job = _Job(
        spool, save, store, f"matspool/shard/{gname}/{n}/", rank, size, full, fsync, vars_, pieces, timeout
    )
    threading.Thread(target=job.run, name=f"matspool-shard-{n}", daemon=True).start()
    return save.future


def _release(spool: Spool, pieces: list[_Piece]) -> None:
    for piece in pieces:
        if piece.lease is not None:
            spool._leases.answered(piece.lease)
            piece.lease = None


class _Failed(Exception):
    """This rank's part failed: the text every rank's error carries."""


@dataclass(eq=False)
class _Job:
    """One sharded save's coordination, on its own thread (see the module docstring)."""

    spool: Spool
    save: Save
    store: Any
    prefix: str
    rank: int
    size: int
    path: str
    fsync: bool
    vars: list[_Var]
    pieces: list[_Piece]
    timeout: float
    tmp: str | None = None

    def run(self) -> None:
        try:
            nbytes = self._run()
        except BaseException as e:  # noqa: BLE001 - every failure reaches the future
            _release(self.spool, self.pieces)
            error = e if isinstance(e, MatspoolError) else ShardError(f"sharded save to {self.path!r}: {e}")
            self.spool._table.fail(self.save.seq, error)
        else:
            self.save.future.set_result(SaveResult(self.path, nbytes, "v7.3"))
        self.spool._table.forget(self.save)

    # -- the store ------------------------------------------------------------------------
    def _put(self, key: str, value: dict[str, Any]) -> None:
        self.store.set(self.prefix + key, json.dumps(value))

    def _wait(self, keys: list[str], timeout: float) -> None:
        self.store.wait([self.prefix + k for k in keys], timedelta(seconds=timeout))

    def _get(self, key: str) -> dict[str, Any]:
        value: dict[str, Any] = json.loads(self.store.get(self.prefix + key))
        return value

    def _missing(self, keys: list[str]) -> list[str]:
        return [k for k in keys if not self.store.check([self.prefix + k])]

    def _wait_ranks(self, what: str) -> str | None:
        """Wait for ``what/<r>`` of every rank; the error naming those that never came."""
        keys = [f"{what}/{r}" for r in range(self.size)]
        try:
            self._wait(keys, self.timeout)
        except Exception:  # noqa: BLE001 - the store's timeout: say which ranks are missing
            late = [k.split("/")[-1] for k in self._missing(keys)]
            if late:
                return (
                    f"sharded save to {self.path!r}: rank(s) {', '.join(late)} did not "
                    f"{'start' if what == 'blocks' else 'finish'} within {self.timeout:g} s "
                    "(a rank or its daemon died, or did not call save())"
                )
        return None

    # -- the daemon -----------------------------------------------------------------------
    def _ask(self, message: Any) -> SaveResult:
        """Send one request to this rank's daemon and wait for its answer."""
        return self._send(message).result(self.timeout + _RESULT_GRACE)

    def _send(self, message: Any, lease: Lease | None = None) -> Future[SaveResult]:
        """Send one request to this rank's daemon; its future (``lease``: the ring region
        it names, which goes back when the daemon answers)."""
        spool = self.spool
        link = spool._link
        assert link is not None
        sub = spool._table.add(message.seq, self.path, "v7.3", [lease] if lease else [])
        sub.ended, sub.outstanding, sub.instance = True, 1, link.instance
        if lease is not None:
            lease.instance = link.instance
        link.send(message)
        return sub.future

    # -- the steps ------------------------------------------------------------------------
    def _run(self) -> int:
        self._put(f"blocks/{self.rank}", {"path": self.path, "vars": {v.name: v.wire() for v in self.vars}})
        if self.rank == 0:
            self._lay_out()
        try:
            self._wait(["layout"], self.timeout + _RESULT_GRACE)
        except Exception:  # noqa: BLE001
            raise ShardError(
                f"sharded save to {self.path!r}: rank 0 did not lay the file out in time"
            ) from None
        laid = self._get("layout")
        if "error" in laid:
            raise ShardError(laid["error"])
        self.tmp = laid["tmp"]
        status: dict[str, Any] = {"ok": True}
        try:
            self._place(laid["offsets"])
        except BaseException as e:  # noqa: BLE001 - told to rank 0, then raised below
            status = {"error": f"rank {self.rank}: {type(e).__name__}: {e}"}
        self._put(f"done/{self.rank}", status)
        if self.rank == 0:
            self._finish()
        try:
            self._wait(["result"], self.timeout + _RESULT_GRACE)
        except Exception:  # noqa: BLE001 - rank 0 (or its daemon) is gone: clean up ourselves
            self._discard()
            raise ShardError(
                f"sharded save to {self.path!r}: no result from rank 0 within "
                f"{self.timeout + _RESULT_GRACE:g} s (it or its daemon died); nothing was published"
            ) from None
        result = self._get("result")
        if "error" in result:
            raise ShardError(result["error"])
        return int(result["nbytes"])

    def _lay_out(self) -> None:
        """Rank 0: check every rank's blocks, have the file laid out, tell everyone."""
        try:
            late = self._wait_ranks("blocks")
            if late:
                raise _Failed(late)
            ranks = [self._get(f"blocks/{r}") for r in range(self.size)]
            shard_vars = check_blocks(self.path, ranks)
            laid = self._ask(msgs.Layout(next(self.spool._seq), self.path, "v7.3", tuple(shard_vars)))
            assert isinstance(laid, msgs.LayoutResult)
            self._put("layout", {"tmp": laid.path, "offsets": laid.offsets})
        except _Failed as e:
            self._put("layout", {"error": str(e)})
        except BaseException as e:  # noqa: BLE001 - every rank must hear of it
            self._put("layout", {"error": f"sharded save to {self.path!r}: rank 0: {type(e).__name__}: {e}"})

    def _place(self, offsets: dict[str, int]) -> None:
        """Have this rank's daemon write each of its pieces in place (all in flight at once:
        pieces beyond the ring wait for room, which answered pieces free)."""
        sent = []
        for piece in self.pieces:
            if piece.lease is None:  # larger than the ring: copied now, as room frees
                _copy(self.spool, piece, True)
            lease, piece.lease = piece.lease, None
            assert lease is not None and self.tmp is not None
            v = piece.var
            sent.append(
                self._send(
                    msgs.Place(
                        next(self.spool._seq),
                        self.path,
                        self.tmp,
                        offsets[v.name],
                        v.dtype,
                        v.dims,
                        piece.origin,
                        piece.shape,
                        lease.offset,
                        self.fsync,
                    ),
                    lease,
                )
            )
        for future in sent:
            future.result(self.timeout + _RESULT_GRACE)

    def _finish(self) -> None:
        """Rank 0: every rank done: publish; else discard. Then tell everyone."""
        try:
            late = self._wait_ranks("done")
            errors = [late] if late else []
            if not late:
                errors = [d["error"] for r in range(self.size) if "error" in (d := self._get(f"done/{r}"))]
            if errors:
                self._discard()
                self._put("result", {"error": "; ".join(errors) + "; nothing was published"})
                return
            assert self.tmp is not None
            done = self._ask(msgs.Publish(next(self.spool._seq), self.path, self.tmp, self.fsync))
            self._put("result", {"nbytes": done.nbytes})
        except BaseException as e:  # noqa: BLE001 - every rank must hear of it
            self._discard()
            self._put("result", {"error": f"sharded save to {self.path!r}: rank 0: {type(e).__name__}: {e}"})

    def _discard(self) -> None:
        if self.tmp is None:
            return
        try:
            self._ask(msgs.Discard(next(self.spool._seq), self.path, self.tmp))
        except Exception:  # noqa: BLE001 - best effort: the daemon's journal sweeps leftovers
            pass


def check_blocks(path: str, ranks: list[dict[str, Any]]) -> list[msgs.ShardVar]:
    """Rank 0's check of every rank's blocks: the variables of the file, or ``_Failed``
    naming the ranks and offsets that disagree, overlap or leave a gap."""
    first = ranks[0]
    for r, got in enumerate(ranks):
        if got["path"] != path:
            raise _Failed(f"sharded save: rank {r} saves to {got['path']!r}, rank 0 to {path!r}")
        if list(got["vars"]) != list(first["vars"]):
            raise _Failed(
                f"sharded save to {path!r}: rank {r} saves variables {list(got['vars'])}, "
                f"rank 0 {list(first['vars'])}"
            )
    out = []
    for name, v0 in first["vars"].items():
        dims = tuple(v0["dims"])
        blocks: list[tuple[int, tuple[int, ...], tuple[int, ...]]] = []
        for r, got in enumerate(ranks):
            v = got["vars"][name]
            if v["dtype"] != v0["dtype"] or tuple(v["dims"]) != dims:
                raise _Failed(
                    f"sharded save to {path!r}: variable {name!r} is {v['dtype']} of size {v['dims']} "
                    f"on rank {r}, {v0['dtype']} of size {list(dims)} on rank 0"
                )
            blocks += [(r, tuple(o), tuple(s)) for o, s in v["blocks"]]
        _check_cover(path, name, dims, blocks)
        out.append(msgs.ShardVar(name, v0["dtype"], dims))
    return out


def _text(rank: int, offset: tuple[int, ...], shape: tuple[int, ...]) -> str:
    return f"rank {rank} at offset {offset} size {shape}"


def _check_cover(
    path: str, name: str, dims: tuple[int, ...], blocks: list[tuple[int, tuple[int, ...], tuple[int, ...]]]
) -> None:
    """No two blocks overlap, and together they cover ``dims`` (MATLAB indices, 0-based)."""
    for r, o, s in blocks:
        if not len(o) == len(s) == len(dims) or any(a + n > d for a, n, d in zip(o, s, dims, strict=True)):
            raise _Failed(
                f"sharded save to {path!r}: variable {name!r} of size {list(dims)}: "
                f"{_text(r, o, s)} lies outside it"
            )
    blocks.sort(key=lambda b: b[1])
    for i, (ra, oa, sa) in enumerate(blocks):
        for rb, ob, sb in blocks[i + 1 :]:
            if ob[0] >= oa[0] + sa[0]:
                break  # sorted by first index: no later block reaches back into this one
            if all(b < a + m and a < b + n for a, m, b, n in zip(oa, sa, ob, sb, strict=True)):
                raise _Failed(
                    f"sharded save to {path!r}: variable {name!r}: blocks overlap: "
                    f"{_text(ra, oa, sa)} and {_text(rb, ob, sb)} (MATLAB-order indices from 0)"
                )
    covered = sum(math.prod(s) for _, _, s in blocks)
    if covered != math.prod(dims):
        listed = "; ".join(_text(*b) for b in blocks) or "none"
        raise _Failed(
            f"sharded save to {path!r}: variable {name!r} of size {list(dims)}: blocks are missing: "
            f"they cover {covered} of {math.prod(dims)} elements; blocks given: {listed}"
        )
