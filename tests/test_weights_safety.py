"""Bad weights never replace good ones (a real ``pr2-serve`` on loopback, HTTP and gRPC):
non-finite pushes are refused naming the tensor, a push that breaks generation is rolled back by
the canary, kept versions can be rolled back to, and every error answers in the error shape."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import grpc
import httpx
import pytest
import torch
from safetensors.torch import save_file

from pr2_serve.api.proto import load
from pr2_serve.client import GrpcClient, HttpClient, ServerError
from pr2_serve.server.launch import server_command
from pr2_serve.service.errors import FIELD_METADATA_KEY, TYPE_METADATA_KEY
from tests.helpers import API_KEY
from tests.helpers import assert_same_samples as assert_same

pytestmark = pytest.mark.vllm

PROMPTS = [[5, 6, 7], list(range(40, 70)), [200, 1, 2, 3]]
GREEDY = {"temperature": 0.0, "max_tokens": 8}
PRED = "model.layers.{}.mlp.predictor.weight"
BREAKS = "model.layers.0.post_attention_layernorm.weight"  # x 1e30: the experts overflow to NaN


@pytest.fixture(scope="module")
def server(model_weights_server):
    """The shared server (fault injection on), serving the model's weights: ``base``."""
    srv = model_weights_server
    srv.base = HttpClient(srv.http).generate(PROMPTS, **GREEDY).samples
    return srv


@pytest.fixture(scope="module")
def http(server):
    with_close = HttpClient(server.http, api_key=API_KEY)
    yield with_close
    with_close.close()


@pytest.fixture(scope="module")
def rpc(server):
    c = GrpcClient(server.grpc, api_key=API_KEY)
    yield c
    c.close()


