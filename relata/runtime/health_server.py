"""The workers' small HTTP server: Prometheus `/metrics` and the probes `/readyz` (also
`/healthz`) and `/livez`, answered from a `kafkaio.health.Health`, on one port."""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from kafkaio.health import Health

logger = logging.getLogger(__name__)

PROBES = {"/readyz": "ready", "/healthz": "ready", "/livez": "live"}


def serve_probes(
    port: int, *, registry: CollectorRegistry, health: Health, host: str = "0.0.0.0"
) -> ThreadingHTTPServer:
    """Serve `/metrics`, `/readyz`, `/healthz` and `/livez` on a daemon thread; a probe
    answers 200 or 503 with the report as JSON. Close with `shutdown()`."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, generate_latest(registry), CONTENT_TYPE_LATEST)
                return
            probe = PROBES.get(path)
            if probe is None:
                self._send(404, b'{"error": "not found"}', "application/json")
                return
            report = health.report()
            ok = report.ready if probe == "ready" else report.live
            body = json.dumps({"status": "ok" if ok else "fail", **report.as_dict()})
            self._send(200 if ok else 503, body.encode(), "application/json")

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            """Probes every few seconds are not worth a log line each."""

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="relata-probes", daemon=True)
    thread.start()
    logger.info("probes and metrics port=%d", port)
    return server
