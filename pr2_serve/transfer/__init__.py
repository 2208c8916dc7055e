"""Collective weight transfer over vLLM's weight-transfer machinery (``gloo`` backend).

vLLM 0.32 moves trainer weights into the engine's workers through
``vllm.distributed.weight_transfer``: a worker-side ``WeightTransferEngine`` (made by
``WeightTransferEngineFactory`` when the engine has a ``weight_transfer_config``, driven by the
worker methods ``init_weight_transfer_engine`` / ``start_weight_update`` / ``update_weights`` /
``finish_weight_update`` through ``collective_rpc``) and a trainer-side engine
(``WeightTransferTrainerFactory.trainer_init``). On CUDA the upstream ``nccl`` engine is the
transport. This package registers a ``gloo`` engine pair for the CPU build, with the upstream
dense protocol (trainer = rank 0 of one group with every server's workers; update info
``{names, dtype_names, shapes}``; packed buckets cut exactly as ``packed_tensor.pack_tensors``
cuts them) over a ``torch.distributed`` gloo group made by vLLM's
``stateless_init_torch_distributed_process_group``.

One difference, on purpose: the worker does not load what it receives into the live model. It
writes each bucket into a safetensors file laid out in advance from the update info
(:mod:`.protocol`), so the served weights never mix versions and peak extra memory is the receive
buffers; the server then checks, applies (with its canary) and commits that file like a push,
and restores it on restart.

- :mod:`.protocol`: the init/update infos, the bucket plan, the file layout, the gloo group.
- :mod:`.gloo_engine`: ``GlooWeightTransferEngine`` (inside the vLLM worker).
- :mod:`.trainer`: ``GlooTrainerWeightTransferEngine`` and ``StateDictSource``.
"""

from __future__ import annotations

BACKEND = "gloo"

__all__ = ["BACKEND", "register"]


def register() -> None:
    """Register the ``gloo`` engines with vLLM's worker and trainer factories (idempotent;
    imported lazily by the factories)."""
    from vllm.distributed.weight_transfer.factory import (
        WeightTransferEngineFactory,
        WeightTransferTrainerFactory,
    )

    if BACKEND not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(
            BACKEND, "pr2_serve.transfer.gloo_engine", "GlooWeightTransferEngine"
        )
    if BACKEND not in WeightTransferTrainerFactory._registry:
        WeightTransferTrainerFactory.register_engine(
            BACKEND, "pr2_serve.transfer.trainer_engine", "GlooTrainerWeightTransferEngine"
        )
