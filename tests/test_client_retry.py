"""The HTTP clients survive a connection the server drops before answering (the keep-alive
race: a pooled connection closed by the server just as the client reuses it)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from pr2_serve.client import KEEPALIVE_EXPIRY_S, HttpClient
from pr2_serve.server import KEEP_ALIVE_S


class Flaky(BaseHTTPRequestHandler):
    """Drops the first POST/PUT without a response, then answers; records what it saw."""

    dropped: dict[str, int]
    seen: list[str]
    version = 2

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def _reply(self, obj: dict) -> None:
        data = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _maybe_drop(self) -> bool:
        self._body()
        self.seen.append(f"{self.command} {self.path}")
        if self.dropped.get(self.command, 0) == 0:
            self.dropped[self.command] = 1
            self.close_connection = True  # no status line: "disconnected without a response"
            return True
        return False

    def do_POST(self):
        if not self._maybe_drop():
            self._reply({"weight_version": Flaky.version, "samples": []})

    def do_PUT(self):
        if not self._maybe_drop():
            Flaky.version = int(self.path.rsplit("/", 1)[1])
            self._reply({"weight_version": Flaky.version})

    def do_GET(self):
        self.seen.append(f"GET {self.path}")
        self._reply({"weight_version": Flaky.version})

    def log_message(self, *args):
        pass


@pytest.fixture()
def flaky():
    Flaky.dropped, Flaky.seen, Flaky.version = {}, [], 2
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_client_expires_idle_connections_before_the_server_does():
    assert KEEPALIVE_EXPIRY_S < KEEP_ALIVE_S


def test_sync_client_retries_a_dropped_connection(flaky):
    c = HttpClient(flaky, api_key="k")
    assert c.generate([[1, 2, 3]]).weight_version == 2
    assert c.push_weights({"w": torch.zeros(2)}, 3)["weight_version"] == 3
    # the push was re-sent only after the server said version 3 was not committed
    assert Flaky.seen == [
        "POST /v1/generate",
        "POST /v1/generate",
        "PUT /v1/weights/3",
        "GET /v1/info",
        "PUT /v1/weights/3",
    ]
