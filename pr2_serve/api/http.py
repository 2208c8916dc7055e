"""HTTP API (FastAPI): thin over :class:`RolloutService`. OpenAPI at ``/openapi.json``.

Every refusal, ours or the framework's, is an :class:`ApiError` body
``{"error": {"type", "message", "field"}}`` (see :mod:`.errors`); so is every unexpected error
(a 500 ``internal``): no bare 500s.
"""

from __future__ import annotations

import json

from fastapi import FastAPI, Header, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from pr2_serve.api.sample_fields import route_window, sample_fields
from pr2_serve.api.schemas import (
    MAX_WEIGHT_VERSION,
    MIN_WEIGHT_VERSION,
    ErrorBody,
    GenerateRequest,
    GenerateResponse,
    Info,
    LoadWeightsRequest,
    Readiness,
    WeightsResponse,
)
from pr2_serve.core.types import Rollout, StreamEvent
from pr2_serve.dialects.openai_api import add_openai_routes
from pr2_serve.dialects.sglang_api import add_sglang_routes
from pr2_serve.service.collective_receive import TransferInitRequest, TransferRequest
from pr2_serve.service.errors import ApiError, from_validation, internal
from pr2_serve.service.rollout_service import RolloutService

ERRORS = {
    code: {"model": ErrorBody}
    for code in (400, 401, 403, 404, 409, 411, 413, 422, 429, 500, 502, 503, 507)
}
FRAMEWORK_KINDS = {400: "malformed_body", 404: "not_found", 405: "method_not_allowed"}
OCTET_STREAM_BODY = {
    "requestBody": {
        "required": True,
        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
    }
}


def routes_json(routes, routes_from: int, routes_start: int = 0) -> tuple[dict, int]:
    """``{"dtype", "shape", "data", "start"}`` of the requested rows, and their byte count."""
    enc, start = route_window(routes, routes_from, routes_start)
    return {**enc.to_json(), "start": start}, len(enc.data)


def sample_json(r: Rollout, routes_from: int) -> tuple[dict, int]:
    body = {**sample_fields(r), "routes": None}
    nbytes = 0
    if r.routes is not None:
        body["routes"], nbytes = routes_json(r.routes, routes_from)
    return body, nbytes


def event_json(ev: StreamEvent, routes_from: int) -> tuple[dict, int]:
    body: dict = {
        "prompt_index": ev.prompt_index,
        "sample_index": ev.sample_index,
        "token_ids": ev.token_ids,
        "logprobs": ev.logprobs,
        "weight_version": ev.weight_version,
    }
    if ev.prompt_token_ids is not None:
        body["prompt_token_ids"] = ev.prompt_token_ids
    nbytes = 0
    if ev.routes is not None:
        body["routes"], nbytes = routes_json(ev.routes, routes_from, ev.routes_start)
    if ev.finish_reason is not None:
        body["finish_reason"] = ev.finish_reason
    return body, nbytes


def error_response(e: ApiError, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(e.to_json(), status_code=e.status, headers=headers)


def create_app(service: RolloutService) -> FastAPI:
    app = FastAPI(
        title="pr2 rollout server",
        version="1",
        description="Rollouts with per-token MoE routes; versioned weight pushes.",
    )
    add_error_handlers(app, service)
    add_body_limit(app, service)
    add_health_routes(app, service)
    add_generate_routes(app, service)
    add_weights_route(app, service)
    add_rollback_route(app, service)
    add_load_route(app, service)
    add_transfer_routes(app, service)
    add_metrics_route(app, service)
    add_openai_routes(app, service)  # the OpenAI-compatible dialect (vLLM's shapes)
    add_sglang_routes(app, service)  # the SGLang-compatible /generate (slime, miles)
    return app


def add_error_handlers(app: FastAPI, service: RolloutService) -> None:
    """Our refusals, framework errors and schema violations, all as :class:`ApiError`."""
    errors = service.metrics.errors

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError):
        errors.labels(kind=e.kind).inc()
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException):
        """Framework errors (unparsable body, unknown route, wrong method) in our error shape."""
        err = ApiError(
            e.status_code, FRAMEWORK_KINDS.get(e.status_code, "http_error"), str(e.detail)
        )
        errors.labels(kind=err.kind).inc()
        return error_response(err, headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError):
        err = from_validation(e.errors())
        errors.labels(kind=err.kind).inc()
        return error_response(err)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, e: Exception):
        """Anything else: a 500 ``internal`` in the same shape (the traceback is logged)."""
        err = internal(e)
        errors.labels(kind=err.kind).inc()
        return error_response(err)


def add_body_limit(app: FastAPI, service: RolloutService) -> None:
    """Refuse oversize bodies from their Content-Length, before reading them."""
    app.add_middleware(BodyLimit, service=service)


