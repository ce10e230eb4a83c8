"""What the loopback HTTP test doubles (scripted API servers, fake ``vllm serve`` replicas)
have in common: a quiet keep-alive handler with JSON answers, and a server on 127.0.0.1.

Test support only, never used outside tests.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class QuietHandler(BaseHTTPRequestHandler):
    # keep-alive, as the pools' httpx clients expect of a real server; and no access log
    # on stderr, which would bury pytest's output
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def send_bytes(self, status: int, data: bytes, headers: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def send_json(self, status: int, payload, headers: dict | None = None) -> None:
        self.send_bytes(status, json.dumps(payload).encode(), headers)


def serve(handler: type[BaseHTTPRequestHandler]):
    """``handler`` served on a free 127.0.0.1 port from a daemon thread: ``(server, thread,
    root_url)``; stop it with ``server.shutdown()``."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread, f"http://127.0.0.1:{server.server_address[1]}"
