"""The families with their own routers, served by the plugin on the CPU build: routes equal an
independent HF forward with the same predictor on every (token, layer) row, log-probs within
1e-5 (fp32), and a zero predictor is bit-identical to stock vLLM.

GLM-4.5 and DeepSeek-V3: grouped sigmoid routing with a correction bias; DeepSeek-V2: grouped
softmax routing (groups ranked by their best score); each with one shared expert (not routed, so
not captured), the first layer dense. The DeepSeeks run through vLLM's CPU MLA attention. Stock
vLLM's CPU rotary kernel mis-rotates DeepSeek's queries when there is more than one attention head,
and its keys on the MLA path (the plugin corrects both: :mod:`pr2_serve.plugin.cpu_rope`), so stock
vLLM is right, and bit-identity to it meaningful, only with one head on the plain attention path:
the stock comparison serves one-head DeepSeeks with ``VLLM_MLA_DISABLE=1`` (plugin and stock
alike), and two-head ones on the MLA path hold the HF oracle for a random and a pushed zero
predictor. GPT-OSS is refused at start (vLLM's in-place reloads do not load its experts:
:mod:`pr2_serve.plugin.refusals`)."""

from __future__ import annotations

import contextlib
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from pr2_serve.engine.rollout_engine import RolloutEngine, Sampling
from pr2_serve.tiny.tiny_model import TinySpec, make_tiny_model
from tests.helpers import assert_same_samples, hf_logprobs, hf_routes, load_hf, same_rows

SERVED_ON_CPU = ("glm4_moe", "deepseek_v3", "deepseek_v2")
DEEPSEEKS = ("deepseek_v3", "deepseek_v2")


@contextlib.contextmanager
def _stock_comparable(arch: str):
    """Where stock vLLM's CPU rope is right for ``arch`` (module docstring): the tiny model's
    sizes, and for the DeepSeeks the plain attention path (vLLM reads the variable at each engine
    start once its cache of them is cleared)."""
    if arch not in DEEPSEEKS:
        yield {}
        return
    import vllm.envs

    old = os.environ.get("VLLM_MLA_DISABLE")
    os.environ["VLLM_MLA_DISABLE"] = "1"
    vllm.envs.disable_envs_cache()
    try:
        yield {"num_heads": 1}
    finally:
        if old is None:
            os.environ.pop("VLLM_MLA_DISABLE")
        else:
            os.environ["VLLM_MLA_DISABLE"] = old
        vllm.envs.disable_envs_cache()


def _attention_class(engine) -> str:
    def name(worker):
        return type(worker.model_runner.get_model().model.layers[0].self_attn).__name__

    return engine.call(lambda llm: llm.collective_rpc(name))[0]


def _prompts():
    rng = np.random.default_rng(1)
    return [rng.integers(0, 256, size=n).tolist() for n in (4, 17, 40)]


def _oracle_rows(model_dir, rollouts):
    """``(rows equal to HF with the predictor, rows that differ from HF without it, worst
    |log-prob| gap with the served routes forced)``."""
    model, replay = load_hf(model_dir)
    agree = total = moved = 0
    worst = 0.0
    for r in rollouts:
        tokens = r.prompt_token_ids + r.output_token_ids
        ok = same_rows(hf_routes(model, replay, tokens, use_predictor=True), r.routes)
        agree, total = agree + int(ok.sum()), total + ok.size
        moved += int((~same_rows(hf_routes(model, replay, tokens, False), r.routes)).sum())
        lp = hf_logprobs(model, replay, r.prompt_token_ids, r.output_token_ids, r.routes)
        worst = max(worst, float(np.abs(lp - np.array(r.logprobs)).max()))
    return agree, total, moved, worst


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.parametrize("arch", SERVED_ON_CPU)
def test_served_routes_equal_hf_and_zero_predictor_is_stock(arch, tmp_path):
    with _stock_comparable(arch) as sizes:
        _served_equal_hf_and_stock(arch, TinySpec(arch=arch, **sizes), tmp_path)


