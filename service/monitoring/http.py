"""The metrics endpoint: Prometheus' text format over HTTP, on its own port and thread.

prometheus_client's WSGI server, which answers `/metrics` (any path, in fact) and nothing else,
on a daemon thread: a scrape never runs on the event loop, and reads only counters and what the
collectors compute. Plain HTTP on loopback by default; a pod exposes it to the cluster's scraper
with `--metrics-bind 0.0.0.0` (deploy/k8s). Nothing it serves is personal data.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_wsgi_server


@dataclass
class MetricsEndpoint:
    server: WSGIServer
    thread: threading.Thread

    @classmethod
    def start(cls, registry: CollectorRegistry, bind: str, port: int) -> MetricsEndpoint:
        """Listen on `bind`:`port` (0 picks a free port); OSError if it cannot."""
        server, thread = start_wsgi_server(port, addr=bind, registry=registry)
        return cls(server, thread)

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
