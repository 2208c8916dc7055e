"""vLLM's layerwise reload without its buffer and its copy, on the CPU build (a live update's).

vLLM's reload (``initialize_layerwise_reload``) puts each layer on the meta device and wraps its
weight loaders: every tensor a layer receives is held until the layer has all of them, then the
layer is materialised, the held tensors loaded into it, the layer processed (repacking,
quantisation) and the result copied into the layer's original "kernel" tensors, whose storage
CUDA graphs captured. So a layer's received tensors, its new copy and, for an undo, a saved copy
of its old values all exist at once.

On the CPU nothing captured those pointers, and a *swapping* layer (:func:`swaps`) takes two
shortcuts, installed by :func:`install` over vLLM's loaders:

- **load as it arrives**: the layer is materialised at its first tensor (in the storage the
  last committed update let go of, where it fits: :mod:`pr2_serve.plugin.spare_storage`) and
  each tensor loaded into it at once (vLLM's own loader, counted as vLLM counts it): a received
  bucket is let go of when loaded, not held until its layer is complete;
- **swap, not copy**: the processed layer's tensors become the kernel tensors' data
  (``kernel.data = new``): the kernel tensor objects stay (whoever holds one sees the new
  values) and their old data, untouched, is the undo's copy of them (no copy is made).

A layer that does not swap (a deferred attention layer, whose scales vLLM loads into the kernel
tensors in place; one whose tensors share storage; any layer off the CPU) keeps vLLM's path,
and the undo copies its values (:func:`copies_in_place`).
"""

from __future__ import annotations

import inspect

import torch

from pr2_serve.plugin.spare_storage import SpareStorage

__all__ = ["copies_in_place", "install", "process_partial", "swaps"]

LOADER_NAME = "online_process_loader"  # vLLM unwraps a loader of this name to its original


def swaps(layer: torch.nn.Module) -> bool:
    """Whether ``layer`` (set up for a layerwise reload) loads as it arrives and swaps."""
    from vllm.model_executor.layers.attention import is_deferred_attention_layer
    from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO
    from vllm.model_executor.model_loader.reload.meta import SKIP_MODULES
    from vllm.platforms import current_platform

    info = LAYERWISE_INFO.get(layer)
    if info is None or not info.can_load() or info.kernel_tensors is None:
        return False
    if not current_platform.is_cpu() or is_deferred_attention_layer(layer):
        return False
    if layer.__class__.__name__ in SKIP_MODULES:
        return False
    params, buffers = info.kernel_tensors
    storages = [_storage(t) for t in [*params.values(), *buffers.values()] if t.numel()]
    return len(storages) == len(set(storages))  # no tensor aliases another


def copies_in_place(layer: torch.nn.Module, name: str, swapping: set[int]) -> bool:
    """Whether the reload writes tensor ``name`` of ``layer`` in place: a layer that does not
    swap, or a tensor vLLM never moves to the meta device (a bias), loaded where it is."""
    from vllm.model_executor.model_loader.reload.meta import SKIP_TENSORS

    return id(layer) not in swapping or name in SKIP_TENSORS


def install(model: torch.nn.Module, spare: SpareStorage) -> set[int]:
    """Give every swapping layer of ``model`` (just set up by ``initialize_layerwise_reload``)
    the loaders that load as they arrive (into ``spare`` storage where it fits); the ids of
    those layers."""
    swapping = set()
    for layer in model.modules():
        if swaps(layer):
            swapping.add(id(layer))
            _wrap(layer, spare)
    return swapping


def process_partial(model: torch.nn.Module, swapping: set[int]) -> None:
    """Process the swapping layers that got some tensors but not all (padding vLLM's count
    includes): what ``finalize_layerwise_reload`` would do to them, with a swap."""
    from vllm.model_executor.model_loader.reload.layerwise import LAYERWISE_INFO

    for layer in model.modules():
        info = LAYERWISE_INFO.get(layer)
        if id(layer) in swapping and info is not None and info.can_load() and info.load_numel:
            _process(layer, info)


