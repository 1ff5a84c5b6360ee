"""A forked child of a rank (a DataLoader worker, say) that saves with the rank's spool
and closes it must not speak for the rank on the group's store: the parent's pooled
store connections and its 'closed, that save will not come' word stay the parent's."""

from __future__ import annotations

import subprocess
import sys

import pytest
from ranks import free_port

from conftest import DaemonProc

pytest.importorskip("torch.distributed")

_RANK = """
import os, sys
import numpy as np
import torch.distributed as dist
import matspool
from matspool import _shard_conns, _shard_keys as keys

endpoint, port, out = sys.argv[1:]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
store = dist.distributed_c10d._get_default_store()
spool = matspool.Spool(endpoint, timeout=30)
pool = _shard_conns.conns(spool, "default", store, 0, 1)  # as a sharded save makes it
pool.give(pool.take(store))  # one pooled (cloned) connection, free
pid = os.fork()
if pid == 0:  # the child saves with the rank's spool (its own parts) and closes it
    spool.save(os.path.join(out, "child.mat"), {"x": np.ones(3)}).result(30)
    spool.close()
    os._exit(0)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0
said = store.check([keys.save_prefix("default", 0) + keys.rank_key(keys.BLOCKS, 0)])
print("CHILD-SPOKE" if said else "QUIET", flush=True)
spool.close()
dist.destroy_process_group()
"""


def test_a_forked_child_closing_the_spool_leaves_the_ranks_store_alone(daemon: DaemonProc) -> None:
    run = subprocess.run(
        [sys.executable, "-c", _RANK, daemon.endpoint, str(free_port()), str(daemon.root)],
        capture_output=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr.decode()[-2000:]
    assert (daemon.root / "child.mat").exists()
    assert run.stdout.decode().split() == ["QUIET"]  # the parent's next save 0 was not refused
