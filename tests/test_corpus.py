"""The MATLAB-written conformance corpus (``tests/data/matlab``, PROVENANCE.md): every
variable read from MATLAB's file, saved through matspool as v5 and v7.3, and both outputs
read by every reader here (tests/corpus.py), each compared with the same reader's view of
MATLAB's own file: class, size, complexity, exact values, field order, cell layout.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from corpus import Row, corpus_files, run, table

import matspool

from conftest import DaemonProc

#: The one difference left, between two MATLAB versions rather than between MATLAB and us:
#: MATLAB R2015 tagged a logical sparse's 1-byte data as miDOUBLE (scipy issue 3539, which
#: scipy reads as bool); MATLAB R2025 writes miUINT8, as we do, which scipy reads as uint8
#: (matlab_basic_v7.mat's sparse_logical compares identical under scipy).
KNOWN = {("logical_sparse.mat", "sp_log_5_4"): ["scipy/v5"]}
#: What matspool cannot express, by design (README: UnsupportedTypeError).
NOT_EXPRESSIBLE = {
    ("testfunc_7.4_GLNX86.mat", "testfunc"),
    ("testobject_7.1_GLNX86.mat", "testobject"),
    ("testobject_7.4_GLNX86.mat", "testobject"),
}


@pytest.fixture(scope="module")
def rows(mspool: matspool.Spool, mdaemon: DaemonProc) -> list[Row]:
    out = mdaemon.root / "corpus"
    out.mkdir()

    def save(p: Path, v: dict[str, Any], fmt: str) -> Path:
        r = mspool.save(p, v, format=fmt).result(timeout=120)
        assert r.nbytes == p.stat().st_size
        return p

    return run(save, out)


def test_corpus_is_there() -> None:
    files = corpus_files()
    assert len(files) >= 50 and (files[0].parent / "PROVENANCE.md").is_file()


def test_every_expressible_value_reads_as_matlabs(rows: list[Row]) -> None:
    assert {(r.file, r.name) for r in rows if not r.expressible} == NOT_EXPRESSIBLE
    diffs = {(r.file, r.name): r.differences for r in rows if r.differences}
    assert diffs == KNOWN, table([r for r in rows if r.differences])


def test_every_reader_compared(rows: list[Row]) -> None:
    """No reader silently left out: each compared outputs, and each value was compared in both
    formats by at least our own reader and one independent reader per format."""
    seen = {key for r in rows for key, ok in r.results.items() if ok is not None}
    readers = {r for r, _ in seen}
    assert {"matvalues", "scipy", "pymatreader", "h5py", "mat73", "hdf5storage"} <= readers
    if shutil.which("octave"):
        assert "octave" in readers
    if shutil.which("matdump"):
        assert "matdump" in readers
    for r in rows:
        if r.expressible:
            formats = {
                fmt for (reader, fmt), ok in r.results.items() if ok is not None and reader != "matvalues"
            }
            assert r.results[("matvalues", "v5")] is not None and r.results[("matvalues", "v7.3")] is not None
            assert formats, (r.file, r.name)
    assert sum(ok is not None for r in rows for ok in r.results.values()) >= 500
