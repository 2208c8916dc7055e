"""Weights over a collective (``POST /v1/weights/transfer/...``, the gloo engine through vLLM's
weight-transfer machinery; a real server): a transfer serves exactly as the same tensors pushed
over HTTP (policy-only, predictor-only, both) and is committed in the state directory like a
push; a wrong name/shape/dtype, a missing key, a world size no one completes and a trainer
killed mid-broadcast leave the old version serving, identical outputs, a clear error, no file,
and the next transfer works."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pr2_serve.client import HttpClient, ServerError
from tests.helpers import API_KEY, assert_same_samples, start_server
from trainer.transfer import CollectivePusher

pytestmark = pytest.mark.vllm

PROMPTS = [[5, 6, 7], list(range(40, 70))]
GREEDY = {"temperature": 0.0, "max_tokens": 6}
PRED = "model.layers.{}.mlp.predictor.weight"
ROOT = Path(__file__).resolve().parents[1]


def predictors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {PRED.format(i): torch.randn(8, 64, generator=g) * 2.0 for i in range(4)}


def policy(model_dir, seed: int) -> dict[str, torch.Tensor]:
    """Every checkpoint tensor of layers 0-1, perturbed."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for f in Path(model_dir).glob("*.safetensors"):
        sd.update(load_file(str(f)))
    return {
        n: t + 0.05 * torch.randn(t.shape, generator=g).to(t.dtype)
        for n, t in sd.items()
        if n.startswith(("model.layers.0.", "model.layers.1.")) and "predictor" not in n
    }


@pytest.fixture(scope="module")
def setup(tiny_zero, tmp_path_factory):
    state = tmp_path_factory.mktemp("xfer") / "state"
    srv = start_server(tiny_zero, state, "--enable-weight-transfer")
    http = HttpClient(srv.http, api_key=API_KEY)
    pusher = CollectivePusher([http], timeout_s=20)
    yield srv, http, pusher, state, tiny_zero
    pusher.close()
    http.close()
    assert srv.stop() == 0, "".join(srv.log[-40:])


def outputs(client) -> list:
    return client.generate(PROMPTS, **GREEDY).samples


def assert_same(a, b) -> None:
    assert_same_samples(a, b, atol=1e-5)


@pytest.mark.parametrize("which", ["predictor", "policy", "both"])
def test_a_transfer_serves_as_the_same_tensors_pushed(setup, which):
    _, http, pusher, state, model_dir = setup
    tensors = {
        "predictor": predictors(11),
        "policy": policy(model_dir, 1),
        "both": {**policy(model_dir, 2), **predictors(12)},
    }[which]
    v = http.info()["weight_version"]
    before = outputs(http)
    [res] = pusher.push(tensors, v + 1)
    assert res["weight_version"] == v + 1 and res["num_tensors"] == len(tensors)
    sent = outputs(http)
    assert {s.weight_version for s in sent} == {v + 1}
    assert any(a.output_token_ids != b.output_token_ids for a, b in zip(before, sent, strict=True))
    # committed like a push: the state directory holds the tensors (a restart restores them)
    record = json.loads((state / "committed.json").read_text())
    assert record["version"] == v + 1
    stored = load_file(str(state / "weights" / record["files"][next(iter(tensors))]))
    for name, t in tensors.items():
        assert torch.equal(stored[name], t), name
    http.push_weights(tensors, v + 2)  # the same tensors over HTTP
    assert_same(outputs(http), sent)


def test_refused_transfers_leave_the_old_version_serving(setup):
    srv, http, pusher, state, _ = setup
    pusher.push(predictors(20), http.info()["weight_version"] + 1)
    v = http.info()["weight_version"]
    before = outputs(http)
    good = predictors(21)
    cases = {
        "unknown tensor name": {"model.layers.0.mlp.bogus.weight": torch.zeros(8, 64)},
        "shape": {PRED.format(0): torch.zeros(8, 65)},
        "not a floating dtype": {PRED.format(0): torch.zeros(8, 64, dtype=torch.int32)},
    }
    for message, tensors in cases.items():
        t0 = time.perf_counter()
        with pytest.raises(ServerError) as e:
            pusher.push({**good, **tensors}, v + 1)
        assert e.value.status == 400 and message in str(e.value), e.value
        assert time.perf_counter() - t0 < 15  # refused before the broadcast, not a timeout
    with pytest.raises(ServerError) as e:  # no key
        CollectivePusher([HttpClient(srv.http)], timeout_s=5).push(good, v + 1)
    assert e.value.status == 401
    with pytest.raises(ServerError) as e:  # a version that is not newer
        pusher.push(good, v)
    assert e.value.status == 409
    # a world size no one completes (the trainer counts 2 workers, the server has 1)
    wrong = CollectivePusher([http], timeout_s=3, workers=[2])
    with pytest.raises(Exception, match=r"(?i)time|transfer_failed|502"):
        wrong.push(good, v + 1)
    wrong.close()
    assert http.info()["weight_version"] == v
    assert_same(outputs(http), before)
    assert list((state / "weights").glob("*.part")) == []
    [res] = pusher.push(good, v + 1)  # the group is opened again
    assert res["weight_version"] == v + 1


KILLED_TRAINER = """
import sys, time, torch
from pr2_serve.client import HttpClient
from trainer.transfer import CollectivePusher

class Slow(dict):  # items(): metadata first, then the tensors sent: stop after the first
    calls = 0

    def items(self):
        Slow.calls += 1
        for i, kv in enumerate(super().items()):
            if i == 1 and Slow.calls == 2:
                print("SENT", flush=True)
                time.sleep(600)
            yield kv

url, key, version = sys.argv[1], sys.argv[2], int(sys.argv[3])
sd = Slow({f"model.layers.{i}.mlp.predictor.weight": torch.full((8, 64), 7.0) for i in range(4)})
CollectivePusher([HttpClient(url, api_key=key)], bucket_bytes=1, timeout_s=60).push(sd, version)
"""


def test_a_trainer_killed_mid_transfer_changes_nothing(setup):
    srv, http, pusher, state, _ = setup
    v = http.info()["weight_version"]
    before = outputs(http)
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_TRAINER, srv.http, API_KEY, str(v + 1)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "SENT"  # one bucket is on the wire
        deadline = time.monotonic() + 60
        while not list((state / "weights").glob("*.part")):  # the server is receiving
            assert time.monotonic() < deadline, "the server never started receiving"
            time.sleep(0.05)
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 60
    while list((state / "weights").glob("*.part")):  # the receive fails at once, not at 60 s
        assert time.monotonic() < deadline, "the server is still receiving"
        time.sleep(0.1)
    assert http.info()["weight_version"] == v
    assert_same(outputs(http), before)  # answers again: the receive ended
    assert list((state / "weights").glob("*.part")) == []
    pusher.close_group()  # the server's group was the killed trainer's: a new one
    [res] = pusher.push(predictors(31), v + 1)
    assert res["weight_version"] == v + 1