def _served_equal_hf_and_stock(arch, spec, tmp_path):
    live = make_tiny_model(tmp_path / "live", seed=3, predictor="random", spec=spec)
    stock_dir = make_tiny_model(tmp_path / "stock", seed=3, predictor="zero", spec=spec)
    sampling = Sampling(n=2, max_tokens=10, seed=0)
    with RolloutEngine(live, dtype="float32", max_model_len=256) as engine:
        assert engine.info.top_k == spec.top_k and engine.info.num_experts == spec.num_experts
        first = spec.first_dense_layers
        assert engine.info.moe_layer_indices == tuple(range(first, 4))
        if arch in DEEPSEEKS:
            assert _attention_class(engine) == "DeepseekV2Attention"  # not MLA
        rollouts = engine.generate(_prompts(), sampling)
        # a push that moves a layer's router, correction bias and experts, then one that
        # restores the checkpoint with zero predictors: must serve exactly what stock serves
        policy = load_file(str(stock_dir / "model.safetensors"))
        moved_layer = {k: v + 0.05 for k, v in policy.items() if ".layers.2." in k}
        engine.update_weights(moved_layer, version=1)
        zeros = {
            f"model.layers.{i}.mlp.predictor.weight": torch.zeros(
                spec.num_experts, spec.hidden_size
            )
            for i in engine.info.moe_layer_indices
        }
        engine.update_weights({**policy, **zeros}, version=2)
        zero_pr2 = engine.generate(_prompts(), sampling, return_routes=False)
    assert rollouts[0].routes.shape[1:] == (4 - first, spec.top_k)
    agree, total, moved, worst = _oracle_rows(live, rollouts)
    print(f"{arch}: {agree}/{total} rows = HF, {moved} moved by the predictor, gap {worst:.1e}")
    assert agree == total, f"{total - agree} of {total} (token, layer) rows differ from HF"
    assert moved > 0  # the predictor changed some routes, and HF agrees on them
    assert worst < 1e-5
    with RolloutEngine(stock_dir, dtype="float32", max_model_len=256, plugin=False) as stock:
        plain = stock.generate(_prompts(), sampling, return_routes=False)
    assert_same_samples(zero_pr2, plain, atol=0.0)


@pytest.mark.vllm
@pytest.mark.slow
@pytest.mark.parametrize("arch", DEEPSEEKS)
def test_multihead_deepseek_mla_routes_equal_hf(arch, tmp_path):
    """Two attention heads on the MLA path (where stock vLLM's CPU rope is wrong): a random
    predictor and then a pushed zero predictor, each served routes = HF on every row, log-probs
    within 1e-5."""
    spec = TinySpec(arch=arch, num_heads=2)
    live = make_tiny_model(tmp_path / "live", seed=3, predictor="random", spec=spec)
    zero_dir = make_tiny_model(tmp_path / "zero", seed=3, predictor="zero", spec=spec)
    sampling = Sampling(n=2, max_tokens=10, seed=0)
    with RolloutEngine(live, dtype="float32", max_model_len=256) as engine:
        assert _attention_class(engine) == "DeepseekV2MLAAttention"
        rollouts = engine.generate(_prompts(), sampling)
        zeros = {
            f"model.layers.{i}.mlp.predictor.weight": torch.zeros(
                spec.num_experts, spec.hidden_size
            )
            for i in engine.info.moe_layer_indices
        }
        engine.update_weights(zeros, version=1)
        zero_rollouts = engine.generate(_prompts(), sampling)
    for model_dir, rs, name in ((live, rollouts, "random"), (zero_dir, zero_rollouts, "zero")):
        agree, total, moved, worst = _oracle_rows(model_dir, rs)
        print(f"{arch}, 2 heads, {name} predictor: {agree}/{total} rows = HF, gap {worst:.1e}")
        assert agree == total, f"{name}: {total - agree} of {total} rows differ from HF"
        assert worst < 1e-5
        assert (moved > 0) == (name == "random")


@pytest.mark.vllm
@pytest.mark.slow
def test_gpt_oss_is_refused_at_start(tmp_path):
    model_dir = make_tiny_model(tmp_path, seed=3, spec=TinySpec(arch="gpt_oss"))
    with pytest.raises(Exception, match=r"GPT-OSS is refused: vLLM 0\.32.s in-place weight reload"):
        RolloutEngine(model_dir, dtype="float32", max_model_len=256)


