"""Weights loaded from the server's own filesystem (``pr2-serve --weights-dir``; a real server,
HTTP and gRPC): a loaded checkpoint serves exactly as the same tensors pushed, is copied into the
state directory (restorable, independent of its source), and paths outside the directory --
absolute, with ``..``, through a symlink -- are refused with the old version serving on."""

from __future__ import annotations

import json
import os

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from pr2_serve.client import GrpcClient, HttpClient, ServerError
from tests.helpers import API_KEY
from tests.helpers import assert_same_samples as assert_same

pytestmark = pytest.mark.vllm

PROMPTS = [[5, 6, 7], list(range(40, 70))]
GREEDY = {"temperature": 0.0, "max_tokens": 6}
PRED = "model.layers.{}.mlp.predictor.weight"


def predictors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {PRED.format(i): torch.randn(8, 64, generator=g) * 2.0 for i in range(4)}


@pytest.fixture(scope="module")
def setup(model_weights_server, weights_dir, tmp_path_factory):
    """The shared server (``--weights-dir weights_dir``) on the model's weights; a checkpoint
    directory and a file inside the allowed directory, one outside, and a symlink leading out."""
    srv, tmp = model_weights_server, tmp_path_factory.mktemp("load")
    (weights_dir / "step-1").mkdir()
    save_file(predictors(11), str(weights_dir / "step-1" / "model.safetensors"))
    save_file(predictors(12), str(weights_dir / "b.safetensors"))
    save_file(predictors(13), str(tmp / "outside.safetensors"))
    os.symlink(tmp / "outside.safetensors", weights_dir / "escape.safetensors")
    http, rpc = HttpClient(srv.http, api_key=API_KEY), GrpcClient(srv.grpc, api_key=API_KEY)
    yield srv, http, rpc, tmp, weights_dir
    http.close()
    rpc.close()


def outputs(client) -> list:
    return client.generate(PROMPTS, **GREEDY).samples


def test_a_loaded_checkpoint_serves_as_the_same_tensors_pushed(setup):
    srv, http, rpc, _, allowed = setup
    base, v = outputs(http), http.info()["weight_version"]
    assert http.load_weights("step-1", v + 1)["weight_version"] == v + 1  # in --weights-dir
    loaded = outputs(http)
    assert {s.weight_version for s in loaded} == {v + 1}
    assert any(a.output_token_ids != b.output_token_ids for a, b in zip(base, loaded, strict=True))
    http.push_weights(predictors(11), v + 2)
    assert_same(outputs(http), loaded)
    src = allowed / "b.safetensors"
    assert rpc.load_weights(str(src), v + 3)["weight_version"] == v + 3  # absolute, inside
    served = outputs(rpc)
    # copied in, not linked: the committed version keeps its tensors when the source changes
    record = json.loads((srv.state_dir / "committed.json").read_text())
    assert record["version"] == v + 3 and record["source"] == f"load {src}"
    stored = srv.state_dir / "weights" / record["files"][PRED.format(0)]
    assert stored.parent == srv.state_dir / "weights" and stored.exists()
    save_file(predictors(99), str(src))
    torch.testing.assert_close(
        load_file(str(stored))[PRED.format(0)], predictors(12)[PRED.format(0)]
    )
    assert_same(outputs(http), served)


def test_paths_outside_the_weights_dir_are_refused_and_nothing_changes(setup):
    srv, http, rpc, tmp, _ = setup
    v = http.info()["weight_version"]
    before = outputs(http)
    cases = [
        ("../outside.safetensors", 403),
        (str(tmp / "outside.safetensors"), 403),
        ("escape.safetensors", 403),  # a symlink leading out
        ("missing.safetensors", 404),
    ]
    for client in (http, rpc):
        for path, status in cases:
            with pytest.raises(ServerError) as e:
                client.load_weights(path, v + 1)
            code = {403: "PERMISSION_DENIED", 404: "NOT_FOUND"}[status]
            assert e.value.status in (status, code) and e.value.field == "path", (path, e.value)
        with pytest.raises(ServerError) as e:
            client.load_weights("b.safetensors", v)  # not newer
        assert e.value.status in (409, "FAILED_PRECONDITION")
    for client in (HttpClient(srv.http), GrpcClient(srv.grpc)):  # no key
        with pytest.raises(ServerError) as e:
            client.load_weights("b.safetensors", v + 1)
        assert e.value.status in (401, "UNAUTHENTICATED")
    url, auth = f"{srv.http}/v1/weights/load/{v + 1}", {"Authorization": f"Bearer {API_KEY}"}
    assert httpx.post(url, content=b"{").status_code == 401  # the token before the body
    r = httpx.post(url, content=b"{", headers=auth)
    assert r.status_code == 400 and r.json()["error"]["type"] == "malformed_json"
    r = httpx.post(url, json={"path": "b.safetensors", "extra": 1}, headers=auth)
    assert r.status_code == 422 and r.json()["error"]["field"] == "extra"
    assert http.info()["weight_version"] == v
    assert_same(outputs(http), before)
    assert sorted(p.name for p in (srv.state_dir / "weights").glob("*.part")) == []


