"""A webhook receiver on 127.0.0.1 for the demo: the rollouts' notifications arrive here.

It stands in for a chat or incident tool: it accepts ``POST /canary`` with the right bearer token and keeps
the JSON payloads, so the demo can show (and check) that a rollback and a promotion were announced.
"""

from __future__ import annotations

import hmac
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

ENDPOINT = "/canary"


class WebhookReceiver:
    """Receives notification payloads until :meth:`stop`.

    :param token: the bearer token a sender must present (the connection's password).
    """

    def __init__(self, token: str) -> None:
        self.token = token
        self.payloads: list[dict[str, Any]] = []
        self.rejected = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server naming)
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(min(length, 1_000_000))
                expected = f"Bearer {receiver.token}"
                if self.path != ENDPOINT or not hmac.compare_digest(self.headers.get("Authorization", ""), expected):
                    receiver.rejected += 1
                    self.send_response(404 if self.path != ENDPOINT else 403)
                else:
                    try:
                        receiver.payloads.append(json.loads(body))
                        self.send_response(204)
                    except ValueError:
                        self.send_response(400)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="webhook", daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def connection(self) -> dict[str, Any]:
        """The Airflow HTTP connection (JSON fields) that sends to this receiver."""
        return {"conn_type": "http", "host": "127.0.0.1", "port": self.port, "schema": "http",
                "password": self.token, "extra": {"endpoint": ENDPOINT, "timeout": 5, "retries": 1}}

    def events_for(self, run_id: str) -> list[str]:
        """The events received for one DAG run, in arrival order."""
        return [str(p.get("event")) for p in self.payloads if p.get("run_id") == run_id]

    def start(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
