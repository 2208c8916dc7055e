"""gRPC API (grpcio aio, package ``pr2.rollout.v1``): thin over :class:`RolloutService`.

Also serves the standard ``grpc.health.v1`` health service (SERVING once ready) and server
reflection. Errors map to canonical codes: INVALID_ARGUMENT, UNAUTHENTICATED,
PERMISSION_DENIED, FAILED_PRECONDITION, RESOURCE_EXHAUSTED, UNAVAILABLE.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from pydantic import ValidationError

from .proto import load
from .schemas import ApiError, GenerateRequest
from .service import RolloutService

pb2, pb2_grpc = load()
SERVICE_NAME = pb2.DESCRIPTOR.services_by_name["Rollout"].full_name
MAX_MESSAGE = 8 << 20  # weight chunks are sent in 1-4 MiB messages

STATUS_TO_CODE = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    409: grpc.StatusCode.FAILED_PRECONDITION,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    500: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE,
    507: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def request_from_proto(msg) -> GenerateRequest:
    """The gRPC request as the shared pydantic request (same validation as HTTP)."""
    prompts = []
    for p in msg.prompts:
        kind = p.WhichOneof("prompt")
        prompts.append(list(p.token_ids.ids) if kind == "token_ids" else p.text)
    fields = {
        "prompts": prompts,
        "n": msg.n or 1,
        "temperature": msg.temperature if msg.has_temperature or msg.temperature else 1.0,
        "top_p": msg.top_p or 1.0,
        "top_k": msg.top_k or -1,
        "max_tokens": msg.max_tokens or 16,
        "seed": msg.seed if msg.HasField("seed") else None,
        "stop_token_ids": list(msg.stop_token_ids),
        "return_logprobs": not msg.skip_logprobs,
        "return_routes": not msg.skip_routes,
        "routes_from": msg.routes_from,
        "min_weight_version": msg.min_weight_version,
    }
    return GenerateRequest(**fields)


def routes_proto(routes, start_row: int, start_pos: int):
    part = routes[start_row:]
    return pb2.Routes(
        dtype=routes.dtype.name,
        shape=list(part.shape),
        data=part.astype(routes.dtype.newbyteorder("<")).tobytes(),
        start=start_pos,
    )


class RolloutServicer(pb2_grpc.RolloutServicer):
    def __init__(self, service: RolloutService) -> None:
        self.service = service

    async def _abort(self, context, e: ApiError):
        self.service.metrics.errors.labels(kind=e.kind).inc()
        msg = f"{e.field}: {e.message}" if e.field else e.message
        await context.abort(STATUS_TO_CODE.get(e.status, grpc.StatusCode.INTERNAL), msg)

    async def Generate(self, request, context):
        metrics = self.service.metrics
        try:
            req = request_from_proto(request)
        except ValidationError as e:
            first = e.errors()[0]
            loc = [str(x) for x in first["loc"]]
            field = loc[0] + "".join(f"[{x}]" for x in loc[1:])
            await self._abort(context, ApiError(400, "invalid_argument", first["msg"], field))
            return
        nbytes = 0
        try:
            if request.stream:
                async for ev in self.service.stream(req, "grpc"):
                    msg = pb2.GenerateResponse(
                        prompt_index=ev.prompt_index,
                        sample_index=ev.sample_index,
                        prompt_token_ids=ev.prompt_token_ids or [],
                        output_token_ids=ev.token_ids,
                        logprobs=ev.logprobs or [],
                        finish_reason=ev.finish_reason or "",
                        weight_version=ev.weight_version,
                    )
                    if ev.routes is not None:
                        skip = min(max(0, req.routes_from - ev.routes_start), len(ev.routes))
                        msg.routes.CopyFrom(routes_proto(ev.routes, skip, ev.routes_start + skip))
                        nbytes += len(msg.routes.data)
                    yield msg
            else:
                for r in await self.service.generate(req, "grpc"):
                    msg = pb2.GenerateResponse(
                        prompt_index=r.prompt_index,
                        sample_index=r.sample_index,
                        prompt_token_ids=r.prompt_token_ids,
                        output_token_ids=r.output_token_ids,
                        logprobs=r.logprobs or [],
                        finish_reason=r.finish_reason,
                        weight_version=r.weight_version,
                    )
                    if r.routes is not None:
                        start = min(req.routes_from, len(r.routes))
                        msg.routes.CopyFrom(routes_proto(r.routes, start, start))
                        nbytes += len(msg.routes.data)
                    yield msg
            yield pb2.GenerateResponse(end=True, weight_version=self.service.engine.weight_version)
        except ApiError as e:
            await self._abort(context, e)
        finally:
            metrics.route_bytes.labels(protocol="grpc").inc(nbytes)

    async def GetInfo(self, request, context):
        if self.service.engine is None:
            await self._abort(context, ApiError(503, "unavailable", "the model is still loading"))
        i = self.service.engine.info
        return pb2.Info(
            model=i.model,
            architecture=i.architecture,
            num_moe_layers=i.num_moe_layers,
            num_experts=i.num_experts,
            top_k=i.top_k,
            weight_version=self.service.engine.weight_version,
            predictor=self.service.engine.plugin,
            route_dtype=i.route_dtype,
            max_model_len=i.max_model_len,
            vocab_size=i.vocab_size,
        )

    async def UpdateWeights(self, request_iterator, context):
        try:
            meta = dict(context.invocation_metadata())
            self.service.check_auth(meta.get("authorization"))
            first = await anext(aiter(request_iterator), None)
            if first is None or first.WhichOneof("part") != "header":
                raise ApiError(
                    400, "invalid_argument", "the first message must be the header", "header"
                )
            header = first.header
            if header.version < 1:
                raise ApiError(400, "invalid_argument", "version must be >= 1", "version")

            async def chunks() -> AsyncIterator[bytes]:
                async for m in request_iterator:
                    if m.WhichOneof("part") != "chunk":
                        raise ApiError(
                            400, "invalid_argument", "only chunks after the header", "chunk"
                        )
                    yield m.chunk

            res = await self.service.push_weights(
                header.version, chunks(), header.sha256, header.total_size or None, "grpc"
            )
            return pb2.UpdateWeightsResponse(**res)
        except ApiError as e:
            await self._abort(context, e)


async def start_grpc(service: RolloutService, host: str, port: int):
    """Start the aio server (not yet SERVING in health until :func:`set_serving`)."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", 64 << 20),
        ]
    )
    pb2_grpc.add_RolloutServicer_to_server(RolloutServicer(service), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in (SERVICE_NAME, ""):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection(
        (
            SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    server.pr2_health = health_servicer
    server.pr2_port = bound
    return server


async def set_serving(server) -> None:
    for name in (SERVICE_NAME, ""):
        await server.pr2_health.set(name, health_pb2.HealthCheckResponse.SERVING)
