"""What each rank contributes to a sharded save, and rank 0's check of them all.

A variable of a sharded save is a :class:`Shard` (a block of a global array, by hand), a
DTensor (its local shard; of replicas only mesh coordinate 0 writes), or a plain array
(group rank 0 writes it whole). :func:`variables` turns a save's variables into this
rank's blocks (MATLAB order, at least 2-d); :func:`check_blocks` is rank 0's verdict on
every rank's: same path and variables, no overlap, nothing missing, each error naming
ranks and offsets. ``boxes`` cuts a block into pieces that fit a ring.

Threads: none of its own; values and pure functions (the caller's thread or a save's).
"""

from __future__ import annotations

import itertools
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._errors import FormatLimitError, InvalidOptionError, MatspoolError, UnsupportedTypeError
from ._matlab import V5_MAX_DIM, V5_MAX_VARIABLE_BYTES, check_name
from ._msgshard import ShardVar
from ._numeric import MAX_DEPTH, Prepared, prepare

__all__ = [
    "Failed",
    "Shard",
    "ShardError",
    "Var",
    "boxes",
    "check_blocks",
    "file_format",
    "is_sharded",
    "variables",
]


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
    _made = False  # one was ever made: saves look for them nested in their values

    def __init__(self, local: Any, offset: Sequence[int], global_shape: Sequence[int]) -> None:
        Shard._made = True
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


def is_sharded(variables: object) -> bool:
    """Whether a save's variables call for a sharded save (anything but a mapping is not:
    the planner refuses it with its own message). A Shard or DTensor inside a struct,
    cell or list (not a variable of its own) is refused, naming its place."""
    if not isinstance(variables, Mapping):
        return False
    top = False
    look = Shard._made or "torch.distributed.tensor" in sys.modules  # else none can exist
    for name, value in variables.items():
        if isinstance(value, Shard) or _is_dtensor(value):
            top = True
        elif look:
            _refuse_nested(str(name), value, 0)
    return top


def _refuse_nested(label: str, value: object, depth: int) -> None:
    """Raise :class:`ShardError` for a Shard or DTensor anywhere inside ``value`` (labels
    as MATLAB would name the place: ``u.a``, ``u{2}``, ``u(1).a``)."""
    if depth > 0 and (isinstance(value, Shard) or _is_dtensor(value)):
        what = "matspool.Shard" if isinstance(value, Shard) else "DTensor"
        raise ShardError(
            f"variable {label!r}: a {what} inside a struct, cell or list cannot be saved: a sharded "
            "save takes each global array as a variable of its own (name it at the top level), "
            "or save its gathered value (.full_tensor()) or this rank's block (.to_local(), .local)"
        )
    if depth >= MAX_DEPTH:
        return
    items: Any = ()
    if isinstance(value, Mapping):
        items = ((f"{label}.{k}", v) for k, v in value.items())
    elif isinstance(value, list | tuple):
        if value and all(isinstance(v, Mapping) and set(v) == set(value[0]) for v in value):  # struct array
            items = ((f"{label}({i + 1}).{k}", x) for i, v in enumerate(value) for k, x in v.items())
        else:
            items = ((f"{label}{{{i + 1}}}", v) for i, v in enumerate(value))
    elif isinstance(value, np.ndarray) and value.dtype.kind == "O":
        items = ((f"{label}{{{i + 1}}}", v) for i, v in enumerate(value.ravel(order="F")))
    for sub, v in items:
        _refuse_nested(sub, v, depth + 1)


@dataclass(slots=True)
class Var:
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


def variables(variables: Mapping[str, Any], rank: int, oned_as: str) -> list[Var]:
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
        var = Var(name, p.dtype, dims)
        if writes and p.nbytes:
            var.blocks.append((_matlab_index(nd, offset, oned_as) if nd else (0, 0), p))
        out.append(var)
    return out


