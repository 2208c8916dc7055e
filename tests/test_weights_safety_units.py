"""The pieces behind "bad weights never replace good ones", without vLLM: the finiteness check,
the canary's verdicts, the error mapping, and no bare 500s (HTTP and gRPC) with a fake engine."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from pr2_serve.core import served_checkpoint as checkpoint
from pr2_serve.core.served_checkpoint import (
    CanaryError,
    NonFiniteWeightsError,
    TensorSpec,
    WeightTable,
    check_finite,
    non_finite_counts,
)
from pr2_serve.core.types import EngineInfo, Rollout
from pr2_serve.service.canary import Canary, output_problem, routes_problem
from pr2_serve.service.errors import ApiError, from_engine, internal

INFO = EngineInfo(
    model="m",
    architecture="Qwen3MoeForCausalLM",
    num_moe_layers=2,
    num_experts=8,
    top_k=2,
    moe_layer_indices=(0, 1),
    route_dtype="uint8",
    vocab_size=512,
    max_model_len=64,
)
PRED = "model.layers.{}.mlp.predictor.weight"


# -- finiteness --------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_non_finite_counts(dtype, monkeypatch):
    t = torch.zeros(100, 7, dtype=dtype)
    assert non_finite_counts(t) == (0, 0)
    t[3, 1], t[50, 2], t[99, 6] = float("nan"), float("inf"), float("-inf")
    assert non_finite_counts(t) == (1, 2)
    monkeypatch.setattr(checkpoint, "FINITE_CHUNK", 64)  # many chunks: same counts
    assert non_finite_counts(t) == (1, 2)
    assert non_finite_counts(torch.tensor([1, 2, 3])) == (0, 0)  # integers are finite


def test_check_finite_names_every_bad_tensor_and_its_count():
    good, bad = torch.zeros(4, 4), torch.zeros(4, 4)
    bad[0, :2] = float("nan")
    bad[1, 0] = float("inf")
    check_finite([("a", good)])
    with pytest.raises(NonFiniteWeightsError) as e:
        check_finite([("a", good), ("b", bad), ("c", torch.full((2,), float("-inf")))])
    assert str(e.value) == (
        "b: 3 of 16 values are not finite (2 NaN, 1 Inf); "
        "c: 2 of 2 values are not finite (0 NaN, 2 Inf)"
    )
    many = [(f"t{i}", torch.full((1,), float("nan"))) for i in range(5)]
    with pytest.raises(NonFiniteWeightsError, match=r"\(and 2 more tensors\)$"):
        check_finite(many)


def _table() -> WeightTable:
    return WeightTable(
        {
            "w": TensorSpec((4, 4), "F32"),
            PRED.format(0): TensorSpec((8, 4), "BF16"),
            PRED.format(1): TensorSpec((8, 4), "BF16"),
        }
    )


def test_stage_refuses_non_finite_tensors_and_files(tmp_path):
    table = _table()
    bad = torch.zeros(4, 4)
    bad[2, 2] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match=r"^w: 1 of 16 values"):
        table.stage({"w": bad}, tmp_path, 1)
    path = tmp_path / "u.safetensors"
    save_file({"w": torch.zeros(4, 4), PRED.format(1): torch.full((8, 4), float("inf"))}, path)
    with pytest.raises(NonFiniteWeightsError, match=PRED.format(1).replace(".", r"\.")):
        table.stage(path, tmp_path, 1)
    assert list(tmp_path.iterdir()) == [path]  # nothing staged
    assert table.stage({"w": torch.ones(4, 4)}, tmp_path, 1)["w"].startswith(str(tmp_path))


def test_with_zero_predictors_completes_a_weight_set(tmp_path):
    table = _table()
    files = table.with_zero_predictors({"w": "base.safetensors"}, tmp_path)
    zero = str(tmp_path / "zero-predictors.safetensors")
    assert files == {"w": "base.safetensors", PRED.format(0): zero, PRED.format(1): zero}
    z = load_file(zero)
    assert z[PRED.format(0)].dtype == torch.bfloat16 and not z[PRED.format(0)].any()
    full = {"w": "a", PRED.format(0): "b", PRED.format(1): "c"}
    assert table.with_zero_predictors(full, tmp_path) == full


# -- the canary --------------------------------------------------------------------------------
def _rollouts(canary: Canary, **change) -> list[Rollout]:
    out = []
    for i, p in enumerate(canary.prompts):
        n = canary.sampling.max_tokens
        routes = np.tile(np.array([0, 1], dtype=np.uint8), (len(p) + n - 1, 2, 1))
        fields = {
            "prompt_index": i,
            "sample_index": 0,
            "prompt_token_ids": p,
            "output_token_ids": [7] * n,
            "logprobs": [-1.0] * n,
            "routes": routes,
            "finish_reason": "length",
            "weight_version": 1,
        }
        out.append(Rollout(**{**fields, **(change if i == 1 else {})}))
    return out


def test_the_canary_is_fixed_greedy_and_small():
    c = Canary(INFO)
    assert c.prompts == Canary(INFO).prompts and len(c.prompts) == 3
    assert all(0 <= t < INFO.vocab_size for p in c.prompts for t in p)
    assert c.sampling.temperature == 0.0 and c.sampling.max_tokens <= 4
    assert c.check(_rollouts(c)) is None


@pytest.mark.parametrize(
    "change, words",
    [
        ({"logprobs": [-1.0, float("nan"), -1.0, -1.0]}, "non-finite log-prob (nan)"),
        ({"logprobs": [-1.0, -1.0, float("-inf"), -1.0]}, "non-finite log-prob (-inf)"),
        ({"output_token_ids": [7, 7, 9999, 7]}, "outside the vocabulary"),
        ({"routes": None}, "routes have shape None"),
        (
            {"routes": np.tile(np.arange(2, dtype=np.uint8), (3, 2, 1))},
            "routes have shape [3, 2, 2]",
        ),
        ({"routes": np.full((11, 2, 2), 9, np.uint8)}, "expert id 9 >= num_experts 8"),
        ({"routes": np.full((11, 2, 2), 3, np.uint8)}, "same expert twice"),
    ],
)
def test_the_canary_names_what_is_wrong(change, words):
    c = Canary(INFO)
    problem = c.check(_rollouts(c, **change))
    assert problem is not None and words in problem, problem
    assert problem.startswith("canary prompt 1") or "prompt 1," in problem
    assert c.check(_rollouts(c)[:2]) == "2 canary samples for 3 prompts"


def test_output_and_routes_rules():
    assert output_problem([]) is None
    assert routes_problem(np.array([[[0, 1]]], np.uint8), 1, INFO) == (
        "routes have shape [1, 1, 2], expected [1, 2, 2]"
    )


# -- errors --------------------------------------------------------------------------------------
def test_error_mapping():
    e = from_engine(CanaryError("the canary generate failed on the new weights: x"))
    assert (e.status, e.kind, e.field) == (409, "canary_failed", "weights")
    e = from_engine(NonFiniteWeightsError("w: 1 of 2 values are not finite"))
    assert (e.status, e.kind, e.field) == (400, "non_finite_weights", "weights")
    e = internal(RuntimeError("boom"))
    assert (e.status, e.kind, e.message) == (500, "internal", "internal error: RuntimeError: boom")
    mine = ApiError(404, "not_found", "x", "version")
    assert internal(mine) is mine


# -- no bare 500s, with a fake engine ------------------------------------------------------------
class FakeEngine:
    """What RolloutService uses of the engine; ``logprob`` is what every sample gets."""

    def __init__(self, logprob: float = -1.0, fail: BaseException | None = None) -> None:
        self.info, self.weight_version, self.logprob, self.fail = INFO, 0, logprob, fail

    def healthy(self) -> bool:
        return True

    def tokenize(self, text: str) -> list[int]:
        return [1, 2]

    def submit(self, prompts, sampling, **kw) -> cf.Future:
        if self.fail is not None:
            raise self.fail
        c = Canary(INFO)
        fut: cf.Future = cf.Future()
        rollouts = _rollouts(c)[: len(prompts)]
        for r in rollouts:
            r.logprobs = [self.logprob] * len(r.logprobs)
        fut.set_result(rollouts)
        return fut

    def generate(self, prompts, sampling, **kw):
        return self.submit(prompts, sampling).result()


def _client(tmp_path, engine):
    from fastapi.testclient import TestClient

    from pr2_serve.api.http import create_app
    from pr2_serve.service.rollout_service import RolloutService

    service = RolloutService(engine, tmp_path, "key")
    service.warm_up()
    return service, TestClient(create_app(service), raise_server_exceptions=False)


def test_an_unexpected_error_is_a_500_in_the_error_shape(tmp_path):
    service, client = _client(tmp_path, FakeEngine())
    service.engine.fail = RuntimeError("boom")
    r = client.post("/v1/generate", json={"prompts": [[1, 2, 3]]})
    assert r.status_code == 500, r.text
    assert r.json() == {
        "error": {"type": "internal", "message": "internal error: RuntimeError: boom"}
    }
    r = client.post("/v1/generate/stream", json={"prompts": [[1, 2, 3]]})
    assert r.status_code == 500 and r.json()["error"]["type"] == "internal"


def test_non_finite_log_probs_are_never_sent_and_make_the_server_not_ready(tmp_path):
    service, client = _client(tmp_path, FakeEngine())
    assert client.get("/readyz").json() == {"status": "ready", "weight_version": 0}
    service.engine.logprob = float("nan")  # the weights went bad after the canary passed
    r = client.post("/v1/generate", json={"prompts": [[1, 2, 3]], "max_tokens": 4})
    assert r.status_code == 500 and r.json()["error"]["type"] == "non_finite_output", r.text
    assert "non-finite log-prob (nan)" in r.json()["error"]["message"]
    r = client.post("/v1/generate/stream", json={"prompts": [[1, 2, 3]], "max_tokens": 4})
    assert r.status_code == 503 or r.json()["error"]["type"] == "non_finite_output"
    for _ in range(50):  # the canary runs again in the background and fails
        if client.get("/readyz").status_code == 503:
            break
        time.sleep(0.05)
    r = client.get("/readyz")
    assert r.status_code == 503 and "fail the canary" in r.json()["reason"], r.text
    r = client.post("/v1/generate", json={"prompts": [[1, 2, 3]]})
    assert r.status_code == 503 and r.json()["error"]["type"] == "unavailable"


class _Context:
    def __init__(self) -> None:
        self.aborted: tuple | None = None

    def invocation_metadata(self):
        return ()

    async def abort(self, code, details, trailing_metadata=()):
        self.aborted = (code, details, dict(trailing_metadata))
        raise RuntimeError("aborted")  # what grpc.aio does: the call ends here


def test_grpc_unexpected_errors_are_internal_with_a_type(tmp_path):
    import grpc

    from pr2_serve.api.grpc_server import RolloutServicer, pb2
    from pr2_serve.service.errors import TYPE_METADATA_KEY
    from pr2_serve.service.readiness import Phase
    from pr2_serve.service.rollout_service import RolloutService

    service = RolloutService(FakeEngine(fail=RuntimeError("boom")), tmp_path, "key")
    service.warm_up = lambda: None
    service.readiness.phase = Phase.SERVING
    servicer, ctx = RolloutServicer(service), _Context()

    async def call():
        req = pb2.GenerateRequest(max_tokens=2)
        req.prompts.add().token_ids.ids.extend([1, 2])
        async for _ in servicer.Generate(req, ctx):
            pass

    with pytest.raises(RuntimeError, match="aborted"):
        asyncio.run(call())
    code, details, trailing = ctx.aborted
    assert code == grpc.StatusCode.INTERNAL and "RuntimeError: boom" in details
    assert trailing[TYPE_METADATA_KEY] == "internal"
