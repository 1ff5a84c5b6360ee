"""What a save holds, as the protocol describes it: numeric arrays in the ring and the
struct/cell/char/sparse trees around them, with the schema check the daemon runs on them.

A ``VarSpec`` says where an array's bytes lie in the client's ring and what MATLAB sees;
trees (``Char``, ``Struct``, ``StructArray``, ``Cell``, ``Sparse``) nest them. ``parse_var``
checks one variable of a WRITE against a ring of ``ring_bytes``: every range inside it,
every size consistent, nesting bounded, so a hostile message cannot make the daemon read
outside the ring or exhaust it. Messages themselves live in ``_protocol`` (WRITE, PART)
and ``_messages`` (the rest).

Threads: none of its own; immutable values and pure functions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from ._errors import FormatLimitError, ProtocolError
from ._matlab import STORED_DTYPES, V5_MAX_DIM, V5_MAX_VARIABLE_BYTES, check_name

__all__ = [
    "MAX_DEFERRED_BYTES",
    "MAX_NDIM",
    "MAX_TREE_DEPTH",
    "MAX_TREE_NODES",
    "SPARSE_DTYPES",
    "Cell",
    "Char",
    "Sparse",
    "Struct",
    "StructArray",
    "Tree",
    "TreeSpec",
    "VarSpec",
    "Variable",
    "check_stream_step",
    "check_v5_limits",
    "leaves",
    "parse_var",
    "wire_int",
]

MAX_NDIM: Final = 32


def wire_int(value: object, what: str, lo: int = 0, hi: int = 2**63 - 1) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise ProtocolError(f"{what} must be an integer in [{lo}, {hi}], got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class VarSpec:
    """One variable of a save: where its bytes lie in the ring, and what MATLAB sees."""

    name: str
    dtype: str  # a key of STORED_DTYPES
    dims: tuple[int, ...]  # MATLAB size, column-major order, at least 2
    offset: int
    nbytes: int
    deferred: bool = False  # larger than the ring: its bytes follow in PART messages
    mclass: str | None = None  # "char": uint16 UTF-16 code units that MATLAB sees as text

    @property
    def matlab_class(self) -> str:
        return self.mclass or STORED_DTYPES[self.dtype]

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {
            "name": self.name,
            "dtype": self.dtype,
            "dims": list(self.dims),
            "offset": self.offset,
            "nbytes": self.nbytes,
        }
        if self.deferred:
            wire["deferred"] = True
        if self.mclass:
            wire["mclass"] = self.mclass
        return wire


@dataclass(frozen=True, slots=True)
class Char:
    """A MATLAB char row vector."""

    text: str

    def to_wire(self) -> dict[str, Any]:
        return {"char": self.text}


@dataclass(frozen=True, slots=True)
class Struct:
    """A 1x1 MATLAB struct; field order is kept."""

    fields: tuple[tuple[str, Tree], ...]

    def to_wire(self) -> dict[str, Any]:
        return {"struct": [[k, v.to_wire()] for k, v in self.fields]}


@dataclass(frozen=True, slots=True)
class Cell:
    """A MATLAB cell array; ``items`` in column-major order."""

    dims: tuple[int, ...]
    items: tuple[Tree, ...]

    def to_wire(self) -> dict[str, Any]:
        return {"cell": [v.to_wire() for v in self.items], "dims": list(self.dims)}


@dataclass(frozen=True, slots=True)
class StructArray:
    """A MATLAB struct array of any size (0x0, MxN, N-d): every element has the same
    fields; ``elems`` in column-major order, each the field values in ``names`` order."""

    dims: tuple[int, ...]
    names: tuple[str, ...]
    elems: tuple[tuple[Tree, ...], ...]

    def to_wire(self) -> dict[str, Any]:
        return {
            "structs": list(self.names),
            "dims": list(self.dims),
            "elems": [[v.to_wire() for v in e] for e in self.elems],
        }


@dataclass(frozen=True, slots=True)
class Sparse:
    """A MATLAB sparse matrix (double, complex double or logical) in compressed-column form:
    ``data`` and ``ir`` (int64 row indices) hold the nonzeros, ``jc`` (int64) ``n + 1``
    column starts; all three are leaves in the ring."""

    dims: tuple[int, int]
    data: VarSpec
    ir: VarSpec
    jc: VarSpec

    def to_wire(self) -> dict[str, Any]:
        return {
            "sparse": {"data": self.data.to_wire(), "ir": self.ir.to_wire(), "jc": self.jc.to_wire()},
            "dims": list(self.dims),
        }


Tree = VarSpec | Char | Struct | Cell | StructArray | Sparse  # a VarSpec in a tree is a ring leaf
SPARSE_DTYPES: Final = ("<f8", "<c16", "|b1")


@dataclass(frozen=True, slots=True)
class TreeSpec:
    """A variable that is a struct, cell or char; its numeric leaves live in the ring."""

    name: str
    tree: Tree

    def to_wire(self) -> dict[str, Any]:
        return {"name": self.name, "tree": self.tree.to_wire()}


Variable = VarSpec | TreeSpec


def leaves(node: Variable | Tree) -> list[VarSpec]:
    """The numeric arrays of a variable, wherever they sit in it."""
    if isinstance(node, VarSpec):
        return [node]
    if isinstance(node, TreeSpec):
        return leaves(node.tree)
    if isinstance(node, Struct):
        return [leaf for _, v in node.fields for leaf in leaves(v)]
    if isinstance(node, Cell):
        return [leaf for v in node.items for leaf in leaves(v)]
    if isinstance(node, StructArray):
        return [leaf for e in node.elems for v in e for leaf in leaves(v)]
    if isinstance(node, Sparse):
        return [node.data, node.ir, node.jc]
    return []


MAX_TREE_DEPTH: Final = 16
MAX_DEFERRED_BYTES: Final = 1 << 44  # 16 TiB
MAX_TREE_NODES: Final = 65536


class _Budget:
    """Bounds a tree's size and depth so a hostile message cannot exhaust the daemon."""

    def __init__(self) -> None:
        self.nodes = 0

    def take(self, depth: int) -> None:
        self.nodes += 1
        if self.nodes > MAX_TREE_NODES or depth > MAX_TREE_DEPTH:
            raise ProtocolError(
                f"struct/cell nesting exceeds {MAX_TREE_DEPTH} levels or {MAX_TREE_NODES} elements"
            )