@pytest.mark.vllm
@pytest.mark.slow
def test_glm4_through_pr2_serve_dialects_and_training(tmp_path, monkeypatch):
    """One GLM-4.5 ``pr2-serve``: the routes of ``/v1/generate``, OpenAI ``routed_experts`` and
    SGLang ``/generate`` are the same rows; then 3 ``pr2-train`` steps per replay mode (r3, pr2)
    keep the trainer's old pass equal to the server (train–infer KL < 1e-6 in fp32)."""
    import base64
    import io

    import httpx

    from pr2_serve.client import HttpClient
    from tests.helpers import API_KEY, start_server

    spec = TinySpec(arch="glm4_moe")
    model_dir = make_tiny_model(tmp_path / "m", seed=3, predictor="random", spec=spec)
    prompt = _prompts()[1]
    server = start_server(model_dir, tmp_path / "state")
    try:
        [ref] = HttpClient(server.http).generate([prompt], max_tokens=6, temperature=0.0).samples
        body = {"prompt": [prompt], "max_tokens": 6, "temperature": 0, "logprobs": 0}
        body |= {"return_token_ids": True, "return_routed_experts": True}
        headers = {"authorization": f"Bearer {API_KEY}"}
        oa = httpx.post(f"{server.http}/v1/completions", json=body, headers=headers, timeout=60)
        routes = np.load(io.BytesIO(base64.b64decode(oa.json()["choices"][0]["routed_experts"])))
        np.testing.assert_array_equal(routes, ref.routes)
        sg_body = {"input_ids": prompt, "return_routed_experts": True}
        sg_body["sampling_params"] = {"max_new_tokens": 6, "temperature": 0}
        sg = httpx.post(f"{server.http}/generate", json=sg_body, timeout=60).json()
        sg_routes = np.frombuffer(
            base64.b64decode(sg["meta_info"]["routed_experts"]), dtype=np.int32
        ).reshape(ref.routes.shape)
        np.testing.assert_array_equal(sg_routes, ref.routes.astype(np.int32))
        agree, total, moved, _ = _oracle_rows(model_dir, [ref])
        assert agree == total and moved > 0
        _train_both_modes(server, model_dir, tmp_path, monkeypatch)
    finally:
        server.stop()


@pytest.mark.vllm
@pytest.mark.slow
def test_multihead_deepseek_v3_trains_against_pr2_serve(tmp_path, monkeypatch):
    """A two-head DeepSeek-V3 behind ``pr2-serve``: 3 ``pr2-train`` steps with ``--replay r3``
    and then ``pr2``, each with the trainer's old pass equal to the server at step 1. The server
    is given its attention backend by name (``--attention-backend``, in vLLM's any-case form)."""
    from tests.helpers import start_server

    spec = TinySpec(arch="deepseek_v3", num_heads=2)
    model_dir = make_tiny_model(tmp_path / "m", seed=3, predictor="random", spec=spec)
    server = start_server(model_dir, tmp_path / "state", "--attention-backend", "cpu_mla")
    try:
        _train_both_modes(server, model_dir, tmp_path, monkeypatch)
    finally:
        server.stop()


def _train_both_modes(server, model_dir, tmp_path, monkeypatch) -> None:
    """3 ``pr2-train`` steps per replay mode (r3, then pr2) against ``server``: train-infer KL
    below 1e-6 (fp32) and every first PPO ratio exactly 1 at step 1, the off-policy
    zero-deviation reported."""
    import json

    from tests.helpers import API_KEY
    from trainer.run.cli import main as train_main

    monkeypatch.setenv("PR2_API_KEY", API_KEY)
    for mode in ("r3", "pr2"):
        out = tmp_path / f"train_{mode}"
        args = ["--servers", server.http, "--model-dir", str(model_dir), "--replay", mode]
        args += ["--off-policy-steps", "2", "--prompts-per-batch", "4"]
        args += ["--samples-per-prompt", "2", "--max-tokens", "4", "--steps", "3"]
        train_main([*args, "--eval-every", "0", "--output-dir", str(out), "--lr", "1e-3"])
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        first = rows[0]
        print(mode, {k: first[k] for k in ("train_infer_kl", "zero_deviation_offpolicy")})
        assert len(rows) == 3
        assert first["train_infer_kl"] < 1e-6 and first["first_ratio_max_dev"] == 0.0
        assert 0.0 <= first["zero_deviation_offpolicy"] <= 1.0
