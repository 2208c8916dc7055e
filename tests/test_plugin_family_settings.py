"""How the plugin builds the MoE layers of the grouped families (DeepSeek-V3, GLM-4.5): vLLM's
grouped top-k switched off, the layer's settings handed to the PR2 router, which then routes
exactly as :func:`pr2_serve.core.routing.grouped_route`; and the architecture refusals."""

from __future__ import annotations

import types

import pytest
import torch

from pr2_serve.core.routing import grouped_route
from pr2_serve.plugin.refusals import architecture_problem
from pr2_serve.plugin.router import PR2Router, RouteCapture

GROUPED = {
    "prefix": "model.layers.2.mlp.experts",
    "use_grouped_topk": True,
    "num_expert_group": 4,
    "topk_group": 2,
    "scoring_func": "sigmoid",
    "routed_scaling_factor": 2.5,
}


def _build(**kwargs):
    pytest.importorskip("vllm")
    from pr2_serve.plugin.models import _pr2_moe_factory

    module = types.SimpleNamespace(FusedMoEFactory=lambda **kw: kw)
    routers: dict = {}
    with _pr2_moe_factory(module, routers):
        built = module.FusedMoEFactory(**kwargs)
    return built, routers


@pytest.mark.parametrize("to_output", [True, False])
def test_grouped_layer_is_built_with_the_pr2_router(to_output):
    bias = torch.randn(16)
    built, routers = _build(
        **GROUPED, e_score_correction_bias=bias, apply_routed_scale_to_output=to_output
    )
    router = built["custom_routing_function"]
    assert routers == {2: router} and isinstance(router, PR2Router)
    assert built["use_grouped_topk"] is False  # else vLLM's grouped router runs, not ours
    g = router.grouped
    assert (g.num_groups, g.topk_group, g.scoring_func) == (4, 2, "sigmoid")
    assert g.correction_bias is bias  # the gate's own parameter: weight loads update it
    # vLLM scales the layer's output itself when asked to, and then gives routers 1.0
    assert g.routed_scaling_factor == (1.0 if to_output else 2.5)


def test_softmax_layer_has_no_grouped_settings():
    built, _ = _build(prefix="model.layers.0.mlp.experts", renormalize=True)
    assert built["custom_routing_function"].grouped is None
    assert "use_grouped_topk" not in built


def test_grouped_pr2_router_routes_and_captures_as_grouped_route():
    g = torch.Generator().manual_seed(0)
    h, w_p = torch.randn(9, 64, generator=g), torch.randn(16, 64, generator=g)
    z = h @ torch.randn(16, 64, generator=g).T
    bias = torch.randn(16, generator=g) * 0.1
    built, _ = _build(**GROUPED, e_score_correction_bias=bias, apply_routed_scale_to_output=False)
    router = built["custom_routing_function"]
    router.predictor = types.SimpleNamespace(weight=w_p)
    router.capture, router.moe_layer = RouteCapture(16, 3, 4, 16), 1
    w, ids = router(h, z, 4, True)
    ref_w, ref_ids = grouped_route(
        h,
        z,
        w_p,
        4,
        True,
        num_groups=4,
        topk_group=2,
        correction_bias=bias,
        routed_scaling_factor=2.5,
    )
    assert torch.equal(ids, ref_ids) and torch.equal(w, ref_w)
    assert torch.equal(router.capture.buffer[:9, 1].long(), ids.long())


def test_gpt_oss_is_refused_with_one_line_naming_the_reason():
    reason = architecture_problem("PR2GptOssForCausalLM")
    assert reason.startswith("GPT-OSS is refused: vLLM 0.32's in-place weight reload")
    assert "\n" not in reason
    for arch in ("PR2Glm4MoeForCausalLM", "PR2DeepseekV3ForCausalLM", "PR2Qwen3MoeForCausalLM"):
        assert architecture_problem(arch) is None


@pytest.mark.parametrize(
    "config, dtype, amx, backend",
    [
        ({"kv_lora_rank": 512}, "float32", True, "CPU_MLA"),  # vLLM would take AMX_MLA: fails
        ({"kv_lora_rank": 512}, torch.float32, True, "CPU_MLA"),
        ({"kv_lora_rank": 512}, "bfloat16", True, None),  # AMX MLA packs bf16: vLLM's choice
        ({"kv_lora_rank": 512}, "float32", False, None),  # no AMX: vLLM takes CPU_MLA itself
        ({"kv_lora_rank": None}, "float32", True, None),  # no latent KV: not MLA
        ({}, "float32", True, None),
    ],
)
def test_an_fp32_mla_model_on_an_amx_cpu_gets_the_reference_mla_backend(
    config, dtype, amx, backend
):
    """vLLM 0.32's CPU platform prefers its AMX MLA backend whenever the CPU has AMX tiles; its
    weight packing refuses fp32 at load. (On an AMX host the MLA tests of
    ``test_plugin_grouped_families.py`` run the whole path.)"""
    from pr2_serve.engine.vllm_setup import cpu_mla_backend

    got = cpu_mla_backend(config, dtype, amx)
    assert got == ({} if backend is None else {"attention_backend": backend})
