"""Sharded saves of CUDA tensors: a ``matspool.Shard`` whose local block is on the GPU,
one rank of a gloo group (only its store is used), files read back bit for bit.

Skipped cleanly where CUDA is not available. A CUDA block reaches the ring through the
spool's CUDA copier (``_shard_ring.copy_piece``: snapshot, D2H on the copy stream, waited
for before the block's PLACE); these tests pin what the file must hold: blocks that fit
the ring, a block larger than the ring (copied piece by piece while the save runs), and
float16 widened to single on the way.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import DaemonProc

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

_SCRIPT = """
import numpy as np, torch, torch.distributed as dist
import matspool
from readback import assert_exact, read
dist.init_process_group("gloo", init_method="file://{tmp}/store", rank=0, world_size=1)
g = torch.Generator().manual_seed(5)
u = torch.randn(300, 200, generator=g, dtype=torch.float64)          # 480 KB
h = torch.randn(64, 48, generator=g).to(torch.float16)
big = torch.randn(1024, 600, generator=g, dtype=torch.float32)       # 2.4 MB: beyond the 1 MiB ring
with matspool.Spool("{endpoint}", ring_bytes=1 << 20, timeout=60) as s:
    futs = [
        s.save("{out}/u.mat", {{
            "u": matspool.Shard(u.to("{dev}"), (0, 0), u.shape),
            "h": matspool.Shard(h.to("{dev}"), (0, 0), h.shape)}}, format="v7.3"),
        s.save("{out}/big.mat", {{"big": matspool.Shard(big.to("{dev}"), (0, 0), big.shape)}}, format="v7.3"),
    ]
    for f in futs:
        f.result(120)
got = read("{out}/u.mat", "v7.3")
assert_exact(got["u"], u.numpy(), "u")
assert_exact(got["h"], h.float().numpy(), "h: float16 widened to single")
assert_exact(read("{out}/big.mat", "v7.3")["big"], big.numpy(), "big")
dist.destroy_process_group()
print("exact")
"""


def run_script(endpoint: str, tmp: Path, out: Path, dev: str = "cuda") -> subprocess.CompletedProcess[str]:
    """The script above in a process of its own (a process group of one rank)."""
    tests = Path(__file__).resolve().parent.parent
    code = textwrap.dedent(_SCRIPT).format(tmp=tmp, out=out, endpoint=endpoint, dev=dev)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, env=env)


def test_cuda_shards_are_saved_exactly(daemon: DaemonProc, tmp_path: Path, out_dir: Path) -> None:
    r = run_script(daemon.endpoint, tmp_path, out_dir)
    assert r.returncode == 0 and "exact" in r.stdout, r.stderr[-3000:]
