"""``matspool verify``: files written through a real daemon read back as MATLAB would see them;
broken ones (truncated, not MAT at all, missing, a writer's temporary file) fail with a
message each. Always through the command, ``python -m matspoold verify``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

import matspool

from readback import REFERENCE_V7, REFERENCE_V73

VARIABLES = {
    "u": np.arange(24, dtype=np.float64).reshape(2, 3, 4),
    "z": np.array([1 + 2j, 3 - 1j], dtype=np.complex64),
    "mask": np.array([[True, False, True], [False, True, False]]),
    "s": {"alpha": np.ones(3), "beta": "hello", "gamma": {"inner": 1.0}},
    "c": ["x", np.zeros((2, 2)), 3.0],
    "n": np.int16(7),
}
# name -> (class, size, flags) as MATLAB sees them, the same in both formats
EXPECTED = {
    "u": ("double", "2x3x4", []),
    "z": ("single", "1x2", ["complex"]),
    "mask": ("logical", "2x3", ["logical"]),
    "s": ("struct", "1x1", ["fields:", "alpha,", "beta,", "gamma"]),
    "c": ("cell", "1x3", []),
    "n": ("int16", "1x1", []),
}


def verify(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "matspoold", "verify", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def _var_lines(out: str, path: Path) -> dict[str, list[str]]:
    """The variable lines that follow ``path``'s heading: name -> the other words."""
    lines = out.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith(f"{path}: "))
    got = {}
    for ln in lines[start + 1 :]:
        if not ln.startswith("  ") or ln.startswith("  error:"):
            break
        name, *rest = ln.split()
        got[name] = rest
    return got


@pytest.fixture
def saved(spool: matspool.Spool, out_dir: Path) -> dict[str, Path]:
    paths = {"v5": out_dir / "run_v5.mat", "v7.3": out_dir / "run_v73.mat"}
    futures = [spool.save(str(p), VARIABLES, format=fmt) for fmt, p in paths.items()]
    futures.append(
        spool.save(
            str(out_dir / "big_v73.mat"), {"u": np.random.rand(300, 200)}, format="v7.3", compress=True
        )
    )
    for f in futures:
        f.result(60)
    paths["compressed"] = out_dir / "big_v73.mat"
    return paths


