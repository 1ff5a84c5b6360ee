"""Values -> MATLAB-ordered bytes in the ring.

``prepare`` checks one variable and works out what MATLAB will see (class, size) as an
array ``m`` with ``A(i,j,k) == m[i,j,k]``; the copy then lays ``m`` out column-major.
For numpy arrays and CPU tensors that reorder happens during the one copy into the
ring; for CUDA tensors it happens on the GPU before the one device-to-host copy.
"""

from __future__ import annotations

import functools
import json
import math
import numbers
import sys
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any, Final, Literal, TypeGuard

import numpy as np

from ._errors import FormatLimitError, InvalidVariableError, UnsupportedTypeError
from ._matlab import FLOAT8, STORED_DTYPES, check_name, stored_dtype

if TYPE_CHECKING:
    import torch

__all__ = [
    "INLINE_TEXT",
    "INT_AS",
    "LAYOUTS",
    "ONED_AS",
    "Meta",
    "Prepared",
    "Value",
    "check_wire_size",
    "copy_host",
    "ints_as_double",
    "iter_arrays",
    "prepare",
    "prepare_value",
    "to_spec",
    "torch_dtype",
    "utf16_units",
]

_ITEMSIZE: Final = {dt: np.dtype(dt).itemsize for dt in STORED_DTYPES}
Layout = Literal["matlab", "raw", "hwc"]
LAYOUTS: Final = ("matlab", "raw", "hwc")
ONED_AS: Final = ("row", "column")


@dataclass(slots=True)
class Prepared:
    """One variable, checked, waiting for its copy into the ring."""

    name: str
    dtype: str  # ring dtype, a key of STORED_DTYPES
    dims: tuple[int, ...]  # MATLAB size
    array: Any  # numpy array or torch tensor, in MATLAB index order
    is_cuda: bool
    mclass: str | None = None  # "char": UTF-16 code units (uint16) that MATLAB sees as text

    @property
    def nbytes(self) -> int:
        return math.prod(self.dims) * _ITEMSIZE[self.dtype]


def _torch() -> ModuleType | None:
    """The torch module, or None where the optional extra is not installed."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is an optional extra
        return None
    return torch


def _is_tensor(value: object) -> TypeGuard[torch.Tensor]:
    """A torch tensor, subclasses included (``nn.Parameter``, ``as_subclass``, a user's
    own); torch is never imported here: a caller holding a tensor has imported it."""
    lib = sys.modules.get("torch")
    return lib is not None and isinstance(value, lib.Tensor)


def _plain_tensor(name: str, t: Any) -> Any:
    """A tensor subclass as the plain tensor over the same memory, or a refusal that says
    what to call instead. A subclass that wraps no storage of its own (a DTensor, a fake
    or functional tensor) has no memory to copy from."""
    torch = _torch()
    assert torch is not None  # t is one of its tensors
    if type(t) is torch.Tensor:
        return t
    if any(c.__name__ == "DTensor" for c in type(t).__mro__):
        raise UnsupportedTypeError(
            f"variable {name!r}: a DTensor is sharded over ranks; save its global value with "
            "dtensor.full_tensor() (gathered on every rank) or this rank's shard with "
            "dtensor.to_local()"
        )
    if hasattr(t, "trigger_wait"):  # AsyncCollectiveTensor (DTensor.to_local()): the result
        t = t.trigger_wait()
        if type(t) is torch.Tensor:
            return t
    try:
        plain = t.as_subclass(torch.Tensor)
        if plain.numel():
            plain.data_ptr()  # raises for wrapper subclasses, which hold no storage
    except (RuntimeError, TypeError) as e:
        raise UnsupportedTypeError(
            f"variable {name!r}: cannot read the data of a {type(t).__module__}."
            f"{type(t).__qualname__} ({e}); pass a plain tensor (e.g. .as_subclass(torch.Tensor), "
            ".to_local() or .full_tensor())"
        ) from None
    return plain


def _matlab_order(x: Any, layout: str, oned_as: str) -> Any:
    """Reindex ``x`` (numpy or torch) so that ``m[i,j,...]`` is MATLAB's ``A(i,j,...)``."""
    nd = x.ndim
    if nd == 0:
        return x.reshape(1, 1)
    if nd == 1:
        return x.reshape(1, -1) if oned_as == "row" else x.reshape(-1, 1)
    if layout == "raw":
        return x.permute(*range(nd - 1, -1, -1)) if _is_tensor(x) else x.transpose()
    if layout == "hwc" and nd in (3, 4):
        axes = (1, 2, 0) if nd == 3 else (2, 3, 1, 0)  # CHW -> HWC, NCHW -> HWCN
        return x.permute(*axes) if _is_tensor(x) else x.transpose(axes)
    return x


