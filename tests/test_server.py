"""A real ``pr2-serve`` (subprocess, loopback, real vLLM CPU build) over HTTP and gRPC."""

from __future__ import annotations

import hashlib
import socket
import threading
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from pr2_serve.client import (
    GrpcClient,
    HttpClient,
    ServerError,
)
from pr2_serve.engine.rollout_engine import Sampling
from tests.helpers import API_KEY, start_server

pytestmark = pytest.mark.vllm

PROMPTS = [[5, 6, 7], list(range(40, 70)), [200, 1, 2, 3], "12+35="]
SEEDED = {"n": 2, "temperature": 1.0, "max_tokens": 10, "seed": 11}


@pytest.fixture(scope="module")
def server(tiny_random, tmp_path_factory):
    srv = start_server(
        tiny_random,
        tmp_path_factory.mktemp("state"),
        "--max-upload-bytes",
        str(8 << 20),
        "--max-request-bytes",
        str(1 << 20),
    )
    yield srv
    assert srv.stop() == 0, "".join(srv.log[-40:])


@pytest.fixture(scope="module")
def http(server):
    c = HttpClient(server.http, api_key=API_KEY)
    yield c
    c.close()


@pytest.fixture(scope="module")
def rpc(server):
    c = GrpcClient(server.grpc, api_key=API_KEY)
    yield c
    c.close()


def predictor_update(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        f"model.layers.{i}.mlp.predictor.weight": torch.randn(8, 64, generator=g) * 0.3
        for i in range(4)
    }


def same(a, b, tol=1e-5) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert (x.prompt_index, x.sample_index) == (y.prompt_index, y.sample_index)
        assert x.output_token_ids == y.output_token_ids
        assert np.abs(np.array(x.logprobs) - np.array(y.logprobs)).max() <= tol
        np.testing.assert_array_equal(x.routes, y.routes)
        assert x.weight_version == y.weight_version


def test_protocols_agree_with_each_other_and_the_engine(server, http, rpc, reference):
    h = http.generate(PROMPTS, **SEEDED)
    g = rpc.generate(PROMPTS, **SEEDED)
    same(h.samples, g.samples, tol=0.0)
    hs = _collect_stream(http.stream(PROMPTS, **SEEDED))
    gs = _collect_stream(rpc.stream(PROMPTS, **SEEDED))
    same(hs, h.samples, tol=0.0)
    same(gs, h.samples, tol=0.0)
    local = reference.generate(PROMPTS, Sampling(**SEEDED))
    same(h.samples, local, tol=0.0)
    tail = http.generate(PROMPTS[:1], routes_from=3, max_tokens=4, seed=1)
    full = http.generate(PROMPTS[:1], max_tokens=4, seed=1)
    np.testing.assert_array_equal(tail.samples[0].routes, full.samples[0].routes[3:])


def _collect_stream(events):
    from pr2_serve.core.types import Rollout

    out: dict = {}
    for ev in events:
        r = out.setdefault(
            (ev.prompt_index, ev.sample_index),
            Rollout(
                prompt_index=ev.prompt_index,
                sample_index=ev.sample_index,
                prompt_token_ids=ev.prompt_token_ids,
                output_token_ids=[],
                logprobs=[],
                routes=None,
                finish_reason="",
                weight_version=ev.weight_version,
            ),
        )
        r.output_token_ids += ev.token_ids
        r.logprobs += ev.logprobs
        assert ev.routes_start == (0 if r.routes is None else len(r.routes))
        r.routes = ev.routes if r.routes is None else np.concatenate([r.routes, ev.routes])
        r.finish_reason = ev.finish_reason or r.finish_reason
    return [out[k] for k in sorted(out)]


def test_info_health_reflection_metrics(server, http):
    info = http.info()
    assert info["num_moe_layers"] == 4 and info["route_dtype"] == "uint8" and info["predictor"]
    assert httpx.get(f"{server.http}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{server.http}/readyz").status_code == 200
    spec = httpx.get(f"{server.http}/openapi.json").json()
    assert {
        "/v1/generate",
        "/v1/generate/stream",
        "/v1/weights/{version}",
        "/v1/info",
        "/healthz",
        "/readyz",
        "/metrics",
    } <= set(spec["paths"])
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(server.grpc) as ch:
        status = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service="pr2.rollout.v1.Rollout")
        )
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        resp = next(
            reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")])
            )
        )
        names = {s.name for s in resp.list_services_response.service}
        assert {"pr2.rollout.v1.Rollout", "grpc.health.v1.Health"} <= names
    text = httpx.get(f"{server.http}/metrics").text
    for metric in (
        "pr2_requests_total",
        "pr2_tokens_generated_total",
        "pr2_request_latency_seconds_bucket",
        "pr2_route_bytes_sent_total",
        "pr2_weight_version",
        "pr2_weight_update_seconds",
        "pr2_errors_total",
    ):
        assert metric in text, metric


