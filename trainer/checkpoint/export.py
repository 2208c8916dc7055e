"""The policy's weights under the checkpoint's own tensor names, in memory, and serialised once.

A push used to run ``save_pretrained`` into a temporary directory, read the file back, rename
the predictors and write it again (three passes over the whole checkpoint on disk). Here the
conversion ``save_pretrained`` makes happens on the state dict itself, with the same
transformers functions it calls (``remove_tied_weights_from_state_dict``, then
``revert_weight_conversion``: e.g. transformers 5's fused ``experts.gate_up_proj`` back to
the checkpoint's per-expert ``experts.{e}.gate_proj`` / ``up_proj``, Mixtral's
``mlp`` back to ``block_sparse_moe``); a push streams the result straight from memory
(:mod:`pr2_serve.client.payload`: the safetensors header, then each tensor's own bytes).

Pure torch + transformers + safetensors: importable without vLLM.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["checkpoint_tensors"]

#: HF renames a Mixtral layer's ``mlp`` to ``block_sparse_moe`` on save, the predictor with it;
#: every family's predictor is ``model.layers.{i}.mlp.predictor.weight`` (what servers load).
_PREDICTOR_RENAMES = {".block_sparse_moe.predictor.": ".mlp.predictor."}


def checkpoint_tensors(
    model: torch.nn.Module,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    with_predictor: bool = True,
) -> dict[str, torch.Tensor]:
    """``{checkpoint name: CPU tensor}``: what ``model.save_pretrained`` would write, in memory.

    ``state_dict``: the full state dict in the model's own names (the gathered one of an FSDP2
    job); default ``model.state_dict()``. ``with_predictor=False`` leaves the predictors out.
    Tensors are detached, on the CPU and contiguous (views of the parameters where they already
    are: nothing is copied for a CPU model in a layout safetensors can write)."""
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    sd = dict(model.state_dict() if state_dict is None else state_dict)
    for key in getattr(model, "_keys_to_ignore_on_save", None) or ():
        sd.pop(key, None)
    sd = remove_tied_weights_from_state_dict(sd, model)
    sd = revert_weight_conversion(model, sd)
    out = {}
    for name, t in sd.items():
        for old, new in _PREDICTOR_RENAMES.items():
            name = name.replace(old, new)
        if with_predictor or ".predictor." not in name:
            out[name] = t.detach().to("cpu").contiguous()
    return out
