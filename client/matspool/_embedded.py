"""Start a private daemon for a client that was given no endpoint.

The daemon runs as a separate process (``python -m matspoold``) started by exec, never
by fork, so it is safe after CUDA has been initialised. Its socket lives in a fresh
owner-only directory; it exits when the client closes it or when the client dies.
A forked child's spool connects to its parent's embedded daemon; only the parent stops it.

Threads: the spool's owner (open and close); ``exit_status`` from the I/O thread too.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile

__all__ = ["EmbeddedDaemon"]


class EmbeddedDaemon:
    def __init__(self, *, writers: int | None = None) -> None:
        self._dir = tempfile.mkdtemp(prefix="matspool-")  # mode 0700
        self.endpoint = f"ipc://{self._dir}/daemon.sock"
        cmd = [sys.executable, "-m", "matspoold", "serve", "--endpoint", self.endpoint,
               "--root", "/", "--parent-pid", str(os.getpid()), "--log-level", "warning"]
        if writers:
            cmd += ["--writers", str(writers)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, close_fds=True)

    def exit_status(self) -> int | None:
        return self.proc.poll()

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM: the daemon finishes accepted writes, then exits."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self._dir, ignore_errors=True)
