"""One numeric array -> what MATLAB will see, and its one copy into the ring.

``prepare`` checks one array (a torch tensor, a numpy array, a number, a list of numbers)
and works out what MATLAB will see (class, size) as an array ``m`` with
``A(i,j,k) == m[i,j,k]``; ``copy_host`` then lays ``m`` out column-major in the ring. For
numpy arrays and CPU tensors that reorder happens during the one copy into the ring; for
CUDA tensors it happens on the GPU before the one device-to-host copy (``_cuda``).
The value trees built from these leaves (struct, cell, char, sparse) are ``_convert``'s.

Threads: no state; any thread (a save's caller, or a copy worker for ``copy_host``).
"""

from __future__ import annotations

import functools
import math
import numbers
import sys
import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, Final, Literal, TypeGuard

import numpy as np

from . import _transpose
from ._errors import UnsupportedTypeError
from ._matlab import FLOAT8, STORED_DTYPES, stored_dtype

if TYPE_CHECKING:
    import torch

__all__ = [
    "LAYOUTS",
    "MAX_DEPTH",
    "ONED_AS",
    "Prepared",
    "copy_host",
    "prepare",
    "torch_dtype",
]

_ITEMSIZE: Final = {dt: np.dtype(dt).itemsize for dt in STORED_DTYPES}
Layout = Literal["matlab", "raw", "hwc"]
LAYOUTS: Final = ("matlab", "raw", "hwc")
ONED_AS: Final = ("row", "column")
MAX_DEPTH: Final = 16


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
    hostile (about 12x a memcpy in 2-d, 10-30x in 3-d), and so is torch's for 3-d and up;
    ``_transpose.reverse_axes`` copies in cache-sized tiles on several threads (3-5x in
    2-d and 3-d on 2 busy cores). torch's own blocked 2-d transpose stays the choice for
    2-d arrays of elements up to 4 bytes, where numpy's per-element cost dominates (the
    tiles measured 1.1-1.2x torch's time for float32 on this 2-core VM).
    """
    if p.nbytes == 0:
        return
    dest = np.ndarray(p.dims[::-1], dtype=_dtype(p.dtype), buffer=ring, offset=offset)
    src = p.array.transpose()
    if src.flags.c_contiguous or src.ndim < 2:
        np.copyto(dest, src, casting="same_kind")
        return
    torch = sys.modules.get("torch")
    m = p.array
    by_torch = (
        torch is not None
        and src.dtype.isnative
        and p.nbytes >= _TORCH_MIN_BYTES
        and (m.ndim == 2 and max(m.itemsize, dest.itemsize) <= 4)
    )
    if not by_torch and p.nbytes >= _transpose.MIN_BYTES and _transpose.tiled(m, dest):
        _transpose.reverse_axes(m, dest)
        return
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
