"""Values -> MATLAB-ordered bytes in the ring.

``prepare`` checks one variable and works out what MATLAB will see (class, size) as an
array ``m`` with ``A(i,j,k) == m[i,j,k]``; the copy then lays ``m`` out column-major.
For numpy arrays and CPU tensors that reorder happens during the one copy into the
ring; for CUDA tensors it happens on the GPU before the one device-to-host copy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
import numbers
from typing import Any, Final, Literal

import numpy as np

from ._errors import UnsupportedTypeError
from ._matlab import check_name, stored_dtype

__all__ = ["LAYOUTS", "ONED_AS", "Prepared", "copy_host", "prepare", "torch_dtype"]

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
        return math.prod(self.dims) * np.dtype(self.dtype).itemsize


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
        arr = np.asarray(value)
        if arr.dtype.kind in "biufc":
            return arr
    raise UnsupportedTypeError(
        f"variable {name!r}: cannot save a {type(value).__module__}.{type(value).__qualname__}; "
        "pass a torch tensor, a numpy array or a number"
    )


def prepare(name: str, value: object, layout: str, oned_as: str) -> Prepared:
    check_name(name)
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


def copy_host(p: Prepared, ring: np.ndarray, offset: int) -> None:
    """Copy a host array into the ring in column-major order (the one copy it gets)."""
    if p.nbytes == 0:
        return
    dest = np.ndarray(p.dims, dtype=np.dtype(p.dtype), buffer=ring, offset=offset, order="F")
    np.copyto(dest, p.array, casting="same_kind")


_TORCH_DTYPES: dict[str, str] = {
    "<f8": "float64", "<f4": "float32", "|i1": "int8", "<i2": "int16", "<i4": "int32",
    "<i8": "int64", "|u1": "uint8", "<u2": "uint16", "<u4": "uint32", "<u8": "uint64",
    "|b1": "bool", "<c8": "complex64", "<c16": "complex128",
}


def torch_dtype(dtype: str) -> Any:
    return getattr(_torch(), _TORCH_DTYPES[dtype])