BAD_GENERATE = [
    ({"prompts": [[1, 2, 900]]}, "prompts[0][2]"),
    ({"prompts": [[1, 2, 3]], "max_tokens": -1}, "max_tokens"),
    ({"prompts": [[1, 2, 3]], "max_tokens": 10**6}, "max_tokens"),
    ({"prompts": [[1, 2, 3]], "n": 0}, "n"),
    ({"prompts": [[1, 2, 3]], "n": 1000}, "n"),
    ({"prompts": [[]]}, "prompts[0]"),
    ({"prompts": []}, "prompts"),
    ({"prompts": [list(range(300)) * 2]}, "prompts[0]"),
    ({"prompts": [[1, 2, 3]], "n": "two"}, "n"),
    ({"prompts": [[1.5, 2]]}, "prompts[0]"),
    ({"prompts": [[1, 2, 3]], "temperature": -1}, "temperature"),
    ({"prompts": [[1, 2, 3]], "stop_token_ids": [999]}, "stop_token_ids[0]"),
    ({"prompts": [[1, 2, 3]], "unknown": 1}, "unknown"),
    ({"prompts": [[1, 2, 3]], "temperature": 2.5}, "temperature"),
    ({"prompts": [[1, 2, 3]], "top_k": 10**6}, "top_k"),
    ({"prompts": [[1, 2, 3]], "n": 2, "temperature": 0.0}, "n"),
]


@pytest.mark.parametrize("body, field", BAD_GENERATE)
def test_bad_generate_input_names_the_field(server, http, body, field):
    for path in ("/v1/generate", "/v1/generate/stream"):
        r = httpx.post(server.http + path, json=body)
        assert 400 <= r.status_code < 500, r.text
        err = r.json()["error"]
        assert err.get("field", "").startswith(field.split("[")[0]), err


def test_bad_generate_over_grpc(server, rpc):
    for prompts, kw, field in [
        ([[1, 2, 900]], {}, "prompts[0][2]"),
        ([[1, 2, 3]], {"n": 1000}, "n"),
        ([[1, 2, 3]], {"max_tokens": 10**6}, "max_tokens"),
        ([[]], {}, "prompts[0]"),
        ([[1, 2, 3]], {"n": 2, "temperature": 0.0}, "n"),
    ]:
        with pytest.raises(ServerError) as e:
            rpc.generate(prompts, **kw)
        assert e.value.status == "INVALID_ARGUMENT" and e.value.field == field, e.value
    assert rpc.generate([[1, 2, 3]], max_tokens=2).samples  # still serving