def boxes(shape: tuple[int, ...], itemsize: int, limit: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
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


class Failed(Exception):
    """This rank's part failed: the text every rank's error carries."""


def file_format(fmt: str, vars_: list[Var]) -> str:
    """The format a sharded save is written in: ``"auto"`` is v5 when every global
    variable fits v5's limits (as for any save), else v7.3; v5 asked for must fit."""
    over = [
        v.name
        for v in vars_
        if math.prod(v.dims) * np.dtype(v.dtype).itemsize > V5_MAX_VARIABLE_BYTES or max(v.dims) > V5_MAX_DIM
    ]
    if fmt == "auto":
        return "v7.3" if over else "v5"
    if fmt == "v5" and over:
        raise FormatLimitError(
            f"variable {over[0]!r} exceeds MAT v5's limits ({V5_MAX_VARIABLE_BYTES} bytes, int32 dims): "
            "use format='v7.3' or 'auto'"
        )
    return fmt


def check_blocks(path: str, ranks: list[dict[str, Any]]) -> tuple[str, list[ShardVar]]:
    """Rank 0's check of every rank's blocks: the variables of the file, or ``Failed``
    naming the ranks and offsets that disagree, overlap or leave a gap."""
    for got in ranks:
        if "error" in got:  # that rank's save() raised: its reason is everyone's
            raise Failed(got["error"])
    first = ranks[0]
    for r, got in enumerate(ranks):
        if got["path"] != path:
            raise Failed(f"sharded save: rank {r} saves to {got['path']!r}, rank 0 to {path!r}")
        if got["format"] != first["format"]:
            raise Failed(
                f"sharded save to {path!r}: rank {r} saves it as {got['format']}, rank 0 as {first['format']}"
            )
        if list(got["vars"]) != list(first["vars"]):
            raise Failed(
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
                raise Failed(
                    f"sharded save to {path!r}: variable {name!r} is {v['dtype']} of size {v['dims']} "
                    f"on rank {r}, {v0['dtype']} of size {list(dims)} on rank 0"
                )
            blocks += [(r, tuple(o), tuple(s)) for o, s in v["blocks"]]
        _check_cover(path, name, dims, blocks)
        out.append(ShardVar(name, v0["dtype"], dims))
    return first["format"], out


def _text(rank: int, offset: tuple[int, ...], shape: tuple[int, ...]) -> str:
    return f"rank {rank} at offset {offset} size {shape}"


def _check_cover(
    path: str, name: str, dims: tuple[int, ...], blocks: list[tuple[int, tuple[int, ...], tuple[int, ...]]]
) -> None:
    """No two blocks overlap, and together they cover ``dims`` (MATLAB indices, 0-based)."""
    for r, o, s in blocks:
        if not len(o) == len(s) == len(dims) or any(a + n > d for a, n, d in zip(o, s, dims, strict=True)):
            raise Failed(
                f"sharded save to {path!r}: variable {name!r} of size {list(dims)}: "
                f"{_text(r, o, s)} lies outside it"
            )
    blocks.sort(key=lambda b: b[1])
    for i, (ra, oa, sa) in enumerate(blocks):
        for rb, ob, sb in blocks[i + 1 :]:
            if ob[0] >= oa[0] + sa[0]:
                break  # sorted by first index: no later block reaches back into this one
            if all(b < a + m and a < b + n for a, m, b, n in zip(oa, sa, ob, sb, strict=True)):
                raise Failed(
                    f"sharded save to {path!r}: variable {name!r}: blocks overlap: "
                    f"{_text(ra, oa, sa)} and {_text(rb, ob, sb)} (MATLAB-order indices from 0)"
                )
    covered = sum(math.prod(s) for _, _, s in blocks)
    if covered != math.prod(dims):
        listed = "; ".join(_text(*b) for b in blocks) or "none"
        raise Failed(
            f"sharded save to {path!r}: variable {name!r} of size {list(dims)}: blocks are missing: "
            f"they cover {covered} of {math.prod(dims)} elements; blocks given: {listed}"
        )
