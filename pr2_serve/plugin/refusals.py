"""Engine configurations under which PR2's routes would be wrong, refused when the model is
built (by config, before anything runs), each with the reason and what to do instead.

The capture writes one row per token the router sees, from row 0, and the worker maps rows to
requests by the scheduler's token order. Anything that makes a router see other ranks' tokens, a
slice of the step's tokens, tokens that are later rejected, or that replaces the router, breaks
that mapping silently -- so it is refused loudly.
"""

from __future__ import annotations

import os

from pr2_serve.plugin.compat import PR2ConfigError

SIMULATION_ENV = "VLLM_MOE_ROUTING_SIMULATION_STRATEGY"
RUNNER_ENV = "VLLM_USE_V2_MODEL_RUNNER"


def engine_config_problems(vllm_config) -> list[str]:
    """Every reason this vLLM config cannot serve PR2 routes (empty: fine)."""
    p = vllm_config.parallel_config
    problems = []
    if getattr(vllm_config, "speculative_config", None) is not None:
        problems.append(
            "speculative decoding: rejected draft tokens would leave route rows behind; "
            "serve without --speculative-config"
        )
    if getattr(p, "data_parallel_size", 1) > 1:
        problems.append(
            "data parallel: the MoE layers see other ranks' tokens; start one pr2-serve per "
            "replica and give the trainer every address"
        )
    if getattr(p, "pipeline_parallel_size", 1) > 1:
        problems.append("pipeline parallel: each stage captures only its own layers' routes")
    if getattr(p, "enable_dbo", False) or getattr(p, "ubatch_size", 0) > 1:
        problems.append(
            "micro-batching (--enable-dbo / ubatch_size): each router call sees a slice of "
            "the step's tokens"
        )
    if getattr(p, "prefill_context_parallel_size", 1) > 1:
        problems.append("prefill context parallel: each rank's router sees a slice of a prompt")
    if getattr(p, "decode_context_parallel_size", 1) > 1:
        problems.append("decode context parallel: KV slots are sharded across ranks")
    if _sequence_parallel_moe(p):
        problems.append("sequence-parallel MoE: each rank's router sees a slice of the tokens")
    if os.environ.get(SIMULATION_ENV):
        problems.append(
            f"{SIMULATION_ENV} is set: vLLM would build its routing simulator instead of "
            "the PR2 router; unset it"
        )
    return problems


# PR2 architecture -> why it is refused (one line, said at start)
REFUSED_ARCHITECTURES = {
    "PR2GptOssForCausalLM": (
        "GPT-OSS is refused: vLLM 0.32's in-place weight reload (every push) loads none of its "
        "routed experts ('GptOssRoutedExperts: Failed to load weights' in vLLM's layerwise "
        "reload, which then puts the previous expert tensors back), so pushed expert weights "
        "would not be served; on the CPU build the experts even come back unlike a fresh load"
    ),
}


# stock architecture without a PR2 variant -> why (one line, said at start)
UNSERVED_ARCHITECTURES = {
    "MiniMaxM2ForCausalLM": (
        "MiniMax-M2 is refused: PR2 defines its router (grouped_route with one group: top-k of "
        "sigmoid(z + W_p h) + c, weights sigmoid(z) renormalised) but the plugin has no variant "
        "of it and the trainer's replay cannot drive its router (transformers passes the "
        "correction bias in from the MoE block)"
    ),
}


def architecture_problem(architecture: str) -> str | None:
    """Why ``architecture`` cannot be served with PR2 (None: it can)."""
    return REFUSED_ARCHITECTURES.get(architecture)


def check_architecture(architecture: str) -> None:
    """Raise :class:`PR2ConfigError` with :func:`architecture_problem`'s reason, if any."""
    problem = architecture_problem(architecture)
    if problem:
        raise PR2ConfigError(problem)


def check_engine_config(vllm_config) -> None:
    """Raise :class:`PR2ConfigError` listing every problem of :func:`engine_config_problems`."""
    problems = engine_config_problems(vllm_config)
    if problems:
        raise PR2ConfigError("PR2 routes cannot be served with " + "; ".join(problems))


def _sequence_parallel_moe(parallel_config) -> bool:
    try:
        return bool(parallel_config.use_sequence_parallel_moe)
    except AttributeError:
        return False
