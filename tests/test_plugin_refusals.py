"""Configurations PR2 cannot serve are refused with a clear error.

No monolithic MoE kernel (one that routes inside the kernel) runs on this CPU build, so the
guard is exercised on a stand-in for the MoE runner; the factory checks run on our own wrapper.
"""

from __future__ import annotations

import types

import pytest

from pr2_serve.plugin import PR2ConfigError, pr2_architecture
from pr2_serve.plugin.models import PR2MoEMixin, _pr2_moe_factory


def test_monolithic_kernel_is_refused():
    quant = type("Mxfp4MonolithicMoEMethod", (), {})()
    runner = types.SimpleNamespace(
        is_monolithic=True, routed_experts=types.SimpleNamespace(quant_method=quant)
    )
    layer = types.SimpleNamespace(mlp=types.SimpleNamespace(experts=runner))
    fake = types.SimpleNamespace(
        model=types.SimpleNamespace(layers=[layer]), pr2_moe_layer_indices=[0]
    )
    fake._pr2_moe_block = types.MethodType(PR2MoEMixin._pr2_moe_block, fake)
    with pytest.raises(PR2ConfigError, match=r"monolithic.*bypasses the router"):
        PR2MoEMixin._pr2_check_router_not_bypassed(fake)


@pytest.mark.parametrize(
    "kwargs, msg",
    [
        (
            {"use_grouped_topk": True, "scoring_func": "sqrtsoftplus", "num_expert_group": 1},
            "grouped routing with sqrtsoftplus",
        ),
        ({"scoring_func": "sigmoid"}, "ungrouped sigmoid"),
        ({"e_score_correction_bias": object()}, "correction"),
        ({"fuse_shared_experts": True}, "shared experts fused"),
        ({"custom_routing_function": print}, "already uses"),
    ],
)
def test_unsupported_routers_are_refused(kwargs, msg):
    pytest.importorskip("vllm")
    module = types.SimpleNamespace(FusedMoEFactory=lambda **kw: kw)
    with _pr2_moe_factory(module, {}), pytest.raises(PR2ConfigError, match=msg):
        module.FusedMoEFactory(prefix="model.layers.0.mlp.experts", **kwargs)


def test_unknown_architecture_is_refused():
    assert pr2_architecture("Qwen3MoeForCausalLM") == "PR2Qwen3MoeForCausalLM"
    with pytest.raises(PR2ConfigError, match="no PR2 variant"):
        pr2_architecture("LlamaForCausalLM")


def test_minimax_m2_is_refused_with_its_reason():
    """One line at start: what PR2 defines for the router and why it is not served."""
    assert pr2_architecture("DeepseekV2ForCausalLM") == "PR2DeepseekV2ForCausalLM"
    with pytest.raises(PR2ConfigError, match=r"^MiniMax-M2 is refused: .*replay") as err:
        pr2_architecture("MiniMaxM2ForCausalLM")
    assert "\n" not in str(err.value)
