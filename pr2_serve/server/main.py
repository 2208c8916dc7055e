"""``pr2-serve``: one PR2 engine behind HTTP (FastAPI/uvicorn) and gRPC, in one process.

    PR2_API_KEY=... pr2-serve --model DIR [--host 127.0.0.1] [--http-port 8000]
        [--grpc-port 50051] [--dtype auto] [--state-dir DIR] [--fresh] [vLLM flags...]

The model directory is only read; the server's state (pushed weights, the committed version,
the versions kept for rollback) lives in ``--state-dir`` (default: a per-user directory, see
:func:`~pr2_serve.server.server_config.default_state_dir`). Both are checked before anything loads:
a
problem is one line on stderr naming the path and the flag, and exit code 2.

Liveness (``/healthz``) answers at once; the model loads in the background; readiness
(``/readyz``, gRPC health SERVING) comes after the last committed weights are restored (one
log line says which) and the canary has passed on them. A line ``pr2-serve ready
http=HOST:PORT grpc=HOST:PORT weight_version=N`` is printed then (ports resolved when 0 was
asked); if the restored weights fail the canary, ``pr2-serve not ready ...`` instead (the
server listens and takes pushes and rollbacks). SIGINT/SIGTERM stop both servers and the
engine. Every flag is a field of :class:`pr2_serve.server.server_config.ServerConfig`.

Both servers share one event loop, uvloop's (as vLLM's own server and uvicorn's default take):
its socket transports are in C, and a streamed weight upload reads thousands of chunks on
that loop (6-7 % faster HTTP and gRPC pushes here, ``benchmarks/weights.py``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from pr2_serve.server import server_config as config
from pr2_serve.server.server_config import (
    KEEP_ALIVE_S,
    ServerConfig,
    engine_kwargs,
    validate_attention_backend,
    validate_parallelism,
)
from pr2_serve.server.startup import StartupError, preflight

if TYPE_CHECKING:  # the service imports vLLM: only once the start-up checks have passed
    from pr2_serve.service.rollout_service import RolloutService

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

    from pr2_serve.api.http import create_app

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
    :func:`serve`), restore the committed weights (``--fresh``: forget them), warm up."""
    from pr2_serve.engine.rollout_engine import RolloutEngine

    try:
        engine = await asyncio.to_thread(
            RolloutEngine, cfg.model, state_dir=state_dir / "engine", **engine_kwargs(cfg)
        )
    except (ValueError, OSError) as e:  # our refusals (architecture, router...) and I/O
        raise StartupError(f"cannot serve the model in {cfg.model}: {e} (--model)") from e
    service.attach(engine)
    said = await asyncio.to_thread(service.restore_committed, cfg.fresh)
    print(f"pr2-serve: {said}", file=sys.stderr, flush=True)
    await asyncio.to_thread(service.warm_up)


def ready_line(service: RolloutService, host: str, http_port: int, grpc_port: int) -> str:
    """What ``pr2-serve`` prints once it serves (or why it does not)."""
    where = f"http={host}:{http_port} grpc={host}:{grpc_port}"
    version = service.engine.weight_version
    if service.is_ready():
        return f"pr2-serve ready {where} weight_version={version}"
    return f"pr2-serve not ready {where} weight_version={version}: {service.ready_body()[1]}"


async def serve(cfg: ServerConfig, state_dir: Path) -> None:
    from vllm.platforms import current_platform

    from pr2_serve.api.grpc_server import set_serving, start_grpc
    from pr2_serve.service.rollout_service import RolloutService

    validate_parallelism(cfg, on_cpu=current_platform.is_cpu())
    validate_attention_backend(cfg)
    api_key = read_api_key(cfg)
    service = RolloutService(
        None,
        state_dir,
        api_key,
        cfg.limits(),
        keep_versions=cfg.keep_versions,
        weights_dir=cfg.weights_dir,
        weight_transfer=cfg.enable_weight_transfer,
        persist=cfg.persist,
        apply_uploads=cfg.apply_uploads,
        bucket_bytes=int(cfg.bucket_mib * (1 << 20)),
    )
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
        await set_serving(grpc_server, service.is_ready())
        service.readiness.on_fitness = lambda ok: loop.create_task(set_serving(grpc_server, ok))
        http_port = http.servers[0].sockets[0].getsockname()[1]
        print(ready_line(service, cfg.host, http_port, grpc_server.pr2_port), flush=True)
        await stop.wait()
    finally:
        http.should_exit = True
        await grpc_server.stop(grace=2)
        await http_task
        await service.updates.persisted()  # the version served is on record before exit
        if service.engine is not None:
            await asyncio.to_thread(service.engine.close)


def run(coro):
    """Run ``coro`` to completion on a new uvloop event loop (see module docstring)."""
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    try:
        state_dir = preflight(cfg)  # before anything heavy is imported
        run(serve(cfg, state_dir))
    except StartupError as e:
        print(f"pr2-serve: error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
