"""gRPC API (grpcio aio, package ``pr2.rollout.v1``): thin over :class:`RolloutService`.

Also serves the standard ``grpc.health.v1`` health service (SERVING once ready) and server
reflection. Errors map to canonical codes: INVALID_ARGUMENT, UNAUTHENTICATED,
PERMISSION_DENIED, NOT_FOUND, FAILED_PRECONDITION, RESOURCE_EXHAUSTED, UNAVAILABLE, INTERNAL;
the error's type (``canary_failed``, ``internal``...) and field travel in the trailing metadata.
Every unexpected error is an INTERNAL ``internal`` in that shape.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from pydantic import ValidationError

from pr2_serve.api.chunk_codec import decode_upload
from pr2_serve.api.proto import load
from pr2_serve.api.sample_fields import route_window, sample_fields
from pr2_serve.api.schemas import MIN_WEIGHT_VERSION, GenerateRequest
from pr2_serve.core.types import Rollout, StreamEvent
from pr2_serve.service.collective_receive import TransferInitRequest, TransferRequest
from pr2_serve.service.errors import (
    FIELD_METADATA_KEY,
    TYPE_METADATA_KEY,
    ApiError,
    from_validation,
    internal,
)
from pr2_serve.service.rollout_service import RolloutService

pb2, pb2_grpc = load()
SERVICE_NAME = pb2.DESCRIPTOR.services_by_name["Rollout"].full_name
MAX_MESSAGE = 8 << 20  # weight chunks are sent in 1-4 MiB messages

STATUS_TO_CODE = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,  # an upload that stalled
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


def routes_proto(routes, routes_from: int, routes_start: int = 0):
    """``pb2.Routes`` of the requested rows."""
    enc, start = route_window(routes, routes_from, routes_start)
    return pb2.Routes(dtype=enc.dtype, shape=list(enc.shape), data=enc.data, start=start)


def sample_proto(r: Rollout, routes_from: int):
    msg = pb2.GenerateResponse(**{**sample_fields(r), "logprobs": r.logprobs or []})
    if r.routes is not None:
        msg.routes.CopyFrom(routes_proto(r.routes, routes_from))
    return msg


def event_proto(ev: StreamEvent, routes_from: int):
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
        msg.routes.CopyFrom(routes_proto(ev.routes, routes_from, ev.routes_start))
    return msg


class RolloutServicer(pb2_grpc.RolloutServicer):
    def __init__(self, service: RolloutService) -> None:
        self.service = service

    async def _abort(self, context, e: BaseException):
        """The error's code and message; its type and field in the trailing metadata."""
        e = internal(e)
        self.service.metrics.errors.labels(kind=e.kind).inc()
        trailing = ((TYPE_METADATA_KEY, e.kind),)
        if e.field is not None:
            trailing += ((FIELD_METADATA_KEY, e.field),)
        code = STATUS_TO_CODE.get(e.status, grpc.StatusCode.INTERNAL)
        await context.abort(code, e.message, trailing_metadata=trailing)

    async def Generate(self, request, context):
        try:
            req = request_from_proto(request)
        except ValidationError as e:
            await self._abort(context, from_validation(e.errors()))
            return
        except Exception as e:
            await self._abort(context, e)
            return
        nbytes = 0
        try:
            if request.stream:
                async for ev in self.service.stream(req, "grpc"):
                    msg = event_proto(ev, req.routes_from)
                    nbytes += len(msg.routes.data)
                    yield msg
            else:
                fault = dict(context.invocation_metadata()).get("x-pr2-fault")  # tests only
                for r in await self.service.generate(req, "grpc", fault=fault):
                    msg = sample_proto(r, req.routes_from)
                    nbytes += len(msg.routes.data)
                    yield msg
            yield pb2.GenerateResponse(end=True, weight_version=self.service.engine.weight_version)
        except Exception as e:  # ours (ApiError) or unexpected (internal)
            await self._abort(context, e)
        finally:
            self.service.metrics.route_bytes.labels(protocol="grpc").inc(nbytes)

    async def GetInfo(self, request, context):
        try:
            return pb2.Info(**self.service.info())
        except Exception as e:
            await self._abort(context, e)

    async def UpdateWeights(self, request_iterator, context):
        try:
            meta = dict(context.invocation_metadata())
            self.service.check_auth(meta.get("authorization"))
            first = await anext(aiter(request_iterator), None)
            if _part(first) != "header":
                raise ApiError(
                    400, "invalid_argument", "the first message must be the header", "header"
                )
            header = first.header
            if header.version < MIN_WEIGHT_VERSION:  # the schema's bound, as HTTP's path
                raise ApiError(
                    400, "invalid_argument", f"version must be >= {MIN_WEIGHT_VERSION}", "version"
                )
            res = await self.service.updates.push_weights(
                header.version,
                _chunks(request_iterator),
                header.sha256,
                header.total_size or None,
                "grpc",
                header.xxh128,
            )
            return pb2.UpdateWeightsResponse(**res)
        except Exception as e:
            await self._abort(context, e)

    async def RollbackWeights(self, request, context):
        try:
            meta = dict(context.invocation_metadata())
            self.service.check_auth(meta.get("authorization"))
            if request.version < 0:
                raise ApiError(400, "invalid_argument", "version must be >= 0", "version")
            res = await self.service.updates.rollback(request.version, "grpc")
            return pb2.UpdateWeightsResponse(**res)
        except Exception as e:
            await self._abort(context, e)

    async def LoadWeights(self, request, context):
        try:
            meta = dict(context.invocation_metadata())
            self.service.check_auth(meta.get("authorization"))
            if request.version < MIN_WEIGHT_VERSION:
                raise ApiError(
                    400, "invalid_argument", f"version must be >= {MIN_WEIGHT_VERSION}", "version"
                )
            res = await self.service.updates.load_weights(request.version, request.path, "grpc")
            return pb2.UpdateWeightsResponse(**res)
        except Exception as e:
            await self._abort(context, e)

    async def TransferInit(self, request, context):
        try:
            self._auth(context)
            req = _validated(TransferInitRequest, transfer_init_fields(request))
            return pb2.TransferInitResponse(**await self.service.updates.transfer_init(req))
        except Exception as e:
            await self._abort(context, e)

    async def TransferWeights(self, request, context):
        try:
            self._auth(context)
            if request.version < MIN_WEIGHT_VERSION:
                raise ApiError(
                    400, "invalid_argument", f"version must be >= {MIN_WEIGHT_VERSION}", "version"
                )
            fields = {
                "names": list(request.names),
                "dtypes": list(request.dtypes),
                "shapes": [list(s.dims) for s in request.shapes],
            }
            req = _validated(TransferRequest, fields)
            res = await self.service.updates.transfer_weights(request.version, req, "grpc")
            return pb2.UpdateWeightsResponse(**res)
        except Exception as e:
            await self._abort(context, e)

    def _auth(self, context) -> None:
        self.service.check_auth(dict(context.invocation_metadata()).get("authorization"))


