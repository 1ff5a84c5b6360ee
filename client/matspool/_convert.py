"""Values -> MATLAB-ordered bytes in the ring.

``prepare`` checks one variable and works out what MATLAB will see (class, size) as an
array ``m`` with ``A(i,j,k) == m[i,j,k]``; the copy then lays ``m`` out column-major.
For numpy arrays and CPU tensors that reorder happens during the one copy into the
ring; for CUDA tensors it happens on the GPU before the one device-to-host copy.
"""

from __future__ import annotations

import math
import numbers
import sys
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import numpy as np

from ._errors import InvalidVariableError, UnsupportedTypeError
from ._matlab import STORED_DTYPES, check_name, stored_dtype

__all__ = ["LAYOUTS", "ONED_AS", "Meta", "Prepared", "Value", "copy_host", "iter_arrays", "prepare",
           "prepare_value", "to_spec", "torch_dtype"]

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

    @property
    def nbytes(self) -> int:
        return math.prod(self.dims) * _ITEMSIZE[self.dtype]


def _torch():
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is an optional extra
        return None
    return torch


def _is_tensor(value: object) -> bool:
    torch = _torch() if type(value).__module__.startswith("torch") else None
    return torch is not None and isinstance(value, torch.Tensor)


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
        t = value.detach()
        if t.layout != _torch().strided:
            raise UnsupportedTypeError(f"variable {name!r}: {t.layout} tensors are not supported; "
                                       "call .to_dense() first")
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


def _numeric_list(value: list[Any] | tuple[Any, ...]) -> np.ndarray | None:
    """A list that numpy turns into a numeric array; None means it becomes a cell."""
    if any(isinstance(v, str | bytes | Mapping) or _is_tensor(v) for v in value):
        return None
    try:
        arr = np.asarray(value)
    except ValueError:  # ragged
        return None
    return arr if arr.dtype.kind in "biufc" else None


def prepare(name: str, value: object, layout: str, oned_as: str) -> Prepared:
    """One numeric array; ``name`` only labels errors (a field path inside a struct)."""
    x = _as_array(name, value)
    if _is_tensor(x):
        source = str(x.dtype).removeprefix("torch.")
        dtype = stored_dtype(name, source)
        if x.device.type == "cpu":
            if source in ("bfloat16", "complex32"):  # numpy has neither; widen in torch
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
    """A struct (``fields``), cell (``items``, a 1xN row) or char (``text``) before placement."""

    kind: Literal["struct", "cell", "char"]
    text: str = ""
    fields: list[tuple[str, Value]] = field(default_factory=list)
    items: list[Value] = field(default_factory=list)


Value = Prepared | Meta
MAX_DEPTH: Final = 16


def prepare_value(label: str, value: object, layout: str, oned_as: str, depth: int = 0) -> Value:
    """dict -> struct, str -> char, a list that is not numeric -> cell, else an array.

    Both formats get the same tree, so a struct reads the same from v5 and v7.3.
    """
    if depth > MAX_DEPTH:
        raise UnsupportedTypeError(f"{label}: nesting deeper than {MAX_DEPTH} levels")
    if isinstance(value, str):
        return Meta("char", text=value)
    if isinstance(value, Mapping):
        fields = []
        for k, v in value.items():
            try:
                check_name(k)
            except InvalidVariableError as e:
                raise InvalidVariableError(f"struct {label!r}: field {e}") from None
            fields.append((k, prepare_value(f"{label}.{k}", v, layout, oned_as, depth + 1)))
        return Meta("struct", fields=fields)
    if isinstance(value, list | tuple) and _numeric_list(value) is None:
        return Meta("cell", items=[prepare_value(f"{label}{{{i + 1}}}", v, layout, oned_as, depth + 1)
                                   for i, v in enumerate(value)])
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


def to_spec(name: str, value: Value, offsets: dict[int, int]) -> Any:
    """The wire form of a value whose arrays were placed at ``offsets`` (keyed by id)."""
    from . import _protocol as proto

    def node(v: Value, label: str) -> Any:
        if isinstance(v, Prepared):
            return proto.VarSpec(label, v.dtype, v.dims, offsets[id(v)], v.nbytes)
        if v.kind == "char":
            return proto.Char(v.text)
        if v.kind == "struct":
            return proto.Struct(tuple((k, node(x, f"{label}.{k}")) for k, x in v.fields))
        return proto.Cell((1, len(v.items)), tuple(node(x, label) for x in v.items))

    tree = node(value, name)
    return tree if isinstance(tree, proto.VarSpec) else proto.TreeSpec(name, tree)


_TILE: Final = 256
_TORCH_MIN_BYTES: Final = 1 << 18  # below this torch's per-call overhead outweighs its speed


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
    dest = np.ndarray(p.dims[::-1], dtype=np.dtype(p.dtype), buffer=ring, offset=offset)
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
    if src.ndim == 2:
        for i in range(0, src.shape[0], _TILE):
            for j in range(0, src.shape[1], _TILE):
                np.copyto(dest[i:i + _TILE, j:j + _TILE], src[i:i + _TILE, j:j + _TILE],
                          casting="same_kind")
        return
    np.copyto(dest, src, casting="same_kind")


_TORCH_DTYPES: dict[str, str] = {
    "<f8": "float64", "<f4": "float32", "|i1": "int8", "<i2": "int16", "<i4": "int32",
    "<i8": "int64", "|u1": "uint8", "<u2": "uint16", "<u4": "uint32", "<u8": "uint64",
    "|b1": "bool", "<c8": "complex64", "<c16": "complex128",
}


def torch_dtype(dtype: str) -> Any:
    return getattr(_torch(), _TORCH_DTYPES[dtype])
