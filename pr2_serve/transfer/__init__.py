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

The worker loads each bucket into the live model as it arrives, like upstream's receivers, but
inside the engine's update session (:mod:`pr2_serve.plugin.live_update`): each bucket is checked
first (every value finite), the session keeps an undo, so a transfer that fails half-way, a bad
bucket or a failed canary leaves the served weights as they were; every bucket is also written
into a safetensors file laid out in advance from the update info (:mod:`.protocol`), the
version's durable copy that a restart restores.

- :mod:`.protocol`: the init/update infos, the bucket plan, the file layout, the gloo group.
- :mod:`.gloo_engine`: ``GlooWeightTransferEngine`` (inside the vLLM worker) and the receive
  loop every transport shares.
- :mod:`.nccl_receiver`: ``PR2NcclWeightTransferEngine``, upstream's NCCL worker engine on that
  loop (CUDA).
- :mod:`.trainer_engine`: ``GlooTrainerWeightTransferEngine`` and ``StateDictSource``.
"""

from __future__ import annotations

BACKEND = "gloo"
NCCL_BACKEND = "pr2-nccl"  # vLLM's NCCL transport into the live update (CUDA)

__all__ = ["BACKEND", "NCCL_BACKEND", "register"]


def register() -> None:
    """Register the ``gloo`` engines with vLLM's worker and trainer factories, and the NCCL
    receiver (:mod:`.nccl_receiver`, ``pr2-nccl``) with the worker factory (idempotent;
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
    if NCCL_BACKEND not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(
            NCCL_BACKEND, "pr2_serve.transfer.nccl_receiver", "PR2NcclWeightTransferEngine"
        )
