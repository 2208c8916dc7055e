"""``pr2-serve``: one PR2 engine behind HTTP (FastAPI/uvicorn) and gRPC, in one process.

    PR2_API_KEY=... pr2-serve --model DIR [--host 127.0.0.1] [--http-port 8000]
        [--grpc-port 50051] [--dtype auto] [--state-dir DIR] [vLLM flags...]

Liveness (``/healthz``) answers at once; the model loads in the background; readiness
(``/readyz``, gRPC health SERVING) comes after the last committed weights are restored and a
warm-up request has been answered. A line ``pr2-serve ready http=HOST:PORT grpc=HOST:PORT`` is
printed then (ports resolved when 0 was asked). SIGINT/SIGTERM stop both servers and the engine.
Every flag is a field of :class:`pr2_serve.api.config.ServerConfig`.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

from .api import config
from .api.config import KEEP_ALIVE_S, ServerConfig, engine_kwargs, validate_parallelism
from .api.service import RolloutService

__all__ = [
    "KEEP_ALIVE_S",
    "ServerConfig",
    "engine_kwargs",
    "main",
    "parse_args",
    "serve",
    "validate_parallelism",
]


def parse_args(argv: list[str] | None = None) -> ServerConfig:
    return config.parse_args(argv, description=__doc__.split("\n")[0])


def read_api_key(cfg: ServerConfig) -> str | None:
    if cfg.api_key_file:
        key = Path(cfg.api_key_file).read_text().strip()
        if not key:
            raise SystemExit(f"{cfg.api_key_file} is empty")
        return key
    return os.environ.get("PR2_API_KEY") or None


def http_server(service: RolloutService, cfg: ServerConfig):
    """The uvicorn server of the HTTP API (signals are handled by :func:`serve`)."""
    import uvicorn

    from .api.http import create_app

    server_config = uvicorn.Config(
        create_app(service),
        host=cfg.host,
        port=cfg.http_port,
        log_level="warning",
        lifespan="off",
        timeout_graceful_shutdown=5,
        # longer than clients keep idle pooled connections (httpx: 5 s by default, ours 30 s):
        # otherwise the server may close a connection just as a client reuses it
        timeout_keep_alive=cfg.keep_alive_timeout,
    )
    http = uvicorn.Server(server_config)
    http.install_signal_handlers = lambda: None  # we handle signals in serve()
    return http


async def load_engine(service: RolloutService, cfg: ServerConfig, state_dir: Path) -> None:
    """Start the engine and attach it (then it is ``service.engine``, closed by
    :func:`serve`), restore the committed weights, warm up."""
    from .engine import RolloutEngine

    engine = await asyncio.to_thread(
        RolloutEngine, cfg.model, state_dir=state_dir / "engine", **engine_kwargs(cfg)
    )
    service.attach(engine)
    await asyncio.to_thread(service.restore_committed)
    await asyncio.to_thread(service.warm_up)


async def serve(cfg: ServerConfig) -> None:
    from vllm.platforms import current_platform

    from .api.grpc_server import set_serving, start_grpc

    validate_parallelism(cfg, on_cpu=current_platform.is_cpu())
    state_dir = Path(cfg.state_dir or Path(cfg.model) / ".pr2-state")
    api_key = read_api_key(cfg)
    service = RolloutService(None, state_dir, api_key, cfg.limits())
    if not api_key:
        print("pr2-serve: no API key: weight pushes are refused", file=sys.stderr)
    http = http_server(service, cfg)
    grpc_server = await start_grpc(service, cfg.host, cfg.grpc_port)
    http_task = asyncio.create_task(http.serve())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        while not http.started:
            if http_task.done():
                http_task.result()  # raises the bind error
            await asyncio.sleep(0.05)
        await load_engine(service, cfg, state_dir)
        await set_serving(grpc_server)
        http_port = http.servers[0].sockets[0].getsockname()[1]
        version = service.engine.weight_version
        print(
            f"pr2-serve ready http={cfg.host}:{http_port} "
            f"grpc={cfg.host}:{grpc_server.pr2_port} weight_version={version}",
            flush=True,
        )
        await stop.wait()
    finally:
        http.should_exit = True
        await grpc_server.stop(grace=2)
        await http_task
        if service.engine is not None:
            await asyncio.to_thread(service.engine.close)


def main(argv: list[str] | None = None) -> None:
    asyncio.run(serve(parse_args(argv)))


if __name__ == "__main__":
    main()
