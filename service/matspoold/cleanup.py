"""Rings left in /dev/shm by clients that died (SIGKILL, OOM) without closing.

A ring is named ``matspool-<pid>-<token>``. It is stale when that pid no longer exists
and the daemon's user owns it. The pid test is only meaningful in the daemon's own pid
namespace, so deployments where jobs run in another one (containers without a shared pid
namespace) turn this off with ``--no-clean-stale`` and rely on the per-client liveness
check instead.
"""

from __future__ import annotations

import logging
import os

from matspool._ring import RING_PREFIX, SHM_DIR

__all__ = ["pid_alive", "remove_stale_rings"]

log = logging.getLogger("matspoold")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, belongs to someone else
    return True


def remove_stale_rings(shm_dir: str = SHM_DIR) -> list[str]:
    """Unlink this user's rings whose creating process is gone; returns their names."""
    removed = []
    uid = os.geteuid()
    try:
        names = os.listdir(shm_dir)
    except OSError:
        return removed
    for name in names:
        if not name.startswith(RING_PREFIX):
            continue
        pid_text = name[len(RING_PREFIX):].split("-", 1)[0]
        if not pid_text.isdigit() or pid_alive(int(pid_text)):
            continue
        path = os.path.join(shm_dir, name)
        try:
            if os.lstat(path).st_uid != uid:
                continue
            os.unlink(path)
        except OSError:
            continue
        removed.append(name)
    if removed:
        log.info("removed %d stale ring(s) of dead clients: %s", len(removed), ", ".join(removed))
    return removed