def test_malformed_and_oversize_requests(server, http):
    r = httpx.post(
        server.http + "/v1/generate",
        content=b'{"prompts": [[1, 2',
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "malformed_json"
    big = b'{"prompts": [[' + b"1," * (1 << 20) + b"1]]}"
    r = httpx.post(
        server.http + "/v1/generate", content=big, headers={"content-type": "application/json"}
    )
    assert r.status_code == 413
    assert http.generate([[1, 2, 3]], max_tokens=2).samples


def test_control_routes_need_the_token(server, tmp_path):
    path = tmp_path / "u.safetensors"
    save_file(predictor_update(0), str(path))
    with pytest.raises(ServerError) as e:
        HttpClient(server.http).push_weights(str(path), 99)
    assert e.value.status == 401
    with pytest.raises(ServerError) as e:
        HttpClient(server.http, api_key="wrong").push_weights(str(path), 99)
    assert e.value.status == 401
    with pytest.raises(ServerError) as e:
        GrpcClient(server.grpc).push_weights(str(path), 99)
    assert e.value.status == "UNAUTHENTICATED"


def test_oversize_upload_refused_before_reading(server):
    """Content-Length / header total_size above the limit: refused without reading the body."""
    host, port = server.http.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(
            f"PUT /v1/weights/50 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"X-Content-SHA256: {'0' * 64}\r\nContent-Length: {1 << 30}\r\n\r\n".encode()
        )
        s.settimeout(30)
        reply = s.recv(4096).decode()
    assert reply.startswith("HTTP/1.1 413"), reply
    from pr2_serve.api.proto import load

    pb2, pb2_grpc = load()
    with grpc.insecure_channel(server.grpc) as ch:
        stub = pb2_grpc.RolloutStub(ch)
        header = pb2.UpdateWeightsRequest(
            header=pb2.UpdateWeightsHeader(version=50, sha256="0" * 64, total_size=1 << 30)
        )
        with pytest.raises(grpc.RpcError) as e:
            stub.UpdateWeights(iter([header]), metadata=[("authorization", f"Bearer {API_KEY}")])
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def _committed_files(server) -> set[str]:
    return {p.name for p in (server.state_dir / "weights").iterdir()}


def test_bad_pushes_change_nothing(server, http, rpc, tmp_path, tiny_random):
    before = http.generate(PROMPTS, **SEEDED)
    files_before = _committed_files(server)
    version = before.weight_version + 1
    good = tmp_path / "good.safetensors"
    save_file(predictor_update(5), str(good))
    cases = {
        "unknown name": {"model.layers.0.mlp.nope.weight": torch.zeros(8, 64)},
        "wrong shape": {"model.layers.0.mlp.predictor.weight": torch.zeros(8, 32)},
        "wrong dtype": {
            "model.layers.0.mlp.predictor.weight": torch.zeros(8, 64, dtype=torch.int32)
        },
    }
    for client in (http, rpc):
        for name, tensors in cases.items():
            with pytest.raises(ServerError) as e:
                client.push_weights(tensors, version)
            assert e.value.status in (400, "INVALID_ARGUMENT"), name
        with pytest.raises(ServerError) as e:
            client.push_weights(str(good), 0)  # versions start at 1
        assert e.value.status in (422, "INVALID_ARGUMENT")
    # wrong checksum
    r = httpx.put(
        f"{server.http}/v1/weights/{version}",
        content=good.read_bytes(),
        headers={"Authorization": f"Bearer {API_KEY}", "X-Content-SHA256": "0" * 64},
    )
    assert r.status_code == 400 and "sha256" in r.json()["error"]["message"]
    # interrupted upload: the client closes mid-body
    data = good.read_bytes()
    host, port = server.http.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall(
            f"PUT /v1/weights/{version} HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {API_KEY}\r\n"
            f"X-Content-SHA256: {hashlib.sha256(data).hexdigest()}\r\n"
            f"Content-Length: {len(data)}\r\n\r\n".encode()
            + data[: len(data) // 2]
        )
    after = http.generate(PROMPTS, **SEEDED)
    same(after.samples, before.samples, tol=0.0)
    assert http.info()["weight_version"] == before.weight_version
    assert _committed_files(server) == files_before  # no partial or rejected files left


def _reference_outputs(reference, updates: list[dict]) -> list:
    """Outputs of the reference engine after each update in turn (updates it; the
    ``reference`` fixture puts it back): what a server given the same pushes must serve.
    (That an update serves exactly as an engine started on those weights is proven once, in
    test_engine_weights.)"""
    out = []
    for weights in updates:
        reference.update_weights(weights, reference.weight_version + 1)
        out.append(reference.generate(PROMPTS, Sampling(**SEEDED)))
    return out


def _assert_matches_fresh(got, ref) -> None:
    for a, b in zip(got, ref, strict=True):
        assert a.output_token_ids == b.output_token_ids
        assert np.abs(np.array(a.logprobs) - np.array(b.logprobs)).max() <= 1e-5
        np.testing.assert_array_equal(a.routes, b.routes)


def test_pushes_over_both_protocols_equal_a_fresh_server(
    server, http, rpc, tiny_random, reference, tmp_path
):
    """HTTP push (policy + predictor, from a file), then gRPC push (from a state dict in
    memory): after each, outputs equal an engine holding those weights (the reference engine
    given the same updates)."""
    v = http.info()["weight_version"]
    base = load_file(str(Path(tiny_random) / "model.safetensors"))
    g = torch.Generator().manual_seed(2)
    first = {n: t + 0.02 * torch.randn(t.shape, generator=g) for n, t in base.items()}
    ref_a, ref_b = _reference_outputs(reference, [first, predictor_update(1)])
    path = tmp_path / "first.safetensors"
    save_file(first, str(path))
    res = http.push_weights(str(path), v + 1)
    assert res["weight_version"] == v + 1 and res["num_tensors"] == len(first)
    got = http.generate(PROMPTS, **SEEDED).samples
    assert {s.weight_version for s in got} == {v + 1}
    _assert_matches_fresh(got, ref_a)
    # predictor-only over gRPC: the rest stays as pushed before
    res = rpc.push_weights(predictor_update(1), v + 2)
    assert res["weight_version"] == v + 2 and res["num_tensors"] == 4
    got_grpc = rpc.generate(PROMPTS, **SEEDED).samples
    assert {s.weight_version for s in got_grpc} == {v + 2}
    same(got_grpc, http.generate(PROMPTS, **SEEDED).samples, tol=0.0)
    _assert_matches_fresh(got_grpc, ref_b)
    for client in (http, rpc):  # versions must increase
        for old in (v + 1, v + 2):
            with pytest.raises(ServerError) as e:
                client.push_weights(predictor_update(9), old)
            assert e.value.status in (409, "FAILED_PRECONDITION")


def test_interrupted_grpc_upload_changes_nothing(server, http, tmp_path):
    from pr2_serve.api.proto import load

    pb2, pb2_grpc = load()
    before = http.generate(PROMPTS, **SEEDED)
    files = _committed_files(server)
    data = tmp_path / "u.safetensors"
    save_file(predictor_update(7), str(data))
    blob = data.read_bytes()

    def messages():
        yield pb2.UpdateWeightsRequest(
            header=pb2.UpdateWeightsHeader(
                version=before.weight_version + 1,
                sha256=hashlib.sha256(blob).hexdigest(),
                total_size=len(blob),
            )
        )
        yield pb2.UpdateWeightsRequest(chunk=blob[: len(blob) // 2])
        raise RuntimeError("client dies mid-upload")

    with grpc.insecure_channel(server.grpc) as ch, pytest.raises(grpc.RpcError):
        pb2_grpc.RolloutStub(ch).UpdateWeights(
            messages(), metadata=[("authorization", f"Bearer {API_KEY}")]
        )
    import time

    time.sleep(1.0)
    assert http.info()["weight_version"] == before.weight_version
    same(http.generate(PROMPTS, **SEEDED).samples, before.samples, tol=0.0)
    assert _committed_files(server) == files


def test_concurrent_clients_during_pushes(server, http, reference):
    """16 concurrent generate clients while 3 pushes happen: zero errors, and every sample's
    tokens are what its reported version produces (regenerated greedily on that version)."""
    start_version = http.info()["weight_version"]
    start_weights = _server_weights_at(server.state_dir / "weights")
    results: list = []
    errors: list = []
    stop = threading.Event()
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 256, size=int(n)).tolist() for n in rng.integers(3, 30, size=16)]

    def client_task(i: int):
        client = HttpClient(server.http) if i % 2 else GrpcClient(server.grpc)
        try:
            while not stop.is_set():
                try:
                    res = client.generate([prompts[i]], temperature=0.0, max_tokens=8)
                    results.append((prompts[i], res.samples[0]))
                except Exception as e:  # every failure is counted
                    errors.append(repr(e))
        finally:
            client.close()

    threads = [threading.Thread(target=client_task, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    updates = {}
    for k in range(1, 4):
        updates[start_version + k] = predictor_update(100 + k)
        threading.Event().wait(1.0)
        http.push_weights(updates[start_version + k], start_version + k)
    threading.Event().wait(1.0)
    stop.set()
    for t in threads:
        t.join(120)
    assert not errors, errors[:5]
    seen = {r.weight_version for _, r in results}
    assert len(seen) >= 3, seen
    # regenerate each (prompt, version) greedily on an engine holding that version's weights
    # (the reference engine numbers its versions from its own: server version v is its base + v)
    base = reference.weight_version
    if start_version:
        reference.update_weights(start_weights, base + start_version)
    for v in sorted(seen):
        if base + v > reference.weight_version:
            reference.update_weights(updates[v], base + v)
        mine = [(p, r) for p, r in results if r.weight_version == v]
        ref = reference.generate([p for p, _ in mine], Sampling(temperature=0.0, max_tokens=8))
        bad = [
            (r.output_token_ids, want.output_token_ids)
            for (_, r), want in zip(mine, ref, strict=True)
            if r.output_token_ids != want.output_token_ids
        ]
        assert not bad, (v, len(mine), bad[:3])


def _server_weights_at(state: Path) -> dict[str, torch.Tensor]:
    """The tensors the server has committed (on top of the base checkpoint), from its state."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(state.glob("v*.safetensors"), key=lambda p: int(p.stem[1:])):
        out.update(load_file(str(f)))
    return out


@pytest.mark.slow
def test_restart_comes_back_on_the_committed_version(server, http, tiny_random):
    http.push_weights(predictor_update(5), http.info()["weight_version"] + 1)  # (alone: v1)
    before = http.generate(PROMPTS, **SEEDED)
    version = http.info()["weight_version"]
    assert version > 0
    assert server.stop() == 0
    again = start_server(tiny_random, server.state_dir)
    try:
        c = HttpClient(again.http)
        assert c.info()["weight_version"] == version
        same(c.generate(PROMPTS, **SEEDED).samples, before.samples, tol=0.0)
    finally:
        again.stop()
