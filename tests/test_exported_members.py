"""The public surface, pinned (httpx's ``test_exported_members`` is the model).

``matspool.__all__`` is exactly the list below, every name in it is importable, and every
public attribute of the package (not a submodule) is in it: adding or removing API is a
deliberate change to this file. Every module of both packages declares ``__all__``.
"""

from __future__ import annotations

import ast
import importlib
import sys
import types
from pathlib import Path

import pytest

import matspool
import matspoold

PUBLIC = [
    "AuthenticationFailed",
    "ClientKeys",
    "CudaCaptureError",
    "CudaError",
    "DaemonUnavailable",
    "FlushError",
    "FormatLimitError",
    "InvalidOptionError",
    "InvalidVariableError",
    "MatspoolError",
    "PathNotAllowedError",
    "PayloadTooLarge",
    "ProtocolError",
    "RingError",
    "SaveResult",
    "Shard",
    "ShardError",
    "Spool",
    "SpoolClosed",
    "SpoolFull",
    "Stream",
    "UnknownClient",
    "UnsupportedTypeError",
    "WriteFailed",
    "default_spool",
    "flush",
    "save",
    "savemat",
]

PACKAGES = {"matspool": Path(matspool.__file__).parent, "matspoold": Path(matspoold.__file__).parent}


def _modules() -> list[tuple[str, Path]]:
    """(dotted name, file) of every module in both packages; ``__main__`` is a script run by
    ``python -m`` (importing it starts the daemon), so it is checked by parsing only."""
    out = []
    for pkg, root in PACKAGES.items():
        for f in sorted(root.rglob("*.py")):
            parts = [pkg, *f.relative_to(root).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            out.append((".".join(parts), f))
    return out


def test_all_is_pinned() -> None:
    assert matspool.__all__ == PUBLIC


def test_all_names_are_exported() -> None:
    for name in matspool.__all__:
        assert hasattr(matspool, name), name
    assert len(set(matspool.__all__)) == len(matspool.__all__)


def test_every_public_attribute_is_in_all() -> None:
    public = {
        name
        for name, value in vars(matspool).items()
        if not name.startswith("_")
        and not (isinstance(value, types.ModuleType) and value.__name__.startswith("matspool."))
    }
    assert sorted(public) == sorted(matspool.__all__)


def test_stream_is_what_spool_stream_returns() -> None:
    from matspool._stream import Stream

    assert matspool.Stream is Stream
    assert matspool.Spool.stream.__annotations__["return"] in ("Stream", Stream)


def test_version_comes_from_pyproject() -> None:
    """One version, pyproject.toml's, read back through the installed metadata."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    declared = tomllib.loads(pyproject.read_text())["project"]["version"]
    assert matspool.__version__ == declared


@pytest.mark.parametrize(("module", "path"), _modules(), ids=[m for m, _ in _modules()])
def test_module_declares_all(module: str, path: Path) -> None:
    """A literal list of strings assigned at top level, each naming something the module defines."""
    tree = ast.parse(path.read_text(), str(path))
    declared = [
        node.value
        for node in tree.body
        if isinstance(node, (ast.Assign, ast.AnnAssign))
        and any(
            isinstance(t, ast.Name) and t.id == "__all__"
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target])
        )
    ]
    if path.name == "__main__.py" and not declared:
        # the entry script of ``python -m matspoold``: it defines nothing to export
        assert "def " not in path.read_text() and "class " not in path.read_text()
        return
    assert len(declared) == 1, f"{path}: no (or more than one) top-level __all__"
    names = ast.literal_eval(declared[0])
    assert isinstance(names, list) and all(isinstance(n, str) for n in names), path
    assert len(set(names)) == len(names), f"{path}: duplicates in __all__"
    if path.name == "__main__.py":
        return
    mod = importlib.import_module(module)
    missing = [n for n in names if not hasattr(mod, n)]
    assert not missing, f"{module}.__all__ names what it does not define: {missing}"
