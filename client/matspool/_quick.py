"""The small-save fast path (issue 14): a repeated plain save of small ndarrays, from its
arguments to its queued WRITE without a plan, specs, a request or an encoder.

A time-step loop saves the same names, dtypes, shapes and strides at every step. Once
such a save has been planned from a template (``_planner``: every check ran for the first
one), its spool keeps an :class:`Entry`: what that template fixed (format, each array's
place in the region and MATLAB size) and the binary WRITE (``_wirebin``) with only what
changes per save left to fill in: sequence number, fsync, path, ring offsets. A later save
whose options, names, dtypes, shapes and strides equal an entry's exactly is copied into
the ring and queued from it; the bytes it sends are those ``_wirebin.encode_write`` makes
of the request the general path builds.

Each such save still checks, every time: the format's spelling, fsync a bool, CUDA graph
capture, a closed spool, a fork (``Spool._check_open``), a broken link, the compression
level, every name, dtype, shape and strides against the entry (names exact ``str``,
values exact ``ndarray``, or a small plain CPU tensor's ndarray view: ``host_view``),
and its path (``_planner.check_path``'s rules, inline for an absolute normal ``str``).
Anything else (an option or a variable that differs, a path that does not encode (a
relative one under a working directory whose name is not UTF-8), a full, moving or
closed ring, a daemon that reads JSON only, a remote daemon) returns None: the general
path then checks the save from scratch and raises what it raises.

Threads: callers' threads. Entries are immutable; a spool's entries (``Spool._quick``: a
dict of names -> a short list, newest first) are replaced by whole-value stores, atomic
under the GIL.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Mapping
from os import getpid
from typing import TYPE_CHECKING, Any, Final, NamedTuple

import numpy as np

from ._cuda import refuse_capture
from ._leases import Lease
from ._link import Encoded
from ._matlab import FORMAT_ALIASES
from ._numeric import Prepared, _matlab_order
from ._pending import SaveFuture
from ._planner import Plan, check_path, level
from ._protocol import TAG
from ._ring import ALIGN
from ._wirebin import _FORMAT_CODE, _HEAD, _MODE_CODE, WRITE_MAGIC

if TYPE_CHECKING:
    from ._spool import Spool

__all__ = ["MAX_ARRAY_BYTES", "Entry", "host_view", "host_views", "remember", "save"]

#: arrays up to this size take the fast path: below every threshold where the general
#: copy picks another method (``_transpose``, torch, ``_reorder``'s deferral), so the
#: copy here (one numpy assignment) writes the bytes ``copy_host`` writes
MAX_ARRAY_BYTES: Final = 64 << 10
#: entries kept per tuple of names (a loop that alternates shapes under one name)
_PER_NAMES: Final = 4
#: distinct tuples of names kept per spool (cleared when exceeded, as the templates are)
_MAX_NAMES: Final = 64
_VAR_HEAD: Final = struct.Struct("<BBBx")  # _wirebin's per-variable header before the offset
_NDARRAY: Final = np.ndarray
_U64: Final = struct.Struct("<Q")
_WRITE: Final = _MODE_CODE["write"]


#: torch dtypes whose ``.numpy()`` view has the same MATLAB class, element for element
#: (bfloat16, complex32, quantized and the unsigned types numpy spells alike but older
#: torch refuses are left to the general path)
_TORCH_TYPES: Final = (
    "float16", "float32", "float64", "complex64", "complex128",
    "int8", "int16", "int32", "int64", "uint8", "bool",
)  # fmt: skip
_numpy_able: frozenset[Any] = frozenset()


def host_view(x: Any) -> np.ndarray | None:
    """The ndarray view of ``x`` when it is a small plain CPU tensor (exact
    ``torch.Tensor``, strided, no conjugate or negative bit, a dtype above, at most
    :data:`MAX_ARRAY_BYTES`), else None. Saving the view writes the file saving the
    tensor writes (the same dtype, dims and bytes; ``tests/test_quick_saves.py`` compares
    them), and lets a repeated small tensor save take this module's path."""
    global _numpy_able
    torch = sys.modules.get("torch")
    if torch is None or type(x) is not torch.Tensor:
        return None  # a subclass (Parameter, DTensor, a traced FakeTensor) goes the long way
    if not _numpy_able:
        _numpy_able = frozenset(getattr(torch, n) for n in _TORCH_TYPES)
    if (
        x.dtype not in _numpy_able
        or x.layout is not torch.strided
        or x.device.type != "cpu"
        or x.numel() * x.element_size() > MAX_ARRAY_BYTES
        or x.is_conj()
        or x.is_neg()
    ):
        return None
    view: np.ndarray = (x.detach() if x.requires_grad else x).numpy()
    return view