def test_a_trainer_checkpoint_loads_as_the_run_pushed_it(setup, tiny_zero, monkeypatch):
    """A ``pr2-train --save-every 1`` run writes ``checkpoint-1`` into --weights-dir (its
    ``model.safetensors`` beside the optimizer and RNG states): loading that directory serves
    exactly what the run pushed at step 1 (policy and predictor fingerprints equal)."""
    from trainer.run.cli import main as train_main

    srv, http, _, _, allowed = setup
    monkeypatch.setenv("PR2_API_KEY", API_KEY)
    out = allowed / "run"
    args = ["--servers", srv.http, "--model-dir", str(tiny_zero), "--replay", "pr2"]
    args += ["--off-policy-steps", "1", "--prompts-per-batch", "2", "--samples-per-prompt", "2"]
    args += ["--max-tokens", "4", "--steps", "1", "--eval-every", "0", "--save-every", "1"]
    train_main([*args, "--output-dir", str(out)])
    assert len(list((out / "checkpoint-1").glob("*.safetensors"))) > 1  # not the weights alone
    keys = ("policy_fingerprint", "predictor_fingerprint")
    pushed = {k: http.info()[k] for k in keys}
    v = http.info()["weight_version"] + 1
    http.push_weights(predictors(14), v)  # something else serves meanwhile
    assert {k: http.info()[k] for k in keys} != pushed
    assert http.load_weights("run/checkpoint-1", v + 1)["weight_version"] == v + 1
    assert {k: http.info()[k] for k in keys} == pushed


def test_a_sharded_checkpoint_loads_and_a_broken_file_is_refused_naming_it(setup):
    """A sharded checkpoint (an index and its two files: copied in whole, then applied) serves
    exactly as the same tensors pushed; a truncated one-file checkpoint (applied as it is read)
    is refused naming the file, and the version before serves on with no file left behind."""
    srv, http, _, _, allowed = setup
    shards, tensors = allowed / "sharded", predictors(15)
    shards.mkdir()
    names = sorted(tensors)
    weight_map = {n: f"model-0000{1 + k % 2}-of-00002.safetensors" for k, n in enumerate(names)}
    for file in set(weight_map.values()):
        save_file({n: tensors[n] for n, f in weight_map.items() if f == file}, str(shards / file))
    index = {"metadata": {}, "weight_map": weight_map}
    (shards / "model.safetensors.index.json").write_text(json.dumps(index))
    v = http.info()["weight_version"]
    assert http.load_weights("sharded", v + 1)["weight_version"] == v + 1
    loaded = outputs(http)
    record = json.loads((srv.state_dir / "committed.json").read_text())
    assert len({record["files"][n] for n in names}) == 2  # each shard copied in
    http.push_weights(tensors, v + 2)
    assert_same(outputs(http), loaded)

    whole = (allowed / "b.safetensors").read_bytes()
    (allowed / "broken.safetensors").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ServerError) as e:
        http.load_weights("broken.safetensors", v + 3)
    assert (e.value.status, e.value.field) == (400, "path")
    assert "the safetensors header describes" in str(e.value), e.value
    assert str((allowed / "broken.safetensors").resolve()) in str(e.value), e.value
    assert http.info()["weight_version"] == v + 2
    assert_same(outputs(http), loaded)
    assert sorted(p.name for p in (srv.state_dir / "weights").glob("*.part")) == []
