"""Weights over a collective (``POST /v1/weights/transfer/...`` and gRPC ``TransferInit`` /
``TransferWeights``, the gloo engine through vLLM's weight-transfer machinery; real servers): a
transfer serves exactly as the same tensors pushed over HTTP and as a server freshly started on
those weights (policy-only, predictor-only, both: greedy tokens, log-probs within 1e-5, routes)
and is committed in the state directory like a push (a restart restores it); a wrong
name/shape/dtype, a missing key, a world size no one completes and a trainer killed
mid-broadcast leave the old version serving, identical outputs, a clear error, no file, and the
next transfer works; ``pr2-train --weight-transfer gloo`` against two servers (one over HTTP,
one over gRPC) gets every version to both, and they agree."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pr2_serve.client import GrpcClient, HttpClient, ServerError
from pr2_serve.core.types import Sampling
from tests.helpers import API_KEY, assert_same_samples, start_server
from trainer.rollouts.collective_push import CollectivePusher, GroupNotFormed
from trainer.run.cli import main as train_main

pytestmark = pytest.mark.vllm

PROMPTS = [[5, 6, 7], list(range(40, 70))]
GREEDY = {"temperature": 0.0, "max_tokens": 6}
PRED = "model.layers.{}.mlp.predictor.weight"
ROOT = Path(__file__).resolve().parents[1]


def predictors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {PRED.format(i): torch.randn(8, 64, generator=g) * 2.0 for i in range(4)}


def policy(model_dir, seed: int | None) -> dict[str, torch.Tensor]:
    """Every checkpoint tensor of layers 0-1, perturbed (seed None: as they are)."""
    g = torch.Generator().manual_seed(seed or 0)
    sd = {}
    for f in Path(model_dir).glob("*.safetensors"):
        sd.update(load_file(str(f)))
    scale = 0.0 if seed is None else 0.05
    return {
        n: t + scale * torch.randn(t.shape, generator=g).to(t.dtype)
        for n, t in sd.items()
        if n.startswith(("model.layers.0.", "model.layers.1.")) and "predictor" not in n
    }


def write_model_dir(src, dst: Path, tensors: dict[str, torch.Tensor]) -> Path:
    """A copy of the model directory ``src`` with ``tensors`` in its checkpoint (replaced where
    it has them, new ones in its first file)."""
    shutil.copytree(src, dst)
    files = sorted(dst.glob("*.safetensors"))
    left = dict(tensors)
    for i, f in enumerate(files):
        sd = load_file(str(f))
        sd.update({n: left.pop(n) for n in list(left) if n in sd})
        if i == len(files) - 1:
            sd.update(left)
            index = dst / "model.safetensors.index.json"
            if index.exists():  # the new names live in this file
                idx = json.loads(index.read_text())
                idx["weight_map"].update({n: f.name for n in left})
                index.write_text(json.dumps(idx))
        save_file(sd, str(f), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def setup(zero_server, tiny_zero):
    """The shared server (``--enable-weight-transfer``) and a trainer-side pusher."""
    srv = zero_server
    http = HttpClient(srv.http, api_key=API_KEY)
    pusher = CollectivePusher([http], timeout_s=20)
    yield srv, http, pusher, srv.state_dir, tiny_zero
    pusher.close()
    http.close()


@pytest.fixture(scope="module")
def fresh(tiny_zero, tmp_path_factory):
    """A second server, freshly started on tiny_zero + policy(5) + predictors(6): the second
    server of the two-server trainer run."""
    target = {**policy(tiny_zero, 5), **predictors(6)}
    root = tmp_path_factory.mktemp("fresh")
    model = write_model_dir(tiny_zero, root / "model", target)
    srv = start_server(model, root / "state", "--enable-weight-transfer")
    http = HttpClient(srv.http, api_key=API_KEY)
    yield srv, http, target, outputs(http)
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


def test_a_transfer_is_written_over_the_file_a_commit_removed(setup):
    """A version's file that a commit removes becomes the spare the next transfer writes
    over (``WeightStore.reuse_spare``: its pages are still cached)."""
    _, http, pusher, state, _ = setup
    v = http.info()["weight_version"]
    inodes = []
    for k in range(1, 5):  # v+3's commit removes v+1's file; v+4 is written into it
        pusher.push(predictors(50 + k), v + k)
        record = json.loads((state / "committed.json").read_text())
        inodes.append((state / "weights" / record["files"][PRED.format(0)]).stat().st_ino)
    assert len(set(inodes[:3])) == 3 and inodes[3] == inodes[0]
    assert (state / "spare" / "0").stat().st_ino == inodes[1]  # v+4's commit removed v+2's


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
    with pytest.raises((GroupNotFormed, ServerError), match=r"world_size 3\b"):  # either side
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
from trainer.rollouts.collective_push import CollectivePusher, GroupNotFormed

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


def test_transfers_serve_as_a_freshly_started_server(setup, reference, tiny_zero):
    """Each kind of transfer brings the server to the target weights (tiny_zero + policy(5) +
    predictors(6)): both at once; the policy alone (after the old policy back); the predictors
    alone (after zeros). Greedy tokens identical to an engine holding the target, log-probs
    within 1e-5, routes equal. (The engine is the session's reference on tiny_random, given
    the target: the same tensors, as its predictors are all replaced; that an update serves as
    an engine started on its weights is proven once, in test_engine_weights.)"""
    _, http, pusher, _, _ = setup
    target = {**policy(tiny_zero, 5), **predictors(6)}
    reference.update_weights(target, reference.weight_version + 1)
    fresh_out = reference.generate(PROMPTS, Sampling(**GREEDY))
    new_policy = {n: t for n, t in target.items() if "predictor" not in n}
    new_preds = {n: t for n, t in target.items() if "predictor" in n}
    steps = [
        ("both", target, True),
        ("policy back", policy(tiny_zero, None), False),
        ("policy", new_policy, True),
        ("predictors zero", {n: torch.zeros_like(t) for n, t in new_preds.items()}, False),
        ("predictors", new_preds, True),
    ]
    for what, tensors, same in steps:
        v = http.info()["weight_version"]
        [res] = pusher.push(tensors, v + 1)
        assert res["weight_version"] == v + 1, what
        got = outputs(http)
        if same:
            assert_same(got, fresh_out)
        else:  # (so the next transfer is what brings it back)
            assert any(
                a.output_token_ids != b.output_token_ids or a.logprobs != b.logprobs
                for a, b in zip(got, fresh_out, strict=True)
            ), what


def test_a_grpc_driven_transfer_commits_and_serves(setup):
    """gRPC ``TransferInit`` / ``TransferWeights``: committed and served as over HTTP; its
    refusals carry the HTTP route's codes (INVALID_ARGUMENT, UNAUTHENTICATED) and change
    nothing."""
    srv, http, _, state, _ = setup
    grpc = GrpcClient(srv.grpc, api_key=API_KEY)
    pusher = CollectivePusher([grpc], timeout_s=20)
    try:
        v = grpc.info()["weight_version"]
        [res] = pusher.push(predictors(41), v + 1)
        assert res["weight_version"] == v + 1 and res["num_tensors"] == 4
        assert res["receive_seconds"] > 0 and res["canary_seconds"] > 0
        assert json.loads((state / "committed.json").read_text())["version"] == v + 1
        sent = outputs(grpc)
        assert {s.weight_version for s in sent} == {v + 1}
        assert grpc.info()["weight_source"].startswith(f"version {v + 1}: transfer")
        with pytest.raises(ServerError) as e:
            pusher.push({PRED.format(0): torch.zeros(8, 65)}, v + 2)
        assert e.value.status == "INVALID_ARGUMENT" and "shape" in str(e.value), e.value
        with pytest.raises(ServerError) as e:
            CollectivePusher([GrpcClient(srv.grpc)], timeout_s=5).push(predictors(42), v + 2)
        assert e.value.status == "UNAUTHENTICATED", e.value
        assert grpc.info()["weight_version"] == v + 1
        assert_same(outputs(grpc), sent)
        http.push_weights(predictors(41), v + 2)  # the same tensors over HTTP
        assert_same(outputs(http), sent)
    finally:
        pusher.close()
        grpc.close()


@pytest.mark.slow
def test_two_servers_one_trainer_over_gloo_then_a_restart(fresh, tiny_zero, tmp_path, monkeypatch):
    """``pr2-train --weight-transfer gloo`` against two servers (the control calls over HTTP to
    one, gRPC to the other): one group of the trainer + both servers' workers; both commit every
    version, the versions and weights agree, both serve the same outputs. Then the first one,
    restarted on its state directory, serves the last transferred version again. (The first
    server is this test's own: it is stopped and restarted.)"""
    state = tmp_path / "state"
    srv = start_server(tiny_zero, state, "--enable-weight-transfer")
    http = HttpClient(srv.http, api_key=API_KEY)
    fsrv, fhttp, _, _ = fresh
    monkeypatch.setenv("PR2_API_KEY", API_KEY)
    out = tmp_path / "run"
    args = ["--servers", srv.http, f"grpc://{fsrv.grpc}", "--model-dir", str(tiny_zero)]
    args += ["--replay", "pr2", "--weight-transfer", "gloo", "--off-policy-steps", "1"]
    args += ["--prompts-per-batch", "2", "--samples-per-prompt", "2", "--max-tokens", "4"]
    train_main([*args, "--steps", "2", "--eval-every", "0", "--output-dir", str(out)])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]["pushed_version"]
    assert [r["pushed_version"] for r in rows] == [last - 1, last]
    assert rows[1]["rollout_versions"] == [last - 1]
    infos = [http.info(), fhttp.info()]
    for info in infos:
        assert info["weight_version"] == last
        assert info["weight_source"].startswith(f"version {last}: transfer"), info
        assert last - 1 in info["kept_versions"], info  # the step-1 version: committed too
    for key in ("policy_fingerprint", "predictor_fingerprint"):
        assert infos[0][key] == infos[1][key], key
    served = outputs(fhttp)
    assert {s.weight_version for s in served} == {last}
    assert_same(outputs(http), served)
    # a restart restores the transferred version from the state directory
    http.close()
    assert srv.stop() == 0, "".join(srv.log[-40:])
    again = start_server(tiny_zero, state, "--enable-weight-transfer")
    client = HttpClient(again.http, api_key=API_KEY)
    try:
        info = client.info()
        assert info["weight_version"] == last and "restored" in info["weight_source"], info
        assert info["policy_fingerprint"] == infos[0]["policy_fingerprint"]
        assert_same(outputs(client), served)
    finally:
        client.close()
        assert again.stop() == 0, "".join(again.log[-40:])
