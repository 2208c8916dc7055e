#!/usr/bin/env bash
# The GPU check, one command on any host with a GPU, torch, pytest and transformers (no vLLM,
# no network, no venv needed):   bash benchmarks/gpu_check.sh
#   1. the routing tests on CUDA (`cuda`-marked tests included): pure routing vs references,
#      fp32 gating of bf16 logits, compiled == eager routing, refusals by config, the deferred
#      route copy, and the PR2 router + capture buffer captured in a CUDA graph and replayed at
#      padded batch sizes;
#   2. benchmarks/gpu_routing.py: plain vs PR2 routing per MoE layer at Qwen3-30B-A3B's router
#      shape (2048 x 128, top-8), eager and compiled, inside CUDA graphs, 1..8192 tokens
#      -> benchmarks/results/gpu_routing.json
#   3. benchmarks/nccl_loopback.py: the bucketed weight receive over NCCL, pure torch (buckets
#      cut as vLLM's pack_tensors cuts them, each in a GPU buffer of its own, checked finite on
#      the GPU, unpacked and compared; a NaN in the last tensor found in the last bucket); one
#      GPU: a group of one rank, two or more: ranks on two GPUs
# `--cpu` runs the same checks on the CPU at small sizes (a smoke run inside `make test`).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
TESTS=(tests/test_routing.py tests/test_cuda_readiness.py tests/test_gpu_graph.py)
if [[ "${1:-}" == "--cpu" ]]; then
    "$PY" -m pytest -q -p no:cacheprovider "${TESTS[@]}"
    "$PY" benchmarks/gpu_routing.py --device cpu --dtype float32 --tokens 1 64 \
        --hidden 256 --experts 16 --top-k 2 --iters 5
    "$PY" benchmarks/nccl_loopback.py --cpu
    exit 0
fi
"$PY" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device (use --cpu)"; print("GPU:", torch.cuda.get_device_name(0), "torch", torch.__version__)'
"$PY" -m pytest -q -p no:cacheprovider -rs "${TESTS[@]}"
"$PY" benchmarks/gpu_routing.py --out benchmarks/results/gpu_routing.json
"$PY" benchmarks/nccl_loopback.py