def host_views(variables: dict[Any, Any]) -> dict[Any, Any]:
    """``variables`` with each small plain CPU tensor (:func:`host_view`) as its ndarray
    view; the same dict when there is none (or torch is not loaded)."""
    if "torch" not in sys.modules:
        return variables
    out = None
    for name, x in variables.items():
        if type(x) is not _NDARRAY:
            view = host_view(x)
            if view is not None:
                if out is None:
                    out = dict(variables)
                out[name] = view
    return variables if out is None else out


class Var(NamedTuple):
    """One variable of an entry: what a save must match, and how it is copied and sent."""

    name: str
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    dtype: np.dtype[Any]  # the caller's
    same: bool  # the array is already in MATLAB index order (``_matlab_order`` returns it)
    ring: np.dtype[Any]  # the ring's
    exact: bool  # the caller's dtype is the ring's: a plain assignment copies it
    reversed: tuple[int, ...]  # the MATLAB size reversed: the region's row-major shape
    elements: int
    relative: int  # offset in the region
    itemsize: int
    head: bytes  # name, dtype and dims lengths (``_wirebin``'s variable header)
    tail: bytes  # the header's nbytes, then name, dtype and dims


class Entry(NamedTuple):
    """A checked plain save's layout and its WRITE's fixed parts (see the module docstring)."""

    options: tuple[str, str, str, int]  # format asked for ("auto" too), layout, oned_as, level
    format: str  # the format written
    total: int  # the region's bytes
    vars: tuple[Var, ...]
    format_code: int


def _var(a: Prepared, x: np.ndarray, relative: int, layout: str, oned_as: str) -> Var | None:
    ring = np.dtype(a.dtype)
    if a.mclass is not None or a.is_cuda or a.nbytes > MAX_ARRAY_BYTES:
        return None
    name, dtype = a.name.encode(), a.dtype.encode()
    dims = a.dims
    if len(name) > 255 or len(dtype) > 255 or len(dims) > 255:
        return None
    return Var(
        a.name,
        x.shape,
        x.strides,
        x.dtype,
        _matlab_order(x, layout, oned_as) is x,
        ring,
        x.dtype == ring,
        dims[::-1],
        a.nbytes // ring.itemsize,
        relative,
        ring.itemsize,
        _VAR_HEAD.pack(len(name), len(dtype), len(dims)),
        _U64.pack(a.nbytes) + name + dtype + struct.pack(f"<{len(dims)}Q", *dims),
    )


def remember(
    spool: Spool, p: Plan, variables: Mapping[str, Any], fmt: str, layout: str, oned_as: str
) -> None:
    """Keep an entry for ``p``, a plan made from a template for ``variables`` (a dict of
    ndarrays, in the plan's order) with the format asked ``fmt``; later equal saves take
    the fast path. Nothing is kept for a save this path does not make."""
    if not p.plain or p.slabs is not None or p.append or p.mode != "write" or p.format not in _FORMAT_CODE:
        return
    out = []
    for a, x in zip(p.arrays, variables.values(), strict=True):
        v = _var(a, x, p.relative[id(a)], layout, oned_as)
        if v is None:
            return
        out.append(v)
    entry = Entry((fmt, layout, oned_as, p.level), p.format, p.total, tuple(out), _FORMAT_CODE[p.format])
    names = tuple(variables)
    table = spool._quick
    kept = [e for e in table.get(names, ()) if e != entry]
    if len(table) >= _MAX_NAMES and names not in table:
        table.clear()
    table[names] = [entry, *kept[: _PER_NAMES - 1]]


