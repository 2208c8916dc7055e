"""In-place weight reload inside a vLLM worker, equal to a fresh load of the same weights.

vLLM's layerwise ``reload_weights`` restores each layer's original parameters, loads the new
checkpoint tensors, reruns ``process_weights_after_loading`` and copies the result into the old
storage (so CUDA graphs keep their addresses). On the CPU build, vLLM 0.32 skips one step on a
reload: the unquantized MoE method rebuilds ``w13``/``w2`` in checkpoint layout but does not call
the CPU experts' own ``process_weights_after_loading`` again (it is only called when the kernel
is first built), so the experts would read unpacked weights through the packed-layout kernel.
:func:`reload_all_weights` reruns that prepack for every CPU MoE layer. The update tests prove the
result equal to a freshly started engine (greedy tokens identical, log-probs within 1e-5).

A reload also logs warnings that are expected on every push and read like errors; they are
dropped while it runs (:func:`quiet_reload_logs`), every other warning is kept.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

#: Layers a reload never finds in the pushed files, by design: rotary embeddings (their cos/sin
#: cache is computed, never a checkpoint tensor) and the predictors a stock checkpoint lacks
#: (vLLM keeps their current values: zeros until one is pushed, which the files then hold).
NO_CHECKPOINT_WEIGHTS = ("RotaryEmbedding", "PR2Predictor")
#: vLLM's loggers of those warnings: layerwise reload ("X: Failed to load weights") and the
#: weight loader ("Attempted to load weight W with dtype D into parameter with dtype P").
RELOAD_LOGGERS = (
    "vllm.model_executor.model_loader.reload.layerwise",
    "vllm.model_executor.models.utils",
)


def iter_safetensors(files: dict[str, str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for ``{name: file}``, opening each file once; each tensor is
    read into its own memory and freed once loaded (no mapping of whole files: the reload's
    extra RSS is what the loader holds at once, not the checkpoint)."""
    from pr2_serve.core.tensor_files import iter_tensors

    return iter_tensors(files)


def reload_all_weights(model_runner, files: dict[str, str]) -> None:
    """Reload the runner's model from ``{name: file}`` (every weight of the model)."""
    from pr2_serve.plugin.live_update import drop_spare

    drop_spare(model_runner.get_model())
    with quiet_reload_logs():
        model_runner.reload_weights(weights_iterator=iter_safetensors(files))
    redo_cpu_moe_prepack(model_runner.get_model())


class ReloadNoise(logging.Filter):
    """Drops what every reload logs by design: "Failed to load weights" of the layers in
    :data:`NO_CHECKPOINT_WEIGHTS`, and one "Attempted to load weight ... with dtype" line per
    tensor whose float dtype differs from the served one (a trainer pushes fp32 to a bf16
    server: the cast is the documented behaviour). A layer of another kind that loads nothing,
    or a cast that is not float to float, still warns."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (_no_checkpoint_layer(record) or _float_cast(record))


def _no_checkpoint_layer(record: logging.LogRecord) -> bool:
    args = record.args if isinstance(record.args, tuple) else ()
    return (
        record.msg == "%s: Failed to load weights"
        and len(args) == 1
        and str(args[0]).endswith(NO_CHECKPOINT_WEIGHTS)
    )


def _float_cast(record: logging.LogRecord) -> bool:
    args = record.args if isinstance(record.args, tuple) else ()
    return (
        str(record.msg).startswith("Attempted to load weight %s with dtype %s")
        and len(args) == 3
        and all(isinstance(d, torch.dtype) and d.is_floating_point for d in args[1:])
    )


class LiveNoise(ReloadNoise):
    """:class:`ReloadNoise`, and "X: Failed to load weights" of any layer: a live update
    (:mod:`.live_update`) feeds only the layers it changes, the others keep their tensors."""

    def filter(self, record: logging.LogRecord) -> bool:
        return super().filter(record) and record.msg != "%s: Failed to load weights"


@contextmanager
def quiet_reload_logs(noise: logging.Filter | None = None):
    """``noise`` (default :class:`ReloadNoise`) on vLLM's reload loggers while the block runs."""
    noise = noise or ReloadNoise()
    loggers = [logging.getLogger(name) for name in RELOAD_LOGGERS]
    for logger in loggers:
        logger.addFilter(noise)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(noise)


def quiet_live_logs():
    """:func:`quiet_reload_logs` with :class:`LiveNoise`."""
    return quiet_reload_logs(LiveNoise())


def redo_cpu_moe_prepack(
    model: torch.nn.Module,
    roots: list | None = None,
    then: Callable[[torch.nn.Module], None] | None = None,
) -> None:
    """Redo the CPU MoE prepack of the MoE layers under ``roots`` (default: the whole model):
    only layers just reloaded (prepacking packed weights again would scramble them); each
    layer once, ``then(layer)`` right after its prepack (a caller holding the tensors it
    replaced lets go of them there). vLLM's own step, with its packer swapped for
    :func:`prepack_in_place`: a layer's experts are never held twice."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    from vllm.model_executor.layers.fused_moe.experts import cpu_moe

    modules = {id(m): m for root in (roots or [model]) for m in root.modules()}
    whole, cpu_moe.cpu_prepack_moe_weight = cpu_moe.cpu_prepack_moe_weight, prepack_in_place
    try:
        for module in modules.values():
            kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
            experts = getattr(kernel, "fused_experts", None)
            if isinstance(experts, cpu_moe.CPUUnquantizedExperts):
                experts.process_weights_after_loading(module)
                if then is not None:
                    then(module)
    finally:
        cpu_moe.cpu_prepack_moe_weight = whole


def prepack_in_place(weight: torch.Tensor, isa: str) -> torch.Tensor:
    """vLLM's ``cpu_prepack_moe_weight`` (``[experts, n, k]`` into the CPU kernel's layout),
    one expert at a time, each written back over its own values: ``weight`` itself, packed.
    The kernel packs each expert alone, so this is bit-equal to packing the whole tensor at
    once (tested), which makes a new tensor and holds the layer's experts twice for a moment
    (252 MiB per layer of the 84-expert bench model)."""
    from vllm._custom_ops import cpu_prepack_moe_weight

    data = weight.data
    for e in range(data.shape[0]):
        data[e].copy_(cpu_prepack_moe_weight(data[e : e + 1], isa)[0])
    return weight
