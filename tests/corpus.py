"""The MATLAB conformance corpus (``tests/data/matlab``, see PROVENANCE.md) saved again
through matspool and read back by every reader there is, each compared with the same
reader's view of MATLAB's own file.

``run(save, out)`` saves every corpus file's variables in both formats with
``save(path, variables, fmt)`` and returns one :class:`Row` per variable; ``python
tests/corpus.py`` prints the README table (it starts its own daemon through
``matspool.save``).
"""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import scipy.io
import scipy.sparse as sp

sys.path.insert(0, str(Path(__file__).parent))
import matvalues

__all__ = ["CORPUS", "READERS", "Row", "corpus_files", "run", "same", "table"]

CORPUS = Path(__file__).parent / "data" / "matlab"
OCTAVE = shutil.which("octave")
MATDUMP = shutil.which("matdump")
#: reader -> the formats it reads; each compares MATLAB's file with ours in that format
READERS: dict[str, tuple[str, ...]] = {
    "matvalues": ("v5", "v7.3"),  # tests/matvalues.py: class, size, bits, fields, cells
    "scipy": ("v5",),
    "pymatreader": ("v5", "v7.3"),
    "h5py": ("v7.3",),  # HDF5 structure: attributes and their types, datasets, #refs#
    "mat73": ("v7.3",),
    "hdf5storage": ("v7.3",),
    "octave": ("v5",),
    "matdump": ("v5", "v7.3"),
}


def corpus_files() -> list[Path]:
    return sorted(CORPUS.glob("*.mat"))


def same(a: Any, b: Any, loose: bool = False) -> bool:
    """Deep equality of two readers' values: types, dtypes, shapes, field order, bits
    (``loose``: numbers compare by value, whatever their dtype)."""
    if (
        loose
        and isinstance(a, np.ndarray | np.generic | int | float)
        and isinstance(b, np.ndarray | np.generic | int | float)
    ):
        x, y = np.asarray(a), np.asarray(b)
        if x.dtype.kind in "biufc" and y.dtype.kind in "biufc":
            nan = x.dtype.kind in "fc" and y.dtype.kind in "fc"
            return x.shape == y.shape and bool(np.array_equal(x, y, equal_nan=nan))
    if sp.issparse(a) or sp.issparse(b):
        if not (sp.issparse(a) and sp.issparse(b) and a.shape == b.shape and a.format == b.format):
            return False
        a, b = a.tocsc(), b.tocsc()  # no toarray: mat73 keeps a complex sparse's {real, imag}
        return same(a.data, b.data, loose) and same(a.indices, b.indices) and same(a.indptr, b.indptr)
    if type(a) is not type(b):
        return False
    if isinstance(a, h5py.Reference):  # a reader that leaves references unresolved, in both files
        return True
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k], loose) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y, loose) for x, y in zip(a, b, strict=True))
    if isinstance(a, np.ndarray):
        if a.dtype.byteorder not in "=|" or b.dtype.byteorder not in "=|":  # a big-endian file
            a, b = a.astype(a.dtype.newbyteorder("=")), b.astype(b.dtype.newbyteorder("="))
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        if a.dtype.names:
            return all(same(a[k], b[k], loose) for k in a.dtype.names)
        if a.dtype == object:
            return all(same(x, y, loose) for x, y in zip(a.ravel(), b.ravel(), strict=True))
        if a.dtype.kind in "USb":
            return bool(np.array_equal(a, b))
        return np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()
    if hasattr(a, "_fieldnames"):  # scipy's mat_struct
        return a._fieldnames == b._fieldnames and all(
            same(getattr(a, k), getattr(b, k), loose) for k in a._fieldnames
        )
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    if isinstance(a, np.generic):
        return a.dtype == b.dtype and a.tobytes() == b.tobytes()
    return bool(a == b)


@dataclass
class Row:
    """One variable of the corpus: how each reader saw ours against MATLAB's."""

    file: str
    name: str
    kind: str
    expressible: bool = True
    why: str = ""
    results: dict[tuple[str, str], bool | None] = field(
        default_factory=dict
    )  # None: reader can't read MATLAB's

    @property
    def differences(self) -> list[str]:
        return [f"{r}/{fmt}" for (r, fmt), ok in self.results.items() if ok is False]


def _kind(v: Any) -> str:
    if v[0] == "num":
        return f"{v[1]}{' complex' if v[3] else ''} {'x'.join(map(str, v[2]))}"
    if v[0] == "sparse":
        return f"sparse {v[1]}{' complex' if v[3] else ''} {'x'.join(map(str, v[2]))}"
    if v[0] == "unsupported":
        return v[1]
    return f"{v[0]} {'x'.join(map(str, v[1]))}"


def _try(read: Callable[[], Any]) -> tuple[bool, Any]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return True, read()
    except Exception as e:  # noqa: BLE001 - a reader that fails on a file is a result
        return False, e


