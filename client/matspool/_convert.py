"""Values -> the tree MATLAB will see: struct, struct array, cell, char and sparse around
numeric arrays.

``prepare_value`` turns one variable (a dict, a list, a str, a record or object array, a
scipy or torch sparse matrix, or an array) into a tree of ``Meta`` nodes whose leaves are
numeric arrays prepared by ``_numeric``; both formats get the same tree, so a value reads
the same from v5 and v7.3. ``_wire`` turns a placed tree into its wire form.

Threads: no state; the thread of the save being planned.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal

import numpy as np

from ._errors import InvalidVariableError, UnsupportedTypeError
from ._matlab import check_name
from ._numeric import (
    MAX_DEPTH,
    Prepared,
    _is_tensor,
    _matlab_order,
    _numeric_list,
    copy_host,
    prepare,
    torch_dtype,
)

if TYPE_CHECKING:
    import torch

# copy_host and prepare are re-exported: _spool and tests import them from here
__all__ = [
    "INLINE_TEXT",
    "INT_AS",
    "MAX_DEPTH",
    "Meta",
    "Value",
    "copy_host",
    "ints_as_double",
    "prepare",
    "prepare_value",
    "utf16_units",
]


#: ``int_as``: what a Python ``int`` becomes. numpy's rule (int64) by default; "double" for
#: MATLAB code that does arithmetic on step numbers and counts (int64 * 0.5 is an error or
#: an integer there). numpy and torch integer arrays keep their class either way.
INT_AS: Final = ("int64", "double")


def ints_as_double(label: str, value: Any, depth: int = 0) -> Any:
    """``value`` with every Python ``int`` (not bool), in dicts, lists and tuples at any
    depth, made a float; one that double cannot hold exactly is refused."""
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            f = float(value)
        except OverflowError:
            f = math.inf
        if f != value:
            raise InvalidVariableError(
                f"variable {label!r}: the int {value} is not exact in MATLAB double (beyond 2^53); "
                "save it with int_as='int64'"
            )
        return f
    if depth > MAX_DEPTH:
        return value  # prepare_value reports the nesting limit
    if isinstance(value, Mapping):
        return {k: ints_as_double(f"{label}.{k}", v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        out = [ints_as_double(f"{label}{{{i + 1}}}", v, depth + 1) for i, v in enumerate(value)]
        return out if isinstance(value, list) else tuple(out)
    return value


@dataclass(slots=True)
class Meta:
    """A struct, struct array, cell, char or sparse value before placement.

    ``fields`` is a 1x1 struct; ``names`` and ``elems`` a struct array of size ``dims``;
    ``items`` a cell of size ``dims``; ``text`` a char row; ``parts`` the data, row
    indices and column starts of a sparse matrix of size ``dims``. Elements of cells and
    struct arrays are in column-major order, as MATLAB stores them.
    """

    kind: Literal["struct", "cell", "char", "structs", "sparse"]
    text: str = ""
    fields: list[tuple[str, Value]] = field(default_factory=list)
    items: list[Value] = field(default_factory=list)
    dims: tuple[int, ...] = (1, 1)
    names: tuple[str, ...] = ()
    elems: list[list[Value]] = field(default_factory=list)
    parts: tuple[Prepared, ...] = ()


Value = Prepared | Meta
#: Text longer than this travels through the ring as UTF-16 code units, not in the message.
INLINE_TEXT: Final = 1024


def utf16_units(label: str, text: str) -> np.ndarray:
    """``text`` as MATLAB's char holds it: UTF-16 code units (a character beyond the BMP
    is two). A lone surrogate has no UTF-16 form: refused, naming the variable."""
    try:
        raw = text.encode("utf-16-le")
    except UnicodeEncodeError as e:
        raise InvalidVariableError(
            f"variable {label!r}: text holds a lone surrogate {text[e.start]!r} at index {e.start}, "
            "which MATLAB's UTF-16 char cannot store"
        ) from None
    return np.frombuffer(raw, dtype="<u2")


def _char_leaf(label: str, units: np.ndarray) -> Prepared:
    return Prepared(label, "<u2", tuple(int(d) for d in units.shape), units, False, mclass="char")


def _char_matrix(label: str, arr: np.ndarray) -> Value:
    """A numpy str array: shape ``s`` of strings -> a char array of size ``s + (L,)`` (a 1-d
    array of n strings is an n x L matrix), each row padded with spaces to the longest
    row's UTF-16 length, as MATLAB's ``char()`` pads."""
    if arr.ndim == 0:
        return prepare_value(label, str(arr), "matlab", "row")
    rows = [utf16_units(label, str(x)) for x in arr.reshape(-1)]
    width = max((len(r) for r in rows), default=0)
    out = np.full((len(rows), width), 0x20, dtype="<u2")
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return _char_leaf(label, out.reshape(*arr.shape, width))


def _is_sparse(value: object) -> bool:
    if type(value).__module__.startswith("scipy.sparse"):
        return hasattr(value, "tocsc")
    return _is_tensor(value) and value.layout in _sparse_layouts()


def _sparse_layouts() -> tuple[torch.layout, ...]:
    import torch  # loaded already: only asked about a tensor

    return (torch.sparse_coo, torch.sparse_csr, torch.sparse_csc)


def _sparse_dtype(label: str, kind: str) -> str:
    """MATLAB's sparse classes: double, complex double and logical; other numbers widen."""
    if kind == "b":
        return "|b1"
    if kind == "c":
        return "<c16"
    if kind in "iuf":
        return "<f8"
    raise UnsupportedTypeError(f"variable {label!r}: a sparse matrix of {kind!r} values has no MATLAB class")