def transfer_init_fields(msg) -> dict:
    """A ``TransferInitRequest`` message as the HTTP body (0 / "": the default)."""
    fields = {
        "backend": msg.backend,
        "master_address": msg.master_address,
        "master_port": msg.master_port,
        "world_size": msg.world_size,
        "rank_offset": msg.rank_offset,
        "bucket_bytes": msg.bucket_bytes,
        "timeout_s": msg.timeout_s,
    }
    return {
        k: v for k, v in fields.items() if v or k not in ("backend", "bucket_bytes", "timeout_s")
    }


def _validated(model, fields: dict):
    """``model`` of ``fields`` with the HTTP route's validation (a 422 naming the field)."""
    try:
        return model(**fields)
    except ValidationError as e:
        raise from_validation(e.errors()) from None


async def _chunks(request_iterator) -> AsyncIterator[bytes]:
    """The upload's bytes: every message after the header must be a chunk."""
    async for m in request_iterator:
        if _part(m) != "chunk":
            raise ApiError(400, "invalid_argument", "only chunks after the header", "chunk")
        yield m if isinstance(m, memoryview) else m.chunk  # a view: decoded without a copy


def _part(m) -> str | None:
    """Which part of an upload message ``m`` is (a ``memoryview`` is a chunk's bytes)."""
    if m is None:
        return None
    return "chunk" if isinstance(m, memoryview) else m.WhichOneof("part")


class _UploadCodec:
    """``server`` as the generated registration sees it: ``UpdateWeights`` decodes its
    messages with :func:`decode_upload` (chunks without protobuf's copies; registered
    handlers take precedence over the generic one)."""

    def __init__(self, server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers) -> None:
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        upload = handlers["UpdateWeights"]._replace(request_deserializer=decode_upload)
        self._server.add_registered_method_handlers(service, {**handlers, "UpdateWeights": upload})


async def start_grpc(service: RolloutService, host: str, port: int):
    """Start the aio server (not yet SERVING in health until :func:`set_serving`)."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", 64 << 20),
        ]
    )
    pb2_grpc.add_RolloutServicer_to_server(RolloutServicer(service), _UploadCodec(server))
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


async def set_serving(server, serving: bool = True) -> None:
    """gRPC health of the server: SERVING, or NOT_SERVING (the served weights fail the
    canary; the service calls this whenever that changes)."""
    status = health_pb2.HealthCheckResponse
    for name in (SERVICE_NAME, ""):
        await server.pr2_health.set(name, status.SERVING if serving else status.NOT_SERVING)