def _compare(
    rows: dict[str, Row],
    reader: str,
    fmt: str,
    theirs: Callable[[], Any],
    ours: Callable[[], Any],
    pick: Callable[[Any, str], Any] = lambda m, k: m[k],
    loose: bool = False,
) -> None:
    ok_t, t = _try(theirs)
    ok_o, o = _try(ours)
    for name, row in rows.items():
        if not row.expressible:
            continue
        vt = _try(lambda name=name: pick(t, name)) if ok_t else (False, None)
        if not vt[0]:
            row.results[(reader, fmt)] = None  # the reader cannot read MATLAB's own value
            continue
        vo = _try(lambda name=name: pick(o, name)) if ok_o else (False, None)
        row.results[(reader, fmt)] = vo[0] and same(vt[1], vo[1], loose)


def _octave(pairs: list[tuple[Path, Path, list[str]]]) -> dict[tuple[str, str], bool | None]:
    """One Octave run: for each (MATLAB's file, ours, names): isequal and same class."""
    lines = []
    for theirs, ours, names in pairs:
        lines.append(
            f"try; a = load('{theirs}'); catch; a = struct(); end; "
            f"try; b = load('{ours}'); catch; b = struct(); end;"
        )
        for n in names:  # 2: Octave cannot read MATLAB's own value
            lines.append(
                f"if ~isfield(a, '{n}'); ok = 2; else; try; ok = isequaln(a.{n}, b.{n}) && "
                f"strcmp(class(a.{n}), class(b.{n})) && isequal(size(a.{n}), size(b.{n})); "
                f"catch; ok = 0; end; end; printf('%s %s %d\\n', '{ours.name}', '{n}', ok);"
            )
    out = subprocess.run(
        [OCTAVE, "--no-gui", "--quiet", "--no-init-file", "--eval", "\n".join(lines)],  # type: ignore[list-item]
        check=False,
        capture_output=True,
        text=True,
        timeout=600,
    )
    res = {}
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) == 3:
            res[(parts[0], parts[1])] = None if parts[2] == "2" else parts[2] == "1"
    return res


def _h5_attr_sig(obj: Any, name: str) -> tuple[Any, ...]:
    aid = obj.attrs.get_id(name)
    t, space = aid.get_type(), aid.get_space()
    sig: tuple[Any, ...] = (name, t.get_class(), t.get_size(), space.get_simple_extent_type(), space.shape)
    if isinstance(t, h5py.h5t.TypeStringID):
        sig += (t.get_strpad(), t.get_cset())
    if isinstance(t, h5py.h5t.TypeVlenID):
        sup = t.get_super()
        sig += (
            sup.get_class(),
            sup.get_size(),
            sup.get_strpad() if isinstance(sup, h5py.h5t.TypeStringID) else None,
        )
    return sig


def _h5sig(f: h5py.File, obj: Any, depth: int = 0) -> Any:
    """The HDF5 structure of a variable as MATLAB would compare it: object kinds, attribute
    names, HDF5 types and values, dataset types and shapes, and what references point to
    (followed into #refs#, whose object names and storage layout are left out)."""
    attrs = []
    for k in sorted(obj.attrs):
        value = obj.attrs[k]
        if k == "H5PATH":  # the rule, not the name a save order gave in #refs#
            value = obj.name.startswith("/#refs#/") and value.decode() == obj.name
        elif isinstance(value, h5py.Reference):
            value = ("ref", _h5sig(f, f[value], depth + 1))
        elif isinstance(value, np.ndarray) and value.dtype == object:
            value = tuple(bytes(b"".join(v)) for v in value)
        attrs.append((_h5_attr_sig(obj, k), repr(value)))
    if isinstance(obj, h5py.Group):
        return ("group", tuple(attrs), tuple((k, _h5sig(f, obj[k], depth + 1)) for k in sorted(obj)))
    data = obj[()]
    if h5py.check_ref_dtype(obj.dtype) is not None:  # (a vlen dtype also compares == ref_dtype)
        content: Any = tuple(_h5sig(f, f[r], depth + 1) for r in data.ravel())
    elif obj.dtype.kind == "O":
        content = tuple(bytes(b"".join(v)) for v in data.ravel())
    else:
        content = np.ascontiguousarray(data).tobytes()
    return ("dataset", tuple(attrs), obj.dtype.str if obj.dtype.kind != "O" else "O", obj.shape, content)


def _h5_view(path: Path, name: str) -> Any:
    with h5py.File(path, "r") as f:
        return _h5sig(f, f[name])


