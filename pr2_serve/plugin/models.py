"""PR2 variants of vLLM's MoE models (the only code that touches vLLM model internals).

Each class subclasses the stock vLLM class and changes three things:

1. **Routing.** While the stock ``__init__`` runs, the module-level ``FusedMoEFactory`` it calls
   is wrapped so that every MoE layer is built with ``custom_routing_function=`` a
   :class:`PR2Router`. vLLM then picks its custom-routing router on every platform (``CPURouter``
   honours the function on CPU, ``CustomRoutingRouter`` on CUDA), and kernel selection sees the
   custom routing from the start. The router computes ``ids = topk(z + W_p h, k)`` and gates with
   the unadjusted ``z`` (:func:`pr2_serve.core.routing.pr2_route`); a grouped layer (DeepSeek-V3,
   GLM-4.5, DeepSeek-V2) is built without vLLM's grouped top-k and its settings go to the PR2
   router instead (:func:`grouped_settings`), which selects by the same group-limited rule on
   the predictor-adjusted scores (:func:`pr2_serve.core.routing.grouped_route`).
2. **Predictors.** Each MoE block gets a ``predictor`` module (``weight [E, H]``, zero-initialised)
   loaded from ``model.layers.{i}.mlp.predictor.weight`` when the checkpoint has it.
3. **Capture.** Each router writes its ids into one preallocated device buffer
   ``[max_num_batched_tokens, num_moe_layers, k]`` (:class:`RouteCapture`): a slice copy, no host
   sync, safe under torch.compile and CUDA graphs. The worker maps rows to requests after each
   step (:mod:`pr2_serve.plugin.worker`).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Iterator
from types import ModuleType

import torch
from torch import nn

from pr2_serve.plugin.compat import PR2ConfigError
from pr2_serve.plugin.cpu_rope import fix_deepseek_attention_rope
from pr2_serve.plugin.refusals import SIMULATION_ENV, check_architecture, check_engine_config
from pr2_serve.plugin.router import GroupedRouting, PR2Predictor, PR2Router, RouteCapture

PREDICTOR_RE = re.compile(r"^model\.layers\.(\d+)\.mlp\.predictor\.weight$")


@contextlib.contextmanager
def _pr2_moe_factory(model_module: ModuleType, routers: dict[int, PR2Router]) -> Iterator[None]:
    """Make ``model_module.FusedMoEFactory`` build every MoE layer with a :class:`PR2Router`."""
    from vllm.model_executor.models.utils import extract_layer_index

    stock = model_module.FusedMoEFactory

    def factory(*args, **kwargs):
        if kwargs.get("custom_routing_function") is not None:
            raise PR2ConfigError("this model already uses a custom routing function")
        grouped = grouped_settings(kwargs)
        router = PR2Router(extract_layer_index(kwargs.get("prefix", "")), grouped)
        routers[router.layer_index] = router
        if grouped is not None:  # vLLM's grouped router would run instead of ours
            kwargs["use_grouped_topk"] = False
        return stock(*args, custom_routing_function=router, **kwargs)

    model_module.FusedMoEFactory = factory
    try:
        yield
    finally:
        model_module.FusedMoEFactory = stock


def grouped_settings(kwargs: dict) -> GroupedRouting | None:
    """A MoE layer's grouped-routing settings from its ``FusedMoEFactory`` arguments (None: a
    plain softmax top-k layer); refuses the routers PR2 does not define."""
    scoring = kwargs.get("scoring_func", "softmax")
    bias = kwargs.get("e_score_correction_bias")
    if kwargs.get("fuse_shared_experts"):
        raise PR2ConfigError(
            "shared experts fused into the routed kernel (ROCm AITER) would appear among the "
            "routed experts; serve with VLLM_ROCM_USE_AITER_FUSION_SHARED_EXPERTS=0"
        )
    if not kwargs.get("use_grouped_topk"):
        if scoring != "softmax" or bias is not None:
            raise PR2ConfigError(
                f"PR2 does not define routing for an ungrouped {scoring} router"
                + (" with a correction bias" if bias is not None else "")
            )
        return None
    if scoring not in ("sigmoid", "softmax"):
        raise PR2ConfigError(f"PR2 does not define grouped routing with {scoring} scores")
    scale = kwargs.get("routed_scaling_factor", 1.0)
    return GroupedRouting(
        num_groups=int(kwargs["num_expert_group"]),
        topk_group=int(kwargs["topk_group"]),
        scoring_func=scoring,
        correction_bias=bias,
        routed_scaling_factor=1.0 if kwargs.get("apply_routed_scale_to_output") else scale,
    )


class PR2MoEMixin:
    """Shared by the PR2 classes: build with PR2 routers, add predictors, load them."""

    _stock_module: ModuleType
    # DeepSeek's attention hands vLLM's CPU rotary kernel a query shape it mis-rotates
    # (:mod:`pr2_serve.plugin.cpu_rope`)
    _pr2_fix_cpu_rope: bool = False

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        check_architecture(type(self).__name__)
        check_engine_config(vllm_config)
        routers: dict[int, PR2Router] = {}
        with _pr2_moe_factory(self._stock_module, routers):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
        if not routers:
            raise PR2ConfigError(f"{type(self).__name__}: no MoE layer was built")
        if self._pr2_fix_cpu_rope:
            fix_deepseek_attention_rope(self)
        config = vllm_config.model_config.hf_text_config
        num_experts = getattr(config, "num_experts", None) or config.num_local_experts
        self.pr2_num_experts = int(num_experts)
        self.pr2_top_k = int(config.num_experts_per_tok)
        self.pr2_num_moe_layers = len(routers)
        self.pr2_capture = RouteCapture(
            vllm_config.scheduler_config.max_num_batched_tokens,
            len(routers),
            self.pr2_top_k,
            self.pr2_num_experts,
        )
        # checkpoint layer index -> predictor module (lives beside the router, in the MoE block)
        self.pr2_predictors: dict[int, PR2Predictor] = {}
        dtype = vllm_config.model_config.dtype
        for ordinal, (layer_index, router) in enumerate(sorted(routers.items())):
            block = self._pr2_moe_block(layer_index)
            block.predictor = PR2Predictor(self.pr2_num_experts, config.hidden_size, dtype)
            router.moe_layer = ordinal
            router.predictor = block.predictor
            router.capture = self.pr2_capture
            self.pr2_predictors[layer_index] = block.predictor
        self.pr2_moe_layer_indices = sorted(routers)
        self._pr2_check_router_not_bypassed()
        for layer_index, router in routers.items():
            check_router_is_pr2(self._pr2_moe_block(layer_index).experts, router, layer_index)

    def _pr2_moe_block(self, layer_index: int) -> nn.Module:
        layer = self.model.layers[layer_index]
        for name in ("mlp", "block_sparse_moe"):
            block = getattr(layer, name, None)
            if block is not None and hasattr(block, "experts"):
                return block
        raise PR2ConfigError(f"layer {layer_index}: MoE block not found")

    def _pr2_check_router_not_bypassed(self) -> None:
        for layer_index in self.pr2_moe_layer_indices:
            runner = self._pr2_moe_block(layer_index).experts
            if getattr(runner, "is_monolithic", False):
                raise PR2ConfigError(
                    f"layer {layer_index}: the MoE kernel "
                    f"{type(runner.routed_experts.quant_method).__name__} is monolithic: it routes "
                    "inside the kernel and bypasses the router, so the PR2 predictor would be "
                    "ignored and routes could not be captured. Serve this model unquantized or "
                    "with a quantization whose MoE kernel is modular."
                )

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Stock loading, with predictor tensors taken out and loaded into the predictors.

        Absent predictors stay as they are (zero on a first load) and are reported as loaded,
        so vLLM's strict "every parameter was loaded" check passes on stock checkpoints.
        """
        from vllm.model_executor.model_loader.weight_utils import default_weight_loader

        loaded: set[str] = set()

        def stock_weights() -> Iterator[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                m = PREDICTOR_RE.match(name)
                if m is None:
                    yield name, tensor
                    continue
                layer_index = int(m.group(1))
                if layer_index not in self.pr2_predictors:
                    raise PR2ConfigError(f"{name}: layer {layer_index} has no MoE router")
                # Look the parameter up at each load: in-place reloads swap it temporarily.
                module = self.pr2_predictors[layer_index]
                param = module.weight
                if tuple(tensor.shape) != tuple(param.shape):
                    raise PR2ConfigError(
                        f"{name}: shape {tuple(tensor.shape)} != {tuple(param.shape)}"
                    )
                getattr(param, "weight_loader", default_weight_loader)(param, tensor)

        loaded |= set(super().load_weights(stock_weights()))
        loaded |= {n for n, _ in self.named_parameters() if n.endswith(".predictor.weight")}
        self._pr2_check_router_not_bypassed()
        return loaded


def check_router_is_pr2(moe_runner, pr2_router: PR2Router, layer_index: int) -> None:
    """The MoE layer's router must call our PR2 router (vLLM builds other routers in some
    configurations, e.g. its routing simulator, which would silently bypass ours)."""
    router = getattr(moe_runner, "router", None)
    if getattr(router, "custom_routing_function", None) is not pr2_router:
        raise PR2ConfigError(
            f"layer {layer_index}: the MoE layer routes with {type(router).__name__}, not the "
            f"PR2 router: the predictor would be ignored and routes not captured (is "
            f"{SIMULATION_ENV} set?)"
        )


def _make(stock_module_path: str, stock_class: str, fix_cpu_rope: bool = False) -> type:
    import importlib

    module = importlib.import_module(stock_module_path)
    base = getattr(module, stock_class)
    return type(
        f"PR2{stock_class}",
        (PR2MoEMixin, base),
        {
            "_stock_module": module,
            "_pr2_fix_cpu_rope": fix_cpu_rope,
            "__doc__": f"{stock_class} with PR2 predictor-adjusted routing and route capture.",
            "__module__": __name__,
        },
    )


PR2Qwen3MoeForCausalLM = _make("vllm.model_executor.models.qwen3_moe", "Qwen3MoeForCausalLM")
PR2Qwen2MoeForCausalLM = _make("vllm.model_executor.models.qwen2_moe", "Qwen2MoeForCausalLM")
PR2MixtralForCausalLM = _make("vllm.model_executor.models.mixtral", "MixtralForCausalLM")
PR2OlmoeForCausalLM = _make("vllm.model_executor.models.olmoe", "OlmoeForCausalLM")
PR2Glm4MoeForCausalLM = _make("vllm.model_executor.models.glm4_moe", "Glm4MoeForCausalLM")
PR2DeepseekV3ForCausalLM = _make(
    "vllm.model_executor.models.deepseek_v2", "DeepseekV3ForCausalLM", fix_cpu_rope=True
)
PR2DeepseekV2ForCausalLM = _make(
    "vllm.model_executor.models.deepseek_v2", "DeepseekV2ForCausalLM", fix_cpu_rope=True
)
PR2GptOssForCausalLM = _make("vllm.model_executor.models.gpt_oss", "GptOssForCausalLM")