class BodyLimit:
    """ASGI middleware of :func:`add_body_limit`. Plain ASGI, not ``@app.middleware``:
    Starlette's ``BaseHTTPMiddleware`` runs each chunk of a request body through a task group
    of its own, which costs a streamed weight upload (thousands of chunks) a third of its
    server time."""

    def __init__(self, app, service: RolloutService) -> None:
        self.app, self.service = app, service

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT"):
            refusal = self.refusal(Request(scope))
            if refusal is not None:
                return await error_response(refusal)(scope, receive, send)
        await self.app(scope, receive, send)

    def refusal(self, request: Request) -> ApiError | None:
        limits = self.service.limits
        upload = request.url.path.startswith("/v1/weights/")
        limit = limits.max_upload_bytes if upload else limits.max_request_bytes
        length = request.headers.get("content-length")
        if length is None and not upload:
            return ApiError(411, "length_required", "Content-Length required")
        if length is not None and (not length.isdigit() or int(length) > limit):
            self.service.metrics.errors.labels(kind="too_large").inc()
            return ApiError(
                413, "resource_exhausted", f"body of {length} bytes exceeds the limit {limit}"
            )
        return None


def add_health_routes(app: FastAPI, service: RolloutService) -> None:
    """Liveness, readiness and model info."""

    @app.get("/healthz", summary="Liveness", responses=ERRORS)
    async def healthz():
        """Always ``{"status": "ok"}`` while the process serves HTTP."""
        return {"status": "ok"}

    @app.get(
        "/readyz",
        summary="Readiness",
        response_model=Readiness,
        responses={503: {"model": Readiness}},
    )
    async def readyz():
        """200 ``{"status": "ready", "weight_version": 3}`` once the engine has loaded and
        the served weights pass the canary; 503 ``{"status": "not ready", "reason": ...}``
        before, if the engine failed, or while the served weights fail the canary."""
        ready, body = service.ready_body()
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/v1/info", response_model=Info, responses=ERRORS)
    async def info():
        """Model facts and the weight version being served (see :class:`Info`)."""
        return Info(**service.info())


def add_generate_routes(app: FastAPI, service: RolloutService) -> None:
    route_bytes = service.metrics.route_bytes

    @app.post("/v1/generate", response_model=GenerateResponse, responses=ERRORS)
    async def generate(
        req: GenerateRequest, x_pr2_fault: str | None = Header(None, include_in_schema=False)
    ):
        """Generate ``n`` samples per prompt with log-probs and routes.

        Request: ``{"prompts": [[1, 2, 3]], "n": 2, "max_tokens": 8, "seed": 0}``.
        Response: ``{"weight_version": 0, "samples": [{"prompt_index": 0, "sample_index": 0,
        "prompt_token_ids": [1, 2, 3], "output_token_ids": [...8 ids], "logprobs": [...],
        "finish_reason": "length", "weight_version": 0, "routes": {"dtype": "uint8",
        "shape": [10, 4, 2], "data": "<base64>", "start": 0}}, ...]}``
        """
        rollouts = await service.generate(req, "http", fault=x_pr2_fault)
        samples, nbytes = [], 0
        for r in rollouts:
            body, n = sample_json(r, req.routes_from)
            samples.append(body)
            nbytes += n
        route_bytes.labels(protocol="http").inc(nbytes)
        version = rollouts[0].weight_version if rollouts else service.engine.weight_version
        return JSONResponse({"weight_version": version, "samples": samples})

    @app.post("/v1/generate/stream", responses=ERRORS, response_class=StreamingResponse)
    async def generate_stream(req: GenerateRequest):
        """The same request as ``/v1/generate``; newline-delimited JSON events.

        Events: ``{"prompt_index": 0, "sample_index": 1, "token_ids": [42], "logprobs": [-0.7],
        "routes": {"dtype": "uint8", "shape": [1, 4, 2], "data": "...", "start": 5},
        "weight_version": 0}`` (``prompt_token_ids`` on a sample's first event,
        ``finish_reason`` on its last), then ``{"end": true}``.
        """
        events = service.stream(req, "http")
        first = await anext(events, None)  # surface validation errors as a 4xx, not mid-stream

        async def body():
            nbytes = 0
            ev = first
            try:
                while ev is not None:
                    obj, n = event_json(ev, req.routes_from)
                    nbytes += n
                    yield json.dumps(obj) + "\n"
                    ev = await anext(events, None)
                yield json.dumps({"end": True}) + "\n"
            except Exception as e:  # after the 200: the error is the stream's last line
                yield json.dumps({**internal(e).to_json(), "end": True}) + "\n"
            finally:
                route_bytes.labels(protocol="http").inc(nbytes)

        return StreamingResponse(body(), media_type="application/x-ndjson")


