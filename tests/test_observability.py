"""Prometheus metrics and JSON logs from a real daemon."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np

from matspool._spool import Spool

from conftest import serve_cmd, start_daemon


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def test_metrics_endpoint_counts_files_bytes_errors_and_clients(tmp_path: Path, out_dir: Path) -> None:
    port = _free_port()
    d = start_daemon(out_dir, tmp_path / "sock", "--metrics", f"127.0.0.1:{port}")
    try:
        with Spool(d.endpoint, ring_bytes=4 << 20) as spool:
            sizes = [
                spool.save(out_dir / f"m{i}.mat", {"x": np.ones((64, 64))}).result(10).nbytes
                for i in range(3)
            ]
            spool.save(out_dir / "nope" / "x.mat", {"x": 1.0}).exception(10)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                m = _scrape(port)
                if m.get("matspool_files_written_total") == 3 and m.get("matspool_errors_total") == 1:
                    break
                time.sleep(0.2)
            assert m["matspool_files_written_total"] == 3
            assert m["matspool_bytes_written_total"] == sum(sizes)
            assert m["matspool_errors_total"] == 1
            assert m["matspool_clients"] == 1
            import os

            assert m[f'matspool_client_ring_bytes{{pid="{os.getpid()}"}}'] == 4 << 20
    finally:
        d.stop()


def test_metrics_are_off_by_default_and_json_logs_parse(tmp_path: Path, out_dir: Path) -> None:
    endpoint = f"ipc://{tmp_path}/j.sock"
    proc = subprocess.Popen(
        serve_cmd(endpoint, out_dir, "--log-format", "json", "--log-level", "info"),
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "j.sock").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        inodes = {os.readlink(f"/proc/{proc.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{proc.pid}/fd")}
        tcp = [
            ln
            for table in ("/proc/net/tcp", "/proc/net/tcp6")
            for ln in Path(table).read_text().splitlines()[1:]
        ]
        mine = [ln for ln in tcp if f"socket:[{ln.split()[9]}]" in inodes]
        assert mine == [], "metrics must be off by default: the daemon holds a TCP socket"
        with Spool(endpoint, ring_bytes=1 << 20) as spool:
            spool.save(out_dir / "outside" / "x.mat", {"x": 1.0}).exception(10)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    records = [json.loads(line) for line in err.splitlines() if line.strip()]
    assert records and all({"ts", "level", "logger", "msg", "pid"} <= r.keys() for r in records)
    assert any(r["level"] == "warning" and "outside" in r["msg"] for r in records)
    assert any("serving" in r["msg"] for r in records)
    assert not [r for r in records if "http" in r["msg"].lower()], "metrics must be off by default"