def test_daemon_files_in_both_formats(saved: dict[str, Path]) -> None:
    r = verify(saved["v5"], saved["v7.3"], saved["compressed"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stderr == ""
    out = r.stdout
    assert f"{saved['v5']}: OK, v5 (MATLAB 5.0 MAT-file" in out
    assert f"{saved['v7.3']}: OK, v7.3, userblock header valid (MATLAB 7.3 MAT-file" in out
    assert "6 variables" in out
    for fmt in ("v5", "v7.3"):
        got = _var_lines(out, saved[fmt])
        assert set(got) == set(EXPECTED)
        for name, (cls, size, flags) in EXPECTED.items():
            words = got[name]
            assert words[:2] == [cls, size], (fmt, name, words)
            extra = words[2:]
            if fmt == "v7.3":  # every v7.3 variable carries its MATLAB_class attribute
                assert extra[-2:] == ["MATLAB_class", "ok"], (name, words)
                extra = extra[:-2]
            assert extra == flags, (fmt, name, words)
    assert _var_lines(out, saved["compressed"])["u"][:2] == ["double", "300x200"]
    assert out.splitlines()[-1] == "3 files checked: 3 ok, 0 bad"


def test_json_report(saved: dict[str, Path]) -> None:
    r = verify("--json", saved["v5"], saved["v7.3"])
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert report["ok"] is True
    v5, v73 = report["files"]
    assert (v5["format"], v73["format"]) == ("v5", "v7.3")
    assert v73["userblock_valid"] is True and v5["userblock_valid"] is None
    assert v5["errors"] == v73["errors"] == []
    for f in (v5, v73):
        by = {v["name"]: v for v in f["variables"]}
        assert by["u"]["size"] == [2, 3, 4] and by["u"]["matlab_class"] == "double"
        assert by["z"]["complex"] is True and by["mask"]["logical"] is True
        assert by["s"]["fields"] == ["alpha", "beta", "gamma"] and by["c"]["size"] == [1, 3]
    assert all(v["class_attribute"] is True for v in v73["variables"])
    assert all(v["class_attribute"] is None for v in v5["variables"])


def test_broken_files_fail_with_a_message_each(saved: dict[str, Path], out_dir: Path) -> None:
    cut_v5 = out_dir / "cut_v5.mat"
    data = saved["v5"].read_bytes()
    cut_v5.write_bytes(data[: len(data) - 40])
    cut_v73 = out_dir / "cut_v73.mat"
    cut_v73.write_bytes(saved["v7.3"].read_bytes()[:4096])
    noise = out_dir / "noise.mat"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    tmp = out_dir / ".run_v5.mat.0a1b2c3d.matspool-tmp"
    tmp.write_bytes(data)  # even with good contents: never a finished result
    missing = out_dir / "missing.mat"

    r = verify(saved["v5"], cut_v5, cut_v73, noise, missing, tmp)
    assert r.returncode == 1, r.stdout + r.stderr
    out = r.stdout
    assert f"{saved['v5']}: OK, v5" in out  # the good file among them is still reported good
    assert f"{cut_v5}: BAD, v5" in out and "error: truncated: variable #" in out
    assert f"{cut_v73}: BAD, v7.3" in out and "error: truncated: 4096 bytes, its HDF5 superblock says" in out
    assert f"{noise}: BAD: not a MAT file: no 'MATLAB 5.0 MAT-file' header and no HDF5 signature" in out
    assert f"{missing}: BAD: missing: no such file" in out
    assert f"{tmp}: BAD: a matspool temporary file (.matspool-tmp)" in out
    assert out.splitlines()[-1] == "6 files checked: 1 ok, 5 bad"

    r = verify("--json", cut_v5, missing)
    assert r.returncode == 1
    report = json.loads(r.stdout)
    assert report["ok"] is False
    assert [f["ok"] for f in report["files"]] == [False, False]
    assert report["files"][0]["errors"][0].startswith("truncated:")
    assert report["files"][1]["errors"] == ["missing: no such file"]


def test_v73_without_matlab_metadata(tmp_path: Path) -> None:
    """HDF5 that MATLAB would not take for its own: no userblock; no header, no MATLAB_class."""
    plain = tmp_path / "plain.mat"
    with h5py.File(plain, "w") as f:
        f["x"] = np.ones((2, 3))
    bare = tmp_path / "bare.mat"
    with h5py.File(bare, "w", userblock_size=512) as f:
        f["x"] = np.ones((2, 3))
    r = verify(plain, bare)
    assert r.returncode == 1
    assert f"{plain}: BAD: not a MAT file: plain HDF5 without MATLAB's 512-byte userblock" in r.stdout
    assert f"{bare}: BAD, v7.3, userblock header INVALID" in r.stdout
    assert _var_lines(r.stdout, bare)["x"] == ["?", "(float64)", "3x2", "MATLAB_class", "MISSING"]
    assert "error: variable 'x': no MATLAB_class attribute" in r.stdout


def test_files_matlab_wrote_verify_clean() -> None:
    files = [REFERENCE_V7, REFERENCE_V73]
    r = verify("--json", *files)
    report = json.loads(r.stdout)
    assert r.returncode == 0, [f["errors"] for f in report["files"]]
    for f in report["files"]:
        by = {v["name"]: v for v in f["variables"]}
        if "struct_array" in by:
            assert by["struct_array"]["size"] == [1, 2]
        if "sparse_col" in by:
            assert by["sparse_col"]["sparse"] and by["sparse_col"]["size"] == [4, 1]
        if "complex_array" in by:
            assert by["complex_array"]["complex"]