def _wrap(layer: torch.nn.Module, spare: SpareStorage) -> None:
    from vllm.model_executor.model_loader.reload.layerwise import _get_original_loader
    from vllm.model_executor.model_loader.reload.meta import SKIP_LOAD_TENSORS
    from vllm.model_executor.model_loader.reload.utils import get_layer_tensors

    for name, tensor in get_layer_tensors(layer).items():
        if name in SKIP_LOAD_TENSORS:
            continue
        loader = getattr(tensor, "weight_loader", None)
        if not getattr(loader, "_pr2_eager", False):
            tensor.weight_loader = _eager_loader(layer, name, _get_original_loader(tensor), spare)


def _eager_loader(layer: torch.nn.Module, name: str, original, spare: SpareStorage):
    """``original`` loading into the materialised ``layer`` at once; the layer processed and
    swapped in when its count is complete."""
    from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info
    from vllm.model_executor.model_loader.reload.meta import get_numel_loaded
    from vllm.model_executor.model_loader.reload.utils import get_layer_size

    info = get_layerwise_info(layer)
    signature = inspect.signature(original)

    def loader(*args, **kwargs):
        if not info.can_load():
            return None  # a loader loading twice after its layer was processed, as vLLM's
        _materialize(layer, info, spare)
        _wrap(layer, spare)  # a tensor registered late (vLLM re-wraps too)
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        bound.arguments["param"] = getattr(layer, name)  # the caller may hold the meta one
        info.load_numel_total = get_layer_size(layer)
        count, result = get_numel_loaded(original, bound)
        info.load_numel += count
        info.loaded_weights.append((name, None))  # the name only: nothing to replay
        if info.load_numel >= info.load_numel_total:
            _process(layer, info)
        return result

    loader.__name__ = loader.__qualname__ = LOADER_NAME
    loader.__wrapped__ = original
    loader._pr2_eager = True
    return loader


def _materialize(layer: torch.nn.Module, info, spare: SpareStorage) -> None:
    """vLLM's ``materialize_layer``, each tensor made by ``spare``."""
    from vllm.model_executor.model_loader.reload.meta import SKIP_MODULES, SKIP_TENSORS
    from vllm.model_executor.model_loader.reload.utils import get_layer_tensors

    if layer.__class__.__name__ in SKIP_MODULES:
        return
    with info.restore_device:
        for name, tensor in get_layer_tensors(layer).items():
            if name not in SKIP_TENSORS and tensor.is_meta:
                setattr(layer, name, spare.like(tensor))


def _process(layer: torch.nn.Module, info) -> None:
    """vLLM's processing of the loaded ``layer`` (nothing replayed, nothing copied), then its
    tensors swapped into the kernel tensors, which take their places back."""
    from vllm.model_executor.model_loader.reload.layerwise import (
        _layerwise_process,
        _place_kernel_tensors,
    )

    kernel = info.kernel_tensors
    non_persistent = set(info.kernel_non_persistent_buffers)
    loaded = {name for name, _ in info.loaded_weights}
    info.kernel_tensors, info.loaded_weights = None, []
    _layerwise_process(layer, info)  # materialises the rest, processes, resets ``info``
    _swap_in(layer, kernel, non_persistent, loaded)
    info.kernel_tensors, info.kernel_non_persistent_buffers = kernel, non_persistent
    _place_kernel_tensors(layer, info)
    info.reset()


def _swap_in(layer, kernel, non_persistent: set[str], loaded: set[str]) -> None:
    """The kernel tensors take the layer's processed data."""
    params, buffers = kernel
    for name, old in params.items():
        _take(old, getattr(layer, name))
    for name, old in buffers.items():
        if name in layer._buffers and (name not in non_persistent or name in loaded):
            _take(old, getattr(layer, name))


def _take(kernel: torch.Tensor, new: torch.Tensor) -> None:
    if new is not kernel:  # a tensor loaded in place (a bias) already holds its new values
        kernel.data = new.data


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()