def _tree(raw: object, ring_bytes: int, label: str, budget: _Budget, depth: int = 0) -> Tree:
    budget.take(depth)
    if not isinstance(raw, dict):
        raise ProtocolError(f"{label}: each value must be an object")
    if "char" in raw:
        if not isinstance(raw["char"], str):
            raise ProtocolError(f"{label}: char must be a string")
        return Char(raw["char"])
    if "struct" in raw:
        fields = raw["struct"]
        if not isinstance(fields, list) or not all(isinstance(f, list) and len(f) == 2 for f in fields):
            raise ProtocolError(f"{label}: struct must be a list of [name, value] pairs")
        names = [check_name(f[0]) for f in fields]
        if len(set(names)) != len(names):
            raise ProtocolError(f"{label}: struct field names repeat")
        return Struct(
            tuple(
                (n, _tree(v, ring_bytes, f"{label}.{n}", budget, depth + 1))
                for n, (_, v) in zip(names, fields, strict=True)
            )
        )
    if "cell" in raw:
        items, dims_raw = raw["cell"], raw.get("dims")
        if not isinstance(items, list):
            raise ProtocolError(f"{label}: cell needs a list of items and 2 to {MAX_NDIM} dims")
        dims = _tree_dims(dims_raw, label, len(items))
        return Cell(
            dims,
            tuple(
                _tree(v, ring_bytes, f"{label}{{{i + 1}}}", budget, depth + 1) for i, v in enumerate(items)
            ),
        )
    if "structs" in raw:
        return _struct_array(raw, ring_bytes, label, budget, depth)
    if "sparse" in raw:
        return _sparse(raw, ring_bytes, label, budget)
    return _array(raw, ring_bytes, label)


