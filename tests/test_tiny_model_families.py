"""``pr2-tiny-model --family`` for the grouped (GLM-4.5, DeepSeek-V3, DeepSeek-V2) and GPT-OSS
families:
shapes that exercise the router, predictors on the MoE layers only."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from pr2_serve.core.served_checkpoint import moe_layer_indices
from pr2_serve.tiny.tiny_model import main


@pytest.mark.parametrize("family", ["glm4_moe", "deepseek_v3", "deepseek_v2"])
def test_grouped_family_exercises_the_router(family, tmp_path):
    main([str(tmp_path), "--family", family, "--predictor", "random"])
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["n_routed_experts"] == 16 and cfg["num_experts_per_tok"] == 4
    assert (cfg["n_group"], cfg["topk_group"], cfg["n_shared_experts"]) == (4, 2, 1)
    # DeepSeek-V2's group-limited softmax keeps the chosen scores as they are
    v2 = family == "deepseek_v2"
    assert cfg["routed_scaling_factor"] == 2.5 and cfg["norm_topk_prob"] is not v2
    assert cfg["hidden_size"] % 32 == 0
    assert moe_layer_indices(cfg) == [1, 2, 3]  # the first layer is dense
    t = load_file(str(tmp_path / "model.safetensors"))
    assert {k for k in t if ".predictor." in k} == {
        f"model.layers.{i}.mlp.predictor.weight" for i in (1, 2, 3)
    }
    if v2:
        assert cfg["topk_method"] == "group_limited_greedy"
        assert not any("e_score_correction_bias" in k for k in t)
        return
    bias = t["model.layers.2.mlp.gate.e_score_correction_bias"]
    assert bias.shape == (16,) and bias.abs().min() > 0


def test_gpt_oss_has_a_biased_router(tmp_path):
    main([str(tmp_path), "--family", "gpt_oss", "--seed", "1"])
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == ["GptOssForCausalLM"]
    assert (cfg["num_local_experts"], cfg["num_experts_per_tok"], cfg["head_dim"]) == (16, 4, 32)
    assert moe_layer_indices(cfg) == [0, 1, 2, 3]
    t = load_file(str(tmp_path / "model.safetensors"))
    assert t["model.layers.0.mlp.router.bias"].abs().min() > 0
    assert not any(".predictor." in k for k in t)
