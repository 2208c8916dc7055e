"""Real upstream clients against a real ``pr2-serve``: lm-evaluation-harness
(``local-completions`` on ``/v1/completions``, ``local-chat-completions`` on
``/v1/chat/completions`` and ``sglang-generate`` on ``/generate``), slime's
``routed_experts`` decoding of ``/generate``, and TRL's ``VLLMClient`` (processed log-probs,
``--enable-return-routed-experts``). Each is checked against ``/v1/generate`` on the same
server."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pybase64
import pytest

from pr2_serve.client import HttpClient
from tests.helpers import start_server

pytestmark = pytest.mark.vllm

QUESTIONS = ["12+35=", "7+8=", "hello ", "40+2=", "99+1="]


@pytest.fixture(scope="module")
def model(bpe_random):
    return bpe_random


@pytest.fixture(scope="module")
def server(bpe_server):
    return bpe_server  # shared with test_openai_compat (read-only use)


def greedy_text(server, prompt: str, max_tokens: int = 8) -> str:
    """``/v1/generate``'s greedy answer to ``prompt``, as lm-eval cuts it (at a newline)."""
    [r] = HttpClient(server.http).generate([prompt], max_tokens=max_tokens, temperature=0.0).samples
    text = httpx.post(f"{server.http}/detokenize", json={"tokens": r.output_token_ids}).json()
    return text["prompt"].split("\n")[0]


# -- lm-evaluation-harness -------------------------------------------------------------------------
def write_tasks(tmp_path, server) -> None:
    """A generate_until task (exact match; two targets are the model's own greedy answers,
    the rest are not) and a loglikelihood task, on local JSON data: no hub."""
    answers = [greedy_text(server, q) for q in QUESTIONS]
    gen = [
        {"question": q, "answer": a if i < 2 else a + "#"}
        for i, (q, a) in enumerate(zip(QUESTIONS, answers, strict=True))
    ]
    ll = [{"context": q, "continuation": a or "x"} for q, a in zip(QUESTIONS, answers, strict=True)]
    for name, rows in (("gen", gen), ("ll", ll)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    generation = {"until": ["\n"], "max_gen_toks": 8, "do_sample": False, "temperature": 0}
    tasks = {
        "pr2_gen": {
            "output_type": "generate_until",
            "doc_to_text": "{{question}}",
            "doc_to_target": "{{answer}}",
            "generation_kwargs": generation,
            "metric_list": [{"metric": "exact_match"}],
        },
        "pr2_ll": {
            "output_type": "loglikelihood",
            "doc_to_text": "{{context}}",
            "doc_to_target": "{{continuation}}",
            "target_delimiter": "",
            "metric_list": [{"metric": "perplexity"}, {"metric": "acc"}],
        },
    }
    for (task, cfg), data in zip(tasks.items(), ("gen", "ll"), strict=True):
        files = {"data_files": {"test": str(tmp_path / f"{data}.jsonl")}}
        head = {"task": task, "dataset_path": "json", "dataset_kwargs": files, "test_split": "test"}
        (tmp_path / f"{task}.yaml").write_text(json.dumps({**head, **cfg}))  # JSON is YAML


def run_lm_eval(tmp_path, model_name: str, base_url: str, model_dir) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model=model_name,
        model_args={
            "base_url": base_url,
            "model": str(model_dir.resolve()),
            "tokenizer": str(model_dir),
            "tokenizer_backend": "huggingface",
            "num_concurrent": 1,
            "max_retries": 1,
        },
        tasks=["pr2_gen", "pr2_ll"],
        task_manager=TaskManager(include_path=str(tmp_path)),
        log_samples=True,
    )


def expected_exact_match(server, samples: list[dict]) -> float:
    """exact_match computed from /v1/generate's greedy outputs on lm-eval's own prompts."""
    hits = [greedy_text(server, s["arguments"][0][0]) == s["target"] for s in samples]
    return sum(hits) / len(hits)


@pytest.mark.parametrize("flavour", ["local-completions", "sglang-generate"])
def test_lm_eval_generate_until_and_loglikelihood(server, model, tmp_path, monkeypatch, flavour):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_tasks(tmp_path, server)
    path = "/v1/completions" if flavour == "local-completions" else "/generate"
    out = run_lm_eval(tmp_path, flavour, server.http + path, model)
    gen, ll = out["results"]["pr2_gen"], out["results"]["pr2_ll"]
    assert gen["exact_match,none"] == pytest.approx(
        expected_exact_match(server, out["samples"]["pr2_gen"])
    )
    assert gen["exact_match,none"] == pytest.approx(2 / len(QUESTIONS))
    assert np.isfinite(ll["perplexity,none"]) and 0 <= ll["acc,none"] <= 1