def _tree_dims(dims_raw: object, label: str, count: int) -> tuple[int, ...]:
    """The size of a cell or struct array: 2 to MAX_NDIM dims holding ``count`` elements."""
    if not isinstance(dims_raw, list) or not 2 <= len(dims_raw) <= MAX_NDIM:
        raise ProtocolError(f"{label}: dims must be a list of 2 to {MAX_NDIM} integers")
    dims = tuple(wire_int(d, f"{label} dimension", 0, MAX_TREE_NODES) for d in dims_raw)
    if math.prod(dims) != count:
        raise ProtocolError(f"{label}: dims {list(dims)} do not hold {count} elements")
    return dims


def _struct_array(
    raw: dict[str, Any], ring_bytes: int, label: str, budget: _Budget, depth: int
) -> StructArray:
    names_raw, elems = raw["structs"], raw.get("elems")
    if not isinstance(names_raw, list) or not isinstance(elems, list):
        raise ProtocolError(f"{label}: a struct array needs 'structs' (field names) and 'elems'")
    names = tuple(check_name(n) for n in names_raw)
    if len(set(names)) != len(names):
        raise ProtocolError(f"{label}: struct field names repeat")
    dims = _tree_dims(raw.get("dims"), label, len(elems))
    out = []
    for i, e in enumerate(elems):
        if not isinstance(e, list) or len(e) != len(names):
            raise ProtocolError(f"{label}({i + 1}): each element holds one value per field")
        out.append(
            tuple(
                _tree(v, ring_bytes, f"{label}({i + 1}).{n}", budget, depth + 1)
                for n, v in zip(names, e, strict=True)
            )
        )
    return StructArray(dims, names, tuple(out))


def _sparse(raw: dict[str, Any], ring_bytes: int, label: str, budget: _Budget) -> Sparse:
    parts, dims_raw = raw["sparse"], raw.get("dims")
    if not isinstance(parts, dict) or not isinstance(dims_raw, list) or len(dims_raw) != 2:
        raise ProtocolError(f"{label}: sparse needs data/ir/jc and 2 dims")
    m, n = (wire_int(d, f"{label} dimension", 0, V5_MAX_DIM) for d in dims_raw)
    leaves_ = []
    for k in ("data", "ir", "jc"):
        part = parts.get(k)
        if not isinstance(part, dict):
            raise ProtocolError(f"{label}: sparse part {k!r} is missing")
        leaves_.append(_array(part, ring_bytes, f"{label}.{k}"))
    data, ir, jc = leaves_
    budget.take(0)
    if data.dtype not in SPARSE_DTYPES or data.mclass:
        raise ProtocolError(f"{label}: sparse data must be one of {SPARSE_DTYPES}, got {data.dtype}")
    nnz = math.prod(data.dims)
    if (ir.dtype, jc.dtype) != ("<i8", "<i8") or math.prod(ir.dims) != nnz or math.prod(jc.dims) != n + 1:
        raise ProtocolError(f"{label}: sparse ir must be {nnz} and jc {n + 1} int64 values")
    if any(x.deferred for x in (data, ir, jc)):
        raise ProtocolError(f"{label}: sparse parts cannot be deferred")
    return Sparse((m, n), data, ir, jc)


def parse_var(raw: object, ring_bytes: int) -> Variable:
    if not isinstance(raw, dict):
        raise ProtocolError("each entry of 'vars' must be an object")
    name = check_name(raw.get("name"))
    if "tree" in raw:
        return TreeSpec(name, _tree(raw["tree"], ring_bytes, name, _Budget()))
    return _array(raw, ring_bytes, name)


