"""A prepared value's wire form: its arrays in ring order, its spec once placed, and the
check that its description fits one control message.

``_convert`` builds the tree; ``_planner`` places its arrays in the ring and sends what
``to_spec`` makes of it (``_protocol``'s ``VarSpec`` and ``TreeSpec``).

Threads: no state; the thread of the save being planned.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from ._convert import Value
from ._errors import FormatLimitError
from ._numeric import Prepared

if TYPE_CHECKING:
    from ._messages import Request

__all__ = ["check_wire_size", "iter_arrays", "remote_frames", "to_spec"]


def iter_arrays(value: Value) -> Iterator[Prepared]:
    """The numeric arrays inside a value, in a fixed order (the order of the ring)."""
    if isinstance(value, Prepared):
        yield value
    elif value.kind == "struct":
        for _, v in value.fields:
            yield from iter_arrays(v)
    elif value.kind == "cell":
        for v in value.items:
            yield from iter_arrays(v)
    elif value.kind == "structs":
        for e in value.elems:
            for v in e:
                yield from iter_arrays(v)
    elif value.kind == "sparse":
        yield from value.parts


def to_spec(name: str, value: Value, offsets: dict[int, int]) -> Any:
    """The wire form of a value whose arrays were placed at ``offsets`` (keyed by id)."""
    from . import _protocol as proto

    def leaf(v: Prepared, label: str) -> Any:
        return proto.VarSpec(label, v.dtype, v.dims, offsets[id(v)], v.nbytes, mclass=v.mclass)

    def node(v: Value, label: str) -> Any:
        if isinstance(v, Prepared):
            return leaf(v, label)
        if v.kind == "char":
            return proto.Char(v.text)
        if v.kind == "struct":
            return proto.Struct(tuple((k, node(x, f"{label}.{k}")) for k, x in v.fields))
        if v.kind == "structs":
            return proto.StructArray(
                v.dims,
                v.names,
                tuple(
                    tuple(node(x, f"{label}.{k}") for k, x in zip(v.names, e, strict=True)) for e in v.elems
                ),
            )
        if v.kind == "sparse":
            data, ir, jc = (leaf(p, label) for p in v.parts)
            return proto.Sparse(v.dims, data, ir, jc)  # type: ignore[arg-type]
        return proto.Cell(v.dims, tuple(node(x, label) for x in v.items))

    tree = node(value, name)
    return tree if isinstance(tree, proto.VarSpec) else proto.TreeSpec(name, tree)


def check_wire_size(values: Mapping[str, Value]) -> None:
    """Refuse, before any ring space is taken, a save whose description (struct fields,
    cell elements, inline text) would not fit one control message: the daemon could not
    even read its sequence number to answer it."""
    from . import _protocol as proto

    if all(isinstance(v, Prepared) for v in values.values()):
        return  # plain arrays: MAX_VARS small entries always fit
    arrays = [a for v in values.values() for a in iter_arrays(v)]
    wire = [to_spec(n, v, {id(a): 0 for a in arrays}).to_wire() for n, v in values.items()]
    size = len(json.dumps(wire, separators=(",", ":"))) + 16 * len(arrays) + 1024  # offsets, header
    if size > proto.MAX_MESSAGE_BYTES:
        raise FormatLimitError(
            f"the description of this save (struct fields, cell elements, inline text) is about "
            f"{size} bytes, over the {proto.MAX_MESSAGE_BYTES} a control message carries: split it "
            "over several variables or saves"
        )


def remote_frames(ring: np.ndarray[Any, Any], message: Request) -> list[memoryview]:
    """For a remote (tcp://) daemon, which cannot map the ring: a request's arrays as
    frames, zero-copy views of ``ring``, in the ring order the daemon expects (a WRITE's
    leaves, a PART's piece, a sharded save's PLACE block); none for other requests."""
    from . import _protocol as proto
    from ._msgshard import Place

    if isinstance(message, proto.WriteRequest):
        spans = [
            (leaf.offset, leaf.nbytes)
            for v in message.vars
            for leaf in proto.leaves(v)
            if not leaf.deferred and leaf.nbytes
        ]
    elif isinstance(message, proto.Part):
        spans = [(message.offset, message.nbytes)]
    elif isinstance(message, Place):
        spans = [(message.ring_offset, message.nbytes)]
    else:
        return []
    return [memoryview(ring[off : off + n].data) for off, n in spans]