def _sparse(label: str, value: Any) -> Meta:
    """scipy.sparse (any format) or a torch sparse COO/CSR/CSC tensor -> MATLAB sparse, in
    compressed-column form with sorted row indices. A CUDA tensor's indices and values stay
    on the GPU and are copied like dense tensors."""
    if _is_tensor(value):
        import torch  # loaded already: value is one of its tensors

        t = value.detach()
        if t.ndim != 2:
            raise UnsupportedTypeError(f"variable {label!r}: MATLAB sparse matrices are 2-d, got {t.ndim}-d")
        if t.layout == torch.sparse_coo:
            t = t.coalesce()
        c = t.to_sparse_csc()
        dtype = _sparse_dtype(label, "b" if c.dtype == torch.bool else "c" if c.dtype.is_complex else "f")
        data = c.values().to(torch_dtype(dtype))
        ir, jc = c.row_indices().to(torch.int64), c.ccol_indices().to(torch.int64)
        parts = tuple(
            prepare(f"{label}.{k}", x.reshape(-1, 1), "matlab", "column")
            for k, x in (("data", data), ("ir", ir), ("jc", jc))
        )
        return Meta("sparse", dims=(int(t.shape[0]), int(t.shape[1])), parts=parts)
    if len(value.shape) != 2:
        raise UnsupportedTypeError(f"variable {label!r}: MATLAB sparse matrices are 2-d")
    c = value.tocsc(copy=True)
    c.sum_duplicates()
    c.eliminate_zeros()  # MATLAB never stores a zero
    c.sort_indices()
    dtype = _sparse_dtype(label, c.dtype.kind)
    arrays = (("data", c.data.astype(dtype)), ("ir", c.indices.astype("<i8")), ("jc", c.indptr.astype("<i8")))
    parts = tuple(
        Prepared(f"{label}.{k}", np.dtype(x.dtype).str, (x.size, 1), x.reshape(-1, 1), False)
        for k, x in arrays
    )
    return Meta("sparse", dims=(int(c.shape[0]), int(c.shape[1])), parts=parts)


def _struct_names(label: str, keys: Iterator[Any] | list[Any]) -> tuple[str, ...]:
    names = []
    for k in keys:
        try:
            names.append(check_name(k))
        except InvalidVariableError as e:
            raise InvalidVariableError(f"struct {label!r}: field {e}") from None
    return tuple(names)


def _same_keys(value: list[Any] | tuple[Any, ...]) -> bool:
    """A non-empty list of dicts that all have the same keys is a struct array."""
    if not value or not all(isinstance(v, Mapping) for v in value):
        return False
    first = set(value[0])
    return all(set(v) == first for v in value[1:])


def prepare_value(label: str, value: object, layout: str, oned_as: str, depth: int = 0) -> Value:
    """dict -> struct; list of same-keyed dicts or a record array -> struct array; str or a
    str array -> char; list or object array -> cell; scipy/torch sparse -> sparse; else an array.

    Both formats get the same tree, so a value reads the same from v5 and v7.3.
    """
    if depth > MAX_DEPTH:
        raise UnsupportedTypeError(f"{label}: nesting deeper than {MAX_DEPTH} levels")

    def sub(lab: str, v: object) -> Value:
        return prepare_value(lab, v, layout, oned_as, depth + 1)

    if isinstance(value, str):
        units = utf16_units(label, value)
        if len(units) > INLINE_TEXT:
            return _char_leaf(label, units.reshape(1, -1) if len(units) else units.reshape(0, 0))
        return Meta("char", text=value)
    if isinstance(value, Mapping):
        names = _struct_names(label, list(value))
        return Meta("struct", fields=[(k, sub(f"{label}.{k}", value[k])) for k in names])
    if isinstance(value, np.ndarray | np.generic) and value.dtype.kind in "US":
        arr = np.asarray(value)
        if arr.dtype.kind == "S":
            arr = np.char.decode(arr, "latin-1")
        return _char_matrix(label, arr)
    if isinstance(value, np.ndarray | np.generic) and value.dtype.names is not None:
        arr = _matlab_order(np.asarray(value), layout, oned_as)
        names = _struct_names(label, list(arr.dtype.names))
        flat = arr.ravel(order="F")
        elems = [[sub(f"{label}({i + 1}).{k}", e[k]) for k in names] for i, e in enumerate(flat)]
        return Meta("structs", dims=tuple(int(d) for d in arr.shape), names=names, elems=elems)
    if isinstance(value, np.ndarray) and value.dtype.kind == "O":
        arr = _matlab_order(value, layout, oned_as)
        items = [sub(f"{label}{{{i + 1}}}", v) for i, v in enumerate(arr.ravel(order="F"))]
        return Meta("cell", items=items, dims=tuple(int(d) for d in arr.shape))
    if _is_sparse(value):
        return _sparse(label, value)
    if isinstance(value, list | tuple):
        dims = (1, len(value)) if oned_as == "row" else (len(value), 1)
        if _same_keys(value):
            names = _struct_names(label, list(value[0]))
            elems = [[sub(f"{label}({i + 1}).{k}", v[k]) for k in names] for i, v in enumerate(value)]
            return Meta("structs", dims=dims, names=names, elems=elems)
        if _numeric_list(value) is None:
            return Meta("cell", dims=dims, items=[sub(f"{label}{{{i + 1}}}", v) for i, v in enumerate(value)])
    return prepare(label, value, layout, oned_as)
