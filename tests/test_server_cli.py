"""vLLM pass-through flags (parallelism, attention backend): validated with clear errors (no
engine started); the server's event loop."""

from __future__ import annotations

import pytest

from pr2_serve.server.main import engine_kwargs, parse_args, run, validate_parallelism
from pr2_serve.server.server_config import validate_attention_backend


def args(*extra: str):
    return parse_args(["--model", "m", *extra])


@pytest.mark.parametrize(
    "flags, on_cpu, msg",
    [
        (["--tensor-parallel-size", "2"], True, "needs GPUs"),
        (["--enable-expert-parallel"], True, "needs GPUs"),
        (["--gpu-memory-utilization", "0.9"], True, "--kv-cache-gib"),
        (["--data-parallel-size", "2"], False, "one pr2-serve per replica"),
        (["--enable-expert-parallel"], False, "tensor-parallel-size >= 2"),
        (["--gpu-memory-utilization", "1.5"], False, r"\(0, 1\]"),
        (["--tensor-parallel-size", "0"], False, ">= 1"),
    ],
)
def test_refused_with_a_clear_message(flags, on_cpu, msg):
    with pytest.raises(SystemExit, match=msg):
        validate_parallelism(args(*flags), on_cpu=on_cpu)


def test_gpu_flags_pass_through():
    a = args(
        "--tensor-parallel-size",
        "4",
        "--enable-expert-parallel",
        "--gpu-memory-utilization",
        "0.85",
        "--max-num-seqs",
        "256",
    )
    validate_parallelism(a, on_cpu=False)
    kw = engine_kwargs(a)
    assert kw["tensor_parallel_size"] == 4 and kw["enable_expert_parallel"] is True
    assert kw["gpu_memory_utilization"] == 0.85 and kw["max_num_seqs"] == 256
    validate_parallelism(args(), on_cpu=True)
    assert "tensor_parallel_size" not in engine_kwargs(args())


def test_attention_backend_passes_through_by_vllm_name():
    """``--attention-backend`` reaches the engine as vLLM's name; ``auto`` and absent leave the
    choice to vLLM (and the engine's fp32-MLA-on-AMX fallback); an unknown name is refused
    before the engine starts, with vLLM's list of valid names."""
    for name in ("CPU_MLA", "cpu_attn"):
        validate_attention_backend(args("--attention-backend", name))
        assert engine_kwargs(args("--attention-backend", name))["attention_backend"] == name
    for extra in ((), ("--attention-backend", "auto")):
        validate_attention_backend(args(*extra))
        assert "attention_backend" not in engine_kwargs(args(*extra))
    with pytest.raises(SystemExit, match=r"--attention-backend: Unknown .*'FLASH'.*CPU_MLA"):
        validate_attention_backend(args("--attention-backend", "flash"))


def test_the_server_runs_on_uvloop():
    """A streamed upload reads thousands of chunks on the server's loop: uvloop's, not asyncio's
    pure-Python selector loop (``benchmarks/weights.py``: 6-7 % faster HTTP and gRPC pushes)."""
    import asyncio

    import uvloop

    async def loop_type():
        return type(asyncio.get_running_loop())

    assert run(loop_type()) is uvloop.Loop