def predictors(seed: int, scale: float = 2.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {PRED.format(i): torch.randn(8, 64, generator=g) * scale for i in range(4)}


def leftovers(state) -> list[str]:
    """Files in the weights dir no kept version refers to."""
    from pr2_serve.service.weight_store import WeightStore

    live = WeightStore(state, 1).live_files()
    return sorted(p.name for p in (state / "weights").iterdir() if p.name not in live)


def grpc_error_type(target: str, call) -> tuple[grpc.StatusCode, str | None]:
    """``(code, pr2-error-type)`` of a raw gRPC call that fails."""
    pb2, pb2_grpc = load()
    with grpc.insecure_channel(target) as ch, pytest.raises(grpc.RpcError) as e:
        call(pb2, pb2_grpc.RolloutStub(ch))
    return e.value.code(), dict(e.value.trailing_metadata() or ()).get(TYPE_METADATA_KEY)


def test_non_finite_pushes_are_refused_naming_the_tensor(server, http, rpc, tmp_path):
    before = http.generate(PROMPTS, **GREEDY)
    for client in (http, rpc):
        for value in (float("nan"), float("inf"), float("-inf")):
            bad = torch.zeros(8, 64)
            bad[0, :3] = value
            update = {PRED.format(0): torch.zeros(8, 64), PRED.format(2): bad}
            with pytest.raises(ServerError) as e:
                client.push_weights(update, before.weight_version + 1)
            assert e.value.status in (400, "INVALID_ARGUMENT"), e.value
            assert e.value.field == "weights"
            assert f"{PRED.format(2)}: 3 of 512 values are not finite" in e.value.message
            assert PRED.format(0) not in e.value.message
    path = tmp_path / "nan.safetensors"
    save_file({PRED.format(1): torch.full((8, 64), float("nan"))}, str(path))
    r = httpx.put(
        f"{server.http}/v1/weights/{before.weight_version + 1}",
        content=path.read_bytes(),
        headers={
            "Authorization": f"Bearer {API_KEY}",
            "X-Content-SHA256": hashlib.sha256(path.read_bytes()).hexdigest(),
        },
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "non_finite_weights", r.text
    assert http.info()["weight_version"] == before.weight_version
    assert_same(http.generate(PROMPTS, **GREEDY).samples, before.samples)
    assert leftovers(server.state_dir) == []


def test_a_push_that_breaks_generation_is_rolled_back_by_the_canary(server, http, rpc):
    before = http.generate(PROMPTS, **GREEDY)
    broken = {BREAKS: torch.full((64,), 1e30), **predictors(3)}  # finite, but overflows
    for client in (http, rpc):
        with pytest.raises(ServerError) as e:
            client.push_weights(broken, before.weight_version + 1)
        assert e.value.status in (409, "FAILED_PRECONDITION"), e.value
        assert "canary" in e.value.message and "non-finite log-prob" in e.value.message
        assert httpx.get(f"{server.http}/readyz").status_code == 200
        assert http.info()["weight_version"] == before.weight_version
        assert_same(http.generate(PROMPTS, **GREEDY).samples, before.samples)
    code, kind = grpc_error_type(
        server.grpc, lambda pb2, stub: _raw_push(pb2, stub, broken, before.weight_version + 1)
    )
    assert (code, kind) == (grpc.StatusCode.FAILED_PRECONDITION, "canary_failed")
    assert leftovers(server.state_dir) == []
    # a good push right after goes through; its timing split shows the check and the canary
    res = http.push_weights(predictors(4), before.weight_version + 1)
    assert res["check_seconds"] > 0 and res["canary_seconds"] > 0, res
    assert res["weight_version"] == before.weight_version + 1


def _raw_push(pb2, stub, tensors: dict, version: int):
    from pr2_serve.client.grpc_client import _upload_messages
    from pr2_serve.client.payload import weights_payload

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "w.safetensors"
        save_file(tensors, str(path))
        messages = (  # the stock stub's protobuf messages, as any gRPC client sends them
            m if isinstance(m, pb2.UpdateWeightsRequest) else pb2.UpdateWeightsRequest(chunk=m)
            for m in _upload_messages(pb2, weights_payload(path), version)
        )
        stub.UpdateWeights(
            messages,
            metadata=[("authorization", f"Bearer {API_KEY}")],
        )


@pytest.mark.parametrize("order", ["chunk first", "two headers"])
def test_an_upload_out_of_order_is_invalid_argument_and_changes_nothing(server, http, order):
    """A chunk before the header, or a second header, is refused naming the part (the chunk
    decoded without a copy, api/chunk_codec, or the header parsed by the runtime)."""
    before = http.generate(PROMPTS, **GREEDY)
    files = sorted(os.listdir(server.state_dir / "weights"))
    version = before.weight_version + 1

    def messages(pb2):
        fields = {"version": version, "xxh128": "0" * 32, "total_size": 64}
        header = pb2.UpdateWeightsRequest(header=pb2.UpdateWeightsHeader(**fields))
        chunk = pb2.UpdateWeightsRequest(chunk=b"\0" * 64)
        return iter([chunk, header] if order == "chunk first" else [header, header])

    def call(pb2, stub):
        meta = [("authorization", f"Bearer {API_KEY}")]
        stub.UpdateWeights(messages(pb2), metadata=meta)

    pb2, pb2_grpc = load()
    with grpc.insecure_channel(server.grpc) as ch, pytest.raises(grpc.RpcError) as e:
        call(pb2, pb2_grpc.RolloutStub(ch))
    field = dict(e.value.trailing_metadata() or ()).get(FIELD_METADATA_KEY)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field == ("header" if order == "chunk first" else "chunk"), e.value.details()
    assert http.info()["weight_version"] == before.weight_version
    assert_same(http.generate(PROMPTS, **GREEDY).samples, before.samples)
    assert sorted(os.listdir(server.state_dir / "weights")) == files


def test_rollback_to_a_kept_version_gives_its_outputs(server, http, rpc):
    v = http.info()["weight_version"]
    http.push_weights(predictors(11), v + 1)
    out_a = http.generate(PROMPTS, **GREEDY).samples
    rpc.push_weights(predictors(12), v + 2)
    out_b = rpc.generate(PROMPTS, **GREEDY).samples
    assert any(a.output_token_ids != b.output_token_ids for a, b in zip(out_a, out_b, strict=True))
    assert http.info()["kept_versions"] == [v + 2, v + 1, 0]
    res = http.rollback(v + 1)
    assert (res["weight_version"], res["rolled_back_to"]) == (v + 3, v + 1)
    again = http.generate(PROMPTS, **GREEDY).samples
    assert {s.weight_version for s in again} == {v + 3}  # versions never go back
    assert_same(again, out_a)
    res = rpc.rollback(v + 2)
    assert (res["weight_version"], res["rolled_back_to"]) == (v + 4, v + 2)
    assert_same(rpc.generate(PROMPTS, **GREEDY).samples, out_b)
    # 0 is the model directory: a checkpoint without predictors, so they are zero again
    assert http.rollback(0)["weight_version"] == v + 5
    assert_same(http.generate(PROMPTS, **GREEDY).samples, server.base)
    for client in (http, rpc):  # v + 1 is no longer kept (--keep-versions 2)
        with pytest.raises(ServerError) as e:
            client.rollback(v + 1)
        assert e.value.status in (404, "NOT_FOUND") and e.value.field == "version", e.value
    for client in (HttpClient(server.http), GrpcClient(server.grpc)):
        with pytest.raises(ServerError) as e:
            client.rollback(0)
        assert e.value.status in (401, "UNAUTHENTICATED")
    assert http.info()["weight_version"] == v + 5


def test_loading_and_transfers_are_refused_without_their_flags(second_server, tiny_zero):
    server = second_server  # started without --weights-dir and --enable-weight-transfer
    http = HttpClient(server.http, api_key=API_KEY)
    rpc = GrpcClient(server.grpc, api_key=API_KEY)
    v = http.info()["weight_version"]
    for client in (http, rpc):
        with pytest.raises(ServerError) as e:
            client.load_weights(str(Path(tiny_zero) / "model.safetensors"), v + 1)
        assert e.value.status in (403, "PERMISSION_DENIED") and "--weights-dir" in str(e.value)
    assert http.info()["weight_version"] == v
    # collective transfers are opt-in too (the server would connect to the address named)
    body = {"master_address": "127.0.0.1", "master_port": 1, "world_size": 2, "rank_offset": 1}
    auth = {"Authorization": f"Bearer {API_KEY}"}
    r = httpx.post(f"{server.http}/v1/weights/transfer/init", json=body, headers=auth)
    assert r.status_code == 403 and "--enable-weight-transfer" in r.json()["error"]["message"]


def test_engine_errors_answer_in_the_error_shape(server, http):
    r = httpx.post(
        f"{server.http}/v1/generate",
        json={"prompts": [[1, 2, 3]], "max_tokens": 4},
        headers={"X-PR2-Fault": "step"},
        timeout=60,
    )
    assert r.status_code == 500 and r.json()["error"]["type"] == "engine_error", r.text

    def faulty(pb2, stub):
        req = pb2.GenerateRequest(max_tokens=4)
        req.prompts.add().token_ids.ids.extend([1, 2, 3])
        list(stub.Generate(req, metadata=[("x-pr2-fault", "step")]))

    assert grpc_error_type(server.grpc, faulty) == (grpc.StatusCode.INTERNAL, "engine_error")
    r = httpx.post(f"{server.http}/v1/weights/rollback/abc", headers={"Authorization": "x"})
    assert r.status_code == 422 and r.json()["error"]["field"].endswith("[version]"), r.text
    assert httpx.get(f"{server.http}/readyz").status_code == 200
    assert len(http.generate([[1, 2, 3], [4, 5]], n=2, max_tokens=4).samples) == 4


def _start_unchecked(model, state, timeout: float = 240.0):
    """A server that may come up not ready: ``(proc, http, grpc, first line)``."""
    proc = subprocess.Popen(
        server_command(model, state, "float32"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PR2_API_KEY": API_KEY},
    )
    found: dict = {}
    log: list[str] = []

    def pump():
        for line in proc.stdout:
            log.append(line)
            m = re.search(r"pr2-serve (ready|not ready) http=(\S+) grpc=(\S+)", line)
            if m:
                found.update(line=line, http=m.group(2), grpc=m.group(3))

    threading.Thread(target=pump, daemon=True).start()
    t0 = time.time()
    while "line" not in found:
        if proc.poll() is not None or time.time() - t0 > timeout:
            proc.kill()
            raise RuntimeError("".join(log[-40:]))
        time.sleep(0.3)
    return proc, f"http://{found['http']}", found["grpc"], found["line"], log


@pytest.mark.slow
def test_restored_weights_that_fail_the_canary_are_not_ready(server, tiny_zero, tmp_path):
    """A state directory whose committed version breaks generation (e.g. written by an older
    server): the server comes up not ready, refuses generates in the error shape, takes a
    rollback, and serves again."""
    state = tmp_path / "state"
    (state / "weights").mkdir(parents=True)
    save_file({BREAKS: torch.full((64,), 1e30)}, str(state / "weights" / "v3.safetensors"))
    record = {"version": 3, "files": {BREAKS: "v3.safetensors"}}
    (state / "committed.json").write_text(json.dumps(record))
    proc, url, target, line, log = _start_unchecked(tiny_zero, state)
    try:
        assert "pr2-serve not ready" in line and "canary" in line, line
        assert any("restored weight version 3" in x for x in log), log[-20:]
        r = httpx.get(f"{url}/readyz")
        assert r.status_code == 503 and "canary" in r.json()["reason"], r.text
        r = httpx.post(f"{url}/v1/generate", json={"prompts": [[1, 2, 3]]})
        assert r.status_code == 503 and r.json()["error"]["type"] == "unavailable", r.text
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        def health():
            with grpc.insecure_channel(target) as ch:
                return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest()).status

        assert health() == health_pb2.HealthCheckResponse.NOT_SERVING
        c = HttpClient(url, api_key=API_KEY)
        assert c.rollback(0)["weight_version"] == 4
        assert httpx.get(f"{url}/readyz").status_code == 200
        assert health() == health_pb2.HealthCheckResponse.SERVING
        assert_same(c.generate(PROMPTS, **GREEDY).samples, server.base)
    finally:
        proc.terminate()
        proc.wait(60)