#: itemsize and alignment of each stored dtype (a WRITE's check, once per variable)
_SIZES: Final = {d: (np.dtype(d).itemsize, np.dtype(d).alignment) for d in STORED_DTYPES}


def _array(raw: dict[str, Any], ring_bytes: int, name: str) -> VarSpec:
    dtype = raw.get("dtype")
    if not isinstance(dtype, str) or dtype not in STORED_DTYPES:  # a list is unhashable
        raise ProtocolError(f"variable {name!r}: unknown dtype {dtype!r}")
    mclass = raw.get("mclass")
    if mclass is not None and (mclass, dtype) != ("char", "<u2"):
        raise ProtocolError(
            f"variable {name!r}: mclass may only be 'char' (with dtype '<u2'), got {mclass!r} with {dtype!r}"
        )
    dims_raw = raw.get("dims")
    if not isinstance(dims_raw, list) or not 2 <= len(dims_raw) <= MAX_NDIM:
        raise ProtocolError(f"variable {name!r}: dims must be a list of 2 to {MAX_NDIM} integers")
    dims = tuple(wire_int(d, f"variable {name!r} dimension", 0, 2**62) for d in dims_raw)
    itemsize, alignment = _SIZES[dtype]
    expected = math.prod(dims) * itemsize
    if raw.get("deferred") is True:
        if raw.get("offset") != 0 or raw.get("nbytes") != expected or expected > MAX_DEFERRED_BYTES:
            raise ProtocolError(
                f"variable {name!r}: a deferred variable has offset 0 and "
                f"nbytes {expected} (at most {MAX_DEFERRED_BYTES})"
            )
        return VarSpec(name, dtype, dims, 0, expected, deferred=True, mclass=mclass)
    offset = wire_int(raw.get("offset"), f"variable {name!r} offset", 0, ring_bytes)
    nbytes = wire_int(raw.get("nbytes"), f"variable {name!r} nbytes", 0, ring_bytes - offset)
    if expected != nbytes:
        raise ProtocolError(
            f"variable {name!r}: dims {list(dims)} of {dtype} need {expected} bytes, message says {nbytes}"
        )
    if offset % alignment:
        raise ProtocolError(f"variable {name!r}: offset {offset} is not aligned for {dtype}")
    return VarSpec(name, dtype, dims, offset, nbytes, mclass=mclass)


def check_v5_limits(vars: tuple[Variable, ...] | list[Variable]) -> None:
    """Raise :class:`FormatLimitError` if a variable cannot live in a v5 file."""
    for v in (leaf for var in vars for leaf in leaves(var)):
        if v.nbytes > V5_MAX_VARIABLE_BYTES:
            raise FormatLimitError(
                f"variable {v.name!r} is {v.nbytes} bytes; MAT v5 holds at most "
                f"{V5_MAX_VARIABLE_BYTES} bytes per variable: use format='v7.3' or 'auto'"
            )
        if max(v.dims) > V5_MAX_DIM:
            raise FormatLimitError(f"variable {v.name!r}: a dimension exceeds MAT v5's int32 limit")


def check_stream_step(fmt: str, vars: tuple[Variable, ...] | list[Variable]) -> None:
    """A stream grows numeric variables in v7.3; say why anything else cannot."""
    if fmt != "v7.3":
        raise FormatLimitError(
            "a stream needs format='v7.3': MAT v5 cannot grow a variable in place, and "
            "rewriting the whole file at every step would make each step cost the whole run"
        )
    for v in vars:
        if not isinstance(v, VarSpec) or v.mclass:
            raise ProtocolError(
                f"stream variable {v.name!r}: only numeric arrays can grow "
                "(save structs and text with save())"
            )
        if 0 in v.dims:
            raise ProtocolError(f"stream variable {v.name!r}: an empty array cannot grow")