def save(
    spool: Spool,
    path: Any,
    variables: dict[Any, Any],
    format: Any,
    layout: Any,
    oned_as: Any,
    fsync: Any,
    compress: Any,
) -> SaveFuture | None:
    """``Spool.save`` of a plain dict (no append, group or int_as) by an entry; None:
    take the general path (see the module docstring)."""
    fmt = FORMAT_ALIASES.get(format) if type(format) is str else None
    if fmt is None or (fsync is not True and fsync is not False):
        return None
    if type(layout) is not str or type(oned_as) is not str:
        return None  # check_choice's refusal (or an equal str subclass): the long way
    entries = spool._quick.get(tuple(variables))
    if entries is None:
        return None
    if compress is None:
        lvl = spool.compress
    elif type(compress) is bool or (type(compress) is int and 0 <= compress <= 9):
        lvl = level(compress)
    else:
        return None  # level()'s refusal, in the general path's order
    options = (fmt, layout, oned_as, lvl)
    arrays: list[np.ndarray] = []
    for e in entries:  # newest first; each layout saved under these names
        if e.options != options:
            continue
        arrays.clear()
        for (name, x), v in zip(variables.items(), e.vars, strict=True):
            if type(x) is not _NDARRAY:
                x = host_view(x)  # a small CPU tensor: its ndarray view, matched as one
            if (
                x is None
                or type(name) is not str
                or x.shape != v.shape
                or x.strides != v.strides
                or (x.dtype is not v.dtype and x.dtype != v.dtype)
            ):
                break  # a Shard, a large or CUDA tensor, another layout: not this entry
            arrays.append(x)
        else:
            break  # every variable matches e
    else:
        return None  # the general path decides
    refuse_capture()  # the general path's order: before anything is reserved or queued
    link = spool._link
    if spool._closed or spool._pid != getpid() or link is None or link.broken is not None:
        spool._check_open()  # raises (closed, broken), or opens this process's parts (forked)
        link = spool._link
    if link is None or not link.binary:
        return None  # a daemon that reads JSON only: the general path encodes for it
    if (
        type(path) is str
        and path[:1] == "/"
        and path[-1] != "/"
        and "\x00" not in path
        and "//" not in path
        and "/." not in path
    ):
        text = path  # absolute and normal: what check_path returns
    else:
        text = check_path(path)  # raises as the general path would
    try:
        encoded = text.encode()
    except UnicodeEncodeError:
        return None  # the general path says why (or sends it as JSON, for the daemon to)
    if len(encoded) > 0xFFFF:
        return None
    ring = spool._ring
    assert ring is not None
    total = e.total
    with ring.lock:  # no move while the bytes go in (see Ring.take_held)
        offset = ring.take_held(total if total > ALIGN else ALIGN)
        if offset < 0:
            return None  # full, moving or closed: the general path waits or raises
        try:
            for x, v in zip(arrays, e.vars, strict=True):
                if v.elements:
                    m = x if v.same else _matlab_order(x, layout, oned_as)
                    start = (offset + v.relative) // v.itemsize
                    view = ring._views.get(v.ring)
                    if view is None:
                        view = ring.view(v.ring)
                    dest = view[start : start + v.elements].reshape(v.reversed)
                    if v.exact:
                        dest[...] = m.transpose()
                    else:
                        np.copyto(dest, m.transpose(), casting="same_kind")
        except BaseException:
            ring.free(offset)  # never sent: the region goes back
            raise
    lease = Lease(offset, total, True)
    lease.copying = False  # its copy has ended, before anyone saw it
    seq = next(spool._seq)
    body = [
        _HEAD.pack(WRITE_MAGIC, seq, e.format_code, fsync, lvl, _WRITE, len(encoded), len(e.vars)),
        encoded,
    ]
    for v in e.vars:
        body += (v.head, _U64.pack(offset + v.relative), v.tail)
    frames = [TAG, b"".join(body)]
    record = spool._table.add_one(seq, text, e.format, lease)
    copies = spool._copies
    assert copies is not None
    if copies._queued:  # a CUDA copy or a reorder is queued before it: this WRITE waits its turn
        copies.dispatch(Encoded(seq, frames), None, (), lease)
    else:  # (read without its lock: 0 means all queued before went to the outbox)
        link.queue("WRITE", seq, frames, lease)
    return record.future
