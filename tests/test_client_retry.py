"""The HTTP clients survive a connection the server drops before answering (the keep-alive
race: a pooled connection closed by the server just as the client reuses it), and a hung server
(connections accepted, never answered) is down after the retry budget, not the client's
600 s timeout."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from pr2_serve.client import KEEPALIVE_EXPIRY_S, GrpcClient, HttpClient
from pr2_serve.client.retry import Hung, Retrying, RetryPolicy, ServerDown, within_deadline
from pr2_serve.server.main import KEEP_ALIVE_S


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


# -- a hung server: accepts connections, never answers ---------------------------------------------
@pytest.fixture()
def hung():
    """A stand-in for a stopped server process: the kernel accepts connections (and this
    thread holds them open), nothing ever answers."""
    sock = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(sock.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    stop.set()
    thread.join()
    for s in held:
        s.close()
    sock.close()


@pytest.mark.timeout(60)
def test_a_hung_server_is_down_after_the_budget_not_the_client_timeout(hung):
    client = HttpClient(hung, timeout=600.0)
    assert not client.alive(0.5) and not client.ready()
    assert not GrpcClient(hung.removeprefix("http://")).alive(0.5)
    lines: list[str] = []
    t0 = time.monotonic()
    with pytest.raises(ServerDown, match="no sign of life"):
        Retrying(client, "hung", RetryPolicy(budget_s=3), log=lines.append).info()
    took = time.monotonic() - t0
    assert 3 <= took < 8, took
    assert "giving up after 3." in lines[-1] or "giving up after 4." in lines[-1]


@pytest.mark.timeout(60)
def test_the_pool_drops_a_hung_server_and_its_prompts_go_to_the_others(hung, tmp_path):
    from tests.test_server_pool import PROMPTS, FakeServer, check_groups
    from trainer.rollouts.server_pool import ServerPool

    good, lines = FakeServer("good"), []
    clients = [HttpClient(hung, timeout=600.0), good]
    pool = ServerPool(
        clients, ["hung", "good"], 0, policy=RetryPolicy(budget_s=3), log=lines.append
    )
    t0 = time.monotonic()
    check_groups(pool.generate(PROMPTS, seed=0))
    took = time.monotonic() - t0
    pool.close()
    assert 3 <= took < 8, took
    assert [s.address for s in pool.live] == ["good"]
    assert any("server hung dropped from the rotation" in line for line in lines)


@pytest.mark.timeout(60)
def test_a_server_that_hangs_while_taken_back_stays_dropped(tmp_path):
    """Ready, then silent: its re-sync is given up after the budget, not waited for."""
    from tests.test_server_pool import FakeServer
    from trainer.rollouts.server_pool import ServerPool

    class Hangs(FakeServer):
        def ready(self) -> bool:
            return True

        def alive(self, timeout: float) -> bool:
            return False

        def info(self) -> dict:
            threading.Event().wait(600)
            return {}

    lines: list[str] = []
    pool = ServerPool([Hangs("h")], ["h"], 0, policy=RetryPolicy(budget_s=1), log=lines.append)
    pool.servers[0].live = False
    t0 = time.monotonic()
    assert pool.take_back() == []
    assert time.monotonic() - t0 < 5 and "re-sync failed" in lines[-1] and "Hung" in lines[-1]
    pool.close()


def test_a_slow_answer_from_a_live_server_is_waited_for():
    """The deadline is on silence, not on a call's length: a long generate on a busy server
    that answers its liveness probe is not given up."""
    probes: list[float] = []

    def alive(timeout: float) -> bool:
        probes.append(timeout)
        return True

    def slow() -> str:
        time.sleep(1.0)
        return "done"

    assert within_deadline(slow, 0.2, alive) == "done" and probes
    with pytest.raises(Hung):
        within_deadline(slow, 0.2, lambda timeout: False)
    with pytest.raises(ValueError, match="boom"):  # its own error, in the caller's thread
        within_deadline(lambda: int("boom"), 5.0)
