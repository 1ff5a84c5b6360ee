"""Tensors as a new user holds them (issue 13): subclasses (``nn.Parameter``,
``as_subclass``, a DTensor's local tensor) are saved as tensors, a DTensor itself is
refused saying what to call, and float8 widens exactly to single like float16."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_everyday import _run_python

from readback import assert_variables, read

# -- tensor subclasses saved as tensors; float8 widened exactly; refusals say what to do -------

torch = pytest.importorskip("torch")


class _Tagged(torch.Tensor):  # type: ignore[misc]
    """A user's own subclass, as ``as_subclass`` makes them (module ``tests...``, not torch)."""


@pytest.mark.parametrize("fmt", ["v5", "v7.3"])
def test_tensor_subclasses_saved_as_tensors(spool: Any, out_dir: Path, fmt: str) -> None:
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    values = {
        "tagged": base.as_subclass(_Tagged),
        "param": torch.nn.Parameter(base * 2),
        "double": (base.double() + 0.5).as_subclass(_Tagged),
    }
    spool.save(out_dir / "sub.mat", values, format=fmt).result(30)
    want = {k: v.detach().as_subclass(torch.Tensor).numpy() for k, v in values.items()}
    assert_variables(read(out_dir / "sub.mat", fmt), want)


@pytest.mark.parametrize("fmt", ["v5", "v7.3"])
def test_float8_widens_exactly_to_single(spool: Any, out_dir: Path, fmt: str) -> None:
    kinds = [
        getattr(torch, n)
        for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
        if hasattr(torch, n)
    ]
    assert kinds, "this torch has no float8 types"
    src = torch.tensor([0.0, 1.0, -2.5, 0.125, 448.0, -0.001953125, 3.0e-3, 57344.0])
    values = {f"v{i}": src.to(k) for i, k in enumerate(kinds)}
    spool.save(out_dir / "f8.mat", values, format=fmt).result(30)
    got = read(out_dir / "f8.mat", fmt)
    for name, t in values.items():
        want = t.to(torch.float32).numpy().reshape(1, -1)
        assert got[name].dtype == np.float32, (name, got[name].dtype)
        np.testing.assert_array_equal(got[name].reshape(1, -1), want, err_msg=name)


def test_dtensor_saved_whole_and_refused_inside_a_struct(tmp_path: Path) -> None:
    """A DTensor (one rank of gloo here) as a variable is a sharded save: the file holds
    its global value. Inside a struct it is refused with a ShardError naming its place and
    the way out (never gathered behind the caller's back); its local tensor is saved like
    any tensor."""
    r = _run_python(f"""
        import os
        import numpy as np, scipy.io, torch, torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import distribute_tensor, Shard
        import matspool
        dist.init_process_group("gloo", init_method="file://{tmp_path}/store", rank=0, world_size=1)
        mesh = init_device_mesh("cpu", (1,))
        d = distribute_tensor(torch.arange(6.0).reshape(2, 3), mesh, [Shard(0)])
        with matspool.Spool(ring_bytes=1 << 20, timeout=30) as s:
            s.save("{tmp_path}/g.mat", {{"field": d}}).result(30)
            for nested in ({{"s": {{"field": d}}}}, {{"field": d, "s": {{"c": [1, d]}}}}):
                try:
                    s.save("{tmp_path}/d.mat", nested)
                except matspool.ShardError as e:
                    print("refused:", e)
            s.save("{tmp_path}/d.mat", {{"field": d.to_local()}}, format="v5").result(30)
        for name in ("g", "d"):
            np.testing.assert_array_equal(scipy.io.loadmat(f"{tmp_path}/{{name}}.mat")["field"],
                                          np.arange(6.0).reshape(2, 3))
        dist.destroy_process_group()
        """)
    assert r.returncode == 0, r.stderr
    refused = [line for line in r.stdout.splitlines() if line.startswith("refused:")]
    assert len(refused) == 2, r.stdout
    assert "variable 's.field': a DTensor inside a struct" in refused[0], refused[0]
    assert "variable 's.c{2}': a DTensor" in refused[1] and ".full_tensor()" in refused[1], refused[1]


@pytest.mark.parametrize(
    ("value", "place"),
    [
        ({"a": [1.0, "shard"]}, "u.a{2}"),
        ([{"k": "shard"}, {"k": 2.0}], "u(1).k"),
        ({"a": np.array([None, "shard"], dtype=object)}, "u.a{2}"),
    ],
)
def test_a_nested_shard_is_refused_naming_its_place(
    spool: Any, out_dir: Path, value: Any, place: str
) -> None:
    """A matspool.Shard inside a struct, cell or struct array: a ShardError naming the
    field (as MATLAB would), raised by save() itself; nothing is written."""
    import matspool

    block = matspool.Shard(np.ones((2, 3)), (0, 0), (4, 3))

    def put(v: Any) -> Any:
        if isinstance(v, str) and v == "shard":
            return block
        if isinstance(v, dict):
            return {k: put(x) for k, x in v.items()}
        if isinstance(v, list):
            return [put(x) for x in v]
        if isinstance(v, np.ndarray):
            out = np.empty(v.shape, dtype=object)
            out[:] = [put(x) for x in v]
            return out
        return v

    with pytest.raises(matspool.ShardError, match=rf"variable '{re.escape(place)}': a matspool.Shard inside"):
        spool.save(out_dir / "n.mat", {"u": put(value), "x": 1.0})
    assert not (out_dir / "n.mat").exists()