def add_weights_route(app: FastAPI, service: RolloutService) -> None:
    @app.put(
        "/v1/weights/{version}",
        response_model=WeightsResponse,
        responses=ERRORS,
        openapi_extra=OCTET_STREAM_BODY,
    )
    async def put_weights(
        request: Request,
        version: int = Path(ge=MIN_WEIGHT_VERSION, le=MAX_WEIGHT_VERSION),
        authorization: str | None = Header(None),
        x_content_sha256: str | None = Header(None),
        x_content_xxh128: str | None = Header(None),
    ):
        """Push a safetensors file (any subset of policy and predictor tensors, HF names).

        Headers: ``Authorization: Bearer <key>``, ``X-Content-SHA256: <hex>``. The body is
        streamed to disk; checksum, names, shapes and dtypes are verified before anything
        changes; running requests finish on the old version. Response:
        ``{"weight_version": 4, "num_tensors": 139, "seconds": 0.31}``.
        """
        service.check_auth(authorization)
        length = request.headers.get("content-length")
        return await service.updates.push_weights(
            version,
            request.stream(),
            x_content_sha256,
            int(length) if length is not None else None,
            "http",
            x_content_xxh128,
        )


def add_rollback_route(app: FastAPI, service: RolloutService) -> None:
    @app.post("/v1/weights/rollback/{version}", response_model=WeightsResponse, responses=ERRORS)
    async def rollback_weights(
        version: int = Path(ge=0, le=MAX_WEIGHT_VERSION),
        authorization: str | None = Header(None),
    ):
        """Serve a kept version again (``GET /v1/info`` lists ``kept_versions``; 0 is the
        model directory) as the next version number; the canary runs as for a push.

        Header: ``Authorization: Bearer <key>``. Response: ``{"weight_version": 6,
        "rolled_back_to": 4, "num_tensors": 139, "seconds": 0.2, ...}``; 404 on a version
        that is not kept.
        """
        service.check_auth(authorization)
        return await service.updates.rollback(version, "http")


def add_load_route(app: FastAPI, service: RolloutService) -> None:
    body_schema = {"application/json": {"schema": LoadWeightsRequest.model_json_schema()}}

    @app.post(
        "/v1/weights/load/{version}",
        response_model=WeightsResponse,
        responses=ERRORS,
        openapi_extra={"requestBody": {"required": True, "content": body_schema}},
    )
    async def load_weights(
        request: Request,
        version: int = Path(ge=MIN_WEIGHT_VERSION, le=MAX_WEIGHT_VERSION),
        authorization: str | None = Header(None),
    ):
        """Load a checkpoint from the server's own filesystem as ``version`` (SGLang's
        ``update_weights_from_disk``): only paths inside ``--weights-dir`` (403 otherwise,
        or when the flag is absent). Checked, applied and committed exactly as a push.

        Header: ``Authorization: Bearer <key>``. Body: ``{"path": "step-40/model"}`` (read
        only after the token is checked).
        """
        service.check_auth(authorization)
        try:
            body = LoadWeightsRequest.model_validate_json(await request.body())
        except ValidationError as e:
            raise from_validation(e.errors()) from None
        return await service.updates.load_weights(version, body.path, "http")


def add_transfer_routes(app: FastAPI, service: RolloutService) -> None:
    """Collective weight transfer (:mod:`.transfer`): the token is checked before the body."""

    def body_of(model) -> dict:
        content = {"application/json": {"schema": model.model_json_schema()}}
        return {"requestBody": {"required": True, "content": content}}

    async def parse(request: Request, model):
        try:
            return model.model_validate_json(await request.body())
        except ValidationError as e:
            raise from_validation(e.errors()) from None

    @app.post(
        "/v1/weights/transfer/init", responses=ERRORS, openapi_extra=body_of(TransferInitRequest)
    )
    async def transfer_init(request: Request, authorization: str | None = Header(None)):
        """Join the trainer's weight-transfer group (vLLM's ``init_weight_transfer_engine``).

        Body: ``{"backend": "gloo", "master_address", "master_port", "world_size",
        "rank_offset"}`` (+ ``bucket_bytes``, ``timeout_s``); answers once every rank has
        joined: ``{"backend": "gloo", "world_size": 2, "workers": 1}``; 502 if the group
        could not be formed within ``timeout_s``.
        """
        service.check_auth(authorization)
        return await service.updates.transfer_init(await parse(request, TransferInitRequest))

    @app.post(
        "/v1/weights/transfer/{version}",
        response_model=WeightsResponse,
        responses=ERRORS,
        openapi_extra=body_of(TransferRequest),
    )
    async def transfer_weights(
        request: Request,
        version: int = Path(ge=MIN_WEIGHT_VERSION, le=MAX_WEIGHT_VERSION),
        authorization: str | None = Header(None),
    ):
        """Receive ``version`` over the group: ``{"names", "dtypes", "shapes"}`` announce the
        tensors; the trainer broadcasts them while this call is open. Checked, applied and
        committed as a push; a failure on the wire (502) applies nothing and closes the group.
        """
        service.check_auth(authorization)
        req = await parse(request, TransferRequest)
        return await service.updates.transfer_weights(version, req, "http")


def add_metrics_route(app: FastAPI, service: RolloutService) -> None:
    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics_route():
        """Prometheus text format: requests, tokens, latency, route bytes, weight version,
        weight updates and their duration, errors by kind."""
        return Response(service.metrics.render(), media_type="text/plain; version=0.0.4")
