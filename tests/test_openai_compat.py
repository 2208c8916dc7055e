"""The OpenAI-compatible routes against a real ``pr2-serve``, driven by the ``openai`` package:
completions and chat (greedy tokens, raw log-probs and ``routed_experts`` equal
``/v1/generate``'s), ``n > 1``, streaming, tokenize/detokenize, and refusals the client raises
as ``BadRequestError`` naming the parameter."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import openai
import pytest

from pr2_serve.client import HttpClient
from tests.helpers import API_KEY

pytestmark = pytest.mark.vllm

PROMPTS = [[376, 14, 22, 24, 32], [5, 17, 99, 3]]


@pytest.fixture(scope="module")
def model(bpe_random):
    return bpe_random


@pytest.fixture(scope="module")
def server(bpe_server):
    return bpe_server  # shared with test_ecosystem (read-only use)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.http}/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def model_id(client):
    return client.models.list().data[0].id


def ours(server, prompts, **kw):
    return HttpClient(server.http).generate(prompts, **kw).samples


def npy(b64: str) -> np.ndarray:
    return np.load(io.BytesIO(base64.b64decode(b64)), allow_pickle=False)


def test_completions_greedy_equal_generate(server, client, model_id):
    res = client.completions.create(
        model=model_id,
        prompt=PROMPTS,
        max_tokens=8,
        temperature=0,
        logprobs=0,
        extra_body={"return_token_ids": True, "return_routed_experts": True},
    )
    ref = ours(server, PROMPTS, max_tokens=8, temperature=0.0)
    assert [c.index for c in res.choices] == [0, 1]
    for c, r in zip(res.choices, ref, strict=True):
        extra = c.model_extra
        assert extra["prompt_token_ids"] == r.prompt_token_ids
        assert extra["token_ids"] == r.output_token_ids
        assert c.logprobs.token_logprobs == pytest.approx(r.logprobs, abs=1e-6)
        routes = npy(extra["routed_experts"])
        assert routes.dtype == r.routes.dtype and routes.shape == r.routes.shape
        np.testing.assert_array_equal(routes, r.routes)
        assert extra["weight_version"] == r.weight_version
    assert res.usage.prompt_tokens == 9 and res.usage.completion_tokens == 16
    # the text is the tokens' text; routed_experts_prompt_start drops leading rows
    tok = HttpTok(server)
    assert res.choices[0].text == tok.decode(ref[0].output_token_ids)
    skip = client.completions.create(
        model=model_id,
        prompt=PROMPTS[0],
        max_tokens=8,
        temperature=0,
        extra_body={"return_routed_experts": True, "routed_experts_prompt_start": 3},
    )
    np.testing.assert_array_equal(
        npy(skip.choices[0].model_extra["routed_experts"]), ref[0].routes[3:]
    )


class HttpTok:
    """The server's own detokenizer (``POST /detokenize``)."""

    def __init__(self, server):
        self.url = f"{server.http}/detokenize"

    def decode(self, ids):
        return httpx.post(self.url, json={"tokens": ids}).json()["prompt"]


def test_chat_greedy_equals_generate_on_the_templated_prompt(server, client, model_id):
    messages = [{"role": "user", "content": "12+35="}]
    res = client.chat.completions.create(
        model=model_id,
        messages=messages,
        max_tokens=6,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        extra_body={"return_token_ids": True, "return_routed_experts": True},
    )
    ids = httpx.post(f"{server.http}/tokenize", json={"messages": messages}).json()["tokens"]
    assert res.model_extra["prompt_token_ids"] == ids
    [r] = ours(server, [ids], max_tokens=6, temperature=0.0)
    c = res.choices[0]
    assert c.message.role == "assistant"
    assert c.model_extra["token_ids"] == r.output_token_ids
    assert [e.logprob for e in c.logprobs.content] == pytest.approx(r.logprobs, abs=1e-6)
    assert all(len(e.top_logprobs) == 2 for e in c.logprobs.content)
    np.testing.assert_array_equal(npy(c.model_extra["routed_experts"]), r.routes)
    assert c.message.content == HttpTok(server).decode(r.output_token_ids)


