"""Building vLLM's ``LLMEngine`` for a checkpoint: the PR2 architecture override, the worker
extension, and the routing facts of a stock (non-PR2) model."""

from __future__ import annotations

import os
from typing import Any

from pr2_serve.core.route_protocol import route_dtype
from pr2_serve.core.types import EngineInfo

WORKER_EXTENSION = "pr2_serve.plugin.worker.PR2WorkerExtension"


def stock_facts(config: dict) -> dict[str, Any]:
    """The routing facts ``pr2_setup`` reports, read from a stock checkpoint's config."""
    from pr2_serve.core.served_checkpoint import config_num_experts, moe_layer_indices

    experts = config_num_experts(config)
    layers = moe_layer_indices(config)
    return {
        "num_moe_layers": len(layers),
        "num_experts": experts,
        "top_k": int(config["num_experts_per_tok"]),
        "moe_layer_indices": layers,
        "route_dtype": route_dtype(experts).name,
    }


def build_llm_engine(
    model_dir: str,
    config: dict,
    *,
    dtype,
    max_model_len,
    seed,
    enable_prefix_caching,
    kv_cache_gib,
    plugin,
    engine_kwargs,
):
    """vLLM ``LLMEngine`` for the PR2 variant of the checkpoint's architecture."""
    # The engine core runs in this process (the engine thread drives it); on one device the
    # worker does too (fast start, no IPC); several devices use vLLM's multiprocess executor.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    # Route capture reads the V1 model runner's step bookkeeping; on CUDA vLLM 0.32 defaults to
    # Model Runner V2 (config/vllm.py use_v2_model_runner). Set explicitly, it is the user's
    # choice, and the worker refuses a runner it cannot read (plugin/worker.py check_runner).
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(int(kv_cache_gib)))
    from vllm import EngineArgs
    from vllm.platforms import current_platform
    from vllm.v1.engine.llm_engine import LLMEngine

    from pr2_serve.plugin import pr2_architecture, register

    register()  # in case the entry point is not installed (running from a source tree)
    arch = pr2_architecture(config["architectures"][0]) if plugin else config["architectures"][0]
    on_cpu = current_platform.is_cpu()
    tp = int(engine_kwargs.get("tensor_parallel_size", 1))
    if max_model_len is None:
        max_model_len = min(int(config.get("max_position_embeddings", 4096)), 4096)
    if on_cpu and not {"attention_backend", "attention_config"} & engine_kwargs.keys():
        engine_kwargs.update(cpu_mla_backend(config, dtype, _cpu_has_amx()))
    args = EngineArgs(
        model=model_dir,
        dtype=dtype,
        seed=seed,
        max_model_len=max_model_len,
        hf_overrides={"architectures": [arch]},
        worker_extension_cls=WORKER_EXTENSION if plugin else "",
        enable_prefix_caching=enable_prefix_caching,
        enforce_eager=engine_kwargs.pop("enforce_eager", on_cpu),
        distributed_executor_backend=engine_kwargs.pop(
            "distributed_executor_backend", "uni" if tp == 1 else "mp"
        ),
        disable_log_stats=True,
        # the workers make the weight-transfer engine (pr2_serve.transfer: ``gloo`` on the CPU,
        # the NCCL receiver on CUDA): trainers may send weights over a collective
        # (POST /v1/weights/transfer/...)
        weight_transfer_config=engine_kwargs.pop(
            "weight_transfer_config", {"backend": worker_backend(on_cpu)}
        ),
        **engine_kwargs,
    )
    return LLMEngine.from_engine_args(args)


def cpu_mla_backend(config: dict, dtype, amx: bool) -> dict[str, str]:
    """The attention backend to ask vLLM for on the CPU (``{}``: vLLM's choice). vLLM 0.32's CPU
    platform takes its AMX MLA backend for every MLA model (DeepSeek-V2/V3 style:
    ``kv_lora_rank`` in the config) whenever the CPU has AMX tiles, and that backend packs its
    weights for bf16/fp16/int8/fp8 only: an fp32 model fails while loading ("expect weight to
    be bfloat16, ..."). Such a model gets vLLM's reference ``CPU_MLA`` backend instead."""
    fp32 = str(dtype).removeprefix("torch.") in ("float32", "float")
    mla = config.get("kv_lora_rank") is not None
    return {"attention_backend": "CPU_MLA"} if amx and mla and fp32 else {}


def _cpu_has_amx() -> bool:
    import torch
    from vllm.platforms import CpuArchEnum, current_platform

    x86 = current_platform.get_cpu_architecture() == CpuArchEnum.X86
    return x86 and torch.cpu._is_amx_tile_supported()


def engine_info(llm, config: dict, model_dir: str, plugin: bool) -> EngineInfo:
    """The served model's facts: from the workers' ``pr2_setup`` (PR2) or the config (stock)."""
    facts = llm.collective_rpc("pr2_setup")[0] if plugin else stock_facts(config)
    model_config = llm.model_config
    return EngineInfo(
        model=model_dir,
        architecture=config["architectures"][0],
        num_moe_layers=facts["num_moe_layers"],
        num_experts=facts["num_experts"],
        top_k=facts["top_k"],
        moe_layer_indices=tuple(facts["moe_layer_indices"]),
        route_dtype=facts["route_dtype"],
        vocab_size=model_config.get_vocab_size(),
        max_model_len=model_config.max_model_len,
        dtype=str(model_config.dtype).removeprefix("torch."),
    )


def worker_backend(on_cpu: bool) -> str:
    """The weight-transfer engine the workers make: ``gloo`` on the CPU, the NCCL receiver
    (:mod:`pr2_serve.transfer.nccl_receiver`) on CUDA."""
    from pr2_serve.transfer import BACKEND, NCCL_BACKEND

    return BACKEND if on_cpu else NCCL_BACKEND
