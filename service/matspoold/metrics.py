"""Prometheus metrics (``--metrics [HOST:]PORT``; off by default).

The control loop publishes a status snapshot about once a second; the HTTP thread only
reads that snapshot, so scraping never touches the loop's live state.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import start_http_server
from prometheus_client.core import REGISTRY, CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .server import Daemon

__all__ = ["DaemonCollector", "start_metrics"]


class DaemonCollector(Collector):
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        st = self.daemon.snapshot
        yield CounterMetricFamily(
            "matspool_files_written", "Files completed under their final name", value=st.files_written
        )
        yield CounterMetricFamily(
            "matspool_bytes_written", "Bytes of completed files", value=st.bytes_written
        )
        yield CounterMetricFamily("matspool_errors", "Saves answered with an error", value=st.errors)
        yield GaugeMetricFamily("matspool_clients", "Connected client processes", value=len(st.clients))
        per = {
            "matspool_client_queue_depth": ("Saves accepted and not yet answered", "queue_depth"),
            "matspool_client_ring_bytes_in_flight": (
                "Ring bytes of saves being written",
                "ring_bytes_in_flight",
            ),
            "matspool_client_ring_bytes": ("Size of the client's ring", "ring_bytes"),
            "matspool_client_oldest_pending_seconds": (
                "Age of the oldest unanswered save",
                "oldest_pending_s",
            ),
        }
        for name, (doc, key) in per.items():
            g = GaugeMetricFamily(name, doc, labels=["pid"])
            for c in st.clients:
                g.add_metric([str(c.pid)], getattr(c, key))
            yield g
        for name, doc, key in (
            ("matspool_client_files_written", "Files written for the client", "files_written"),
            ("matspool_client_bytes_written", "Bytes written for the client", "bytes_written"),
            ("matspool_client_errors", "Failed saves of the client", "errors"),
        ):
            ctr = CounterMetricFamily(name, doc, labels=["pid"])
            for c in st.clients:
                ctr.add_metric([str(c.pid)], getattr(c, key))
            yield ctr


def start_metrics(daemon: Daemon, address: str) -> None:
    host, _, port = address.rpartition(":")
    REGISTRY.register(DaemonCollector(daemon))
    start_http_server(int(port), addr=host or "127.0.0.1")