def test_n_samples_and_seeds(server, client, model_id):
    kw = dict(model=model_id, prompt=PROMPTS, max_tokens=6, temperature=1.0, n=3, seed=7)
    res = client.completions.create(**kw, extra_body={"return_token_ids": True})
    assert len(res.choices) == 6 and [c.index for c in res.choices] == list(range(6))
    ref = ours(server, PROMPTS, max_tokens=6, temperature=1.0, n=3, seed=7)
    assert [c.model_extra["token_ids"] for c in res.choices] == [r.output_token_ids for r in ref]
    chat = client.chat.completions.create(
        model=model_id, messages=[{"role": "user", "content": "hi"}], n=2, max_tokens=4
    )
    assert len(chat.choices) == 2


def test_streaming_equals_the_whole_answer(client, model_id):
    kw = dict(model=model_id, prompt="12+35=", max_tokens=8, temperature=0)
    whole = client.completions.create(**kw).choices[0].text
    chunks = list(
        client.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert chunks[-1].usage.completion_tokens == 8
    msgs = [{"role": "user", "content": "hi"}]
    whole = client.chat.completions.create(
        model=model_id, messages=msgs, max_tokens=8, temperature=0
    )
    parts = client.chat.completions.create(
        model=model_id, messages=msgs, max_tokens=8, temperature=0, stream=True
    )
    got = "".join(c.choices[0].delta.content or "" for c in parts if c.choices)
    assert got == whole.choices[0].message.content


def test_streamed_choices_carry_no_routed_experts_as_in_vllm(client, model_id):
    """vLLM 0.32 puts ``routed_experts`` on whole choices only: its stream choice types have
    no such field (should one appear, the streamed shape must follow). Asked for, a stream
    here carries none either."""
    from vllm.entrypoints.openai.chat_completion import protocol as chat
    from vllm.entrypoints.openai.completion import protocol as completion

    assert "routed_experts" in completion.CompletionResponseChoice.model_fields
    assert "routed_experts" in chat.ChatCompletionResponseChoice.model_fields
    assert "routed_experts" not in completion.CompletionResponseStreamChoice.model_fields
    assert "routed_experts" not in chat.ChatCompletionResponseStreamChoice.model_fields
    ask = {"extra_body": {"return_routed_experts": True}, "stream": True}
    kw = dict(model=model_id, max_tokens=4, temperature=0, **ask)
    msgs = [{"role": "user", "content": "hi"}]
    for chunks in (
        list(client.completions.create(prompt="12+35=", **kw)),
        list(client.chat.completions.create(messages=msgs, **kw)),
    ):
        choices = [c for chunk in chunks for c in chunk.choices]
        assert choices and all("routed_experts" not in (c.model_extra or {}) for c in choices)


def test_stop_strings_and_echo_with_prompt_logprobs(server, client, model_id):
    full = client.completions.create(model=model_id, prompt="12+35=", max_tokens=12, temperature=0)
    text = full.choices[0].text
    stop = text[3:5] if len(text) >= 5 else text[-1:]
    cut = client.completions.create(
        model=model_id, prompt="12+35=", max_tokens=12, temperature=0, stop=[stop]
    )
    assert cut.choices[0].finish_reason == "stop" and stop not in cut.choices[0].text
    assert text.startswith(cut.choices[0].text)
    # echo + logprobs (lm-eval's log-likelihood request): the prompt's log-probs first
    ids = PROMPTS[0]
    res = client.completions.create(
        model=model_id, prompt=ids, max_tokens=0, echo=True, logprobs=1, temperature=0
    )
    lp = res.choices[0].logprobs
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None
    # = the log-probs /v1/generate gives when the model is made to produce the same tokens
    for k in (1, 3):
        [r] = ours(server, [ids[:k]], max_tokens=1, temperature=0.0)
        if r.output_token_ids[0] == ids[k]:
            assert lp.token_logprobs[k] == pytest.approx(r.logprobs[0], abs=1e-5)
    assert all(len(t) == 2 for t in lp.top_logprobs[1:])  # the token + the most likely


def test_bad_parameters_raise_bad_request_naming_them(client, model_id):
    cases = [
        ({"temperature": 5.0}, "temperature"),
        ({"n": 2, "temperature": 0.0}, "n"),
        ({"prompt": [[1, 2, 10**6]]}, "prompt[0][2]"),
        ({"logprobs": 21}, "logprobs"),
        ({"extra_body": {"suffix": "x"}}, "suffix"),
        ({"max_tokens": 10**6}, "max_tokens"),
        ({"stop": [1]}, "stop"),
    ]
    for kw, param in cases:
        kw = {"model": model_id, "prompt": "12", "max_tokens": 4, **kw}
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(**kw)
        assert e.value.param == param or e.value.param.startswith(param), (kw, e.value.body)
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="12", max_tokens=2)
    assert e.value.param == "model"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model_id, messages=[], max_tokens=2)
    assert e.value.param == "messages"
    with pytest.raises(openai.ConflictError):
        client.completions.create(
            model=model_id, prompt="1", max_tokens=2, extra_body={"min_weight_version": 5}
        )