def test_lm_eval_loglikelihoods_agree_across_dialects(server, model, tmp_path, monkeypatch):
    """The same log-likelihood requests through /v1/completions (echo) and /generate
    (input log-probs) give the same numbers: one engine, one rule."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    write_tasks(tmp_path, server)
    a = run_lm_eval(tmp_path, "local-completions", server.http + "/v1/completions", model)
    b = run_lm_eval(tmp_path, "sglang-generate", server.http + "/generate", model)
    lls = [[float(np.ravel(s["resps"])[0]) for s in r["samples"]["pr2_ll"]] for r in (a, b)]
    assert lls[0] == pytest.approx(lls[1], abs=1e-5)


def greedy_chat(server, model_id: str, question: str) -> str:
    """``/v1/chat/completions``' greedy answer to ``question`` as one user message, cut at a
    newline (what lm-eval's chat request asks for)."""
    body = {
        "model": model_id,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": 8,
        "temperature": 0,
        "stop": ["\n", "<|im_end|>"],
    }
    res = httpx.post(f"{server.http}/v1/chat/completions", json=body, timeout=60).json()
    return res["choices"][0]["message"]["content"]


def test_lm_eval_local_chat_completions(server, model, tmp_path, monkeypatch):
    """lm-eval's ``local-chat-completions`` with its chat template applied (one request per
    doc: ``messages``, ``model``, ``max_tokens``, ``temperature``, ``stop`` = the task's
    ``until``, ``seed``) on ``/v1/chat/completions``: its exact match counts the docs whose
    target is the server's own greedy chat answer (two of five)."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    write_tasks(tmp_path, server)
    model_id = str(model.resolve())
    answers = [greedy_chat(server, model_id, q) for q in QUESTIONS]
    assert answers[0] and answers[1]
    rows = [
        {"question": q, "answer": a if i < 2 else a + "#"}
        for i, (q, a) in enumerate(zip(QUESTIONS, answers, strict=True))
    ]
    (tmp_path / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = lm_eval.simple_evaluate(
        model="local-chat-completions",
        model_args={
            "base_url": server.http + "/v1/chat/completions",
            "model": model_id,
            "num_concurrent": 1,
            "max_retries": 1,
            "eos_string": "<|im_end|>",
        },
        tasks=["pr2_gen"],
        task_manager=TaskManager(include_path=str(tmp_path)),
        apply_chat_template=True,
        log_samples=True,
    )
    responses = [s["filtered_resps"][0] for s in out["samples"]["pr2_gen"]]
    assert sorted(responses) == sorted(answers)
    assert out["results"]["pr2_gen"]["exact_match,none"] == pytest.approx(2 / len(QUESTIONS))


# -- SGLang /generate as slime reads it ------------------------------------------------------------
@pytest.mark.parametrize("start", [0, 3])
def test_slime_decodes_routed_experts_of_generate(server, start):
    info = httpx.get(f"{server.http}/v1/info").json()
    prompt = [376, 14, 22, 24, 32]
    body = {
        "input_ids": prompt,
        "sampling_params": {"max_new_tokens": 6, "temperature": 0},
        "return_logprob": True,
        "return_routed_experts": True,
        "routed_experts_start_len": start,
    }
    output = httpx.post(f"{server.http}/generate", json=body, timeout=60).json()
    # slime/utils/types.py + rollout: tokens = prompt + output_ids, log-probs from the triples
    tokens = prompt + output["output_ids"]
    log_probs = [item[0] for item in output["meta_info"]["output_token_logprobs"]]
    routed = np.frombuffer(
        pybase64.b64decode(output["meta_info"]["routed_experts"].encode("ascii")), dtype=np.int32
    ).reshape(len(tokens) - 1 - start, info["num_moe_layers"], info["top_k"])
    [r] = HttpClient(server.http).generate([prompt], max_tokens=6, temperature=0.0).samples
    assert output["output_ids"] == r.output_token_ids
    assert log_probs == pytest.approx(r.logprobs, abs=1e-6)
    np.testing.assert_array_equal(routed, r.routes[start:].astype(np.int32))
    assert output["meta_info"]["finish_reason"]["type"] in ("stop", "length")
    assert output["meta_info"]["weight_version"] == str(r.weight_version)
    assert [t[1] for t in output["meta_info"]["output_token_logprobs"]] == r.output_token_ids


def test_sglang_generate_batch_n_stream_and_errors(server):
    url = f"{server.http}/generate"
    sp = {"max_new_tokens": 4, "temperature": 1.0, "n": 2, "sampling_seed": 1}
    batch = httpx.post(url, json={"text": ["12+", "7+"], "sampling_params": sp}, timeout=60).json()
    assert len(batch) == 4 and all(len(o["output_ids"]) <= 4 for o in batch)
    ref = HttpClient(server.http).generate(
        ["12+", "7+"], max_tokens=4, temperature=1.0, n=2, seed=1
    )
    assert [o["output_ids"] for o in batch] == [r.output_token_ids for r in ref.samples]
    one = {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 5, "temperature": 0}}
    whole = httpx.post(url, json=one, timeout=60).json()
    with httpx.stream("POST", url, json={**one, "stream": True}, timeout=60) as s:
        lines = [ln for ln in s.iter_lines() if ln.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    last = json.loads(lines[-2][6:])
    assert last["output_ids"] == whole["output_ids"] and last["text"] == whole["text"]
    bad = httpx.post(url, json={"input_ids": [1], "sampling_params": {"temperature": 9}})
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "sampling_params[temperature]"
    assert httpx.get(f"{server.http}/health_generate", timeout=60).status_code == 200
    assert httpx.get(f"{server.http}/get_model_info").json()["is_generation"] is True


# -- TRL -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def processed(model, tmp_path_factory):
    srv = start_server(
        model,
        tmp_path_factory.mktemp("eco-processed"),
        "--logprobs-mode",
        "processed_logprobs",
        "--enable-return-routed-experts",
    )
    yield srv
    srv.stop()


@pytest.mark.slow
def test_trl_vllm_client_generate_and_chat(processed, server):
    from trl.generation.vllm_client import VLLMClient

    client = VLLMClient(base_url=processed.http)
    ours = HttpClient(processed.http)
    prompts = [[376, 14, 22, 24, 32], [5, 17, 99, 3]]
    got = client.generate(prompts, temperature=0.0, max_tokens=8)
    ref = ours.generate(prompts, temperature=0.0, max_tokens=8).samples
    assert got["prompt_ids"] == prompts
    assert got["completion_ids"] == [r.output_token_ids for r in ref]
    assert [[lp[0] for lp in seq] for seq in got["logprobs"]] == [
        pytest.approx(r.logprobs, abs=1e-6) for r in ref
    ]
    # sampled (temperature 0.8, seeded): processed log-probs are ours in processed mode, and
    # not the raw ones (the raw server samples the same tokens: same logits, same seed)
    kw = {"temperature": 0.8, "max_tokens": 8, "n": 2}
    got = client.generate(prompts, generation_kwargs={"seed": 3}, **kw)
    ref = ours.generate(prompts, seed=3, **kw).samples
    raw = HttpClient(server.http).generate(prompts, seed=3, **kw).samples
    assert (
        got["completion_ids"]
        == [r.output_token_ids for r in ref]
        == [r.output_token_ids for r in raw]
    )
    flat = [lp[0] for seq in got["logprobs"] for lp in seq]
    assert flat == pytest.approx([x for r in ref for x in r.logprobs], abs=1e-6)
    assert not np.allclose(flat, [x for r in raw for x in r.logprobs], atol=1e-3)
    # chat: the chat template's prompt, the same greedy tokens
    messages = [[{"role": "user", "content": "12+35="}], [{"role": "user", "content": "hi"}]]
    chat = client.chat(messages, temperature=0.0, max_tokens=6)
    for m, ids, out in zip(messages, chat["prompt_ids"], chat["completion_ids"], strict=True):
        assert (
            ids == httpx.post(f"{processed.http}/tokenize", json={"messages": m}).json()["tokens"]
        )
        [r] = ours.generate([ids], temperature=0.0, max_tokens=6).samples
        assert out == r.output_token_ids


@pytest.mark.slow
def test_server_flag_fills_routed_experts(processed):
    body = {"prompt": [1, 2, 3], "max_tokens": 3, "temperature": 0}
    choice = httpx.post(f"{processed.http}/v1/completions", json=body, timeout=60).json()[
        "choices"
    ][0]
    assert choice["routed_experts"]
    off = httpx.post(
        f"{processed.http}/v1/completions",
        json={**body, "return_routed_experts": False},
        timeout=60,
    ).json()["choices"][0]
    assert "routed_experts" not in off