def _matdump(path: Path, name: str) -> str:
    """matio's view, less the storage type of text (MATLAB 6 wrote ASCII as 16-bit, MATLAB
    7 and later as UTF-8, as we do: the characters are compared either way)."""
    out = subprocess.run(
        [MATDUMP, "-d", str(path), name], check=False, capture_output=True, text=True, timeout=60
    )  # type: ignore[list-item]
    if out.returncode:
        raise RuntimeError(out.stderr)
    lines = out.stdout.splitlines()
    return "\n".join(
        line
        for i, line in enumerate(lines)
        if not (line.startswith(" Data Type:") and i and "Character Array" in lines[i - 1])
    )


def run(save: Callable[[Path, dict[str, Any], str], Path], out: Path) -> list[Row]:
    import hdf5storage
    import mat73
    import pymatreader

    all_rows: list[Row] = []
    octave_pairs = []
    for f in corpus_files():
        values = matvalues.load(f)
        rows = {k: Row(f.name, k, _kind(v)) for k, v in values.items()}
        inputs = {}
        for k, v in values.items():
            try:
                inputs[k] = matvalues.to_input(v)
            except matvalues.NotExpressible as e:
                rows[k].expressible, rows[k].why = False, str(e)
        all_rows += rows.values()
        if not inputs:
            continue
        is_v73 = f.read_bytes()[:10] != b"MATLAB 5.0"
        paths = {
            fmt: save(out / f"{f.stem}_{fmt.replace('.', '')}.mat", inputs, fmt) for fmt in ("v5", "v7.3")
        }
        for fmt, p in paths.items():
            got = matvalues.load(p)
            for k in inputs:
                rows[k].results[("matvalues", fmt)] = got.get(k) == values[k]
        ours_v5, ours_v73 = paths["v5"], paths["v7.3"]
        theirs_fmt = "v7.3" if is_v73 else "v5"
        ours_same = paths[theirs_fmt]
        if not is_v73:
            _compare(
                rows,
                "scipy",
                "v5",
                lambda f=f: scipy.io.loadmat(f, mat_dtype=True),
                lambda p=ours_v5: scipy.io.loadmat(p, mat_dtype=True),
            )
            if OCTAVE:
                octave_pairs.append((f, ours_v5, [rows[k] for k in inputs]))
        # pymatreader reads both formats: MATLAB's file against ours in the same format; its
        # v5 view keeps MATLAB's on-disk storage type (uint8 for a double of small integers),
        # so there it compares values and shapes, not dtypes
        _compare(
            rows,
            "pymatreader",
            theirs_fmt,
            lambda f=f: pymatreader.read_mat(str(f)),
            lambda p=ours_same: pymatreader.read_mat(str(p)),
            loose=not is_v73,
        )
        if is_v73:
            _compare(rows, "h5py", "v7.3", lambda f=f: f, lambda p=ours_v73: p, _h5_view)
            _compare(rows, "mat73", "v7.3", lambda f=f: mat73.loadmat(f), lambda p=ours_v73: mat73.loadmat(p))
            _compare(
                rows,
                "hdf5storage",
                "v7.3",
                lambda f=f: str(f),
                lambda p=ours_v73: str(p),
                lambda p, k: hdf5storage.loadmat(p, variable_names=[k])[k],
            )
        if MATDUMP:
            _compare(rows, "matdump", theirs_fmt, lambda f=f: f, lambda p=ours_same: p, _matdump)
    if octave_pairs:
        res = _octave([(t, o, [r.name for r in rs]) for t, o, rs in octave_pairs])
        for _, ours, rs in octave_pairs:
            for row in rs:
                row.results[("octave", "v5")] = res.get((ours.name, row.name), False)
    return all_rows


def table(rows: list[Row]) -> str:
    """values x readers, ✓ identical, ✗ different, — the reader cannot read MATLAB's own file."""
    cols = [(r, fmt) for r, fmts in READERS.items() for fmt in fmts]
    used = [c for c in cols if any(c in row.results for row in rows)]
    head = "| file | variable | MATLAB value | " + " | ".join(f"{r} {fmt}" for r, fmt in used) + " |"
    lines = [head, "|" + "---|" * (3 + len(used))]
    for row in rows:
        if not row.expressible:
            cells = [f"not expressible: {row.why}"] + [""] * (len(used) - 1)
        else:
            cells = [
                ""
                if c not in row.results
                else "—"
                if row.results[c] is None
                else "✓"
                if row.results[c]
                else "✗"
                for c in used
            ]
        lines.append(f"| {row.file} | {row.name} | {row.kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    import tempfile

    import matspool

    with tempfile.TemporaryDirectory() as tmp:

        def save(p: Path, v: dict[str, Any], fmt: str) -> Path:
            matspool.save(p, v, format=fmt).result(timeout=120)
            return p

        rows = run(save, Path(tmp))
        print(table(rows))
        compared = sum(1 for r in rows for ok in r.results.values() if ok is not None)
        print(
            f"\n{sum(r.expressible for r in rows)} values expressible of {len(rows)}; "
            f"{compared} reader x output comparisons; "
            f"{sum(len(r.differences) for r in rows)} differences"
        )
