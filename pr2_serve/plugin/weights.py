"""In-place weight reload inside a vLLM worker, equal to a fresh load of the same weights.

vLLM's layerwise ``reload_weights`` restores each layer's original parameters, loads the new
checkpoint tensors, reruns ``process_weights_after_loading`` and copies the result into the old
storage (so CUDA graphs keep their addresses). On the CPU build, vLLM 0.32 skips one step on a
reload: the unquantized MoE method rebuilds ``w13``/``w2`` in checkpoint layout but does not call
the CPU experts' own ``process_weights_after_loading`` again (it is only called when the kernel
is first built), so the experts would read unpacked weights through the packed-layout kernel.
:func:`reload_all_weights` reruns that prepack for every CPU MoE layer. The update tests prove the
result equal to a freshly started engine (greedy tokens identical, log-probs within 1e-5).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


def iter_safetensors(files: dict[str, str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for ``{name: file}``, opening each file once; each tensor is
    read into its own memory and freed once loaded (no mapping of whole files: the reload's
    extra RSS is what the loader holds at once, not the checkpoint)."""
    from ..tensor_files import iter_tensors

    return iter_tensors(files)


def reload_all_weights(model_runner, files: dict[str, str]) -> None:
    """Reload the runner's model from ``{name: file}`` (every weight of the model)."""
    model_runner.reload_weights(weights_iterator=iter_safetensors(files))
    _redo_cpu_moe_prepack(model_runner.get_model())


def _redo_cpu_moe_prepack(model: torch.nn.Module) -> None:
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

    for module in model.modules():
        kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
        experts = getattr(kernel, "fused_experts", None)
        if isinstance(experts, CPUUnquantizedExperts):
            experts.process_weights_after_loading(module)
