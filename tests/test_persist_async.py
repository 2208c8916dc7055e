"""``pr2-serve --persist async``: a pushed version serves at once and is recorded after its files
are on the disk. A server killed (SIGKILL) while it persists a version restarts on the previous
complete version, and the trainer's start-up agreement (fingerprints) pushes its weights again."""

from __future__ import annotations

import json
import time

import pytest
import torch
from safetensors.torch import load_file

from pr2_serve.client import HttpClient
from pr2_serve.tiny.tiny_model import make_tiny_model
from tests.helpers import API_KEY, start_server
from trainer.rollouts.weight_agreement import agree, differences, tensors_target

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

FINGERPRINTS = ("policy_fingerprint", "predictor_fingerprint")
DELAY_S = 8  # the slow disk the test server has (PR2_TEST_PERSIST_DELAY_S)


def version_on_record(state) -> int | None:
    path = state / "committed.json"
    return json.loads(path.read_text())["version"] if path.exists() else None


def wait_for_record(state, version: int, limit_s: float = 60) -> None:
    deadline = time.monotonic() + limit_s
    while version_on_record(state) != version:
        assert time.monotonic() < deadline, f"version {version} never recorded"
        time.sleep(0.1)


def weights(base: dict, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {n: t + 0.01 * torch.randn(t.shape, generator=g) for n, t in base.items()}


def test_killed_while_persisting_restarts_on_the_previous_version(tmp_path):
    model = make_tiny_model(tmp_path / "model", seed=0, predictor="random")
    base = load_file(str(model / "model.safetensors"))
    state = tmp_path / "state"
    v1, v2 = weights(base, 1), weights(base, 2)
    env = {"PR2_TEST_PERSIST_DELAY_S": str(DELAY_S)}
    srv = start_server(model, state, "--persist", "async", env=env)
    try:
        http = HttpClient(srv.http, api_key=API_KEY)
        t0 = time.monotonic()
        assert http.push_weights(v1, 1)["weight_version"] == 1
        assert time.monotonic() - t0 < DELAY_S  # answered before it is on record
        assert http.info()["weight_version"] == 1
        wait_for_record(state, 1)
        fingerprints_v1 = {
            k: http.info()[k] for k in ("policy_fingerprint", "predictor_fingerprint")
        }
        assert http.push_weights(v2, 2)["weight_version"] == 2
        srv.proc.kill()  # while version 2 persists
        srv.proc.wait()
    finally:
        srv.stop()
    assert version_on_record(state) == 1
    srv = start_server(model, state)
    try:
        http = HttpClient(srv.http, api_key=API_KEY)
        info = http.info()
        assert info["weight_version"] == 1
        assert {k: info[k] for k in fingerprints_v1} == fingerprints_v1
        target = tensors_target(v2, model)
        assert differences(info, target.fingerprints) == ["policy", "predictor"]
        logged = []
        assert agree([http], [srv.http], target, "push", log=logged.append) == 2
        assert differences(http.info(), target.fingerprints) == [] and logged
    finally:
        srv.stop()
