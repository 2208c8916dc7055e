"""``pr2-serve``: one PR2 engine behind HTTP (FastAPI/uvicorn) and gRPC, in one process.

    PR2_API_KEY=... pr2-serve --model DIR [--host 127.0.0.1] [--http-port 8000]
        [--grpc-port 50051] [--dtype auto] [--state-dir DIR] [vLLM flags...]

Liveness (``/healthz``) answers at once; the model loads in the background; readiness
(``/readyz``, gRPC health SERVING) comes after the last committed weights are restored and a
warm-up request has been answered. A line ``pr2-serve ready http=HOST:PORT grpc=HOST:PORT`` is
printed then (ports resolved when 0 was asked). SIGINT/SIGTERM stop both servers and the engine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
from pathlib import Path

from .api.service import Limits, RolloutService

KEEP_ALIVE_S = 75.0  # idle HTTP keep-alive, seconds


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="pr2-serve", description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, help="HF checkpoint directory")
    ap.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback)")
    ap.add_argument("--http-port", type=int, default=8000)
    ap.add_argument("--grpc-port", type=int, default=50051)
    ap.add_argument("--api-key-file", help="file holding the API key (else $PR2_API_KEY)")
    ap.add_argument(
        "--state-dir", help="pushed weights + committed version (default: <model>/.pr2-state)"
    )
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-upload-bytes", type=int, default=64 << 30)
    ap.add_argument(
        "--keep-alive-timeout",
        type=float,
        default=KEEP_ALIVE_S,
        help="seconds an idle HTTP keep-alive connection stays open (clients must expire "
        "pooled connections sooner; pr2_serve.client does, after 30 s)",
    )
    ap.add_argument("--max-request-bytes", type=int, default=16 << 20)
    ap.add_argument("--max-samples-per-request", type=int, default=4096, help="prompts x n")
    ap.add_argument(
        "--max-tokens-per-request", type=int, default=1 << 22, help="prompts x n x max_tokens"
    )
    ap.add_argument("--no-prefix-caching", action="store_true")
    ap.add_argument("--kv-cache-gib", type=int, default=1, help="CPU build: KV cache size")
    vllm = ap.add_argument_group("vLLM pass-through")
    vllm.add_argument("--max-model-len", type=int)
    vllm.add_argument("--tensor-parallel-size", type=int, default=1)
    vllm.add_argument("--data-parallel-size", type=int, default=1)
    vllm.add_argument("--enable-expert-parallel", action="store_true")
    vllm.add_argument("--gpu-memory-utilization", type=float)
    vllm.add_argument("--max-num-seqs", type=int)
    vllm.add_argument("--max-num-batched-tokens", type=int)
    return ap.parse_args(argv)


def read_api_key(args: argparse.Namespace) -> str | None:
    if args.api_key_file:
        key = Path(args.api_key_file).read_text().strip()
        if not key:
            raise SystemExit(f"{args.api_key_file} is empty")
        return key
    return os.environ.get("PR2_API_KEY") or None


def validate_parallelism(args: argparse.Namespace, on_cpu: bool) -> None:
    """Clear errors for vLLM parallelism flags this deployment cannot honour."""
    if args.data_parallel_size != 1:
        raise SystemExit(
            "--data-parallel-size > 1: start one pr2-serve per replica and give "
            "the trainer every address (route capture is per engine)"
        )
    if args.tensor_parallel_size < 1:
        raise SystemExit("--tensor-parallel-size must be >= 1")
    if on_cpu:
        if args.tensor_parallel_size > 1:
            raise SystemExit(
                "--tensor-parallel-size > 1 needs GPUs: the CPU build serves on one "
                "socket; run several pr2-serve processes instead"
            )
        if args.enable_expert_parallel:
            raise SystemExit(
                "--enable-expert-parallel needs GPUs (it shards experts across "
                "devices); not available on the CPU build"
            )
        if args.gpu_memory_utilization is not None:
            raise SystemExit(
                "--gpu-memory-utilization has no meaning on the CPU build: size the "
                "KV cache with --kv-cache-gib"
            )
    elif args.enable_expert_parallel and args.tensor_parallel_size < 2:
        raise SystemExit("--enable-expert-parallel needs --tensor-parallel-size >= 2")
    if args.gpu_memory_utilization is not None and not 0 < args.gpu_memory_utilization <= 1:
        raise SystemExit("--gpu-memory-utilization must be in (0, 1]")


def engine_kwargs(args: argparse.Namespace) -> dict:
    kw: dict = {
        "dtype": args.dtype,
        "seed": args.seed,
        "kv_cache_gib": args.kv_cache_gib,
        "enable_prefix_caching": not args.no_prefix_caching,
        "max_model_len": args.max_model_len,
    }
    if args.data_parallel_size != 1:
        raise SystemExit(
            "--data-parallel-size > 1: start one pr2-serve per replica and give the "
            "trainer every address (route capture is per engine)"
        )
    for name in (
        "tensor_parallel_size",
        "gpu_memory_utilization",
        "max_num_seqs",
        "max_num_batched_tokens",
    ):
        value = getattr(args, name)
        if value is not None and not (name == "tensor_parallel_size" and value == 1):
            kw[name] = value
    if args.enable_expert_parallel:
        kw["enable_expert_parallel"] = True
    return kw


async def serve(args: argparse.Namespace) -> None:
    import uvicorn
    from vllm.platforms import current_platform

    from .api.grpc_server import set_serving, start_grpc
    from .api.http import create_app
    from .engine import RolloutEngine

    validate_parallelism(args, on_cpu=current_platform.is_cpu())
    state_dir = Path(args.state_dir or Path(args.model) / ".pr2-state")
    api_key = read_api_key(args)
    limits = Limits(
        max_request_bytes=args.max_request_bytes,
        max_upload_bytes=args.max_upload_bytes,
        max_samples_per_request=args.max_samples_per_request,
        max_tokens_per_request=args.max_tokens_per_request,
    )
    service = RolloutService(None, state_dir, api_key, limits)
    if not api_key:
        print("pr2-serve: no API key: weight pushes are refused", file=sys.stderr)
    config = uvicorn.Config(
        create_app(service),
        host=args.host,
        port=args.http_port,
        log_level="warning",
        lifespan="off",
        timeout_graceful_shutdown=5,
        # longer than clients keep idle pooled connections (httpx: 5 s by default, ours 30 s):
        # otherwise the server may close a connection just as a client reuses it
        timeout_keep_alive=args.keep_alive_timeout,
    )
    http = uvicorn.Server(config)
    http.install_signal_handlers = lambda: None  # we handle signals below
    grpc_server = await start_grpc(service, args.host, args.grpc_port)
    http_task = asyncio.create_task(http.serve())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    engine = None
    try:
        while not http.started:
            if http_task.done():
                http_task.result()  # raises the bind error
            await asyncio.sleep(0.05)
        engine = await asyncio.to_thread(
            RolloutEngine, args.model, state_dir=state_dir / "engine", **engine_kwargs(args)
        )
        service.attach(engine)
        await asyncio.to_thread(service.restore_committed)
        await asyncio.to_thread(service.warm_up)
        await set_serving(grpc_server)
        http_port = http.servers[0].sockets[0].getsockname()[1]
        print(
            f"pr2-serve ready http={args.host}:{http_port} "
            f"grpc={args.host}:{grpc_server.pr2_port} weight_version={engine.weight_version}",
            flush=True,
        )
        await stop.wait()
    finally:
        http.should_exit = True
        await grpc_server.stop(grace=2)
        await http_task
        if engine is not None:
            await asyncio.to_thread(engine.close)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
