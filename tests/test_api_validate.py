"""Generate-request checks (``pr2_serve.service.validate``): each rule names its field. No
engine."""

from __future__ import annotations

import pytest

from pr2_serve.api.schemas import GenerateRequest
from pr2_serve.core.types import EngineInfo, Sampling
from pr2_serve.server.server_config import Limits
from pr2_serve.service.errors import ApiError
from pr2_serve.service.validate import validate

INFO = EngineInfo(
    model="m",
    architecture="Qwen3MoeForCausalLM",
    num_moe_layers=4,
    num_experts=8,
    top_k=2,
    moe_layer_indices=(0, 1, 2, 3),
    route_dtype="uint8",
    vocab_size=512,
    max_model_len=64,
)


def tokenize(text: str) -> list[int]:
    return list(text.encode())


def check(limits: Limits | None = None, serving_version: int = 0, **body):
    req = GenerateRequest(**{"prompts": [[1, 2, 3]], **body})
    return validate(req, INFO, limits or Limits(), tokenize, serving_version)


@pytest.mark.parametrize(
    "body, status, field",
    [
        ({"min_weight_version": 3}, 409, "min_weight_version"),
        ({"max_tokens": 64}, 400, "max_tokens"),
        ({"n": 2, "temperature": 0.0}, 400, "n"),
        ({"top_k": 513}, 400, "top_k"),
        ({"stop_token_ids": [1, 512]}, 400, "stop_token_ids[1]"),
        ({"stop_token_ids": [-1]}, 400, "stop_token_ids[0]"),
        ({"prompts": [[1], []]}, 400, "prompts[1]"),
        ({"prompts": [""]}, 400, "prompts[0]"),
        ({"prompts": [[1, 2, 900]]}, 400, "prompts[0][2]"),
        ({"prompts": [[1], [-3]]}, 400, "prompts[1][0]"),
        ({"prompts": [[1] * 60], "max_tokens": 5}, 400, "prompts[0]"),
        ({"prompts": ["x" * 60], "max_tokens": 5}, 400, "prompts[0]"),
    ],
)
def test_each_rule_names_its_field(body, status, field):
    with pytest.raises(ApiError) as e:
        check(serving_version=2, **body)
    assert (e.value.status, e.value.field) == (status, field), e.value.message
    assert e.value.kind == ("failed_precondition" if status == 409 else "invalid_argument")


def test_per_request_limits():
    limits = Limits(max_samples_per_request=8, max_tokens_per_request=40)
    with pytest.raises(ApiError) as e:
        check(limits, prompts=[[1]] * 3, n=3)
    assert e.value.field == "n" and "9 samples exceeds the limit 8" in e.value.message
    with pytest.raises(ApiError) as e:
        check(limits, prompts=[[1]] * 2, n=2, max_tokens=11)
    assert e.value.field == "max_tokens" and "40 tokens per request" in e.value.message
    check(limits, prompts=[[1]] * 2, n=2, max_tokens=10)  # at the limits


def test_the_first_failing_rule_is_reported():
    with pytest.raises(ApiError) as e:  # both the version and the prompt are wrong
        check(serving_version=0, min_weight_version=1, prompts=[[900]])
    assert e.value.field == "min_weight_version"


def test_a_valid_request_becomes_engine_inputs():
    settings = {"n": 2, "temperature": 0.5, "top_p": 0.9, "top_k": 4, "max_tokens": 7, "seed": 3}
    body = {"prompts": [[5, 6], "ab"], "stop_token_ids": [9], "min_weight_version": 1}
    prompts, sampling = check(serving_version=1, **body, **settings)
    assert prompts == [[5, 6], [97, 98]]
    assert sampling == Sampling(**settings, stop_token_ids=(9,))


def test_text_is_tokenized_only_when_sent():
    def refuse(text: str) -> list[int]:
        raise AssertionError("no text prompt: the tokenizer must not be loaded")

    req = GenerateRequest(prompts=[[1, 2]])
    assert validate(req, INFO, Limits(), refuse, 0)[0] == [[1, 2]]
