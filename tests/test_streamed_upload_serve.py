"""Uploads applied as they arrive, on a real ``pr2-serve`` (the shared server: 0.25 MiB buckets,
so the tiny model's 2 MB arrive in 8): a NaN in the last bucket and a checksum that fails after
every bucket was applied leave the outputs bit-identical, and a whole model pushed this way
serves with the fingerprints the trainer computes for the same tensors (digested as the buckets
arrived)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file

from pr2_serve.client import GrpcClient, HttpClient, ServerError
from pr2_serve.client.payload import safetensors_parts
from pr2_serve.core.fingerprint import tensors_fingerprints
from tests.helpers import API_KEY
from tests.helpers import assert_same_samples as assert_same

pytestmark = pytest.mark.vllm

PROMPTS = [[5, 6, 7], list(range(40, 70)), [200, 1, 2, 3]]
SEEDED = {"n": 2, "temperature": 1.0, "max_tokens": 8, "seed": 5}


@pytest.fixture(scope="module")
def clients(zero_server):
    http, rpc = HttpClient(zero_server.http, api_key=API_KEY), GrpcClient(zero_server.grpc, API_KEY)
    yield http, rpc
    http.close()
    rpc.close()


def _files(server) -> set[str]:
    return {p.name for p in (server.state_dir / "weights").iterdir()}


PRED = "model.layers.{}.mlp.predictor.weight"


def _model(tiny_zero, shift: float) -> dict[str, torch.Tensor]:
    """Every tensor the server serves, predictors included (whatever earlier tests pushed)."""
    base = load_file(str(Path(tiny_zero) / "model.safetensors"))
    base.update({PRED.format(i): torch.full((8, 64), 0.01) for i in range(4)})
    return {n: t + shift for n, t in base.items()}


def _last_in_file(weights: dict) -> str:
    """The tensor whose bytes come last in the upload (the safetensors order)."""
    head = safetensors_parts(weights)[0].tobytes()
    header = json.loads(head[8:])
    header.pop("__metadata__", None)
    return max(header, key=lambda n: header[n]["data_offsets"][0])


def test_a_nan_in_the_last_bucket_leaves_the_outputs_bit_identical(zero_server, clients, tiny_zero):
    http, rpc = clients
    before, files = http.generate(PROMPTS, **SEEDED), _files(zero_server)
    weights = _model(tiny_zero, 0.01)
    last = _last_in_file(weights)
    weights[last] = weights[last].clone()
    weights[last].view(-1)[-1] = float("nan")
    for client in (http, rpc):
        with pytest.raises(ServerError) as e:
            client.push_weights(weights, before.weight_version + 1)
        assert e.value.status in (400, "INVALID_ARGUMENT"), e.value
        assert f"{last}: 1 of" in e.value.message
        assert http.info()["weight_version"] == before.weight_version
        assert_same(http.generate(PROMPTS, **SEEDED).samples, before.samples)
        assert _files(zero_server) == files


def test_a_checksum_that_fails_after_every_bucket_changes_nothing(zero_server, clients, tiny_zero):
    http, _ = clients
    before, files = http.generate(PROMPTS, **SEEDED), _files(zero_server)
    body = b"".join(p.tobytes() for p in safetensors_parts(_model(tiny_zero, 0.02)))
    r = httpx.put(
        f"{zero_server.http}/v1/weights/{before.weight_version + 1}",
        content=body,
        headers={"Authorization": f"Bearer {API_KEY}", "X-Content-XXH128": "0" * 32},
    )
    assert r.status_code == 400 and r.json()["error"]["field"] == "xxh128", r.text
    assert "xxh128 mismatch" in r.json()["error"]["message"]
    assert http.info()["weight_version"] == before.weight_version
    assert_same(http.generate(PROMPTS, **SEEDED).samples, before.samples)
    assert _files(zero_server) == files


def test_a_streamed_model_serves_with_the_trainers_fingerprints(zero_server, clients, tiny_zero):
    http, rpc = clients
    shapes = {PRED.format(i): (8, 64) for i in range(4)}
    for k, (client, checksum) in enumerate([(http, "xxh128"), (rpc, "sha256")]):
        weights = _model(tiny_zero, 0.03 * (k + 1))
        version = http.info()["weight_version"] + 1
        res = client.push_weights(weights, version, checksum)
        assert res["weight_version"] == version and res["check_seconds"] > 0
        info = http.info()
        expected = tensors_fingerprints(weights, shapes)
        assert (info["policy_fingerprint"], info["predictor_fingerprint"]) == (
            expected["policy"],
            expected["predictor"],
        )
        [s] = http.generate([[1, 2, 3]], temperature=0.0, max_tokens=2).samples
        assert s.weight_version == version
    # the shared server as it started (a model shifted as a whole hardly depends on its routes,
    # which a later test's predictor push must change)
    start = _model(tiny_zero, 0.0) | {n: torch.zeros(shapes[n]) for n in shapes}
    http.push_weights(start, http.info()["weight_version"] + 1)
