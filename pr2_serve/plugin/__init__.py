"""The PR2 vLLM plugin: entry point ``vllm.general_plugins`` -> :func:`register`.

vLLM loads general plugins once in every process it starts (front end, engine core, workers), so
:func:`register` is idempotent and imports no model code: classes are registered by
``"module:Class"`` string and imported lazily by vLLM when a model asks for them.

The PR2 classes are registered under new architecture names (``PR2Qwen3MoeForCausalLM``, ...):
installing the plugin never changes how vLLM serves a stock checkpoint. A stock checkpoint is
served with PR2 routing by overriding its architecture, without editing its files::

    LLM(model_dir, hf_overrides={"architectures": ["PR2Qwen3MoeForCausalLM"]})

:class:`pr2_serve.engine.rollout_engine.RolloutEngine` does that for you (:func:`pr2_architecture`).
"""

from __future__ import annotations

from pr2_serve.plugin.compat import PR2ConfigError, check_vllm_version

__all__ = ["PR2_ARCHITECTURES", "PR2ConfigError", "pr2_architecture", "register"]

# stock architecture -> PR2 architecture (class in pr2_serve.plugin.models)
PR2_ARCHITECTURES: dict[str, str] = {
    "Qwen3MoeForCausalLM": "PR2Qwen3MoeForCausalLM",
    "Qwen2MoeForCausalLM": "PR2Qwen2MoeForCausalLM",
    "MixtralForCausalLM": "PR2MixtralForCausalLM",
    "OlmoeForCausalLM": "PR2OlmoeForCausalLM",
    "Glm4MoeForCausalLM": "PR2Glm4MoeForCausalLM",
    "DeepseekV3ForCausalLM": "PR2DeepseekV3ForCausalLM",
    "DeepseekV2ForCausalLM": "PR2DeepseekV2ForCausalLM",
    "GptOssForCausalLM": "PR2GptOssForCausalLM",
}


def pr2_architecture(stock: str) -> str:
    """The PR2 architecture name serving checkpoints of architecture ``stock``."""
    if stock in PR2_ARCHITECTURES.values():
        return stock
    from pr2_serve.plugin.refusals import UNSERVED_ARCHITECTURES

    if stock in UNSERVED_ARCHITECTURES:
        raise PR2ConfigError(UNSERVED_ARCHITECTURES[stock])
    try:
        return PR2_ARCHITECTURES[stock]
    except KeyError:
        raise PR2ConfigError(
            f"architecture {stock!r} has no PR2 variant; supported: {sorted(PR2_ARCHITECTURES)}"
        ) from None


def register() -> None:
    """Register the PR2 model classes with vLLM's model registry and the ``gloo``
    weight-transfer engines with its weight-transfer factories (idempotent)."""
    check_vllm_version()
    from vllm import ModelRegistry

    supported = set(ModelRegistry.get_supported_archs())
    for pr2_name in PR2_ARCHITECTURES.values():
        if pr2_name not in supported:
            ModelRegistry.register_model(pr2_name, f"pr2_serve.plugin.models:{pr2_name}")
    from pr2_serve.transfer import register as register_transfer

    register_transfer()  # the ``gloo`` weight-transfer engines (pr2_serve.transfer)