def _as_array(name: str, value: object) -> Any:
    if _is_tensor(value):
        import torch  # loaded already: value is one of its tensors

        t = _plain_tensor(name, value).detach()
        if t.layout != torch.strided:
            raise UnsupportedTypeError(
                f"variable {name!r}: {t.layout} tensors are not supported; call .to_dense() first"
            )
        if t.device.type not in ("cpu", "cuda"):
            raise UnsupportedTypeError(f"variable {name!r}: tensors on {t.device} are not supported")
        return t
    if isinstance(value, np.ndarray | np.generic):
        return np.asarray(value)
    if isinstance(value, bool | numbers.Number):
        return np.asarray(value)
    if isinstance(value, list | tuple):
        arr = _numeric_list(value)
        if arr is not None:
            return arr
    raise UnsupportedTypeError(
        f"variable {name!r}: cannot save a {type(value).__module__}.{type(value).__qualname__}; "
        "pass a torch tensor, a numpy array, a number, a str, a dict or a list"
    )


def _plain_numbers(value: list[Any] | tuple[Any, ...], depth: int = 0) -> bool:
    """Only numbers, possibly in nested lists: never arrays or tensors, which would be
    silently stacked (a list of arrays is a cell; to get one array, the caller stacks)."""
    for v in value:
        if isinstance(v, list | tuple):
            if depth >= MAX_DEPTH or not _plain_numbers(v, depth + 1):
                return False
        elif not (
            isinstance(v, bool | numbers.Number) or (isinstance(v, np.generic) and v.dtype.kind in "biufc")
        ):
            return False
    return True


def _numeric_list(value: list[Any] | tuple[Any, ...]) -> np.ndarray | None:
    """A list that numpy turns into a numeric array; None means it becomes a cell."""
    if not _plain_numbers(value):
        return None
    try:
        arr = np.asarray(value)
    except ValueError:  # ragged
        return None
    return arr if arr.dtype.kind in "biufc" else None


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


def prepare(name: str, value: object, layout: str, oned_as: str) -> Prepared:
    """One numeric array; ``name`` only labels errors (a field path inside a struct)."""
    x = _as_array(name, value)
    if _is_tensor(x):
        source = str(x.dtype).removeprefix("torch.")
        dtype = stored_dtype(name, source)
        if x.device.type == "cpu":
            if source in ("bfloat16", "complex32", *FLOAT8):  # not in numpy: widen in torch
                x = x.to(torch_dtype(dtype))
            x = x.resolve_conj().resolve_neg().numpy()
            is_cuda = False
        else:
            is_cuda = True
    else:
        dtype = stored_dtype(name, x.dtype.name)
        is_cuda = False
    m = _matlab_order(x, layout, oned_as)
    return Prepared(name, dtype, tuple(int(d) for d in m.shape), m, is_cuda)


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
MAX_DEPTH: Final = 16
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


_TILE: Final = 256
_TORCH_MIN_BYTES: Final = 1 << 18  # below this torch's per-call overhead outweighs its speed


@functools.lru_cache(maxsize=64)
def _dtype(name: str) -> np.dtype[Any]:
    return np.dtype(name)


def copy_host(p: Prepared, ring: np.ndarray, offset: int) -> None:
    """Copy a host array into the ring in column-major order (the one copy it gets).

    Column-major over ``dims`` is row-major over the reversed dims, so the copy is
    ``dest[...] = m.transpose()``: a memcpy when ``m`` is already column-major (or
    ``layout="raw"``), otherwise a transpose. numpy's element-wise transpose is cache-
    hostile (about 12x a memcpy); torch's, when the caller has torch loaded, runs at
    2-4x, and without torch a tiled copy keeps both sides in cache.
    """
    if p.nbytes == 0:
        return
    dest = np.ndarray(p.dims[::-1], dtype=_dtype(p.dtype), buffer=ring, offset=offset)
    src = p.array.transpose()
    if src.flags.c_contiguous or src.ndim < 2:
        np.copyto(dest, src, casting="same_kind")
        return
    torch = sys.modules.get("torch")
    if torch is not None and src.dtype.isnative and p.nbytes >= _TORCH_MIN_BYTES:
        try:
            with warnings.catch_warnings():  # read-only sources (broadcasts) are only read
                warnings.simplefilter("ignore", UserWarning)
                source = torch.from_numpy(src)
            torch.from_numpy(dest).copy_(source)
            return
        except (TypeError, ValueError, RuntimeError):
            pass  # a dtype or stride torch does not take: numpy below
    if src.ndim == 2 and (src.shape[0] > _TILE or src.shape[1] > _TILE):
        for i in range(0, src.shape[0], _TILE):
            for j in range(0, src.shape[1], _TILE):
                np.copyto(
                    dest[i : i + _TILE, j : j + _TILE], src[i : i + _TILE, j : j + _TILE], casting="same_kind"
                )
        return
    np.copyto(dest, src, casting="same_kind")


def torch_dtype(dtype: str) -> Any:
    """The torch dtype of a stored dtype: numpy and torch share the names (``float32``,
    ``bool``, ``complex64``...)."""
    return getattr(_torch(), np.dtype(dtype).name)
