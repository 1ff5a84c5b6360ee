"""The planner: a save's arguments and values, checked, turned into a :class:`Plan`.

Everything a user can get wrong is caught here, in the caller's thread, before any ring
space is taken: names, types, format limits, a stream step's shape. A plan says where
each array goes relative to the save's region, and, for a save larger than the ring,
which arrays travel in slabs.

A time-step loop saves the same names, dtypes and shapes again and again: a plain save
of ndarrays reuses the layout checked for the first one (a template keyed by everything
the checks read: names, dtype, shape, strides, format, layout, ring size), and only the
path, which changes every step, is checked again. A template is only ever made by a save
that passed every check, so reusing one skips no check a different save could fail.

Threads: the caller's; plans are immutable once made. The template cache is a dict
shared by callers' threads: lookups and stores are single dict operations (atomic under
the GIL), and two threads making the same template store equal values.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from . import _protocol as proto
from ._convert import INT_AS, Value, ints_as_double, prepare_value
from ._errors import InvalidOptionError, PayloadTooLarge
from ._matlab import V5_MAX_DIM, V5_MAX_VARIABLE_BYTES, check_name
from ._numeric import LAYOUTS, ONED_AS, Prepared, _matlab_order
from ._saves import place
from ._wire import check_wire_size, iter_arrays, to_spec

__all__ = ["DEFAULT_LEVEL", "ON_FULL", "Plan", "check_choice", "level", "plan"]

ON_FULL: Final = ("block", "raise")
DEFAULT_LEVEL: Final = 3  # what MATLAB's own v7.3 writer uses


def check_choice(what: str, value: object, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise InvalidOptionError(f"{what} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def level(compress: object) -> int:
    """compress=False/True/0..9 -> a deflate level, 0 meaning off."""
    if isinstance(compress, bool):
        return DEFAULT_LEVEL if compress else 0
    if isinstance(compress, int) and 0 <= compress <= 9:
        return compress
    raise ValueError(f"compress must be True, False or a level 1-9, got {compress!r}")


def check_path(path: object) -> str:
    """Absolute (against the caller's cwd now) and representable on the wire."""
    try:
        text = os.fsdecode(os.fspath(path))  # type: ignore[call-overload]
    except TypeError:
        raise TypeError(f"path must be a str or os.PathLike, not {type(path).__name__}") from None
    if not text or "\x00" in text:
        raise ValueError(f"path must be non-empty and contain no NUL byte: {text!r}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"path is not valid UTF-8: {text!r}") from None
    if text[0] == "/" and "//" not in text and "/." not in text and text[-1] != "/":
        return text  # absolute and already normal: what abspath would return
    return os.path.abspath(text)


@dataclass(frozen=True, slots=True)
class Plan:
    """One save, checked. ``relative`` maps ``id(array)`` to its offset in the region."""

    path: str
    format: str
    fsync: bool
    level: int
    mode: str  # "write", or a stream's "create"/"append"
    values: dict[str, Value]
    arrays: list[Prepared]
    relative: dict[int, int]
    total: int  # bytes of the region
    slabs: dict[str, tuple[int, int]] | None = None  # in pieces: name -> (axis, planes per slab)
    append: bool = False  # MATLAB's save -append (a whole save only)
    plain: bool = False  # every value a plain array (made from a template)

    def specs(self, base: int) -> list[proto.Variable]:
        """The WRITE's variables with the region at ``base``."""
        if self.plain:
            rel = self.relative
            return [proto.VarSpec(a.name, a.dtype, a.dims, base + rel[id(a)], a.nbytes) for a in self.arrays]
        offsets = {key: base + off for key, off in self.relative.items()}
        slabs = self.slabs or {}
        return [
            proto.VarSpec(n, v.dtype, v.dims, 0, v.nbytes, deferred=True)  # type: ignore[union-attr]
            if n in slabs
            else to_spec(n, v, offsets)
            for n, v in self.values.items()
        ]


def plan(
    path: object,
    variables: Mapping[str, Any],
    fmt: str,
    layout: str,
    oned_as: str,
    fsync: bool,
    compress: int,
    mode: str,
    ring_size: int,
    append: bool = False,
    int_as: str = "int64",
) -> Plan:
    """Check a save and lay it out for a ring of ``ring_size`` bytes."""
    check_choice("layout", layout, LAYOUTS)
    check_choice("int_as", int_as, INT_AS)
    check_choice("oned_as", oned_as, ONED_AS)
    if not isinstance(fsync, bool):
        raise TypeError(f"fsync must be a bool, got {fsync!r}")
    key = _template_key(variables, fmt, layout, oned_as, compress, mode, ring_size, append)
    if key is not None:
        template = _TEMPLATES.get(key)
        if template is not None:
            return template.plan(check_path(path), variables, layout, oned_as, fsync, compress)
        made = _plan(path, variables, fmt, layout, oned_as, fsync, compress, mode, ring_size, append, int_as)
        if made.slabs is None and len(made.arrays) == len(made.values):
            if len(_TEMPLATES) >= _MAX_TEMPLATES:
                _TEMPLATES.clear()  # a loop's few layouts come back at once
            _TEMPLATES[key] = _Template.of(made)
        return made
    return _plan(path, variables, fmt, layout, oned_as, fsync, compress, mode, ring_size, append, int_as)


# -- templates: the checked layout of a plain save of ndarrays, reused ----------------------
_MAX_TEMPLATES: Final = 256
_TEMPLATES: dict[tuple[Any, ...], _Template] = {}
#: dtype kinds a template may hold: numeric and logical (text, records, objects take the
#: general path, their checks depend on more than dtype and shape)
_PLAIN_KINDS: Final = frozenset("biufc")


def _template_key(
    variables: object,
    fmt: str,
    layout: str,
    oned_as: str,
    compress: int,
    mode: str,
    ring_size: int,
    append: bool,
) -> tuple[Any, ...] | None:
    """Everything the checks of a plain save read, or None for any other save."""
    if mode != "write" or append is not False or type(variables) is not dict or not variables:
        return None
    parts = []
    for name, v in variables.items():
        if type(name) is not str or type(v) is not np.ndarray or v.dtype.kind not in _PLAIN_KINDS:
            return None
        parts.append((name, v.shape, v.strides, v.dtype))
    return (fmt, layout, oned_as, compress, ring_size, tuple(parts))


@dataclass(frozen=True, slots=True)
class _Template:
    """A checked plan's layout, without its path and arrays."""

    format: str
    names: tuple[str, ...]
    dtypes: tuple[str, ...]
    dims: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    total: int

    @staticmethod
    def of(p: Plan) -> _Template:
        arrays = [p.values[n] for n in p.values]
        assert all(isinstance(a, Prepared) for a in arrays)
        return _Template(
            p.format,
            tuple(p.values),
            tuple(a.dtype for a in arrays),  # type: ignore[union-attr]
            tuple(a.dims for a in arrays),
            tuple(p.relative[id(a)] for a in arrays),
            p.total,
        )

    def plan(
        self,
        path: str,
        variables: Mapping[str, Any],
        layout: str,
        oned_as: str,
        fsync: bool,
        compress: int,
    ) -> Plan:
        values: dict[str, Value] = {}
        arrays: list[Prepared] = []
        relative: dict[int, int] = {}
        for name, x, dtype, dims, off in zip(
            self.names, variables.values(), self.dtypes, self.dims, self.offsets, strict=True
        ):
            a = Prepared(name, dtype, dims, _matlab_order(x, layout, oned_as), False)
            values[name] = a
            arrays.append(a)
            relative[id(a)] = off
        return Plan(
            path, self.format, fsync, compress, "write", values, arrays, relative, self.total, plain=True
        )


def _plan(
    path: object,
    variables: Mapping[str, Any],
    fmt: str,
    layout: str,
    oned_as: str,
    fsync: bool,
    compress: int,
    mode: str,
    ring_size: int,
    append: bool,
    int_as: str,
) -> Plan:
    """``plan`` without templates: every check, every time."""
    if not isinstance(variables, Mapping) or not variables:
        raise TypeError("variables must be a non-empty mapping of MATLAB names to arrays")
    if len(variables) > proto.MAX_VARS:
        raise ValueError(f"at most {proto.MAX_VARS} variables per save, got {len(variables)}")
    abspath = check_path(path)
    if int_as == "double":
        variables = {name: ints_as_double(str(name), value) for name, value in variables.items()}
    values = {
        check_name(name): prepare_value(name, value, layout, oned_as) for name, value in variables.items()
    }
    check_wire_size(values)
    arrays = [a for v in values.values() for a in iter_arrays(v)]
    if fmt == "auto":
        fmt = "v7.3" if any(a.nbytes > V5_MAX_VARIABLE_BYTES for a in arrays) else "v5"
    relative, total = place(arrays)
    over_v5 = fmt == "v5" and any(
        a.nbytes > V5_MAX_VARIABLE_BYTES or max(a.dims) > V5_MAX_DIM for a in arrays
    )
    if over_v5 or mode != "write":
        provisional = [to_spec(n, v, relative) for n, v in values.items()]
        if fmt == "v5":
            proto.check_v5_limits(provisional)
        if mode != "write":
            proto.check_stream_step(fmt, provisional)
    if total <= ring_size or mode != "write":
        return Plan(abspath, fmt, fsync, compress, mode, values, arrays, relative, total, append=append)
    if append:
        raise PayloadTooLarge(
            f"append=True needs the whole save in the ring ({ring_size} bytes); this one is {total}"
        )
    return _in_pieces(Plan(abspath, fmt, fsync, compress, mode, values, arrays, relative, total), ring_size)


def _in_pieces(whole: Plan, ring_size: int) -> Plan:
    """A save larger than the ring: its largest arrays travel in slabs of about a
    quarter of the ring, the rest is laid out in one region first."""
    if whole.level:
        raise PayloadTooLarge(
            f"a compressed save must fit in the ring ({ring_size} bytes); "
            "raise ring_bytes or save uncompressed"
        )
    values = whole.values
    budget = ring_size // 4
    slabs: dict[str, tuple[int, int]] = {}
    rest = sum(a.nbytes for a in whole.arrays)
    for name in sorted(values, key=lambda n: -sum(a.nbytes for a in iter_arrays(values[n]))):
        v = values[name]
        if rest <= budget or not isinstance(v, Prepared) or v.nbytes <= budget // 4:
            break
        axis = max(i for i, d in enumerate(v.dims) if d > 1)  # slabs along it are contiguous
        plane = v.nbytes // v.dims[axis]
        if plane > ring_size // 2:
            raise PayloadTooLarge(
                f"variable {name!r}: one slab along its last dimension is {plane} bytes; a save "
                f"in pieces needs a ring of at least twice that (ring_bytes={ring_size})"
            )
        slabs[name] = (axis, max(1, budget // plane))
        rest -= v.nbytes
    if rest > ring_size // 2:
        raise PayloadTooLarge(
            f"this save's variables that cannot be split take {rest} bytes; "
            f"the ring holds {ring_size}: raise ring_bytes"
        )
    small = [a for n, v in values.items() if n not in slabs for a in iter_arrays(v)]
    relative, total = place(small)
    return Plan(whole.path, whole.format, whole.fsync, 0, "write", values, small, relative, total, slabs)