def test_models_health_tokenize_detokenize(server, model, model_id):
    assert model_id == str(model.resolve())
    assert httpx.get(f"{server.http}/health").status_code == 200
    tok = httpx.post(
        f"{server.http}/tokenize", json={"prompt": "12+35=", "return_token_strs": True}
    )
    body = tok.json()
    assert body["tokens"] == PROMPTS[0] and body["count"] == 5 and len(body["token_strs"]) == 5
    back = httpx.post(f"{server.http}/detokenize", json={"tokens": body["tokens"]}).json()
    assert back == {"prompt": "12+35="}
    bad = httpx.post(f"{server.http}/detokenize", json={"tokens": [10**6]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens[0]"
    metrics = httpx.get(f"{server.http}/metrics").text
    assert 'pr2_requests_total{kind="generate",protocol="openai"}' in metrics


def sse_events(text: str) -> list[dict]:
    """Events as an SSE parser reads them: ``data`` lines joined, ``event`` "message"."""
    out = []
    for block in text.strip().split("\n\n"):
        data = [ln[len("data:") :].lstrip() for ln in block.splitlines() if ln.startswith("data:")]
        if data:
            out.append({"data": "\n".join(data), "event": "message"})
    return out


@pytest.mark.parametrize(
    "path,body",
    [
        ("/v1/completions", {"prompt": "1+1=", "max_tokens": 3, "stream": True}),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True},
        ),
        ("/generate", {"text": "1+1=", "sampling_params": {"max_new_tokens": 3}, "stream": True}),
    ],
)
def test_streamed_events_match_the_published_schema(server, model_id, path, body):
    """Each SSE event validates against the route's documented ``text/event-stream`` schema,
    as schemathesis checks it (before Open API 3.2, ``schema`` describes one event)."""
    import jsonschema

    spec = httpx.get(f"{server.http}/openapi.json").json()
    content = spec["paths"][path]["post"]["responses"]["200"]["content"]
    schema = content["text/event-stream"]["schema"]
    headers = {"Authorization": f"Bearer {API_KEY}"}
    url, body = f"{server.http}{path}", {"model": model_id, **body}
    res = httpx.post(url, json=body, headers=headers, timeout=60)
    assert res.status_code == 200, res.text
    events = sse_events(res.text)
    assert len(events) >= 2 and events[-1]["data"] == "[DONE]"
    for ev in events:
        jsonschema.validate(ev, schema)
