"""Break 1: spools inherited across fork (os.fork, a fork Pool, DataLoader workers).

A real script forks for real; the test then compares every file with what was saved
under its name and looks for rings left in /dev/shm by any process of the script.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import scipy.io

from matspool._ring import RING_PREFIX, SHM_DIR

from conftest import DaemonProc

_SCRIPT = r'''
import json, multiprocessing, os, sys
import numpy as np
import torch
import matspool

out = sys.argv[1]
spool = matspool.Spool(ring_bytes=2 << 20, timeout=60)  # endpoint: $MATSPOOL_ENDPOINT


def value(seed):
    return np.random.default_rng(seed).standard_normal((64, 64))


def both(tag, seed):
    """One save through the inherited spool, one through matspool.save."""
    spool.save(f"{out}/{tag}-s.mat", {"v": value(seed)})
    matspool.save(f"{out}/{tag}-m.mat", {"v": value(seed + 1)})
    return os.getpid()


spool.save(f"{out}/parent0.mat", {"v": value(0)}).result(60)
matspool.save(f"{out}/parent1.mat", {"v": value(1)}).result(60)
pids = []

pid = os.fork()
if pid == 0:
    both("fork", 100)
    sys.exit(0)  # a normal exit: atexit closes the child's spools
pids.append(pid)
spool.save(f"{out}/parent2.mat", {"v": value(2)})  # the parent goes on, untouched
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, status


def work(i):
    return both(f"pool{i}", 1000 + 10 * i)


ctx = multiprocessing.get_context("fork")
pool = ctx.Pool(4)
pids += pool.map(work, range(8))
pool.close()
pool.join()


class Saving(torch.utils.data.Dataset):
    def __len__(self):
        return 6

    def __getitem__(self, i):
        return torch.tensor(both(f"loader{i}", 2000 + 10 * i))


loader = torch.utils.data.DataLoader(Saving(), batch_size=None, num_workers=2,
                                     multiprocessing_context="fork")
pids += [int(p) for p in loader]
del loader
spool.save(f"{out}/parent3.mat", {"v": value(3)})
spool.flush(60)
matspool.flush(60)
print(json.dumps([os.getpid(), sorted(set(pids))]))
'''


def _value(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((64, 64))


def _expected() -> dict[str, np.ndarray]:
    want = {f"parent{i}.mat": _value(i) for i in range(4)}
    tags = (
        [("fork", 100)]
        + [(f"pool{i}", 1000 + 10 * i) for i in range(8)]
        + [(f"loader{i}", 2000 + 10 * i) for i in range(6)]
    )
    for tag, seed in tags:
        want[f"{tag}-s.mat"] = _value(seed)
        want[f"{tag}-m.mat"] = _value(seed + 1)
    return want


def test_forked_children_save_through_inherited_spools(
    daemon: DaemonProc, out_dir: Path, tmp_path: Path
) -> None:
    script = tmp_path / "forks.py"
    script.write_text(_SCRIPT)
    env = {**os.environ, "MATSPOOL_ENDPOINT": daemon.endpoint}
    proc = subprocess.run(
        [sys.executable, str(script), str(out_dir)],
        capture_output=True,
        check=False,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    parent, children = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(children) >= 3, children  # the fork, pool workers, loader workers
    want = _expected()
    got = sorted(p.name for p in out_dir.iterdir())
    assert got == sorted(want), (
        f"missing: {sorted(set(want) - set(got))}, extra: {sorted(set(got) - set(want))}"
    )
    for name, value in want.items():
        v = scipy.io.loadmat(out_dir / name)["v"]
        assert v.tobytes() == value.tobytes(), f"{name} holds other bytes than were saved"
    stray = [
        n for n in os.listdir(SHM_DIR) for pid in [parent, *children] if n.startswith(f"{RING_PREFIX}{pid}-")
    ]
    assert not stray, f"rings left in {SHM_DIR}: {stray}"
    assert "Traceback" not in proc.stderr, proc.stderr
